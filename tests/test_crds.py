"""The CRDs are generated from the models, structural, fresh, and agree with the models."""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from lmforge.api.crd import KIND_DEFINITIONS, build_crd, object_schema, stale_crds, structural_problems
from lmforge.api.errors import _unwrap
from lmforge.api.loading import load_manifests, validate_document
from tests.test_validate import CASES

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))


def crd_file(kind: str) -> dict[str, Any]:
    definition = next(k for k in KIND_DEFINITIONS if k.kind == kind)
    return yaml.safe_load((REPO / "crds" / definition.file_name).read_text())


def strict_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema as `kubectl apply` (strict field validation) enforces it: unknown keys rejected."""
    schema = copy.deepcopy(schema)

    def walk(node: dict[str, Any]) -> None:
        if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            node["additionalProperties"] = False
            for sub in node["properties"].values():
                walk(sub)
        if isinstance(node.get("items"), dict):
            walk(node["items"])

    walk(schema)
    schema["properties"]["metadata"] = {"type": "object"}
    return schema


def validator_for(kind: str) -> jsonschema.Draft4Validator:
    schema = crd_file(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return jsonschema.Draft4Validator(strict_schema(schema))


def test_crd_files_are_fresh() -> None:
    assert stale_crds(REPO) == [], "run `lmforge crds` and commit the result"


@pytest.mark.parametrize("definition", KIND_DEFINITIONS, ids=lambda k: k.kind)
def test_crd_is_structural(definition: Any) -> None:
    assert structural_problems(object_schema(definition)) == []


@pytest.mark.parametrize("definition", KIND_DEFINITIONS, ids=lambda k: k.kind)
def test_crd_is_a_valid_kubernetes_object(definition: Any) -> None:
    crd = build_crd(definition)
    kubernetes_validate.validate(crd, kubernetes_validate.latest_version(), strict=True)
    names = crd["spec"]["names"]
    assert names["categories"] == ["lmforge"]
    assert names["shortNames"] == [definition.short_name]
    assert crd["spec"]["group"] == "lmforge.dev"
    version = crd["spec"]["versions"][0]
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}


def _every_node_has_a_description(node: dict[str, Any], path: str) -> list[str]:
    missing = []
    for name, sub in node.get("properties", {}).items():
        if "description" not in sub:
            missing.append(f"{path}.{name}")
        missing += _every_node_has_a_description(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        missing += _every_node_has_a_description(node["items"], f"{path}[]")
    return missing


@pytest.mark.parametrize("definition", KIND_DEFINITIONS, ids=lambda k: k.kind)
def test_every_field_is_described_for_kubectl_explain(definition: Any) -> None:
    schema = object_schema(definition)
    assert _every_node_has_a_description(schema["properties"]["spec"], "spec") == []
    assert _every_node_has_a_description(schema["properties"]["status"], "status") == []


@pytest.mark.parametrize("definition", KIND_DEFINITIONS, ids=lambda k: k.kind)
def test_printer_columns_point_at_status_fields(definition: Any) -> None:
    schema = object_schema(definition)
    expected = {
        "TrainingJob": ["Phase", "Step", "Loss", "Tokens/s", "Age"],
        "CompressionJob": ["Phase", "Ratio", "PPL Δ", "Age"],
    }
    assert [c["name"] for c in definition.printer_columns] == expected[definition.kind]
    for column in definition.printer_columns:
        node: dict[str, Any] = schema
        for part in column["jsonPath"].strip(".").split("."):
            if part == "metadata":
                break
            node = node["properties"][part]
        else:
            assert node["type"] == column["type"], column


def model_paths(model: Any, prefix: str = "") -> set[str]:
    """Every field path a model accepts (aliases), descending into nested models and lists."""
    from pydantic import BaseModel

    paths = set()
    for name, field in model.model_fields.items():
        key = f"{prefix}.{field.alias or name}" if prefix else (field.alias or name)
        paths.add(key)
        for inner in _unwrap(field.annotation):
            import typing

            args = typing.get_args(inner)
            candidates = [inner, *args]
            for candidate in candidates:
                for concrete in _unwrap(candidate):
                    if isinstance(concrete, type) and issubclass(concrete, BaseModel):
                        suffix = "[]" if typing.get_origin(inner) is list else ""
                        paths |= model_paths(concrete, key + suffix)
    return paths


def schema_paths(node: dict[str, Any], prefix: str = "") -> set[str]:
    paths = set()
    for name, sub in node.get("properties", {}).items():
        key = f"{prefix}.{name}" if prefix else name
        paths.add(key)
        paths |= schema_paths(sub, key)
        if isinstance(sub.get("items"), dict):
            paths |= schema_paths(sub["items"], key + "[]")
    return paths


@pytest.mark.parametrize("definition", KIND_DEFINITIONS, ids=lambda k: k.kind)
def test_crd_and_models_have_the_same_fields(definition: Any) -> None:
    schema = object_schema(definition)
    assert schema_paths(schema["properties"]["spec"]) == model_paths(definition.spec)
    assert schema_paths(schema["properties"]["status"]) == model_paths(definition.status)


def test_there_is_an_example_of_each_kind() -> None:
    names = {p.name for p in EXAMPLES}
    assert {"quickstart.yaml", "pretrain.yaml", "finetune.yaml", "continual.yaml", "compress.yaml"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_validates_against_models_and_crd(path: Path) -> None:
    manifests, problems = load_manifests([path])
    assert problems == [] and len(manifests) == 1
    doc = yaml.safe_load(path.read_text())
    errors = list(validator_for(doc["kind"]).iter_errors(doc))
    assert errors == [], [e.message for e in errors]


# Single-field mistakes the API server must refuse too (cross-field rules live in the models only).
CRD_REJECTS = [
    "missing-spec-data",
    "empty-sources",
    "http-source",
    "bad-output-uri",
    "bad-bucket",
    "unknown-top-field",
    "unknown-nested",
    "string-int",
    "negative-layers",
    "absurd-width",
    "float-steps",
    "bad-attention",
    "bad-stage",
    "validation-fraction",
    "bad-precision",
    "zero-stage-4",
    "bad-quantity",
    "zero-nodes",
    "bad-toleration",
    "sources-not-list",
    "model-not-mapping",
    "betas-length",
    "bad-secret-name",
    "bad-endpoint",
    "bad-script",
    "tiny-vocab",
    "cj-no-steps",
    "cj-bad-quant",
    "cj-sparsity",
    "cj-gate-negative",
    "cj-temperature",
    "cj-unknown-step-field",
]


@pytest.mark.parametrize("case", CRD_REJECTS)
def test_crd_rejects_what_the_models_reject(case: str) -> None:
    doc = next(c[1] for c in CASES if c[0] == case)
    manifest, problems = validate_document(doc, "job.yaml", 1)
    assert manifest is None and problems
    assert list(validator_for(doc["kind"]).iter_errors(doc)), f"CRD schema accepts {case}"


def test_crds_check_fails_on_stale_files(tmp_path: Path) -> None:
    shutil.copytree(REPO / "crds", tmp_path / "crds")
    command = [sys.executable, "-m", "lmforge.cli", "crds", "--check", "--root", str(tmp_path)]
    assert subprocess.run(command, capture_output=True).returncode == 0
    target = tmp_path / "crds" / KIND_DEFINITIONS[0].file_name
    target.write_text(target.read_text().replace("Number of Transformer blocks", "Depth"))
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 1 and "stale" in result.stderr
    subprocess.run([sys.executable, "-m", "lmforge.cli", "crds", "--root", str(tmp_path)], check=True)
    assert subprocess.run(command, capture_output=True).returncode == 0
