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

A TrainingJob with ``spec.data.prepare`` first goes through Preparing: see :meth:`Step.prepare`.
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import kopf

from lmforge import API_GROUP, API_VERSION
from lmforge.api.manifest import CompressionJob, TrainingJob
from lmforge.api.status import (
    Attempt,
    CompressionJobStatus,
    CompressionResult,
    Outputs,
    Progress,
    TrainingJobStatus,
)
from lmforge.operator import children, classify, metrics, progress
from lmforge.operator.kube import Kube
from lmforge.operator.status import TERMINAL, condition_true, now, set_condition, set_phase
from lmforge.termination import read_termination_message

Manifest = TrainingJob | CompressionJob
_COMPRESSION_PHASES = {"Restarting": "Pending", "Suspended": "Pending", "Stalled": "Running", "Preparing": "Pending"}
CREATED_TRUST = 60.0
"""Seconds a supervisor trusts its own record of a Job it created while the index lacks it."""
DATA_PREPARED = "DataPrepared"
"""Condition of a TrainingJob with spec.data.prepare: Unknown while preparing, True when done, False when failed."""


@dataclass
class JobMemory:
    """What one job's supervisor remembers between steps; lost on operator restart, when the
    stall clock is restored from status.progress.lastProgressTime (see :meth:`Step.stall_clock`)."""

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


def outputs_of(manifest: Manifest) -> Outputs:
    """Where a finished job's results are (the layout `lmforge run` and `lmforge compress` write)."""
    base = manifest.spec.output.uri.rstrip("/")
    if isinstance(manifest, TrainingJob):
        return Outputs(model_uri=f"{base}/model", metrics_uri=f"{base}/metrics.jsonl", report_uri=base)
    return Outputs(model_uri=f"{base}/model", report_uri=f"{base}/results.md")


def load_status(manifest: Manifest, body: dict[str, Any]) -> TrainingJobStatus | CompressionJobStatus:
    raw = body.get("status") or {}
    model = TrainingJobStatus if isinstance(manifest, TrainingJob) else CompressionJobStatus
    try:
        return model.model_validate(raw)
    except ValueError:  # someone wrote a status we cannot read: start over rather than crash-loop
        return model()


class Step:
    """One reconciliation step of one job; :meth:`run` returns the status to write."""

    def __init__(self, kube: Kube, observed: Observed, memory: JobMemory, options: Options) -> None:
        self.kube = kube
        self.obs = observed
        self.m = observed.manifest
        self.memory = memory
        self.options = options
        self.status = load_status(self.m, observed.body)
        self.ns = self.m.metadata.namespace or "default"
        self.name = self.m.metadata.name
        self.training = isinstance(self.m, TrainingJob)
        self.delete_owner = False

    # helpers ---------------------------------------------------------------------------------
    def phase(self, phase: str, reason: str, message: str) -> None:
        if not self.training:
            phase = _COMPRESSION_PHASES.get(phase, phase)
        was = self.status.phase
        set_phase(self.status, phase, reason, message, self.obs.now)
        if was != phase:
            if phase == "Succeeded":
                metrics.JOBS_SUCCEEDED.inc()
            elif phase == "Failed":
                metrics.JOBS_FAILED.labels(reason=reason).inc()

    def warn(self, reason: str, message: str) -> None:
        try:
            kopf.warn(self.obs.body, reason=reason, message=message)
        except LookupError:  # outside Kopf (unit tests): no event queue
            logging.getLogger(__name__).warning("%s: %s", reason, message)

    def job_name(self, index: int) -> str:
        return children.attempt_job_name_for(self.m, index)

    def attempt_pods(self, index: int) -> list[dict[str, Any]]:
        return [
            p for p in self.obs.pods if (p["metadata"].get("labels") or {}).get(children.LABEL_ATTEMPT) == str(index)
        ]

    def known_job(self, name: str) -> dict[str, Any] | None:
        """A child Job from the index, else from what this supervisor created itself."""
        job = self.obs.jobs.get(name)
        if job is not None:
            self.memory.created.pop(name, None)  # the index has caught up
            return job
        when, created = self.memory.created.get(name, (0.0, None))
        return created if time.monotonic() - when < CREATED_TRUST else None

    def ensure_job(self, wanted: dict[str, Any]) -> dict[str, Any]:
        """Create (or adopt an existing) child Job and remember it until the index shows it."""
        kopf.adopt(wanted, owner=self.obs.body)
        job, _ = self.kube.ensure(wanted, self.ns)
        self.memory.created[wanted["metadata"]["name"]] = (time.monotonic(), job)
        return job

    def stop_job(self, index: int) -> None:
        self.kube.delete("batch/v1", "Job", self.ns, self.job_name(index))

    # the step --------------------------------------------------------------------------------
    def run(self) -> TrainingJobStatus | CompressionJobStatus:
        st, rp, t = self.status, self.m.spec.run_policy, self.obs.now
        st.observed_generation = self.obs.body.get("metadata", {}).get("generation")
        if st.phase in TERMINAL:
            self.expire()
            return st
        st.start_time = st.start_time or t
        current = st.attempts[-1] if st.attempts else None
        if current is not None and current.end_time is None and self.deadline_passed():
            self.stop_job(current.index)
            self.end_attempt(current, "DeadlineExceeded", retryable=False)
        if current is None and self.needs_prepare() and self.deadline_passed():
            self.stop_prepare()
        if self.deadline_passed():
            limit = rp.active_deadline_seconds
            self.phase("Failed", "DeadlineExceeded", f"ran longer than activeDeadlineSeconds ({limit}s)")
            self.warn("DeadlineExceeded", st.message or "")
            return st
        if rp.suspend:
            self.suspend(current)
            return st
        if current is None and self.needs_prepare() and not self.prepare():
            return st  # preparing data, or failed preparing it
        if current is None or current.end_time is not None:
            if self.source_model_uri() is False:
                return st  # waiting for the TrainingJob whose model this CompressionJob compresses
            self.start_attempt(current)
            return st
        self.supervise(current)
        return st

    def deadline_passed(self) -> bool:
        limit = self.m.spec.run_policy.active_deadline_seconds
        start = self.status.start_time
        return bool(limit and start and (self.obs.now - start).total_seconds() >= limit)

    def expire(self) -> None:
        ttl = self.m.spec.run_policy.ttl_seconds_after_finished
        done = self.status.completion_time
        if ttl is not None and done is not None and (self.obs.now - done).total_seconds() >= ttl:
            self.delete_owner = True

    def suspend(self, current: Attempt | None) -> None:
        if current is not None and current.end_time is None:
            # Deleting the Job sends SIGTERM to every pod; the trainer checkpoints within the
            # grace period and exits 143. The next attempt resumes from that checkpoint.
            self.stop_job(current.index)
            self.end_attempt(current, "Suspended", retryable=True)
        self.phase(
            "Suspended", "Suspended", "suspend: true; pods stopped after a checkpoint; set suspend: false to resume"
        )

    def source_model_uri(self) -> str | None | bool:
        """For a CompressionJob of ``model.trainingJob``: that job's model URI once it has Succeeded.

        None when nothing needs resolving; False (with phase Pending and a reason) while the
        TrainingJob is missing or not finished yet.
        """
        if not isinstance(self.m, CompressionJob) or self.m.spec.model.training_job is None:
            return None
        name = self.m.spec.model.training_job
        source = self.kube.get(f"{API_GROUP}/{API_VERSION}", "TrainingJob", self.ns, name)
        phase = ((source or {}).get("status") or {}).get("phase")
        if source is None or phase != "Succeeded":
            what = "does not exist" if source is None else f"is {phase or 'Pending'}"
            self.phase("Pending", "WaitingForModel", f"TrainingJob {name} {what}; waiting for it to succeed")
            return False
        outputs = (source.get("status") or {}).get("outputs") or {}
        output_uri = ((source.get("spec") or {}).get("output") or {}).get("uri", "")
        return outputs.get("modelUri") or f"{output_uri.rstrip('/')}/model"

    # data preparation ------------------------------------------------------------------------
    def needs_prepare(self) -> bool:
        """Whether a prepare Job must (still) run: a TrainingJob with spec.data.prepare whose data
        is not known to be prepared, before its first attempt (a job that already has attempts is
        never sent back to Preparing)."""
        return (
            isinstance(self.m, TrainingJob)
            and self.m.spec.data.prepare is not None
            and not self.status.attempts
            and not condition_true(self.status, DATA_PREPARED)
        )

    def prepare_try(self) -> int:
        """The current prepare try: before attempt 0 the only restarts are prepare retries."""
        return self.status.restarts

    def stop_prepare(self) -> None:
        self.kube.delete("batch/v1", "Job", self.ns, children.prepare_job_name(self.name, self.prepare_try()))

    def prepare(self) -> bool:
        """Run (or find) the CPU prepare Job; True once the data is prepared and attempt 0 may start.

        The operator cannot look into object storage (its image has no S3 client), so it does not
        decide whether prepared data is missing: the prepare Job always runs once, and
        ``lmforge prepare`` itself reuses prepared data whose manifest.json matches the spec (a
        no-op of milliseconds) or prepares it. Exit 0 → condition DataPrepared=True and attempt 0
        starts; exit 78 (the data or spec is unusable) → Failed with reason InvalidData, never
        retried; any other failure → a new prepare Job ``<job>-prepare-r<N>``, counted as a restart
        against runPolicy.backoffLimit, then Failed with reason PrepareFailed.

        Idempotent across operator restarts: the Job name follows from ``status.restarts``, the
        Job is looked up before it is created (creating an existing name returns it), failed
        prepare Jobs are kept (their pod has ended; they go with the TrainingJob) so a restarted
        operator re-reads the same verdict, and DataPrepared=True is written together with
        attempt 0. A suspend while preparing lets the CPU Job finish; its result is used on resume.
        """
        assert isinstance(self.m, TrainingJob)
        st, rp = self.status, self.m.spec.run_policy
        try_ = self.prepare_try()
        name = children.prepare_job_name(self.name, try_)
        job = self.known_job(name)
        if job is None:  # not created yet (or by an operator before a restart: ensure adopts it)
            job = self.ensure_job(children.prepare_job(self.m, try_))
        job_status = job.get("status") or {}
        conditions = classify.true_conditions(job_status)
        if "Complete" in conditions or (job_status.get("succeeded") or 0) >= 1:
            set_condition(st, DATA_PREPARED, True, "Prepared", f"prepare Job {name} succeeded", self.obs.now)
            return True
        pods = [
            p for p in self.obs.pods if (p["metadata"].get("labels") or {}).get(children.LABEL_PREPARE) == str(try_)
        ]
        found = classify.job_failure(pods, conditions)
        if found is None:
            what = "running" if (job_status.get("active") or 0) else "created, waiting for its pod"
            message = (
                f"prepare Job {name} {what}: lmforge prepare reuses prepared data when it matches the spec, "
                "prepares it otherwise"
            )
            set_condition(st, DATA_PREPARED, "Unknown", "Preparing", message, self.obs.now)
            self.phase("Preparing", "Preparing", message)
            return False
        pod, failure = found
        where = ""
        if pod is not None:
            where = f" (pod {pod['metadata']['name']})"
            tail = self.kube.pod_log_tail(self.ns, pod["metadata"]["name"], self.options.log_lines)
            last = [line for line in (tail or "").splitlines() if line.strip()]
            if last:
                where += f": {last[-1].strip()[:500]}"
        if not failure.retryable:
            message = f"prepare Job {name} rejected the data (exit {failure.exit_code}){where}; not retried"
            set_condition(st, DATA_PREPARED, False, "InvalidData", message, self.obs.now)
            self.phase("Failed", "InvalidData", message)
            self.warn("InvalidData", message)
            return False
        if st.restarts >= rp.backoff_limit:
            message = (
                f"prepare Job {name} failed: {failure.message}{where}; backoffLimit ({rp.backoff_limit}) restarts used"
            )
            set_condition(st, DATA_PREPARED, False, "PrepareFailed", message, self.obs.now)
            self.phase("Failed", "PrepareFailed", message)
            self.warn("PrepareFailed", message)
            return False
        st.restarts += 1
        metrics.RESTARTS.inc()
        retry = self.ensure_job(children.prepare_job(self.m, st.restarts))
        message = (
            f"prepare Job {name} failed: {failure.message}{where}; retrying as {retry['metadata']['name']} "
            f"(restart {st.restarts} of {rp.backoff_limit})"
        )
        self.warn(failure.reason, message)
        set_condition(st, DATA_PREPARED, "Unknown", "Retrying", message, self.obs.now)
        self.phase("Preparing", "Retrying", message)
        return False

    def start_attempt(self, previous: Attempt | None) -> None:
        index = 0 if previous is None else previous.index + 1
        source = self.source_model_uri()
        job = self.ensure_job(children.attempt_job(self.m, index, source if isinstance(source, str) else None))
        self.status.attempts.append(Attempt(index=index, start_time=self.obs.now))
        self.memory.attempt, self.memory.last_step, self.memory.last_advance = index, None, None
        if isinstance(self.status, TrainingJobStatus) and self.status.progress is not None:
            self.status.progress.last_progress_time = None  # the new gang's stall clock starts when it runs
        if previous is None:
            self.phase("Pending", "Created", f"attempt 0: Job {job['metadata']['name']} created, waiting for pods")
        elif previous.reason == "Suspended":
            self.phase("Restarting", "Resumed", f"resumed as attempt {index} from the newest checkpoint")
        else:
            self.phase(
                "Restarting",
                previous.reason or "Restarted",
                f"attempt {index} replaces the gang after {previous.reason} (restart {self.status.restarts} of "
                f"{self.m.spec.run_policy.backoff_limit}); resuming from the newest checkpoint",
            )

    def end_attempt(
        self,
        attempt: Attempt,
        reason: str,
        *,
        retryable: bool,
        exit_code: int | None = None,
        pod: dict[str, Any] | None = None,
    ) -> None:
        attempt.end_time, attempt.reason = self.obs.now, reason
        attempt.retryable, attempt.exit_code = retryable, exit_code
        if pod is not None:
            attempt.failed_pod = pod["metadata"]["name"]
            attempt.failed_rank = classify.pod_rank(pod)
            attempt.node = (pod.get("spec") or {}).get("nodeName")
            if reason != "Completed":
                attempt.log_tail = self.kube.pod_log_tail(self.ns, attempt.failed_pod, self.options.log_lines)

    def supervise(self, current: Attempt) -> None:
        job = self.known_job(self.job_name(current.index))
        if job is None:  # an operator restart before the index filled, or a crash after recording it
            source = self.source_model_uri()
            job = self.ensure_job(
                children.attempt_job(self.m, current.index, source if isinstance(source, str) else None)
            )
        job_status = job.get("status") or {}
        conditions = classify.true_conditions(job_status)
        pods = self.attempt_pods(current.index)
        nodes = job["spec"].get("completions") or 1

        if "Complete" in conditions or (job_status.get("succeeded") or 0) >= nodes:
            self.end_attempt(current, "Completed", retryable=False, exit_code=0)
            self.copy_results(pods)
            self.scrape(pods, force=True)
            self.status.outputs = outputs_of(self.m)
            self.phase("Succeeded", "Completed", f"all {nodes} node(s) finished (attempt {current.index})")
            return
        found = classify.job_failure(pods, conditions)
        if found is not None:
            pod, failure = found
            self.fail_attempt(current, failure, pod)
            return

        running = sum(1 for p in pods if (p.get("status") or {}).get("phase") == "Running")
        if running >= nodes or (job_status.get("ready") or 0) >= nodes:
            if self.status.phase != "Running" and self.status.phase != "Stalled":
                self.phase("Running", "Running", f"attempt {current.index}: {nodes} node(s) running")
            if self.training:
                self.watch_progress(current, pods)

    def copy_results(self, pods: list[dict[str, Any]]) -> None:
        """A CompressionJob's results table from its pod's termination message into the status
        (on success and on a failed quality gate alike; absent or unreadable → left as it was)."""
        st = self.status
        if not isinstance(st, CompressionJobStatus):
            return
        for pod in pods:
            for container in (pod.get("status") or {}).get("containerStatuses") or []:
                ended = (container.get("state") or {}).get("terminated") or {}
                summary = read_termination_message(ended.get("message"))
                if summary is None:
                    continue
                try:
                    results = [CompressionResult.model_validate(row) for row in summary.get("results") or []]
                except ValueError:
                    continue
                st.results = results or st.results
                ratio, change = summary.get("compression_ratio"), summary.get("perplexity_change")
                if isinstance(ratio, int | float):
                    st.compression_ratio = round(float(ratio), 4)
                st.perplexity_change = change if isinstance(change, str) else st.perplexity_change
                dropped = (summary.get("truncated") or {}).get("results")
                if dropped:
                    self.warn(
                        "ResultsTruncated",
                        f"{dropped} middle row(s) of the results table did not fit the "
                        "pod's 4096-byte termination message; results.md has them all",
                    )
                return

    def fail_attempt(self, current: Attempt, failure: classify.Failure, pod: dict[str, Any] | None) -> None:
        rp = self.m.spec.run_policy
        self.end_attempt(current, failure.reason, retryable=failure.retryable, exit_code=failure.exit_code, pod=pod)
        self.copy_results(self.attempt_pods(current.index))
        self.stop_job(current.index)  # the peers of a failed rank would wait in collectives forever
        where = f" (pod {current.failed_pod}, rank {current.failed_rank})" if current.failed_pod else ""
        if not failure.retryable:
            message = f"{failure.message}{where}; not retried"
            self.phase("Failed", failure.reason, message)
            self.warn(failure.reason, message)
            return
        if self.status.restarts >= rp.backoff_limit:
            message = f"{failure.reason}: {failure.message}{where}; backoffLimit ({rp.backoff_limit}) restarts used"
            self.phase("Failed", "BackoffLimitExceeded", message)
            self.warn("BackoffLimitExceeded", message)
            return
        self.status.restarts += 1
        metrics.RESTARTS.inc()
        self.warn(failure.reason, f"attempt {current.index} failed: {failure.message}{where}; restarting the gang")
        if failure.reason == "Stalled":
            set_condition(self.status, "Stalled", True, "Stalled", failure.message, self.obs.now)
            self.phase("Stalled", "Stalled", f"{failure.message}; restarting the gang")
            return  # the next step starts the new attempt: Stalled stays visible for one step
        self.start_attempt(current)

    # progress and stalls -----------------------------------------------------------------------
    def scrape(self, pods: list[dict[str, Any]], force: bool = False) -> dict[str, float] | None:
        assert isinstance(self.m, TrainingJob | CompressionJob)
        last, clock = self.memory.last_scrape, time.monotonic()
        if not force and last is not None and clock - last < self.options.progress_interval:
            return None
        rank0 = next((p for p in pods if classify.pod_rank(p) == 0), None)
        if rank0 is None:
            return None
        port = self.m.spec.metrics.port
        if self.options.metrics_url is not None:
            url = self.options.metrics_url(rank0, port)
        else:
            ip = (rank0.get("status") or {}).get("podIP")
            if not ip:
                return None
            url = f"http://{ip}:{port}/metrics"
        self.memory.last_scrape = clock
        values = progress.scrape(url)
        if values:
            st = self.status
            assert isinstance(st, TrainingJobStatus)
            clock = st.progress.last_progress_time if st.progress else None
            st.progress = progress.to_progress(values, self.obs.now)
            st.progress.last_progress_time = clock
            if isinstance(self.m, TrainingJob):
                uri = self.m.spec.checkpoint.uri or f"{self.m.spec.output.uri.rstrip('/')}/checkpoints"
                st.last_checkpoint = progress.to_checkpoint(values, uri) or st.last_checkpoint
        return values

    def stall_clock(self, current: Attempt, clock: float) -> None:
        """Start the stall clock of ``current`` in memory: from status.progress.lastProgressTime when
        it belongs to this attempt (an operator restart goes on counting from the last advance, so
        a stalling gang is caught at its original deadline), else from now, written to the status."""
        mem, st = self.memory, self.status
        assert isinstance(st, TrainingJobStatus)
        mem.attempt, mem.last_step, mem.last_advance = current.index, None, clock
        seen = st.progress.last_progress_time if st.progress else None
        if seen is not None and current.start_time is not None and seen >= current.start_time:
            wall = datetime.datetime.now(datetime.UTC)
            mem.last_advance = clock - max(0.0, (wall - seen).total_seconds())
            mem.last_step = st.progress.step if st.progress else None
        else:
            self.mark_progress()

    def mark_progress(self) -> None:
        """Persist the stall clock: now, to the microsecond (status times are whole seconds)."""
        st = self.status
        assert isinstance(st, TrainingJobStatus)
        st.progress = st.progress or Progress()
        st.progress.last_progress_time = datetime.datetime.now(datetime.UTC)

    def watch_progress(self, current: Attempt, pods: list[dict[str, Any]]) -> None:
        mem, t, clock = self.memory, self.obs.now, time.monotonic()
        if mem.attempt != current.index or mem.last_advance is None:
            self.stall_clock(current, clock)
        assert mem.last_advance is not None
        values = self.scrape(pods)
        if values and "step" in values and int(values["step"]) != mem.last_step:
            mem.last_step, mem.last_advance = int(values["step"]), clock
            self.mark_progress()
            if self.status.phase == "Stalled" or any(
                c.type == "Stalled" and c.status == "True" for c in self.status.conditions
            ):
                set_condition(self.status, "Stalled", False, "Progressing", f"step {mem.last_step}", t)
            if self.status.phase != "Running":
                self.phase("Running", "Running", f"attempt {current.index} progressing")
        timeout = self.m.spec.run_policy.stall_timeout_seconds
        if timeout and clock - mem.last_advance >= timeout:
            step = "no step reported" if mem.last_step is None else f"step {mem.last_step}"
            failure = classify.Failure("Stalled", True, None, f"no step progress for {timeout}s ({step})")
            self.fail_attempt(current, failure, None)


def reconcile(kube: Kube, observed: Observed, memory: JobMemory, options: Options) -> tuple[dict[str, Any], bool]:
    """Run one step: the full new status (as written to the API) and whether to delete the job (TTL)."""
    step = Step(kube, observed, memory, options)
    status = step.run()
    return status.to_manifest(), step.delete_owner
