"""A deterministic, resumable stream of training samples over a split's token shards.

Samples: the split's token stream (all shards concatenated) is cut into non-overlapping windows of
``context_length + 1`` tokens with stride ``context_length``; sample ``i`` starts at token
``i * context_length``, so there are ``(total_tokens - 1) // context_length`` samples. A sample gives
``x = window[:-1]`` and ``y = window[1:]``, with ``y = -100`` (ignored by the loss) wherever the
target token's mask is 0 (SFT prompts).

Order: epoch ``e`` visits the samples in the order of :class:`lmforge.data.order.SampleOrder`: a
shuffle that streams (shards permuted, then each sample jittered by up to ``shuffle_window``
positions, so the consumer needs a sliding window of shards, not all of them); with
``shuffle_window >= num_samples`` it is ``numpy.random.default_rng(seed + e).permutation(num_samples)``,
and the identity with ``shuffle=False``. A *global position* ``p`` counts the
samples consumed by all ranks together since the start (all epochs); position ``p`` is sample
``order(p // num_samples)[p % num_samples]``. Each ``next_batch(B)`` call on every rank consumes
``world_size * B`` positions: rank ``r`` takes ``[p + r*B, p + (r+1)*B)``, then ``p += world_size*B``.
Every rank advances the same ``p``, so the state is one integer: resuming is exact, and a run may
resume with a different world size (it continues from the same global position, without
repeating or skipping samples).

Data loader workers (``worker``/``num_workers``, used by :mod:`lmforge.data.workers`): worker
``w`` of ``n`` reads only the rank's batches ``w, w + n, w + 2n, ...`` (a batch is the rank's
``B`` positions of one ``world_size * B`` step), so the workers' batches, taken round-robin, are
exactly the batches of one reader without workers.

Bytes: the reader owns a :class:`~lmforge.data.blocks.BlockStore`, which holds the split's shard and
file tables and reads their bytes (``file://`` memory-mapped in place, ``s3://`` fetched in verified
blocks into a bounded cache: :mod:`lmforge.data.blocks`). For ``s3://`` the reader runs a background
:class:`~lmforge.data.prefetch.Prefetcher` over the store, with a plan (:func:`~lmforge.data.prefetch.plan_blocks`)
of the blocks the rank's upcoming positions need, from its position on. ``next_batch`` assembles the
rank's next batches in one vectorized read (``StreamSettings.read_ahead_samples``, default 4096
samples, at most 16 MiB), so small batches do not pay numpy's per-call overhead each time.

Batches are int32 (``x`` and ``y`` are views of one ``[B, T + 1]`` array when the split has no loss
mask): a quarter of the host memory traffic and host-to-device copy of int64; :func:`lmforge.trainer.device.to_device`
moves them and widens them to the int64 that embeddings and the loss take, on the device.

Environment (read when a reader is created): the streaming knobs and their table are
:mod:`lmforge.data.stream_settings` (``LMFORGE_PREFETCH_DEPTH``, ``LMFORGE_FETCH_THREADS``,
``LMFORGE_CACHE_BYTES``, ``LMFORGE_RANGE_THRESHOLD``, ``LMFORGE_RANGE_BYTES``, ``LMFORGE_DATA_WORKERS``),
the retries' :mod:`lmforge.data.retry` (``LMFORGE_S3_ATTEMPTS``, ``LMFORGE_S3_BACKOFF``,
``LMFORGE_S3_BACKOFF_CAP``), the cache directory's :mod:`lmforge.data.blocks` (``LMFORGE_CACHE_DIR``).
"""

from __future__ import annotations

import bisect
import time
import warnings
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.data.blocks import BlockStore
from lmforge.data.cache import BlockCache
from lmforge.data.order import DEFAULT_WINDOW, SampleOrder
from lmforge.data.prefetch import Prefetcher, plan_blocks
from lmforge.data.reader_protocol import BATCH_DTYPE  # BATCH_DTYPE: importable from here, as before
from lmforge.data.shards import numpy_dtype, read_index
from lmforge.data.storage import Storage
from lmforge.data.stream_settings import StreamSettings  # importable from here, as before

IGNORE_INDEX = -100
_CHUNK_BYTES = 16 << 20  # bytes of int32 batches assembled ahead at most


class SampleReader:
    """int32 batches ``(x, y)`` of shape ``[B, context_length]`` for one rank (see the module docstring)."""

    def __init__(
        self,
        split_uri: str,
        storage: Storage,
        context_length: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        cache: Path | None = None,
        settings: StreamSettings | None = None,
        worker: int = 0,
        num_workers: int = 1,
        shuffle_window: int = DEFAULT_WINDOW,
    ) -> None:
        if context_length < 1:
            raise ValueError(f"context_length must be >= 1, got {context_length}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of size {world_size}")
        if num_workers < 1 or not 0 <= worker < num_workers:
            raise ValueError(f"data worker {worker} is not one of {num_workers} workers")
        self.init_args: dict[str, Any] = {
            "split_uri": split_uri,
            "storage": storage,
            "context_length": context_length,
            "rank": rank,
            "world_size": world_size,
            "seed": seed,
            "shuffle": shuffle,
            "cache": cache,
            "settings": settings,
            "shuffle_window": shuffle_window,
        }
        self.split_uri = split_uri
        self.storage = storage
        self.context_length = int(context_length)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.worker = int(worker)
        self.num_workers = int(num_workers)
        self._step = self.num_workers * self.world_size  # positions per sample of this rank's batch
        self.settings = settings or StreamSettings.from_env()
        self.index = read_index(split_uri, storage)
        self.dtype = numpy_dtype(self.index["dtype"])
        self.shards: list[dict[str, Any]] = [s for s in self.index["shards"] if int(s["tokens"]) > 0]
        self.total_tokens = int(self.index["total_tokens"])
        self.num_samples = max(0, (self.total_tokens - 1) // self.context_length)
        self.shuffle_window = int(shuffle_window)
        self.order = self._new_order()
        self.position = 0
        # Counters (cumulative; exported by lmforge.trainer.metrics, summed by mixers; the block
        # store counts what it fetched).
        self.wait_seconds = 0.0
        self.samples_read = 0
        self.bytes_read = 0  # bytes of the samples delivered
        self.block_store = BlockStore(
            split_uri,
            storage,
            self.shards,
            self.dtype,
            self.context_length,
            self.settings,
            cache=cache,
            rank=self.rank,
            worker=self.worker,
            working_samples=self._working_samples(),
        )
        self.has_mask = self.block_store.has_mask
        self.remote = self.block_store.remote
        self._prefetcher: Prefetcher | None = None
        self._planned: int | None = None  # batch size of the prefetch plan running now (None: no plan)
        # Batches read ahead in one go: (next position, batch size, next row, x rows, y rows).
        self._chunk: tuple[int, int, int, np.ndarray, np.ndarray] | None = None

    # --- order and state ----------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        return self.position // self.num_samples if self.num_samples else 0

    def _new_order(self) -> SampleOrder:
        # A span is about one shard's samples, so the order moves through the shards in windows.
        largest = max((int(s["tokens"]) for s in self.shards), default=1)
        return SampleOrder(
            max(1, self.num_samples),
            span=max(1, largest // self.context_length),
            window=self.shuffle_window,
            seed=self.seed,
            shuffle=self.shuffle,
        )

    def sample_index(self, position: int) -> int:
        """The sample at global ``position``."""
        return self.order.sample(position)

    def state_dict(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "epoch": self.epoch,
            "seed": self.seed,
            "world_size": self.world_size,
            "num_samples": self.num_samples,
            "shuffle": self.shuffle,
            "shuffle_window": self.shuffle_window,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state["position"]`` (a global position, valid for any world size)."""
        position = int(state["position"])
        if position < 0:
            raise ValueError(f"reader position must be >= 0, got {position}")
        seed = int(state.get("seed", self.seed))
        if seed != self.seed:
            self.seed = seed
            self.order = self._new_order()
        saved_window = state.get("shuffle_window")
        if saved_window is not None and int(saved_window) != self.shuffle_window:
            warnings.warn(
                f"{self.split_uri}: the saved reader state is for data.shuffleWindow {saved_window}, this run "
                f"has {self.shuffle_window}; the resumed order differs from the original run (set it back to "
                f"{saved_window} to continue the same order)",
                stacklevel=2,
            )
        saved_samples = state.get("num_samples")
        if saved_samples is not None and int(saved_samples) != self.num_samples:
            warnings.warn(
                f"{self.split_uri}: the saved reader state is for {saved_samples} samples, the split has "
                f"{self.num_samples}; the data changed, so the resumed order differs from the original run",
                stacklevel=2,
            )
        self.position = position
        self._planned = None
        self._chunk = None

    def counters(self) -> dict[str, float]:
        """Cumulative data counters: what the trainer exports and a mixer sums over its sources."""
        return {
            "samples_read": self.samples_read,
            "bytes_read": self.bytes_fetched if self.remote else self.bytes_read,
            "wait_seconds": self.wait_seconds,
            "s3_errors": self.block_store.retry_stats.errors,
            "s3_retries": self.block_store.retry_stats.retries,
            "prefetch_depth": self._prefetcher.depth if self._prefetcher is not None else 0,
        }

    # The block store's cache and counters, read where they always were.

    @property
    def cache(self) -> BlockCache | None:
        return self.block_store.cache

    @property
    def bytes_fetched(self) -> int:
        """Bytes downloaded from the object store."""
        return self.block_store.bytes_fetched

    @property
    def blocks_fetched(self) -> int:
        return self.block_store.blocks_fetched

    @property
    def inline_fetches(self) -> int:
        """Blocks the consumer had to fetch itself (prefetch misses)."""
        return self.block_store.inline_fetches

    def working_set_bytes(self) -> int:
        """The default in-memory cache size: what the order needs at once, with a quarter to spare.

        At position ``p`` the consumer draws on the consecutive samples of about ``shuffle_window``
        plus its read-ahead (all ranks' and workers' positions of a chunk), plus the blocks at either
        end and those prefetched; at most the whole split.
        """
        return self.block_store.working_set_bytes(self._working_samples())

    def _working_samples(self) -> int:
        return min(self.num_samples, self.shuffle_window + self._read_ahead_span(64))

    # --- reading ------------------------------------------------------------------------------

    def _read(self, start: int, length: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Tokens ``[start, start + length)`` of the stream (int32) and their mask (or None)."""
        store = self.block_store
        tokens = np.empty(length, dtype=BATCH_DTYPE)
        mask = np.ones(length, dtype=np.uint8) if self.has_mask else None
        i = bisect.bisect_right(store.starts, start) - 1
        done = 0
        size = self.dtype.itemsize
        while done < length:
            begin = start + done - store.starts[i]
            take = min(length - done, int(self.shards[i]["tokens"]) - begin)
            raw = store.file_bytes(store.token_file[i], begin * size, (begin + take) * size)
            tokens[done : done + take] = raw.view(self.dtype)
            mask_file = store.mask_file[i]
            if mask is not None and mask_file is not None:
                mask[done : done + take] = store.file_bytes(mask_file, begin, begin + take)
            done += take
            i += 1
        return tokens, mask

    @property
    def _sample_bytes(self) -> int:
        return (self.context_length + 1) * (self.dtype.itemsize + (1 if self.has_mask else 0))

    def samples_at(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The samples at global ``positions`` (this reader's epoch order) as int32 ``x``, ``y`` of shape
        ``[len(positions), T]``, in one vectorized read; the reader's own position does not move (a
        :class:`lmforge.data.mixing.MixedReader` keeps the positions)."""
        positions = np.asarray(positions, dtype=np.int64)
        if positions.shape[0] == 0:
            empty = np.empty((0, self.context_length), dtype=BATCH_DTYPE)
            return empty, empty.copy()
        self.bytes_read += positions.shape[0] * self._sample_bytes
        return self._batch(self._sample_indices(positions))

    def sample(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Sample ``index`` as int32 arrays ``(x, y)`` of length ``context_length``."""
        self.bytes_read += self._sample_bytes
        return self._sample(index)

    def _sample(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        length = self.context_length
        tokens, mask = self._read(index * length, length + 1)
        x = tokens[:-1]
        y = tokens[1:].copy()
        if mask is not None:
            y[mask[1:] == 0] = IGNORE_INDEX
        return x, y

    def _sample_indices(self, positions: np.ndarray) -> np.ndarray:
        """:meth:`sample_index` of many positions at once."""
        return self.order.samples(positions)

    def _batch(self, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """int32 ``x``, ``y`` (``[len(samples), T]``) for sample indices; vectorized per shard and block,
        sample by sample only for the few windows that cross a shard or block boundary. Without a loss
        mask, ``x`` and ``y`` are views of one ``[len(samples), T + 1]`` array."""
        store = self.block_store
        length = self.context_length + 1
        first = samples * self.context_length
        shard = np.searchsorted(store.shard_starts, first, side="right") - 1
        offsets = first - store.shard_starts[shard]
        inside = offsets + length <= store.shard_tokens[shard]
        everywhere = bool(inside.all())
        rows = np.empty((samples.shape[0], length), dtype=BATCH_DTYPE)
        target = rows if everywhere else np.empty((int(inside.sum()), length), dtype=BATCH_DTYPE)
        done = store.gather(
            store.shard_token_file[shard] if everywhere else store.shard_token_file[shard[inside]],
            offsets if everywhere else offsets[inside],
            length,
            self.dtype,
            target,
        )
        mask_rows = None
        if self.has_mask:
            mask_of = store.shard_mask_file[shard[inside]]
            mask_rows = np.ones((target.shape[0], length), dtype=np.uint8)
            with_mask = mask_of >= 0
            gathered = np.ones((int(with_mask.sum()), length), dtype=np.uint8)
            mask_done = store.gather(
                mask_of[with_mask], offsets[inside][with_mask], length, np.dtype(np.uint8), gathered
            )
            mask_rows[with_mask] = gathered
            done[with_mask] &= mask_done
        if not everywhere:
            rows[np.flatnonzero(inside)] = target
        fast = np.flatnonzero(inside)[done]
        if mask_rows is None and fast.shape[0] == samples.shape[0]:  # the usual case: no copies at all
            return rows[:, :-1], rows[:, 1:]
        x = rows[:, :-1]
        y = rows[:, 1:].copy()
        if mask_rows is not None:
            y[fast] = np.where(mask_rows[done][:, 1:] == 0, IGNORE_INDEX, y[fast])
        slow = np.ones(samples.shape[0], dtype=bool)
        slow[fast] = False
        for j in np.flatnonzero(slow).tolist():
            x[j], y[j] = self._sample(int(samples[j]))
        return x, y

    def _read_ahead_span(self, batch_size: int) -> int:
        """Global positions one vectorized read may cover: its samples are this rank's share of them,
        and all of them must be in the cache at once, so the span is capped at a quarter of the
        shuffle window (at least one step), whatever the world size."""
        step = self._step * batch_size
        return max(step, min(self.settings.read_ahead_samples * self._step, self.shuffle_window // 4))

    def _prefetch_horizon(self) -> int:
        """How many positions ahead the prefetcher may plan: the shuffle window plus one chunk of
        read-ahead, in which the order starts on about ``window / span`` new shards, as many as the
        prefetch depth holds by default. Further ahead (into the next epoch, in a fresh order) it would
        only crowd out of a bounded cache what the consumer still needs."""
        return max(1, self._working_samples())

    def _prefetch(self, batch_size: int) -> None:
        """Point the prefetcher at the positions from here on (only when the plan changed)."""
        if not self.remote or self.settings.prefetch_depth == 0:
            return
        if self._planned == batch_size:  # the running plan walks on from here (it is reset on a jump)
            return
        if self._prefetcher is None:
            self._prefetcher = Prefetcher(
                weakref.proxy(self.block_store),  # type: ignore[arg-type]
                depth=self.settings.prefetch_depth,
                threads=self.settings.fetch_threads,
                horizon=self._prefetch_horizon(),
            )
            self.block_store.prefetcher = self._prefetcher
        layout = self.block_store.layout(self.order, self.num_samples)
        plan = plan_blocks(layout, self.position, batch_size, self.rank, self.world_size, self.num_workers)
        self._prefetcher.start(plan, self.position)
        self._planned = batch_size

    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's next ``batch_size`` samples as int32 tensors ``x``, ``y`` of shape ``[B, T]``
        (:func:`lmforge.trainer.device.to_device` widens them on the device)."""
        started = time.perf_counter()
        chunk = self._chunk
        if chunk is None or chunk[0] != self.position or chunk[1] != batch_size or chunk[2] >= chunk[3].shape[0]:
            if batch_size < 1:
                raise ValueError(f"batch_size must be >= 1, got {batch_size}")
            if self.num_samples == 0:
                raise ValueError(
                    f"{self.split_uri} has {self.total_tokens} tokens, too few for one sample of "
                    f"context_length + 1 = {self.context_length + 1} tokens; add data (or, for the "
                    "validation split, raise data.validationFraction) or lower model.contextLength"
                )
            self._prefetch(batch_size)
            chunk = self._assemble(batch_size)
        _, _, row, xs, ys = chunk
        end = row + batch_size
        self.position += self._step * batch_size
        self._chunk = (self.position, batch_size, end, xs, ys)
        if self._prefetcher is not None:
            self._prefetcher.advance(self.position)
        self.samples_read += batch_size
        self.bytes_read += batch_size * self._sample_bytes
        self.wait_seconds += time.perf_counter() - started
        return torch.from_numpy(xs[row:end]), torch.from_numpy(ys[row:end])

    def _assemble(self, batch_size: int) -> tuple[int, int, int, np.ndarray, np.ndarray]:
        """This rank's next few batches in one vectorized read (up to ``_CHUNK_BYTES``): small batches
        would otherwise pay the per-call overhead of numpy for every few samples."""
        per_batch = (2 if self.has_mask else 1) * BATCH_DTYPE.itemsize * batch_size * (self.context_length + 1)
        step = self._step * batch_size
        count = max(1, min(self.settings.read_ahead_samples // batch_size, _CHUNK_BYTES // per_batch))
        count = max(1, min(count, self._read_ahead_span(batch_size) // step))
        firsts = self.position + np.arange(count, dtype=np.int64) * step + self.rank * batch_size
        positions = (firsts[:, None] + np.arange(batch_size, dtype=np.int64)[None, :]).reshape(-1)
        x, y = self._batch(self._sample_indices(positions))
        return self.position, batch_size, 0, x, y

    def close(self) -> None:
        """Stop prefetching and drop the memory maps (they are reopened on the next read)."""
        if self._prefetcher is not None:
            self._prefetcher.close()
            self._prefetcher = None
            self.block_store.prefetcher = None
            self._planned = None
        self.block_store.close()

    def __del__(self) -> None:
        prefetcher = getattr(self, "_prefetcher", None)
        if prefetcher is not None:
            prefetcher.stop()
