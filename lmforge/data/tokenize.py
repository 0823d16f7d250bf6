"""Tokenizing, the last part of preparation (:mod:`lmforge.data.preparation`): the tokenizer and the shards.

The tokenizer is the one at ``tokenizer.uri`` when set, else a byte-level BPE trained on the
training split (:mod:`lmforge.data.tokenizer`). Each split's records are encoded in batches of
``ENCODE_BATCH`` and written as token shards (:mod:`lmforge.data.shards`); every document ends
with ``<|endoftext|>``. For ``sft`` the tokens are ``tok(prompt) + tok(response) + <|endoftext|>``
with loss mask 0 on the prompt and 1 on the response and the end-of-text token.

The records come from a spool, one per split: one JSON value per line (:func:`spool_line`), the
text, or ``[prompt, response]`` for sft, written by preparation once the documents are split.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenizers import Tokenizer

from lmforge.data.shards import ShardWriter
from lmforge.data.storage import Storage
from lmforge.data.tokenizer import load_tokenizer, train_bpe

if TYPE_CHECKING:
    from lmforge.api.training import TrainingJobSpec

ENCODE_BATCH = 1024


def spool_line(record: Any) -> str:
    """One spooled record: the text, or ``[prompt, response]``, as a line of JSON."""
    return json.dumps(record, ensure_ascii=False) + "\n"


def read_spool(path: Path) -> Iterator[Any]:
    """The records of a spool, in order."""
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            yield json.loads(line)


def _batches(path: Path, size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for record in read_spool(path):
        batch.append(record)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def write_split(spool: Path, writer: ShardWriter, tok: Tokenizer, eot: int, *, sft: bool) -> int:
    """Encode one split's spooled records into ``writer`` and close it; the split's token count."""
    for batch in _batches(spool, ENCODE_BATCH):
        if sft:
            prompts = tok.encode_batch([r[0] for r in batch], add_special_tokens=False)
            responses = tok.encode_batch([r[1] for r in batch], add_special_tokens=False)
            for prompt, response in zip(prompts, responses, strict=True):
                ids = prompt.ids + response.ids + [eot]
                writer.add(ids, [0] * len(prompt.ids) + [1] * (len(response.ids) + 1))
        else:
            for encoding in tok.encode_batch(batch, add_special_tokens=False):
                writer.add(encoding.ids + [eot])
    return int(writer.close()["total_tokens"])


def tokenizer_for(
    spec: TrainingJobSpec, storages: Callable[[str], Storage], train_spool: Path, log: Callable[[str], None]
) -> Tokenizer:
    """The tokenizer at ``tokenizer.uri``, or a byte-level BPE trained on the spooled training split."""
    settings = spec.tokenizer
    if settings.uri:
        tok = load_tokenizer(settings.uri, storages(settings.uri))
        log(f"data: using the tokenizer at {settings.uri}")
        return tok

    def texts() -> Iterator[str]:
        for record in read_spool(train_spool):
            if isinstance(record, list):
                yield from record
            else:
                yield record

    tok = train_bpe(texts(), settings.vocab_size, settings.min_frequency)
    log(f"data: trained a byte-level BPE with {tok.get_vocab_size()} tokens (asked for {settings.vocab_size})")
    return tok
