"""Read manifests from files and validate them, collecting every problem instead of raising."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from lmforge import API_GROUP_VERSION
from lmforge.api.errors import Problem, problems_from_validation_error
from lmforge.api.manifest import KINDS, CompressionJob, TrainingJob

Manifest = TrainingJob | CompressionJob


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys: PyYAML silently keeps the last one."""


def _mapping_without_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, yaml.Node] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                "while reading a mapping",
                node.start_mark,
                f"the key {key!r} appears twice (first on line {seen[key].start_mark.line + 1}); keep only one",
                key_node.start_mark,
            )
        seen[key] = key_node
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


@dataclass
class LoadResult:
    """What a file held: parsed documents (with their 1-based positions) and problems."""

    documents: list[tuple[int, Any]] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)


def parse_text(text: str, source: str) -> LoadResult:
    """Parse multi-document YAML text; empty documents (a stray ``---``) are skipped."""
    result = LoadResult()
    if not text.strip():
        result.problems.append(Problem(source, None, "", "is empty; expected a TrainingJob or CompressionJob manifest"))
        return result
    try:
        docs = list(yaml.load_all(text, Loader=_StrictLoader))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        what = getattr(exc, "problem", None) or str(exc)
        context = getattr(exc, "context", None)
        detail = f"{what} ({context})" if context and "appears twice" not in what else what
        result.problems.append(
            Problem(
                source,
                None,
                "",
                f"is not valid YAML: {where}{detail}; check the indentation and quoting around that line",
            )
        )
        return result
    for index, doc in enumerate(docs, start=1):
        if doc is not None:
            result.documents.append((index, doc))
    if not result.documents:
        result.problems.append(
            Problem(source, None, "", "holds no documents; expected a TrainingJob or CompressionJob manifest")
        )
    return result


def read_file(path: str | Path) -> LoadResult:
    """Read a manifest file, turning unreadable, binary and non-UTF-8 files into problems."""
    source = str(path)
    p = Path(path)
    if not p.exists():
        return LoadResult(problems=[Problem(source, None, "", "no such file")])
    if p.is_dir():
        return LoadResult(problems=[Problem(source, None, "", "is a directory; pass the manifest files in it")])
    try:
        raw = p.read_bytes()
    except OSError as exc:
        return LoadResult(problems=[Problem(source, None, "", f"cannot be read: {exc.strerror}")])
    if b"\x00" in raw[:8192]:
        return LoadResult(problems=[Problem(source, None, "", "is a binary file, not a YAML manifest")])
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        return LoadResult(
            problems=[
                Problem(
                    source,
                    None,
                    "",
                    f"is not UTF-8 text (byte 0x{raw[exc.start]:02x} on line {line}); save the file as UTF-8",
                )
            ]
        )
    return parse_text(text, source)


def validate_document(doc: Any, source: str, index: int | None) -> tuple[Manifest | None, list[Problem]]:
    """Validate one parsed document as a TrainingJob or CompressionJob."""
    if not isinstance(doc, dict):
        kind = "a list" if isinstance(doc, list) else f"a {type(doc).__name__} value"
        return None, [
            Problem(source, index, "", f"is {kind}; expected a mapping with apiVersion, kind, metadata and spec")
        ]
    problems: list[Problem] = []
    kind = doc.get("kind")
    if kind not in KINDS:
        if kind is None:
            message = "kind is missing; set kind: TrainingJob or kind: CompressionJob"
        else:
            close = difflib.get_close_matches(str(kind), list(KINDS), n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]}?" if close else ""
            message = f"{kind!r} is not an lmforge kind; expected TrainingJob or CompressionJob{hint}"
        problems.append(Problem(source, index, "kind", message))
    api_version = doc.get("apiVersion")
    if api_version != API_GROUP_VERSION:
        got = "missing" if api_version is None else f"{api_version!r}"
        problems.append(Problem(source, index, "apiVersion", f"is {got}; set apiVersion: {API_GROUP_VERSION}"))
    if problems:
        return None, problems
    model = KINDS[kind]
    try:
        return model.model_validate(doc), []  # type: ignore[return-value]
    except ValidationError as exc:
        return None, problems_from_validation_error(model, exc, source, index)


def load_manifests(paths: list[str | Path]) -> tuple[list[Manifest], list[Problem]]:
    """Every valid manifest in ``paths`` and every problem found, across all files."""
    manifests: list[Manifest] = []
    problems: list[Problem] = []
    for path in paths:
        loaded = read_file(path)
        problems.extend(loaded.problems)
        for index, doc in loaded.documents:
            manifest, found = validate_document(doc, str(path), index)
            problems.extend(found)
            if manifest is not None:
                manifests.append(manifest)
    return manifests, problems


def load_one(path: str | Path, kind: str | None = None) -> tuple[Manifest | None, list[Problem]]:
    """The single manifest a command such as ``lmforge run`` takes, or the problems."""
    manifests, problems = load_manifests([path])
    if problems:
        return None, problems
    if kind is not None:
        manifests = [m for m in manifests if m.kind == kind]
    if len(manifests) != 1:
        what = kind or "manifest"
        return None, [
            Problem(str(path), None, "", f"holds {len(manifests)} {what} documents; this command takes exactly one")
        ]
    return manifests[0], []
