"""A deterministic, resumable mix of several sample streams by weight (replay in continual training).

Why not sample a source at random per batch: every rank of every world size must agree on which
source each sample comes from without talking to the others, a resumed run must continue exactly,
and small runs should already see the configured fractions (a 5% replay fraction drawn by coin
flips over 200 samples is anywhere between 2% and 9%).

Assignment: global position ``p`` (counting the mixed samples consumed by all ranks together, as
in :mod:`lmforge.data.reader`) goes to source ``k`` where the 64-bit Weyl sequence
``u(p) = (offset(seed) + p * A) mod 2**64`` (``A`` the golden ratio times 2**64) falls in the
``k``-th slice of ``[0, 2**64)`` cut in proportion to the weights. It is a pure integer function of
``(seed, p)``, so any rank and any world size computes the same assignment; being a
low-discrepancy sequence, the count of any source among the first ``N`` positions stays within a
few samples of ``weight x N`` at every ``N`` (not just on average).

Per-source order: the mixed stream keeps one position per source, ``q_k`` = how many of the
positions before ``p`` went to source ``k``. The ``j``-th sample drawn from source ``k`` is that
source reader's sample at its own global position ``j`` (its ``sample_index(j)``), so
each source keeps its own epoch permutation: no repeats within a source's epoch, whatever the mix.

State: ``{"position": p, "source_positions": [q_0, ...], ...}``. ``next_batch(B)`` on every rank
walks the ``world_size x B`` positions of the step (rank ``r`` keeps ``[r*B, (r+1)*B)`` of them)
and advances every ``q_k``, so all ranks hold the same state and a checkpoint resumes exactly, also
with a different world size.

A source is any :class:`~lmforge.data.reader_protocol.SampleSource` (a
:class:`lmforge.data.reader.SampleReader`, or a :class:`lmforge.data.workers.WorkerReader`, which
reads these samples in this process), and only that protocol is used (``samples_at``,
``sample_index``, ``sample``, ``num_samples``, ``position``, ``state_dict``, ``load_state_dict``,
``counters``, ``close``). The mixer is a :class:`~lmforge.data.reader_protocol.Reader` itself.
"""

from __future__ import annotations

import bisect
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lmforge.data.reader_protocol import BATCH_DTYPE, Reader, SampleSource

_MASK = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
"""floor(2**64 / golden ratio), odd: consecutive positions land far apart in [0, 2**64)."""


def _offset(seed: int) -> int:
    """A well-spread starting point of the sequence for ``seed`` (splitmix64 finaliser)."""
    z = (int(seed) * _GOLDEN + 0x632BE59BD9B4E019) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def _thresholds(weights: Sequence[float]) -> list[int]:
    """Upper ends of each source's slice of ``[0, 2**64)`` (the last is ``2**64``)."""
    total = float(sum(weights))
    cuts: list[int] = []
    running = 0.0
    for weight in weights[:-1]:
        running += float(weight)
        cuts.append(min(1 << 64, int(running / total * (1 << 64))))
    return [*cuts, 1 << 64]


@dataclass
class _Chunk:
    """Steps of this rank assembled ahead: rows of ``x``/``y``, and the mix state after each step."""

    start: int  # the mixed position the next step starts at
    batch: int
    steps: int
    step: int  # the next step to hand out
    x: np.ndarray
    y: np.ndarray
    source_positions: np.ndarray  # [steps, sources]: every source's position after each step
    mine: np.ndarray  # [steps, sources]: samples this rank drew from each source in each step


class MixedReader:
    """Batches ``(x, y)`` drawn from several :class:`~lmforge.data.reader_protocol.SampleSource` streams by
    weight (see the module docstring).

    ``readers`` are the sources (their own rank/world settings are not used: the mixer slices the
    step for this ``rank``); ``weights`` are positive and normalised here. ``names`` label the
    sources in :meth:`counts` (default: each reader's ``split_uri``).
    """

    def __init__(
        self,
        readers: Sequence[SampleSource],
        weights: Sequence[float],
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        names: Sequence[str] | None = None,
    ) -> None:
        if not readers:
            raise ValueError("a mix needs at least one source")
        if len(weights) != len(readers):
            raise ValueError(f"{len(readers)} sources but {len(weights)} weights; give one weight per source")
        for i, weight in enumerate(weights):
            if not float(weight) > 0.0:
                raise ValueError(f"weight {i} is {weight}; every source needs a weight > 0 (drop the source instead)")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of size {world_size}")
        for reader in readers:
            if reader.num_samples == 0:
                raise ValueError(
                    f"{getattr(reader, 'split_uri', 'a source')} has too few tokens for one sample of "
                    "context_length + 1 tokens; add data to it or leave it out of the mix"
                )
        lengths = {int(r.context_length) for r in readers}
        if len(lengths) != 1:
            raise ValueError(f"the sources have different context lengths {sorted(lengths)}; mix readers of one length")
        self.readers = list(readers)
        self.weights = [float(w) / float(sum(weights)) for w in weights]
        default_names = [str(getattr(r, "split_uri", i)) for i, r in enumerate(readers)]
        self.names = list(names) if names is not None else default_names
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.seed = int(seed)
        self._offset = _offset(self.seed)
        self._cuts = _thresholds(self.weights)
        self.position = 0
        self.source_positions = [0] * len(self.readers)
        self.samples_read_per_source = [0] * len(self.readers)
        self._wait_seconds = 0.0
        self._chunk: _Chunk | None = None

    # --- assignment and state ----------------------------------------------------------------

    def source_of(self, position: int) -> int:
        """The source that global ``position`` is drawn from (a pure function of seed and position)."""
        u = (self._offset + int(position) * _GOLDEN) & _MASK
        return bisect.bisect_right(self._cuts, u)

    @property
    def num_samples(self) -> int:
        """Samples of all sources together (one epoch of each)."""
        return sum(r.num_samples for r in self.readers)

    @property
    def epoch(self) -> int:
        """Epoch of the first source (the new data, in continual training)."""
        first = self.readers[0]
        return self.source_positions[0] // first.num_samples

    @property
    def samples_read(self) -> int:
        return sum(self.samples_read_per_source)

    @property
    def wait_seconds(self) -> float:
        return self._wait_seconds

    @property
    def bytes_read(self) -> int:
        return sum(int(getattr(r, "bytes_read", 0)) for r in self.readers)

    def counters(self) -> dict[str, float]:
        """Cumulative data counters: the sources' summed (bytes, S3 errors and retries, prefetch depth),
        with this mixer's own ``samples_read`` and ``wait_seconds``."""
        totals = {"samples_read": 0.0, "bytes_read": 0.0, "wait_seconds": 0.0, "s3_errors": 0.0, "s3_retries": 0.0}
        totals["prefetch_depth"] = 0.0
        for source in self.readers:
            for key, value in source.counters().items():
                totals[key] += value
        totals["samples_read"] = float(self.samples_read)
        totals["wait_seconds"] = float(self.wait_seconds)
        return totals

    def counts(self) -> dict[str, Any]:
        """Samples per source: consumed by the whole world (``global``) and read by this rank."""
        total = max(1, self.position)
        return {
            "sources": self.names,
            "weights": self.weights,
            "global": list(self.source_positions),
            "fractions": [q / total for q in self.source_positions],
            "this_rank": list(self.samples_read_per_source),
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "epoch": self.epoch,
            "source_positions": list(self.source_positions),
            "weights": list(self.weights),
            "seed": self.seed,
            "world_size": self.world_size,
            "sources": [
                {**reader.state_dict(), "position": q}
                for reader, q in zip(self.readers, self.source_positions, strict=True)
            ],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved mix (any world size).

        A plain :class:`~lmforge.data.reader.SampleReader` state (the run read only the first source until now)
        continues the first source at its position and starts the others at 0.
        """
        position = int(state["position"])
        if position < 0:
            raise ValueError(f"reader position must be >= 0, got {position}")
        if "source_positions" not in state:
            positions = [position] + [0] * (len(self.readers) - 1)
        else:
            positions = [int(q) for q in state["source_positions"]]
            if len(positions) != len(self.readers):
                raise ValueError(
                    f"the saved data mix has {len(positions)} sources and this run has {len(self.readers)}; "
                    "keep data.mix and data.replay.sources as they were for this run, or start it with a fresh "
                    "output/checkpoint URI"
                )
            saved_weights = [float(w) for w in state.get("weights", self.weights)]
            if any(abs(a - b) > 1e-12 for a, b in zip(saved_weights, self.weights, strict=True)):
                warnings.warn(
                    f"the saved data mix had weights {saved_weights}, this run has {self.weights}; the mix "
                    "continues each source where it stopped with the new weights",
                    stacklevel=2,
                )
        seed = int(state.get("seed", self.seed))
        if seed != self.seed:
            self.seed = seed
            self._offset = _offset(seed)
        for i, (reader, saved) in enumerate(zip(self.readers, state.get("sources") or [], strict=False)):
            reader.load_state_dict({**saved, "position": positions[i]})
        self.position = position
        self._chunk = None
        self.source_positions = positions
        for reader, q in zip(self.readers, positions, strict=True):
            reader.position = q

    # --- reading -----------------------------------------------------------------------------

    def sources_of(self, positions: np.ndarray) -> np.ndarray:
        """:meth:`source_of` for many positions at once (uint64 arithmetic wraps mod 2**64 like the masks)."""
        u = np.uint64(self._offset) + np.asarray(positions, dtype=np.uint64) * np.uint64(_GOLDEN)
        cuts = np.array([min(c, _MASK) for c in self._cuts[:-1]], dtype=np.uint64)
        return np.searchsorted(cuts, u, side="right") if cuts.shape[0] else np.zeros(u.shape[0], dtype=np.int64)

    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's next ``batch_size`` mixed samples as int32 tensors ``x``, ``y`` of shape ``[B, T]``."""
        started = time.perf_counter()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        chunk = self._chunk
        if chunk is None or chunk.start != self.position or chunk.batch != batch_size or chunk.step >= chunk.steps:
            chunk = self._chunk = self._assemble(batch_size)
        step = chunk.step
        rows = slice(step * batch_size, (step + 1) * batch_size)
        x, y = chunk.x[rows], chunk.y[rows]
        self.position += self.world_size * batch_size
        self.source_positions = chunk.source_positions[step].tolist()
        for k, count in enumerate(chunk.mine[step].tolist()):
            self.samples_read_per_source[k] += count
        for reader, q in zip(self.readers, self.source_positions, strict=True):
            reader.position = q
        chunk.step += 1
        chunk.start = self.position
        self._wait_seconds += time.perf_counter() - started
        return torch.from_numpy(x), torch.from_numpy(y)

    def _assemble(self, batch_size: int) -> _Chunk:
        """The next few steps of this rank in one vectorized read per source.

        Reading sample by sample cost ~7x the plain reader; a chunk of up to 4096 of this rank's
        samples (and at most 16 MiB of ``x`` and ``y``) reads each source once.
        """
        context = int(self.readers[0].context_length)
        per_step = self.world_size * batch_size
        rows = max(batch_size, min(4096, (16 << 20) // (16 * context)))
        steps = max(1, rows // batch_size)
        count = len(self.readers)
        sources = self.sources_of(self.position + np.arange(steps * per_step, dtype=np.int64)).astype(np.int64)
        source_positions = np.empty(sources.shape[0], dtype=np.int64)  # each mixed sample's position in its source
        for k in range(count):
            where = np.flatnonzero(sources == k)
            source_positions[where] = self.source_positions[k] + np.arange(where.shape[0], dtype=np.int64)
        chosen = sources[:, None] == np.arange(count)[None, :]  # [samples, sources] one-hot
        totals = chosen.reshape(steps, per_step, count).sum(axis=1)
        after = np.asarray(self.source_positions, dtype=np.int64)[None, :] + np.cumsum(totals, axis=0)
        first = self.rank * batch_size
        mine = (np.arange(steps, dtype=np.int64)[:, None] * per_step + first + np.arange(batch_size)[None, :]).reshape(
            -1
        )
        mine_sources = sources[mine]
        x = np.empty((mine.shape[0], context), dtype=BATCH_DTYPE)
        y = np.empty((mine.shape[0], context), dtype=BATCH_DTYPE)
        for k, reader in enumerate(self.readers):
            rows_of_k = np.flatnonzero(mine_sources == k)
            if rows_of_k.shape[0]:
                x[rows_of_k], y[rows_of_k] = reader.samples_at(source_positions[mine[rows_of_k]])
        mine_counts = chosen[mine].reshape(steps, batch_size, count).sum(axis=1)
        return _Chunk(self.position, batch_size, steps, 0, x, y, after, mine_counts)

    def close(self) -> None:
        for reader in self.readers:
            reader.close()


def mix_by_fraction(
    own: SampleSource,
    extras: Sequence[tuple[str, SampleSource, float]],
    *,
    own_name: str,
    rank: int,
    world_size: int,
    seed: int,
) -> Reader:
    """``own`` alone, or mixed with ``(name, reader, fraction)`` sources; ``own`` gets ``1 - sum(fractions)``."""
    if not extras:
        return own
    rest = 1.0 - sum(fraction for _, _, fraction in extras)
    if not rest > 0.0:
        raise ValueError(f"the mixed-in fractions add up to {1.0 - rest:g}; keep them below 1")
    return MixedReader(
        [own, *(reader for _, reader, _ in extras)],
        [rest, *(fraction for _, _, fraction in extras)],
        rank=rank,
        world_size=world_size,
        seed=seed,
        names=[own_name, *(name for name, _, _ in extras)],
    )
