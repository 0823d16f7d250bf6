"""Learning-rate range test (Smith 2015, as popularised by fastai).

The LR grows exponentially from ``minLr`` to ``maxLr`` over ``steps`` optimizer steps while the
loss is recorded and smoothed with an exponential moving average (beta 0.9, bias-corrected). The
test stops early once the smoothed loss exceeds 4x its minimum (divergence).

Suggestion rule: the learning rate at the minimum of the smoothed loss, divided by 10. At the
minimum the model is already on the edge of instability; one decade below is the largest rate that
is reliably still descending, which is what a peak LR for a warm-up + decay schedule should be.

Rank 0 writes ``lr_finder.png`` and ``lr_finder.json`` to the run's output.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from lmforge.api.training import TrainingJobSpec
from lmforge.data.preparation import PreparedData
from lmforge.data.reader import SampleReader
from lmforge.data.storage import join_uri, storage_for
from lmforge.trainer.collectives import mean
from lmforge.trainer.context import WorldContext
from lmforge.trainer.device import to_device
from lmforge.trainer.outputs import RunOutputs

SMOOTHING = 0.9
DIVERGENCE_FACTOR = 4.0
PLOT = "lr_finder.png"
RESULT = "lr_finder.json"


@dataclass
class RangeTestResult:
    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    suggestion: float
    diverged_at: float | None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)


def range_test(step: Callable[[float], float], *, min_lr: float, max_lr: float, steps: int) -> RangeTestResult:
    """Call ``step(lr)`` (one optimizer step at that LR, returning its loss) along the range."""
    lrs: list[float] = []
    losses: list[float] = []
    smoothed: list[float] = []
    average = 0.0
    best = math.inf
    diverged_at = None
    for i in range(steps):
        lr = min_lr * (max_lr / min_lr) ** (i / max(1, steps - 1))
        loss = step(lr)
        lrs.append(lr)
        losses.append(loss)
        if not math.isfinite(loss):
            diverged_at = lr
            break
        average = SMOOTHING * average + (1 - SMOOTHING) * loss
        value = average / (1 - SMOOTHING ** (i + 1))
        smoothed.append(value)
        best = min(best, value)
        if i > 5 and value > DIVERGENCE_FACTOR * best:
            diverged_at = lr
            break
    if not smoothed:
        raise RuntimeError("the LR range test produced no finite loss; lower lrFinder.minLr")
    at_min = min(range(len(smoothed)), key=smoothed.__getitem__)
    return RangeTestResult(lrs, losses, smoothed, lrs[at_min] / 10.0, diverged_at)


def plot(result: RangeTestResult, path: Path) -> None:
    # Imported here: a backend must be chosen before pyplot is imported, and choosing one when this
    # module is imported would impose it on every program that imports it.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    n = len(result.smoothed)
    ax.plot(result.lrs[:n], result.losses[:n], color="0.75", label="loss")
    ax.plot(result.lrs[:n], result.smoothed, color="C0", label="smoothed loss")
    ax.axvline(result.suggestion, color="C3", linestyle="--", label=f"suggested lr {result.suggestion:.2e}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss")
    ax.set_title("LR range test")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def find_learning_rate(
    spec: TrainingJobSpec,
    prepared: PreparedData,
    ctx: WorldContext,
    *,
    model_factory: Callable[[], torch.nn.Module],
    device: torch.device,
) -> float:
    """Run the range test on every rank (gradients averaged like data parallel); rank 0 reports.

    Uses plain AdamW on a throw-away copy of the model so the real run starts from fresh weights.
    Writes ``lr_finder.png`` and ``lr_finder.json`` to the output and returns the suggestion.
    """
    finder = spec.training.lr_finder
    torch.manual_seed(spec.training.seed)
    model = model_factory().to(device)
    optimizer = torch.optim.AdamW(
        model.param_groups(spec.training.optimizer.weight_decay),  # type: ignore[operator]
        lr=finder.min_lr,
        betas=tuple(spec.training.optimizer.betas),
        eps=spec.training.optimizer.eps,
    )
    reader = SampleReader(
        join_uri(prepared.prepared_uri, "train"),
        storage_for(prepared.prepared_uri, spec.s3),
        spec.model.context_length,
        rank=ctx.rank,
        world_size=ctx.world_size,
        seed=spec.training.seed + 1,
        shuffle_window=spec.data.shuffle_window,
    )
    world = ctx.world_size

    def one_step(lr: float) -> float:
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = reader.next_batch(spec.training.micro_batch_size)
        _, loss = model(*to_device(x, y, device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for param in model.parameters():
            if param.grad is not None and world > 1:
                dist.all_reduce(param.grad)
                param.grad /= world
        if spec.training.gradient_clipping > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), spec.training.gradient_clipping)
        optimizer.step()
        return mean(float(loss.item()), world)

    result = range_test(one_step, min_lr=finder.min_lr, max_lr=finder.max_lr, steps=finder.steps)
    if ctx.rank == 0:
        outputs = RunOutputs(spec)
        out = outputs.dir
        plot(result, out / PLOT)
        (out / RESULT).write_text(result.to_json())
        outputs.publish([PLOT, RESULT])
        print(f"LR range test: suggested peak lr {result.suggestion:.3g} (plot: {out / PLOT})", flush=True)
    return result.suggestion
