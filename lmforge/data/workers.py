"""A SampleReader spread over ``torch.utils.data.DataLoader`` worker processes.

Why: sample assembly (and, for ``s3://``, verification and caching) is CPU work in the training
process; workers move it to other processes. Order and resumption stay exactly those of one
:class:`~lmforge.data.reader.SampleReader`:

- :class:`WorkerBatches` is an ``IterableDataset`` yielding whole batches. Worker ``w`` of ``n``
  makes its own reader with ``worker=w, num_workers=n``, which reads only the rank's batches
  ``w, w + n, ...`` from the start position: the workers' sets of samples are disjoint and
  together are the rank's samples, nothing skipped.
- The DataLoader (``batch_size=None``, in order) takes batches round-robin from workers
  ``0, 1, ..., n-1, 0, ...``: batch ``k`` comes from worker ``k mod n``, i.e. the same sequence
  as without workers.
- :class:`WorkerReader` is a :class:`~lmforge.data.reader_protocol.SampleSource` like the
  ``SampleReader`` it wraps (``next_batch``, ``state_dict``, ``load_state_dict``, ``counters``, ...).
  Its position is the global position of the batches handed out, so a checkpoint saved with workers
  resumes exactly with or without them, and with any world size. ``load_state_dict`` or a new batch
  size restarts the workers at the new position. What a mixer reads by position (``sample``,
  ``sample_index``, ``samples_at``) is read in this process, by the wrapped reader.

Each batch carries the worker's counter deltas (samples, bytes, S3 errors and retries, prefetch
depth), so the counters here cover all workers; ``wait_seconds`` is the time this process waited.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lmforge.data.reader import SampleReader

_SUMMED = ("samples_read", "bytes_read", "s3_errors", "s3_retries")


class WorkerBatches(IterableDataset):
    """Batches of the rank from ``start`` on, each worker taking every ``n``-th (see the module docstring)."""

    def __init__(self, init_args: dict[str, Any], start: int, batch_size: int) -> None:
        self.init_args = init_args
        self.start = start
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict[str, float]]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        reader = SampleReader(**self.init_args, worker=worker, num_workers=workers)
        step = reader.world_size * self.batch_size
        reader.load_state_dict({**reader.state_dict(), "position": self.start + worker * step})
        last = reader.counters()
        try:
            while True:
                x, y = reader.next_batch(self.batch_size)
                now = reader.counters()
                delta = {key: now[key] - last[key] for key in _SUMMED}
                delta["prefetch_depth"] = now["prefetch_depth"]
                last = now
                yield x, y, delta
        finally:
            reader.close()


class WorkerReader:
    """A :class:`~lmforge.data.reader_protocol.SampleSource` over ``num_workers`` DataLoader worker
    processes (module docstring)."""

    def __init__(self, reader: SampleReader, num_workers: int, prefetch_factor: int = 2) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1 for a WorkerReader, got {num_workers}")
        self.reader = reader  # holds the position; never reads itself
        self.num_workers = num_workers
        self.prefetch_factor = prefetch_factor
        self._loader: Iterator[Any] | None = None
        self._batch_size = 0
        self._totals = dict.fromkeys(_SUMMED, 0.0)
        self._depth = 0.0
        self.wait_seconds = 0.0

    @property
    def position(self) -> int:
        return self.reader.position

    @position.setter
    def position(self, value: int) -> None:  # a mixer moves its sources' positions
        self.reader.position = int(value)
        self._stop()

    @property
    def num_samples(self) -> int:
        return self.reader.num_samples

    @property
    def epoch(self) -> int:
        return self.reader.epoch

    @property
    def samples_read(self) -> int:
        return int(self._totals["samples_read"])

    # What a mixer reads by position: the reader's, read in this process.

    @property
    def context_length(self) -> int:
        return self.reader.context_length

    @property
    def split_uri(self) -> str:
        return self.reader.split_uri

    @property
    def bytes_read(self) -> int:
        """Bytes of the samples read in this process (:meth:`sample`, :meth:`samples_at`); the workers'
        are in :meth:`counters`."""
        return self.reader.bytes_read

    def sample_index(self, position: int) -> int:
        return self.reader.sample_index(position)

    def sample(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return self.reader.sample(index)

    def samples_at(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.reader.samples_at(positions)

    def _start(self, batch_size: int) -> None:
        self._stop()
        dataset = WorkerBatches(self.reader.init_args, self.reader.position, batch_size)
        loader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=self.num_workers,
            prefetch_factor=self.prefetch_factor,
            persistent_workers=False,
        )
        self._loader = iter(loader)
        self._batch_size = batch_size

    def _stop(self) -> None:
        loader, self._loader = self._loader, None
        if loader is not None and hasattr(loader, "_shutdown_workers"):
            loader._shutdown_workers()

    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        started = time.perf_counter()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if self.reader.num_samples == 0:
            self.reader.next_batch(batch_size)  # raises its clear "too few tokens" error
        if self._loader is None or batch_size != self._batch_size:
            self._start(batch_size)
        assert self._loader is not None
        x, y, delta = next(self._loader)
        for key in _SUMMED:
            self._totals[key] += delta[key]
        self._depth = delta["prefetch_depth"]
        self.reader.position += self.reader.world_size * batch_size
        self.wait_seconds += time.perf_counter() - started
        return x, y

    def state_dict(self) -> dict[str, Any]:
        return self.reader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reader.load_state_dict(state)
        self._stop()

    def counters(self) -> dict[str, float]:
        return {**self._totals, "wait_seconds": self.wait_seconds, "prefetch_depth": self._depth}

    def close(self) -> None:
        self._stop()
        self.reader.close()


def open_reader(
    split_uri: str, storage: Any, context_length: int, *, workers: int | None = None, **kwargs: Any
) -> SampleReader | WorkerReader:
    """A :class:`SampleReader`, or a :class:`WorkerReader` over it with ``workers`` > 0 processes
    (``None``: ``LMFORGE_DATA_WORKERS``, default 0)."""
    reader = SampleReader(split_uri, storage, context_length, **kwargs)
    count = reader.settings.workers if workers is None else workers
    return WorkerReader(reader, count) if count > 0 else reader
