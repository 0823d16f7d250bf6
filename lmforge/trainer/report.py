"""`lmforge report`: training curves and a short summary from a run's metrics.jsonl."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def read_metrics(path: Path) -> list[dict[str, Any]]:
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut off by a crash
    return records


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """Last value per step (a resumed run re-logs the steps after its checkpoint)."""
    by_step: dict[int, float] = {}
    for record in records:
        if key in record and record[key] is not None:
            by_step[int(record["step"])] = float(record[key])
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def summarize(records: list[dict[str, Any]]) -> str:
    steps, losses = _series(records, "loss")
    eval_steps, eval_losses = _series(records, "eval_loss")
    _, tps = _series(records, "tokens_per_second")
    _, tokens = _series(records, "tokens")
    if not steps:
        return "no training steps recorded"
    lines = [
        f"steps: {steps[-1]}",
        f"tokens: {int(tokens[-1]):,}" if tokens else "tokens: -",
        f"loss: {losses[0]:.4f} (step {steps[0]}) -> {losses[-1]:.4f} (step {steps[-1]})",
    ]
    if eval_losses:
        best = min(range(len(eval_losses)), key=eval_losses.__getitem__)
        lines.append(
            f"eval loss: {eval_losses[-1]:.4f} (perplexity {math.exp(min(eval_losses[-1], 50)):.2f}); "
            f"best {eval_losses[best]:.4f} at step {eval_steps[best]}"
        )
    if tps:
        ordered = sorted(tps)
        lines.append(f"tokens/s: median {ordered[len(ordered) // 2]:,.0f}, last {tps[-1]:,.0f}")
    return "\n".join(lines)


def plot_curves(records: list[dict[str, Any]], path: Path) -> None:
    # Imported here: a backend must be chosen before pyplot is imported, and choosing one when this
    # module is imported would impose it on every program that imports it.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    panels = [
        ("loss", "training loss", axes[0][0]),
        ("eval_loss", "eval loss", axes[0][1]),
        ("lr", "learning rate", axes[1][0]),
        ("tokens_per_second", "tokens/s", axes[1][1]),
    ]
    for key, title, ax in panels:
        steps, values = _series(records, key)
        ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
