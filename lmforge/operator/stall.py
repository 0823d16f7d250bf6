"""Progress and stalls of a running attempt: rank 0's metrics into the status, and the stall clock.

Every ``progress_interval`` the step scrapes rank 0 (:mod:`lmforge.operator.progress`) into
``status.progress`` and ``status.lastCheckpoint``. The stall clock runs in the supervisor's
memory (monotonic: status times are whole seconds) and is persisted as
``status.progress.lastProgressTime`` on every step change, so an operator restart goes on
counting from the last advance. No step change for ``runPolicy.stallTimeoutSeconds`` is a
retryable failure with reason Stalled (:func:`watch_progress`); the phase Stalled shows for one
step before the new gang starts (:func:`mark_stalled`).
"""

from __future__ import annotations

import datetime
import time
from typing import Any

from lmforge import contract
from lmforge.api.manifest import TrainingJob
from lmforge.api.status import Attempt, Progress, TrainingJobStatus
from lmforge.operator import classify, progress
from lmforge.operator.context import StepContext
from lmforge.operator.status import set_condition

STALLED = "Stalled"
"""Failure reason, condition and phase of a gang whose step stopped advancing."""
LOSS_NOT_FINITE = "LossNotFinite"
"""Reason of the Warning event when rank 0 reports an infinite or NaN (training or eval) loss."""


def scrape(context: StepContext, pods: list[dict[str, Any]], force: bool = False) -> dict[str, float] | None:
    """Rank 0's values (at most every ``progress_interval`` unless ``force``), copied into the status."""
    memory = context.memory
    last, clock = memory.last_scrape, time.monotonic()
    if not force and last is not None and clock - last < context.options.progress_interval:
        return None
    rank0 = next((pod for pod in pods if classify.pod_rank(pod) == 0), None)
    if rank0 is None:
        return None
    port = context.manifest.spec.metrics.port
    if context.options.metrics_url is not None:
        url = context.options.metrics_url(rank0, port)
    else:
        ip = (rank0.get("status") or {}).get("podIP")
        if not ip:
            return None
        url = f"http://{ip}:{port}/metrics"
    memory.last_scrape = clock
    read = progress.scrape(url)
    if read is None:  # not serving yet
        return None
    status = context.status
    assert isinstance(status, TrainingJobStatus)
    if read.unavailable is not None:  # keep the last values; the stall clock sees no step
        status.progress = status.progress or Progress()
        status.progress.message = f"progress unavailable: {read.unavailable}"
        return None
    values = read.values
    if values:
        previous = status.progress
        status.progress = progress.to_progress(values, context.now)
        status.progress.last_progress_time = previous.last_progress_time if previous else None
        _warn_when_not_finite(context, previous, status.progress)
        manifest = context.manifest
        if isinstance(manifest, TrainingJob):
            layout = contract.RunLayout(manifest.spec.output.uri, checkpoint_uri=manifest.spec.checkpoint.uri)
            status.last_checkpoint = progress.to_checkpoint(values, layout.checkpoints) or status.last_checkpoint
    return values


def _warn_when_not_finite(context: StepContext, previous: Progress | None, current: Progress) -> None:
    """One Warning event when the loss stops being finite (not on every scrape while it stays so)."""
    if progress.loss_not_finite(current) and not progress.loss_not_finite(previous):
        step = "" if current.step is None else f" at step {current.step}"
        context.warn(
            LOSS_NOT_FINITE,
            f"{current.message}{step}: the training diverged; the gang keeps running (it is not stalled) "
            "until it ends or is stopped: lower training.optimizer.lr or check the data",
        )


def start_clock(context: StepContext, current: Attempt, clock: float) -> None:
    """Start the stall clock of ``current`` in memory: from status.progress.lastProgressTime when
    it belongs to this attempt (an operator restart goes on counting from the last advance, so
    a stalling gang is caught at its original deadline), else from now, written to the status."""
    memory, status = context.memory, context.status
    assert isinstance(status, TrainingJobStatus)
    memory.attempt, memory.last_step, memory.last_advance = current.index, None, clock
    seen = status.progress.last_progress_time if status.progress else None
    if seen is not None and current.start_time is not None and seen >= current.start_time:
        wall = datetime.datetime.now(datetime.UTC)
        memory.last_advance = clock - max(0.0, (wall - seen).total_seconds())
        memory.last_step = status.progress.step if status.progress else None
    else:
        mark_progress(context)


def mark_progress(context: StepContext) -> None:
    """Persist the stall clock: now, to the microsecond (status times are whole seconds)."""
    status = context.status
    assert isinstance(status, TrainingJobStatus)
    status.progress = status.progress or Progress()
    status.progress.last_progress_time = datetime.datetime.now(datetime.UTC)


def watch_progress(context: StepContext, current: Attempt, pods: list[dict[str, Any]]) -> classify.Failure | None:
    """Scrape a running attempt and follow its step; the Stalled failure once it stood still for
    ``runPolicy.stallTimeoutSeconds`` (None while it advances, or without a timeout)."""
    memory, status, clock = context.memory, context.status, time.monotonic()
    if memory.attempt != current.index or memory.last_advance is None:
        start_clock(context, current, clock)
    assert memory.last_advance is not None
    values = scrape(context, pods)
    step = progress.step_of(values or {})
    if step is not None and step != memory.last_step:
        memory.last_step, memory.last_advance = step, clock
        mark_progress(context)
        if status.phase == STALLED or any(
            condition.type == STALLED and condition.status == "True" for condition in status.conditions
        ):
            set_condition(status, STALLED, False, "Progressing", f"step {memory.last_step}", context.now)
        if status.phase != "Running":
            context.enter_phase("Running", "Running", f"attempt {current.index} progressing")
    timeout = context.manifest.spec.run_policy.stall_timeout_seconds
    if timeout and clock - memory.last_advance >= timeout:
        step = "no step reported" if memory.last_step is None else f"step {memory.last_step}"
        return classify.Failure(STALLED, True, None, f"no step progress for {timeout}s ({step})")
    return None


def mark_stalled(context: StepContext, failure: classify.Failure) -> None:
    """Condition and phase Stalled for the step that ends a stalled attempt; the next step starts the new one."""
    set_condition(context.status, STALLED, True, STALLED, failure.message, context.now)
    context.enter_phase(STALLED, STALLED, f"{failure.message}; restarting the gang")
