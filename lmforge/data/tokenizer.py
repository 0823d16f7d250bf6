"""Byte-level BPE: train on the data, load an existing ``tokenizer.json``, hash for provenance.

The trained tokenizer is GPT-2 style: text is split with the ByteLevel pre-tokenizer (no prefix
space), every byte has a token (the 256-symbol ByteLevel alphabet), so any string, in any script or
with emoji, encodes and decodes back exactly. Special tokens: ``<|endoftext|>`` (id 0), which ends
every document in the shards, and ``<|pad|>`` (id 1).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import TYPE_CHECKING

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lmforge.data.storage import join_uri

if TYPE_CHECKING:
    from lmforge.data.storage import Storage

EOT = "<|endoftext|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = [EOT, PAD]


def new_bpe() -> Tokenizer:
    """An untrained byte-level BPE with lmforge's pre-tokenizer and decoder."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE on ``texts`` with ``<|endoftext|>`` = 0 and ``<|pad|>`` = 1.

    The vocabulary may end smaller than ``vocab_size`` when the text has too few frequent pairs.
    """
    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"vocab_size {vocab_size} is below {len(SPECIAL_TOKENS) + 256} (256 bytes + special tokens)")
    tok = new_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def ensure_eot(tok: Tokenizer) -> int:
    """The id of ``<|endoftext|>``, added as a special token when a reused tokenizer lacks it."""
    eot = tok.token_to_id(EOT)
    if eot is None:
        tok.add_special_tokens([EOT])
        eot = tok.token_to_id(EOT)
    return int(eot)


def vocab_size_of(tok: Tokenizer) -> int:
    """Embedding rows the model needs: one past the largest id (added tokens included)."""
    return max(tok.get_vocab(with_added_tokens=True).values()) + 1


def tokenizer_hash(tok: Tokenizer) -> str:
    """First 16 hex digits of the sha256 of the tokenizer's canonical JSON (sorted keys, no spaces)."""
    canonical = json.dumps(json.loads(tok.to_str()), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def load_tokenizer(uri: str, storage: Storage) -> Tokenizer:
    """Load a ``tokenizer.json`` given its URI, or the URI of a model directory that holds one."""
    candidates = [uri] if uri.endswith(".json") else [join_uri(uri, "tokenizer.json"), uri]
    for candidate in candidates:
        if storage.exists(candidate):
            text = storage.read_bytes(candidate).decode("utf-8")
            try:
                return Tokenizer.from_str(text)
            except Exception as exc:
                raise ValueError(f"{candidate} is not a valid tokenizer.json: {exc}") from None
    raise FileNotFoundError(
        f"no tokenizer at {uri}: expected a tokenizer.json file or a directory containing tokenizer.json"
    )
