"""Which objects a job owns: the only ones its operator patches, deletes or supervises.

Children have deterministic names (``<job>-config``, ``<job>-a<N>``, ...), so a name can already
be taken: by another workload that happens to use it, or on purpose by a tenant who may only
create TrainingJobs and wants the operator (which may patch and delete ConfigMaps and Jobs) to
overwrite or delete someone else's object. An existing object is this job's only when its
controller owner reference names the job's uid. Anything else with a child's name is foreign:
never adopted, patched, deleted, nor read as the job's Job or pod; the job fails with reason
:data:`NAME_CONFLICT` and says which object is in the way.

One exception is not a conflict: an object whose controller is an earlier job of the same kind
and name (deleted and created again before the garbage collector removed its children). Its
owner no longer exists, so the garbage collector deletes it; the job waits for that
(:class:`ChildLeftover`), then creates its own.
"""

from __future__ import annotations

from typing import Any

NAME_CONFLICT = "NameConflict"
"""Failure reason (and Warning event) of a job whose child's name is taken by an object it does not own."""


def controller_of(obj: dict[str, Any]) -> dict[str, Any] | None:
    """The owner reference with ``controller: true`` (at most one, by API rule), if any."""
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return next((ref for ref in refs if isinstance(ref, dict) and ref.get("controller")), None)


def owned_by(obj: dict[str, Any], owner_uid: str | None) -> bool:
    """Whether ``owner_uid`` is the controller of ``obj``."""
    ref = controller_of(obj)
    return bool(owner_uid) and ref is not None and ref.get("uid") == owner_uid


def describe(obj: dict[str, Any]) -> str:
    """``ConfigMap x`` for messages."""
    return f"{obj.get('kind') or 'object'} {(obj.get('metadata') or {}).get('name')}"


class ForeignObject(Exception):
    """An object with a child's name exists and this job does not own it."""

    def __init__(self, existing: dict[str, Any], owner_kind: str, owner_name: str) -> None:
        self.existing = existing
        ref = controller_of(existing)
        held = f" (its controller is {ref.get('kind')} {ref.get('name')})" if ref else " (it has no controller)"
        self.message = (
            f"{describe(existing)} exists and is not owned by this {owner_kind}{held}; the operator leaves it "
            f"untouched: delete that object and create {owner_kind} {owner_name} again, or create the "
            f"{owner_kind} under another name"
        )
        super().__init__(self.message)


class ChildLeftover(Exception):
    """An object with a child's name belongs to an earlier job of the same name: the garbage
    collector removes it (its owner is gone); the job waits and creates its own afterwards."""

    def __init__(self, existing: dict[str, Any]) -> None:
        self.existing = existing
        ref = controller_of(existing) or {}
        super().__init__(
            f"{describe(existing)} belongs to an earlier {ref.get('kind')} {ref.get('name')} "
            f"(uid {ref.get('uid')}) and is being garbage collected; waiting for it to go"
        )


def check_existing(existing: dict[str, Any], owner: dict[str, Any]) -> None:
    """Raise unless ``existing`` (found under a child's name) is controlled by ``owner`` (a job's body)."""
    meta = owner.get("metadata") or {}
    if owned_by(existing, meta.get("uid")):
        return
    ref = controller_of(existing)
    if (
        ref is not None
        and ref.get("kind") == owner.get("kind")
        and ref.get("apiVersion") == owner.get("apiVersion")
        and ref.get("name") == meta.get("name")
    ):
        raise ChildLeftover(existing)
    raise ForeignObject(existing, str(owner.get("kind")), str(meta.get("name")))
