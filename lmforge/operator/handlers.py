"""Kopf handlers: admission of new or changed jobs, one supervisor daemon per job, two indices.

* ``admit_*`` (create/resume/spec update) validates with the api models. Invalid → phase Failed,
  condition InvalidSpec listing every field error, a Warning event, nothing created. Valid → the
  static children (ConfigMap, headless Service, PodGroup), adopted so they go with the job.
* ``supervise_*`` is a daemon per job that runs :func:`lmforge.operator.reconcile.reconcile`
  every poll interval against Kopf's in-memory indices of the attempt Jobs and their pods. The
  indices are fed by watch streams, so supervising a thousand jobs costs no API reads; the API
  is written only when something changes.

The daemon is the only writer of the lifecycle status, which avoids races between handlers.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import time
from typing import Any

import kopf

from lmforge import API_GROUP, API_GROUP_VERSION, API_VERSION
from lmforge.api.errors import Problem
from lmforge.api.loading import validate_document
from lmforge.operator import children, metrics
from lmforge.operator import settings as _settings  # noqa: F401 - registers the startup and login handlers
from lmforge.operator.kube import ApiError, Kube
from lmforge.operator.reconcile import JobMemory, Manifest, Observed, Options, load_status, reconcile
from lmforge.operator.status import now, set_condition, set_phase, status_patch

KINDS = {"trainingjobs": "TrainingJob", "compressionjobs": "CompressionJob"}
_KIND_LABELS = {"TrainingJob": "training", "CompressionJob": "compression"}


# Validation ------------------------------------------------------------------------------------
def validate(body: Any) -> tuple[Manifest | None, list[Problem]]:
    """The api models' verdict on the object as stored (status and server metadata left out)."""
    meta = body.get("metadata", {})
    doc = {
        "apiVersion": body.get("apiVersion", API_GROUP_VERSION),
        "kind": body.get("kind"),
        "metadata": {"name": meta.get("name"), "namespace": meta.get("namespace")},
        "spec": copy.deepcopy(dict(body.get("spec") or {})),
    }
    source = f"{body.get('kind')} {meta.get('namespace')}/{meta.get('name')}"
    return validate_document(doc, source, None)  # type: ignore[return-value]


def describe_problems(problems: list[Problem]) -> str:
    return "; ".join(f"{p.path}: {p.message}" if p.path else p.message for p in problems)


# Indices ---------------------------------------------------------------------------------------
def _key(namespace: str | None, labels: Any) -> tuple[str | None, str, str]:
    return (namespace, labels.get(children.LABEL_KIND, ""), labels.get(children.LABEL_JOB, ""))


@kopf.index("batch", "v1", "jobs", labels={children.LABEL_JOB: kopf.PRESENT})
def lmforge_jobs(namespace: str, name: str, labels: Any, spec: Any, status: Any, **_: Any) -> dict[Any, Any]:
    """Attempt Jobs by owning lmforge job: what the supervisor reads instead of the API."""
    return {
        _key(namespace, labels): {
            "metadata": {"name": name, "namespace": namespace, "labels": dict(labels)},
            "spec": {"completions": spec.get("completions")},
            "status": copy.deepcopy(dict(status)),
        }
    }


@kopf.index("v1", "pods", labels={children.LABEL_JOB: kopf.PRESENT})
def lmforge_pods(
    namespace: str, name: str, labels: Any, annotations: Any, spec: Any, status: Any, **_: Any
) -> dict[Any, Any]:
    """Pods by owning lmforge job: phases, exit codes, nodes and IPs for classification and progress."""
    return {
        _key(namespace, labels): {
            "metadata": {
                "name": name,
                "namespace": namespace,
                "labels": dict(labels),
                "annotations": dict(annotations),
            },
            "spec": {"nodeName": spec.get("nodeName")},
            "status": copy.deepcopy(dict(status)),
        }
    }


# Admission -------------------------------------------------------------------------------------
def admit(body: Any, patch: kopf.Patch, memo: kopf.Memo, reason: str, logger: logging.Logger) -> None:
    kind = body["kind"]
    meta = body["metadata"]
    if reason == "create":
        metrics.JOBS_CREATED.labels(kind=kind).inc()
    manifest, problems = validate(body)
    status = load_status_any(kind, body)
    old = status.to_manifest()
    if manifest is None:
        message = describe_problems(problems)
        set_condition(status, "InvalidSpec", True, "InvalidSpec", message)
        if status.phase != "Failed":
            metrics.JOBS_FAILED.labels(reason="InvalidSpec").inc()
        set_phase(status, "Failed", "InvalidSpec", f"invalid spec: {message}")
        kopf.warn(body, reason="InvalidSpec", message=message)
        logger.warning("invalid spec: %s", message)
    else:
        ensure_static_children(memo.kube, manifest, body)
        if any(c.type == "InvalidSpec" and c.status == "True" for c in status.conditions):
            set_condition(status, "InvalidSpec", False, "Valid", "the spec is valid")
            if status.phase == "Failed":  # failed only because of the spec: run the fixed one
                status.phase, status.completion_time = "Pending", None
                set_condition(status, "Failed", False, "SpecFixed", "the spec was fixed")
                status.message = "spec fixed; starting a new attempt"
    diff = status_patch(old, status.to_manifest())
    if diff:
        patch.status.update(diff)
    metrics.observe_phase(kind, meta.get("namespace", ""), meta["name"], status.phase)


def load_status_any(kind: str, body: Any) -> Any:
    from lmforge.api.status import CompressionJobStatus, TrainingJobStatus

    model = TrainingJobStatus if kind == "TrainingJob" else CompressionJobStatus
    try:
        return model.model_validate(dict(body.get("status") or {}))
    except ValueError:
        return model()


def ensure_static_children(kube: Kube, manifest: Manifest, owner: Any) -> None:
    """ConfigMap (kept equal to the spec), headless Service and PodGroup; existing ones are reused."""
    namespace = manifest.metadata.namespace or "default"
    for obj in children.static_children(manifest):
        kopf.adopt(obj, owner=owner)
        current, created = kube.ensure(obj, namespace)
        if not created and obj["kind"] == "ConfigMap" and current.get("data") != obj["data"]:
            kube.patch("v1", "ConfigMap", namespace, obj["metadata"]["name"], {"data": obj["data"]})


@kopf.on.resume(API_GROUP, API_VERSION, "trainingjobs")
@kopf.on.create(API_GROUP, API_VERSION, "trainingjobs")
@kopf.on.update(API_GROUP, API_VERSION, "trainingjobs", field="spec")
def admit_training(
    body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, reason: str, logger: logging.Logger, **_: Any
) -> None:
    admit(body, patch, memo, str(reason), logger)


@kopf.on.resume(API_GROUP, API_VERSION, "compressionjobs")
@kopf.on.create(API_GROUP, API_VERSION, "compressionjobs")
@kopf.on.update(API_GROUP, API_VERSION, "compressionjobs", field="spec")
def admit_compression(
    body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, reason: str, logger: logging.Logger, **_: Any
) -> None:
    admit(body, patch, memo, str(reason), logger)


# Supervision -----------------------------------------------------------------------------------
def _version(body: dict[str, Any] | None) -> int:
    value = str(((body or {}).get("metadata") or {}).get("resourceVersion") or "")
    return int(value) if value.isdigit() else -1


async def supervise(
    stopped: kopf.DaemonStopped,
    body: kopf.Body,
    memo: kopf.Memo,
    logger: logging.Logger,
    jobs_index: kopf.Index,
    pods_index: kopf.Index,
) -> None:
    kind = body["kind"]
    ns, name = body["metadata"].get("namespace"), body["metadata"]["name"]
    key = (ns, _KIND_LABELS[kind], name)
    config, kube = memo.config, memo.kube
    options = Options(
        progress_interval=config.progress_interval, log_lines=config.log_lines, metrics_url=config.metrics_url
    )
    memory = JobMemory()
    latest: dict[str, Any] | None = None  # our own last write: the watch may not have shown it yet
    cached: tuple[str, Manifest | None] = ("", None)
    while not stopped:
        snapshot = copy.deepcopy(dict(body))
        if latest is not None and _version(latest) > _version(snapshot):
            snapshot = latest
        if snapshot.get("metadata", {}).get("deletionTimestamp"):
            break
        spec_key = json.dumps(snapshot.get("spec"), sort_keys=True)
        if spec_key != cached[0]:
            cached = (spec_key, validate(snapshot)[0])
        manifest = cached[1]
        if manifest is not None:
            jobs = {j["metadata"]["name"]: j for j in jobs_index.get(key, [])}
            pods = list(pods_index.get(key, []))
            observed = Observed(manifest=manifest, body=snapshot, jobs=jobs, pods=pods, now=now())
            started = time.perf_counter()
            try:
                status, delete = await asyncio.to_thread(reconcile, kube, observed, memory, options)
            except Exception as exc:  # noqa: BLE001 - recorded as a condition, retried next step
                logger.exception("reconciliation failed")
                failed = load_status(manifest, snapshot)
                set_condition(failed, "Reconciled", False, type(exc).__name__, str(exc)[:1000])
                status, delete = failed.to_manifest(), False
            metrics.RECONCILE.observe(time.perf_counter() - started)
            diff = status_patch(snapshot.get("status"), status)
            try:
                if diff:
                    latest = await asyncio.to_thread(
                        kube.patch, API_GROUP_VERSION, kind, ns, name, {"status": diff}, "status"
                    )
                if delete:
                    logger.info("ttlSecondsAfterFinished passed: deleting")
                    await asyncio.to_thread(kube.delete, API_GROUP_VERSION, kind, ns, name)
                    break
            except ApiError as exc:
                if exc.status == 404:
                    break
                logger.warning("status update failed: %s", exc)
            metrics.observe_phase(kind, ns or "", name, status.get("phase"))
        await stopped.wait(config.poll_interval)
    metrics.observe_phase(kind, ns or "", name, None)


@kopf.daemon(API_GROUP, API_VERSION, "trainingjobs", cancellation_timeout=30)
async def supervise_training(
    stopped: kopf.DaemonStopped,
    body: kopf.Body,
    memo: kopf.Memo,
    logger: logging.Logger,
    lmforge_jobs: kopf.Index,
    lmforge_pods: kopf.Index,
    **_: Any,
) -> None:
    await supervise(stopped, body, memo, logger, lmforge_jobs, lmforge_pods)


@kopf.daemon(API_GROUP, API_VERSION, "compressionjobs", cancellation_timeout=30)
async def supervise_compression(
    stopped: kopf.DaemonStopped,
    body: kopf.Body,
    memo: kopf.Memo,
    logger: logging.Logger,
    lmforge_jobs: kopf.Index,
    lmforge_pods: kopf.Index,
    **_: Any,
) -> None:
    await supervise(stopped, body, memo, logger, lmforge_jobs, lmforge_pods)


@kopf.on.probe(id="jobs")
def probe_jobs(**_: Any) -> int:
    """Liveness payload: how many jobs this operator tracks."""
    return len(metrics._phases)
