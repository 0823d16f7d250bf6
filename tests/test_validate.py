"""`lmforge validate`: every bad manifest gets field-level errors with a fix, never a traceback."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from lmforge.api.loading import load_manifests, validate_document

REPO = Path(__file__).resolve().parents[1]

TRAINING: dict[str, Any] = {
    "apiVersion": "lmforge.dev/v1alpha1",
    "kind": "TrainingJob",
    "metadata": {"name": "t"},
    "spec": {
        "data": {"sources": ["file://corpus.txt"]},
        "output": {"uri": "s3://bucket/runs/t"},
    },
}
COMPRESSION: dict[str, Any] = {
    "apiVersion": "lmforge.dev/v1alpha1",
    "kind": "CompressionJob",
    "metadata": {"name": "c"},
    "spec": {
        "model": {"uri": "s3://bucket/runs/t/model"},
        "steps": [{"quantize": {"method": "int8-dynamic"}}],
        "output": {"uri": "s3://bucket/runs/c"},
    },
}


def with_change(base: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """Copy of ``base`` with ``value`` set at a dotted path (``_DELETE`` removes the key)."""
    doc = copy.deepcopy(base)
    *parents, last = path.split(".")
    node = doc
    for key in parents:
        node = node.setdefault(key, {}) if isinstance(node, dict) else node[int(key)]
    if value is _DELETE:
        del node[last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return doc


_DELETE = object()
CONTINUAL = with_change(
    with_change(TRAINING, "spec.stage", "continual"), "spec.model.initialModel", "s3://bucket/runs/base/model"
)
REPLAY = with_change(CONTINUAL, "spec.data.replay", {"sources": ["s3://bucket/runs/base/data"], "fraction": 0.1})

# (case id, document, expected field path, words the message must contain)
CASES = [
    ("missing-spec-data", with_change(TRAINING, "spec.data", _DELETE), "spec.data", "required"),
    ("missing-output", with_change(TRAINING, "spec.output", _DELETE), "spec.output", "required"),
    ("empty-sources", with_change(TRAINING, "spec.data.sources", []), "spec.data.sources", "at least 1"),
    ("http-source", with_change(TRAINING, "spec.data.sources", ["http://x/y"]), "spec.data.sources[0]", "s3://"),
    ("bad-bucket", with_change(TRAINING, "spec.output.uri", "s3://B/x"), "spec.output.uri", "bucket name 'B'"),
    ("bad-output-uri", with_change(TRAINING, "spec.output.uri", "/tmp/out"), "spec.output.uri", "file://"),
    ("unknown-top-field", with_change(TRAINING, "spec.trainig", {}), "spec.trainig", "did you mean 'training'"),
    ("unknown-nested", with_change(TRAINING, "spec.model.hiddenSize", 64), "spec.model.hiddenSize", "Allowed here"),
    ("string-int", with_change(TRAINING, "spec.model.layers", "12"), "spec.model.layers", "without quotes"),
    ("negative-layers", with_change(TRAINING, "spec.model.layers", -1), "spec.model.layers", "at least 1"),
    ("absurd-width", with_change(TRAINING, "spec.model.width", 10**9), "spec.model.width", "at most"),
    ("float-steps", with_change(TRAINING, "spec.training.maxSteps", 10.5), "spec.training.maxSteps", "integer"),
    ("heads-not-divide", with_change(TRAINING, "spec.model.heads", 7), "spec.model.heads", "must divide width"),
    (
        "kvheads-not-divide",
        with_change(TRAINING, "spec.model.kvHeads", 5),
        "spec.model.kvHeads",
        "must divide heads",
    ),
    (
        "window-too-big",
        with_change(
            TRAINING, "spec.model", {"contextLength": 128, "attention": {"type": "slidingWindow", "window": 256}}
        ),
        "spec.model.attention.window",
        "contextLength",
    ),
    (
        "window-missing",
        with_change(TRAINING, "spec.model.attention", {"type": "slidingWindow"}),
        "spec.model.attention.window",
        "needs window",
    ),
    (
        "bad-attention",
        with_change(TRAINING, "spec.model.attention", {"type": "sparse"}),
        "spec.model.attention.type",
        "slidingWindow",
    ),
    ("bad-stage", with_change(TRAINING, "spec.stage", "pretraining"), "spec.stage", "did you mean 'pretrain'"),
    ("finetune-no-init", with_change(TRAINING, "spec.stage", "finetune"), "spec.model.initialModel", "initialModel"),
    ("continual-no-init", with_change(TRAINING, "spec.stage", "continual"), "spec.model.initialModel", "earlier job"),
    (
        "replay-not-continual",
        with_change(TRAINING, "spec.data.replay", {"sources": ["s3://bucket/old"]}),
        "spec.data.replay",
        "stage: continual",
    ),
    (
        "continual-block-not-continual",
        with_change(TRAINING, "spec.continual", {"maxForgetting": 0.05}),
        "spec.continual",
        "applies to stage: continual",
    ),
    (
        "gate-without-earlier-data",
        with_change(CONTINUAL, "spec.continual", {"maxForgetting": 0.05}),
        "spec.continual.maxForgetting",
        "continual.earlierData",
    ),
    (
        "ewc-without-earlier-data",
        with_change(CONTINUAL, "spec.continual", {"ewc": {"weight": 100}}),
        "spec.continual.ewc",
        "data.replay.sources",
    ),
    (
        "ewc-zero3",
        with_change(
            with_change(REPLAY, "spec.continual", {"ewc": {"weight": 100}}), "spec.training", {"zero": {"stage": 3}}
        ),
        "spec.continual.ewc",
        "stage 0, 1 or 2",
    ),
    (
        "ewc-zero-weight",
        with_change(REPLAY, "spec.continual", {"ewc": {"weight": 0.0}}),
        "spec.continual.ewc.weight",
        "greater than 0",
    ),
    (
        "negative-forgetting",
        with_change(REPLAY, "spec.continual", {"maxForgetting": -0.1}),
        "spec.continual.maxForgetting",
        "at least 0",
    ),
    (
        "earlier-data-with-replay",
        with_change(REPLAY, "spec.continual", {"earlierData": ["s3://bucket/runs/older/data"]}),
        "spec.continual.earlierData",
        "remove continual.earlierData",
    ),
    (
        "initial-model-inside-output",
        with_change(CONTINUAL, "spec.model.initialModel", "s3://bucket/runs/t/model"),
        "spec.model.initialModel",
        "its own output.uri",
    ),
    (
        "replay-is-own-prepared-data",
        with_change(REPLAY, "spec.data.replay.sources", ["s3://bucket/runs/t/data"]),
        "spec.data.replay.sources[0]",
        "another job's prepared data",
    ),
    (
        "replay-listed-twice",
        with_change(REPLAY, "spec.data.replay.sources", ["s3://bucket/a/data", "s3://bucket/a/data/"]),
        "spec.data.replay.sources[1]",
        "listed twice",
    ),
    (
        "replay-fraction-one",
        with_change(REPLAY, "spec.data.replay.fraction", 1.0),
        "spec.data.replay.fraction",
        "less than 1",
    ),
    (
        "mix-is-own-prepared-data",
        with_change(TRAINING, "spec.data.mix", [{"uri": "s3://bucket/runs/t/data/", "fraction": 0.2}]),
        "spec.data.mix[0].uri",
        "another job's prepared data",
    ),
    (
        "mix-fractions-leave-nothing",
        with_change(
            TRAINING,
            "spec.data.mix",
            [{"uri": "s3://bucket/code/data", "fraction": 0.6}, {"uri": "s3://bucket/books/data", "fraction": 0.4}],
        ),
        "spec.data.mix",
        "keep the sum below 1",
    ),
    (
        "mix-listed-twice",
        with_change(
            TRAINING,
            "spec.data.mix",
            [{"uri": "s3://bucket/code/data", "fraction": 0.1}, {"uri": "s3://bucket/code/data/", "fraction": 0.1}],
        ),
        "spec.data.mix[1].uri",
        "list each prepared data directory once",
    ),
    (
        "mix-and-replay-leave-nothing",
        with_change(REPLAY, "spec.data.mix", [{"uri": "s3://bucket/code/data", "fraction": 0.9}]),
        "spec.data.mix",
        "data.replay.fraction",
    ),
    (
        "mix-fraction-missing",
        with_change(TRAINING, "spec.data.mix", [{"uri": "s3://bucket/code/data"}]),
        "spec.data.mix[0].fraction",
        "required",
    ),
    (
        "compression-mix",
        with_change(
            with_change(COMPRESSION, "spec.data", {"sources": ["s3://bucket/text"]}),
            "spec.data.mix",
            [{"uri": "s3://bucket/code/data", "fraction": 0.1}],
        ),
        "spec.data.mix",
        "remove data.mix",
    ),
    (
        "global-batch",
        with_change(
            with_change(TRAINING, "spec.training", {"microBatchSize": 8, "globalBatchSize": 100}),
            "spec.resources",
            {"nodes": 2, "gpusPerNode": 4},
        ),
        "spec.training.globalBatchSize",
        "use 64 or 128",
    ),
    (
        "lr-auto-no-finder",
        with_change(TRAINING, "spec.training.optimizer", {"lr": "auto"}),
        "spec.training.lrFinder",
        "lrFinder",
    ),
    ("lr-word", with_change(TRAINING, "spec.training.optimizer", {"lr": "fast"}), "spec.training.optimizer.lr", "auto"),
    (
        "lr-negative",
        with_change(TRAINING, "spec.training.optimizer", {"lr": -0.1}),
        "spec.training.optimizer.lr",
        "out of range",
    ),
    ("nan-dropout", with_change(TRAINING, "spec.model.dropout", float("nan")), "spec.model.dropout", "finite"),
    (
        "beta-range",
        with_change(TRAINING, "spec.training.optimizer", {"betas": [0.9, 1.5]}),
        "spec.training.optimizer.betas[1]",
        "[0, 1)",
    ),
    (
        "betas-length",
        with_change(TRAINING, "spec.training.optimizer", {"betas": [0.9]}),
        "spec.training.optimizer.betas",
        "at least 2",
    ),
    (
        "finder-order",
        with_change(TRAINING, "spec.training.lrFinder", {"minLr": 0.1, "maxLr": 0.01}),
        "spec.training.lrFinder.maxLr",
        "greater than minLr",
    ),
    (
        "steps-and-tokens",
        with_change(TRAINING, "spec.training", {"maxSteps": 5, "maxTokens": 5}),
        "spec.training.maxTokens",
        "not both",
    ),
    (
        "bad-precision",
        with_change(TRAINING, "spec.training.precision", "bf61"),
        "spec.training.precision",
        "did you mean 'bf16'",
    ),
    ("fp16-on-cpu", with_change(TRAINING, "spec.training.precision", "fp16"), "spec.training.precision", "needs a GPU"),
    (
        "zero-stage-4",
        with_change(TRAINING, "spec.training.zero", {"stage": 4}),
        "spec.training.zero.stage",
        "at most 3",
    ),
    (
        "offload-params-stage",
        with_change(TRAINING, "spec.training.zero", {"stage": 2, "offloadParams": "cpu"}),
        "spec.training.zero.offloadParams",
        "stage 3",
    ),
    (
        "inline-credentials",
        with_change(TRAINING, "spec.s3", {"secretAccessKey": "abc"}),
        "spec.s3.secretAccessKey",
        "credentialsSecret",
    ),
    ("bad-endpoint", with_change(TRAINING, "spec.s3", {"endpoint": "minio:9000"}), "spec.s3.endpoint", "expected form"),
    (
        "bad-secret-name",
        with_change(TRAINING, "spec.s3", {"credentialsSecret": "S3_Creds"}),
        "spec.s3.credentialsSecret",
        "Kubernetes name",
    ),
    ("bad-quantity", with_change(TRAINING, "spec.resources.memory", "lots"), "spec.resources.memory", "16Gi"),
    ("negative-quantity", with_change(TRAINING, "spec.resources.cpu", -2), "spec.resources.cpu", "negative"),
    ("zero-nodes", with_change(TRAINING, "spec.resources.nodes", 0), "spec.resources.nodes", "at least 1"),
    (
        "processes-vs-gpus",
        with_change(TRAINING, "spec.resources", {"gpusPerNode": 4, "processesPerNode": 2}),
        "spec.resources.processesPerNode",
        "must be 4",
    ),
    (
        "gang-no-volcano",
        with_change(TRAINING, "spec.scheduling", {"gang": True}),
        "spec.scheduling.schedulerName",
        "volcano",
    ),
    (
        "bad-toleration",
        with_change(TRAINING, "spec.resources.tolerations", [{"operator": "Maybe"}]),
        "spec.resources.tolerations[0].operator",
        "Exists",
    ),
    ("sources-not-list", with_change(TRAINING, "spec.data.sources", "file://a.txt"), "spec.data.sources", "a list"),
    ("model-not-mapping", with_change(TRAINING, "spec.model", [1, 2]), "spec.model", "mapping"),
    (
        "validation-fraction",
        with_change(TRAINING, "spec.data.validationFraction", 0.9),
        "spec.data.validationFraction",
        "at most 0.5",
    ),
    (
        "synonyms-no-table",
        with_change(TRAINING, "spec.data.prepare", {"augment": {"synonymProbability": 0.2}}),
        "spec.data.prepare.augment.synonymTable",
        "synonym table",
    ),
    (
        "labels-no-field",
        with_change(TRAINING, "spec.data.prepare", {"annotation": {"allowedLabels": ["a"]}}),
        "spec.data.prepare.annotation.labelField",
        "labelField",
    ),
    (
        "bad-script",
        with_change(TRAINING, "spec.data.prepare", {"scripts": ["klingon"]}),
        "spec.data.prepare.scripts[0]",
        "latin",
    ),
    ("bad-name", with_change(TRAINING, "metadata.name", "My_Job"), "metadata.name", "lower-case"),
    ("long-name", with_change(TRAINING, "metadata.name", "a" * 60), "metadata.name", "at most 45"),
    ("wrong-api-version", with_change(TRAINING, "apiVersion", "lmforge.dev/v1"), "apiVersion", "lmforge.dev/v1alpha1"),
    ("wrong-kind", with_change(TRAINING, "kind", "Deployment"), "kind", "not an lmforge kind"),
    ("kind-typo", with_change(TRAINING, "kind", "Trainingjob"), "kind", "did you mean TrainingJob"),
    (
        "tiny-vocab",
        with_change(TRAINING, "spec.tokenizer", {"vocabSize": 100}),
        "spec.tokenizer.vocabSize",
        "at least 260",
    ),
    # CompressionJob
    ("cj-no-steps", with_change(COMPRESSION, "spec.steps", []), "spec.steps", "at least 1"),
    (
        "cj-two-in-step",
        with_change(COMPRESSION, "spec.steps", [{"prune": {}, "quantize": {}}]),
        "spec.steps[0].prune",
        "exactly one",
    ),
    ("cj-empty-step", with_change(COMPRESSION, "spec.steps", [{}]), "spec.steps[0].prune", "sets none"),
    (
        "cj-model-both",
        with_change(COMPRESSION, "spec.model", {"uri": "s3://bucket/m", "trainingJob": "t"}),
        "spec.model.uri",
        "exactly one",
    ),
    ("cj-model-none", with_change(COMPRESSION, "spec.model", {}), "spec.model.uri", "exactly one"),
    (
        "cj-bad-quant",
        with_change(COMPRESSION, "spec.steps", [{"quantize": {"method": "int3"}}]),
        "spec.steps[0].quantize.method",
        "int8-dynamic",
    ),
    (
        "cj-sparsity",
        with_change(COMPRESSION, "spec.steps", [{"prune": {"sparsity": 1.0}}]),
        "spec.steps[0].prune.sparsity",
        "less than 1",
    ),
    (
        "cj-distill-no-data",
        with_change(COMPRESSION, "spec.steps", [{"distill": {"student": {"layers": 2}}}]),
        "spec.steps[0].distill",
        "data.sources",
    ),
    (
        "cj-gate-negative",
        with_change(COMPRESSION, "spec.evaluation", {"maxPerplexityIncrease": -0.1}),
        "spec.evaluation.maxPerplexityIncrease",
        "at least 0",
    ),
    ("cj-multinode", with_change(COMPRESSION, "spec.resources", {"nodes": 2}), "spec.resources.nodes", "one node"),
    (
        "cj-temperature",
        with_change(COMPRESSION, "spec.steps", [{"distill": {"temperature": 0}}]),
        "spec.steps[0].distill.temperature",
        "greater than 0",
    ),
    (
        "cj-unknown-step-field",
        with_change(COMPRESSION, "spec.steps", [{"prune": {"sparsty": 0.5}}]),
        "spec.steps[0].prune.sparsty",
        "did you mean 'sparsity'",
    ),
    (
        "cj-recovery-distill-without-steps",
        with_change(COMPRESSION, "spec.steps", [{"prune": {"recoveryDistill": False}}]),
        "spec.steps[0].prune.recoveryDistill",
        "set recoverySteps",
    ),
]


def test_at_least_thirty_distinct_cases() -> None:
    assert len({case[0] for case in CASES}) == len(CASES) >= 30
    assert len({case[2] for case in CASES}) >= 30


@pytest.mark.parametrize(("doc", "path", "words"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_manifest_names_field_and_fix(doc: dict[str, Any], path: str, words: str) -> None:
    manifest, problems = validate_document(doc, "job.yaml", 1)
    assert manifest is None
    matching = [p for p in problems if p.path == path]
    assert matching, f"no problem at {path}; got {[str(p) for p in problems]}"
    assert any(words in p.message for p in matching), [p.message for p in matching]


def test_every_problem_is_reported_not_just_the_first() -> None:
    doc = with_change(with_change(TRAINING, "spec.model.layers", 0), "spec.training.precision", "fp8")
    _, problems = validate_document(doc, "job.yaml", 1)
    assert {p.path for p in problems} >= {"spec.model.layers", "spec.training.precision"}


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lmforge.cli", *args], capture_output=True, text=True, cwd=REPO)


FILE_CASES = {
    "malformed.yaml": (b"apiVersion: lmforge.dev/v1alpha1\nkind: [TrainingJob\n", "not valid YAML: line 3"),
    "binary.yaml": (b"\x7fELF\x00\x00\x01", "binary file"),
    "latin1.yaml": ("kind: TrainingJob\nmetadata: {name: caf\u00e9}\n".encode("latin-1"), "not UTF-8"),
    "empty.yaml": (b"  \n\n", "is empty"),
    "only-separators.yaml": (b"---\n---\n", "holds no documents"),
    "scalar.yaml": (b"just a string\n", "expected a mapping"),
    "duplicate-key.yaml": (
        b"apiVersion: lmforge.dev/v1alpha1\nkind: TrainingJob\nkind: CompressionJob\n",
        "appears twice",
    ),
}


@pytest.mark.parametrize("name", sorted(FILE_CASES))
def test_unreadable_files_get_one_clear_line_and_exit_1(tmp_path: Path, name: str) -> None:
    content, words = FILE_CASES[name]
    path = tmp_path / name
    path.write_bytes(content)
    result = run_cli("validate", str(path))
    assert result.returncode == 1
    assert words in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_multi_document_file_reports_each_document(tmp_path: Path) -> None:
    good = yaml.safe_dump(TRAINING)
    bad = yaml.safe_dump(with_change(COMPRESSION, "spec.steps", []))
    path = tmp_path / "jobs.yaml"
    path.write_text(good + "---\n" + bad)
    result = run_cli("validate", str(path))
    assert result.returncode == 1
    assert "(document 2): spec.steps" in result.stderr
    assert "(document 1)" not in result.stderr


def test_missing_file_and_directory(tmp_path: Path) -> None:
    result = run_cli("validate", str(tmp_path / "nope.yaml"), str(tmp_path))
    assert result.returncode == 1
    assert "no such file" in result.stderr and "is a directory" in result.stderr


def test_valid_manifest_exits_zero(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text(yaml.safe_dump(TRAINING) + "---\n" + yaml.safe_dump(COMPRESSION))
    result = run_cli("validate", str(path))
    assert result.returncode == 0, result.stderr
    assert "ok: TrainingJob t" in result.stdout and "ok: CompressionJob c" in result.stdout


def test_unquoted_scientific_learning_rate_is_accepted() -> None:
    """PyYAML reads 3e-4 as a string; users write it that way all the time."""
    doc = yaml.safe_load("lr: 3e-4")
    manifest, problems = validate_document(with_change(TRAINING, "spec.training.optimizer", doc), "job.yaml", 1)
    assert not problems
    assert manifest.spec.training.optimizer.lr == pytest.approx(3e-4)


def test_defaults_are_sensible() -> None:
    manifests, problems = load_manifests([])
    assert manifests == [] and problems == []
    manifest, _ = validate_document(TRAINING, "job.yaml", 1)
    spec = manifest.spec
    assert spec.model.resolved_kv_heads == spec.model.heads
    assert spec.model.resolved_ffn_size % 64 == 0
    assert spec.total_steps(world_size=1) == 1000
    assert spec.resources.world_size == 1
    assert spec.training.zero.stage == 1


def test_max_tokens_converts_to_steps() -> None:
    doc = with_change(TRAINING, "spec.training", {"maxTokens": 10_000, "microBatchSize": 2})
    doc = with_change(doc, "spec.model", {"contextLength": 100})
    manifest, problems = validate_document(doc, "job.yaml", 1)
    assert not problems
    # 2 sequences x 100 tokens x 2 processes = 400 tokens per step -> 25 steps
    assert manifest.spec.total_steps(world_size=2) == 25
