"""The run's two readers: training batches (this job's data, mixed with data.mix and replay) and held-out ones.

With ``data.mix`` or replay the training reader is a deterministic :class:`~lmforge.data.mixing.MixedReader`
of this job's train split and those sources (each source checked against this job's tokenizer
first, so a mismatch stops the run with the field to fix); its state rides in the checkpoint like
a plain reader's. ``LMFORGE_DATA_WORKERS`` worker processes serve only the plain training split: a
mix reads its sources itself (one vectorized read per source and chunk), so its splits are opened
without workers.
"""

from __future__ import annotations

from typing import Any

from tokenizers import Tokenizer

from lmforge.api.training import TrainingJobSpec
from lmforge.data.mixing import mix_by_fraction
from lmforge.data.other_job_data import open_prepared_split
from lmforge.data.preparation import PreparedData
from lmforge.data.reader import SampleReader
from lmforge.data.reader_protocol import Reader
from lmforge.data.storage import Storage, join_uri, storage_for
from lmforge.data.tokenizer import tokenizer_hash
from lmforge.data.workers import WorkerReader, open_reader
from lmforge.trainer.context import WorldContext
from lmforge.trainer.continual import ContinualRun


def open_readers(
    spec: TrainingJobSpec, prepared: PreparedData, ctx: WorldContext, continual: ContinualRun | None
) -> tuple[Reader, Reader]:
    """``(train, val)`` readers of this rank: train shuffled (and mixed), val in order."""
    storage = storage_for(prepared.prepared_uri, spec.s3)
    extras = mix_sources(spec, prepared.tokenizer, ctx.rank, ctx.world_size)
    extras += continual.replay_sources() if continual is not None else []
    train = _open_split(spec, prepared, storage, ctx, "train", shuffle=True, workers=0 if extras else None)
    val = _open_split(spec, prepared, storage, ctx, "val", shuffle=False, workers=0)
    mixed = mix_by_fraction(
        train, extras, own_name="data.sources", rank=ctx.rank, world_size=ctx.world_size, seed=spec.training.seed
    )
    return mixed, val


def _open_split(
    spec: TrainingJobSpec,
    prepared: PreparedData,
    storage: Storage,
    ctx: WorldContext,
    split: str,
    *,
    shuffle: bool,
    workers: int | None,
) -> SampleReader | WorkerReader:
    return open_reader(
        join_uri(prepared.prepared_uri, split),
        storage,
        spec.model.context_length,
        rank=ctx.rank,
        world_size=ctx.world_size,
        seed=spec.training.seed,
        shuffle=shuffle,
        shuffle_window=spec.data.shuffle_window,
        workers=workers,
    )


def mix_sources(
    spec: TrainingJobSpec, tokenizer: Tokenizer, rank: int, world_size: int
) -> list[tuple[str, SampleReader, float]]:
    """``(field, train reader, fraction)`` of each ``data.mix`` entry, checked against this job's tokenizer."""
    digest = tokenizer_hash(tokenizer) if spec.data.mix else ""
    return [
        (
            f"data.mix[{i}]",
            open_prepared_split(
                f"data.mix[{i}].uri",
                source.uri,
                "train",
                storage_for(source.uri, spec.s3),
                tokenizer_digest=digest,
                context_length=spec.model.context_length,
                rank=rank,
                world_size=world_size,
                seed=spec.training.seed + 1000 + i,  # each source its own epoch order
                shuffle=True,
                shuffle_window=spec.data.shuffle_window,
            ),
            source.fraction,
        )
        for i, source in enumerate(spec.data.mix)
    ]


def mix_counts(reader: Reader) -> dict[str, Any] | None:
    """For a mixed reader, what each source really contributed (``summary.json``'s ``data_mix``); else None."""
    if not hasattr(reader, "counts"):
        return None
    counts = reader.counts()
    return {
        name: {"weight": weight, "samples": drawn, "fraction": fraction}
        for name, weight, drawn, fraction in zip(
            counts["sources"], counts["weights"], counts["global"], counts["fractions"], strict=True
        )
    }
