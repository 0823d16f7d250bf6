"""Held-out loss: the mean over the same micro-batches every time, so evaluations compare.

Each evaluation rewinds the reader to its start, so step 100's and step 1000's losses are measured
on identical batches (and the continual run's "before" and "after" on each earlier set too). The
mean is over all ranks (each reads its own part of the split), hence identical on every rank.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lmforge.data.reader_protocol import Reader
from lmforge.trainer.collectives import mean
from lmforge.trainer.device import to_device

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine


class Evaluator:
    """``loss(reader)``: the world's mean loss over ``batches`` micro-batches from the start of ``reader``."""

    def __init__(
        self, engine: DeepSpeedEngine, *, batches: int, micro_batch: int, world_size: int, device: torch.device
    ) -> None:
        self.engine = engine
        self.batches = batches
        self.micro_batch = micro_batch
        self.world_size = world_size
        self.device = device

    def loss(self, reader: Reader) -> float:
        engine = self.engine
        engine.eval()
        reader.load_state_dict({**reader.state_dict(), "position": 0, "epoch": 0})
        total = 0.0
        with torch.no_grad():
            for _ in range(self.batches):
                x, y = reader.next_batch(self.micro_batch)
                _, loss = engine(*to_device(x, y, self.device))
                total += float(loss.item())
        engine.train()
        return mean(total / self.batches, self.world_size)
