"""The small training loop used by pruning recovery and distillation.

A plain PyTorch loop (AdamW, linear warm-up over the first 5% of steps then cosine decay to 10% of
the peak, gradient clipping at 1.0) on one process, not the DeepSpeed engine the TrainingJob uses:
a CompressionJob runs on one node, and recovery/distillation budgets are small.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from torch import Tensor

from lmforge.trainer.model import GPT

LossFn = Callable[[GPT, Tensor, Tensor], Tensor]


def lr_at(step: int, steps: int, peak: float) -> float:
    warmup = max(1, steps // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def fit(
    model: GPT,
    next_batch: Callable[[], tuple[Tensor, Tensor]],
    steps: int,
    lr: float,
    loss_fn: LossFn | None = None,
    *,
    weight_decay: float = 0.0,
    log: Callable[[str], None] = lambda text: None,
    log_every: int = 50,
) -> list[float]:
    """Train ``model`` in place for ``steps`` steps; the loss per step."""
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.param_groups(weight_decay), lr=lr, betas=(0.9, 0.95))
    losses: list[float] = []
    model.train()
    started = time.time()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, lr)
        x, y = next_batch()
        x, y = x.to(device), y.to(device)
        loss = loss_fn(model, x, y) if loss_fn is not None else model(x, y)[1]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            log(
                f"  step {step + 1}/{steps} loss {sum(losses[-log_every:]) / len(losses[-log_every:]):.4f} "
                f"({time.time() - started:.0f}s)"
            )
    model.eval()
    return losses
