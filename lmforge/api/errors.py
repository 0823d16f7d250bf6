"""Turn pydantic validation errors into problems a user can act on: field path, what, and the fix."""

from __future__ import annotations

import difflib
import types
import typing
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a manifest."""

    source: str
    """File name (or ``<stdin>``, or an object reference such as ``TrainingJob ns/name``)."""
    document: int | None
    """1-based position of the YAML document in the file; None for file-level problems."""
    path: str
    """Field path such as ``spec.training.optimizer.lr``; empty for the whole document."""
    message: str
    """What is wrong and how to fix it."""

    def __str__(self) -> str:
        where = self.source
        if self.document is not None:
            where += f" (document {self.document})"
        if self.path:
            return f"{where}: {self.path}: {self.message}"
        return f"{where}: {self.message}"


_TYPE_NAMES = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "a whole number",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "dict_type": "a mapping (key: value)",
    "model_type": "a mapping (key: value)",
    "model_attributes_type": "a mapping (key: value)",
    "datetime_type": "a date-time",
    "datetime_parsing": "a date-time",
}


def _describe_value(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "nothing (null)"
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def format_path(loc: tuple[int | str, ...]) -> str:
    """``('spec', 'data', 'sources', 0)`` -> ``spec.data.sources[0]``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _unwrap(annotation: Any) -> list[Any]:
    """The concrete types inside Optional / Union / Annotated / list / dict wrappers."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        found: list[Any] = []
        for arg in typing.get_args(annotation):
            found.extend(_unwrap(arg))
        return found
    return [annotation]


def model_at(root: type[BaseModel], loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The model class that validates the object at ``loc`` (None when it is not a model)."""
    current: Any = root
    for part in loc:
        candidates = _unwrap(current)
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if isinstance(part, int):
            seq = next((c for c in candidates if typing.get_origin(c) in (list, tuple)), None)
            if seq is None:
                return None
            current = typing.get_args(seq)[0]
            continue
        if model is None:
            dct = next((c for c in candidates if typing.get_origin(c) is dict), None)
            if dct is None:
                return None
            current = typing.get_args(dct)[1]
            continue
        field = _field_by_alias(model, part)
        if field is None:
            return None
        current = field.annotation
    final = [c for c in _unwrap(current) if isinstance(c, type) and issubclass(c, BaseModel)]
    return final[0] if final else None


def _field_by_alias(model: type[BaseModel], key: str) -> Any:
    for name, field in model.model_fields.items():
        if key in (field.alias, name):
            return field
    return None


def allowed_keys(model: type[BaseModel]) -> list[str]:
    return [field.alias or name for name, field in model.model_fields.items()]


def _suggest(word: str, choices: list[str]) -> str:
    lowered = {c.lower(): c for c in choices}
    match = difflib.get_close_matches(word.lower(), list(lowered), n=1, cutoff=0.6)
    return f"; did you mean {lowered[match[0]]!r}?" if match else ""


def _message(root: type[BaseModel], error: dict[str, Any]) -> tuple[tuple[Any, ...], str]:
    """(location, message) for one pydantic error dict."""
    kind = error["type"]
    loc = tuple(error["loc"])
    ctx = error.get("ctx") or {}
    value = error.get("input")

    if kind == "spec_rule":
        field = str(ctx["field"])
        return loc + tuple(_split_field(field)), str(ctx["message"])
    if kind == "extra_forbidden":
        parent = model_at(root, loc[:-1])
        key = str(loc[-1])
        allowed = allowed_keys(parent) if parent else []
        hint = _suggest(key, allowed)
        listing = f" Allowed here: {', '.join(allowed)}." if allowed else ""
        return loc, f"unknown field {key!r}{hint or '; remove it or fix its spelling.'}{listing}"
    if kind == "missing":
        parent = model_at(root, loc[:-1])
        field = _field_by_alias(parent, str(loc[-1])) if parent else None
        about = f" ({field.description.rstrip('.')})" if field is not None and field.description else ""
        return loc, f"required field is missing{about}; add {loc[-1]}: ..."
    if kind in _TYPE_NAMES:
        expected = _TYPE_NAMES[kind]
        extra = ""
        if kind in ("int_type", "float_type") and isinstance(value, str):
            extra = "; write the number without quotes"
        if kind == "int_from_float":
            extra = "; drop the fractional part"
        return loc, f"expected {expected}, got {_describe_value(value)}{extra}"
    if kind == "literal_error" or kind == "enum":
        options = str(ctx.get("expected", ""))
        choices = [c.strip().strip("'") for c in options.replace(" or ", ",").split(",") if c.strip()]
        hint = _suggest(str(value), choices) if isinstance(value, str) else ""
        return loc, f"must be one of {', '.join(choices)}; got {_describe_value(value)}{hint}"
    bounds = {
        "greater_than_equal": ("at least", "ge"),
        "greater_than": ("greater than", "gt"),
        "less_than_equal": ("at most", "le"),
        "less_than": ("less than", "lt"),
    }
    if kind in bounds:
        words, key = bounds[kind]
        return loc, f"must be {words} {ctx.get(key)}, got {_describe_value(value)}"
    if kind == "finite_number":
        return loc, "must be a finite number, not NaN or infinity"
    if kind in ("too_short", "too_long"):
        if kind == "too_short":
            return loc, f"needs at least {ctx.get('min_length')} item(s), got {ctx.get('actual_length')}"
        return loc, f"allows at most {ctx.get('max_length')} item(s), got {ctx.get('actual_length')}"
    if kind == "string_too_short":
        return loc, f"must not be shorter than {ctx.get('min_length')} character(s)"
    if kind == "string_too_long":
        return loc, f"must be at most {ctx.get('max_length')} characters"
    if kind == "string_pattern_mismatch":
        return loc, f"{_describe_value(value)} does not have the expected form (pattern {ctx.get('pattern')})"
    return loc, str(error["msg"]).removeprefix("Value error, ")


def _split_field(field: str) -> list[int | str]:
    parts: list[int | str] = []
    for chunk in field.split("."):
        name, _, rest = chunk.partition("[")
        if name:
            parts.append(name)
        while rest:
            index, _, rest = rest.partition("]")
            parts.append(int(index))
            rest = rest.removeprefix("[")
    return parts


def problems_from_validation_error(
    root: type[BaseModel], exc: ValidationError, source: str, document: int | None
) -> list[Problem]:
    """Every error of ``exc`` as a :class:`Problem`, in document order, without duplicates."""
    seen: set[tuple[str, str]] = set()
    problems = []
    for error in exc.errors(include_url=False):
        loc, message = _message(root, error)
        key = (format_path(loc), message)
        if key in seen:
            continue
        seen.add(key)
        problems.append(Problem(source, document, key[0], message))
    return problems
