"""Heuristic quality filters: Gopher quality, Gopher repetition, C4 and FineWeb.

Thresholds are the published defaults (Rae et al. 2021, "Scaling Language Models: Methods,
Analysis & Insights from Training Gopher", appendix A; Raffel et al. 2020, C4; Penedo et al.
2024, FineWeb), as datatrove implements them, so that results are comparable:

Gopher quality (a document is removed when)
    words < 50 or > 100,000; mean word length < 3 or > 10 characters; ``#`` per word > 0.1;
    ellipses (``...``, ``…``) per word > 0.1; > 90 % of lines start with a bullet (``•``, ``-``);
    > 30 % of lines end with an ellipsis; < 80 % of words contain a letter; fewer than 2 of the stop
    words *the, be, to, of, and, that, have, with*.
Gopher repetition
    duplicate lines > 30 % of lines or > 20 % of characters; duplicate paragraphs > 30 % of
    paragraphs or > 20 % of characters; the most frequent 2-, 3-, 4-gram covers > 20 %, 18 %, 16 %
    of characters; duplicated 5- to 10-grams cover > 15 %, 14 %, 13 %, 12 %, 11 %, 10 %.
C4 (line-level, then document-level; it rewrites the text to the kept lines)
    drop lines without terminal punctuation or ending in an ellipsis, with fewer than 3 words, with
    a word over 1,000 characters, mentioning javascript, or cookie/privacy/terms-of-use notices;
    strip citation markers ``[1]``, ``[edit]``; remove the document if a line contains "lorem
    ipsum" or ``{``, or fewer than 5 sentences remain. (C4's bad-words list is not bundled.)
FineWeb
    < 12 % of lines end with terminal punctuation; > 67 % of lines are 30 characters or shorter;
    characters in duplicate lines > 1 % of the non-newline characters; newlines per word > 0.3.

Chinese/Japanese documents (see :mod:`.text`: one word per character) skip the mean-word-length
rule, which assumes space-separated words, and use Chinese stop words (的 了 是 在 和 有 我 不 这 就).
Every rule reads the shared :class:`~.text.TextView`, so a document is tokenised once.
"""

from __future__ import annotations

import re

import numpy as np

from lmforge.data.cleaning.text import Doc, TextView

TERMINAL_PUNCTUATION = (".", "!", "?", '"', "'", "”", "’", "。", "！", "？", "」", "』", "…", "؟", "।", "॥", "｡")
C4_END_PUNCTUATION = (".", "?", "!", '"', "'", "。", "！", "？", "”", "」")
ENGLISH_STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
CHINESE_STOP_WORDS = frozenset("的了是在和有我不这就")
_PARAGRAPHS = re.compile(r"\n{2,}")
_LINES = re.compile(r"\n+")
_CITATION = re.compile(r"\[\d*\]|\[edit\]|\[citation needed\]", re.IGNORECASE)
_SENTENCE_END = re.compile(r"[.!?。！？]+")
_POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")


def find_duplicates(items: list[str]) -> tuple[int, int]:
    """(number of repeated items, characters in the repeats), the first occurrence not counted."""
    seen: set[str] = set()
    count = chars = 0
    for item in items:
        if item in seen:
            count += 1
            chars += len(item)
        else:
            seen.add(item)
    return count, chars


def gopher_quality(view: TextView) -> str | None:
    words = view.words
    n = len(words)
    if n < 50:
        return "gopher_quality: fewer than 50 words"
    if n > 100_000:
        return "gopher_quality: more than 100,000 words"
    text = view.text
    if not view.cjk:
        mean = (view.word_lengths[-1]) / n
        if mean < 3:
            return "gopher_quality: mean word length below 3"
        if mean > 10:
            return "gopher_quality: mean word length above 10"
    if text.count("#") / n > 0.1:
        return "gopher_quality: too many # per word"
    if (text.count("...") + text.count("…")) / n > 0.1:
        return "gopher_quality: too many ellipses per word"
    lines = view.lines
    if lines:
        if sum(1 for line in lines if line.startswith(("•", "-"))) / len(lines) > 0.9:
            return "gopher_quality: mostly bullet lines"
        if sum(1 for line in lines if line.endswith(("...", "…"))) / len(lines) > 0.3:
            return "gopher_quality: too many lines end with an ellipsis"
    if sum(map(str.isnumeric, words)) / n > 0.2:
        return "gopher_quality: under 80% of words contain a letter"
    stop = CHINESE_STOP_WORDS if view.cjk else ENGLISH_STOP_WORDS
    if sum(map(stop.__contains__, words)) < 2:
        return "gopher_quality: fewer than 2 stop words"
    return None


_TOP_NGRAMS = ((2, 0.20), (3, 0.18), (4, 0.16))
_DUP_NGRAMS = ((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10))


def _top_ngram_chars(view: TextView, n: int) -> int:
    """Characters covered by the most frequent n-gram (its length with spaces x its count)."""
    hashes = view.ngram_hashes(n)
    _, first, counts = np.unique(hashes, return_index=True, return_counts=True)
    best = counts.max()
    start = int(first[counts == best].min())  # ties: the n-gram that appears first, as Counter does
    prefix = view.word_lengths
    return int(prefix[start + n] - prefix[start] + n - 1) * int(best)


def _duplicate_ngram_chars(view: TextView, n: int) -> int:
    """Characters in n-grams that repeat an earlier one, scanning greedily (Gopher's definition)."""
    hashes = view.ngram_hashes(n)
    _, inverse, counts = np.unique(hashes, return_inverse=True, return_counts=True)
    if counts.size == hashes.size:
        return 0  # no n-gram repeats: decided without a Python loop
    # Only n-grams that occur more than once can ever be "seen again"; the scan visits just those
    # positions, and ``resume`` replays the greedy skip of n positions after each repeat.
    positions = np.flatnonzero(counts[inverse] > 1)
    ids = inverse[positions].tolist()
    prefix = view.word_lengths
    seen: set[int] = set()
    chars = 0
    resume = 0
    for position, ngram in zip(positions.tolist(), ids, strict=True):
        if position < resume:
            continue
        if ngram in seen:
            chars += int(prefix[position + n] - prefix[position])
            resume = position + n
        else:
            seen.add(ngram)
    return chars


def gopher_repetition(view: TextView) -> str | None:
    text = view.text
    size = len(text)
    if not size:
        return None
    paragraphs = _PARAGRAPHS.split(text.strip())
    count, chars = find_duplicates(paragraphs)
    if count / len(paragraphs) > 0.3:
        return "gopher_repetition: duplicate paragraphs"
    if chars / size > 0.2:
        return "gopher_repetition: characters in duplicate paragraphs"
    lines = _LINES.split(text)
    count, chars = find_duplicates(lines)
    if count / len(lines) > 0.3:
        return "gopher_repetition: duplicate lines"
    if chars / size > 0.2:
        return "gopher_repetition: characters in duplicate lines"
    words = len(view.words)
    for n, limit in _TOP_NGRAMS:
        if words >= n and _top_ngram_chars(view, n) / size > limit:
            return f"gopher_repetition: top {n}-gram"
    for n, limit in _DUP_NGRAMS:
        if words >= n and _duplicate_ngram_chars(view, n) / size > limit:
            return f"gopher_repetition: duplicated {n}-grams"
    return None


def c4(doc: Doc) -> str | None:
    """C4's rules; on success the document keeps only its accepted lines (single-field records)."""
    kept: list[str] = []
    sentences = 0
    cjk = doc.view.cjk
    for line in doc.view.lines:
        words = TextView(line).words if cjk else line.split()
        if any(len(word) > 1000 for word in words):
            continue
        line = _CITATION.sub("", line)
        if not line.endswith(C4_END_PUNCTUATION) or line.endswith("..."):
            continue
        if len(words) < 3:
            continue
        lowered = line.lower()
        if "lorem ipsum" in lowered:
            return "c4: lorem ipsum"
        if "javascript" in lowered:
            continue
        if "{" in line:
            return "c4: curly bracket"
        if any(policy in lowered for policy in _POLICY):
            continue
        sentences += max(1, len(_SENTENCE_END.findall(line)))
        kept.append(line)
    if sentences < 5:
        return "c4: fewer than 5 sentences"
    if len(doc.fields) == 1:
        text = "\n".join(kept).strip()
        if text != doc.fields[0]:
            doc.set_fields([text])
    return None


def fineweb(view: TextView) -> str | None:
    lines = view.lines
    if not lines:
        return "fineweb: empty"
    if sum(1 for line in lines if line.endswith(TERMINAL_PUNCTUATION)) / len(lines) < 0.12:
        return "fineweb: few lines end with punctuation"
    if sum(1 for line in lines if len(line) <= 30) / len(lines) > 0.67:
        return "fineweb: mostly short lines"
    stripped = len(view.text) - view.text.count("\n")
    if stripped and find_duplicates(lines)[1] / stripped > 0.01:
        return "fineweb: characters in duplicate lines"
    if view.words and view.text.count("\n") / len(view.words) > 0.3:
        return "fineweb: too many newlines per word (list-like)"
    return None


class QualityFilters:
    """The enabled rule sets, run in datatrove's FineWeb order over one shared view."""

    name = "quality"

    def __init__(self, gopher_quality: bool, gopher_repetition: bool, c4: bool, fineweb: bool) -> None:
        self.gopher_quality = gopher_quality
        self.gopher_repetition = gopher_repetition
        self.c4 = c4
        self.fineweb = fineweb

    @property
    def enabled(self) -> bool:
        return self.gopher_quality or self.gopher_repetition or self.c4 or self.fineweb

    def __call__(self, doc: Doc) -> str | None:
        if self.gopher_repetition and (reason := gopher_repetition(doc.view)):
            return reason
        if self.gopher_quality and (reason := gopher_quality(doc.view)):
            return reason
        if self.c4 and (reason := c4(doc)):
            return reason
        if self.fineweb and (reason := fineweb(doc.view)):
            return reason
        return None
