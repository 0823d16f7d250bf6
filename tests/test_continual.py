"""Continual training (stage: continual): replay limits forgetting, the gate, EWC, resume, bad replay data.

The fixture is built to forget: job 1 pretrains a tiny model on corpus A (short sentences about
people and things), job 2 continues on a disjoint corpus B (arithmetic lines) at a high learning
rate. Without replay the earlier data's perplexity explodes (x10 and more); with 25% replay of A it
barely moves. The assertions read what the product writes: forgetting.json, summary.json,
metrics.jsonl and the checkpoints.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from lmforge.trainer.ewc import estimate
from lmforge.trainer.model import GPT, GPTConfig
from tests.trainer_helpers import arithmetic_corpus, lmforge, sentences_corpus, step_records, tiny_job, write_job

PEAK_LR = 3.0e-3
WARMUP = 5
STEPS = 60
GATE = 0.5  # +50% perplexity allowed on the earlier data


def _continual_job(base: Path, name: str, corpus_b: Path, job1: Path, data1: Path, **continual: Any) -> Path:
    """Job 2: STEPS steps on corpus B from job 1's model and tokenizer."""
    job = tiny_job(
        base / name,
        base / f"data-b-{name}",
        corpus_b,
        maxSteps=STEPS,
        microBatchSize=8,
        evalInterval=STEPS,
        evalBatches=4,
        logInterval=1,
        optimizer={"lr": PEAK_LR},
        schedule={"warmupSteps": WARMUP, "minLrRatio": 0.1},
    )
    spec = job["spec"]
    job["metadata"]["name"] = name
    spec["stage"] = "continual"
    spec["model"]["initialModel"] = f"file://{job1}/model"
    spec["tokenizer"] = {"uri": f"file://{job1}/model/tokenizer.json"}
    spec["checkpoint"] = {"interval": 20, "keep": 3}
    replay = continual.pop("replay", None)
    if replay is not None:
        spec["data"]["replay"] = {"sources": [f"file://{replay}"], "fraction": 0.25}
    if continual:
        spec["continual"] = continual
    return write_job(base / f"{name}.yaml", job)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Corpora, job 1 (pretrained on A) and its prepared data."""
    base = tmp_path_factory.mktemp("continual")
    rng = random.Random(0)
    (base / "a.txt").write_text(sentences_corpus(rng, 1500) + "\n")
    (base / "b.txt").write_text(arithmetic_corpus(rng, 1500) + "\n")
    job1 = tiny_job(
        base / "job1",
        base / "data-a",
        base / "a.txt",
        maxSteps=150,
        microBatchSize=8,
        evalInterval=150,
        evalBatches=4,
        logInterval=25,
        optimizer={"lr": PEAK_LR},
        schedule={"warmupSteps": 10},
    )
    job1["spec"]["checkpoint"] = {"interval": 1000}
    result = lmforge("run", str(write_job(base / "job1.yaml", job1)))
    assert result.returncode == 0, result.stderr[-3000:]
    return {"base": base, "job1": base / "job1", "data1": base / "data-a", "b": base / "b.txt"}


def _run(world: dict[str, Path], name: str, **continual: Any) -> tuple[Path, Any]:
    job = _continual_job(world["base"], name, world["b"], world["job1"], world["data1"], **continual)
    return world["base"] / name, lmforge("run", str(job))


@pytest.fixture(scope="module")
def with_replay(world: dict[str, Path]) -> tuple[Path, Any]:
    out, result = _run(world, "replay", replay=world["data1"], maxForgetting=GATE)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


@pytest.fixture(scope="module")
def without_replay(world: dict[str, Path]) -> tuple[Path, Any]:
    return _run(world, "noreplay", earlierData=[f"file://{world['data1']}"], maxForgetting=GATE)


def _report(out: Path) -> dict[str, Any]:
    return json.loads((out / "forgetting.json").read_text())


@pytest.mark.slow
def test_replay_forgets_less_than_no_replay(with_replay: tuple[Path, Any], without_replay: tuple[Path, Any]) -> None:
    replayed, forgot = _report(with_replay[0]), _report(without_replay[0])
    rise_with = replayed["earlier_data"][0]["perplexity_rise"]
    rise_without = forgot["earlier_data"][0]["perplexity_rise"]
    assert rise_without > 1.0  # the fixture forgets: earlier perplexity more than doubles without replay
    assert rise_with < rise_without / 10
    # Both start from the same weights, so "before" is the same number.
    assert replayed["earlier_data"][0]["loss_before"] == pytest.approx(forgot["earlier_data"][0]["loss_before"])
    assert replayed["replay"]["realised_fraction"] == pytest.approx(0.25, abs=0.01)
    assert forgot["replay"] is None
    assert "forgetting: data.replay.sources[0] perplexity" in with_replay[1].stdout


@pytest.mark.slow
def test_the_gate_fails_a_forgetful_job_with_exit_3_after_writing_model_and_report(
    with_replay: tuple[Path, Any], without_replay: tuple[Path, Any]
) -> None:
    out, result = without_replay
    assert result.returncode == 3, result.stderr[-3000:]
    assert "continual.maxForgetting" in result.stderr and "Traceback" not in result.stderr
    assert (out / "model" / "model.safetensors").exists()
    assert _report(out)["passed"] is False
    summary = json.loads((out / "summary.json").read_text())
    assert summary["forgetting"]["passed"] is False and summary["forgetting"]["max_forgetting"] == GATE
    out, result = with_replay
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["forgetting"]["passed"] is True


@pytest.mark.slow
def test_the_learning_rate_warms_up_again_and_decays_over_the_new_budget(with_replay: tuple[Path, Any]) -> None:
    out, _ = with_replay
    records = step_records(out)
    assert sorted(records) == list(range(1, STEPS + 1))  # this job's own steps, from 1: nothing inherited
    assert records[1]["lr"] == pytest.approx(PEAK_LR / WARMUP)
    assert records[WARMUP]["lr"] == pytest.approx(PEAK_LR)
    assert records[STEPS]["lr"] == pytest.approx(0.1 * PEAK_LR)
    assert json.loads((out / "summary.json").read_text())["resumed_from"] is None


@pytest.mark.slow
def test_ewc_under_zero_2_limits_forgetting(world: dict[str, Path], without_replay: tuple[Path, Any]) -> None:
    job = _continual_job(
        world["base"],
        "ewc",
        world["b"],
        world["job1"],
        world["data1"],
        earlierData=[f"file://{world['data1']}"],
        ewc={"weight": 10000.0, "samples": 32},
    )
    manifest = yaml.safe_load(job.read_text())
    manifest["spec"]["training"]["zero"] = {"stage": 2}
    write_job(job, manifest)
    result = lmforge("run", str(job))
    assert result.returncode == 0, result.stderr[-3000:]
    report = _report(world["base"] / "ewc")
    assert report["ewc"]["weight"] == 10000.0 and report["ewc"]["fisher_max"] > 0
    rise_ewc = report["earlier_data"][0]["perplexity_rise"]
    assert rise_ewc < _report(without_replay[0])["earlier_data"][0]["perplexity_rise"] / 10


@pytest.mark.slow
def test_resume_continues_the_replay_mix_exactly(world: dict[str, Path], with_replay: tuple[Path, Any]) -> None:
    straight, _ = with_replay
    out = world["base"] / "resumed"
    shutil.copytree(straight, out)
    # As if the run was killed right after committing step 20: later checkpoints never committed,
    # nothing exported, metrics up to step 20.
    for tag in ("step-00000040", "step-00000060"):
        (out / "checkpoints" / tag / "COMMIT").unlink()
    for name in ("summary.json", "forgetting.json"):
        (out / name).unlink()
    shutil.rmtree(out / "model")
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("".join(line + "\n" for line in lines if json.loads(line)["step"] <= 20))
    job = _continual_job(world["base"], "resumed", world["b"], world["job1"], world["data1"], replay=world["data1"])
    result = lmforge("run", str(job))
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["resumed_from"] == 20
    a, b = step_records(straight), step_records(out)
    for step in range(21, STEPS + 1):
        assert b[step]["data_position"] == a[step]["data_position"]
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], abs=1e-6)

    def mix(run: Path) -> dict[str, Any]:
        return json.loads((run / "checkpoints" / "step-00000060" / "trainer_state.json").read_text())["reader"]

    assert mix(out)["source_positions"] == mix(straight)["source_positions"]
    assert _report(out)["replay"] == _report(straight)["replay"]
    assert _report(out)["earlier_data"][0]["loss_before"] == pytest.approx(
        _report(straight)["earlier_data"][0]["loss_before"], abs=1e-6
    )


@pytest.mark.slow
def test_replay_tokenized_with_another_tokenizer_is_a_clear_error(world: dict[str, Path]) -> None:
    base = world["base"]
    other = tiny_job(base / "other", base / "data-other", base / "a.txt")
    other["spec"]["tokenizer"] = {"vocabSize": 300}  # a different BPE over the same text
    prepared = lmforge("prepare", str(write_job(base / "other.yaml", other)))
    assert prepared.returncode == 0, prepared.stderr[-2000:]
    job = _continual_job(base, "badtok", world["b"], world["job1"], world["data1"], replay=base / "data-other")
    result = lmforge("run", str(job))
    assert result.returncode == 78, result.stderr[-3000:]
    assert "data.replay.sources[0]" in result.stderr and "different tokenizer" in result.stderr
    assert "set tokenizer.uri" in result.stderr and "Traceback" not in result.stderr


def test_ewc_penalty_is_zero_at_the_start_and_pulls_back_where_the_fisher_is_large() -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, layers=1, width=16, heads=2, kv_heads=2, ffn_size=32, context_length=8))
    rng = np.random.default_rng(0)
    data = [rng.integers(0, 64, size=9) for _ in range(6)]
    penalty = estimate(model, lambda i: (data[i][:-1], data[i][1:]), 6, 2.0)
    assert all(p.grad is None for p in model.parameters())  # no gradients left behind
    assert penalty.penalty(model).item() == 0.0
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1)
    value = penalty.penalty(model)
    value.backward()
    expected = sum(float((f * 0.01).sum()) for f in penalty.fisher.values())  # weight/2 * F * 0.1^2
    assert value.item() == pytest.approx(expected, rel=1e-3)
    for name, param in model.named_parameters():
        fisher = penalty.fisher[name]
        assert torch.all(param.grad >= 0)  # every weight moved up, so the penalty pushes it down
        assert torch.allclose(param.grad, 2.0 * fisher * 0.1, rtol=1e-3, atol=1e-9)


@pytest.mark.slow
def test_initial_model_with_another_tokenizer_is_refused_before_training(world: dict[str, Path]) -> None:
    base = world["base"]
    job = yaml.safe_load(_continual_job(base, "newtok", world["b"], world["job1"], world["data1"]).read_text())
    job["spec"]["tokenizer"] = {"vocabSize": 512}  # same size as job 1's, other merges (trained on corpus B)
    result = lmforge("run", str(write_job(base / "newtok.yaml", job)))
    assert result.returncode == 78, result.stderr[-3000:]
    assert "model.initialModel" in result.stderr and "another tokenizer" in result.stderr
    assert f"set tokenizer.uri to file://{world['job1']}/model/tokenizer.json" in result.stderr
    assert "Traceback" not in result.stderr and not (base / "newtok" / "model").exists()


@pytest.mark.slow
def test_initial_model_of_another_shape_is_a_spec_error_not_a_retry(world: dict[str, Path]) -> None:
    base = world["base"]
    job = yaml.safe_load(_continual_job(base, "wide", world["b"], world["job1"], world["data1"]).read_text())
    job["spec"]["model"]["width"] = 128
    result = lmforge("run", str(write_job(base / "wide.yaml", job)))
    assert result.returncode == 78, result.stderr[-3000:]  # 75 would make the operator retry it forever
    assert "does not match spec.model" in result.stderr and "Traceback" not in result.stderr
