"""What one reconciliation step works on: the observed job, what its supervisor remembers, the
operator's options, and the status the step rebuilds, together with the few helpers every
concern of a step uses (:class:`StepContext`).

The concerns (:mod:`attempts`, :mod:`preparing`, :mod:`stall`, :mod:`compression`) are
functions of a :class:`StepContext`; :func:`lmforge.operator.reconcile.reconcile` builds one per
step and calls them in order.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import kopf

from lmforge.api.manifest import TrainingJob
from lmforge.operator import children, metrics
from lmforge.operator.children import Manifest
from lmforge.operator.kube import Kube
from lmforge.operator.ownership import NAME_CONFLICT, ChildLeftover, ForeignObject, controller_of, owned_by
from lmforge.operator.status import load_status, now, set_condition, set_phase

if TYPE_CHECKING:
    from lmforge.operator.compression import SourceModel

COMPRESSION_PHASES = {"Restarting": "Pending", "Suspended": "Pending", "Stalled": "Running", "Preparing": "Pending"}
"""How the TrainingJob phases a CompressionJob does not have map onto the ones it has."""
CREATED_TRUST = 60.0
"""Seconds a supervisor trusts its own record of a Job it created while the index lacks it."""


@dataclass
class JobMemory:
    """What one job's supervisor remembers between steps; lost on operator restart, when the
    stall clock is restored from status.progress.lastProgressTime (see :func:`lmforge.operator.stall.start_clock`)."""

    attempt: int | None = None
    last_step: int | None = None
    last_advance: float | None = None
    """time.monotonic() of the last step change (status times are whole seconds: too coarse)."""
    last_scrape: float | None = None
    created: dict[str, tuple[float, dict[str, Any]]] = field(default_factory=dict)
    """Jobs this supervisor created (time.monotonic(), object) that the watch-fed index may not
    show yet: without this the next step would POST them again (409) and GET them, two wasted
    requests per Job. Trusted for CREATED_TRUST seconds: a Job deleted behind our back is then
    created again."""


@dataclass
class Observed:
    """Everything one step looks at."""

    manifest: Manifest
    body: dict[str, Any]
    jobs: dict[str, dict[str, Any]]
    pods: list[dict[str, Any]]
    now: datetime.datetime = field(default_factory=now)


@dataclass
class Options:
    """Operator-wide knobs a step needs (see :class:`lmforge.operator.main.OperatorConfig`)."""

    progress_interval: float = 10.0
    log_lines: int = 20
    metrics_url: Callable[[dict[str, Any], int], str] | None = None
    """Override of ``http://<pod IP>:<port>/metrics`` (tests); gets rank 0's pod and the port."""


class StepContext:
    """One step of one job: its inputs, the status it rebuilds, and what it decided about the job."""

    def __init__(self, kube: Kube, observed: Observed, memory: JobMemory, options: Options) -> None:
        self.kube = kube
        self.uid: str | None = (observed.body.get("metadata") or {}).get("uid")
        self.observed = self.owned_only(observed, memory)
        self.manifest = observed.manifest
        self.memory = memory
        self.options = options
        self.status = load_status(self.manifest.kind, observed.body)
        self.namespace = self.manifest.metadata.namespace or "default"
        self.name = self.manifest.metadata.name
        self.training = isinstance(self.manifest, TrainingJob)
        self.delete_owner = False
        """Whether the supervisor is to delete the job (its ttlSecondsAfterFinished has passed)."""
        self.source_model: SourceModel | None = None
        """What :func:`lmforge.operator.compression.source_model` resolved in this step (None: not yet)."""

    def owned_only(self, observed: Observed, memory: JobMemory) -> Observed:
        """``observed`` with only the Jobs this job controls and the pods those Jobs control.

        The indices select children by label, and anyone who may create a Job or a pod can copy
        the labels: a foreign Job or pod must not be supervised, classified nor scraped as ours.
        """
        jobs = {name: job for name, job in observed.jobs.items() if owned_by(job, self.uid)}
        job_uids = {(job.get("metadata") or {}).get("uid") for job in jobs.values()}
        job_uids |= {(created.get("metadata") or {}).get("uid") for _, created in memory.created.values()}
        job_uids.discard(None)
        pods = [pod for pod in observed.pods if (controller_of(pod) or {}).get("uid") in job_uids]
        return dataclasses.replace(observed, jobs=jobs, pods=pods)

    @property
    def now(self) -> datetime.datetime:
        return self.observed.now

    def enter_phase(self, phase: str, reason: str, message: str) -> None:
        """Move to ``phase`` (mapped for a CompressionJob) and count the job when it has just ended."""
        if not self.training:
            phase = COMPRESSION_PHASES.get(phase, phase)
        was = self.status.phase
        set_phase(self.status, phase, reason, message, self.now)
        if was != phase:
            if phase == "Succeeded":
                metrics.JOBS_SUCCEEDED.inc()
            elif phase == "Failed":
                metrics.JOBS_FAILED.labels(reason=reason).inc()

    def warn(self, reason: str, message: str) -> None:
        """A Warning event on the job."""
        try:
            kopf.warn(self.observed.body, reason=reason, message=message)
        except LookupError:  # outside Kopf (unit tests): no event queue
            logging.getLogger(__name__).warning("%s: %s", reason, message)

    def attempt_job_name(self, index: int) -> str:
        return children.attempt_job_name_for(self.manifest, index)

    def attempt_pods(self, index: int) -> list[dict[str, Any]]:
        return [
            pod
            for pod in self.observed.pods
            if (pod["metadata"].get("labels") or {}).get(children.LABEL_ATTEMPT) == str(index)
        ]

    def known_job(self, name: str) -> dict[str, Any] | None:
        """A child Job from the index, else from what this supervisor created itself."""
        job = self.observed.jobs.get(name)
        if job is not None:
            self.memory.created.pop(name, None)  # the index has caught up
            return job
        when, created = self.memory.created.get(name, (0.0, None))
        return created if time.monotonic() - when < CREATED_TRUST else None

    def ensure_job(self, wanted: dict[str, Any]) -> dict[str, Any]:
        """Create (or find our own existing) child Job and remember it until the index shows it.

        An existing Job with its name that this job does not control raises ForeignObject
        (:meth:`refuse_foreign` gives the verdict): it is never adopted.
        """
        kopf.adopt(wanted, owner=self.observed.body)
        job, _ = self.kube.ensure(wanted, self.namespace, self.observed.body)
        self.memory.created[wanted["metadata"]["name"]] = (time.monotonic(), job)
        return job

    def delete_job(self, name: str) -> None:
        """Delete child Job ``name`` only if it is ours, and only the one we saw as ours (its uid):
        a Job with that name that this job does not control is left alone."""
        job = self.known_job(name)
        if job is None:
            job = self.kube.get("batch/v1", "Job", self.namespace, name)
        if job is None or not owned_by(job, self.uid):
            return
        self.kube.delete("batch/v1", "Job", self.namespace, name, uid=(job.get("metadata") or {}).get("uid"))
        self.memory.created.pop(name, None)

    def stop_attempt_job(self, index: int) -> None:
        self.delete_job(self.attempt_job_name(index))

    def refuse_foreign(self, conflict: ForeignObject) -> None:
        """The verdict on a child name taken by an object this job does not own: Failed with reason
        NameConflict (a condition and a Warning event naming the object); the object is not touched.

        Failed rather than Pending: a job's name (hence its children's) cannot change, and
        nothing the operator may do frees the name, so waiting would keep the job Pending
        without end, holding its place in a queue, for a cause a user has to act on.
        """
        current = self.status.attempts[-1] if self.status.attempts else None
        if current is not None and current.end_time is None:
            current.end_time, current.reason, current.retryable = self.now, NAME_CONFLICT, False
        set_condition(self.status, NAME_CONFLICT, True, NAME_CONFLICT, conflict.message, self.now)
        if self.status.phase != "Failed":
            self.enter_phase("Failed", NAME_CONFLICT, conflict.message)
            self.warn(NAME_CONFLICT, conflict.message)

    def wait_for_leftover(self, leftover: ChildLeftover) -> None:
        """A child's name still holds an earlier job's object: say so; the next step tries again."""
        self.status.message = str(leftover)
