"""A deterministic, resumable stream of training samples over a split's token shards.

Samples: the split's token stream (all shards concatenated) is cut into non-overlapping windows of
``context_length + 1`` tokens with stride ``context_length``; sample ``i`` starts at token
``i * context_length``, so there are ``(total_tokens - 1) // context_length`` samples. A sample gives
``x = window[:-1]`` and ``y = window[1:]``, with ``y = -100`` (ignored by the loss) wherever the
target token's mask is 0 (SFT prompts).

Order: epoch ``e`` visits the samples in the order of ``numpy.random.default_rng(seed + e)
.permutation(num_samples)`` (identity with ``shuffle=False``). A *global position* ``p`` counts the
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
into a local cache and memory-mapped from there: a shard file of at most
``LMFORGE_RANGE_THRESHOLD`` bytes (default 64 MiB, i.e. every shard of the default 2**24-token
uint16 or uint32 format) is one block, fetched with one whole-object GET and verified against the
sha256 in ``index.json``; a bigger file is fetched as ranged GETs of ``LMFORGE_RANGE_BYTES``
(default 16 MiB), each verified by its length. Blocks are content-addressed (sha256 + range) in
the cache. A background :class:`~lmforge.data.prefetch.Prefetcher` fetches the blocks the rank's
upcoming positions need before the consumer asks; failed fetches are retried with backoff
(:mod:`lmforge.data.retry`). ``next_batch`` assembles the rank's next batches in one vectorized read
(``StreamSettings.read_ahead_samples``, default 4096 samples, at most 16 MiB of ``x`` and ``y``),
so small batches do not pay numpy's per-call overhead each time.

Environment (read when a reader is created):

=========================  ===========  ==========================================================
variable                   default      meaning
=========================  ===========  ==========================================================
LMFORGE_PREFETCH_DEPTH     8            blocks fetched ahead of the consumer at most (0: no prefetch)
LMFORGE_FETCH_THREADS      4            concurrent GETs of the prefetcher
LMFORGE_CACHE_BYTES        unbounded    cache size limit per reader (``64G``, ``512M``, bytes); with a
                                        limit each split, rank and worker gets its own subdirectory
LMFORGE_CACHE_DIR          system temp  cache root (``<root>/lmforge-shards``)
LMFORGE_RANGE_THRESHOLD    64M          files above this size are fetched in ranges
LMFORGE_RANGE_BYTES        16M          size of one ranged GET
LMFORGE_DATA_WORKERS       0            training data loader worker processes per rank (not for a mix)
LMFORGE_S3_ATTEMPTS        8            attempts per GET before the run fails (exit 75)
LMFORGE_S3_BACKOFF         0.1          first retry delay bound in seconds (doubles, capped)
LMFORGE_S3_BACKOFF_CAP     10           largest retry delay bound in seconds
=========================  ===========  ==========================================================
"""

from __future__ import annotations

import bisect
import hashlib
import os
import re
import threading
import time
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.data.cache import BlockCache
from lmforge.data.prefetch import Prefetcher
from lmforge.data.retry import ContentMismatch, RetryPolicy, RetryStats, StorageUnavailable, call_with_retries
from lmforge.data.shards import ShardError, numpy_dtype, read_index
from lmforge.data.storage import Storage, cache_dir, join_uri, local_path

IGNORE_INDEX = -100
_CHUNK_BYTES = 16 << 20  # bytes of int64 x and y assembled ahead at most
_SIZE = re.compile(r"^\s*(\d+)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)


def parse_bytes(name: str, raw: str) -> int:
    """``"64G"``, ``"512MiB"``, ``"1000"`` -> bytes (binary multiples); a clear error names ``name``."""
    match = _SIZE.match(raw)
    if not match:
        raise ValueError(f"{name}={raw!r} is not a size; use bytes or a suffix, e.g. {name}=64G or {name}=512M")
    unit = (match.group(2) or "b")[0].lower()
    return int(match.group(1)) * 1024 ** "bkmgt".index(unit)


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


def _env_int(name: str, default: int, minimum: int) -> int:
    raw = os.environ.get(name, "")
    if raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer; unset it or give e.g. {name}={default}") from None
    if value < minimum:
        raise ValueError(f"{name}={raw!r} must be >= {minimum}")
    return value


@dataclass
class StreamSettings:
    """Streaming knobs (see the module docstring's table); :meth:`from_env` reads them."""

    prefetch_depth: int = 8
    fetch_threads: int = 4
    cache_bytes: int | None = None
    range_threshold: int = 64 << 20
    range_bytes: int = 16 << 20
    workers: int = 0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    read_ahead_samples: int = 4096  # samples assembled per vectorized read (and at most 16 MiB of x, y)

    @classmethod
    def from_env(cls) -> StreamSettings:
        def size(name: str, default: int | None) -> int | None:
            raw = os.environ.get(name, "")
            if raw == "":
                return default
            value = parse_bytes(name, raw)
            if value < 1:
                raise ValueError(f"{name}={raw!r} must be at least 1 byte")
            return value

        return cls(
            prefetch_depth=_env_int("LMFORGE_PREFETCH_DEPTH", cls.prefetch_depth, 0),
            fetch_threads=_env_int("LMFORGE_FETCH_THREADS", cls.fetch_threads, 1),
            cache_bytes=size("LMFORGE_CACHE_BYTES", None),
            range_threshold=size("LMFORGE_RANGE_THRESHOLD", cls.range_threshold) or cls.range_threshold,
            range_bytes=size("LMFORGE_RANGE_BYTES", cls.range_bytes) or cls.range_bytes,
            workers=_env_int("LMFORGE_DATA_WORKERS", cls.workers, 0),
            retry=RetryPolicy.from_env(),
        )


@dataclass
class _Layout:
    """Where every sample's bytes live: per shard, its token and mask files' first block and block size.

    Plain arrays (no reference to the reader), so the prefetch plan can outlive nothing it should not.
    """

    starts: np.ndarray  # first token of each shard in the stream
    token_block: np.ndarray  # first block id of each shard's token file
    token_block_size: np.ndarray  # bytes per block of that file
    mask_block: np.ndarray  # first block id of each shard's mask file, -1 without a mask
    mask_block_size: np.ndarray
    itemsize: int
    context_length: int
    num_samples: int
    seed: int
    shuffle: bool

    def blocks(self, samples: np.ndarray) -> list[np.ndarray]:
        """Block ids (one array per kind) holding the first and last token of each sample."""
        out = []
        first = samples * self.context_length
        for token in (first, first + self.context_length):
            shard = np.searchsorted(self.starts, token, side="right") - 1
            offset = token - self.starts[shard]
            out.append(self.token_block[shard] + (offset * self.itemsize) // self.token_block_size[shard])
            has_mask = self.mask_block[shard] >= 0
            if has_mask.any():
                mask = self.mask_block[shard] + offset // self.mask_block_size[shard]
                out.append(np.where(has_mask, mask, -1))
        return out


def plan_blocks(
    layout: _Layout, start: int, batch: int, rank: int, world: int, stride: int
) -> Iterator[tuple[int, int]]:
    """``(position, block id)`` in the order the consumer at ``start`` needs them, forever.

    The consumer's ``k``-th next batch covers positions ``start + k*stride*world*batch + rank*batch``
    plus ``[0, batch)``.
    """
    orders: dict[int, np.ndarray] = {}
    step = stride * world * batch
    chunk = max(1, 4096 // batch)
    k = 0
    while True:
        base = start + (k + np.arange(chunk, dtype=np.int64)) * step + rank * batch
        positions = (base[:, None] + np.arange(batch, dtype=np.int64)[None, :]).reshape(-1)
        k += chunk
        epochs, offsets = np.divmod(positions, layout.num_samples)
        samples = offsets.copy()
        if layout.shuffle:
            for epoch in np.unique(epochs):
                order = orders.get(int(epoch))
                if order is None:
                    order = np.random.default_rng(layout.seed + int(epoch)).permutation(layout.num_samples)
                    orders = {e: o for e, o in orders.items() if e > int(epoch) - 2}
                    orders[int(epoch)] = order
                chosen = epochs == epoch
                samples[chosen] = order[offsets[chosen]]
        # Each block once per chunk, at the first position that needs it (so the walk costs per block,
        # not per sample). Every chunk yields at least one entry, even when it needs only blocks seen
        # before: a generator that stayed silent would spin forever on a split of one block.
        blocks = np.stack(layout.blocks(samples), axis=1).reshape(-1)
        owners = np.repeat(positions, blocks.shape[0] // positions.shape[0])
        unique, first = np.unique(blocks, return_index=True)
        keep = unique >= 0
        order = np.argsort(first[keep], kind="stable")
        yield from zip(owners[first[keep][order]].tolist(), unique[keep][order].tolist(), strict=True)


@dataclass
class _File:
    name: str
    uri: str
    sha256: str | None
    size: int
    first_block: int
    block_size: int


class SampleReader:
    """Batches ``(x, y)`` of shape ``[B, context_length]`` for one rank (see the module docstring)."""

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
        self._orders: dict[int, np.ndarray] = {}
        self._order_lock = threading.Lock()
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
            self._token_file.append(self._add_file(shard["name"], shard.get("sha256"), count * self.dtype.itemsize))
            mask = shard.get("mask")
            self._mask_file.append(self._add_file(mask, shard.get("mask_sha256"), count) if mask else None)
        # The same tables as arrays, built once: the vectorized reads index them per sample.
        self._shard_starts = np.array(self._starts, dtype=np.int64)
        self._shard_tokens = np.array([int(s["tokens"]) for s in self.shards], dtype=np.int64)
        self._shard_token_file = np.array(self._token_file, dtype=np.int64)
        self._shard_mask_file = np.array([-1 if m is None else m for m in self._mask_file], dtype=np.int64)
        self._file_first_block = np.array([f.first_block for f in self._files], dtype=np.int64)
        self._file_block_size = np.array([f.block_size for f in self._files], dtype=np.int64)
        self.cache: BlockCache | None = None
        if self.remote:
            root = cache or cache_dir("shards")
            if self.settings.cache_bytes is not None and cache is None:
                split = hashlib.sha256(split_uri.encode()).hexdigest()[:12]
                root = root / f"{split}-rank{self.rank}-worker{self.worker}"
            this = weakref.ref(self)

            def forget(name: str) -> None:
                reader = this()
                if reader is not None:
                    block = reader._block_by_name.get(name)
                    if block is not None:
                        reader._maps.pop(block, None)

            self.cache = BlockCache(root, self.settings.cache_bytes, on_evict=forget)
        self._prefetcher: Prefetcher | None = None
        self._planned: tuple[int, int] | None = None
        # Batches read ahead in one go: ((next position, batch size), next row, x rows, y rows).
        self._chunk: tuple[tuple[int, int], int, np.ndarray, np.ndarray] | None = None

    # --- order and state ----------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        return self.position // self.num_samples if self.num_samples else 0

    def _order(self, epoch: int) -> np.ndarray:
        with self._order_lock:
            order = self._orders.get(epoch)
            if order is None:
                order = np.random.default_rng(self.seed + epoch).permutation(self.num_samples)
                if len(self._orders) >= 2:
                    self._orders.pop(min(self._orders))
                self._orders[epoch] = order
            return order

    def sample_index(self, position: int) -> int:
        """The sample at global ``position``."""
        epoch, offset = divmod(position, self.num_samples)
        return int(self._order(epoch)[offset]) if self.shuffle else offset

    def state_dict(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "epoch": self.epoch,
            "seed": self.seed,
            "world_size": self.world_size,
            "num_samples": self.num_samples,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state["position"]`` (a global position, valid for any world size)."""
        position = int(state["position"])
        if position < 0:
            raise ValueError(f"reader position must be >= 0, got {position}")
        seed = int(state.get("seed", self.seed))
        if seed != self.seed:
            self.seed = seed
            with self._order_lock:
                self._orders.clear()
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

    def _add_file(self, name: str, sha256: str | None, size: int) -> int:
        uri = join_uri(self.split_uri, name)
        whole = size <= self.settings.range_threshold
        # Ranged blocks hold whole tokens (a multiple of 4 bytes), so a block can be viewed as tokens.
        block_size = max(1, size) if whole else max(4, self.settings.range_bytes - self.settings.range_bytes % 4)
        first = len(self._block_file)
        self._files.append(_File(name, uri, sha256, size, first, block_size))
        index = len(self._files) - 1
        self._block_file.extend([index] * max(1, -(-size // block_size)))
        return index

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

    def block_cached(self, block: int) -> bool:
        assert self.cache is not None
        return self.cache.get(self._block_name(block), self._block_range(block)[2]) is not None

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
        whole = length == file.size

        def once() -> bytes:
            data = self.storage.fetch(file.uri) if whole else self.storage.fetch(file.uri, offset, length)
            if len(data) != length:
                raise ContentMismatch(f"{file.uri}: got {len(data)} bytes, expected {length}")
            if whole and file.sha256 is not None and hashlib.sha256(data).hexdigest() != file.sha256:
                raise ContentMismatch(f"{file.uri}: sha256 does not match index.json")
            return data

        try:
            data = call_with_retries(once, file.uri, policy=self.settings.retry, stats=self.retry_stats)
        except FileNotFoundError:
            raise ShardError(
                f"shard {file.name} of {self.split_uri} is missing ({file.uri}); prepare the data again"
            ) from None
        except StorageUnavailable as exc:
            if isinstance(exc.__cause__, ContentMismatch):
                what = (
                    "corrupt: its sha256 does not match index.json"
                    if "sha256" in str(exc.__cause__)
                    else (f"truncated or corrupt ({exc.__cause__})")
                )
                raise ShardError(f"shard {file.name} of {self.split_uri} is {what}; prepare the data again") from None
            raise
        self.cache.put(self._block_name(block), data)
        with self._fetch_lock:
            self.bytes_fetched += length
            self.blocks_fetched += 1

    def _block_view(self, block: int) -> np.ndarray:
        """The block's bytes (uint8 memory map), fetched or waited for if needed."""
        view = self._maps.get(block)
        if view is not None:
            return view
        assert self.cache is not None
        name = self._block_name(block)
        length = self._block_range(block)[2]
        prefetcher = self._prefetcher
        claimed = prefetcher is not None and not prefetcher.take(block)
        try:
            path = self.cache.get(name, length)
            if path is None:
                self.inline_fetches += 1
                self.fetch_block(block)
                path = self.cache.path(name)
        finally:
            if claimed and prefetcher is not None:
                prefetcher.release(block)
        view = np.memmap(path, dtype=np.uint8, mode="r", shape=(length,)) if length else np.empty(0, np.uint8)
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
            self.cache.pin(name, self._block_range(block)[2])  # never evicted while we copy from it
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
        """Tokens ``[start, start + length)`` of the stream (int64) and their mask (or None)."""
        tokens = np.empty(length, dtype=np.int64)
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
        """The samples at global ``positions`` (this reader's epoch order) as int64 ``x``, ``y`` of shape
        ``[len(positions), T]``, in one vectorized read; the reader's own position does not move (a
        :class:`lmforge.data.mixing.MixedReader` keeps the positions)."""
        positions = np.asarray(positions, dtype=np.int64)
        if positions.shape[0] == 0:
            empty = np.empty((0, self.context_length), dtype=np.int64)
            return empty, empty.copy()
        self.bytes_read += positions.shape[0] * self._sample_bytes
        return self._batch(self._sample_indices(positions))

    def sample(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Sample ``index`` as int64 arrays ``(x, y)`` of length ``context_length``."""
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
        epochs, offsets = np.divmod(positions, self.num_samples)
        if not self.shuffle:
            return offsets
        samples = np.empty_like(offsets)
        for epoch in range(int(epochs.min()), int(epochs.max()) + 1):
            chosen = epochs == epoch
            samples[chosen] = self._order(int(epoch))[offsets[chosen]]
        return samples

    def _gather(
        self, files: np.ndarray, offsets: np.ndarray, length: int, dtype: np.dtype
    ) -> tuple[np.ndarray, np.ndarray]:
        """Items ``[offset, offset + length)`` of file ``files[i]`` for every ``i`` at once, as rows of
        ``dtype``; the second array says which rows were gathered (a row that crosses a block is not)."""
        rows = np.zeros((files.shape[0], length), dtype=dtype)
        done = np.zeros(files.shape[0], dtype=bool)
        span = np.arange(length, dtype=np.int64)
        size = dtype.itemsize
        if not self.remote:
            for index in np.unique(files).tolist():
                chosen = files == index
                view = self._file_bytes(index, 0, self._files[index].size).view(dtype)
                rows[chosen] = view[offsets[chosen, None] + span]
                done |= chosen
            return rows, done
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
                rows[chosen] = view[within[chosen, None] + span]
            finally:
                self.cache.unpin(name)
            done |= chosen
        return rows, done

    def _batch(self, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``x``, ``y`` (int64, ``[len(samples), T]``) for sample indices; vectorized per shard and block,
        sample by sample only for the few windows that cross a shard or block boundary."""
        length = self.context_length + 1
        first = samples * self.context_length
        shard = np.searchsorted(self._shard_starts, first, side="right") - 1
        offsets = first - self._shard_starts[shard]
        inside = offsets + length <= self._shard_tokens[shard]
        token_files = self._shard_token_file[shard]
        tokens, done = self._gather(token_files[inside], offsets[inside], length, self.dtype)
        mask_rows = None
        if self.has_mask:
            mask_of = self._shard_mask_file[shard[inside]]
            mask_rows = np.ones((tokens.shape[0], length), dtype=np.uint8)
            with_mask = mask_of >= 0
            mask_offsets = offsets[inside][with_mask]
            gathered, mask_done = self._gather(mask_of[with_mask], mask_offsets, length, np.dtype(np.uint8))
            mask_rows[with_mask] = gathered
            done[with_mask] &= mask_done
        x = np.empty((samples.shape[0], self.context_length), dtype=np.int64)
        y = np.empty((samples.shape[0], self.context_length), dtype=np.int64)
        fast = np.flatnonzero(inside)[done]
        if fast.shape[0] == samples.shape[0]:  # the usual case: every window in one block, no copies
            x[:] = tokens[:, :-1]
            y[:] = tokens[:, 1:]
            if mask_rows is not None:
                y[mask_rows[:, 1:] == 0] = IGNORE_INDEX
            return x, y
        rows = tokens[done]
        x[fast] = rows[:, :-1]
        y[fast] = rows[:, 1:]
        if mask_rows is not None:
            y[fast] = np.where(mask_rows[done][:, 1:] == 0, IGNORE_INDEX, y[fast])
        slow = np.ones(samples.shape[0], dtype=bool)
        slow[fast] = False
        for j in np.flatnonzero(slow).tolist():
            x[j], y[j] = self._sample(int(samples[j]))
        return x, y

    def _layout(self) -> _Layout:
        masks = self._shard_mask_file
        has_mask = masks >= 0
        mask_files = np.where(has_mask, masks, 0)  # any valid index where there is no mask; masked out below
        return _Layout(
            starts=self._shard_starts,
            token_block=self._file_first_block[self._shard_token_file],
            token_block_size=self._file_block_size[self._shard_token_file],
            mask_block=np.where(has_mask, self._file_first_block[mask_files], -1),
            mask_block_size=np.where(has_mask, self._file_block_size[mask_files], 1),
            itemsize=self.dtype.itemsize,
            context_length=self.context_length,
            num_samples=self.num_samples,
            seed=self.seed,
            shuffle=self.shuffle,
        )

    def _prefetch(self, batch_size: int) -> None:
        """Point the prefetcher at the positions from here on (only when the plan changed)."""
        if not self.remote or self.settings.prefetch_depth == 0:
            return
        if self._planned == (self.position, batch_size):
            return
        if self._prefetcher is None:
            self._prefetcher = Prefetcher(
                weakref.proxy(self),  # type: ignore[arg-type]
                depth=self.settings.prefetch_depth,
                threads=self.settings.fetch_threads,
                horizon=min(self.num_samples, 1 << 20),
            )
        plan = plan_blocks(self._layout(), self.position, batch_size, self.rank, self.world_size, self.num_workers)
        self._prefetcher.start(plan, self.position)

    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's next ``batch_size`` samples as LongTensors ``x``, ``y`` of shape ``[B, T]``."""
        started = time.perf_counter()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if self.num_samples == 0:
            raise ValueError(
                f"{self.split_uri} has {self.total_tokens} tokens, too few for one sample of "
                f"context_length + 1 = {self.context_length + 1} tokens; add data (or, for the "
                "validation split, raise data.validationFraction) or lower model.contextLength"
            )
        self._prefetch(batch_size)
        chunk = self._chunk
        if chunk is None or chunk[0] != (self.position, batch_size) or chunk[1] >= chunk[2].shape[0]:
            chunk = self._chunk = self._assemble(batch_size)
        (_, size), row, xs, ys = chunk[0], chunk[1], chunk[2], chunk[3]
        x, y = xs[row : row + batch_size], ys[row : row + batch_size]
        self.position += self.num_workers * self.world_size * batch_size
        self._chunk = ((self.position, size), row + batch_size, xs, ys)
        self._planned = (self.position, batch_size)
        if self._prefetcher is not None:
            self._prefetcher.advance(self.position)
        self.samples_read += batch_size
        self.bytes_read += batch_size * self._sample_bytes
        self.wait_seconds += time.perf_counter() - started
        return torch.from_numpy(x), torch.from_numpy(y)

    def _assemble(self, batch_size: int) -> tuple[tuple[int, int], int, np.ndarray, np.ndarray]:
        """This rank's next few batches in one vectorized read (up to ``_CHUNK_BYTES`` of x and y):
        small batches would otherwise pay the per-call overhead of numpy for every few samples."""
        per_batch = 16 * batch_size * self.context_length
        count = max(1, min(self.settings.read_ahead_samples // batch_size, _CHUNK_BYTES // per_batch))
        step = self.num_workers * self.world_size * batch_size
        firsts = self.position + np.arange(count, dtype=np.int64) * step + self.rank * batch_size
        positions = (firsts[:, None] + np.arange(batch_size, dtype=np.int64)[None, :]).reshape(-1)
        x, y = self._batch(self._sample_indices(positions))
        return (self.position, batch_size), 0, x, y

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
