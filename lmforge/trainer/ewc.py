"""Elastic weight consolidation (Kirkpatrick et al. 2017) for continual training.

The penalty ``weight / 2 * sum_i F_i (theta_i - theta0_i)^2`` keeps the parameters that the earlier
data's loss is most sensitive to (large diagonal Fisher ``F``) close to the initial model's
``theta0``, and leaves the rest free to learn the new data.

``F`` is the empirical Fisher diagonal: the mean over ``samples`` earlier training sequences of the
squared gradient of that sequence's mean token loss, computed once at the start on the plain
(not yet DeepSpeed-wrapped) model in fp32. Every process takes its share of the sequences
(``rank, rank + world, ...``) and the sums are all-reduced, so all ranks hold the same ``F`` and a
restarted run recomputes exactly the same one (no extra checkpoint state).

The penalty reads the live parameters of ``engine.module``: with ZeRO 0-2 every process holds all of
them (ZeRO 1/2 partition only optimizer state and gradients), which is why ZeRO 3 is refused at
validation (``continual.ewc``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from lmforge.trainer.device import to_device


class EwcPenalty:
    """``weight / 2 * sum F (theta - theta0)^2`` over the named parameters of a module."""

    def __init__(self, anchor: dict[str, Tensor], fisher: dict[str, Tensor], weight: float) -> None:
        if anchor.keys() != fisher.keys():
            raise ValueError("anchor and fisher must cover the same parameters")
        self.anchor = anchor
        self.fisher = fisher
        self.weight = float(weight)

    def penalty(self, module: nn.Module) -> Tensor:
        """The penalty for ``module``'s current parameters (a scalar with a graph to them)."""
        total: Tensor | None = None
        for name, param in module.named_parameters():
            fisher = self.fisher.get(name)
            if fisher is None:
                continue
            term = (fisher * (param.float() - self.anchor[name]).pow(2)).sum()
            total = term if total is None else total + term
        if total is None:
            raise ValueError("no parameter of the module matches the EWC anchor; was the model rebuilt?")
        return 0.5 * self.weight * total

    def summary(self) -> dict[str, float]:
        """Size of the Fisher estimate, for the run's report."""
        values = torch.cat([f.flatten() for f in self.fisher.values()])
        return {"weight": self.weight, "fisher_mean": float(values.mean()), "fisher_max": float(values.max())}


def estimate(
    model: nn.Module,
    sample: Callable[[int], tuple[np.ndarray, np.ndarray]],
    samples: int,
    weight: float,
    *,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | None = None,
) -> EwcPenalty:
    """Fisher diagonal of ``model`` on sequences ``sample(0) .. sample(samples-1)`` (every rank must call this).

    ``sample(i)`` gives the ``i``-th earlier sequence as int64 arrays ``(x, y)``. The model runs in
    eval mode (no dropout, so no random numbers are consumed); no gradients are left behind.
    """
    device = device or torch.device("cpu")
    was_training = model.training
    model.to(device)
    model.eval()
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    fisher = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    for position in range(rank, samples, world_size):
        x, y = sample(position)
        model.zero_grad(set_to_none=True)
        _, loss = model(*to_device(torch.from_numpy(x)[None], torch.from_numpy(y)[None], device))
        loss.backward()
        for name, param in params.items():
            if param.grad is not None:
                fisher[name] += param.grad.detach().float().pow(2)
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    names = list(fisher)
    flat = torch.cat([fisher[name].flatten() for name in names])
    if world_size > 1 and dist.is_available() and dist.is_initialized():
        dist.all_reduce(flat)
    flat /= samples
    offset = 0
    for name in names:
        count = fisher[name].numel()
        fisher[name] = flat[offset : offset + count].view_as(fisher[name]).clone()
        offset += count
    anchor = {name: p.detach().float().clone() for name, p in params.items()}
    return EwcPenalty(anchor, fisher, weight)
