# ruff: noqa: F811
"""Compression on a tiny model trained here: pruning, quantization, distillation, evaluation, the gate.

One module-scoped fixture prepares the quickstart corpus (512-token BPE) and trains a 4-layer,
width-64 GQA model for a few hundred steps with a plain loop (seconds on 2 cores); every test starts
from its export.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lmforge.api.data import Data
from lmforge.api.manifest import CompressionJob
from lmforge.compress import data as cdata
from lmforge.compress.distill import distill, make_student, recover
from lmforge.compress.evaluate import evaluate_model, format_evaluation, perplexity
from lmforge.compress.modelio import load_any, save_float, save_quantized, weights_bytes
from lmforge.compress.pipeline import QUALITY_GATE_EXIT, QualityGateFailed, compress
from lmforge.compress.prune import magnitude_prune, structured_prune, supports_head_pruning
from lmforge.compress.quantize import quantize, torchao_available
from lmforge.compress.train import fit, single_process_world
from lmforge.trainer.export import load_model
from lmforge.trainer.generate import generate
from lmforge.trainer.model import GPT, GPTConfig
from tests.s3fixture import s3_client, s3_server  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "examples" / "data" / "python-docs.txt"
CONTEXT = 64
EVAL_BATCHES = 6


@pytest.fixture(scope="module", autouse=True)
def one_thread():  # noqa: ANN201
    """Tiny matmuls: one thread is ~10x faster than two on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """``<run>/data`` (prepared shards) and ``<run>/model`` (a trained, exported tiny model)."""
    root = tmp_path_factory.mktemp("compress-run")
    prepared = cdata.prepare_for_compression(
        Data(sources=[f"file://{CORPUS}"], validation_fraction=0.1),
        f"file://{root}",
        vocab_size=512,
        log=lambda t: None,
    )
    torch.manual_seed(0)
    config = GPTConfig(
        vocab_size=prepared.vocab_size, layers=4, width=64, heads=4, kv_heads=2, ffn_size=176, context_length=CONTEXT
    )
    model = GPT(config)
    train = cdata.reader(prepared.prepared_uri, "train", CONTEXT)
    fit(model, lambda: train.next_batch(8), 250, 3e-3)
    save_float(model, prepared.tokenizer, root / "model")
    return SimpleNamespace(
        root=root, prepared=prepared.prepared_uri, model_dir=root / "model", tokenizer=prepared.tokenizer
    )


def _model(run: SimpleNamespace) -> GPT:
    return load_model(run.model_dir)[0]


def _ppl(run: SimpleNamespace, model: GPT) -> float:
    return perplexity(model, cdata.reader(run.prepared, "val", CONTEXT), EVAL_BATCHES, 8)[0]


def _calibration(run: SimpleNamespace):  # noqa: ANN202
    return lambda: cdata.batches(cdata.reader(run.prepared, "train", CONTEXT, seed=7), 3, 8)


# --- evaluation -----------------------------------------------------------------------------------


def test_evaluation_measures_quality_size_speed_and_profile(run: SimpleNamespace) -> None:
    model = _model(run)
    ev = evaluate_model(
        model,
        reader=cdata.reader(run.prepared, "val", CONTEXT),
        batches=EVAL_BATCHES,
        size_bytes=weights_bytes(run.model_dir),
        batch_sizes=[1, 8],
        prompt_len=32,
        decode_tokens=8,
        repeats=1,
        profile=True,
    )
    assert 1 < ev.perplexity < 200  # trained: far below the vocabulary's 512
    assert ev.parameters == model.num_parameters()
    assert ev.size_bytes == (run.model_dir / "model.safetensors").stat().st_size
    assert [(r.batch_size, r.mode) for r in ev.latency] == [(1, "eager"), (8, "eager")]
    assert all(r.prefill_tokens_per_second > 0 and r.decode_ms_per_token > 0 for r in ev.latency)
    assert {"Linear", "Attention", "RMSNorm", "lm_head"} <= set(ev.profile)
    text = format_evaluation("tiny", ev)
    assert "perplexity" in text and "where the time goes" in text


# --- pruning --------------------------------------------------------------------------------------


@pytest.mark.parametrize("importance", ["activation", "magnitude"])
def test_structured_pruning_shrinks_the_model_which_still_loads_and_generates(
    run: SimpleNamespace, importance: str, tmp_path: Path
) -> None:
    model = _model(run)
    pruned, report = structured_prune(model, 0.25, ["layers", "ffn"], importance, _calibration(run))
    assert pruned.config.layers == 3 and pruned.config.ffn_size == 128
    assert pruned.num_parameters() < model.num_parameters()
    assert report.parameters_after == pruned.num_parameters() < report.parameters_before
    assert model.config.layers == 4  # the source is untouched
    save_float(pruned, run.tokenizer, tmp_path / "pruned")
    loaded, tokenizer = load_model(tmp_path / "pruned")  # the trainer's own loader: a normal export
    assert loaded.config == pruned.config
    new = generate(loaded, tokenizer.encode("The return statement").ids, 8)
    assert len(new) == 8
    assert _ppl(run, loaded) < 3 * _ppl(run, model)  # damaged, not destroyed


def test_head_pruning_keeps_gqa_consistent_or_says_why_not(run: SimpleNamespace, tmp_path: Path) -> None:
    model = _model(run)
    pruned, report = structured_prune(model, 0.5, ["heads"], "activation", _calibration(run))
    if not supports_head_pruning():
        assert pruned.num_parameters() == model.num_parameters()
        assert any("head_size" in note for note in report.notes)
        return
    c = pruned.config  # 2 kv groups x 0.5: one whole group (and its 2 query heads) goes
    assert (c.heads, c.kv_heads, c.head_dim) == (2, 1, model.config.head_dim)
    assert pruned.num_parameters() < model.num_parameters()
    save_float(pruned, run.tokenizer, tmp_path / "heads")
    loaded, tokenizer = load_model(tmp_path / "heads")
    ids = torch.tensor([tokenizer.encode("The return statement").ids])
    logits, _ = loaded(ids)
    assert torch.isfinite(logits).all() and len(generate(loaded, ids[0].tolist(), 4)) == 4
    transformers = pytest.importorskip("transformers")  # head_dim != width / heads exports as Llama's head_dim
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "heads").eval()
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, logits, atol=1e-4)


def test_magnitude_pruning_zeroes_weights_and_says_it_saves_nothing(run: SimpleNamespace, tmp_path: Path) -> None:
    model = _model(run)
    pruned, report = magnitude_prune(model, 0.5)
    weights = [m.weight for m in pruned.layers.modules() if isinstance(m, torch.nn.Linear)]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert 0.49 < zeros < 0.51
    assert "saves nothing on CPU" in report.summary()
    save_float(pruned, run.tokenizer, tmp_path / "sparse")
    assert weights_bytes(tmp_path / "sparse") == weights_bytes(run.model_dir)


# --- quantization ---------------------------------------------------------------------------------


def test_int8_is_at_most_035x_the_size_within_2_percent_perplexity(run: SimpleNamespace, tmp_path: Path) -> None:
    model = _model(run)
    quantized, info = quantize(model, "int8-dynamic")
    save_quantized(quantized, run.tokenizer, tmp_path / "int8", info)
    assert weights_bytes(tmp_path / "int8") <= 0.35 * weights_bytes(run.model_dir)
    loaded, tokenizer, loaded_info = load_any(tmp_path / "int8")
    assert loaded_info["method"] == "int8-dynamic" and loaded_info["kernels"]
    base, after = _ppl(run, model), _ppl(run, loaded)
    assert after <= base * 1.02, (base, after)
    ids = torch.tensor([tokenizer.encode("Lists are mutable").ids])
    assert torch.allclose(loaded(ids)[0], quantized(ids)[0], atol=1e-5)  # the reload is the same model
    assert len(generate(loaded, ids[0].tolist(), 5)) == 5


@pytest.mark.skipif(not torchao_available(), reason="torchao is not installed")
@pytest.mark.parametrize("method", ["int8-weight-only", "int4-weight-only"])
def test_torchao_weight_only_methods_save_and_load(run: SimpleNamespace, tmp_path: Path, method: str) -> None:
    model = _model(run)
    quantized, info = quantize(model, method, group_size=32)
    assert info["library"] == "torchao" and info["kernels"]
    save_quantized(quantized, run.tokenizer, tmp_path / "q", info)
    assert (tmp_path / "q" / "model.quantized.safetensors").exists()
    loaded, _, _ = load_any(tmp_path / "q")
    assert weights_bytes(tmp_path / "q") < 0.5 * weights_bytes(run.model_dir)
    assert _ppl(run, loaded) < 1.1 * _ppl(run, model)


# --- distillation ---------------------------------------------------------------------------------


def test_distilled_student_beats_the_same_student_without_the_teacher(run: SimpleNamespace) -> None:
    """Fixture where distillation helps: the student sees only 4 fixed batches, the teacher saw the corpus.

    Both students start from the same teacher layers and train the same steps on the same batches;
    only alpha differs (0 = plain cross-entropy).
    """
    teacher = _model(run)
    fixed_reader = cdata.reader(run.prepared, "train", CONTEXT, seed=5)
    fixed = [fixed_reader.next_batch(8) for _ in range(4)]
    results = {}
    for alpha in (0.5, 0.0):
        student, init = make_student(teacher, SimpleNamespace(layers=2))
        assert init.teacher_layers == [0, 2] and not init.fresh
        cycle = itertools.cycle(fixed)
        distill(teacher, student, lambda cycle=cycle: next(cycle), steps=100, lr=1e-3, temperature=2.0, alpha=alpha)
        results[alpha] = _ppl(run, student)
    assert results[0.5] < 0.95 * results[0.0], results


def test_recovery_distilled_from_the_unpruned_model_beats_cross_entropy_alone(run: SimpleNamespace) -> None:
    """Same fixture idea: recovery sees 4 fixed batches; the unpruned teacher knows the whole corpus."""
    unpruned = _model(run)
    results = {}
    for use_teacher in (True, False):
        pruned, _ = structured_prune(unpruned, 0.5, ["heads", "ffn"], "activation", _calibration(run))
        fixed_reader = cdata.reader(run.prepared, "train", CONTEXT, seed=5)
        cycle = itertools.cycle([fixed_reader.next_batch(8) for _ in range(4)])
        fitted = recover(pruned, unpruned, lambda cycle=cycle: next(cycle), steps=60, lr=1e-3, use_teacher=use_teacher)
        assert fitted.extra["loss"] == (
            "0.5 x KL(teacher || student) at T=2 + 0.5 x cross-entropy" if use_teacher else "cross-entropy"
        )
        results[use_teacher] = _ppl(run, pruned)
    assert results[True] < 0.95 * results[False], results


# --- the training loop ----------------------------------------------------------------------------


def test_fit_trains_through_a_deepspeed_engine_and_leaves_the_process_as_it_found_it(run: SimpleNamespace) -> None:
    import os

    import torch.distributed as dist

    model = _model(run)
    before = _ppl(run, model)
    train = cdata.reader(run.prepared, "train", CONTEXT, seed=11)
    environment = dict(os.environ)
    fitted = fit(model, lambda: train.next_batch(8), 30, 1e-3)
    engine = fitted.engine
    assert (engine.engine, engine.zero_stage, engine.world_size) == ("DeepSpeedEngine", 0, 1)
    assert (engine.precision, engine.backend, engine.optimizer) == ("fp32", "gloo", "AdamW")  # CPU
    assert fitted.steps == 30 and _ppl(run, model) < before  # the engine's steps reached the model
    assert next(model.parameters()).dtype == torch.float32 and not model.training
    assert not dist.is_initialized()  # the world fit started is gone again
    assert {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"} == {
        k: v for k, v in environment.items() if k != "DS_ACCELERATOR"
    }
    with single_process_world() as started:  # a world of one that someone else owns is reused and kept
        assert started
        fit(model, lambda: train.next_batch(8), 2, 1e-4)
        assert dist.is_initialized() and dist.get_world_size() == 1
    assert not dist.is_initialized()


# --- the pipeline ---------------------------------------------------------------------------------


def _job(run: SimpleNamespace, out: Path, steps: list[dict], max_increase: float, **data: object) -> CompressionJob:
    spec = {
        "model": {"uri": f"file://{run.model_dir}"},
        "steps": steps,
        "evaluation": {
            "batches": EVAL_BATCHES,
            "maxPerplexityIncrease": max_increase,
            "latencyBatchSizes": [1, 2],
            "compile": False,
        },
        "output": {"uri": f"file://{out}"},
    }
    if data:
        spec["data"] = data
    return CompressionJob.model_validate(
        {"apiVersion": "lmforge.dev/v1alpha1", "kind": "CompressionJob", "metadata": {"name": "t"}, "spec": spec}
    )


def test_pipeline_runs_steps_and_writes_the_results(run: SimpleNamespace, tmp_path: Path) -> None:
    out = tmp_path / "out"
    job = _job(
        run,
        out,
        [
            {"prune": {"targets": ["ffn"], "sparsity": 0.25, "calibrationBatches": 2, "recoverySteps": 20}},
            {"quantize": {"method": "int8-dynamic"}},
        ],
        0.5,
        sources=[f"file://{CORPUS}"],
        validationFraction=0.1,
    )
    outcome = compress(job, log=lambda text: None)
    assert outcome.gate_passed
    assert [r.step for r in outcome.results] == ["baseline", "prune", "quantize"]
    sizes = [r.size_bytes for r in outcome.results]
    assert sizes[0] > sizes[1] > sizes[2]
    assert outcome.compression_ratio > 3
    document = json.loads((out / "results.json").read_text())
    assert document["gate"]["passed"] and len(document["results"]) == 3
    training = document["steps"][1]["training"]  # the recovery fine-tune ran through DeepSpeed
    assert (training["engine"], training["zero_stage"], training["world_size"], training["steps"]) == (
        "DeepSpeedEngine",
        0,
        1,
        20,
    )
    assert training["loss"].startswith("0.5 x KL") and document["steps"][2]["training"] is None
    markdown = (out / "results.md").read_text()
    assert "| quantize |" in markdown
    assert "distilled from the unpruned model" in markdown and "DeepSpeedEngine" in markdown
    assert "ZeRO stage 0" in markdown
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"
    model, tokenizer, info = load_any(out / "model")
    assert info["method"] == "int8-dynamic" and model.config.ffn_size == 128
    assert len(generate(model, tokenizer.encode("The").ids, 4)) == 4


def test_quality_gate_fails_after_writing_the_results(run: SimpleNamespace, tmp_path: Path) -> None:
    out = tmp_path / "out"
    # No data block: the source run's own validation split (<run>/data) is used.
    job = _job(
        run,
        out,
        [{"prune": {"targets": ["layers"], "sparsity": 0.5, "importance": "magnitude"}}],
        0.01,
    )
    with pytest.raises(QualityGateFailed) as caught:
        compress(job, log=lambda text: None)
    outcome = caught.value.outcome
    assert caught.value.reason == "QualityGate" and not outcome.gate_passed
    assert outcome.perplexity_change > 0.01
    document = json.loads((out / "results.json").read_text())
    assert document["gate"] == {**document["gate"], "passed": False, "reason": "QualityGate"}
    assert [r["step"] for r in document["results"]] == ["baseline", "prune"]
    assert all(math.isfinite(r["perplexity"]) for r in document["results"])
    assert "FAILED" in (out / "results.md").read_text()
    assert (out / "results.png").exists() and (out / "model" / "model.safetensors").exists()
    assert QUALITY_GATE_EXIT not in (0, 1, 2, 75, 78, 143)


def test_compress_command_runs_a_manifest_with_s3_on_loopback(
    run: SimpleNamespace, tmp_path: Path, s3_server: str
) -> None:
    import yaml

    from lmforge.compress.commands import compress_command

    client = s3_client(s3_server)
    client.create_bucket(Bucket="models")
    for file in sorted(run.model_dir.iterdir()):
        client.upload_file(str(file), "models", f"tiny/model/{file.name}")
    client.upload_file(str(CORPUS), "models", "corpus/python-docs.txt")
    manifest = {
        "apiVersion": "lmforge.dev/v1alpha1",
        "kind": "CompressionJob",
        "metadata": {"name": "tiny-small"},
        "spec": {
            "model": {"uri": "s3://models/tiny/model"},
            "steps": [{"quantize": {"method": "int8-dynamic"}}],
            "data": {"sources": ["s3://models/corpus/python-docs.txt"], "validationFraction": 0.1},
            "evaluation": {"batches": 2, "latencyBatchSizes": [1], "compile": False},
            "output": {"uri": "s3://models/tiny-small"},
            "s3": {"endpoint": s3_server, "addressingStyle": "path"},
        },
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(manifest))
    printed: list[str] = []
    code = compress_command(path, threads=None, echo=lambda text, err=False: printed.append(text))
    assert code == 0, "\n".join(printed[-5:])
    keys = {o["Key"] for o in client.list_objects_v2(Bucket="models", Prefix="tiny-small/")["Contents"]}
    assert {"tiny-small/results.json", "tiny-small/results.md", "tiny-small/results.png"} <= keys
    assert "tiny-small/model/lmforge_quantization.json" in keys
    document = json.loads(client.get_object(Bucket="models", Key="tiny-small/results.json")["Body"].read())
    assert document["gate"]["passed"] and document["compression_ratio"] >= 1 / 0.35


def test_eval_command_prints_quality_size_speed_and_profile(run: SimpleNamespace, tmp_path: Path) -> None:
    from lmforge.compress.commands import eval_command

    printed: list[str] = []
    code = eval_command(
        run.model_dir,
        data=None,  # <run>/data next to <run>/model
        batches=2,
        batch_sizes=[1],
        compile=False,
        profile=True,
        json_path=tmp_path / "eval.json",
        s3=None,
        echo=lambda text, err=False: printed.append(text),
    )
    assert code == 0
    text = "\n".join(printed)
    assert "perplexity" in text and "decode ms/token" in text and "where the time goes" in text
    assert json.loads((tmp_path / "eval.json").read_text())["parameters"] > 0
