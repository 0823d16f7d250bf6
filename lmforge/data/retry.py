"""Bounded retries with exponential backoff and full jitter for object-store reads.

Why our own loop and not botocore's: botocore retries the request, but not a body that breaks off
mid-stream or arrives short (a dropped connection after the headers), and it does not tell us how
often it retried. The streaming reader's block store (:mod:`lmforge.data.blocks`) fetches with
botocore's retries off (:meth:`lmforge.data.storage.S3Storage.fetch`) and wraps each fetch in
:func:`call_with_retries`, which counts every failed attempt and every retry in a :class:`RetryStats`.

Retryable: HTTP 5xx and throttling (``SlowDown``, ``Throttling``, ``RequestTimeout``, 429, ...),
connection errors (refused, reset, dropped, timed out), short or broken bodies and content that does
not verify (:class:`ContentMismatch`: a wrong size or sha256). Not retryable: a missing object, denied
access, a bad request: those are raised at once. After ``attempts`` failures a
:class:`StorageUnavailable` (an ``OSError``, so the trainer exits 75 and is restarted) names the URI
and the last error.

Delay before retry ``n`` (1-based): ``uniform(0, min(cap, base * 2**(n-1)))`` ("full jitter").

Environment (:meth:`RetryPolicy.from_env`, read when a reader is created):

=========================  ===========  ==========================================================
variable                   default      meaning
=========================  ===========  ==========================================================
LMFORGE_S3_ATTEMPTS        8            attempts per GET before the run fails (exit 75)
LMFORGE_S3_BACKOFF         0.1          first retry delay bound in seconds (doubles, capped): base
LMFORGE_S3_BACKOFF_CAP     10           largest retry delay bound in seconds: cap
=========================  ===========  ==========================================================
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

T = TypeVar("T")

RETRYABLE_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottled",
    "TooManyRequests",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "InternalError",
    "ServiceUnavailable",
    "BadGateway",
    "GatewayTimeout",
    "429",
}


class ContentMismatch(OSError):
    """A fetched body whose size or checksum does not match what the index promises (retried)."""


class VersionMismatch(Exception):
    """The object is not the version the index recorded (its ETag differs: rewritten, or copied to
    another store); not retried: the caller checks the content itself."""


class StorageUnavailable(OSError):
    """A read that still failed after the bounded retries."""


@dataclass
class RetryPolicy:
    """How often and how patiently to retry (see the module docstring for the defaults)."""

    attempts: int = 8
    base: float = 0.1
    cap: float = 10.0

    @classmethod
    def from_env(cls) -> RetryPolicy:
        def number(name: str, default: float, kind: type) -> float:
            raw = os.environ.get(name)
            if raw is None or raw == "":
                return default
            try:
                value = kind(raw)
            except ValueError:
                raise ValueError(f"{name}={raw!r} is not a number; unset it or give e.g. {name}={default}") from None
            if value < (1 if kind is int else 0):
                raise ValueError(f"{name}={raw!r} must be >= {1 if kind is int else 0}")
            return value

        return cls(
            attempts=int(number("LMFORGE_S3_ATTEMPTS", cls.attempts, int)),
            base=float(number("LMFORGE_S3_BACKOFF", cls.base, float)),
            cap=float(number("LMFORGE_S3_BACKOFF_CAP", cls.cap, float)),
        )

    def delay(self, retry: int, rng: random.Random | None = None) -> float:
        """Seconds to sleep before retry number ``retry`` (1-based): full jitter."""
        ceiling = min(self.cap, self.base * 2 ** (retry - 1))
        return (rng or random).uniform(0.0, ceiling)


@dataclass
class RetryStats:
    """Failed attempts and retries, shared by the fetch threads (thread-safe)."""

    errors: int = 0
    retries: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, errors: int = 0, retries: int = 0) -> None:
        with self._lock:
            self.errors += errors
            self.retries += retries


def is_retryable(exc: BaseException) -> bool:
    """Whether ``exc`` is a transient storage fault worth another attempt."""
    if isinstance(exc, ContentMismatch):
        return True
    if isinstance(exc, (FileNotFoundError, PermissionError, ValueError, VersionMismatch)):
        return False
    try:
        from botocore.exceptions import (
            ClientError,
            HTTPClientError,
            IncompleteReadError,
            ResponseStreamingError,
        )
        from botocore.exceptions import (
            ConnectionError as BotoConnectionError,
        )
    except ImportError:  # pragma: no cover - boto is in the trainer extra
        return isinstance(exc, (ConnectionError, TimeoutError))
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {}) if isinstance(exc.response, dict) else {}
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") if isinstance(exc.response, dict) else 0
        code = str(error.get("Code", ""))
        return code in RETRYABLE_CODES or (code.isdigit() and int(code) >= 500) or int(status or 0) >= 500
    if isinstance(exc, (BotoConnectionError, HTTPClientError, IncompleteReadError, ResponseStreamingError)):
        return True
    try:
        from urllib3.exceptions import HTTPError as Urllib3Error
    except ImportError:  # pragma: no cover
        Urllib3Error = ()  # type: ignore[assignment,misc]  # noqa: N806
    return isinstance(exc, (ConnectionError, TimeoutError, Urllib3Error))


def call_with_retries(
    fn: Callable[[], T],
    uri: str,
    *,
    policy: RetryPolicy,
    stats: RetryStats | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """``fn()``, retried on transient faults; :class:`StorageUnavailable` naming ``uri`` when they persist."""
    for attempt in range(1, policy.attempts + 1):
        try:
            return fn()
        except Exception as exc:
            if not is_retryable(exc):
                raise
            if stats is not None:
                stats.add(errors=1)
            if attempt == policy.attempts:
                raise StorageUnavailable(
                    f"reading {uri} failed {attempt} times in a row (last error: {type(exc).__name__}: {exc}); "
                    "the object store is unreachable or overloaded: check spec.s3.endpoint and the store's health, "
                    "or raise LMFORGE_S3_ATTEMPTS"
                ) from exc
            if stats is not None:
                stats.add(retries=1)
            sleep(policy.delay(attempt))
    raise AssertionError("unreachable")  # pragma: no cover
