"""The training loop of pruning recovery and distillation: the trainer's DeepSpeed engine on one process.

A CompressionJob runs one process, so :func:`fit` does not start torch's elastic launcher. It joins a
world of one (:func:`single_process_world`: gloo on CPU, NCCL on GPU, as the trainer's processes do,
with an in-memory store instead of a TCP rendezvous) and builds the engine with the trainer's own
:func:`lmforge.trainer.engine.initialize` from a training block that says: AdamW (betas 0.9/0.95, no
weight decay unless asked), gradient clipping at 1.0, ZeRO stage 0 (one process has nothing to
shard), fp32 on CPU and bf16 on a GPU that supports it. The learning rate follows
:func:`lmforge.trainer.schedule.learning_rate`: linear warm-up over the first 5% of steps, then
cosine decay to 10% of the peak.

The world is left as it was found: a world :func:`fit` started is torn down when it returns (barrier,
then ``destroy_process_group`` through ``deepspeed.comm`` so DeepSpeed drops its cached groups), and
an already initialised world of one is reused and left alone. The model is trained in place and
handed back on its original device and dtype.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from lmforge.trainer.device import on_gpu, to_device
from lmforge.trainer.model import GPT

LossFn = Callable[[Any, Tensor, Tensor], Tensor]
"""``loss_fn(module, x, y)``: the loss of one micro-batch; ``module`` is the DeepSpeed engine."""

_WORLD_ENV = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}


@dataclass
class EngineInfo:
    """What trained the model, as read back from the engine object (shown in the step's report)."""

    engine: str
    deepspeed: str
    zero_stage: int
    precision: str
    optimizer: str
    world_size: int
    backend: str
    device: str

    def summary(self) -> str:
        return (
            f"{self.engine} (deepspeed {self.deepspeed}, ZeRO stage {self.zero_stage}, {self.precision}, "
            f"{self.optimizer}, {self.world_size} process, {self.backend}, {self.device})"
        )


@dataclass
class FitResult:
    """The loss of every step and the engine that took them."""

    losses: list[float]
    engine: EngineInfo
    seconds: float = 0.0
    lr: float = 0.0
    schedule: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return len(self.losses)

    @property
    def final_loss(self) -> float | None:
        tail = self.losses[-10:]
        return sum(tail) / len(tail) if tail else None

    def to_dict(self) -> dict[str, Any]:
        """The record that goes into results.json."""
        return {
            "steps": self.steps,
            "lr": self.lr,
            "schedule": self.schedule,
            "first_loss": self.losses[0] if self.losses else None,
            "final_loss": self.final_loss,
            "seconds": round(self.seconds, 2),
            **asdict(self.engine),
            **self.extra,
        }


def training_device() -> torch.device:
    """Where :func:`fit` trains: the first GPU unless DS_ACCELERATOR=cpu, else the CPU."""
    return torch.device("cuda", 0) if on_gpu() else torch.device("cpu")


def default_precision() -> str:
    """bf16 on a GPU that supports it, fp32 otherwise (bf16 matmuls are slow on most CPUs)."""
    return "bf16" if on_gpu() and torch.cuda.is_bf16_supported() else "fp32"


def _loopback_interface() -> str | None:
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        return None
    return next((name for name in names if name in ("lo", "lo0")), None)


@contextlib.contextmanager
def single_process_world() -> Iterator[bool]:
    """A torch.distributed world of one for the engine; yields whether it was started here.

    Started here: rank-0 environment, an in-memory store (no TCP rendezvous, no port), gloo bound
    to the loopback interface on CPU (NCCL on GPU), and ``deepspeed.init_distributed`` as in the
    trainer. On exit: barrier, ``destroy_process_group``, and the environment as it was.
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed's import, which picks its accelerator
    import deepspeed
    import deepspeed.comm as ds_dist
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() != 1:
            raise RuntimeError(
                f"compression trains on one process, but this process is already in a torch.distributed "
                f"world of {dist.get_world_size()}; run `lmforge compress` on its own"
            )
        yield False
        return
    backend = "nccl" if on_gpu() else "gloo"
    env = dict(_WORLD_ENV)
    loopback = _loopback_interface()
    if backend == "gloo" and loopback and "GLOO_SOCKET_IFNAME" not in os.environ:
        env["GLOO_SOCKET_IFNAME"] = loopback  # a world of one has no peer to reach
    saved = {name: os.environ.get(name) for name in env}
    ds_logger = logging.getLogger("DeepSpeed")
    level = ds_logger.level
    os.environ.update(env)
    ds_logger.setLevel(logging.WARNING)
    try:
        if backend == "nccl":
            torch.cuda.set_device(0)
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        try:
            deepspeed.init_distributed(dist_backend=backend)
            yield True
        finally:
            ds_dist.barrier()
            ds_dist.destroy_process_group()
    finally:
        ds_logger.setLevel(level)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _engine_spec(micro_batch: int, lr: float, weight_decay: float, precision: str, zero_stage: int) -> Any:
    """A TrainingJobSpec carrying only the training block that ``deepspeed_config`` reads."""
    from lmforge.api.training import Optimizer, Training, TrainingJobSpec, Zero

    training = Training(
        micro_batch_size=micro_batch,
        optimizer=Optimizer(lr=lr, weight_decay=weight_decay),
        gradient_clipping=1.0,
        precision=precision,
        zero=Zero(stage=zero_stage),
    )
    return TrainingJobSpec.model_construct(training=training)


def engine_info(engine: Any) -> EngineInfo:
    import deepspeed
    import torch.distributed as dist

    precision = "bf16" if engine.bfloat16_enabled() else "fp16" if engine.fp16_enabled() else "fp32"
    optimizer = engine.optimizer
    inner = getattr(optimizer, "optimizer", optimizer)  # mixed-precision wrappers hold the torch optimizer
    return EngineInfo(
        engine=type(engine).__name__,
        deepspeed=deepspeed.__version__,
        zero_stage=int(engine.zero_optimization_stage()),
        precision=precision,
        optimizer=type(inner).__name__,
        world_size=dist.get_world_size(),
        backend=str(dist.get_backend()),
        device=str(engine.device),
    )


def schedule_for(steps: int) -> Any:
    """Warm-up over the first 5% of steps, then cosine to 10% of the peak."""
    from lmforge.api.training import Schedule

    return Schedule(warmup_steps=max(1, steps // 20), decay="cosine", min_lr_ratio=0.1)


def fit(
    model: GPT,
    next_batch: Callable[[], tuple[Tensor, Tensor]],
    steps: int,
    lr: float,
    loss_fn: LossFn | None = None,
    *,
    weight_decay: float = 0.0,
    precision: str | None = None,
    zero_stage: int = 0,
    log: Callable[[str], None] = lambda text: None,
    log_every: int = 50,
) -> FitResult:
    """Train ``model`` in place for ``steps`` optimizer steps through a DeepSpeed engine.

    ``loss_fn(engine, x, y)`` replaces the model's own cross-entropy (distillation uses it).
    """
    from lmforge.trainer.engine import initialize, set_learning_rate
    from lmforge.trainer.schedule import learning_rate

    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    param = next(model.parameters())
    home_device, home_dtype = param.device, param.dtype
    precision = precision or default_precision()
    schedule = schedule_for(steps)
    started = time.time()
    losses: list[float] = []
    with single_process_world():
        x, y = next_batch()
        model.to(dtype=torch.float32)
        engine = initialize(model, _engine_spec(x.size(0), lr, weight_decay, precision, zero_stage), 1, peak_lr=lr)
        info = engine_info(engine)
        log(f"  training through {info.summary()}")
        device = engine.device
        engine.train()
        try:
            for step in range(steps):
                if step:
                    x, y = next_batch()
                set_learning_rate(engine, learning_rate(step, peak=lr, total_steps=steps, schedule=schedule))
                x, y = to_device(x, y, device)
                loss = loss_fn(engine, x, y) if loss_fn is not None else engine(x, y)[1]
                engine.backward(loss)
                engine.step()
                losses.append(float(loss.item()))
                if (step + 1) % log_every == 0 or step + 1 == steps:
                    window = losses[-log_every:]
                    log(
                        f"  step {step + 1}/{steps} loss {sum(window) / len(window):.4f} ({time.time() - started:.0f}s)"
                    )
        finally:
            del engine
    model.to(device=home_device, dtype=home_dtype)
    model.eval()
    return FitResult(
        losses,
        info,
        seconds=time.time() - started,
        lr=lr,
        schedule=f"warm-up {schedule.warmup_steps} steps, cosine to {schedule.min_lr_ratio:g} x peak",
    )
