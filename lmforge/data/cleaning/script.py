"""Script filter: keep documents whose letters are mostly in the configured Unicode scripts.

Why scripts and not languages: a script test needs no model download and is exact for the usual
goal (a Chinese corpus without Cyrillic spam, an English one without CJK pages). The script of a
letter comes from fixed Unicode block ranges (below); letters are what ``str.isalpha`` accepts, so
digits, punctuation and spaces never count either way. Both counts are single regex scans.
"""

from __future__ import annotations

import re

from lmforge.data.cleaning.text import Doc

SCRIPT_RANGES: dict[str, str] = {
    "latin": "A-Za-z\u00aa\u00ba\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u024f\u0250-\u02af\u1e00-\u1eff"
    "\u2c60-\u2c7f\ua720-\ua7ff\uff21-\uff3a\uff41-\uff5a",
    "han": "\u3005-\u3007\u3021-\u3029\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
    "\U00020000-\U0002ebef\U00030000-\U0003134f",
    "cyrillic": "\u0400-\u052f\u1c80-\u1c8f\u2de0-\u2dff\ua640-\ua69f",
    "arabic": "\u0600-\u06ff\u0750-\u077f\u08a0-\u08ff\ufb50-\ufdff\ufe70-\ufeff",
    "devanagari": "\u0900-\u097f\ua8e0-\ua8ff",
    "greek": "\u0370-\u03ff\u1f00-\u1fff",
    "hangul": "\u1100-\u11ff\u3130-\u318f\ua960-\ua97f\uac00-\ud7af\ud7b0-\ud7ff\uffa0-\uffdc",
    "kana": "\u3040-\u309f\u30a0-\u30ff\u31f0-\u31ff\uff66-\uff9f",
}
_LETTER = re.compile(r"[^\W\d_]")


class ScriptFilter:
    """Reject a document when under ``min_fraction`` of its letters are in ``scripts``."""

    name = "script"

    def __init__(self, scripts: list[str], min_fraction: float) -> None:
        unknown = sorted(set(scripts) - set(SCRIPT_RANGES))
        if unknown:
            raise ValueError(f"unknown scripts {unknown}; known: {sorted(SCRIPT_RANGES)}")
        self.scripts = list(scripts)
        self.min_fraction = min_fraction
        ranges = "".join(SCRIPT_RANGES[name] for name in scripts)
        self._in_scripts = re.compile(f"(?=[^\\W\\d_])[{ranges}]")
        self._reason = f"under {min_fraction:.0%} of letters in {'/'.join(scripts)}"

    def fraction(self, text: str) -> float:
        """Fraction of the letters of ``text`` in the configured scripts (0 without letters)."""
        letters = len(_LETTER.findall(text))
        if not letters:
            return 0.0
        return len(self._in_scripts.findall(text)) / letters

    def __call__(self, doc: Doc) -> str | None:
        if self.fraction(doc.text) < self.min_fraction:
            return self._reason
        return None
