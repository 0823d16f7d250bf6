"""Every DeepSpeed call of the trainer: the process group, the engine from the spec (ZeRO stage and
offload, precision, accumulation, clipping, AdamW) and the full weights out of it for export.

``deepspeed`` is imported inside these functions, never at module level: DeepSpeed picks its
accelerator from ``DS_ACCELERATOR`` once, when it is first imported, and
:func:`lmforge.trainer.launch.launch` sets that variable before its workers start; importing this
module (the loop, compress and tests do) must not make that choice early, nor cost DeepSpeed's
seconds-long import where no engine is made.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from lmforge.api.training import TrainingJobSpec
from lmforge.trainer.device import on_gpu

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine


def init_distributed() -> None:
    """Join the process group torch's launcher described in the environment: NCCL on GPUs, gloo on CPUs."""
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if on_gpu() else "gloo")


def deepspeed_config(spec: TrainingJobSpec, world_size: int, *, peak_lr: float) -> dict[str, Any]:
    """The DeepSpeed JSON config the spec describes.

    The learning rate in the optimizer block is only the starting value: the loop sets the
    scheduled LR on every step (see :mod:`lmforge.trainer.schedule`).
    """
    training = spec.training
    accumulation = spec.gradient_accumulation_steps(world_size)
    zero: dict[str, Any] = {"stage": training.zero.stage}
    if training.zero.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu()}
    if training.zero.offload_params == "cpu":
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu()}
    adam: dict[str, Any] = {
        "lr": peak_lr,
        "betas": list(training.optimizer.betas),
        "eps": training.optimizer.eps,
        "weight_decay": training.optimizer.weight_decay,
    }
    if not on_gpu() and training.zero.offload_optimizer == "none":
        adam["torch_adam"] = True  # FusedAdam is CUDA-only
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": training.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": training.micro_batch_size * accumulation * world_size,
        "gradient_clipping": training.gradient_clipping,
        "optimizer": {"type": "AdamW", "params": adam},
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if training.precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif training.precision == "fp16":
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    return config


def initialize(model: torch.nn.Module, spec: TrainingJobSpec, world_size: int, *, peak_lr: float) -> DeepSpeedEngine:
    """``deepspeed.initialize`` with weight decay only on matrices (not norms)."""
    import deepspeed

    groups = model.param_groups(spec.training.optimizer.weight_decay)  # type: ignore[operator]
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=groups,
        config=deepspeed_config(spec, world_size, peak_lr=peak_lr),
    )
    return engine


def set_learning_rate(engine: DeepSpeedEngine, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


def full_state_dict(engine: DeepSpeedEngine, stage: int) -> dict[str, torch.Tensor] | None:
    """fp32 weights on rank 0 (None elsewhere); every rank must call this (ZeRO 3 gathers the shards)."""
    import deepspeed

    module = engine.module
    if stage == 3:
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            state = (
                {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
                if dist.get_rank() == 0
                else None
            )
        return state
    if dist.get_rank() != 0:
        return None
    return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
