"""The operator's own Prometheus metrics, on their own port and in their own registry.

A private registry keeps these apart from the trainer's metrics when both live in one process
(tests), and lets the operator serve exactly its own series.
"""

from __future__ import annotations

import threading
from collections import Counter as _Counter

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

REGISTRY = CollectorRegistry(auto_describe=True)
PHASES = ("Pending", "Preparing", "Running", "Restarting", "Suspended", "Stalled", "Succeeded", "Failed")

JOBS_CREATED = Counter(
    "lmforge_operator_jobs_created_total", "TrainingJobs and CompressionJobs seen created.", ["kind"], registry=REGISTRY
)
JOBS_SUCCEEDED = Counter("lmforge_operator_jobs_succeeded_total", "Jobs that succeeded.", registry=REGISTRY)
JOBS_FAILED = Counter(
    "lmforge_operator_jobs_failed_total", "Jobs that failed, by reason.", ["reason"], registry=REGISTRY
)
RESTARTS = Counter(
    "lmforge_operator_restarts_total", "Gang restarts (new attempts after a failure).", registry=REGISTRY
)
RECONCILE = Histogram(
    "lmforge_operator_reconcile_duration_seconds",
    "Duration of one reconciliation of one job.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)
JOBS = Gauge("lmforge_operator_jobs", "Jobs by phase.", ["phase"], registry=REGISTRY)

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


def serve(port: int, addr: str = "0.0.0.0") -> None:
    """Serve /metrics on ``addr:port`` from a daemon thread (port 0 disables)."""
    if port:
        start_http_server(port, addr=addr, registry=REGISTRY)
