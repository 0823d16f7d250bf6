"""The streaming reader's knobs: :class:`StreamSettings`, read from the environment when a reader is created.

=========================  ===========  ==========================================================
variable                   default      meaning
=========================  ===========  ==========================================================
LMFORGE_PREFETCH_DEPTH     8            blocks fetched ahead of the consumer at most (0: no prefetch)
LMFORGE_FETCH_THREADS      4            concurrent GETs of the prefetcher
LMFORGE_CACHE_BYTES        auto         cache size limit per reader (``64G``, ``512M``, bytes). In
                                        memory: the order's working set (about data.shuffleWindow
                                        samples plus read-ahead and prefetched blocks, x 1.25); in
                                        a directory: unbounded, or with a limit each split, rank
                                        and worker gets its own subdirectory
LMFORGE_RANGE_THRESHOLD    64M          files above this size are fetched in ranges
LMFORGE_RANGE_BYTES        16M          size of one ranged GET
LMFORGE_DATA_WORKERS       0            training data loader worker processes per rank (not for a mix)
=========================  ===========  ==========================================================

:meth:`StreamSettings.from_env` also reads the retry policy of every GET (``LMFORGE_S3_ATTEMPTS``,
``LMFORGE_S3_BACKOFF``, ``LMFORGE_S3_BACKOFF_CAP``: their table is in :mod:`lmforge.data.retry`).
Where the cache lives (``LMFORGE_CACHE_DIR``) is the block store's: :mod:`lmforge.data.blocks`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from lmforge.data.retry import RetryPolicy

_SIZE = re.compile(r"^\s*(\d+)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)


def parse_bytes(name: str, raw: str) -> int:
    """``"64G"``, ``"512MiB"``, ``"1000"`` -> bytes (binary multiples); a clear error names ``name``."""
    match = _SIZE.match(raw)
    if not match:
        raise ValueError(f"{name}={raw!r} is not a size; use bytes or a suffix, e.g. {name}=64G or {name}=512M")
    unit = (match.group(2) or "b")[0].lower()
    return int(match.group(1)) * 1024 ** "bkmgt".index(unit)


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
