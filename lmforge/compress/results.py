"""The results of a CompressionJob: one row per model, written as results.json, results.md and results.png.

- ``results.json`` (:data:`~lmforge.contract.RESULTS_JSON`): the rows (:class:`CompressionResult`,
  as in the job's status), the gate, the compression ratio and perplexity change, every step's
  report, training record and full evaluation, the device and torch version. Its rows, ratio and
  change also go to the pod's termination message, where the operator reads them.
- ``results.md`` (:data:`~lmforge.contract.RESULTS_MD`): the table, the gate's verdict, the step
  notes and where the final model's time goes.
- ``results.png`` (:data:`~lmforge.contract.RESULTS_PNG`): size, perplexity, decode latency and
  prefill speed per row, the baseline in grey.

Speed columns: decode latency is the best at batch 1 (or the first measured batch size), prefill
is at the largest batch size, speedup is the baseline's decode latency over the row's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmforge.api.status import CompressionResult
from lmforge.compress.evaluate import Evaluation
from lmforge.compress.gate import GATE_REASON, GateVerdict
from lmforge.contract import RESULTS_JSON, RESULTS_MD, RESULTS_PNG
from lmforge.termination import write_termination_message


@dataclass
class StepRecord:
    """One row of the results: the model after a step (or the baseline)."""

    step: str
    method: str | None
    model_dir: Path
    evaluation: Evaluation
    report: str = ""
    seconds: float = 0.0
    training: dict[str, Any] | None = None
    """How recovery or distillation trained (engine, ZeRO stage, precision, steps, losses); None without training."""


def result_row(record: StepRecord, baseline: Evaluation, batch_sizes: list[int]) -> CompressionResult:
    ev = record.evaluation
    best = ev.best_latency(1) or ev.best_latency(batch_sizes[0])
    base = baseline.best_latency(1) or baseline.best_latency(batch_sizes[0])
    big = max(batch_sizes)
    prefill = [r.prefill_tokens_per_second for r in ev.latency if r.batch_size == big and r.prefill_tokens_per_second]
    speedup = None
    if best and base and best.decode_ms_per_token and base.decode_ms_per_token:
        speedup = base.decode_ms_per_token / best.decode_ms_per_token
    return CompressionResult(
        step=record.step,
        method=record.method,
        parameters=ev.parameters,
        size_bytes=ev.size_bytes,
        perplexity=ev.perplexity,
        prefill_tokens_per_second=max(prefill) if prefill else None,
        decode_ms_per_token=best.decode_ms_per_token if best else None,
        speedup=speedup,
    )


def markdown_table(results: list[CompressionResult], base_ppl: float | None, base_size: int | None) -> str:
    lines = [
        "| step | method | parameters | size (MB) | size ratio | perplexity | PPL Δ | prefill tok/s "
        "| decode ms/token | speedup |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        ratio = f"{r.size_bytes / base_size:.3f}" if r.size_bytes and base_size else "-"
        delta = f"{100 * (r.perplexity / base_ppl - 1):+.2f}%" if r.perplexity and base_ppl else "-"
        lines.append(
            f"| {r.step} | {r.method or '-'} | {r.parameters:,} | "
            f"{(r.size_bytes or 0) / 1e6:.3f} | {ratio} | "
            f"{r.perplexity:.3f} | {delta} | "
            f"{r.prefill_tokens_per_second or 0:,.0f} | {r.decode_ms_per_token or 0:.3f} | "
            f"{r.speedup or 0:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def bar_chart(results: list[CompressionResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{i}: {r.step}" for i, r in enumerate(results)]  # methods are in results.md
    panels = [
        ("size (MB)", [(r.size_bytes or 0) / 1e6 for r in results]),
        ("perplexity", [r.perplexity or 0 for r in results]),
        ("decode ms/token (batch 1)", [r.decode_ms_per_token or 0 for r in results]),
        ("prefill tokens/s", [r.prefill_tokens_per_second or 0 for r in results]),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8))
    for ax, (title, values) in zip(axes, panels, strict=True):
        bars = ax.bar(range(len(values)), values, color=["#888888"] + ["#3b7dd8"] * (len(values) - 1))
        ax.set_title(title, fontsize=10)
        ax.set_xticks(range(len(values)), labels, fontsize=7)
        for bar, value in zip(bars, values, strict=True):
            ax.annotate(
                f"{value:.3g}",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=7,
            )
    fig.suptitle("compression results (grey: baseline)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def results_markdown(
    table: str, records: list[StepRecord], verdict: GateVerdict, *, compiled: bool, batch_sizes: list[int]
) -> str:
    """results.md: the table, the gate, the step notes and the final model's profile."""
    notes = "\n".join(f"- **{i}: {r.step}**: {r.report}" for i, r in enumerate(records))
    profile = records[-1].evaluation.profile or {}
    prof_lines = "\n".join(f"| {k} | {v:.2f} |" for k, v in profile.items() if k != "total")
    return (
        f"# Compression results\n\n{table}\n"
        f"Quality gate: **{'passed' if verdict.passed else 'FAILED'}**: {verdict.message}.\n\n"
        f"Decode latency is per generation step at batch 1 (best of eager"
        f"{' and compiled' if compiled else ''}); prefill is at batch {max(batch_sizes)}; "
        f"size is the weight files on disk.\n\n## Steps\n\n{notes}\n\n"
        f"## Where the final model's time goes (self ms by module type, one prefill + 16 decode steps)\n\n"
        f"| module | ms |\n| --- | ---: |\n{prof_lines}\n"
    )


def results_document(
    results: list[CompressionResult], records: list[StepRecord], verdict: GateVerdict, max_increase: float
) -> dict[str, Any]:
    """results.json."""
    change = verdict.perplexity_change
    return {
        "results": [r.model_dump(mode="json", by_alias=True) for r in results],
        "gate": {
            "passed": verdict.passed,
            "reason": None if verdict.passed else GATE_REASON,
            "max_perplexity_increase": max_increase,
            "perplexity_change": change,
            "message": verdict.message,
        },
        "compression_ratio": verdict.compression_ratio,
        "perplexity_change": None if change is None else f"{100 * change:+.1f}%",
        "steps": [
            {
                "step": r.step,
                "method": r.method,
                "report": r.report,
                "seconds": round(r.seconds, 2),
                "training": r.training,
                "model": str(r.model_dir),
                "evaluation": r.evaluation.to_dict(),
            }
            for r in records
        ],
        "device": torch.cuda.get_device_name(0)
        if torch.cuda.is_available()
        else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__,
    }


def write_results(out_dir: Path, document: dict[str, Any], markdown: str, results: list[CompressionResult]) -> None:
    """Write results.json, the termination message (rows, ratio, change), results.md and results.png."""
    (out_dir / RESULTS_JSON).write_text(json.dumps(document, indent=2) + "\n")
    write_termination_message({k: document.get(k) for k in ("results", "compression_ratio", "perplexity_change")})
    (out_dir / RESULTS_MD).write_text(markdown)
    bar_chart(results, out_dir / RESULTS_PNG)
