"""Why a pod ended, and whether a gang restart can help.

The trainer's contract (:mod:`lmforge.exitcodes`): 78 means the manifest is wrong for this run,
so retrying the same spec cannot succeed — fatal; so is 3, a failed quality gate (the same job
would fail it again). Everything else that is not a clean exit is
worth a restart from the newest checkpoint: the trainer's retryable code 75, SIGTERM after a
checkpoint (143), other signals (128+n, e.g. 137 for SIGKILL/OOM), eviction, node loss, and
unexpected non-zero codes (a crash is more often transient than not, and backoffLimit bounds it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lmforge import exitcodes

_NODE_LOSS_REASONS = {"NodeLost", "Shutdown", "Terminated", "NodeShutdown", "UnexpectedAdmissionError"}


@dataclass(frozen=True)
class Failure:
    """The classified end of one pod."""

    reason: str
    """CamelCase: Completed, InvalidSpec, Retryable, Error, OOMKilled, Signal, Evicted, NodeLost, ..."""
    retryable: bool
    exit_code: int | None
    message: str


def classify_exit_code(code: int, container_reason: str | None = None) -> Failure:
    """Classify a container's exit code (and the kubelet's reason for it, e.g. OOMKilled)."""
    if code == exitcodes.OK:
        return Failure("Completed", False, code, "exited 0")
    if code == exitcodes.INVALID_SPEC:
        return Failure("InvalidSpec", False, code, "the trainer rejected the spec (exit 78); fix the manifest")
    if code == exitcodes.QUALITY_GATE:
        return Failure(
            "QualityGate", False, code, "the quality gate failed (exit 3): the results are written; not retried"
        )
    if container_reason == "OOMKilled":
        return Failure("OOMKilled", True, code, "killed for exceeding its memory limit; raise resources.memory")
    if code == exitcodes.RETRYABLE:
        return Failure("Retryable", True, code, "the trainer reported a retryable fault (exit 75)")
    if code > 128:
        signal = code - 128
        reason = "Preempted" if signal == 15 else "Signal"
        return Failure(reason, True, code, f"terminated by signal {signal} (exit {code})")
    return Failure("Error", True, code, f"exited with code {code}")


def _terminated(pod: dict[str, Any]) -> dict[str, Any] | None:
    for status in pod.get("status", {}).get("containerStatuses") or []:
        state = status.get("state") or {}
        if "terminated" in state:
            return state["terminated"]
        last = (status.get("lastState") or {}).get("terminated")
        if last:
            return last
    return None


def classify_pod(pod: dict[str, Any]) -> Failure | None:
    """The failure of a pod, or None while it has not failed (running, pending, succeeded)."""
    status = pod.get("status", {})
    pod_reason = status.get("reason")
    if pod_reason == "Evicted":
        return Failure("Evicted", True, None, status.get("message") or "the pod was evicted")
    if pod_reason in _NODE_LOSS_REASONS:
        return Failure("NodeLost", True, None, status.get("message") or f"the node went away ({pod_reason})")
    for cond in status.get("conditions") or []:
        if cond.get("type") == "DisruptionTarget" and cond.get("status") == "True":
            return Failure("NodeLost", True, None, cond.get("message") or "the pod was disrupted")
    terminated = _terminated(pod)
    if terminated is not None and terminated.get("exitCode", 0) != 0:
        return classify_exit_code(int(terminated["exitCode"]), terminated.get("reason"))
    if status.get("phase") == "Failed":
        return Failure("Error", True, None, status.get("message") or "the pod failed")
    return None


def pod_rank(pod: dict[str, Any]) -> int | None:
    meta = pod.get("metadata", {})
    for source in (meta.get("labels") or {}, meta.get("annotations") or {}):
        value = source.get("batch.kubernetes.io/job-completion-index")
        if value is not None and str(value).isdigit():
            return int(value)
    return None


def first_failed_pod(pods: list[dict[str, Any]]) -> tuple[dict[str, Any], Failure] | None:
    """The failure that ended the gang: fatal ones first (they decide), then the earliest.

    When one rank dies, its peers fail soon after (lost collective): the first one is the cause.
    """
    failed = [(pod, failure) for pod in pods if (failure := classify_pod(pod)) is not None]
    if not failed:
        return None

    def order(item: tuple[dict[str, Any], Failure]) -> tuple[int, str, int]:
        pod, failure = item
        finished = (_terminated(pod) or {}).get("finishedAt") or "~"
        return (0 if not failure.retryable else 1, finished, pod_rank(pod) or 0)

    return sorted(failed, key=order)[0]


def true_conditions(job_status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A batch Job's conditions that hold (status "True"), by type."""
    return {c.get("type"): c for c in job_status.get("conditions") or [] if c.get("status") == "True"}


def job_failure(
    pods: list[dict[str, Any]], conditions: dict[str, dict[str, Any]]
) -> tuple[dict[str, Any] | None, Failure] | None:
    """Why a Job failed: its first failed pod, else its Failed condition (pods may be gone); None if it has not."""
    found = first_failed_pod(pods)
    if found is not None:
        return found
    if "Failed" not in conditions:
        return None
    cond = conditions["Failed"]
    return None, Failure(cond.get("reason") or "JobFailed", True, None, cond.get("message") or "the Job failed")
