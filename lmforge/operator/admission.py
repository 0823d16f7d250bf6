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
* A spec beyond the bounds of :mod:`lmforge.api.bounds` (nested too deep, a huge string in a
  preserve-unknown field such as ``spec.training.optimizer.lr``) is an invalid spec like any
  other, found before anything copies, dumps or validates it recursively (:func:`snapshot`,
  :func:`spec_key`, :func:`validate`).
* A static child's name taken by an object the job does not own → Failed, reason NameConflict
  (:mod:`lmforge.operator.ownership`); the object is left untouched.
"""

from __future__ import annotations

import copy
import json
import logging
from typing import Any

import kopf

from lmforge import API_GROUP_VERSION
from lmforge.api.bounds import cut_message, spec_problems
from lmforge.api.errors import Problem
from lmforge.api.loading import validate_document
from lmforge.operator import children, metrics
from lmforge.operator.children import Manifest
from lmforge.operator.kube import Kube
from lmforge.operator.ownership import NAME_CONFLICT, ForeignObject
from lmforge.operator.status import get_condition, load_status, set_condition, set_phase

log = logging.getLogger(__name__)


def _source(body: Any) -> str:
    meta = body.get("metadata") or {}
    return f"{body.get('kind')} {meta.get('namespace')}/{meta.get('name')}"


def snapshot(body: Any) -> dict[str, Any]:
    """A private copy of a job's body for one step; a spec beyond the bounds is shared, not copied
    (the operator never changes a spec, and copying one nested thousands of levels deep is what
    fails)."""
    spec = body.get("spec")
    if spec_problems(spec, _source(body)):
        copied = copy.deepcopy({key: value for key, value in dict(body).items() if key != "spec"})
        copied["spec"] = spec
        return copied
    return copy.deepcopy(dict(body))


def spec_key(spec: Any) -> str:
    """What tells one spec from another (the supervisor admits each new one); a spec beyond the
    bounds is keyed by its problems instead of a dump of all of it."""
    problems = spec_problems(spec, "")
    if problems:
        return "out of bounds: " + describe_problems(problems)
    return json.dumps(spec, sort_keys=True)


def validate(body: Any) -> tuple[Manifest | None, list[Problem]]:
    """The api models' verdict on the object as stored (status and server metadata left out);
    a spec beyond the bounds gets only its bound problems (the models never see it)."""
    meta = body.get("metadata", {})
    bounded = spec_problems(body.get("spec"), _source(body))
    if bounded:
        return None, bounded
    doc = {
        "apiVersion": body.get("apiVersion", API_GROUP_VERSION),
        "kind": body.get("kind"),
        "metadata": {"name": meta.get("name"), "namespace": meta.get("namespace")},
        "spec": copy.deepcopy(dict(body.get("spec") or {})),
    }
    return validate_document(doc, _source(body), None)  # type: ignore[return-value]


def describe_problems(problems: list[Problem]) -> str:
    return "; ".join(f"{p.path}: {p.message}" if p.path else p.message for p in problems)


def ensure_static_children(
    kube: Kube, manifest: Manifest, owner: Any, defaults: children.TrainerDefaults | None = None
) -> None:
    """ConfigMap (kept equal to the spec), headless Service, NetworkPolicy and PodGroup; existing ones
    are reused when the job owns them (ForeignObject otherwise), and only the one checked is patched (its uid)."""
    namespace = manifest.metadata.namespace or "default"
    for obj in children.static_children(manifest, defaults):
        kopf.adopt(obj, owner=owner)
        current, created = kube.ensure(obj, namespace, owner)
        if not created and obj["kind"] == "ConfigMap" and current.get("data") != obj["data"]:
            uid = (current.get("metadata") or {}).get("uid")
            kube.patch("v1", "ConfigMap", namespace, obj["metadata"]["name"], {"data": obj["data"]}, uid=uid)


def refuse_foreign(kind: str, body: dict[str, Any], status: Any, conflict: ForeignObject) -> dict[str, Any]:
    """Failed, reason NameConflict, with a Warning event naming the object in the way (see
    :meth:`lmforge.operator.context.StepContext.refuse_foreign` for why Failed, not Pending)."""
    seen = get_condition(status, NAME_CONFLICT)
    repeated = seen is not None and seen.status == "True" and seen.message == conflict.message
    set_condition(status, NAME_CONFLICT, True, NAME_CONFLICT, conflict.message)
    if status.phase != "Failed":
        metrics.JOBS_FAILED.labels(reason=NAME_CONFLICT).inc()
    set_phase(status, "Failed", NAME_CONFLICT, conflict.message)
    if not repeated:
        try:
            kopf.warn(body, reason=NAME_CONFLICT, message=conflict.message)
        except LookupError:  # outside Kopf: no event queue
            pass
        log.warning("%s %s: %s", kind, body["metadata"].get("name"), conflict.message)
    return status.to_manifest()


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
        message = cut_message(describe_problems(problems)) or ""
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
    conflicted = get_condition(status, NAME_CONFLICT)
    if status.phase == "Failed" and conflicted is not None and conflicted.status == "True":
        return status.to_manifest()  # failed for a name conflict: a new spec changes no name
    try:
        ensure_static_children(kube, manifest, body, defaults)
    except ForeignObject as conflict:
        return refuse_foreign(kind, body, status, conflict)
    cond = get_condition(status, "InvalidSpec")
    if cond is not None and cond.status == "True":
        set_condition(status, "InvalidSpec", False, "Valid", "the spec is valid")
        if status.phase == "Failed":  # failed only because of the spec: run the fixed one
            status.phase, status.completion_time = "Pending", None
            set_condition(status, "Failed", False, "SpecFixed", "the spec was fixed")
            status.message = "spec fixed; starting a new attempt"
    return status.to_manifest()
