"""Annotation rules for labelled records: required fields, allowed labels, length limits.

Why reject and count instead of failing: a labelled set with a few bad rows is the normal case;
the report names each broken rule with examples so the labelling team can fix the source.
Reasons name the spec field of the rule (``requiredFields``, ``allowedLabels``, ``minChars``,
``maxChars``). Lengths count the characters of the record's text: the text field (jsonl), or
prompt and response together (sft), after normalisation. Field rules need JSON records; on plain
text only the length limits apply.

Conflicting labels: records whose prompt (sft) or text (jsonl) is the same after normalisation
but whose labels differ are reported, not rejected: which label is right is a human decision.
"""

from __future__ import annotations

import hashlib
from typing import Any

from lmforge.data.cleaning.text import Doc

MAX_CONFLICT_EXAMPLES = 10


def _empty(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, list | dict):
        return not value
    return False


class AnnotationRules:
    """Checks one record at a time; remembers labels per prompt to find conflicts."""

    name = "annotation"

    def __init__(
        self,
        required_fields: list[str],
        label_field: str | None,
        allowed_labels: list[str],
        min_chars: int,
        max_chars: int | None,
    ) -> None:
        self.required_fields = list(required_fields)
        self.label_field = label_field
        self.allowed = set(allowed_labels)
        self.min_chars = min_chars
        self.max_chars = max_chars
        self._labels: dict[bytes, tuple[str, int]] = {}
        self._conflicts: dict[bytes, dict[str, Any]] = {}

    def __call__(self, doc: Doc) -> str | None:
        obj = doc.obj
        if obj is not None:
            for name in self.required_fields:
                if _empty(obj.get(name)):
                    return f"requiredFields: {name!r} missing or empty"
            if self.label_field is not None:
                label = obj.get(self.label_field)
                if _empty(label):
                    return f"labelField: {self.label_field!r} missing or empty"
                if self.allowed and str(label) not in self.allowed:
                    return "allowedLabels: label not allowed"
        length = sum(map(len, doc.fields))
        if length < self.min_chars:
            return f"minChars: shorter than {self.min_chars} characters"
        if self.max_chars is not None and length > self.max_chars:
            return f"maxChars: longer than {self.max_chars} characters"
        if obj is not None and self.label_field is not None:
            self._remember(doc.fields[0], str(obj.get(self.label_field)))
        return None

    def _remember(self, prompt: str, label: str) -> None:
        key = hashlib.blake2b(prompt.encode("utf-8", "surrogatepass"), digest_size=16).digest()
        conflict = self._conflicts.get(key)
        if conflict is not None:
            conflict["labels"][label] = conflict["labels"].get(label, 0) + 1
            return
        first, count = self._labels.get(key, (label, 0))
        if first == label:
            self._labels[key] = (label, count + 1)
        else:
            self._conflicts[key] = {"prompt": prompt[:200], "labels": {first: count, label: 1}}

    @property
    def conflicts(self) -> list[dict[str, Any]]:
        """Prompts seen with more than one label: ``{"prompt", "labels": {label: count}}``."""
        return list(self._conflicts.values())
