"""Where this process computes, and how a reader's batch gets there.

Readers return int32 batches (a quarter of int64's host memory traffic and host-to-device copy);
:func:`to_device` widens them to the int64 that embeddings and the loss take only after the copy.
"""

from __future__ import annotations

import os

import torch


def on_gpu() -> bool:
    """True when DeepSpeed will run on CUDA (DS_ACCELERATOR=cpu forces CPU)."""
    return os.environ.get("DS_ACCELERATOR", "") != "cpu" and torch.cuda.is_available()


def rank_device() -> torch.device:
    """This process's device: ``cuda:LOCAL_RANK`` on a GPU node, the CPU otherwise."""
    if on_gpu():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def to_device(x: torch.Tensor, y: torch.Tensor, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """A reader's int32 batch on ``device`` as the int64 ``x``, ``y`` (widened after the copy)."""
    return x.to(device, non_blocking=True).long(), y.to(device, non_blocking=True).long()
