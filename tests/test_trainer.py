"""The real trainer: 2 DeepSpeed CPU processes (gloo), checkpoints, resume, signals, exit codes.

Tolerances: runs are bit-for-bit deterministic on CPU in fp32 for a fixed world size, so losses
of a resumed run must equal the uninterrupted run's to 1e-6 (absolute), and losses at step 1 must
agree across ZeRO stages to 1e-5 (the stages reduce gradients in different orders).
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.trainer_helpers import (
    CORPUS,
    REPO,
    free_port_pair,
    lmforge,
    step_records,
    tiny_job,
    trainer_env,
    write_job,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "docs.txt"
    path.write_text(CORPUS.read_text()[:150_000])
    return path


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One prepared-data directory shared by the module's runs (tokenizer trained once)."""
    return tmp_path_factory.mktemp("prepared")


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory: pytest.TempPathFactory, corpus: Path, prepared: Path) -> Path:
    """8 uninterrupted steps, checkpoints at 4 and 8."""
    base = tmp_path_factory.mktemp("straight")
    out = base / "out"
    job = write_job(base / "job.yaml", tiny_job(out, prepared, corpus))
    result = lmforge("run", str(job))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_run_trains_exports_and_reports(straight_run: Path) -> None:
    losses = step_records(straight_run)
    assert sorted(losses) == list(range(1, 9))
    assert losses[8]["loss"] < losses[1]["loss"]  # it learns
    assert (straight_run / "model" / "model.safetensors").exists()
    summary = json.loads((straight_run / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["final_eval_loss"] is not None
    evals = step_records(straight_run, "eval_loss")
    assert sorted(evals) == [4, 8]
    generated = lmforge("generate", str(straight_run / "model"), "--prompt", "The", "--max-new-tokens", "8")
    assert generated.returncode == 0, generated.stderr[-2000:]
    assert generated.stdout.startswith("The")  # what an 8-step model says is not the point here
    report = lmforge("report", str(straight_run))
    assert report.returncode == 0, report.stderr
    assert "steps: 8" in report.stdout and (straight_run / "report.png").stat().st_size > 10_000


def test_checkpoints_are_committed_and_pointed_to(straight_run: Path) -> None:
    checkpoints = straight_run / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step-00000008"
    for tag in ("step-00000004", "step-00000008"):
        marker = json.loads((checkpoints / tag / "COMMIT").read_text())
        assert marker["step"] == int(tag[-8:])
        assert "trainer_state.json" in marker["files"]
        assert "rng/rank-00001.pt" in marker["files"]


def test_killed_run_resumes_with_identical_losses_and_data_order(
    tmp_path: Path, corpus: Path, prepared: Path, straight_run: Path
) -> None:
    out = tmp_path / "out"
    job = write_job(tmp_path / "job.yaml", tiny_job(out, prepared, corpus))
    process = subprocess.Popen(
        [sys.executable, "-m", "lmforge.cli", "run", str(job)],
        env=trainer_env(),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    marker = out / "checkpoints" / "step-00000004" / "COMMIT"
    deadline = time.time() + 300
    while not marker.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    assert marker.exists(), "the first run never committed step 4"
    import os

    os.killpg(process.pid, signal.SIGKILL)  # no chance to save anything more
    process.wait()
    assert not (out / "summary.json").exists()

    resumed = lmforge("run", str(job))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"] == 4
    straight, again = step_records(straight_run), step_records(out)
    for step in range(5, 9):
        assert again[step]["data_position"] == straight[step]["data_position"]
        assert again[step]["loss"] == pytest.approx(straight[step]["loss"], abs=1e-6)


def test_checkpoint_without_commit_marker_is_ignored(
    tmp_path: Path, corpus: Path, prepared: Path, straight_run: Path
) -> None:
    out = tmp_path / "out"
    shutil.copytree(straight_run, out)
    (out / "checkpoints" / "step-00000008" / "COMMIT").unlink()  # as if the save was cut short
    (out / "summary.json").unlink()
    assert (out / "checkpoints" / "latest").read_text() == "step-00000008"  # the pointer lies
    job = write_job(tmp_path / "job.yaml", tiny_job(out, prepared, corpus))
    result = lmforge("run", str(job))
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["resumed_from"] == 4
    assert "resumed from checkpoint step-00000004" in result.stdout
    assert step_records(out)[8]["loss"] == pytest.approx(step_records(straight_run)[8]["loss"], abs=1e-6)


@pytest.mark.parametrize(("stage", "precision", "tolerance"), [(2, "fp32", 1e-5), (3, "fp32", 1e-5), (2, "bf16", 0.05)])
def test_zero_stages_agree_on_the_first_loss(
    tmp_path: Path, corpus: Path, prepared: Path, straight_run: Path, stage: int, precision: str, tolerance: float
) -> None:
    out = tmp_path / "out"
    job = tiny_job(out, prepared, corpus, maxSteps=2, zero={"stage": stage}, evalInterval=2, precision=precision)
    result = lmforge("run", str(write_job(tmp_path / "job.yaml", job)))
    assert result.returncode == 0, result.stderr[-3000:]
    stage1 = step_records(straight_run)[1]["loss"]  # the straight run is ZeRO 1, fp32
    assert step_records(out)[1]["loss"] == pytest.approx(stage1, abs=tolerance)
    assert (out / "model" / "model.safetensors").exists()


def test_sigterm_saves_a_checkpoint_then_exits_143(tmp_path: Path, corpus: Path, prepared: Path) -> None:
    out = tmp_path / "out"
    job = write_job(tmp_path / "job.yaml", tiny_job(out, prepared, corpus, maxSteps=10_000, evalInterval=10_000))
    process = subprocess.Popen(
        [sys.executable, "-m", "lmforge.cli", "run", str(job)],
        env=trainer_env(),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300
    while (not metrics.exists() or metrics.stat().st_size == 0) and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)  # what the kubelet does on preemption or suspend
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 143, stderr[-3000:]
    checkpoints = out / "checkpoints"
    latest = (checkpoints / "latest").read_text()
    assert (checkpoints / latest / "COMMIT").exists()
    assert int(latest[-8:]) >= 1


def test_rendezvous_timeout_names_the_missing_node(tmp_path: Path, corpus: Path, prepared: Path) -> None:
    job = write_job(tmp_path / "job.yaml", tiny_job(tmp_path / "out", prepared, corpus))
    env = trainer_env(
        NNODES="2",
        NODE_RANK="0",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port_pair()),
        NPROC_PER_NODE="2",
        LMFORGE_RENDEZVOUS_TIMEOUT="3",
    )
    started = time.time()
    result = lmforge("run", str(job), env=env, timeout=120)
    assert result.returncode == 75, result.stderr[-2000:]
    assert "node rank(s) 1 never arrived" in result.stderr
    assert time.time() - started < 60
    env["NODE_RANK"] = "1"  # a worker whose master never comes up
    result = lmforge("run", str(job), env=env, timeout=120)
    assert result.returncode == 75 and "node rank(s) 0 never arrived" in result.stderr


def test_rendezvous_port_taken_is_a_clear_retryable_error(tmp_path: Path, corpus: Path, prepared: Path) -> None:
    """Torch's worker rendezvous listens on MASTER_PORT + 1; when that is taken, say so instead of a traceback."""
    job = write_job(tmp_path / "job.yaml", tiny_job(tmp_path / "out", prepared, corpus))
    port = free_port_pair()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port + 1))
        squatter.listen()
        env = trainer_env(NNODES="2", NODE_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NPROC_PER_NODE="2")
        result = lmforge("run", str(job), env=env, timeout=120)
    assert result.returncode == 75, result.stderr[-2000:]
    assert f"port {port + 1} (MASTER_PORT + 1" in result.stderr and "Traceback" not in result.stderr


def test_invalid_spec_exits_78_without_traceback(tmp_path: Path, corpus: Path, prepared: Path) -> None:
    bad = tiny_job(tmp_path / "out", prepared, corpus)
    bad["spec"]["model"]["heads"] = 3
    result = lmforge("run", str(write_job(tmp_path / "bad.yaml", bad)))
    assert result.returncode == 78
    assert "spec.model.heads" in result.stderr and "Traceback" not in result.stderr
    uneven = tiny_job(tmp_path / "out", prepared, corpus, globalBatchSize=8)
    result = lmforge("run", str(write_job(tmp_path / "uneven.yaml", uneven)), "--processes", "3")
    assert result.returncode == 78
    assert "globalBatchSize (8) must be a multiple" in result.stderr and "Traceback" not in result.stderr


def test_lr_auto_runs_the_range_test_and_uses_its_suggestion(tmp_path: Path, corpus: Path, prepared: Path) -> None:
    out = tmp_path / "out"
    job = tiny_job(
        out,
        prepared,
        corpus,
        maxSteps=2,
        evalInterval=2,
        optimizer={"lr": "auto"},
        lrFinder={"minLr": 1.0e-5, "maxLr": 1.0, "steps": 20},
    )
    result = lmforge("run", str(write_job(tmp_path / "job.yaml", job)))
    assert result.returncode == 0, result.stderr[-3000:]
    suggestion = json.loads((out / "lr_finder.json").read_text())["suggestion"]
    assert json.loads((out / "summary.json").read_text())["peak_lr"] == pytest.approx(suggestion)
    assert (out / "lr_finder.png").stat().st_size > 10_000
    assert "suggested peak lr" in result.stdout


def test_lr_find_prints_the_suggestion_it_saves(tmp_path: Path, corpus: Path, prepared: Path) -> None:
    out = tmp_path / "out"
    job = tiny_job(out, prepared, corpus, lrFinder={"minLr": 1.0e-5, "maxLr": 1.0, "steps": 20})
    result = lmforge("lr-find", str(write_job(tmp_path / "job.yaml", job)))
    assert result.returncode == 0, result.stderr[-3000:]
    suggestion = json.loads((out / "lr_finder.json").read_text())["suggestion"]
    assert f"suggested learning rate: {suggestion:.3g}" in result.stdout
