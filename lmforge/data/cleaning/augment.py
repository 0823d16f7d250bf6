"""Augmentation of fine-tuning data: synonym replacement and sentence reordering.

Applied after the train/validation split to training records only, so validation measures the
real data. Every choice is drawn from a ``random.Random`` seeded by the record's text and the copy
number, so a rerun produces the same copies whatever the order or number of processes.

Synonym table (``synonymTable``): TSV, one ``word<TAB>synonym[<TAB or comma>synonym...]`` per line
(``#`` starts a comment), or JSON ``{"word": ["synonym", ...]}``. Keys are matched case-sensitively,
longest first; ASCII keys only as whole words, CJK keys anywhere (Chinese has no spaces).

Sentences end at ``.``, ``!``, ``?`` followed by a space, or right after ``。``, ``！``, ``？``
(and their full-width/half-width forms); reordering shuffles the sentences of each paragraph.
"""

from __future__ import annotations

import hashlib
import json
import random
import re

_SENTENCE = re.compile(r"(?<=[.!?])\s+|(?<=[。！？｡])")


def parse_synonyms(raw: bytes, name: str = "synonym table") -> dict[str, list[str]]:
    """The word -> synonyms mapping of a TSV or JSON synonym table."""
    text = raw.decode("utf-8-sig")
    table: dict[str, list[str]] = {}
    if text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"{name} is not valid JSON: {exc}") from None
        for word, synonyms in data.items():
            values = [synonyms] if isinstance(synonyms, str) else list(synonyms)
            table[str(word)] = [str(v) for v in values if str(v) and str(v) != word]
    else:
        for line in text.splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            word, _, rest = line.partition("\t")
            synonyms = [s.strip() for s in re.split(r"[\t,]", rest) if s.strip() and s.strip() != word.strip()]
            if word.strip() and synonyms:
                table.setdefault(word.strip(), []).extend(synonyms)
    return {word: synonyms for word, synonyms in table.items() if synonyms}


def split_sentences(text: str) -> list[str]:
    """Sentences of one paragraph (Latin and Chinese terminal punctuation)."""
    return [s for s in _SENTENCE.split(text) if s.strip()]


class Augmenter:
    """Makes up to ``copies`` changed copies of a training record."""

    def __init__(
        self, synonyms: dict[str, list[str]], synonym_probability: float, reorder_probability: float, copies: int = 1
    ) -> None:
        self.synonyms = synonyms
        self.synonym_probability = synonym_probability if synonyms else 0.0
        self.reorder_probability = reorder_probability
        self.copies = copies
        self.added = 0
        self._pattern: re.Pattern[str] | None = None
        if synonyms:
            alternatives = []
            for word in sorted(synonyms, key=len, reverse=True):
                escaped = re.escape(word)
                alternatives.append(rf"\b{escaped}\b" if word.isascii() else escaped)
            self._pattern = re.compile("|".join(alternatives))

    @property
    def enabled(self) -> bool:
        return self.synonym_probability > 0 or self.reorder_probability > 0

    def _rng(self, fields: list[str], copy: int) -> random.Random:
        digest = hashlib.blake2b("\x1e".join(fields).encode("utf-8", "surrogatepass"), digest_size=8).digest()
        return random.Random(int.from_bytes(digest, "big") + copy)

    def _replace_synonyms(self, text: str, rng: random.Random) -> str:
        if self._pattern is None or self.synonym_probability <= 0:
            return text

        def pick(match: re.Match[str]) -> str:
            if rng.random() < self.synonym_probability:
                return rng.choice(self.synonyms[match.group()])
            return match.group()

        return self._pattern.sub(pick, text)

    def _reorder(self, text: str, rng: random.Random) -> str:
        if self.reorder_probability <= 0 or rng.random() >= self.reorder_probability:
            return text
        paragraphs = []
        for paragraph in text.split("\n"):
            sentences = split_sentences(paragraph)
            rng.shuffle(sentences)
            joiner = "" if any("\u3000" <= s[-1:] <= "\uffef" for s in sentences) else " "
            paragraphs.append(joiner.join(s.strip() for s in sentences))
        return "\n".join(paragraphs)

    def augment(self, fields: list[str]) -> list[list[str]]:
        """The changed copies of ``fields`` (copies identical to the original are left out)."""
        out: list[list[str]] = []
        for copy in range(self.copies):
            rng = self._rng(fields, copy)
            changed = [self._reorder(self._replace_synonyms(field, rng), rng) for field in fields]
            if changed != fields and changed not in out:
                out.append(changed)
        self.added += len(out)
        return out
