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

Storage: ``file://`` shards are memory-mapped in place. ``s3://`` shards are fetched in *blocks*
into a local cache: a shard file of at most ``LMFORGE_RANGE_THRESHOLD`` bytes (default 64 MiB, i.e.
every shard of the default 2**24-token uint16 or uint32 format) is one block, fetched with one
whole-object GET; a bigger file is fetched as ranged GETs of ``LMFORGE_RANGE_BYTES`` (default 16
MiB). Every GET names the ETag that ``index.json`` recorded (``If-Match``), so the store refuses a
shard rewritten since; without a recorded ETag (older indexes) or when the store's differs (data
copied to another store), a whole file is checked against the index's crc32 (sha256 for older
indexes), and every read by its length. The cache is in memory by default (the fetched bytes are
read in place), bounded to what the order needs at once (:meth:`SampleReader.working_set_bytes`);
with ``LMFORGE_CACHE_DIR`` it is files there, content-addressed (sha256 + range) and memory-mapped.
A background :class:`~lmforge.data.prefetch.Prefetcher` fetches the blocks the rank's upcoming
positions need (the block of each sample's first token) before the consumer asks; a window that
crosses into the next shard reads that shard's first bytes, which the fetch thread GETs on its own
(a few hundred bytes) right after the shard before it, and the reader keeps the edges of every
block it fetched, so a later epoch needs no such GET. Failed fetches are retried with backoff
(:mod:`lmforge.data.retry`). Freed blocks are reused from the heap (:mod:`lmforge.data.allocator`).
``next_batch`` assembles the rank's next batches in one vectorized read
(``StreamSettings.read_ahead_samples``, default 4096 samples, at most 16 MiB), so small batches do
not pay numpy's per-call overhead each time.

Batches are int32 (``x`` and ``y`` are views of one ``[B, T + 1]`` array when the split has no loss
mask): a quarter of the host memory traffic and host-to-device copy of int64; :func:`lmforge.trainer.device.to_device`
moves them and widens them to the int64 that embeddings and the loss take, on the device.

Environment (read when a reader is created): the streaming knobs and their table are
:mod:`lmforge.data.stream_settings` (``LMFORGE_PREFETCH_DEPTH``, ``LMFORGE_FETCH_THREADS``,
``LMFORGE_CACHE_BYTES``, ``LMFORGE_RANGE_THRESHOLD``, ``LMFORGE_RANGE_BYTES``, ``LMFORGE_DATA_WORKERS``),
the retries' :mod:`lmforge.data.retry` (``LMFORGE_S3_ATTEMPTS``, ``LMFORGE_S3_BACKOFF``,
``LMFORGE_S3_BACKOFF_CAP``); ``LMFORGE_CACHE_DIR`` keeps the cache as files in
``<dir>/lmforge-shards`` instead of in memory (unbounded and shared by the processes of a machine,
e.g. data loader workers, unless limited).
"""

from __future__ import annotations

import bisect
import hashlib
import os
import threading
import time
import warnings
import weakref
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.data.allocator import reuse_freed_buffers
from lmforge.data.cache import BlockCache
from lmforge.data.order import DEFAULT_WINDOW, SampleOrder
from lmforge.data.prefetch import BlockLayout, Prefetcher, plan_blocks
from lmforge.data.retry import (
    ContentMismatch,
    RetryStats,
    StorageUnavailable,
    VersionMismatch,
    call_with_retries,
)
from lmforge.data.shards import ShardError, numpy_dtype, read_index
from lmforge.data.storage import Storage, cache_dir, join_uri, local_path
from lmforge.data.stream_settings import StreamSettings  # importable from here, as before

IGNORE_INDEX = -100
_CHUNK_BYTES = 16 << 20  # bytes of int32 batches assembled ahead at most
BATCH_DTYPE = np.dtype(np.int32)  # of every batch a reader returns (a mixer's too)
_EDGES_BYTES = 64 << 20  # block edges kept for windows across shards (16,000 shards at contextLength 1024)


def reader_counters(reader: Any) -> dict[str, float]:
    """Cumulative data counters of any reader: its ``counters()``, else (a mixer over several readers)
    the sum over its ``readers`` with its own ``samples_read`` and ``wait_seconds``."""
    if hasattr(reader, "counters"):
        return dict(reader.counters())
    totals = {"samples_read": 0.0, "bytes_read": 0.0, "wait_seconds": 0.0, "s3_errors": 0.0, "s3_retries": 0.0}
    totals["prefetch_depth"] = 0.0
    for source in getattr(reader, "readers", []):
        for key, value in reader_counters(source).items():
            totals[key] += value
    totals["samples_read"] = float(getattr(reader, "samples_read", totals["samples_read"]))
    totals["wait_seconds"] = float(getattr(reader, "wait_seconds", totals["wait_seconds"]))
    return totals


@dataclass
class _File:
    name: str
    uri: str
    sha256: str | None
    crc32: int | None
    etag: str | None  # None also once the store showed another ETag (data copied elsewhere)
    size: int
    first_block: int
    block_size: int


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
        self.has_mask = any(s.get("mask") for s in self.shards)
        self.remote = not split_uri.startswith("file://")
        self._starts: list[int] = []
        offset = 0
        for shard in self.shards:
            self._starts.append(offset)
            offset += int(shard["tokens"])
        self.shuffle_window = int(shuffle_window)
        self.order = self._new_order()
        self.position = 0
        # Counters (cumulative; exported by lmforge.trainer.metrics, summed by mixers).
        self.wait_seconds = 0.0
        self.samples_read = 0
        self.bytes_read = 0  # bytes of the samples delivered
        self.bytes_fetched = 0  # bytes downloaded from the object store
        self.blocks_fetched = 0
        self.inline_fetches = 0  # blocks the consumer had to fetch itself (prefetch misses)
        self.retry_stats = RetryStats()
        self._fetch_lock = threading.Lock()
        self._files: list[_File] = []
        self._token_file: list[int] = []
        self._mask_file: list[int | None] = []
        self._block_file: list[int] = []
        self._maps: dict[int, np.ndarray] = {}
        self._block_by_name: dict[str, int] = {}
        for shard in self.shards:
            count = int(shard["tokens"])
            size = count * self.dtype.itemsize
            self._token_file.append(self._add_file(shard["name"], size, shard))
            mask = shard.get("mask")
            self._mask_file.append(self._add_file(mask, count, shard, "mask_") if mask else None)
        # The same tables as arrays, built once: the vectorized reads index them per sample.
        self._shard_starts = np.array(self._starts, dtype=np.int64)
        self._shard_tokens = np.array([int(s["tokens"]) for s in self.shards], dtype=np.int64)
        self._shard_token_file = np.array(self._token_file, dtype=np.int64)
        self._shard_mask_file = np.array([-1 if m is None else m for m in self._mask_file], dtype=np.int64)
        self._file_first_block = np.array([f.first_block for f in self._files], dtype=np.int64)
        self._file_block_size = np.array([f.block_size for f in self._files], dtype=np.int64)
        self._next_file_head = self._next_file_heads()
        self.cache: BlockCache | None = None
        if self.remote:
            root: Path | None = cache
            limit = self.settings.cache_bytes
            if root is None and os.environ.get("LMFORGE_CACHE_DIR"):
                root = cache_dir("shards")
                if limit is not None:
                    split = hashlib.sha256(split_uri.encode()).hexdigest()[:12]
                    root = root / f"{split}-rank{self.rank}-worker{self.worker}"
            if root is None and limit is None:
                limit = self.working_set_bytes()
            this = weakref.ref(self)

            def forget(name: str) -> None:
                reader = this()
                if reader is not None:
                    block = reader._block_by_name.get(name)
                    if block is not None:
                        reader._maps.pop(block, None)

            self.cache = BlockCache(root, limit, on_evict=forget)
            reuse_freed_buffers(int(self._file_block_size.max(initial=0)))
        # The first and last bytes of every block fetched so far (edges): a window that crosses from
        # one shard into the next needs a few bytes at the end of one block and the start of the
        # other, when either may be out of the cache (the next shard's turn in the order may be far
        # off); they are read from here instead of with GETs of their own.
        self._edge_bytes = (self.context_length + 1) * 4  # one window at the widest token (uint32)
        self._edges: dict[int, tuple[bytes, bytes]] = {}  # block: (head, tail)
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
            "s3_errors": self.retry_stats.errors,
            "s3_retries": self.retry_stats.retries,
            "prefetch_depth": self._prefetcher.depth if self._prefetcher is not None else 0,
        }

    # --- blocks (s3://) --------------------------------------------------------------------------

    def _add_file(self, name: str, size: int, shard: dict[str, Any], prefix: str = "") -> int:
        """Register one file of ``shard`` (its checksums are the entry's ``{prefix}sha256`` etc.)."""
        uri = join_uri(self.split_uri, name)
        whole = size <= self.settings.range_threshold
        # Ranged blocks hold whole tokens (a multiple of 4 bytes), so a block can be viewed as tokens.
        block_size = max(1, size) if whole else max(4, self.settings.range_bytes - self.settings.range_bytes % 4)
        first = len(self._block_file)
        checks = (shard.get(f"{prefix}sha256"), shard.get(f"{prefix}crc32"), shard.get(f"{prefix}etag"))
        self._files.append(_File(name, uri, *checks, size, first, block_size))
        index = len(self._files) - 1
        self._block_file.extend([index] * max(1, -(-size // block_size)))
        return index

    def _next_file_heads(self) -> dict[int, int]:
        """The last block of each file: the first block of the next shard's file of the same kind, which
        a window running past that block's end reads next (a file's other blocks are followed by its
        own next block, which the prefetch plan fetches anyway)."""
        heads: dict[int, int] = {}
        for kind in (self._token_file, self._mask_file):
            files = [f for f in kind if f is not None]
            for here, after in zip(files, files[1:], strict=False):
                file = self._files[here]
                heads[file.first_block + max(1, -(-file.size // file.block_size)) - 1] = self._files[after].first_block
        return heads

    def _block_range(self, block: int) -> tuple[_File, int, int]:
        file = self._files[self._block_file[block]]
        offset = (block - file.first_block) * file.block_size
        return file, offset, min(file.block_size, file.size - offset)

    def _block_name(self, block: int) -> str:
        file, offset, length = self._block_range(block)
        key = file.sha256 or hashlib.sha256(file.uri.encode()).hexdigest()
        name = f"{key}-{file.name}" if length == file.size else f"{key}-{file.name}.{offset}-{length}"
        self._block_by_name.setdefault(name, block)
        return name

    def working_set_bytes(self) -> int:
        """The default in-memory cache size: what the order needs at once, with a quarter to spare.

        At position ``p`` the consumer draws on the consecutive samples of about ``shuffle_window``
        plus its read-ahead (all ranks' and workers' positions of a chunk), plus the blocks at either
        end and those prefetched; at most the whole split.
        """
        files = [f for f in self._files if f.size]
        if not files:
            return 1
        sample_bytes = self.context_length * (self.dtype.itemsize + (1 if self.has_mask else 0))
        spread = min(self.num_samples, self.shuffle_window + self._read_ahead_span(64)) * sample_bytes
        block = max(min(f.size, f.block_size) for f in files)
        needed = int(1.25 * (spread + (self.settings.prefetch_depth + 4) * block))
        return max(1, min(sum(f.size for f in files), needed))

    def block_cached(self, block: int) -> bool:
        assert self.cache is not None
        return self.cache.contains(self._block_name(block), self._block_range(block)[2])

    def wait_block_room(self, block: int, timeout: float) -> bool:
        assert self.cache is not None
        return self.cache.wait_for_room(self._block_range(block)[2], timeout)

    def pin_block(self, block: int) -> None:
        assert self.cache is not None
        self.cache.pin(self._block_name(block), self._block_range(block)[2])

    def unpin_block(self, block: int) -> None:
        assert self.cache is not None
        self.cache.unpin(self._block_name(block))

    def cache_evictions(self) -> int:
        assert self.cache is not None
        return self.cache.evictions

    def fetch_block(self, block: int) -> None:
        """GET one block (retried, verified) into the cache; a persistent mismatch is a ShardError."""
        assert self.cache is not None
        file, offset, length = self._block_range(block)
        data = self._get(file, offset, length)
        self.cache.put(self._block_name(block), data)
        with self._fetch_lock:
            self.bytes_fetched += length
            self.blocks_fetched += 1
        self._remember_edges(block, data, whole=True)
        after = self._next_file_head.get(block)
        if after is None or after in self._edges:
            return  # not a file's end, or the next file's head is known already
        if self.cache.contains(self._block_name(after), self._block_range(after)[2]):
            return
        # The window at this file's end runs into the next shard's file, whose own turn in the order
        # may be far off: fetch its head now, in this background thread, so the consumer does not
        # wait for a GET when it gets there. Best effort: should it fail, the consumer reads those
        # bytes itself (and reports what fails).
        file, offset, length = self._block_range(after)
        take = min(length, self._edge_bytes)
        try:
            head = self._get_counted(file, offset, take)
        except (ShardError, StorageUnavailable):
            return
        self._remember_edges(after, head, whole=take == length)

    def _get_counted(self, file: _File, offset: int, length: int) -> bytes:
        """:meth:`_get` of a few bytes outside any block (not cached), counted as fetched."""
        data = self._get(file, offset, length)
        with self._fetch_lock:
            self.bytes_fetched += length
        return data

    def _from_edges(self, block: int, begin: int, take: int, size: int) -> np.ndarray | None:
        """Bytes ``[begin, begin + take)`` of a block of ``size`` bytes from its kept edges, if there."""
        head, tail = self._edges.get(block, (b"", b""))
        if begin + take <= len(head):
            return np.frombuffer(head, np.uint8, take, begin)
        if tail and begin >= size - len(tail):
            return np.frombuffer(tail, np.uint8, take, begin - (size - len(tail)))
        return None

    def _remember_edges(self, block: int, data: bytes, *, whole: bool) -> None:
        """Keep the block's edges (``data`` is the whole block, or with ``whole=False`` its head only)."""
        edge = self._edge_bytes
        with self._fetch_lock:
            known = self._edges.get(block)
            if known is not None and (known[1] or not whole):
                return
            if known is None and 2 * edge * len(self._edges) >= _EDGES_BYTES:
                del self._edges[next(iter(self._edges))]  # the oldest
            self._edges[block] = (bytes(data[:edge]), bytes(data[-edge:]) if whole else b"")

    def _get(self, file: _File, offset: int, length: int) -> bytes:
        """Bytes ``[offset, offset + length)`` of ``file`` from the store, retried and verified.

        The store checks the object's ETag against the index's (If-Match) when the index has one; a
        whole file fetched without that check is checked against the index's crc32 (its sha256 for
        indexes without one); every read is checked by its length."""
        whole = length == file.size

        def once() -> bytes:
            etag = file.etag
            try:
                data = self.storage.fetch(file.uri, offset, None if whole else length, if_match=etag)
            except VersionMismatch:  # rewritten, or copied to another store: check the content instead
                file.etag = etag = None
                data = self.storage.fetch(file.uri, offset, None if whole else length)
            if len(data) != length:
                raise ContentMismatch(f"{file.uri}: got {len(data)} bytes, expected {length}")
            if etag is not None:
                return data
            if whole and file.crc32 is not None:
                if zlib.crc32(data) != file.crc32:
                    raise ContentMismatch(f"{file.uri}: checksum (crc32) does not match index.json")
            elif whole and file.sha256 is not None and hashlib.sha256(data).hexdigest() != file.sha256:
                raise ContentMismatch(f"{file.uri}: checksum (sha256) does not match index.json")
            return data

        try:
            return call_with_retries(once, file.uri, policy=self.settings.retry, stats=self.retry_stats)
        except FileNotFoundError:
            raise ShardError(
                f"shard {file.name} of {self.split_uri} is missing ({file.uri}); prepare the data again"
            ) from None
        except StorageUnavailable as exc:
            if isinstance(exc.__cause__, ContentMismatch):
                what = (
                    "corrupt: its checksum does not match index.json"
                    if "checksum" in str(exc.__cause__)
                    else (f"truncated or corrupt ({exc.__cause__})")
                )
                raise ShardError(f"shard {file.name} of {self.split_uri} is {what}; prepare the data again") from None
            raise

    def _block_view(self, block: int) -> np.ndarray:
        """The block's bytes (uint8: the fetched bytes, or a memory map of the cached file), fetched or
        waited for if needed."""
        view = self._maps.get(block)
        if view is not None:
            return view
        assert self.cache is not None
        name = self._block_name(block)
        length = self._block_range(block)[2]
        prefetcher = self._prefetcher
        claimed = prefetcher is not None and not prefetcher.take(block)
        try:
            view = self.cache.view(name, length)
            if view is None:
                self.inline_fetches += 1
                self.fetch_block(block)
                view = self.cache.view(name, length)
                if view is None:  # evicted at once: the cache is smaller than one block plus pins
                    raise ShardError(
                        f"LMFORGE_CACHE_BYTES={self.cache.limit} cannot hold block {name} ({length} bytes) of "
                        f"{self.split_uri} next to the blocks in use; raise it to at least {4 * length}"
                    )
        finally:
            if claimed and prefetcher is not None:
                prefetcher.release(block)
        self._maps[block] = view
        return view

    def _file_bytes(self, index: int, start: int, end: int) -> np.ndarray:
        """Bytes ``[start, end)`` of file ``index`` (a copy for s3://, a view for file://)."""
        file = self._files[index]
        if not self.remote:
            view = self._maps.get(-1 - index)
            if view is None:
                view = self._local_map(file)
                self._maps[-1 - index] = view
            return view[start:end]
        assert self.cache is not None
        out = np.empty(end - start, dtype=np.uint8)
        done = start
        while done < end:
            block = file.first_block + done // file.block_size
            begin = done - (block - file.first_block) * file.block_size
            name = self._block_name(block)
            size = self._block_range(block)[2]
            take = min(end - done, size - begin)
            if take * 8 <= size and block not in self._maps and not self.cache.contains(name, size):
                # The tail of a window that crosses into a block not in the cache (the next shard,
                # whose own turn in the order may be far off): from the block's head if it was
                # fetched before, else just these bytes with a GET of their own (not cached).
                known = self._from_edges(block, begin, take, size)
                if known is not None:
                    out[done - start : done - start + take] = known
                    done += take
                    continue
                out[done - start : done - start + take] = np.frombuffer(self._get_counted(file, done, take), np.uint8)
                done += take
                continue
            self.cache.pin(name, size)  # never evicted while we copy from it
            try:
                view = self._block_view(block)
                take = min(end - done, view.shape[0] - begin)
                out[done - start : done - start + take] = view[begin : begin + take]
            finally:
                self.cache.unpin(name)
            done += take
        return out

    def _local_map(self, file: _File) -> np.ndarray:
        path = local_path(file.uri)
        if not path.is_file():
            raise ShardError(f"shard {file.name} of {self.split_uri} is missing ({path}); prepare the data again")
        size = path.stat().st_size
        if size != file.size:
            raise ShardError(
                f"shard {file.name} of {self.split_uri} has {size} bytes, the index expects {file.size}; "
                "it is truncated or corrupt: prepare the data again"
            )
        return np.memmap(path, dtype=np.uint8, mode="r", shape=(size,)) if size else np.empty(0, np.uint8)

    # --- reading ------------------------------------------------------------------------------

    def _read(self, start: int, length: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Tokens ``[start, start + length)`` of the stream (int32) and their mask (or None)."""
        tokens = np.empty(length, dtype=BATCH_DTYPE)
        mask = np.ones(length, dtype=np.uint8) if self.has_mask else None
        i = bisect.bisect_right(self._starts, start) - 1
        done = 0
        size = self.dtype.itemsize
        while done < length:
            begin = start + done - self._starts[i]
            take = min(length - done, int(self.shards[i]["tokens"]) - begin)
            raw = self._file_bytes(self._token_file[i], begin * size, (begin + take) * size)
            tokens[done : done + take] = raw.view(self.dtype)
            mask_file = self._mask_file[i]
            if mask is not None and mask_file is not None:
                mask[done : done + take] = self._file_bytes(mask_file, begin, begin + take)
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

    def _rows(self, view: np.ndarray, starts: np.ndarray, length: int) -> np.ndarray:
        """Items ``[start, start + length)`` of ``view`` for every start, as a ``[len(starts), length]`` copy.

        Samples start ``context_length`` items apart in the stream, so the starts within one file or
        block differ by multiples of it: the rows are rows of one strided view, and numpy copies them
        whole (an index matrix of every item would cost more than the copy itself).
        """
        stride = self.context_length
        base = int(starts[0]) % stride
        count = max(0, (view.shape[0] - base - length) // stride + 1)
        step = view.strides[0]
        windows = np.lib.stride_tricks.as_strided(
            view[base:], shape=(count, length), strides=(stride * step, step), writeable=False
        )
        return windows[(starts - base) // stride]

    def _gather(
        self, files: np.ndarray, offsets: np.ndarray, length: int, dtype: np.dtype, out: np.ndarray
    ) -> np.ndarray:
        """Copy items ``[offset, offset + length)`` of file ``files[i]`` into ``out[i]`` for every ``i``
        at once; returns which rows were gathered (a row that crosses a block is not)."""
        done = np.zeros(files.shape[0], dtype=bool)
        size = dtype.itemsize
        if not self.remote:
            for index in np.unique(files).tolist():
                chosen = files == index
                view = self._file_bytes(index, 0, self._files[index].size).view(dtype)
                out[chosen] = self._rows(view, offsets[chosen], length)
                done |= chosen
            return done
        per_block = self._file_block_size[files] // size
        blocks = self._file_first_block[files] + offsets // per_block
        within = offsets % per_block
        assert self.cache is not None
        for block in np.unique(blocks).tolist():
            chosen = blocks == block
            name = self._block_name(block)
            self.cache.pin(name, self._block_range(block)[2])  # never evicted while we copy from it
            try:
                view = self._block_view(block).view(dtype)
                chosen &= within + length <= view.shape[0]
                if chosen.any():
                    out[chosen] = self._rows(view, within[chosen], length)
            finally:
                self.cache.unpin(name)
            done |= chosen
        return done

    def _batch(self, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """int32 ``x``, ``y`` (``[len(samples), T]``) for sample indices; vectorized per shard and block,
        sample by sample only for the few windows that cross a shard or block boundary. Without a loss
        mask, ``x`` and ``y`` are views of one ``[len(samples), T + 1]`` array."""
        length = self.context_length + 1
        first = samples * self.context_length
        shard = np.searchsorted(self._shard_starts, first, side="right") - 1
        offsets = first - self._shard_starts[shard]
        inside = offsets + length <= self._shard_tokens[shard]
        everywhere = bool(inside.all())
        rows = np.empty((samples.shape[0], length), dtype=BATCH_DTYPE)
        target = rows if everywhere else np.empty((int(inside.sum()), length), dtype=BATCH_DTYPE)
        done = self._gather(
            self._shard_token_file[shard] if everywhere else self._shard_token_file[shard[inside]],
            offsets if everywhere else offsets[inside],
            length,
            self.dtype,
            target,
        )
        mask_rows = None
        if self.has_mask:
            mask_of = self._shard_mask_file[shard[inside]]
            mask_rows = np.ones((target.shape[0], length), dtype=np.uint8)
            with_mask = mask_of >= 0
            gathered = np.ones((int(with_mask.sum()), length), dtype=np.uint8)
            mask_done = self._gather(
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

    def _layout(self) -> BlockLayout:
        masks = self._shard_mask_file
        has_mask = masks >= 0
        mask_files = np.where(has_mask, masks, 0)  # any valid index where there is no mask; masked out below
        return BlockLayout(
            starts=self._shard_starts,
            token_block=self._file_first_block[self._shard_token_file],
            token_block_size=self._file_block_size[self._shard_token_file],
            mask_block=np.where(has_mask, self._file_first_block[mask_files], -1),
            mask_block_size=np.where(has_mask, self._file_block_size[mask_files], 1),
            itemsize=self.dtype.itemsize,
            context_length=self.context_length,
            num_samples=self.num_samples,
            order=self.order,
        )

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
        return max(1, min(self.num_samples, self.shuffle_window + self._read_ahead_span(64)))

    def _prefetch(self, batch_size: int) -> None:
        """Point the prefetcher at the positions from here on (only when the plan changed)."""
        if not self.remote or self.settings.prefetch_depth == 0:
            return
        if self._planned == batch_size:  # the running plan walks on from here (it is reset on a jump)
            return
        if self._prefetcher is None:
            self._prefetcher = Prefetcher(
                weakref.proxy(self),  # type: ignore[arg-type]
                depth=self.settings.prefetch_depth,
                threads=self.settings.fetch_threads,
                horizon=self._prefetch_horizon(),
            )
        plan = plan_blocks(self._layout(), self.position, batch_size, self.rank, self.world_size, self.num_workers)
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
            self._planned = None
        self._maps.clear()

    def __del__(self) -> None:
        prefetcher = getattr(self, "_prefetcher", None)
        if prefetcher is not None:
            prefetcher.stop()
