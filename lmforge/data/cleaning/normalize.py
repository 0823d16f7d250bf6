"""Unicode NFKC, whitespace and control characters.

Why: the same text arrives with full-width letters, non-breaking spaces, ``\\r\\n`` line ends and
stray control bytes; without normalisation exact deduplication misses such copies and the
tokenizer wastes vocabulary on variants. Line structure is kept (the line-based quality rules need
it): spaces and tabs collapse to one space, lines are stripped, three or more line breaks become
one blank line.
"""

from __future__ import annotations

import re
import unicodedata

# C0/C1 control characters except tab and newline, plus zero-width space, BOM and soft hyphen.
# Zero-width joiners stay: emoji sequences and Indic scripts need them. (Regexes, not str.translate
# with a dict, which maps character by character in Python-level lookups and is several times slower.)
_DROP = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\ufeff\u00ad]")
_LINE_BREAK = re.compile("\r\n?|[\u2028\u2029]")
_HORIZONTAL = re.compile(r"[^\S\n]+")
_AROUND_NEWLINE = re.compile(r" ?\n ?")
_BLANK_RUN = re.compile(r"\n{3,}")


def normalize(text: str) -> str:
    """NFKC, no control characters, single spaces, stripped lines, at most one blank line in a row."""
    text = _DROP.sub("", _LINE_BREAK.sub("\n", text))
    if not text.isascii():
        text = unicodedata.normalize("NFKC", text)
    text = _HORIZONTAL.sub(" ", text)
    text = _AROUND_NEWLINE.sub("\n", text)
    return _BLANK_RUN.sub("\n\n", text).strip()
