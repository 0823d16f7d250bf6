"""The training loop each process runs: data, model, DeepSpeed engine, eval, checkpoints, export.

One function, :func:`train`, in nanoGPT's spirit: read it top to bottom to know what a run does.
It runs inside every process of the world (started by :mod:`lmforge.trainer.launch`).
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from lmforge.api.manifest import TrainingJob
from lmforge.trainer.context import WorldContext
from lmforge.trainer.device import on_gpu, rank_device, to_device

log = logging.getLogger("lmforge.trainer")

PREEMPTED_EXIT = 128 + signal.SIGTERM
"""Exit code after a SIGTERM was honoured with a checkpoint (the conventional 143)."""


class InvalidForThisRun(Exception):
    """The manifest cannot run in this world (e.g. the batch does not split); exit INVALID_SPEC."""


@dataclass
class RunResult:
    """What rank 0 reports back to the launcher."""

    steps: int = 0
    resumed_from: int | None = None
    final_loss: float | None = None
    final_eval_loss: float | None = None
    tokens: int = 0
    tokens_per_second: float = 0.0
    seconds: float = 0.0
    model_uri: str | None = None
    peak_lr: float | None = None
    losses: list[float] = field(default_factory=list)
    forgetting: dict[str, Any] | None = None
    data_mix: dict[str, Any] | None = None
    """Per mixed source (data.mix, replay): the target fraction and the samples the world drew from it."""
    quality_gate: str | None = None
    """Set (on every rank) when continual.maxForgetting failed: the launcher exits QUALITY_GATE with it."""


# --- distributed helpers ---------------------------------------------------------------------


def _broadcast(obj: Any) -> Any:
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def _mean(value: float, world: int) -> float:
    tensor = torch.tensor([value], dtype=torch.float64, device=rank_device())  # NCCL reduces GPU tensors only
    dist.all_reduce(tensor)
    return float(tensor.item()) / world


def _any(flag: bool) -> bool:
    tensor = torch.tensor([1 if flag else 0], dtype=torch.int32, device=rank_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


# --- pieces of the run ---------------------------------------------------------------------


def _evaluate(engine: Any, reader: Any, batches: int, micro_batch: int, world: int, device: torch.device) -> float:
    """Mean held-out loss over the same ``batches`` micro-batches every time."""
    engine.eval()
    reader.load_state_dict({**reader.state_dict(), "position": 0, "epoch": 0})
    total = 0.0
    with torch.no_grad():
        for _ in range(batches):
            x, y = reader.next_batch(micro_batch)
            _, loss = engine(*to_device(x, y, device))
            total += float(loss.item())
    engine.train()
    return _mean(total / batches, world)


def _full_state_dict(engine: Any, stage: int) -> dict[str, torch.Tensor] | None:
    """fp32 weights on rank 0 (None elsewhere); every rank must call this."""
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


class _Progress:
    """Rich progress bar on a terminal, plain log lines elsewhere (pods, CI)."""

    def __init__(self, total: int, start: int, enabled: bool) -> None:
        self.enabled = enabled
        self.bar = None
        if enabled and sys.stdout.isatty():
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

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


# --- the run -------------------------------------------------------------------------------


@dataclass
class _Started:
    spec: Any
    ctx: WorldContext
    device: torch.device
    prepared: Any
    started: float


def _start(manifest: TrainingJob, threads: int | None) -> _Started:
    """Join the world, check it fits the spec, and prepare the data (rank 0 first)."""
    import deepspeed

    from lmforge.data.preparation import prepare_data

    spec = manifest.spec
    ctx = WorldContext.from_env(manifest.metadata.name, manifest.metadata.namespace or "default")
    if threads:
        torch.set_num_threads(threads)
    device = rank_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu() else "gloo")
    started = time.time()
    try:
        spec.check_world_size(ctx.world_size, origin="the launched world")
    except Exception as exc:
        raise InvalidForThisRun(str(exc)) from None
    if ctx.is_main:
        prepared = prepare_data(spec, log=lambda text: print(text, flush=True))
    dist.barrier()
    if not ctx.is_main:
        prepared = prepare_data(spec, log=lambda text: None)
    return _Started(spec, ctx, device, prepared, started)


def find_lr(manifest: TrainingJob, *, threads: int | None = None) -> float:
    """`lmforge lr-find`: only the LR range test, on the whole world."""
    from lmforge.trainer.lr_finder import find_learning_rate
    from lmforge.trainer.model import GPT, GPTConfig

    run = _start(manifest, threads)
    spec = run.spec
    if spec.training.lr_finder is None:
        from lmforge.api.training import LrFinder

        spec = spec.model_copy(update={"training": spec.training.model_copy(update={"lr_finder": LrFinder()})})
    config = GPTConfig.from_spec(spec.model, run.prepared.vocab_size)

    def factory() -> torch.nn.Module:
        model = GPT(config)
        if spec.model.initial_model is not None:
            _load_initial_weights(model, spec.model.initial_model, spec, run.prepared.tokenizer)
        return model

    suggestion = find_learning_rate(spec, run.prepared, run.ctx, model_factory=factory, device=run.device)
    dist.barrier()
    return suggestion


def train(manifest: TrainingJob, *, threads: int | None = None) -> RunResult:
    """Train the manifest's model in this process's slot of the world."""
    from lmforge.data.mixing import mix_by_fraction
    from lmforge.data.storage import join_uri, storage_for
    from lmforge.data.workers import open_reader
    from lmforge.trainer.checkpoint import (
        CheckpointLocation,
        load_rank_rng,
        tag_for,
        write_rank_rng,
    )
    from lmforge.trainer.continual import ContinualRun
    from lmforge.trainer.engine import initialize, set_learning_rate
    from lmforge.trainer.metrics import JsonlWriter, TrainerMetrics, peak_flops
    from lmforge.trainer.model import GPT, GPTConfig
    from lmforge.trainer.schedule import learning_rate

    run = _start(manifest, threads)
    spec, ctx, device, prepared, started = run.spec, run.ctx, run.device, run.prepared, run.started
    storage = storage_for(spec.output.uri, spec.s3)
    # stage: continual: replay, EWC, forgetting report (None otherwise); checks the earlier data first.
    continual = ContinualRun.from_spec(spec, prepared.tokenizer, rank=ctx.rank, world_size=ctx.world_size)

    # 2. Model, with the same initial weights on every rank.
    torch.manual_seed(spec.training.seed)
    config = GPTConfig.from_spec(spec.model, prepared.vocab_size)

    def fresh_model() -> GPT:
        """The run's starting weights: random, or model.initialModel's (finetune, continual)."""
        model = GPT(config)
        if spec.model.initial_model is not None:
            _load_initial_weights(model, spec.model.initial_model, spec, prepared.tokenizer)
        return model

    model = fresh_model()

    total_steps = spec.total_steps(ctx.world_size)
    checkpoints = CheckpointLocation(
        spec.checkpoint.uri or join_uri(spec.output.uri, "checkpoints"),
        storage_for(spec.checkpoint.uri or spec.output.uri, spec.s3),
    )
    resume_tag = _broadcast(checkpoints.newest_committed() if ctx.is_main else None)
    resume_state = _broadcast(checkpoints.read_state(resume_tag) if ctx.is_main and resume_tag else None)

    # 3. Peak learning rate: the spec's, or the LR range test's suggestion (kept across restarts).
    peak_lr = spec.training.optimizer.lr
    if resume_state is not None and resume_state.get("peak_lr"):
        peak_lr = resume_state["peak_lr"]
    elif peak_lr == "auto":
        from lmforge.trainer.lr_finder import find_learning_rate

        # The range test starts from the weights the run starts from (a fine-tune's best LR is not a
        # fresh model's).
        peak_lr = find_learning_rate(spec, prepared, ctx, model_factory=fresh_model, device=device)
        torch.manual_seed(spec.training.seed)
        model = fresh_model()
    ewc = continual.ewc(model, device) if continual is not None else None
    engine = initialize(model, spec, ctx.world_size, peak_lr=float(peak_lr))
    accumulation = spec.gradient_accumulation_steps(ctx.world_size)
    micro = spec.training.micro_batch_size
    context = spec.model.context_length
    tokens_per_step = micro * accumulation * ctx.world_size * context

    data_storage = storage_for(prepared.prepared_uri, spec.s3)

    # data.mix and replay: the training reader becomes a deterministic mix of this job's data and them.
    extras = _mix_sources(spec, prepared.tokenizer, ctx.rank, ctx.world_size)
    extras += continual.replay_sources() if continual is not None else []

    def reader(split: str, shuffle: bool, workers: int | None) -> Any:
        return open_reader(
            join_uri(prepared.prepared_uri, split),
            data_storage,
            context,
            rank=ctx.rank,
            world_size=ctx.world_size,
            seed=spec.training.seed,
            shuffle=shuffle,
            shuffle_window=spec.data.shuffle_window,
            workers=workers,
        )

    # LMFORGE_DATA_WORKERS worker processes serve the plain training split; a mix reads its sources
    # itself (one vectorized read per source and chunk), so its splits are opened without workers.
    train_reader = reader("train", shuffle=True, workers=0 if extras else None)
    val_reader = reader("val", shuffle=False, workers=0)

    def evaluate(split_reader: Any) -> float:
        return _evaluate(engine, split_reader, spec.training.eval_batches, micro, ctx.world_size, device)

    train_reader = mix_by_fraction(
        train_reader, extras, own_name="data.sources", rank=ctx.rank, world_size=ctx.world_size, seed=spec.training.seed
    )
    forgetting_before = continual.measure(evaluate) if continual is not None else []  # the initial weights

    # 4. Resume from the newest committed checkpoint, whatever stopped the last attempt.
    step = 0
    tokens = 0
    if resume_tag is not None:
        if ctx.is_node_main:
            checkpoints.download(resume_tag)
        dist.barrier()
        engine.load_checkpoint(str(checkpoints.staging), tag=resume_tag, load_lr_scheduler_states=False)
        step = int(resume_state["step"])
        tokens = int(resume_state["tokens"])
        train_reader.load_state_dict(resume_state["reader"])
        load_rank_rng(checkpoints.staging / resume_tag, ctx.rank)

    # 5. Observability.
    metrics = TrainerMetrics(
        job=ctx.job,
        namespace=ctx.namespace,
        rank=ctx.rank,
        local_rank=ctx.local_rank,
        port=int(os.environ.get("LMFORGE_METRICS_PORT", spec.metrics.port)),
    )
    metrics.total_steps.set(total_steps)
    metrics.train_step.set(step)
    metrics.tokens.inc(tokens)
    output_dir = _output_dir(spec.output.uri)
    jsonl = JsonlWriter(output_dir / "metrics.jsonl") if ctx.is_main else None
    if ctx.is_main and not spec.output.uri.startswith("file://"):
        _fetch_existing(storage, join_uri(spec.output.uri, "metrics.jsonl"), output_dir / "metrics.jsonl")
    progress = _Progress(total_steps, step, enabled=ctx.is_main)
    if resume_tag is not None:
        progress.note(f"resumed from checkpoint {resume_tag} (step {step})")
    peak = peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    flops_per_token = model.flops_per_token()

    stop_requested = {"flag": False}

    def _on_sigterm(signum: int, frame: Any) -> None:
        stop_requested["flag"] = True

    signal.signal(signal.SIGTERM, _on_sigterm)

    result = RunResult(resumed_from=step if resume_tag else None, peak_lr=float(peak_lr))
    losses_since_log: list[float] = []
    wait_since_log = 0.0
    interval_start = time.time()
    interval_start_step = step
    last_eval: float | None = None
    preempted = False

    def save(at_step: int) -> None:
        begin = time.time()
        tag = tag_for(at_step)
        staging = checkpoints.staging
        engine.save_checkpoint(str(staging), tag=tag, save_latest=False)
        write_rank_rng(staging / tag, ctx.rank)
        state = {
            "step": at_step,
            "tokens": tokens,
            "reader": train_reader.state_dict(),
            "peak_lr": float(peak_lr),
            "world_size": ctx.world_size,
        }
        if ctx.is_main:
            (staging / tag / "trainer_state.json").write_text(json.dumps(state))
        dist.barrier()
        if ctx.is_node_main:
            checkpoints.upload(tag)
        dist.barrier()
        if ctx.is_main:
            checkpoints.commit(tag, state)
            checkpoints.prune(spec.checkpoint.keep)
            _publish(storage, output_dir, spec.output.uri, ["metrics.jsonl"])
        dist.barrier()
        metrics.checkpoint_step.set(at_step)
        metrics.checkpoint_time.set(time.time())
        metrics.checkpoint_seconds.set(time.time() - begin)
        progress.note(f"checkpoint {tag} committed in {time.time() - begin:.1f}s")

    engine.train()
    # Setup left hundreds of thousands of long-lived objects (model, DeepSpeed, boto, tokenizer): move
    # them out of the collector's reach, so a full collection does not stall a rank for a fraction
    # of a second now and then (with many ranks, every step waits for the slowest one).
    gc.collect()
    gc.freeze()
    while step < total_steps:
        lr = learning_rate(step, peak=float(peak_lr), total_steps=total_steps, schedule=spec.training.schedule)
        set_learning_rate(engine, lr)
        step_loss = 0.0
        for _ in range(accumulation):
            waited = time.time()
            x, y = train_reader.next_batch(micro)
            wait_since_log += time.time() - waited
            _, loss = engine(*to_device(x, y, device))
            engine.backward(loss if ewc is None else loss + ewc.penalty(engine.module))
            engine.step()
            step_loss += float(loss.item()) / accumulation
        step += 1
        tokens += tokens_per_step
        metrics.tokens.inc(tokens_per_step)
        losses_since_log.append(step_loss)

        if step % spec.training.log_interval == 0 or step == total_steps:
            mean_loss = _mean(sum(losses_since_log) / len(losses_since_log), ctx.world_size)
            elapsed = max(1e-9, time.time() - interval_start)
            tps = (step - interval_start_step) * tokens_per_step / elapsed
            eta = (total_steps - step) * elapsed / max(1, step - interval_start_step)
            grad_norm = engine.get_global_grad_norm()
            metrics.train_loss.set(mean_loss)
            metrics.learning_rate.set(lr)
            metrics.train_step.set(step)
            metrics.tokens_per_second.set(tps)
            metrics.data_wait.set(wait_since_log)
            metrics.eta_seconds.set(eta)
            if grad_norm is not None and math.isfinite(float(grad_norm)):
                metrics.grad_norm.set(float(grad_norm))
            record: dict[str, Any] = {
                "step": step,
                "loss": mean_loss,
                "lr": lr,
                "tokens": tokens,
                "tokens_per_second": tps,
                "data_wait_seconds": wait_since_log,
                "data_position": train_reader.state_dict()["position"],
                "time": time.time(),
            }
            record.update(metrics.observe_data(train_reader))
            if grad_norm is not None:
                record["grad_norm"] = float(grad_norm)
            if peak is not None:
                mfu = tps * flops_per_token / (peak * ctx.world_size)
                metrics.mfu.set(mfu)
                record["mfu"] = mfu
                metrics.gpu_memory.set(torch.cuda.max_memory_allocated(device))
            if jsonl is not None:
                jsonl.write(record)
            progress.update(step, total_steps, mean_loss, tps, lr, eta)
            result.losses.append(mean_loss)
            result.final_loss = mean_loss
            result.tokens_per_second = tps
            losses_since_log, wait_since_log = [], 0.0
            interval_start, interval_start_step = time.time(), step

        if step % spec.training.eval_interval == 0 or step == total_steps:
            last_eval = _evaluate(engine, val_reader, spec.training.eval_batches, micro, ctx.world_size, device)
            metrics.eval_loss.set(last_eval)
            if jsonl is not None:
                jsonl.write(
                    {
                        "step": step,
                        "eval_loss": last_eval,
                        "eval_perplexity": math.exp(min(last_eval, 50)),
                        "time": time.time(),
                    }
                )
            progress.note(f"step {step}: eval loss {last_eval:.4f} (perplexity {math.exp(min(last_eval, 50)):.1f})")

        preempted = _any(stop_requested["flag"])
        if step % spec.checkpoint.interval == 0 or step == total_steps or preempted:
            save(step)
        if preempted:
            progress.note(f"SIGTERM: checkpoint at step {step} saved; exiting")
            break

    gc.unfreeze()  # give setup's objects back to the collector (train() may run again in this process)
    progress.close()
    result.steps = step
    result.tokens = tokens
    if hasattr(train_reader, "counts"):  # a MixedReader: what each source really contributed
        counts = train_reader.counts()
        result.data_mix = {
            name: {"weight": weight, "samples": drawn, "fraction": fraction}
            for name, weight, drawn, fraction in zip(
                counts["sources"], counts["weights"], counts["global"], counts["fractions"], strict=True
            )
        }
    result.final_eval_loss = last_eval
    if not preempted:
        if continual is not None and continual.sources:
            result.forgetting = continual.report(forgetting_before, continual.measure(evaluate), train_reader, ewc)
        state = _full_state_dict(engine, spec.training.zero.stage)
        if ctx.is_main:
            result.model_uri = _export(state, config, prepared, spec, storage, output_dir)
            if continual is not None and result.forgetting is not None:
                continual.write(result.forgetting, output_dir, storage, spec.output.uri)
            _write_summary(result, spec, output_dir, storage, started)
    dist.barrier()
    metrics.close()
    result.seconds = time.time() - started
    if preempted:
        raise SystemExit(PREEMPTED_EXIT)
    if result.forgetting is not None and result.forgetting["passed"] is False:
        from lmforge.trainer.continual import gate_message

        result.quality_gate = gate_message(result.forgetting)  # every rank: the losses are all-reduced means
    return result


# --- output helpers --------------------------------------------------------------------------


def _output_dir(uri: str) -> Path:
    """Local directory the run writes its outputs to before they are published (if s3://)."""
    from lmforge.data.staging import local_dir

    return local_dir(uri, "output")


def _fetch_existing(storage: Any, uri: str, target: Path) -> None:
    if storage.exists(uri):
        storage.download_file(uri, target)


def _publish(storage: Any, output_dir: Path, output_uri: str, names: list[str]) -> None:
    from lmforge.data.staging import publish

    publish(storage, output_dir, output_uri, names)


def _export(
    state: dict[str, torch.Tensor] | None, config: Any, prepared: Any, spec: Any, storage: Any, output_dir: Path
) -> str:
    from lmforge.data.storage import join_uri
    from lmforge.trainer.export import export_model
    from lmforge.trainer.model import GPT

    model = GPT(config)
    model.load_state_dict(state)
    tokenizer_json = output_dir / "tokenizer.json.tmp"
    tokenizer_json.write_text(prepared.tokenizer.to_str())
    export_model(model, tokenizer_json, output_dir / "model")
    tokenizer_json.unlink()
    _publish(storage, output_dir, spec.output.uri, ["model", "metrics.jsonl"])
    return join_uri(spec.output.uri, "model")


def _mix_sources(spec: Any, tokenizer: Any, rank: int, world_size: int) -> list[tuple[str, Any, float]]:
    """``(field, train reader, fraction)`` of each ``data.mix`` entry, checked against this job's tokenizer."""
    from lmforge.data.other_job_data import open_prepared_split
    from lmforge.data.storage import storage_for
    from lmforge.data.tokenizer import tokenizer_hash

    digest = tokenizer_hash(tokenizer) if spec.data.mix else ""
    return [
        (
            f"data.mix[{i}]",
            open_prepared_split(
                f"data.mix[{i}].uri",
                source.uri,
                "train",
                storage_for(source.uri, spec.s3),
                tokenizer_digest=digest,
                context_length=spec.model.context_length,
                rank=rank,
                world_size=world_size,
                seed=spec.training.seed + 1000 + i,  # each source its own epoch order
                shuffle=True,
                shuffle_window=spec.data.shuffle_window,
            ),
            source.fraction,
        )
        for i, source in enumerate(spec.data.mix)
    ]


def _write_summary(result: RunResult, spec: Any, output_dir: Path, storage: Any, started: float) -> None:
    summary = {
        "steps": result.steps,
        "tokens": result.tokens,
        "final_loss": result.final_loss,
        "final_eval_loss": result.final_eval_loss,
        "final_eval_perplexity": math.exp(min(result.final_eval_loss, 50))
        if result.final_eval_loss is not None
        else None,
        "tokens_per_second": result.tokens_per_second,
        "peak_lr": result.peak_lr,
        "resumed_from": result.resumed_from,
        "seconds": time.time() - started,
        "model_uri": result.model_uri,
    }
    if result.data_mix is not None:
        summary["data_mix"] = result.data_mix
    if result.forgetting is not None:
        from lmforge.trainer.continual import summary_entry

        summary["forgetting"] = summary_entry(result.forgetting)
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    _publish(storage, output_dir, spec.output.uri, ["summary.json"])


def _load_initial_weights(model: torch.nn.Module, uri: str, spec: Any, tokenizer: Any) -> None:
    """Start from an exported model (finetune / continual): same tokenizer and shape required.

    Why the tokenizer check: a model trained with other merges but the same vocabulary size loads
    without complaint and then reads every token id as a different word; that would waste the whole
    run, so it is refused up front with the fix (exit 78).
    """
    from tokenizers import Tokenizer

    from lmforge.data.tokenizer import tokenizer_hash
    from lmforge.trainer.export import load_model

    directory = _materialize(uri, spec)
    theirs_file = directory / "tokenizer.json"
    if theirs_file.is_file():
        theirs, ours = tokenizer_hash(Tokenizer.from_file(str(theirs_file))), tokenizer_hash(tokenizer)
        if theirs != ours:
            raise InvalidForThisRun(
                f"model.initialModel {uri} was trained with another tokenizer (hash {theirs}, this job's is "
                f"{ours}), so its embeddings belong to other token ids; set tokenizer.uri to "
                f"{uri.rstrip('/')}/tokenizer.json"
            )
    source, _ = load_model(directory)
    try:
        missing = model.load_state_dict(source.state_dict(), strict=False)
    except RuntimeError as exc:  # shape mismatches: a spec error, never worth a retry
        first = str(exc).strip().splitlines()[-1].strip()
        raise InvalidForThisRun(
            f"model.initialModel {uri} does not match spec.model ({first}); make spec.model the shape of that "
            "model (layers, width, heads, kvHeads, ffnSize) and tokenizer.vocabSize its vocabulary"
        ) from None
    if missing.missing_keys or missing.unexpected_keys:
        raise InvalidForThisRun(
            f"model.initialModel {uri} does not match spec.model: missing {missing.missing_keys[:3]}, "
            f"unexpected {missing.unexpected_keys[:3]}; make spec.model the shape of that model"
        )


def _materialize(uri: str, spec: Any) -> Path:
    """A local directory holding the files under ``uri`` (downloaded once for s3://)."""
    from lmforge.data.staging import fetch
    from lmforge.data.storage import storage_for

    return fetch(storage_for(uri, spec.s3), uri, "models")
