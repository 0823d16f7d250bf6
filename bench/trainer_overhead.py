"""Tokens/s of the lmforge training loop divided by a bare PyTorch loop on the same model.

Both run in this invocation with the same model shape, micro-batch, sequence length, precision,
thread count and process count (1 process): the bare loop is nanoGPT-style (AdamW, random
batches already in memory, forward / backward / clip / step); the lmforge loop is the real
`lmforge run` path (DeepSpeed engine at ZeRO stage 0, shard reader, metrics endpoint,
metrics.jsonl, per-step SIGTERM check). lmforge's figure is its median logged tokens/s after the
first log interval, the bare loop's the same measure over the same number of steps.

    python bench/trainer_overhead.py [--steps 60] [--threads 2]

Target: ratio >= 0.97.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPE = {"layers": 4, "width": 256, "heads": 8, "kvHeads": 4, "contextLength": 256}
MICRO_BATCH = 8
VOCAB = 2048
LOG_INTERVAL = 5


def manifest(out: Path, steps: int) -> dict:
    return {
        "apiVersion": "lmforge.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": "bench"},
        "spec": {
            "model": SHAPE,
            "tokenizer": {"vocabSize": VOCAB},
            "data": {"sources": [f"file://{REPO}/examples/data/python-docs.txt"], "validationFraction": 0.05},
            "training": {
                "maxSteps": steps,
                "microBatchSize": MICRO_BATCH,
                "precision": "fp32",
                "zero": {"stage": 0},
                "evalInterval": 10**6,
                "evalBatches": 1,
                "logInterval": LOG_INTERVAL,
                "optimizer": {"lr": 1.0e-3},
            },
            "checkpoint": {"interval": 10**6},
            "output": {"uri": f"file://{out}"},
        },
    }


def lmforge_tokens_per_second(steps: int, threads: int) -> float:
    from lmforge.api.manifest import TrainingJob
    from lmforge.trainer.launch import launch

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        job = TrainingJob.model_validate(manifest(out, steps))
        outcome = launch(job, processes=1, threads=threads)
        if outcome.exit_code != 0:
            raise SystemExit(f"lmforge run failed: {outcome.message}")
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        rates = [r["tokens_per_second"] for r in records if "tokens_per_second" in r][1:]
        return statistics.median(rates)


def bare_tokens_per_second(steps: int, threads: int) -> float:
    from lmforge.api.training import ModelShape
    from lmforge.trainer.model import GPT, GPTConfig

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    shape = ModelShape.model_validate(SHAPE)
    model = GPT(GPTConfig.from_spec(shape, VOCAB))
    optimizer = torch.optim.AdamW(model.param_groups(0.1), lr=1e-3, betas=(0.9, 0.95))
    context = SHAPE["contextLength"]
    data = torch.randint(0, VOCAB, (steps, MICRO_BATCH, context + 1))
    rates = []
    start = time.perf_counter()
    for step in range(steps):
        x, y = data[step, :, :-1], data[step, :, 1:]
        _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        loss.item()
        if (step + 1) % LOG_INTERVAL == 0:
            now = time.perf_counter()
            rates.append(LOG_INTERVAL * MICRO_BATCH * context / (now - start))
            start = now
    return statistics.median(rates[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 1))
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    bare = bare_tokens_per_second(args.steps, args.threads)
    ours = lmforge_tokens_per_second(args.steps, args.threads)
    bare_again = bare_tokens_per_second(args.steps, args.threads)  # bracket lmforge against drift
    baseline = (bare + bare_again) / 2
    print(f"bare PyTorch loop : {bare:,.0f} and {bare_again:,.0f} tokens/s")
    print(f"lmforge loop      : {ours:,.0f} tokens/s")
    print(f"ratio lmforge/bare: {ours / baseline:.3f}  (target >= 0.97)")


if __name__ == "__main__":
    main()
