"""Keep Kopf's JSON-patch diffs linear in the size of a job's body.

Kopf adds and removes its finalizer with a JSON patch computed by ``jsonpatch``'s
``JsonPatch.from_diff(body, body_with_the_finalizer)``, which descends into every mapping of both
bodies even where they are equal, building a path string per level. On a spec nested deeply
(a tenant may nest ``spec.training.optimizer.lr`` as deep as the API server allows, 10000
levels) that is quadratic: measured, 97 MiB for 5000 levels and 385 MiB for 10000, in an
operator whose limit is 512Mi, on every create and delete of such a job.

:func:`skip_equal_subtrees` makes the diff skip subtrees that are equal as JSON (same types,
same keys, same values: 1, 1.0 and true stay different, as jsonpatch has them), checked
iteratively with an early exit: the patch is the same, its cost linear. Applied once when the
operator starts (:func:`lmforge.operator.main.operator`).
"""

from __future__ import annotations

from typing import Any

import jsonpatch


def json_equal(left: Any, right: Any) -> bool:
    """Whether two decoded JSON values are the same document (type-strict, iterative)."""
    stack = [(left, right)]
    while stack:
        a, b = stack.pop()
        if type(a) is not type(b):
            return False
        if isinstance(a, dict):
            if a.keys() != b.keys():
                return False
            stack.extend((a[key], b[key]) for key in a)
        elif isinstance(a, list):
            if len(a) != len(b):
                return False
            stack.extend(zip(a, b, strict=True))
        elif a != b:
            return False
    return True


def skip_equal_subtrees() -> None:
    """Wrap jsonpatch's per-value comparison so that equal mappings and lists are not descended."""
    builder = jsonpatch.DiffBuilder
    original = getattr(builder, "_compare_values", None)
    if original is None or getattr(original, "skips_equal_subtrees", False):
        return  # another jsonpatch (nothing to wrap), or already wrapped

    def compare_values(self: Any, path: Any, key: Any, src: Any, dst: Any) -> None:
        if isinstance(src, dict | list) and json_equal(src, dst):
            return
        original(self, path, key, src, dst)

    compare_values.skips_equal_subtrees = True  # type: ignore[attr-defined]
    builder._compare_values = compare_values  # type: ignore[method-assign]
