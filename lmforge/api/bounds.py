"""Size and depth bounds on what a user or a pod controls, checked before anything copies it.

A TrainingJob's spec is the user's, and ``spec.training.optimizer.lr`` (and any other
``x-kubernetes-preserve-unknown-fields`` node) takes any JSON value the API server accepts: a
mapping nested thousands of levels deep, or a string of megabytes. Everything that walks such a
value recursively (``copy.deepcopy``, ``json.dumps``, pydantic) then fails with RecursionError
or multiplies its size, and the operator gave no verdict. :func:`spec_problems` walks the spec
once, iteratively (it cannot overflow), and turns a value beyond :data:`MAX_SPEC_DEPTH` or
:data:`MAX_SPEC_STRING_BYTES` into a :class:`~lmforge.api.errors.Problem` naming the field and
the bound, before any recursive code sees it. ``lmforge validate`` can call it the same way.

Text the operator copies into the status from a pod or a user (condition messages quoting a
value, log tails, reasons) goes through :func:`cut_text`: bounded, with a marker saying it was
cut, so that one job's status stays far below the API server's object size limit (1.5 MiB in
etcd) whatever its pods print.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

from lmforge.api.errors import Problem

MAX_SPEC_DEPTH = 32
"""Deepest nesting (mappings and lists) allowed in a spec, counted from ``spec``. The deepest
field of the schema is 5 levels down (spec.resources.tolerations[0].key); 32 leaves room while
keeping every recursive copy, dump and validation of the spec far from Python's recursion limit."""
MAX_SPEC_STRING_BYTES = 64 * 1024
"""Longest string (UTF-8 bytes) allowed anywhere in a spec. The longest legitimate ones (URIs,
image references) are under 4 KiB; a bigger one is only copied around (into the ConfigMap, the
messages of the status) and would push the status towards the API server's size limit."""
MAX_REPORTED = 5
"""Out-of-bounds values reported per spec: enough to fix them, while the message stays short."""
API_NESTING_LIMIT = 10_000
"""Deepest JSON the Kubernetes API server stores (Go's encoding/json refuses deeper documents):
whatever a tenant writes, the operator must be able to parse, so that it can refuse it."""
MAX_MESSAGE_CHARS = 4096
"""Longest condition message or status message: a message lists field errors that quote user
values, and each status holds several (Ready, Failed, InvalidSpec and the phase message)."""
MAX_REASON_CHARS = 128
"""Longest reason: Kubernetes reasons are one CamelCase word; pods' reasons are copied as they are."""
MAX_LOG_TAIL_CHARS = 4000
"""Longest log tail of a failed rank kept in status.attempts[].logTail (one per attempt)."""
SHOWN_PATH_PARTS = 8
"""Components of a too-deep value's path shown in its problem (the field it is under comes first)."""
CUT_MARKER = " …[cut: {more} more characters; limit {limit}]"
"""Appended to bounded text, so a reader knows it is not the whole of it."""


def cut_text(text: str | None, limit: int) -> str | None:
    """``text`` of at most ``limit`` characters, the end replaced by :data:`CUT_MARKER` when it was
    longer. Cutting an already cut text changes nothing (status is read back and written again)."""
    if text is None or len(text) <= limit:
        return text
    marker = CUT_MARKER.format(more=len(text), limit=limit)  # an upper bound of its own length
    keep = max(0, limit - len(marker))
    marker = CUT_MARKER.format(more=len(text) - keep, limit=limit)
    return text[:keep] + marker


def cut_message(text: str | None) -> str | None:
    """:func:`cut_text` at :data:`MAX_MESSAGE_CHARS` (a pydantic AfterValidator of the status)."""
    return cut_text(text, MAX_MESSAGE_CHARS)


def cut_reason(text: str | None) -> str | None:
    return cut_text(text, MAX_REASON_CHARS)


def cut_log_tail(text: str | None) -> str | None:
    """The *end* of a log is what explains a failure: keep the last characters, marked."""
    if text is None or len(text) <= MAX_LOG_TAIL_CHARS:
        return text
    marker = f"[cut: {len(text)} characters; the last {MAX_LOG_TAIL_CHARS // 2} follow]\n"
    return marker + text[-(MAX_LOG_TAIL_CHARS // 2) :]


def _path(parts: list[int | str]) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else ("." if out else "") + str(part)
    return out


def spec_problems(spec: Any, source: str, root: str = "spec") -> list[Problem]:
    """Values of ``spec`` nested deeper than :data:`MAX_SPEC_DEPTH` or strings longer than
    :data:`MAX_SPEC_STRING_BYTES`, as problems naming the field (empty: within bounds).

    Iterative, so it works on any depth the API server stores; it stops descending at the depth
    bound, so its cost is bounded by the size of the part that is within it.
    """
    problems: list[Problem] = []
    stack: list[tuple[Any, list[int | str]]] = [(spec, [root])]
    while stack and len(problems) < MAX_REPORTED:
        value, parts = stack.pop()
        if isinstance(value, str):
            size = len(value.encode("utf-8", "surrogatepass"))
            if size > MAX_SPEC_STRING_BYTES:
                problems.append(
                    Problem(
                        source,
                        None,
                        _path(parts),
                        f"is a string of {size} bytes; lmforge takes at most {MAX_SPEC_STRING_BYTES} bytes in "
                        "a spec field (it is copied into the ConfigMap and the status); shorten it",
                    )
                )
            continue
        if not isinstance(value, dict | list):
            continue
        if len(parts) > MAX_SPEC_DEPTH:
            shown = _path(parts[:SHOWN_PATH_PARTS]) + ("…" if len(parts) > SHOWN_PATH_PARTS else "")
            problems.append(
                Problem(
                    source,
                    None,
                    shown,
                    f"is nested more than {MAX_SPEC_DEPTH} levels deep (the limit of lmforge specs: no field "
                    "is nested that deeply, and deeper values overflow the recursive copies and checks of "
                    "the spec); replace it with the value the field takes",
                )
            )
            continue
        items = value.items() if isinstance(value, dict) else enumerate(value)
        children = [(child, [*parts, key]) for key, child in items]
        stack.extend(reversed(children))  # depth first, in document order
    return problems


THREAD_STACK_BYTES = 16 * 1024 * 1024
"""Stack of the threads started after :func:`allow_api_nesting`: parsing or dumping JSON
:data:`API_NESTING_LIMIT` levels deep needs about 2 MiB of C stack (measured: 1 MiB overflows);
the pages only become resident when a deep document is parsed."""


def allow_api_nesting() -> None:
    """Let this process parse (and refuse) the deepest object the API server stores.

    Python parses and copies JSON recursively: the watch stream's ``json.loads`` (Kopf's) and
    Kopf's own copies of a body fail with RecursionError below a tenth of
    :data:`API_NESTING_LIMIT` under the default limit of 1000, which took the operator's watch
    of every job down, not just the deep one. The limit is raised to what such a body needs
    (a deep copy takes two frames per level, with room for the callers), and threads started
    from now on get a stack that holds it (:data:`THREAD_STACK_BYTES`).
    """
    needed = 4 * API_NESTING_LIMIT + 1000
    if sys.getrecursionlimit() < needed:
        sys.setrecursionlimit(needed)
    if threading.stack_size() < THREAD_STACK_BYTES:
        threading.stack_size(THREAD_STACK_BYTES)


__all__ = [
    "API_NESTING_LIMIT",
    "MAX_LOG_TAIL_CHARS",
    "MAX_MESSAGE_CHARS",
    "MAX_SPEC_DEPTH",
    "MAX_SPEC_STRING_BYTES",
    "allow_api_nesting",
    "cut_log_tail",
    "cut_message",
    "cut_reason",
    "cut_text",
    "spec_problems",
]
