"""A document as the pipeline sees it, and its one-time tokenisation shared by every filter.

Why a shared view: Gopher, C4 and FineWeb rules, the script filter and MinHash all need the
document's words, lines and n-grams. Tokenising once per document (not once per filter) is most
of the speed difference with a filter chain where each filter splits the text again.

Words: runs of letters/digits (an apostrophe may join two runs: ``don't``), lowercased. Each Han or
Kana character is a word of its own, because Chinese and Japanese are written without spaces; so
word n-grams of CJK text are character n-grams. Hangul is space-separated and tokenised like Latin.
"""

from __future__ import annotations

import re
import zlib
from typing import Any

import numpy as np

# Han (CJK unified ideographs, extension A, compatibility, extensions B+) and Kana.
CJK_RANGES = (
    "\u3005-\u3007\u3040-\u30ff\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff66-\uff9f\U00020000-\U0002ebef"
)
_WORD = re.compile(rf"[{CJK_RANGES}]|[^\W_{CJK_RANGES}]+(?:['’][^\W_{CJK_RANGES}]+)*")
_CJK_CHAR = re.compile(f"[{CJK_RANGES}]")
CJK_WORD_FRACTION = 0.3
"""A document is CJK when at least this fraction of its words are Han/Kana characters."""

# Odd 64-bit multipliers of the n-gram hash: h(w_0..w_{n-1}) = sum_i w_i * K_i mod 2**64.
_NGRAM_K = np.random.default_rng(0x6C6D66).integers(1, 2**63, size=64, dtype=np.uint64) * np.uint64(2) + np.uint64(1)


class TextView:
    """Words, lines and hashes of one text, each computed on first use and then reused."""

    __slots__ = ("text", "_words", "_cjk", "_lines", "_hashes", "_ngrams", "_word_lengths")

    def __init__(self, text: str) -> None:
        self.text = text
        self._words: list[str] | None = None
        self._cjk: bool | None = None
        self._lines: list[str] | None = None
        self._hashes: np.ndarray | None = None
        self._ngrams: dict[int, np.ndarray] = {}
        self._word_lengths: np.ndarray | None = None

    @property
    def words(self) -> list[str]:
        """Lowercased words (see the module docstring)."""
        if self._words is None:
            self._words = _WORD.findall(self.text.lower())
        return self._words

    @property
    def cjk(self) -> bool:
        """Whether the text is mostly Chinese/Japanese (character n-grams, CJK stop words)."""
        if self._cjk is None:
            words = self.words
            if not words:
                self._cjk = False
            else:
                self._cjk = len(_CJK_CHAR.findall(self.text)) >= CJK_WORD_FRACTION * len(words)
        return self._cjk

    @property
    def lines(self) -> list[str]:
        """Non-blank lines, stripped."""
        if self._lines is None:
            self._lines = [line.strip() for line in self.text.split("\n") if line.strip()]
        return self._lines

    @property
    def word_hashes(self) -> np.ndarray:
        """CRC32 of each word (deterministic across processes, unlike ``hash``), as uint64."""
        if self._hashes is None:
            words = self.words
            self._hashes = np.fromiter(map(zlib.crc32, map(str.encode, words)), dtype=np.uint64, count=len(words))
        return self._hashes

    @property
    def word_lengths(self) -> np.ndarray:
        """Prefix sums of word lengths: ``chars(words[i:j]) == word_lengths[j] - word_lengths[i]``."""
        if self._word_lengths is None:
            lengths = np.fromiter(map(len, self.words), dtype=np.int64, count=len(self.words))
            self._word_lengths = np.concatenate(([0], np.cumsum(lengths)))
        return self._word_lengths

    def ngram_hashes(self, n: int) -> np.ndarray:
        """64-bit hash of every word n-gram (empty when the text has fewer than ``n`` words)."""
        cached = self._ngrams.get(n)
        if cached is None:
            hashes = self.word_hashes
            count = len(hashes) - n + 1
            if count <= 0:
                cached = np.empty(0, dtype=np.uint64)
            else:
                cached = hashes[:count] * _NGRAM_K[0]
                for i in range(1, n):
                    cached = cached + hashes[i : i + count] * _NGRAM_K[i]
            self._ngrams[n] = cached
        return cached


class Doc:
    """One record as reading (:mod:`lmforge.data.sources`) yields it and the cleaning stages see it.

    ``fields`` is ``[text]`` (formats text and jsonl) or ``[prompt, response]`` (sft). ``obj`` is
    the parsed JSON object (None for plain text), kept for the annotation rules. Filters look at
    :attr:`text`, the fields joined by a blank line, through :attr:`view`.
    """

    __slots__ = ("fields", "obj", "source", "_view")

    def __init__(self, fields: list[str], obj: dict[str, Any] | None = None, source: str = "") -> None:
        self.fields = fields
        self.obj = obj
        self.source = source
        self._view: TextView | None = None

    @property
    def text(self) -> str:
        return self.fields[0] if len(self.fields) == 1 else "\n\n".join(self.fields)

    @property
    def view(self) -> TextView:
        if self._view is None:
            self._view = TextView(self.text)
        return self._view

    def set_fields(self, fields: list[str]) -> None:
        """Replace the text (normalisation, redaction, C4 line removal); the view is rebuilt."""
        self.fields = fields
        self._view = None

    @property
    def key(self) -> str:
        """The split key (see ``lmforge.data.preparation.is_validation``)."""
        return self.fields[0] if len(self.fields) == 1 else self.fields[0] + "\x1e" + self.fields[1]

    @property
    def record(self) -> Any:
        """What the spool stores: the text, or ``[prompt, response]``."""
        return self.fields[0] if len(self.fields) == 1 else list(self.fields)
