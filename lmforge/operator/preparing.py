"""Data preparation: the Preparing phase of a TrainingJob with ``spec.data.prepare``, before attempt 0.

The operator cannot look into object storage (its image has no S3 client), so it does not decide
whether prepared data is missing: the prepare Job always runs once, and ``lmforge prepare``
itself reuses prepared data whose manifest.json matches the spec (a no-op of milliseconds) or
prepares it. Exit 0 → condition DataPrepared=True and attempt 0 starts; exit 78 (the data or
spec is unusable) → Failed with reason InvalidData, never retried; any other failure → a new
prepare Job ``<job>-prepare-r<N>``, counted as a restart against runPolicy.backoffLimit, then
Failed with reason PrepareFailed.

Idempotent across operator restarts: the Job name follows from ``status.restarts``, the Job is
looked up before it is created (creating an existing name returns it), failed prepare Jobs are
kept (their pod has ended; they go with the TrainingJob) so a restarted operator re-reads the
same verdict, and DataPrepared=True is written together with attempt 0. A suspend while
preparing lets the CPU Job finish; its result is used on resume.
"""

from __future__ import annotations

from typing import Any

from lmforge.api.manifest import TrainingJob
from lmforge.operator import children, classify, metrics
from lmforge.operator.context import StepContext
from lmforge.operator.status import condition_true, set_condition

DATA_PREPARED = "DataPrepared"
"""Condition of a TrainingJob with spec.data.prepare: Unknown while preparing, True when done, False when failed."""


def needs_prepare(context: StepContext) -> bool:
    """Whether a prepare Job must (still) run: a TrainingJob with spec.data.prepare whose data
    is not known to be prepared, before its first attempt (a job that already has attempts is
    never sent back to Preparing)."""
    return (
        isinstance(context.manifest, TrainingJob)
        and context.manifest.spec.data.prepare is not None
        and not context.status.attempts
        and not condition_true(context.status, DATA_PREPARED)
    )


def prepare_try(context: StepContext) -> int:
    """The current prepare try: before attempt 0 the only restarts are prepare retries."""
    return context.status.restarts


def stop_prepare(context: StepContext) -> None:
    context.delete_job(children.prepare_job_name(context.name, prepare_try(context)))


def prepare_pods(context: StepContext, try_number: int) -> list[dict[str, Any]]:
    return [
        pod
        for pod in context.observed.pods
        if (pod["metadata"].get("labels") or {}).get(children.LABEL_PREPARE) == str(try_number)
    ]


def prepare(context: StepContext) -> bool:
    """Run (or find) the CPU prepare Job; True once the data is prepared and attempt 0 may start."""
    manifest, status = context.manifest, context.status
    assert isinstance(manifest, TrainingJob)
    run_policy = manifest.spec.run_policy
    try_number = prepare_try(context)
    name = children.prepare_job_name(context.name, try_number)
    job = context.known_job(name)
    if job is None:  # not created yet (or by an operator before a restart: ensure adopts it)
        job = context.ensure_job(children.prepare_job(manifest, try_number))
    job_status = job.get("status") or {}
    conditions = classify.true_conditions(job_status)
    if "Complete" in conditions or (job_status.get("succeeded") or 0) >= 1:
        set_condition(status, DATA_PREPARED, True, "Prepared", f"prepare Job {name} succeeded", context.now)
        return True
    found = classify.job_failure(prepare_pods(context, try_number), conditions)
    if found is None:
        what = "running" if (job_status.get("active") or 0) else "created, waiting for its pod"
        message = (
            f"prepare Job {name} {what}: lmforge prepare reuses prepared data when it matches the spec, "
            "prepares it otherwise"
        )
        set_condition(status, DATA_PREPARED, "Unknown", "Preparing", message, context.now)
        context.enter_phase("Preparing", "Preparing", message)
        return False
    pod, failure = found
    where = _where(context, pod)
    if not failure.retryable:
        message = f"prepare Job {name} rejected the data (exit {failure.exit_code}){where}; not retried"
        set_condition(status, DATA_PREPARED, False, "InvalidData", message, context.now)
        context.enter_phase("Failed", "InvalidData", message)
        context.warn("InvalidData", message)
        return False
    if status.restarts >= run_policy.backoff_limit:
        message = (
            f"prepare Job {name} failed: {failure.message}{where}; "
            f"backoffLimit ({run_policy.backoff_limit}) restarts used"
        )
        set_condition(status, DATA_PREPARED, False, "PrepareFailed", message, context.now)
        context.enter_phase("Failed", "PrepareFailed", message)
        context.warn("PrepareFailed", message)
        return False
    status.restarts += 1
    metrics.RESTARTS.inc()
    retry = context.ensure_job(children.prepare_job(manifest, status.restarts))
    message = (
        f"prepare Job {name} failed: {failure.message}{where}; retrying as {retry['metadata']['name']} "
        f"(restart {status.restarts} of {run_policy.backoff_limit})"
    )
    context.warn(failure.reason, message)
    set_condition(status, DATA_PREPARED, "Unknown", "Retrying", message, context.now)
    context.enter_phase("Preparing", "Retrying", message)
    return False


def _where(context: StepContext, pod: dict[str, Any] | None) -> str:
    """`` (pod <name>): <its last log line>`` for a failure message; empty without a pod."""
    if pod is None:
        return ""
    where = f" (pod {pod['metadata']['name']})"
    tail = context.kube.pod_log_tail(context.namespace, pod["metadata"]["name"], context.options.log_lines)
    last = [line for line in (tail or "").splitlines() if line.strip()]
    if last:
        where += f": {last[-1].strip()[:500]}"
    return where
