"""What the run tells the world, once per log interval, evaluation and checkpoint: one call each.

Three sinks get the same figures: this process's Prometheus endpoint (:class:`TrainerMetrics`,
which the operator scrapes for ``status.progress`` and the alerts read), rank 0's
``metrics.jsonl`` (``lmforge report``; appended to across restarts) and rank 0's progress bar or
plain log lines. Between log intervals nothing here runs except the loop's own per-step token
counter, so logging costs nothing per step: tokens/s, ETA and MFU are measured over the interval.
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import TYPE_CHECKING, Any

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from lmforge import contract
from lmforge.api.training import TrainingJobSpec
from lmforge.data.reader_protocol import Reader
from lmforge.trainer.collectives import mean
from lmforge.trainer.context import WorldContext
from lmforge.trainer.metrics import JsonlWriter, TrainerMetrics, peak_flops
from lmforge.trainer.outputs import RunOutputs

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine


class ProgressBar:
    """Rich progress bar on a terminal, plain log lines elsewhere (pods, CI); silent when not enabled."""

    def __init__(self, total: int, start: int, enabled: bool) -> None:
        self.enabled = enabled
        self.bar = None
        if enabled and sys.stdout.isatty():
            self.bar = Progress(
                TextColumn("step {task.completed}/{task.total}"),
                BarColumn(),
                TextColumn("loss {task.fields[loss]}  {task.fields[tps]} tok/s"),
                TimeRemainingColumn(),
            )
            self.task = self.bar.add_task("train", total=total, completed=start, loss="-", tps="-")
            self.bar.start()

    def update(self, step: int, total: int, loss: float, tps: float, lr: float, eta: float) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(self.task, completed=step, loss=f"{loss:.3f}", tps=f"{tps:,.0f}")
        else:
            print(
                f"step {step}/{total} loss {loss:.4f} lr {lr:.2e} tokens/s {tps:,.0f} eta {eta:,.0f}s",
                flush=True,
            )

    def note(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.console.print(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


class StepLogger:
    """The run's metrics from the first step on (after a resume: from the checkpoint's step and tokens).

    :attr:`tokens` is the Prometheus token counter, which the loop bumps every step; :meth:`log`,
    :meth:`evaluated` and :meth:`checkpointed` do everything else. :attr:`losses`,
    :attr:`final_loss` and :attr:`tokens_per_second` are what the run reports at the end.
    """

    def __init__(
        self,
        spec: TrainingJobSpec,
        ctx: WorldContext,
        outputs: RunOutputs,
        *,
        engine: DeepSpeedEngine,
        reader: Reader,
        total_steps: int,
        step: int,
        tokens: int,
        tokens_per_step: int,
        resumed_from: str | None,
        flops_per_token: int,
        device: torch.device,
    ) -> None:
        self.engine = engine
        self.reader = reader
        self.total_steps = total_steps
        self.tokens_per_step = tokens_per_step
        self.world_size = ctx.world_size
        self.device = device
        self.metrics = TrainerMetrics(
            job=ctx.job,
            namespace=ctx.namespace,
            rank=ctx.rank,
            local_rank=ctx.local_rank,
            port=int(os.environ.get("LMFORGE_METRICS_PORT", spec.metrics.port)),
        )
        self.metrics.total_steps.set(total_steps)
        self.metrics.train_step.set(step)
        self.metrics.tokens.inc(tokens)
        self.tokens = self.metrics.tokens
        jsonl_path = outputs.dir / contract.METRICS_JSONL
        self.jsonl = JsonlWriter(jsonl_path) if ctx.is_main else None
        if ctx.is_main and not outputs.is_local:
            outputs.fetch_metrics()
        self.progress = ProgressBar(total_steps, step, enabled=ctx.is_main)
        if resumed_from is not None:
            self.progress.note(f"resumed from checkpoint {resumed_from} (step {step})")
        self.peak = peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
        self.flops_per_token = flops_per_token
        self.losses: list[float] = []
        self.final_loss: float | None = None
        self.tokens_per_second = 0.0
        self.interval_start = time.time()
        self.interval_start_step = step

    def log(self, step: int, tokens: int, lr: float, losses: list[float], data_wait: float) -> None:
        """One log interval ends at ``step``: ``losses`` of its steps, ``data_wait`` seconds spent on batches."""
        mean_loss = mean(sum(losses) / len(losses), self.world_size)
        elapsed = max(1e-9, time.time() - self.interval_start)
        tps = (step - self.interval_start_step) * self.tokens_per_step / elapsed
        eta = (self.total_steps - step) * elapsed / max(1, step - self.interval_start_step)
        grad_norm = self.engine.get_global_grad_norm()
        metrics = self.metrics
        metrics.train_loss.set(mean_loss)
        metrics.learning_rate.set(lr)
        metrics.train_step.set(step)
        metrics.tokens_per_second.set(tps)
        metrics.data_wait.set(data_wait)
        metrics.eta_seconds.set(eta)
        if grad_norm is not None and math.isfinite(float(grad_norm)):
            metrics.grad_norm.set(float(grad_norm))
        record: dict[str, Any] = {
            "step": step,
            "loss": mean_loss,
            "lr": lr,
            "tokens": tokens,
            "tokens_per_second": tps,
            "data_wait_seconds": data_wait,
            "data_position": self.reader.state_dict()["position"],
            "time": time.time(),
        }
        record.update(metrics.observe_data(self.reader))
        if grad_norm is not None:
            record["grad_norm"] = float(grad_norm)
        if self.peak is not None:
            mfu = tps * self.flops_per_token / (self.peak * self.world_size)
            metrics.mfu.set(mfu)
            record["mfu"] = mfu
            metrics.gpu_memory.set(torch.cuda.max_memory_allocated(self.device))
        if self.jsonl is not None:
            self.jsonl.write(record)
        self.progress.update(step, self.total_steps, mean_loss, tps, lr, eta)
        self.losses.append(mean_loss)
        self.final_loss = mean_loss
        self.tokens_per_second = tps
        self.interval_start, self.interval_start_step = time.time(), step

    def evaluated(self, step: int, eval_loss: float) -> None:
        """An evaluation at ``step`` measured ``eval_loss``."""
        self.metrics.eval_loss.set(eval_loss)
        if self.jsonl is not None:
            self.jsonl.write(
                {
                    "step": step,
                    "eval_loss": eval_loss,
                    "eval_perplexity": math.exp(min(eval_loss, 50)),
                    "time": time.time(),
                }
            )
        self.progress.note(f"step {step}: eval loss {eval_loss:.4f} (perplexity {math.exp(min(eval_loss, 50)):.1f})")

    def checkpointed(self, step: int, tag: str, began: float) -> None:
        """The checkpoint ``tag`` of ``step``, begun at ``began`` (``time.time()``), is committed."""
        self.metrics.checkpoint_step.set(step)
        self.metrics.checkpoint_time.set(time.time())
        self.metrics.checkpoint_seconds.set(time.time() - began)
        self.progress.note(f"checkpoint {tag} committed in {time.time() - began:.1f}s")

    def note(self, text: str) -> None:
        self.progress.note(text)

    def close_progress(self) -> None:
        """The loop is over: stop the bar (the endpoint stays up through export)."""
        self.progress.close()

    def close(self) -> None:
        """Stop serving metrics (after the run's last barrier)."""
        self.metrics.close()
