"""GPU throughput and MFU of lmforge against a bare nanoGPT-style loop, in one run (NVIDIA GPU).

Both loops train the same ~124M-parameter config (12 layers, width 768, 12 heads, context 1024,
vocab 32768, tied embeddings) in bf16 on one GPU with the same micro-batch:

- bare: nanoGPT-style: the lmforge model class under torch.autocast(bf16), fused AdamW, random
  batches already on the GPU;
- lmforge: `lmforge run` (DeepSpeed engine with bf16, ZeRO 1, shard reader, metrics).

MFU = tokens/s x FLOPs per token / peak bf16 FLOP/s (formula and peak table in
lmforge/trainer/metrics.py). Prints both and their ratio.

    python bench/gpu_mfu.py [--steps 60] [--micro-batch 16]
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

SHAPE = {"layers": 12, "width": 768, "heads": 12, "contextLength": 1024}
VOCAB = 32768
LOG_INTERVAL = 10
# --smoke: a tiny shape on CPU in fp32, to check the script's code paths where no GPU is at hand.
SMOKE_SHAPE = {"layers": 2, "width": 64, "heads": 4, "contextLength": 64}
DEVICE = "cuda"


def bare(steps: int, micro: int) -> tuple[float, float]:
    from lmforge.api.training import ModelShape
    from lmforge.trainer.metrics import peak_flops
    from lmforge.trainer.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig.from_spec(ModelShape.model_validate(SHAPE), VOCAB)).to(DEVICE)
    optimizer = torch.optim.AdamW(model.param_groups(0.1), lr=6e-4, betas=(0.9, 0.95), fused=DEVICE == "cuda")
    context = SHAPE["contextLength"]
    data = torch.randint(0, VOCAB, (micro, context + 1), device=DEVICE)
    rates = []
    synchronize = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)
    synchronize()
    start = time.perf_counter()
    for step in range(steps):
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=DEVICE == "cuda"):
            _, loss = model(data[:, :-1], data[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if (step + 1) % LOG_INTERVAL == 0:
            synchronize()
            now = time.perf_counter()
            rates.append(LOG_INTERVAL * micro * context / (now - start))
            start = now
    tps = statistics.median(rates[1:])
    peak = (peak_flops(torch.cuda.get_device_name()) if DEVICE == "cuda" else None) or float("nan")
    return tps, tps * model.flops_per_token() / peak


def ours(steps: int, micro: int, corpus: Path) -> tuple[float, float]:
    from lmforge.api.manifest import TrainingJob
    from lmforge.trainer.launch import launch

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        job = TrainingJob.model_validate(
            {
                "apiVersion": "lmforge.dev/v1alpha1",
                "kind": "TrainingJob",
                "metadata": {"name": "mfu"},
                "spec": {
                    "model": SHAPE,
                    "tokenizer": {"vocabSize": VOCAB},
                    "data": {"sources": [f"file://{corpus}"]},
                    "training": {
                        "maxSteps": steps,
                        "microBatchSize": micro,
                        "precision": "bf16",
                        "zero": {"stage": 1},
                        "evalInterval": 10**6,
                        "logInterval": LOG_INTERVAL,
                    },
                    "checkpoint": {"interval": 10**6},
                    "output": {"uri": f"file://{out}"},
                    "resources": {"gpusPerNode": 1},
                },
            }
        )
        outcome = launch(job, processes=1)
        if outcome.exit_code:
            raise SystemExit(outcome.message)
        records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        logged = [r for r in records if "tokens_per_second" in r][1:]
        return statistics.median(r["tokens_per_second"] for r in logged), statistics.median(
            r.get("mfu", float("nan")) for r in logged
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--corpus", type=Path, default=REPO / "examples" / "data" / "python-docs.txt")
    parser.add_argument("--smoke", action="store_true", help="tiny shape on CPU: checks the code paths only")
    args = parser.parse_args()
    global SHAPE, VOCAB, DEVICE
    if args.smoke:
        SHAPE, VOCAB, DEVICE = SMOKE_SHAPE, 512, "cpu"
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    elif not torch.cuda.is_available():
        raise SystemExit("bench/gpu_mfu.py needs an NVIDIA GPU (or --smoke to check it on CPU)")
    print(f"device: {torch.cuda.get_device_name() if DEVICE == 'cuda' else 'cpu (smoke run: no MFU)'}")
    b_tps, b_mfu = bare(args.steps, args.micro_batch)
    print(f"bare nanoGPT-style loop: {b_tps:,.0f} tokens/s, MFU {b_mfu:.1%}", flush=True)
    o_tps, o_mfu = ours(args.steps, args.micro_batch, args.corpus)
    print(f"lmforge (DeepSpeed)    : {o_tps:,.0f} tokens/s, MFU {o_mfu:.1%}")
    print(f"ratio lmforge/bare     : {o_tps / b_tps:.3f}")


if __name__ == "__main__":
    main()
