"""Read training progress from rank 0's Prometheus endpoint.

The operator asks the pod IP of completion index 0 (no DNS needed, works for not-ready pods) on
``spec.metrics.port`` — local rank 0 of node rank 0 — and keeps only the series of rank 0.

The endpoint is served by the trainer image, which is the user's choice, so nothing it sends
is trusted: the body is read in chunks up to :data:`MAX_METRICS_BYTES` within
:data:`SCRAPE_DEADLINE_SECONDS` (a bigger or slower one is "progress unavailable", never read
whole), redirects are not followed, and a value the status cannot hold (an infinite or NaN
loss, a negative step) is reported in ``status.progress.message`` instead of failing the step:
a failing scrape would stop the stall clock from seeing the step advance, and restart a healthy
gang.
"""

from __future__ import annotations

import datetime
import http.client
import math
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from pydantic.alias_generators import to_camel

from lmforge import contract
from lmforge.api.status import CheckpointRef, Progress

MAX_METRICS_BYTES = 1024 * 1024
"""Largest metrics body the operator reads: the trainer's is a few KiB; one pod's endpoint must
not grow the operator (512Mi limit, shared by every job) by its size (a 128 MiB body did by ~900 MiB)."""
SCRAPE_DEADLINE_SECONDS = 5.0
"""Longest a scrape may take in all: it holds one of the operator's worker threads, so a pod that
sends its body a byte at a time does not hold it for longer."""
READ_CHUNK_BYTES = 64 * 1024
MAX_INTEGER = 2**63 - 1
"""Largest step or token count the status holds (an int64 in the CRD)."""

_FIELDS = {
    series: field
    for metric, field in (
        (contract.TRAIN_STEP, "step"),
        (contract.TRAIN_TOTAL_STEPS, "total_steps"),
        (contract.TRAIN_LOSS, "loss"),
        (contract.EVAL_LOSS, "eval_loss"),
        (contract.LEARNING_RATE, "lr"),
        (contract.TOKENS, "tokens"),
        (contract.TOKENS_PER_SECOND, "tokens_per_second"),
        (contract.ETA_SECONDS, "eta_seconds"),
        (contract.CHECKPOINT_LAST_STEP, "checkpoint_step"),
        (contract.CHECKPOINT_LAST_TIME, "checkpoint_time"),
    )
    for series in metric.series
}
"""Sample name (as scraped) -> Progress field."""
_INTEGERS = {"step", "total_steps", "tokens", "checkpoint_step"}
_PROGRESS_FIELDS = ("step", "total_steps", "loss", "eval_loss", "lr", "tokens", "tokens_per_second", "eta_seconds")


@dataclass(frozen=True)
class Scrape:
    """What one scrape read: rank 0's values (non-finite ones included), or why there are none."""

    values: dict[str, float] = field(default_factory=dict)
    unavailable: str | None = None
    """Why the body was not used (over :data:`MAX_METRICS_BYTES`, too slow, not Prometheus text);
    None when it was read (or the endpoint is not up yet, see :func:`scrape`)."""


class BodyTooLarge(Exception):
    """The metrics body is longer than the bound it was read with."""


def parse(text: str) -> dict[str, float]:
    """The rank-0 values of the lmforge series in a Prometheus text exposition (+Inf and NaN kept)."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = _FIELDS.get(sample.name)
            if name is not None and sample.labels.get("rank", "0") == "0":
                values[name] = float(sample.value)
    return values


def read_bounded(response: http.client.HTTPResponse, limit: int, deadline: float) -> bytes:
    """The body, read in chunks; BodyTooLarge past ``limit`` bytes, TimeoutError past ``deadline``
    (time.monotonic()). Never holds more than ``limit`` + one chunk."""
    declared = response.getheader("Content-Length") or ""
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(int(declared))
    chunks: list[bytes] = []
    size = 0
    while True:
        if time.monotonic() > deadline:
            raise TimeoutError(f"not read within {SCRAPE_DEADLINE_SECONDS:g}s")
        chunk = response.read1(min(READ_CHUNK_BYTES, limit + 1 - size))  # what has arrived: no waiting for a full chunk
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(size)


def _mib(size: int) -> str:
    return f"{size / (1024 * 1024):g} MiB"


def scrape(url: str, timeout: float = 2.0) -> Scrape | None:
    """Fetch and parse rank 0's values; None when the endpoint is not there (yet): refused,
    unreachable, or not answering 200 (the trainer serves its metrics once it runs)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        return Scrape(unavailable=f"metrics URL {url!r} is not http://host:port/path")
    deadline = time.monotonic() + SCRAPE_DEADLINE_SECONDS
    connection = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)
    try:
        connection.request("GET", (parts.path or "/") + (f"?{parts.query}" if parts.query else ""))
        response = connection.getresponse()  # redirects are not followed: the endpoint is on the pod
        if response.status != 200:
            return None
        body = read_bounded(response, MAX_METRICS_BYTES, deadline)
    except BodyTooLarge:
        return Scrape(unavailable=f"metrics body over {_mib(MAX_METRICS_BYTES)} (the limit of a scrape)")
    except TimeoutError:
        return Scrape(unavailable=f"metrics body not read within {SCRAPE_DEADLINE_SECONDS:g}s (the limit of a scrape)")
    except (OSError, http.client.HTTPException, ValueError):
        return None
    finally:
        connection.close()
    try:
        return Scrape(values=parse(body.decode("utf-8", "replace")))
    except (ValueError, TypeError, IndexError) as exc:  # prometheus_client's errors on text that is not an exposition
        return Scrape(unavailable=f"metrics body is not Prometheus text ({str(exc)[:200]})")


def _integer(value: float) -> int | None:
    return int(value) if math.isfinite(value) and 0 <= value <= MAX_INTEGER else None


def step_of(values: dict[str, float]) -> int | None:
    """Rank 0's step as the stall clock follows it; None when absent or not a step count."""
    value = values.get("step")
    return None if value is None else _integer(value)


def _describe(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    return "+Inf" if value > 0 else "-Inf"


def to_progress(values: dict[str, float], when: Any) -> Progress:
    """The status block; a value it cannot hold is left out and named in its ``message``."""
    fields: dict[str, Any] = {}
    odd: list[str] = []
    for key in _PROGRESS_FIELDS:
        if key not in values:
            continue
        value = values[key]
        if not math.isfinite(value):
            odd.append(f"{to_camel(key)} is not finite ({_describe(value)})")
        elif key in _INTEGERS:
            count = _integer(value)
            if count is None:
                odd.append(f"{to_camel(key)} {value:g} is not a count")
            else:
                fields[key] = count
        else:
            fields[key] = round(value, 6)
    return Progress(updated_at=when, message="; ".join(odd) or None, **fields)


def loss_not_finite(block: Progress | None) -> bool:
    """Whether ``block`` (as :func:`to_progress` made it) says the training or eval loss is not finite."""
    message = (block.message if block is not None else None) or ""
    return any(f"{to_camel(key)} is not finite" in message for key in ("loss", "eval_loss"))


def to_checkpoint(values: dict[str, float], uri: str) -> CheckpointRef | None:
    step = _integer(values.get("checkpoint_step", 0.0))
    if not step:
        return None
    stamp = values.get("checkpoint_time")
    try:
        when = datetime.datetime.fromtimestamp(stamp, datetime.UTC).replace(microsecond=0) if stamp else None
    except (OverflowError, ValueError, OSError):  # NaN, +Inf or beyond year 9999
        when = None
    return CheckpointRef(step=step, uri=contract.under(uri, contract.checkpoint_tag(step)), time=when)
