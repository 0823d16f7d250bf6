"""What each trainer process runs (started by :mod:`lmforge.trainer.launch`): training, or only the LR range test.

:class:`Trainer` builds the run's components in the order they depend on each other (world, model,
checkpoints, peak LR, engine, readers, evaluator, logger), then :meth:`Trainer.train` is the loop,
short enough to read top to bottom in nanoGPT's manner: schedule the LR, accumulate micro-steps
through the DeepSpeed engine, then log, evaluate, check for SIGTERM and checkpoint as their
intervals come round. The components are in their own modules (see :mod:`lmforge.trainer`).
"""

from __future__ import annotations

import gc
import signal
import time
from functools import partial
from types import FrameType

import torch.distributed as dist

from lmforge.api.manifest import TrainingJob
from lmforge.api.training import LrFinder
from lmforge.trainer.build import build_model
from lmforge.trainer.checkpoint import Checkpointer
from lmforge.trainer.collectives import any_rank
from lmforge.trainer.continual import ContinualRun, gate_message
from lmforge.trainer.device import to_device
from lmforge.trainer.engine import full_state_dict, initialize, set_learning_rate
from lmforge.trainer.evaluate import Evaluator
from lmforge.trainer.logger import StepLogger
from lmforge.trainer.lr_finder import find_learning_rate
from lmforge.trainer.outputs import RunOutputs, RunResult
from lmforge.trainer.readers import mix_counts, open_readers
from lmforge.trainer.schedule import learning_rate
from lmforge.trainer.world import join_world

PREEMPTED_EXIT = 128 + signal.SIGTERM
"""Exit code after a SIGTERM was honoured with a checkpoint (the conventional 143)."""


class SigtermFlag:
    """Raised by SIGTERM (preemption, deletion); the loop checks it on every rank after each step."""

    def __init__(self) -> None:
        self.raised = False
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        self.raised = True


class Trainer:
    """One process's training run: its components, then :meth:`train`."""

    def __init__(self, manifest: TrainingJob, *, threads: int | None = None) -> None:
        world = join_world(manifest, threads)
        spec, ctx, device, prepared = world.spec, world.ctx, world.device, world.prepared
        self.spec, self.ctx, self.device, self.prepared, self.started = spec, ctx, device, prepared, world.started
        self.outputs = RunOutputs(spec)
        # stage: continual: replay, EWC, forgetting report (None otherwise); checks the earlier data first.
        self.continual = ContinualRun.from_spec(spec, prepared.tokenizer, rank=ctx.rank, world_size=ctx.world_size)
        model = build_model(spec, prepared)  # the same initial weights on every rank
        self.total_steps = spec.total_steps(ctx.world_size)
        self.checkpointer = Checkpointer(spec, ctx, self.outputs)
        self.resume = self.checkpointer.newest()  # whatever stopped the last attempt

        # Peak learning rate: the spec's, or the LR range test's suggestion (kept across restarts).
        peak_lr = spec.training.optimizer.lr
        if self.resume is not None and self.resume.peak_lr:
            peak_lr = self.resume.peak_lr
        elif peak_lr == "auto":
            # The range test starts from the run's starting weights (a fine-tune's best LR is not a fresh model's).
            factory = partial(build_model, spec, prepared)
            peak_lr = find_learning_rate(spec, prepared, ctx, model_factory=factory, device=device)
            model = build_model(spec, prepared)
        self.peak_lr = float(peak_lr)
        self.model_config = model.config
        self.ewc = self.continual.ewc(model, device) if self.continual is not None else None
        self.engine = initialize(model, spec, ctx.world_size, peak_lr=self.peak_lr)
        self.accumulation = spec.gradient_accumulation_steps(ctx.world_size)
        self.tokens_per_step = (
            spec.training.micro_batch_size * self.accumulation * ctx.world_size * spec.model.context_length
        )

        self.train_reader, self.val_reader = open_readers(spec, prepared, ctx, self.continual)
        self.evaluator = Evaluator(
            self.engine,
            batches=spec.training.eval_batches,
            micro_batch=spec.training.micro_batch_size,
            world_size=ctx.world_size,
            device=device,
        )
        # continual: the earlier data's held-out loss with the initial weights (before any checkpoint is loaded).
        self.forgetting_before = self.continual.measure(self.evaluator.loss) if self.continual is not None else []
        self.start_step, self.start_tokens = 0, 0  # where the loop starts: step 0, or the checkpoint's
        if self.resume is not None:
            self.start_step, self.start_tokens = self.checkpointer.load(self.engine, self.train_reader, self.resume)
        self.logger = StepLogger(
            spec,
            ctx,
            self.outputs,
            engine=self.engine,
            reader=self.train_reader,
            total_steps=self.total_steps,
            step=self.start_step,
            tokens=self.start_tokens,
            tokens_per_step=self.tokens_per_step,
            resumed_from=self.resume.tag if self.resume is not None else None,
            flops_per_token=model.flops_per_token(),
            device=device,
        )
        self.sigterm = SigtermFlag()

    def train(self) -> RunResult:
        """The loop, from the first (or resumed) step to the last, or to a SIGTERM's checkpoint."""
        engine, reader, val_reader, device, ewc = self.engine, self.train_reader, self.val_reader, self.device, self.ewc
        logger, evaluator, checkpointer, sigterm = self.logger, self.evaluator, self.checkpointer, self.sigterm
        training, checkpoint_interval = self.spec.training, self.spec.checkpoint.interval
        step, tokens, total_steps, peak_lr = self.start_step, self.start_tokens, self.total_steps, self.peak_lr
        accumulation, micro, tokens_per_step = self.accumulation, training.micro_batch_size, self.tokens_per_step
        losses: list[float] = []
        data_wait = 0.0
        last_eval: float | None = None
        preempted = False

        engine.train()
        # Setup left hundreds of thousands of long-lived objects (model, DeepSpeed, boto, tokenizer): move
        # them out of the collector's reach, so a full collection does not stall a rank for a fraction
        # of a second now and then (with many ranks, every step waits for the slowest one).
        gc.collect()
        gc.freeze()
        while step < total_steps:
            lr = learning_rate(step, peak=peak_lr, total_steps=total_steps, schedule=training.schedule)
            set_learning_rate(engine, lr)
            step_loss = 0.0
            for _ in range(accumulation):
                waited = time.time()
                x, y = reader.next_batch(micro)
                data_wait += time.time() - waited
                _, loss = engine(*to_device(x, y, device))
                engine.backward(loss if ewc is None else loss + ewc.penalty(engine.module))
                engine.step()
                step_loss += float(loss.item()) / accumulation
            step += 1
            tokens += tokens_per_step
            logger.tokens.inc(tokens_per_step)
            losses.append(step_loss)

            if step % training.log_interval == 0 or step == total_steps:
                logger.log(step, tokens, lr, losses, data_wait)
                losses, data_wait = [], 0.0
            if step % training.eval_interval == 0 or step == total_steps:
                last_eval = evaluator.loss(val_reader)
                logger.evaluated(step, last_eval)
            preempted = any_rank(sigterm.raised)
            if step % checkpoint_interval == 0 or step == total_steps or preempted:
                checkpointer.save(engine, reader, step=step, tokens=tokens, peak_lr=peak_lr, logger=logger)
            if preempted:
                logger.note(f"SIGTERM: checkpoint at step {step} saved; exiting")
                break
        gc.unfreeze()  # give setup's objects back to the collector (train() may run again in this process)
        return self._finish(step, tokens, last_eval, preempted)

    def _finish(self, step: int, tokens: int, last_eval: float | None, preempted: bool) -> RunResult:
        """Export the model and write the reports (unless preempted); exit 143 when preempted."""
        self.logger.close_progress()
        result = RunResult(
            steps=step,
            resumed_from=self.resume.step if self.resume is not None else None,
            final_loss=self.logger.final_loss,
            final_eval_loss=last_eval,
            tokens=tokens,
            tokens_per_second=self.logger.tokens_per_second,
            peak_lr=self.peak_lr,
            losses=self.logger.losses,
            data_mix=mix_counts(self.train_reader),
        )
        continual, outputs = self.continual, self.outputs
        if not preempted:
            if continual is not None and continual.sources:
                after = continual.measure(self.evaluator.loss)
                result.forgetting = continual.report(self.forgetting_before, after, self.train_reader, self.ewc)
            state = full_state_dict(self.engine, self.spec.training.zero.stage)
            if self.ctx.is_main:
                result.model_uri = outputs.export(state, self.model_config, self.prepared.tokenizer)
                if continual is not None and result.forgetting is not None:
                    continual.write(result.forgetting, outputs.dir, outputs.storage, outputs.uri)
                outputs.write_summary(result, self.started)
        dist.barrier()
        self.logger.close()
        result.seconds = time.time() - self.started
        if preempted:
            raise SystemExit(PREEMPTED_EXIT)
        if result.forgetting is not None and result.forgetting["passed"] is False:
            result.quality_gate = gate_message(result.forgetting)  # every rank: the losses are all-reduced means
        return result


def train(manifest: TrainingJob, *, threads: int | None = None) -> RunResult:
    """Train the manifest's model in this process's slot of the world."""
    return Trainer(manifest, threads=threads).train()


def find_lr(manifest: TrainingJob, *, threads: int | None = None) -> float:
    """`lmforge lr-find`: only the LR range test, on the whole world."""
    world = join_world(manifest, threads)
    spec = world.spec
    if spec.training.lr_finder is None:
        spec = spec.model_copy(update={"training": spec.training.model_copy(update={"lr_finder": LrFinder()})})
    factory = partial(build_model, spec, world.prepared)
    suggestion = find_learning_rate(spec, world.prepared, world.ctx, model_factory=factory, device=world.device)
    dist.barrier()
    return suggestion
