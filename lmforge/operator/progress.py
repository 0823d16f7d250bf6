"""Read training progress from rank 0's Prometheus endpoint.

The operator asks the pod IP of completion index 0 (no DNS needed, works for not-ready pods) on
``spec.metrics.port`` — local rank 0 of node rank 0 — and keeps only the series of rank 0.
"""

from __future__ import annotations

import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from lmforge import contract
from lmforge.api.status import CheckpointRef, Progress

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


def parse(text: str) -> dict[str, float]:
    """The rank-0 values of the lmforge series in a Prometheus text exposition."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            field = _FIELDS.get(sample.name)
            if field is None or sample.labels.get("rank", "0") != "0":
                continue
            if sample.value == sample.value:  # skip NaN
                values[field] = sample.value
    return values


def scrape(url: str, timeout: float = 2.0) -> dict[str, float] | None:
    """Fetch and parse; None when the endpoint is not there (yet)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - pod IP URL
            return parse(response.read().decode("utf-8", "replace"))
    except (OSError, ValueError):
        return None


def to_progress(values: dict[str, float], when: Any) -> Progress:
    fields: dict[str, Any] = {}
    for key in ("step", "total_steps", "loss", "eval_loss", "lr", "tokens", "tokens_per_second", "eta_seconds"):
        if key in values:
            value = values[key]
            fields[key] = int(value) if key in _INTEGERS else round(float(value), 6)
    return Progress(updated_at=when, **fields)


def to_checkpoint(values: dict[str, float], uri: str) -> CheckpointRef | None:
    step = values.get("checkpoint_step")
    if step is None or step <= 0:
        return None
    import datetime

    stamp = values.get("checkpoint_time")
    when = datetime.datetime.fromtimestamp(stamp, datetime.UTC).replace(microsecond=0) if stamp else None
    return CheckpointRef(step=int(step), uri=contract.under(uri, contract.checkpoint_tag(int(step))), time=when)
