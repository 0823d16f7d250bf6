"""The bytes of a split's shard files: where each byte lives, fetched, verified and cached in blocks.

A :class:`BlockStore` holds the split's shard and file tables (each shard's first token in the
stream, its token and mask files, each file's blocks) and reads any byte range of a file; the
sample reader (:class:`lmforge.data.reader.SampleReader`) owns one and turns samples into such reads.

Storage: ``file://`` shards are memory-mapped in place. ``s3://`` shards are fetched in *blocks*
into a local cache: a shard file of at most ``LMFORGE_RANGE_THRESHOLD`` bytes (default 64 MiB, i.e.
every shard of the default 2**24-token uint16 or uint32 format) is one block, fetched with one
whole-object GET; a bigger file is fetched as ranged GETs of ``LMFORGE_RANGE_BYTES`` (default 16
MiB; :mod:`lmforge.data.stream_settings`). Every GET names the ETag that ``index.json`` recorded
(``If-Match``), so the store refuses a shard rewritten since; without a recorded ETag (older
indexes) or when the store's differs (data copied to another store), a whole file is checked against
the index's crc32 (sha256 for older indexes), and every read by its length. The cache is in memory by
default (the fetched bytes are read in place), bounded to what the order needs at once
(:meth:`lmforge.data.reader.SampleReader.working_set_bytes`); with ``LMFORGE_CACHE_DIR`` it is files
there, content-addressed (sha256 + range) and memory-mapped.

Prefetch: the store is the :class:`~lmforge.data.prefetch.BlockSource` of the reader's background
:class:`~lmforge.data.prefetch.Prefetcher`, which fetches the blocks the rank's upcoming positions
need (the block of each sample's first token) before the consumer asks; a block the consumer
reaches first it fetches itself (an inline fetch). A window that crosses into the next shard reads
that shard's first bytes, which the fetch thread GETs on its own (a few hundred bytes) right after
the shard before it, and the store keeps the edges of every block it fetched, so a later epoch needs
no such GET. Failed fetches are retried with backoff (:mod:`lmforge.data.retry`). Freed blocks are
reused from the heap (:mod:`lmforge.data.allocator`).

Environment (read when a store is created; the other streaming knobs are
:mod:`lmforge.data.stream_settings`'):

=========================  ===========  ==========================================================
variable                   default      meaning
=========================  ===========  ==========================================================
LMFORGE_CACHE_DIR          (memory)     keep the cache as files in ``<dir>/lmforge-shards`` instead
                                        of in memory (unbounded and shared by the processes of a
                                        machine, e.g. data loader workers, unless limited)
=========================  ===========  ==========================================================
"""

from __future__ import annotations

import hashlib
import os
import threading
import weakref
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.data.allocator import reuse_freed_buffers
from lmforge.data.cache import BlockCache
from lmforge.data.order import SampleOrder
from lmforge.data.prefetch import BlockLayout, Prefetcher
from lmforge.data.retry import (
    ContentMismatch,
    RetryStats,
    StorageUnavailable,
    VersionMismatch,
    call_with_retries,
)
from lmforge.data.safe_paths import check_relative
from lmforge.data.shards import ShardError
from lmforge.data.storage import Storage, cache_dir, join_uri, local_path
from lmforge.data.stream_settings import StreamSettings

_EDGES_BYTES = 64 << 20  # block edges kept for windows across shards (16,000 shards at contextLength 1024)


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


class BlockStore:
    """The shard files of one split (``shards``: the index's non-empty entries) and their bytes (see the
    module docstring); the :class:`~lmforge.data.prefetch.BlockSource` of the reader's prefetcher.

    ``working_samples`` is how many consecutive samples the order draws on at once: a default
    in-memory cache holds them (:meth:`working_set_bytes`). ``rank`` and ``worker`` name a bounded
    cache directory's subdirectory.
    """

    def __init__(
        self,
        split_uri: str,
        storage: Storage,
        shards: list[dict[str, Any]],
        dtype: np.dtype,
        context_length: int,
        settings: StreamSettings,
        *,
        cache: Path | None,
        rank: int,
        worker: int,
        working_samples: int,
    ) -> None:
        self.split_uri = split_uri
        self.storage = storage
        self.shards = shards
        self.dtype = dtype
        self.context_length = context_length
        self.settings = settings
        self.has_mask = any(s.get("mask") for s in shards)
        self.remote = not split_uri.startswith("file://")
        # Counters (cumulative; the reader reports them).
        self.bytes_fetched = 0  # bytes downloaded from the object store
        self.blocks_fetched = 0
        self.inline_fetches = 0  # blocks the consumer had to fetch itself (prefetch misses)
        self.retry_stats = RetryStats()
        self._fetch_lock = threading.Lock()
        # The shard tables: each shard's first token in the stream, its token file and mask file.
        self.starts: list[int] = []
        offset = 0
        for shard in shards:
            self.starts.append(offset)
            offset += int(shard["tokens"])
        self._files: list[_File] = []
        self.token_file: list[int] = []
        self.mask_file: list[int | None] = []
        self._block_file: list[int] = []
        self._maps: dict[int, np.ndarray] = {}
        self._block_by_name: dict[str, int] = {}
        for shard in shards:
            count = int(shard["tokens"])
            size = count * dtype.itemsize
            self.token_file.append(self._add_file(shard["name"], size, shard))
            mask = shard.get("mask")
            self.mask_file.append(self._add_file(mask, count, shard, "mask_") if mask else None)
        # The same tables as arrays, built once: the vectorized reads index them per sample.
        self.shard_starts = np.array(self.starts, dtype=np.int64)
        self.shard_tokens = np.array([int(s["tokens"]) for s in shards], dtype=np.int64)
        self.shard_token_file = np.array(self.token_file, dtype=np.int64)
        self.shard_mask_file = np.array([-1 if m is None else m for m in self.mask_file], dtype=np.int64)
        self._file_first_block = np.array([f.first_block for f in self._files], dtype=np.int64)
        self._file_block_size = np.array([f.block_size for f in self._files], dtype=np.int64)
        self._next_file_head = self._next_file_heads()
        self.cache: BlockCache | None = None
        if self.remote:
            root: Path | None = cache
            limit = settings.cache_bytes
            if root is None and os.environ.get("LMFORGE_CACHE_DIR"):
                root = cache_dir("shards")
                if limit is not None:
                    split = hashlib.sha256(split_uri.encode()).hexdigest()[:12]
                    root = root / f"{split}-rank{rank}-worker{worker}"
            if root is None and limit is None:
                limit = self.working_set_bytes(working_samples)
            this = weakref.ref(self)

            def forget(name: str) -> None:
                store = this()
                if store is not None:
                    block = store._block_by_name.get(name)
                    if block is not None:
                        store._maps.pop(block, None)

            self.cache = BlockCache(root, limit, on_evict=forget)
            reuse_freed_buffers(int(self._file_block_size.max(initial=0)))
        # The first and last bytes of every block fetched so far (edges): a window that crosses from
        # one shard into the next needs a few bytes at the end of one block and the start of the
        # other, when either may be out of the cache (the next shard's turn in the order may be far
        # off); they are read from here instead of with GETs of their own.
        self._edge_bytes = (context_length + 1) * 4  # one window at the widest token (uint32)
        self._edges: dict[int, tuple[bytes, bytes]] = {}  # block: (head, tail)
        # The reader's prefetcher, once it runs: a block it plans is taken from it, not fetched again.
        self.prefetcher: Prefetcher | None = None

    # --- tables ---------------------------------------------------------------------------------

    def _add_file(self, name: str, size: int, shard: dict[str, Any], prefix: str = "") -> int:
        """Register one file of ``shard`` (its checksums are the entry's ``{prefix}sha256`` etc.)."""
        uri = join_uri(self.split_uri, check_relative(name, what=f"shard file in {self.split_uri}/index.json"))
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
        for kind in (self.token_file, self.mask_file):
            files = [f for f in kind if f is not None]
            for here, after in zip(files, files[1:], strict=False):
                file = self._files[here]
                heads[file.first_block + max(1, -(-file.size // file.block_size)) - 1] = self._files[after].first_block
        return heads

    def layout(self, order: SampleOrder, num_samples: int) -> BlockLayout:
        """The blocks of every sample in ``order``, for the prefetch plan."""
        masks = self.shard_mask_file
        has_mask = masks >= 0
        mask_files = np.where(has_mask, masks, 0)  # any valid index where there is no mask; masked out below
        return BlockLayout(
            starts=self.shard_starts,
            token_block=self._file_first_block[self.shard_token_file],
            token_block_size=self._file_block_size[self.shard_token_file],
            mask_block=np.where(has_mask, self._file_first_block[mask_files], -1),
            mask_block_size=np.where(has_mask, self._file_block_size[mask_files], 1),
            itemsize=self.dtype.itemsize,
            context_length=self.context_length,
            num_samples=num_samples,
            order=order,
        )

    def working_set_bytes(self, samples: int) -> int:
        """Bytes of ``samples`` consecutive samples, plus the blocks at either end and those prefetched,
        with a quarter to spare; at most the whole split."""
        files = [f for f in self._files if f.size]
        if not files:
            return 1
        sample_bytes = self.context_length * (self.dtype.itemsize + (1 if self.has_mask else 0))
        spread = samples * sample_bytes
        block = max(min(f.size, f.block_size) for f in files)
        needed = int(1.25 * (spread + (self.settings.prefetch_depth + 4) * block))
        return max(1, min(sum(f.size for f in files), needed))

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

    # --- the prefetcher's BlockSource (s3://) ---------------------------------------------------

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

    # --- GETs (s3://) ---------------------------------------------------------------------------

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

    # --- views and reads --------------------------------------------------------------------------

    def _block_view(self, block: int) -> np.ndarray:
        """The block's bytes (uint8: the fetched bytes, or a memory map of the cached file), fetched or
        waited for if needed."""
        view = self._maps.get(block)
        if view is not None:
            return view
        assert self.cache is not None
        name = self._block_name(block)
        length = self._block_range(block)[2]
        prefetcher = self.prefetcher
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

    def file_bytes(self, index: int, start: int, end: int) -> np.ndarray:
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

    def gather(
        self, files: np.ndarray, offsets: np.ndarray, length: int, dtype: np.dtype, out: np.ndarray
    ) -> np.ndarray:
        """Copy items ``[offset, offset + length)`` of file ``files[i]`` into ``out[i]`` for every ``i``
        at once; returns which rows were gathered (a row that crosses a block is not)."""
        done = np.zeros(files.shape[0], dtype=bool)
        size = dtype.itemsize
        if not self.remote:
            for index in np.unique(files).tolist():
                chosen = files == index
                view = self.file_bytes(index, 0, self._files[index].size).view(dtype)
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

    def close(self) -> None:
        """Drop the memory maps (they are reopened on the next read)."""
        self._maps.clear()
