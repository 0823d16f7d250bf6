"""The local cache of fetched shard blocks: in memory, or a directory; bounded in bytes with LRU eviction.

In memory (``root=None``, the block store's default): an entry is the fetched bytes themselves, read
in place (no copy, no file write, no page faults), so streaming costs what the GET costs; it is always
bounded. In a directory (``LMFORGE_CACHE_DIR``): entries are files named by the caller
(content-addressed: the shard's sha256 plus the byte range), written atomically (temporary file,
then rename), so a crash never leaves a half-written entry and processes may share an unbounded
cache.

With ``limit`` bytes: before an entry is added, the least recently used entries are dropped until
the new one fits. A *pinned* entry (a block the store is copying from, or one prefetched and not
yet consumed) is never evicted; :meth:`room_for` lets the prefetcher wait for room instead of
overshooting, so the cache stays within ``limit`` plus the block(s) the consumer holds while it
reads. Accounting is in memory (files present at start are counted, oldest first): a bounded cache
directory must belong to one process, which is why the block store (:mod:`lmforge.data.blocks`) gives
each rank and data worker its own subdirectory when a limit is set.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np


class BlockCache:
    """Blocks in memory (``root=None``) or files under ``root``, at most ``limit`` bytes (``None``:
    unbounded, directories only) outside pinned entries."""

    def __init__(
        self, root: Path | None, limit: int | None = None, on_evict: Callable[[str], None] | None = None
    ) -> None:
        if limit is not None and limit < 1:
            raise ValueError(f"cache limit must be >= 1 byte, got {limit}")
        if root is None and limit is None:
            raise ValueError("an in-memory block cache needs a limit")
        self.in_memory = root is None
        self.root = Path(root) if root is not None else Path()
        if root is not None:
            self.root.mkdir(parents=True, exist_ok=True)
        self._memory: dict[str, np.ndarray] = {}
        self.limit = limit
        self.on_evict = on_evict
        self._lock = threading.Condition()
        self._entries: OrderedDict[str, int] = OrderedDict()  # name -> size, least recently used first
        self._pins: Counter[str] = Counter()
        self._writing: set[str] = set()
        self._pin_sizes: dict[str, int] = {}  # a block being fetched is pinned before it has an entry
        self.total = 0
        self.peak = 0
        self.evictions = 0
        if limit is not None and root is not None:
            found = [p for p in self.root.iterdir() if p.is_file() and not p.name.startswith(".")]
            for path in sorted(found, key=lambda p: p.stat().st_mtime):
                self._entries[path.name] = path.stat().st_size
                self.total += path.stat().st_size
            self._evict(0)

    def path(self, name: str) -> Path:
        return self.root / name

    def view(self, name: str, size: int) -> np.ndarray | None:
        """The entry's ``size`` bytes as a read-only uint8 array (the stored bytes, or a memory map of the
        file), marked recently used; None when absent."""
        if self.in_memory:
            with self._lock:
                data = self._memory.get(name)
                if data is None or data.shape[0] != size:
                    return None
                self._entries.move_to_end(name)
                return data
        path = self.get(name, size)
        if path is None:
            return None
        return np.memmap(path, dtype=np.uint8, mode="r", shape=(size,)) if size else np.empty(0, np.uint8)

    def contains(self, name: str, size: int) -> bool:
        if self.in_memory:
            with self._lock:
                data = self._memory.get(name)
                return data is not None and data.shape[0] == size
        return self.get(name, size) is not None

    def get(self, name: str, size: int) -> Path | None:
        """The entry's path when present with ``size`` bytes (and mark it recently used), else None
        (a directory cache)."""
        path = self.root / name
        with self._lock:
            if name in self._writing or (self.limit is not None and name not in self._entries):
                return None
            try:
                if path.stat().st_size != size:
                    return None
            except FileNotFoundError:
                self._forget(name)
                return None
            if name in self._entries:
                self._entries.move_to_end(name)
            return path

    def put(self, name: str, data: bytes) -> None:
        """Store ``data`` as ``name`` (evicting least recently used unpinned entries first).

        Two threads putting the same name (the prefetcher and the consumer) write it once: the second
        waits for the first. The bytes are reserved before writing, so concurrent puts cannot overshoot.
        """
        size = len(data)
        if self.in_memory:
            with self._lock:
                if name not in self._memory:
                    self._forget(name)
                    self._evict(size)
                    self._memory[name] = np.frombuffer(data, dtype=np.uint8)
                    self._entries[name] = size
                    self.total += size
                    self.peak = max(self.peak, self.total)
                else:
                    self._entries.move_to_end(name)
                self._lock.notify_all()
            return
        path = self.root / name
        with self._lock:
            self._lock.wait_for(lambda: name not in self._writing)
            if name in self._entries and path.is_file():
                self._entries.move_to_end(name)
                return path
            self._forget(name)
            self._writing.add(name)
            self._evict(size)
            self.total += size
            self.peak = max(self.peak, self.total)
        tmp = self.root / f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        written = False
        try:
            with open(tmp, "wb") as handle:
                handle.write(data)
            os.replace(tmp, path)
            written = True
        finally:
            tmp.unlink(missing_ok=True)
            with self._lock:
                self._writing.discard(name)
                if written:
                    self._entries[name] = size
                else:
                    self.total -= size
                self._lock.notify_all()

    def room_for(self, size: int) -> bool:
        """Whether ``size`` more bytes fit once every unpinned entry is evicted."""
        if self.limit is None:
            return True
        with self._lock:
            pinned = sum(max(self._entries.get(name, 0), self._pin_sizes.get(name, 0)) for name in self._pins)
            return pinned + size <= self.limit

    def wait_for_room(self, size: int, timeout: float) -> bool:
        """Block until :meth:`room_for` ``size`` (or ``timeout`` seconds); returns whether it fits."""
        with self._lock:
            return self._lock.wait_for(lambda: self.room_for(size), timeout=timeout)

    def pin(self, name: str, size: int = 0) -> None:
        """Protect ``name`` (``size`` bytes once present) from eviction until as many :meth:`unpin` calls;
        pinning is a use, so it also marks the entry recently used (a reader that keeps a block open
        reads it without asking the cache again)."""
        with self._lock:
            if name in self._entries:
                self._entries.move_to_end(name)
            self._pins[name] += 1
            self._pin_sizes[name] = max(size, self._pin_sizes.get(name, 0))

    def unpin(self, name: str) -> None:
        with self._lock:
            self._pins[name] -= 1
            if self._pins[name] <= 0:
                del self._pins[name]
                self._pin_sizes.pop(name, None)
            self._lock.notify_all()

    def _forget(self, name: str) -> None:
        size = self._entries.pop(name, None)
        if size is not None:
            self.total -= size

    def _evict(self, incoming: int) -> None:
        """Delete least recently used unpinned entries until ``incoming`` more bytes fit (lock held)."""
        if self.limit is None:
            return
        for name in list(self._entries):
            if self.total + incoming <= self.limit:
                break
            if self._pins.get(name):
                continue
            if self.in_memory:
                self._memory.pop(name, None)
            else:
                (self.root / name).unlink(missing_ok=True)
            self._forget(name)
            self.evictions += 1
            if self.on_evict is not None:
                self.on_evict(name)
