"""checkov's Kubernetes checks on everything lmforge puts into a cluster, as a platform team's scanner would run them.

Scanned: the Helm chart rendered with every feature on (monitoring objects, dashboard, NetworkPolicy,
Kopf peering, pinned image digests; cluster-wide and per-namespace RBAC) and, for every manifest in examples/, the children the operator
creates for it (lmforge.operator.children with the defaults the chart hands the operator: ConfigMap,
headless Service, NetworkPolicy, PodGroup when gang-scheduled, the attempt Job, the data-prepare Job, the compression
Job). The test fails on any finding that is not in :data:`KEPT`, and on a kept one that no longer
shows up (the list must not outlive its reasons).

checkov comes from PyPI in its own virtual environment (its dependencies clash with lmforge's):
``.ci/run`` installs :data:`CHECKOV_VERSION` and sets ``LMFORGE_CHECKOV``; without it the test
looks on PATH and in /var/tmp/checkov-venv, and skips (saying so) when there is none.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

from lmforge.api.loading import load_one
from lmforge.operator import children
from tests.test_chart import ALL_MONITORING, CHART, NAMESPACE, RELEASE

REPO = Path(__file__).resolve().parents[1]
CHECKOV_VERSION = "3.3.30"
"""The version .ci/run installs; another one may know other checks."""
CHECKOV_ENV = "LMFORGE_CHECKOV"
LOCAL_VENV = Path("/var/tmp/checkov-venv/bin/checkov")
DIGEST = "sha256:" + "0" * 64
EVERYTHING_ON: dict[str, Any] = {
    **ALL_MONITORING,
    "operator": {"peering": {"enabled": True}},
    "networkPolicy": {"enabled": True},
    # Pinned images: what a platform team installs in production (a tag can move, a digest cannot).
    "image": {"digest": DIGEST},
    "trainer": {"image": {"digest": DIGEST}},
}
EXAMPLE_NAMESPACE = "team-a"
"""Where an example without metadata.namespace lands (``kubectl apply -n team-a``); the operator
creates the children in the job's namespace."""
SOURCE_MODEL = "s3://lmforge/gpt-124m-sft/model"
"""What the operator resolves a CompressionJob's model.trainingJob to (the TrainingJob's output model)."""

KEPT: dict[tuple[str, str], str] = {
    ("CKV_K8S_38", "Deployment"): (
        "the operator's service-account token is mounted: the operator is a Kubernetes client, the "
        "token is its credential (trainer, prepare and compression pods mount none)"
    ),
    ("CKV_K8S_35", "Job"): (
        "S3 credentials reach the trainer as AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY from "
        "spec.s3.credentialsSecret (secretKeyRef, never a value in the spec): boto3 reads them from "
        "the environment and has no per-key file source; the keys are the secret's, set by its owner"
    ),
}
"""Findings left as they are, by (check, kind of object), each with its reason."""


def checkov_command() -> str | None:
    for candidate in (os.environ.get(CHECKOV_ENV), shutil.which("checkov"), str(LOCAL_VENV)):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def chart_objects(values: dict[str, Any]) -> list[dict[str, Any]]:
    with helm.Chart.load(CHART) as chart:
        rendered = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    objects = []
    for path, text in sorted(rendered.items()):
        if not path.endswith("NOTES.txt"):
            objects += [doc for doc in yaml.safe_load_all(text) if doc]
    return objects


def operator_defaults(objects: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> children.TrainerDefaults:
    """The trainer defaults the chart's operator runs with (from its Deployment's env)."""
    from lmforge.operator.main import trainer_defaults_from_env

    (deployment,) = [o for o in objects if o["kind"] == "Deployment"]
    for item in deployment["spec"]["template"]["spec"]["containers"][0]["env"]:
        if item["name"].startswith("LMFORGE_") and "value" in item:
            monkeypatch.setenv(item["name"], item["value"])
    return trainer_defaults_from_env()


def example_children(defaults: children.TrainerDefaults) -> dict[str, list[dict[str, Any]]]:
    """Every object the operator creates for each example (first attempt; first prepare try)."""
    out = {}
    for path in sorted((REPO / "examples").glob("*.yaml")):
        kind = yaml.safe_load(path.read_text())["kind"]
        manifest, problems = load_one(path, kind=kind)
        assert not problems, (path.name, problems)
        if manifest.metadata.namespace is None:
            metadata = manifest.metadata.model_copy(update={"namespace": EXAMPLE_NAMESPACE})
            manifest = manifest.model_copy(update={"metadata": metadata})
        manifest = children.with_defaults(manifest, defaults)
        objects = children.static_children(manifest, defaults)
        if kind == "TrainingJob":
            objects.append(children.attempt_job(manifest, 0))
            if manifest.spec.data.prepare is not None:
                objects.append(children.prepare_job(manifest, 0))
        else:
            model = manifest.spec.model
            objects.append(children.attempt_job(manifest, 0, SOURCE_MODEL if model.training_job else None))
        for obj in objects:
            obj["metadata"]["namespace"] = manifest.metadata.namespace
        out[path.stem] = objects
    return out


def run_checkov(command: str, directory: Path) -> dict[str, Any]:
    result = subprocess.run(
        # --skip-download: nothing from Prisma Cloud (no network in CI; the checks ship with checkov).
        [command, "-d", str(directory), "--framework", "kubernetes", "-o", "json", "--quiet", "--skip-download"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode in (0, 1), f"checkov failed to run ({result.returncode}): {result.stderr[-2000:]}"
    report = json.loads(result.stdout)
    reports = report if isinstance(report, list) else [report]
    (kubernetes,) = [r for r in reports if r["check_type"] == "kubernetes"]
    return kubernetes


@pytest.mark.timeout(600)
def test_checkov_finds_nothing_but_the_kept_findings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    command = checkov_command()
    if command is None:
        pytest.skip(
            f"checkov is not installed: set {CHECKOV_ENV} to its executable, put it on PATH, or "
            f"`python3 -m venv {LOCAL_VENV.parents[1]} && {LOCAL_VENV.parent}/pip install checkov=={CHECKOV_VERSION}` "
            "(.ci/run does this in CI)"
        )
    chart = chart_objects(EVERYTHING_ON)
    defaults = operator_defaults(chart, monkeypatch)
    # Both RBAC layouts: one ClusterRole, or Roles in the watched namespaces.
    namespaced = chart_objects({**EVERYTHING_ON, "watchNamespaces": ["team-a", "ml"]})
    files = {"chart.yaml": chart, "chart-namespaced.yaml": namespaced}
    for example, objects in example_children(defaults).items():
        files[f"children-{example}.yaml"] = objects
    for name, objects in files.items():
        (tmp_path / name).write_text(yaml.safe_dump_all(objects, sort_keys=False))
    scanned = [obj for objects in files.values() for obj in objects]
    kinds = {obj["kind"] for obj in scanned}
    assert {"Deployment", "Job", "NetworkPolicy", "ClusterRole", "Role", "ConfigMap", "Service"} <= kinds
    assert any(o["kind"] == "Job" and o["metadata"]["name"].endswith("-prepare") for o in scanned)
    assert any(o["kind"] == "Job" and "-compress-" in o["metadata"]["name"] for o in scanned)

    report = run_checkov(command, tmp_path)
    summary = report["summary"]
    version = summary.get("checkov_version")
    if os.environ.get(CHECKOV_ENV):  # CI: the pinned version, so that new checks come with a pin bump
        assert version == CHECKOV_VERSION, f"{CHECKOV_ENV} runs checkov {version}, the test pins {CHECKOV_VERSION}"
    assert summary["parsing_errors"] == 0, summary
    # checkov skips objects it cannot read: every scanned object must be one of its resources.
    assert summary["resource_count"] >= len(scanned), (summary, len(scanned))
    assert summary["passed"] > 0

    unexpected, seen = [], set()
    for finding in report["results"]["failed_checks"]:
        kind = finding["resource"].split(".", 1)[0]
        key = (finding["check_id"], kind)
        if key in KEPT:
            seen.add(key)
        else:
            unexpected.append(
                f"{finding['check_id']} {finding['resource']} ({finding['file_path']}): {finding['check_name']}"
            )
    assert not unexpected, f"checkov {version} (lmforge pins {CHECKOV_VERSION}) found:\n" + "\n".join(unexpected)
    stale = set(KEPT) - seen
    assert not stale, f"kept findings that checkov {version} no longer reports (remove them): {sorted(stale)}"
