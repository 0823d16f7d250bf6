"""A pod's last word to the operator: a compact JSON summary in its termination message.

The operator image has no S3 client, so it cannot read ``results.json`` from the job's output. The
kubelet, though, copies the file at the container's ``terminationMessagePath`` (at most 4096
bytes) into the pod status, where the operator reads it from its watch cache at no extra cost.

Where to write is decided by the environment, not by probing the filesystem: the operator sets
``LMFORGE_TERMINATION_LOG=/dev/termination-log`` on the containers it creates (together with the
container's ``terminationMessagePath``). Unset (``lmforge compress`` on a laptop) → nothing is
written, even where ``/dev/termination-log`` happens to be writable. A write that fails is
logged and ignored: the summary is a convenience, the results themselves are in the output.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path
from typing import Any

TERMINATION_LOG_ENV = "LMFORGE_TERMINATION_LOG"
"""Path of the termination message file; the operator sets it to :data:`TERMINATION_LOG_PATH`."""
TERMINATION_LOG_PATH = "/dev/termination-log"
LIMIT = 4096
"""Bytes the kubelet keeps of a termination message."""
TRUNCATED_KEY = "truncated"
"""Set in the payload when rows or text had to go: ``{"<list key>": rows dropped, "text": true}``."""

log = logging.getLogger(__name__)


def _compact(value: Any) -> Any:
    """Drop None values (recursively): absent keys cost no bytes and read the same."""
    if isinstance(value, dict):
        return {k: _compact(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_compact(v) for v in value]
    return value


def _encode(payload: dict[str, Any]) -> str:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=str)


def fit(payload: dict[str, Any], limit: int = LIMIT) -> str:
    """``payload`` as compact JSON of at most ``limit`` UTF-8 bytes.

    When too large: rows are dropped from the middle of the longest top-level lists (the first and
    last row, e.g. baseline and final model, stay longest), then long strings are shortened, and
    ``truncated`` says what went. Never raises for size: in the worst case only ``truncated`` is left.
    """
    data = _compact(copy.deepcopy(payload))
    text = _encode(data)
    if len(text.encode()) <= limit:
        return text
    dropped: dict[str, Any] = {}
    while len(text.encode()) > limit:
        lists = [(len(v), k) for k, v in data.items() if isinstance(v, list) and len(v) > 2]
        if not lists:
            break
        _, key = max(lists)
        rows = data[key]
        del rows[(len(rows) - 1) // 2]
        dropped[key] = dropped.get(key, 0) + 1
        data[TRUNCATED_KEY] = dict(dropped)
        text = _encode(data)
    if len(text.encode()) > limit:
        dropped["text"] = True
        data[TRUNCATED_KEY] = dict(dropped)
        for key, value in list(data.items()):
            if isinstance(value, str) and len(value) > 200:
                data[key] = value[:200] + "…"
            elif isinstance(value, dict) and key != TRUNCATED_KEY:
                data[key] = {k: (v[:200] + "…" if isinstance(v, str) and len(v) > 200 else v) for k, v in value.items()}
        text = _encode(data)
    if len(text.encode()) > limit:
        text = _encode({TRUNCATED_KEY: {**dropped, "all": True}})
    return text


def write_termination_message(payload: dict[str, Any]) -> Path | None:
    """Write ``payload`` (fitted to 4096 bytes) to ``$LMFORGE_TERMINATION_LOG``; None when unset or
    not writable (outside a pod), else the path written."""
    target = os.environ.get(TERMINATION_LOG_ENV, "").strip()
    if not target:
        return None
    path = Path(target)
    try:
        path.write_text(fit(payload), encoding="utf-8")
    except OSError as exc:
        log.warning("could not write the termination message to %s: %s", path, exc)
        return None
    return path


def read_termination_message(text: str | None) -> dict[str, Any] | None:
    """The payload back from a container's ``state.terminated.message``; None when absent or not ours."""
    if not text:
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None
