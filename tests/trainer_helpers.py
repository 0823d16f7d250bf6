"""Shared helpers for the tests that run the real trainer (`lmforge run`) in subprocesses."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "examples" / "data" / "python-docs.txt"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_port_pair(avoid: tuple[int, ...] = ()) -> int:
    """A free port whose successor is free too (the trainer's rendezvous uses MASTER_PORT and MASTER_PORT + 1).

    ``avoid``: ports already promised to something that has not bound them yet.
    """
    for _ in range(100):
        port = free_port()
        if port in avoid or port + 1 in avoid:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no pair of free ports on 127.0.0.1")


def tiny_job(out: Path, prepared: Path, corpus: Path, **training: Any) -> dict[str, Any]:
    """A TrainingJob small enough for 2 CPU processes in seconds."""
    spec_training = {
        "maxSteps": 8,
        "microBatchSize": 4,
        "precision": "fp32",
        "zero": {"stage": 1},
        "evalInterval": 4,
        "evalBatches": 2,
        "logInterval": 1,
        "optimizer": {"lr": 3.0e-3},
        "schedule": {"warmupSteps": 2},
    }
    spec_training.update(training)
    return {
        "apiVersion": "lmforge.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": "tiny"},
        "spec": {
            "model": {"layers": 2, "width": 64, "heads": 4, "kvHeads": 2, "contextLength": 64},
            "tokenizer": {"vocabSize": 512},
            "data": {
                "sources": [f"file://{corpus}"],
                "validationFraction": 0.1,
                "preparedUri": f"file://{prepared}",
            },
            "training": spec_training,
            "checkpoint": {"interval": 4, "keep": 3},
            "output": {"uri": f"file://{out}"},
            "resources": {"processesPerNode": 2},
        },
    }


def write_job(path: Path, job: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


def trainer_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"DS_ACCELERATOR": "cpu", "LMFORGE_METRICS_PORT": str(free_port()), "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


def lmforge(
    *args: str, env: dict[str, str] | None = None, timeout: float = 600, cwd: Path = REPO
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lmforge.cli", *args],
        capture_output=True,
        text=True,
        env=env or trainer_env(),
        timeout=timeout,
        cwd=cwd,
    )


def step_records(out: Path, key: str = "loss") -> dict[int, dict[str, Any]]:
    """The last metrics.jsonl record per step that has ``key``."""
    records: dict[int, dict[str, Any]] = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if key in record:
            records[record["step"]] = record
    return records


def sentences_corpus(rng: random.Random, paragraphs: int) -> str:
    """Short sentences about people and things, 6 per paragraph (a corpus unlike arithmetic_corpus)."""
    names = ["Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi"]
    verbs = ["paints", "finds", "carries", "washes", "buys", "sells", "draws", "keeps"]
    adjectives = ["red", "blue", "green", "small", "large", "old", "new", "shiny"]
    nouns = ["cat", "boat", "house", "lamp", "chair", "kite", "apple", "drum"]
    return "\n\n".join(
        " ".join(
            f"{rng.choice(names)} {rng.choice(verbs)} the {rng.choice(adjectives)} {rng.choice(nouns)}."
            for _ in range(6)
        )
        for _ in range(paragraphs)
    )


def arithmetic_corpus(rng: random.Random, paragraphs: int) -> str:
    """Arithmetic lines ('12 plus 30 equals 42;'), 6 per paragraph: disjoint from sentences_corpus."""

    def line() -> str:
        a, b, op = rng.randint(0, 99), rng.randint(0, 99), rng.choice(["plus", "minus", "times"])
        result = a + b if op == "plus" else a - b if op == "minus" else a * b
        return f"{a} {op} {b} equals {result};"

    return "\n\n".join(" ".join(line() for _ in range(6)) for _ in range(paragraphs))
