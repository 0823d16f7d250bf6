"""Admission of a job's current spec: validate it, make the static children, record the verdict.

Admission runs inside the job's supervisor daemon (:mod:`lmforge.operator.handlers`), once per
spec it sees, not in Kopf create/update/resume handlers. That is deliberate: change-detecting
handlers make Kopf write a diff-base annotation (one more PATCH of every job, and more work per
event), while the daemon already holds the spec and is the only writer of the status, so its
verdict goes out in the same status patch as the first reconciliation step.

* Invalid spec → phase Failed, condition ``InvalidSpec`` whose message lists every field error, a
  Warning event (once per distinct message: an operator restart does not repeat it), nothing
  created.
* Valid spec → ConfigMap (kept equal to the spec), headless Service and PodGroup, adopted so they
  go with the job; a job that had failed only because of its spec goes back to Pending.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import kopf

from lmforge import API_GROUP_VERSION
from lmforge.api.errors import Problem
from lmforge.api.loading import validate_document
from lmforge.operator import children, metrics
from lmforge.operator.children import Manifest
from lmforge.operator.kube import Kube
from lmforge.operator.status import get_condition, load_status, set_condition, set_phase

log = logging.getLogger(__name__)


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


def ensure_static_children(
    kube: Kube, manifest: Manifest, owner: Any, defaults: children.TrainerDefaults | None = None
) -> None:
    """ConfigMap (kept equal to the spec), headless Service, NetworkPolicy and PodGroup; existing ones are reused."""
    namespace = manifest.metadata.namespace or "default"
    for obj in children.static_children(manifest, defaults):
        kopf.adopt(obj, owner=owner)
        current, created = kube.ensure(obj, namespace)
        if not created and obj["kind"] == "ConfigMap" and current.get("data") != obj["data"]:
            kube.patch("v1", "ConfigMap", namespace, obj["metadata"]["name"], {"data": obj["data"]})


def admit(
    kube: Kube,
    body: dict[str, Any],
    manifest: Manifest | None,
    problems: list[Problem],
    defaults: children.TrainerDefaults | None = None,
) -> dict[str, Any]:
    """Admit the spec in ``body``; returns the status to continue from (not yet written).

    Blocking (API calls): the supervisor runs it in a worker thread.
    """
    kind = body["kind"]
    status = load_status(kind, body)
    if status.start_time is None and not status.conditions:  # never admitted before: a new job
        metrics.JOBS_CREATED.labels(kind=kind).inc()
    status.observed_generation = (body.get("metadata") or {}).get("generation")
    if manifest is None:
        message = describe_problems(problems)
        seen = get_condition(status, "InvalidSpec")
        repeated = seen is not None and seen.status == "True" and seen.message == message
        set_condition(status, "InvalidSpec", True, "InvalidSpec", message)
        if status.phase != "Failed":
            metrics.JOBS_FAILED.labels(reason="InvalidSpec").inc()
        set_phase(status, "Failed", "InvalidSpec", f"invalid spec: {message}")
        if not repeated:
            try:
                kopf.warn(body, reason="InvalidSpec", message=message)
            except LookupError:  # outside Kopf: no event queue
                pass
            log.warning("%s %s: invalid spec: %s", kind, body["metadata"].get("name"), message)
        return status.to_manifest()
    ensure_static_children(kube, manifest, body, defaults)
    cond = get_condition(status, "InvalidSpec")
    if cond is not None and cond.status == "True":
        set_condition(status, "InvalidSpec", False, "Valid", "the spec is valid")
        if status.phase == "Failed":  # failed only because of the spec: run the fixed one
            status.phase, status.completion_time = "Pending", None
            set_condition(status, "Failed", False, "SpecFixed", "the spec was fixed")
            status.message = "spec fixed; starting a new attempt"
    return status.to_manifest()
