"""The operator's own Prometheus metrics, on their own port and in their own registry.

A private registry keeps these apart from the trainer's metrics when both live in one process
(tests), and lets the operator serve exactly its own series.
"""

from __future__ import annotations

import threading
from collections import Counter as _Counter

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from lmforge import contract

REGISTRY = CollectorRegistry(auto_describe=True)
PHASES = ("Pending", "Preparing", "Running", "Restarting", "Suspended", "Stalled", "Succeeded", "Failed")

_created, _succeeded, _failed, _restarts = (
    contract.OPERATOR_JOBS_CREATED,
    contract.OPERATOR_JOBS_SUCCEEDED,
    contract.OPERATOR_JOBS_FAILED,
    contract.OPERATOR_RESTARTS,
)
JOBS_CREATED = Counter(_created.name, _created.help, ["kind"], registry=REGISTRY)
JOBS_SUCCEEDED = Counter(_succeeded.name, _succeeded.help, registry=REGISTRY)
JOBS_FAILED = Counter(_failed.name, _failed.help, ["reason"], registry=REGISTRY)
RESTARTS = Counter(_restarts.name, _restarts.help, registry=REGISTRY)
RECONCILE = Histogram(
    contract.OPERATOR_RECONCILE_DURATION.name,
    contract.OPERATOR_RECONCILE_DURATION.help,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)
JOBS = Gauge(contract.OPERATOR_JOBS.name, contract.OPERATOR_JOBS.help, ["phase"], registry=REGISTRY)

_phases: dict[tuple[str, str, str], str] = {}
_lock = threading.Lock()


def observe_phase(kind: str, namespace: str, name: str, phase: str | None) -> None:
    """Record the phase of one job (None when it is gone) and refresh the per-phase gauge."""
    with _lock:
        key = (kind, namespace, name)
        if _phases.get(key) == phase:  # every supervision step reports: recount only on a change
            return
        if phase is None:
            _phases.pop(key, None)
        else:
            _phases[key] = phase
        counts = _Counter(_phases.values())
        for each in set(PHASES) | set(counts):
            JOBS.labels(phase=each).set(counts.get(each, 0))


def tracked_jobs() -> int:
    """How many jobs have a phase recorded here (:func:`observe_phase`): the jobs this operator tracks."""
    with _lock:
        return len(_phases)


def serve(port: int, addr: str = "0.0.0.0") -> None:
    """Serve /metrics on ``addr:port`` from a daemon thread (port 0 disables)."""
    if port:
        start_http_server(port, addr=addr, registry=REGISTRY)
