"""Loading the status, and phase and condition helpers over the status models in :mod:`lmforge.api.status`.

The status is always rebuilt from the models (not patched key by key), so what the operator writes
is exactly what the CRD schema and ``kubectl get`` expect. Conditions follow Kubernetes rules:
``lastTransitionTime`` changes only when ``status`` flips.
"""

from __future__ import annotations

import datetime
from typing import Any

from lmforge.api.status import CompressionJobStatus, Condition, JobStatusBase, TrainingJobStatus

TERMINAL = {"Succeeded", "Failed"}


def load_status(kind: str, body: Any) -> TrainingJobStatus | CompressionJobStatus:
    """The status of a ``kind`` object (TrainingJob or CompressionJob) as its body holds it."""
    model = TrainingJobStatus if kind == "TrainingJob" else CompressionJobStatus
    try:
        return model.model_validate(dict(body.get("status") or {}))
    except ValueError:  # someone wrote a status we cannot read: start over rather than crash-loop
        return model()


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0)


def set_condition(
    status: JobStatusBase,
    type_: str,
    state: bool | str,
    reason: str | None = None,
    message: str | None = None,
    when: datetime.datetime | None = None,
) -> None:
    """Add or update condition ``type_``; keeps lastTransitionTime unless the status flips."""
    when = when or now()
    value = state if isinstance(state, str) else ("True" if state else "False")
    for cond in status.conditions:
        if cond.type == type_:
            if cond.status != value:
                cond.last_transition_time = when
            if (cond.status, cond.reason, cond.message) != (value, reason, message):
                cond.last_update_time = when
            cond.status, cond.reason, cond.message = value, reason, message  # type: ignore[assignment]
            return
    status.conditions.append(
        Condition(
            type=type_, status=value, reason=reason, message=message, last_transition_time=when, last_update_time=when
        )
    )


def get_condition(status: JobStatusBase, type_: str) -> Condition | None:
    return next((c for c in status.conditions if c.type == type_), None)


def condition_true(status: JobStatusBase, type_: str) -> bool:
    cond = get_condition(status, type_)
    return cond is not None and cond.status == "True"


def set_phase(status: Any, phase: str, reason: str, message: str, when: datetime.datetime | None = None) -> None:
    """Move to ``phase`` and keep the Ready/Succeeded/Failed conditions consistent with it."""
    when = when or now()
    status.phase = phase
    status.message = message
    set_condition(status, "Ready", phase == "Running", reason, message, when)
    if phase == "Succeeded":
        set_condition(status, "Succeeded", True, reason, message, when)
        status.completion_time = status.completion_time or when
    elif phase == "Failed":
        set_condition(status, "Failed", True, reason, message, when)
        status.completion_time = status.completion_time or when


def status_patch(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any] | None:
    """A merge patch turning ``old`` into ``new`` at the top level (None when nothing changed).

    Keys that disappeared are set to None so that a JSON merge patch removes them.
    """
    old = old or {}
    patch: dict[str, Any] = {key: value for key, value in new.items() if old.get(key) != value}
    patch.update({key: None for key in old if key not in new})
    return patch or None
