"""The per-job state machine: observe the attempt Job and its pods, act, and rebuild the status.

One call of :func:`reconcile` is one level-triggered step. It is safe to repeat and to run after
an operator restart, because every decision is derived from the status it wrote before plus
what exists in the cluster, and every child has a deterministic name:

* the current attempt is ``status.attempts[-1]``; its Job is ``<job>-a<index>``;
* a new attempt is recorded in the status only after its Job exists, so a crash in between
  leaves a Job that the next step adopts (creation of an existing name returns it);
* finished attempts are never touched again.

Phases: Pending → Running → Succeeded | Failed, with Restarting (a new gang after a retryable
failure), Stalled (no step progress for stallTimeoutSeconds), Suspended (suspend: true).
CompressionJobs have only Pending/Running/Succeeded/Failed; the others map onto those.

:func:`step` calls the concerns top to bottom on one :class:`~lmforge.operator.context.StepContext`:
the run policy (TTL of a finished job, activeDeadlineSeconds, suspend: :mod:`attempts`), then
the Preparing phase of a TrainingJob with ``spec.data.prepare`` (:func:`preparing.prepare`),
then either a new attempt, once a CompressionJob's source model is there (:mod:`compression`),
or the supervision of the current one (:func:`attempts.supervise`, with progress and stalls
from :mod:`stall`).
"""

from __future__ import annotations

from typing import Any

from lmforge.api.status import CompressionJobStatus, TrainingJobStatus
from lmforge.operator import attempts, compression, preparing
from lmforge.operator.context import JobMemory, Observed, Options, StepContext
from lmforge.operator.kube import Kube
from lmforge.operator.ownership import ChildLeftover, ForeignObject
from lmforge.operator.status import TERMINAL


def step(context: StepContext) -> TrainingJobStatus | CompressionJobStatus:
    """One reconciliation step of one job: the status to write."""
    status = context.status
    status.observed_generation = context.observed.body.get("metadata", {}).get("generation")
    if status.phase in TERMINAL:
        attempts.expire(context)
        return status
    status.start_time = status.start_time or context.now
    current = status.attempts[-1] if status.attempts else None
    if attempts.deadline_passed(context):
        if current is None and preparing.needs_prepare(context):
            preparing.stop_prepare(context)
        attempts.fail_at_deadline(context, current)
        return status
    if context.manifest.spec.run_policy.suspend:
        attempts.suspend(context, current)
        return status
    if current is None and preparing.needs_prepare(context) and not preparing.prepare(context):
        return status  # preparing data, or failed preparing it
    if current is None or current.end_time is not None:
        if compression.source_model(context).waiting:
            return status  # waiting for the TrainingJob whose model this CompressionJob compresses
        attempts.start_attempt(context, current)
        return status
    attempts.supervise(context, current)
    return status


def reconcile(kube: Kube, observed: Observed, memory: JobMemory, options: Options) -> tuple[dict[str, Any], bool]:
    """Run one step: the full new status (as written to the API) and whether to delete the job (TTL)."""
    context = StepContext(kube, observed, memory, options)
    try:
        status = step(context)
    except ForeignObject as conflict:  # a child's name is taken: never adopted (see ownership)
        context.refuse_foreign(conflict)
        status = context.status
    except ChildLeftover as leftover:  # an earlier job's child, being garbage collected: next step
        context.wait_for_leftover(leftover)
        status = context.status
    return status.to_manifest(), context.delete_owner
