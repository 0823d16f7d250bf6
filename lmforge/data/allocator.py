"""Keep freed fetch buffers in the process heap, so the next block's GET does not page-fault anew.

A shard block is one ``bytes`` object of up to 64 MiB per GET. glibc's malloc serves such sizes
with a fresh ``mmap`` and returns them to the kernel on free, so every block costs a page fault and
a zeroed page per 4 KiB: 8,192 faults, about 22 ms of CPU for a 32 MiB block on a 2-core VM (seen
here), a quarter of what the whole download costs the client. Raising glibc's mmap threshold above
the block size (and its trim threshold above that) lets freed blocks be reused from the heap,
already mapped. This is the same allocator tuning PyTorch recommends for CPU training.

It is process-wide and set once, by the block store of the first reader of remote data. It is
skipped where the allocator is not glibc's, and where the user has chosen for themselves
(``MALLOC_MMAP_THRESHOLD_`` or ``MALLOC_TRIM_THRESHOLD_`` in the environment). The price: freed
memory stays with the process (up to the trim threshold) instead of going back to the kernel at once.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading

log = logging.getLogger("lmforge.data")

_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
_MIN_THRESHOLD = 32 << 20  # glibc's own dynamic threshold grows up to this: never set it lower
_MAX_THRESHOLD = 256 << 20  # never keep bigger allocations than this out of mmap

_lock = threading.Lock()
_applied = 0  # the mmap threshold this process set (0: none yet)


def reuse_freed_buffers(largest_buffer: int) -> bool:
    """Serve allocations up to ``largest_buffer`` bytes (at least 32 MiB, at most 256 MiB) from the heap
    and keep up to four of them there when freed. Returns whether glibc took the setting (False
    elsewhere)."""
    global _applied
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False
    threshold = min(_MAX_THRESHOLD, max(_MIN_THRESHOLD, int(largest_buffer) + (1 << 16)))  # + a header
    with _lock:
        if threshold <= _applied:
            return True
        libc_name = ctypes.util.find_library("c")
        try:
            libc = ctypes.CDLL(libc_name)
            mallopt = libc.mallopt
            libc.gnu_get_libc_version  # noqa: B018 - only glibc has it (musl's mallopt is a no-op)
        except (OSError, AttributeError, TypeError):
            return False
        mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        if not (mallopt(_M_MMAP_THRESHOLD, threshold) and mallopt(_M_TRIM_THRESHOLD, 4 * threshold)):
            return False
        _applied = threshold
        log.debug("malloc: mmap threshold %d bytes, trim threshold %d bytes", threshold, 4 * threshold)
        return True
