"""Run policy and the attempt lifecycle.

The run policy (``spec.runPolicy``): activeDeadlineSeconds (:func:`deadline_passed`,
:func:`fail_at_deadline`), suspend (:func:`suspend`), ttlSecondsAfterFinished (:func:`expire`)
and backoffLimit, the restart policy of :func:`fail_attempt`.

Attempts: the current attempt is ``status.attempts[-1]``; its Job is ``<job>-a<index>``
(``<job>-compress-a<index>`` for a CompressionJob). :func:`start_attempt` creates the Job before
it records the attempt, :func:`supervise` follows it to success or failure, :func:`end_attempt`
records how it ended, and a retryable failure starts the next attempt (a new gang that resumes
from the newest checkpoint) until backoffLimit restarts are used.
"""

from __future__ import annotations

from typing import Any

from lmforge import contract
from lmforge.api.manifest import TrainingJob
from lmforge.api.status import Attempt, Outputs, TrainingJobStatus
from lmforge.operator import children, classify, compression, metrics, stall
from lmforge.operator.context import Manifest, StepContext


def outputs_of(manifest: Manifest) -> Outputs:
    """Where a finished job's results are (the layout `lmforge run` and `lmforge compress` write)."""
    if isinstance(manifest, TrainingJob):
        run = contract.RunLayout(manifest.spec.output.uri)
        return Outputs(model_uri=run.model, metrics_uri=run.metrics, report_uri=manifest.spec.output.uri.rstrip("/"))
    compressed = contract.CompressionLayout(manifest.spec.output.uri)
    return Outputs(model_uri=compressed.model, report_uri=compressed.report)


# run policy ----------------------------------------------------------------------------------
def deadline_passed(context: StepContext) -> bool:
    limit = context.manifest.spec.run_policy.active_deadline_seconds
    start = context.status.start_time
    return bool(limit and start and (context.now - start).total_seconds() >= limit)


def fail_at_deadline(context: StepContext, current: Attempt | None) -> None:
    """Stop the running attempt (if any) and fail the job with reason DeadlineExceeded."""
    if current is not None and current.end_time is None:
        context.stop_attempt_job(current.index)
        end_attempt(context, current, "DeadlineExceeded", retryable=False)
    limit = context.manifest.spec.run_policy.active_deadline_seconds
    context.enter_phase("Failed", "DeadlineExceeded", f"ran longer than activeDeadlineSeconds ({limit}s)")
    context.warn("DeadlineExceeded", context.status.message or "")


def expire(context: StepContext) -> None:
    """Ask for the finished job's deletion once its ttlSecondsAfterFinished has passed."""
    ttl = context.manifest.spec.run_policy.ttl_seconds_after_finished
    done = context.status.completion_time
    if ttl is not None and done is not None and (context.now - done).total_seconds() >= ttl:
        context.delete_owner = True


def suspend(context: StepContext, current: Attempt | None) -> None:
    if current is not None and current.end_time is None:
        # Deleting the Job sends SIGTERM to every pod; the trainer checkpoints within the
        # grace period and exits 143. The next attempt resumes from that checkpoint.
        context.stop_attempt_job(current.index)
        end_attempt(context, current, "Suspended", retryable=True)
    context.enter_phase(
        "Suspended", "Suspended", "suspend: true; pods stopped after a checkpoint; set suspend: false to resume"
    )


# attempts ------------------------------------------------------------------------------------
def start_attempt(context: StepContext, previous: Attempt | None) -> None:
    status, memory = context.status, context.memory
    index = 0 if previous is None else previous.index + 1
    source = compression.source_model(context)
    job = context.ensure_job(children.attempt_job(context.manifest, index, source.uri))
    status.attempts.append(Attempt(index=index, start_time=context.now))
    memory.attempt, memory.last_step, memory.last_advance = index, None, None
    if isinstance(status, TrainingJobStatus) and status.progress is not None:
        status.progress.last_progress_time = None  # the new gang's stall clock starts when it runs
    if previous is None:
        context.enter_phase("Pending", "Created", f"attempt 0: Job {job['metadata']['name']} created, waiting for pods")
    elif previous.reason == "Suspended":
        context.enter_phase("Restarting", "Resumed", f"resumed as attempt {index} from the newest checkpoint")
    else:
        context.enter_phase(
            "Restarting",
            previous.reason or "Restarted",
            f"attempt {index} replaces the gang after {previous.reason} (restart {status.restarts} of "
            f"{context.manifest.spec.run_policy.backoff_limit}); resuming from the newest checkpoint",
        )


def end_attempt(
    context: StepContext,
    attempt: Attempt,
    reason: str,
    *,
    retryable: bool,
    exit_code: int | None = None,
    pod: dict[str, Any] | None = None,
) -> None:
    attempt.end_time, attempt.reason = context.now, reason
    attempt.retryable, attempt.exit_code = retryable, exit_code
    if pod is not None:
        attempt.failed_pod = pod["metadata"]["name"]
        attempt.failed_rank = classify.pod_rank(pod)
        attempt.node = (pod.get("spec") or {}).get("nodeName")
        if reason != "Completed":
            attempt.log_tail = context.kube.pod_log_tail(
                context.namespace, attempt.failed_pod, context.options.log_lines
            )


def supervise(context: StepContext, current: Attempt) -> None:
    """Follow the running attempt's Job: success, a failure, or (training) its progress."""
    status = context.status
    job = context.known_job(context.attempt_job_name(current.index))
    if job is None:  # an operator restart before the index filled, or a crash after recording it
        source = compression.source_model(context)
        job = context.ensure_job(children.attempt_job(context.manifest, current.index, source.uri))
    job_status = job.get("status") or {}
    conditions = classify.true_conditions(job_status)
    pods = context.attempt_pods(current.index)
    nodes = job["spec"].get("completions") or 1

    if "Complete" in conditions or (job_status.get("succeeded") or 0) >= nodes:
        end_attempt(context, current, "Completed", retryable=False, exit_code=0)
        compression.copy_results(context, pods)
        stall.scrape(context, pods, force=True)
        status.outputs = outputs_of(context.manifest)
        context.enter_phase("Succeeded", "Completed", f"all {nodes} node(s) finished (attempt {current.index})")
        return
    found = classify.job_failure(pods, conditions)
    if found is not None:
        pod, failure = found
        fail_attempt(context, current, failure, pod)
        return

    running = sum(1 for pod in pods if (pod.get("status") or {}).get("phase") == "Running")
    if running >= nodes or (job_status.get("ready") or 0) >= nodes:
        if status.phase != "Running" and status.phase != stall.STALLED:
            context.enter_phase("Running", "Running", f"attempt {current.index}: {nodes} node(s) running")
        if context.training:
            stalled = stall.watch_progress(context, current, pods)
            if stalled is not None:
                fail_attempt(context, current, stalled, None)


def fail_attempt(context: StepContext, current: Attempt, failure: classify.Failure, pod: dict[str, Any] | None) -> None:
    """End a failed attempt, then fail the job or (retryable, restarts left) start the next attempt."""
    status, backoff_limit = context.status, context.manifest.spec.run_policy.backoff_limit
    end_attempt(context, current, failure.reason, retryable=failure.retryable, exit_code=failure.exit_code, pod=pod)
    compression.copy_results(context, context.attempt_pods(current.index))
    context.stop_attempt_job(current.index)  # the peers of a failed rank would wait in collectives forever
    where = f" (pod {current.failed_pod}, rank {current.failed_rank})" if current.failed_pod else ""
    if not failure.retryable:
        message = f"{failure.message}{where}; not retried"
        context.enter_phase("Failed", failure.reason, message)
        context.warn(failure.reason, message)
        return
    if status.restarts >= backoff_limit:
        message = f"{failure.reason}: {failure.message}{where}; backoffLimit ({backoff_limit}) restarts used"
        context.enter_phase("Failed", "BackoffLimitExceeded", message)
        context.warn("BackoffLimitExceeded", message)
        return
    status.restarts += 1
    metrics.RESTARTS.inc()
    context.warn(failure.reason, f"attempt {current.index} failed: {failure.message}{where}; restarting the gang")
    if failure.reason == stall.STALLED:
        stall.mark_stalled(context, failure)
        return  # the next step starts the new attempt: Stalled stays visible for one step
    start_attempt(context, current)
