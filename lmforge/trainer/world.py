"""What every trainer process does first, whatever it runs (training or the LR range test).

Join the process group, check that the spec fits the world that was launched, and prepare the data:
rank 0 first (it tokenizes, or finds the prepared data reusable), printing its report, then the
others, silently, once rank 0 is done. The clock of the run (``summary.json``'s ``seconds``) starts
once the process group is up.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lmforge.api.manifest import TrainingJob
from lmforge.api.training import TrainingJobSpec
from lmforge.data.preparation import PreparedData, prepare_data
from lmforge.trainer.context import WorldContext
from lmforge.trainer.device import rank_device
from lmforge.trainer.engine import init_distributed


class InvalidForThisRun(Exception):
    """The manifest cannot run in this world (e.g. the batch does not split); exit INVALID_SPEC."""


@dataclass
class World:
    """This process's start: the spec, its place in the world, its device and the prepared data."""

    spec: TrainingJobSpec
    ctx: WorldContext
    device: torch.device
    prepared: PreparedData
    started: float
    """``time.time()`` once the process group was up."""


def join_world(manifest: TrainingJob, threads: int | None) -> World:
    """Join the world, check it fits the spec, and prepare the data (rank 0 first)."""
    spec = manifest.spec
    ctx = WorldContext.from_env(manifest.metadata.name, manifest.metadata.namespace or "default")
    if threads:
        torch.set_num_threads(threads)
    device = rank_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    init_distributed()
    started = time.time()
    try:
        spec.check_world_size(ctx.world_size, origin="the launched world")
    except Exception as exc:
        raise InvalidForThisRun(str(exc)) from None
    prepared = prepare_data(spec, log=lambda text: print(text, flush=True)) if ctx.is_main else None
    dist.barrier()
    if prepared is None:
        prepared = prepare_data(spec, log=lambda text: None)
    return World(spec, ctx, device, prepared, started)
