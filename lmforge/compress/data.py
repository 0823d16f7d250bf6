"""Data for a CompressionJob: ``spec.data`` prepared as for training, with the source model's own tokenizer.

Calibration and recovery/distillation batches come from the train split, perplexity from the val
split, both through :class:`~lmforge.data.reader.SampleReader` as in training.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from torch import Tensor

from lmforge.api.common import S3Settings
from lmforge.api.data import Data
from lmforge.data.preparation import PreparedData, prepare_data
from lmforge.data.reader import SampleReader
from lmforge.data.storage import join_uri, storage_for


def prepare_for_compression(
    data: Data,
    output_uri: str,
    *,
    tokenizer_uri: str | None = None,
    vocab_size: int = 8192,
    s3: S3Settings | None = None,
    log: Callable[[str], None] = print,
) -> PreparedData:
    """Prepare a CompressionJob's ``data`` as training does (:func:`~lmforge.data.preparation.prepare_data`).

    The tokenizer is the one at ``tokenizer_uri`` (the source model's), else a new BPE of
    ``vocab_size`` tokens. The shards go to ``data.preparedUri`` or ``OUTPUT/data``; prepared data
    with the same fingerprint is reused, as in training.
    """
    from lmforge.api.training import Output, TrainingJobSpec
    from lmforge.api.training import Tokenizer as TokenizerSpec

    tokenizer = TokenizerSpec(uri=tokenizer_uri) if tokenizer_uri else TokenizerSpec(vocab_size=vocab_size)
    spec = TrainingJobSpec.model_construct(
        data=data, tokenizer=tokenizer, output=Output(uri=output_uri), s3=s3 or S3Settings()
    )
    return prepare_data(spec, log=log)


def reader(prepared_uri: str, split: str, context_length: int, *, s3: Any = None, seed: int = 0) -> SampleReader:
    """Shuffled train reader, or in-order val reader."""
    return SampleReader(
        join_uri(prepared_uri, split),
        storage_for(prepared_uri, s3),
        context_length,
        seed=seed,
        shuffle=split != "val",
    )


def batches(source: SampleReader, count: int, micro_batch: int) -> Iterator[tuple[Tensor, Tensor]]:
    """``count`` batches from ``source`` (continuing where it is)."""
    for _ in range(count):
        yield source.next_batch(micro_batch)
