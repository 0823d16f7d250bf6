"""What every batch reader offers its consumers: :class:`Reader`, and :class:`SampleSource` for a mixer's sources.

Readers: :class:`lmforge.data.reader.SampleReader` (one split), :class:`lmforge.data.workers.WorkerReader`
(a SampleReader's batches from DataLoader worker processes) and :class:`lmforge.data.mixing.MixedReader`
(several sources by weight). Their consumers are the training loop and its evaluation
(``next_batch``, ``state_dict``, ``load_state_dict``), the trainer's metrics (``counters``),
continual training's report (``position``, ``num_samples``) and the compression pipeline. A mixer
draws from its sources by position (``samples_at``, ``sample_index``, ``sample``) and moves their
positions itself: a SampleReader or a WorkerReader (which reads those samples in this process).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    import torch

BATCH_DTYPE = np.dtype(np.int32)  # of every batch a reader returns (a mixer's too)


class Reader(Protocol):
    """A deterministic, resumable stream of int32 batches ``(x, y)`` of shape ``[B, context_length]``
    for one rank (``y`` is -100 where the loss ignores the target)."""

    @property
    def num_samples(self) -> int:
        """Samples in one epoch (of every source, for a mix)."""
        ...

    @property
    def epoch(self) -> int: ...

    @property
    def position(self) -> int:
        """The global position: samples consumed by all ranks together since the start (all epochs)."""
        ...

    @property
    def samples_read(self) -> int:
        """Samples this rank was handed so far."""
        ...

    @property
    def wait_seconds(self) -> float:
        """Seconds this process spent in :meth:`next_batch`."""
        ...

    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved state (valid for any world size)."""
        ...

    def counters(self) -> dict[str, float]:
        """Cumulative data counters (``samples_read``, ``bytes_read``, ``wait_seconds``, ``s3_errors``,
        ``s3_retries``, ``prefetch_depth``): what the trainer exports."""
        ...

    def close(self) -> None: ...


class SampleSource(Reader, Protocol):
    """A :class:`Reader` of one split that a mixer draws from by position, in this process."""

    @property
    def context_length(self) -> int: ...

    @property
    def split_uri(self) -> str: ...

    @property
    def bytes_read(self) -> int:
        """Bytes of the samples delivered in this process."""
        ...

    @property
    def position(self) -> int: ...

    @position.setter
    def position(self, value: int) -> None: ...

    def sample_index(self, position: int) -> int:
        """The sample at global ``position`` of this source's own order."""
        ...

    def sample(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Sample ``index`` as int32 arrays ``(x, y)`` of length ``context_length``."""
        ...

    def samples_at(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The samples at global ``positions`` as int32 ``x``, ``y`` of shape ``[len(positions), T]``;
        the source's own position does not move."""
        ...
