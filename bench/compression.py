"""Size, perplexity and speed ratios of compressed models against the uncompressed one, on this machine.

A small Llama-style GPT (4 layers, width 256, 8 heads / 4 kv heads, SwiGLU 688, context 128, 2048-token
BPE on the quickstart corpus) is trained here (lmforge.compress.train.fit: the trainer's DeepSpeed
engine on one process, as every training below), then compressed three ways, each from the same
teacher:

1. int8 dynamic-activation / int8-weight (torchao; torch.ao quantize_dynamic without torchao);
2. structured pruning of 25% of FFN width and attention heads (one of the 4 kv groups with its 2 query
   heads, so GQA stays consistent: 8/4 -> 6/3 heads) with a recovery fine-tune distilled from the
   unpruned model (0.5 x KL at T 2 + 0.5 x CE; the pipeline's default), and for comparison the same
   pruned model recovered with cross-entropy alone at equal steps (``--no-ce-recovery`` skips it);
3. a half-depth student (2 layers from teacher layers 0 and 2) distilled with alpha 0.5, T 2.

Every model is saved, loaded back and measured with lmforge.compress.evaluate: held-out perplexity,
weight-file size, prefill tokens/s at batch 8 and decode ms/token at batch 1, eager and compiled
(torch.compile, inductor), best of 3 runs.

    python bench/compression.py [--steps 600] [--threads 2] [--no-compile] [--no-ce-recovery]

Targets (issue 7): int8 <= 0.3x size, <= +1% perplexity, >= 1.3x prefill at batch 8 compiled;
pruning >= 1.2x speed, <= +10% perplexity; half-depth student >= 1.8x speed, perplexity within 15%.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lmforge.api.data import Data  # noqa: E402
from lmforge.compress import data as cdata  # noqa: E402
from lmforge.compress.distill import distill, make_student, recover  # noqa: E402
from lmforge.compress.evaluate import Evaluation, evaluate_model  # noqa: E402
from lmforge.compress.modelio import load_any, save_float, save_quantized, weights_bytes  # noqa: E402
from lmforge.compress.pipeline import RECOVERY_LR  # noqa: E402
from lmforge.compress.prune import structured_prune, supports_head_pruning  # noqa: E402
from lmforge.compress.quantize import describe, quantize  # noqa: E402
from lmforge.compress.train import fit  # noqa: E402
from lmforge.trainer.model import GPT, GPTConfig  # noqa: E402

SHAPE = dict(layers=4, width=256, heads=8, kv_heads=4, ffn_size=688, context_length=128)
VOCAB = 2048
MICRO = 16


def measure(model: GPT, directory: Path, prepared: str, compile: bool) -> Evaluation:
    model, _, _ = load_any(directory)
    return evaluate_model(
        model,
        reader=cdata.reader(prepared, "val", SHAPE["context_length"]),
        batches=20,
        size_bytes=weights_bytes(directory),
        batch_sizes=[1, 8],
        compile=compile,
        prompt_len=64,
        decode_tokens=32,
        repeats=3,
    )


def _speed(ev: Evaluation, batch: int, mode: str, what: str) -> float | None:
    row = ev.get(batch, mode)
    return None if row is None or row.error else getattr(row, what)


def ratios(name: str, base: Evaluation, ev: Evaluation, modes: list[str]) -> dict[str, str]:
    out = {
        "model": name,
        "size": f"{ev.size_bytes / base.size_bytes:.3f}x",
        "perplexity": f"{100 * (ev.perplexity / base.perplexity - 1):+.2f}%",
    }
    for mode in modes:
        b_pre, pre = (
            _speed(base, 8, mode, "prefill_tokens_per_second"),
            _speed(ev, 8, mode, "prefill_tokens_per_second"),
        )
        b_dec, dec = _speed(base, 1, mode, "decode_ms_per_token"), _speed(ev, 1, mode, "decode_ms_per_token")
        out[f"prefill b8 {mode}"] = f"{pre / b_pre:.2f}x" if pre and b_pre else "failed"
        out[f"decode b1 {mode}"] = f"{b_dec / dec:.2f}x" if dec and b_dec else "failed"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=600, help="teacher training steps")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true", help="eager timings only")
    parser.add_argument(
        "--no-ce-recovery", action="store_true", help="skip the cross-entropy-only recovery row (comparison)"
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("torchao").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    compile = not args.no_compile
    modes = ["eager", "compiled"] if compile else ["eager"]
    started = time.time()

    with tempfile.TemporaryDirectory(prefix="lmforge-bench-") as tmp:
        root = Path(tmp)
        prepared = cdata.prepare_for_compression(
            Data(sources=[f"file://{REPO}/examples/data/python-docs.txt"], validation_fraction=0.05),
            f"file://{root}",
            vocab_size=VOCAB,
            log=lambda text: None,
        )
        uri, ctx = prepared.prepared_uri, SHAPE["context_length"]
        torch.manual_seed(0)
        teacher = GPT(GPTConfig(vocab_size=prepared.vocab_size, **SHAPE))
        train = cdata.reader(uri, "train", ctx)
        fitted = fit(teacher, lambda: train.next_batch(MICRO), args.steps, 2e-3)
        save_float(teacher, prepared.tokenizer, root / "base")
        print(f"teacher: {teacher.num_parameters():,} parameters, {args.steps} steps ({time.time() - started:.0f}s)")
        print("training engine:", fitted.engine.summary())
        base = measure(teacher, root / "base", uri, compile)
        rows = []

        q, info = quantize(teacher, "int8-dynamic")
        save_quantized(q, prepared.tokenizer, root / "int8", info)
        rows.append(ratios("int8 dynamic", base, measure(q, root / "int8", uri, compile), modes))
        print("int8:", describe(info))

        targets = ["ffn", "heads"] if supports_head_pruning() else ["ffn"]
        calib = lambda: cdata.batches(cdata.reader(uri, "train", ctx, seed=1), 8, MICRO)  # noqa: E731
        recovery_steps = max(50, args.steps // 3)
        for use_teacher in (True, False) if not args.no_ce_recovery else (True,):
            pruned, report = structured_prune(teacher, 0.25, targets, "activation", calib)
            recovery = cdata.reader(uri, "train", ctx, seed=2)  # the same batches for both recoveries
            recovered = recover(
                pruned,
                teacher,
                lambda recovery=recovery: recovery.next_batch(MICRO),
                steps=recovery_steps,
                lr=RECOVERY_LR,
                use_teacher=use_teacher,
            )
            name = "pruned" if use_teacher else "pruned-ce"
            save_float(pruned, prepared.tokenizer, root / name)
            how = "distilled recovery" if use_teacher else "CE-only recovery"
            rows.append(
                ratios(
                    f"pruned 25% {'+'.join(targets)} + {recovery_steps} {how}",
                    base,
                    measure(pruned, root / name, uri, compile),
                    modes,
                )
            )
            print(f"pruning: {report.summary()} | recovery: {recovered.extra['loss']}")

        student, init = make_student(teacher, SimpleNamespace(layers=SHAPE["layers"] // 2))
        data = cdata.reader(uri, "train", ctx, seed=3)
        distill(
            teacher,
            student,
            lambda: data.next_batch(MICRO),
            steps=max(50, args.steps // 2),
            lr=2e-3,
            temperature=2.0,
            alpha=0.5,
        )
        save_float(student, prepared.tokenizer, root / "student")
        rows.append(
            ratios("half-depth student (distilled)", base, measure(student, root / "student", uri, compile), modes)
        )
        print("distillation:", init.summary())

    print()
    print(
        f"baseline: perplexity {base.perplexity:.2f}, {base.size_bytes / 1e6:.2f} MB; "
        + "; ".join(
            f"{r.mode} b{r.batch_size}: prefill {r.prefill_tokens_per_second or 0:,.0f} tok/s, "
            f"decode {r.decode_ms_per_token or 0:.2f} ms/token"
            for r in base.latency
        )
    )
    for note in base.notes:
        print("note:", note)
    headers = list(rows[0])
    widths = [max(len(h), *(len(r[h]) for r in rows)) for h in headers]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    for row in rows:
        print("  ".join(row[h].ljust(w) for h, w in zip(headers, widths, strict=True)))
    print(
        "(ratios against the uncompressed model: size and speed as multiples, perplexity as change; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {time.time() - started:.0f}s)"
    )
    print(
        "targets: int8 <= 0.3x size, <= +1% ppl, >= 1.3x prefill b8 compiled; pruning >= 1.2x speed, "
        "<= +10% ppl; half-depth student >= 1.8x speed, ppl within +15%"
    )


if __name__ == "__main__":
    main()
