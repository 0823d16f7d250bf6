"""Exact and near-duplicate removal; the first copy of a document is kept.

Exact: a 128-bit BLAKE2b digest of the normalised text (16 bytes per kept document in memory).

Near: MinHash LSH (``datasketch``). Shingles are word n-grams of :class:`~.text.TextView` words,
so for Chinese/Japanese (one word per character) they are character n-grams. Each shingle is a
64-bit polynomial hash of its word CRC32s, folded to 32 bits for MinHash; the n-gram hashes are
computed with numpy for the whole document at once instead of hashing shingle strings one by one,
which is where a naive MinHash spends its time. ``bands x rows`` is the number of permutations;
FineWeb's 14 x 8 flags pairs with Jaccard similarity of about 0.75 and above (the probability of
sharing a band is ``1 - (1 - s**rows) ** bands``).

Streaming: a document is a near duplicate when it shares a band with any kept document; only kept
documents are inserted, so the index holds one signature per kept document.
"""

from __future__ import annotations

import hashlib

import numpy as np
from datasketch import MinHash, MinHashLSH

from lmforge.data.cleaning.text import Doc

EXACT = "exact duplicate"
NEAR = "near duplicate"


class ExactDedup:
    """Drop a document whose normalised text was seen before."""

    name = "exact_dedup"

    def __init__(self) -> None:
        self._seen: set[bytes] = set()

    def __call__(self, doc: Doc) -> str | None:
        digest = hashlib.blake2b(doc.key.encode("utf-8", "surrogatepass"), digest_size=16).digest()
        if digest in self._seen:
            return EXACT
        self._seen.add(digest)
        return None


def _identity(value: int) -> int:
    return value


class NearDedup:
    """Drop a document that shares an LSH band with an earlier kept document."""

    name = "near_dedup"

    def __init__(self, ngram: int = 5, bands: int = 14, rows: int = 8, seed: int = 1) -> None:
        self.ngram = ngram
        self.num_perm = bands * rows
        self.seed = seed
        self.lsh = MinHashLSH(num_perm=self.num_perm, params=(bands, rows))
        self._template = MinHash(num_perm=self.num_perm, seed=seed, hashfunc=_identity)
        self._count = 0

    def signature(self, doc: Doc) -> MinHash | None:
        """The document's MinHash, or None when it has no words."""
        view = doc.view
        if not view.words:
            return None
        n = min(self.ngram, len(view.words))  # a text shorter than one shingle is one shingle
        shingles = np.unique(view.ngram_hashes(n) >> np.uint64(32))
        minhash = self._template.copy()
        minhash.update_batch(shingles.tolist())
        return minhash

    def __call__(self, doc: Doc) -> str | None:
        minhash = self.signature(doc)
        if minhash is None:
            return None
        if self.lsh.query(minhash):
            return NEAR
        self.lsh.insert(self._count, minhash, check_duplication=False)
        self._count += 1
        return None
