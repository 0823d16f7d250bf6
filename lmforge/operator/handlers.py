"""Kopf handlers: one supervisor daemon per job, a spec-change wake-up, two indices.

* ``supervise_*`` is a daemon per job. It admits each spec it sees (:mod:`admission`: validation,
  InvalidSpec, the static children) and runs :func:`lmforge.operator.reconcile.reconcile` every
  poll interval against Kopf's in-memory indices of the attempt Jobs and their pods. The indices
  are fed by watch streams, so supervising a thousand jobs costs no API reads; the API is written
  only when something changes, and admission and the first step go out as one status patch.
* ``wake_on_spec_change`` wakes a supervisor as soon as its job's spec changes (suspend acts at
  once, not at the next poll).

The daemon is the only writer of the status, which avoids races between handlers. There are no
create/update/resume handlers on purpose: they would make Kopf write a diff-base annotation to
every job (one more PATCH each), and the daemon already sees every spec (see :mod:`admission`).
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import kopf

from lmforge import API_GROUP, API_GROUP_VERSION, API_VERSION
from lmforge.operator import admission, children, metrics
from lmforge.operator import settings as _settings  # noqa: F401 - registers the startup and login handlers
from lmforge.operator.admission import admit, validate
from lmforge.operator.context import JobMemory, Manifest, Observed, Options
from lmforge.operator.kube import ApiError
from lmforge.operator.reconcile import reconcile
from lmforge.operator.status import load_status, now, set_condition, status_patch

KINDS = {"trainingjobs": "TrainingJob", "compressionjobs": "CompressionJob"}
_KIND_LABELS = {"TrainingJob": "training", "CompressionJob": "compression"}


# Indices ---------------------------------------------------------------------------------------
def _key(namespace: str | None, labels: Any) -> tuple[str | None, str, str]:
    return (namespace, labels.get(children.LABEL_KIND, ""), labels.get(children.LABEL_JOB, ""))


def _owner_fields(meta: Any) -> dict[str, Any]:
    """uid and owner references: the supervisor uses only children its job controls (see ownership)."""
    return {"uid": meta.get("uid"), "ownerReferences": copy.deepcopy(list(meta.get("ownerReferences") or []))}


@kopf.index("batch", "v1", "jobs", labels={children.LABEL_JOB: kopf.PRESENT})
def lmforge_jobs(namespace: str, name: str, labels: Any, meta: Any, spec: Any, status: Any, **_: Any) -> dict[Any, Any]:
    """Attempt Jobs by owning lmforge job: what the supervisor reads instead of the API."""
    return {
        _key(namespace, labels): {
            "metadata": {"name": name, "namespace": namespace, "labels": dict(labels), **_owner_fields(meta)},
            "spec": {"completions": spec.get("completions")},
            "status": copy.deepcopy(dict(status)),
        }
    }


@kopf.index("v1", "pods", labels={children.LABEL_JOB: kopf.PRESENT})
def lmforge_pods(
    namespace: str, name: str, labels: Any, annotations: Any, meta: Any, spec: Any, status: Any, **_: Any
) -> dict[Any, Any]:
    """Pods by owning lmforge job: phases, exit codes, nodes and IPs for classification and progress."""
    return {
        _key(namespace, labels): {
            "metadata": {
                "name": name,
                "namespace": namespace,
                "labels": dict(labels),
                "annotations": dict(annotations),
                **_owner_fields(meta),
            },
            "spec": {"nodeName": spec.get("nodeName")},
            "status": copy.deepcopy(dict(status)),
        }
    }


# Supervision -----------------------------------------------------------------------------------
def _version(body: dict[str, Any] | None) -> int:
    value = str(((body or {}).get("metadata") or {}).get("resourceVersion") or "")
    return int(value) if value.isdigit() else -1


@dataclass
class Waker:
    """Lets a spec change wake a job's supervisor at once instead of at its next poll."""

    event: asyncio.Event = field(default_factory=asyncio.Event)
    generation: int | None = None
    """metadata.generation of the spec the supervisor last looked at."""


@kopf.on.event(API_GROUP, API_VERSION, "trainingjobs")
@kopf.on.event(API_GROUP, API_VERSION, "compressionjobs")
async def wake_on_spec_change(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """A watch event whose generation the supervisor has not seen (a spec change: suspend, a fixed
    spec, ...) wakes it now. Status writes keep the generation, so they wake nothing.

    An event handler, not ``on.update``/``on.field``: those make Kopf keep a diff-base annotation,
    one more PATCH per job and per change, and the supervisor does its own diffing anyway.
    """
    waker = memo.wakers.get(body.get("metadata", {}).get("uid"))
    if waker is not None and body.get("metadata", {}).get("generation") != waker.generation:
        waker.event.set()


async def _sleep(stopped: kopf.DaemonStopped, wake: asyncio.Event, seconds: float) -> None:
    """Until the poll interval passes, the daemon is stopped, or a spec change wakes it."""
    if wake.is_set():
        return
    waits = {asyncio.ensure_future(stopped.wait(seconds)), asyncio.ensure_future(wake.wait())}
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiting in waits:
            waiting.cancel()


async def supervise(
    stopped: kopf.DaemonStopped,
    body: kopf.Body,
    memo: kopf.Memo,
    logger: logging.Logger,
    jobs_index: kopf.Index,
    pods_index: kopf.Index,
) -> None:
    kind = body["kind"]
    ns, name, uid = body["metadata"].get("namespace"), body["metadata"]["name"], body["metadata"].get("uid")
    key = (ns, _KIND_LABELS[kind], name)
    config, kube = memo.config, memo.kube
    options = Options(
        progress_interval=config.progress_interval, log_lines=config.log_lines, metrics_url=config.metrics_url
    )
    memory = JobMemory()
    waker = memo.wakers[uid] = Waker()
    latest: dict[str, Any] | None = None  # our own last write: the watch may not have shown it yet
    admitted: tuple[str, Manifest | None] = ("", None)  # the spec admitted and its validated manifest
    seen: tuple[int, dict[str, Any], str] | None = None  # (resourceVersion, copy of the body, spec key)
    try:
        while not stopped:
            waker.event.clear()
            # Copy (and key the spec of) the live body only when it changed: most steps of most
            # jobs see the same version, and the copy is most of an idle step's cost.
            version = _version(body)
            if seen is None or seen[0] != version:
                copied = admission.snapshot(body)  # bounded: a spec nested too deep is not copied
                seen = (version, copied, admission.spec_key(copied.get("spec")))
            snapshot, spec_key = dict(seen[1]), seen[2]  # shallow: admission replaces "status" only
            if latest is not None and _version(latest) > version:
                snapshot, spec_key = dict(latest), admission.spec_key(latest.get("spec"))
            if snapshot.get("metadata", {}).get("deletionTimestamp"):
                break
            waker.generation = snapshot.get("metadata", {}).get("generation")
            written = snapshot.get("status")
            admitting = spec_key != admitted[0]
            started = time.perf_counter()
            try:
                if admitting:
                    manifest, problems = validate(snapshot)
                    if manifest is not None:
                        manifest = children.with_defaults(manifest, config.trainer)
                    snapshot["status"] = await asyncio.to_thread(
                        admit, kube, snapshot, manifest, problems, config.trainer
                    )
                else:
                    manifest = admitted[1]
                delete = False
                status = snapshot.get("status") or {}
                if manifest is not None:
                    jobs = {j["metadata"]["name"]: j for j in jobs_index.get(key, [])}
                    pods = list(pods_index.get(key, []))
                    observed = Observed(manifest=manifest, body=snapshot, jobs=jobs, pods=pods, now=now())
                    status, delete = await asyncio.to_thread(reconcile, kube, observed, memory, options)
            except Exception as exc:  # noqa: BLE001 - recorded as a condition, retried next step
                logger.exception("reconciliation failed")
                failed = load_status(kind, snapshot)
                set_condition(failed, "Reconciled", False, type(exc).__name__, str(exc)[:1000])
                status, delete, admitting, manifest = failed.to_manifest(), False, False, admitted[1]
            metrics.RECONCILE.observe(time.perf_counter() - started)
            diff = status_patch(written, status)
            try:
                if diff:
                    latest = await asyncio.to_thread(
                        kube.patch, API_GROUP_VERSION, kind, ns, name, {"status": diff}, "status"
                    )
                if admitting:  # admitted only once its verdict is written: else admit again
                    admitted = (spec_key, manifest)
                if delete:
                    logger.info("ttlSecondsAfterFinished passed: deleting")
                    await asyncio.to_thread(kube.delete, API_GROUP_VERSION, kind, ns, name)
                    break
            except ApiError as exc:
                if exc.status == 404:
                    break
                logger.warning("status update failed: %s", exc)
            metrics.observe_phase(kind, ns or "", name, status.get("phase"))
            await _sleep(stopped, waker.event, config.poll_interval)
    finally:
        if memo.wakers.get(uid) is waker:
            del memo.wakers[uid]
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
    return metrics.tracked_jobs()
