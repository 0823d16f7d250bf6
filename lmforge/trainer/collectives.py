"""The few collectives the run's components share: rank 0's object for all, a mean, an any.

Every rank must make the same call at the same point of the run (they block until all have). They
are here, not in one component, because the checkpointer, the evaluator, the logger and the loop
all need them. Values travel as one-element tensors on the rank's device (NCCL, the GPU backend,
reduces GPU tensors only; gloo's are on the CPU): a handful of bytes per call, and the only one
made every step is :func:`any_rank` (the SIGTERM check).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from lmforge.trainer.device import rank_device


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (the others' argument is ignored)."""
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def mean(value: float, world: int) -> float:
    """The mean of every rank's ``value`` (``world`` ranks)."""
    tensor = torch.tensor([value], dtype=torch.float64, device=rank_device())
    dist.all_reduce(tensor)
    return float(tensor.item()) / world


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one."""
    tensor = torch.tensor([1 if flag else 0], dtype=torch.int32, device=rank_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())
