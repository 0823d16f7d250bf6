"""Training with everything on S3 (a real S3 server on loopback): SFT data in, checkpoints and model out."""

# ruff: noqa: F811
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tests.s3fixture import s3_client, s3_server  # noqa: F401
from tests.trainer_helpers import lmforge, tiny_job, trainer_env, write_job

pytestmark = pytest.mark.slow


def sft_records(count: int) -> list[dict[str, str]]:
    rng = random.Random(0)
    words = "list tuple dict set string integer float return yield class function module".split()
    records = []
    for i in range(count):
        topic = rng.choice(words)
        records.append(
            {
                "prompt": f"Question {i}: what is a {topic}?",
                "response": f"A {topic} is " + " ".join(rng.choice(words) for _ in range(30)) + ".",
            }
        )
    return records


def test_sft_run_on_s3_checkpoints_resumes_and_exports(s3_server: str, tmp_path: Path) -> None:
    client = s3_client(s3_server)
    client.create_bucket(Bucket="lmforge")
    body = "\n".join(json.dumps(r) for r in sft_records(400)) + "\n{broken json\n"
    client.put_object(Bucket="lmforge", Key="raw/sft.jsonl", Body=body.encode())

    job = tiny_job(tmp_path / "unused", tmp_path / "unused-data", tmp_path / "unused.txt", maxSteps=4, evalInterval=4)
    spec = job["spec"]
    spec["data"] = {"sources": ["s3://lmforge/raw/sft.jsonl"], "format": "sft", "validationFraction": 0.1}
    spec["output"] = {"uri": "s3://lmforge/runs/sft"}
    spec["checkpoint"] = {"interval": 2, "keep": 1}
    spec["s3"] = {"endpoint": s3_server, "addressingStyle": "path"}
    path = write_job(tmp_path / "job.yaml", job)
    env = trainer_env(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", TMPDIR=str(tmp_path))

    result = lmforge("run", str(path), env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    keys = {o["Key"] for o in client.list_objects_v2(Bucket="lmforge", Prefix="runs/sft/")["Contents"]}
    assert {
        "runs/sft/model/model.safetensors",
        "runs/sft/model/tokenizer.json",
        "runs/sft/metrics.jsonl",
        "runs/sft/summary.json",
        "runs/sft/data/train/index.json",
        "runs/sft/checkpoints/latest",
    } <= keys
    assert "runs/sft/checkpoints/step-00000004/COMMIT" in keys
    assert not any(k.startswith("runs/sft/checkpoints/step-00000002/") for k in keys)  # keep: 1
    assert "invalid JSON: 1" in result.stdout  # the broken line is skipped and counted, not fatal

    # Lose the newest commit marker: the next attempt must fetch and resume the older checkpoint.
    client.delete_object(Bucket="lmforge", Key="runs/sft/checkpoints/step-00000004/COMMIT")
    spec["checkpoint"]["keep"] = 3
    spec["training"]["maxSteps"] = 4
    again = lmforge("run", str(write_job(path, job)), env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    # step 2 was pruned by keep: 1, so nothing committed remains: the run starts over, cleanly.
    summary = json.loads(client.get_object(Bucket="lmforge", Key="runs/sft/summary.json")["Body"].read())
    assert summary["steps"] == 4 and summary["resumed_from"] is None

    client.delete_object(Bucket="lmforge", Key="runs/sft/checkpoints/step-00000004/COMMIT")
    third = lmforge("run", str(path), env=env)
    assert third.returncode == 0, third.stderr[-3000:]
    summary = json.loads(client.get_object(Bucket="lmforge", Key="runs/sft/summary.json")["Body"].read())
    assert summary["resumed_from"] == 2
