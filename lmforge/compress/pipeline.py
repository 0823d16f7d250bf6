"""`lmforge compress job.yaml`: run a CompressionJob's ordered steps and refuse a model that got worse.

1. The source model (``spec.model.uri``, file:// or s3://; for ``model.trainingJob`` the operator
   passes the resolved URI in ``LMFORGE_SOURCE_MODEL_URI``) is fetched and loaded.
2. Data: ``spec.data`` is tokenized with the source model's tokenizer (``data.preparedUri`` or
   ``OUTPUT/data``); without it, the prepared data next to the source model (``<run>/data`` for
   ``<run>/model``, as a TrainingJob writes it) gives the validation split.
3. The baseline is evaluated, then every step runs on the model the previous step left, is written
   to ``OUTPUT/steps/NN-<kind>/``, loaded back from there and evaluated (so every row measures a
   model that really loads). Pruning recovery and distillation train through the trainer's DeepSpeed
   engine on a world of one process (:mod:`lmforge.compress.train`); the step's report and its
   ``training`` record in results.json name the engine, ZeRO stage and precision that ran.
4. ``OUTPUT/results.json`` (rows, full evaluations, step reports, gate), ``results.md`` and
   ``results.png`` are written, and the final model is copied to ``OUTPUT/model``.
5. Quality gate: when the final perplexity exceeds the baseline's by more than
   ``evaluation.maxPerplexityIncrease``, :class:`QualityGateFailed` is raised *after* everything
   above is written; the CLI exits with :data:`QUALITY_GATE_EXIT`.

Batches: calibration, recovery, distillation and evaluation use micro-batches of
``distill.microBatchSize`` (distill) or :data:`MICRO_BATCH` sequences of the model's context length.
Latency uses prompts of half the context and ``min(32, context / 4)`` decode steps.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmforge import exitcodes
from lmforge.api.manifest import CompressionJob
from lmforge.api.status import CompressionResult
from lmforge.compress import data as cdata
from lmforge.compress.evaluate import Evaluation, evaluate_model
from lmforge.compress.modelio import load_any, save_float, save_quantized, weights_bytes
from lmforge.data.staging import fetch, local_dir, publish
from lmforge.data.storage import join_uri, storage_for
from lmforge.termination import write_termination_message

QUALITY_GATE_EXIT = exitcodes.QUALITY_GATE
"""Exit code of `lmforge compress` when the quality gate fails (not retryable: the same job fails again)."""
MICRO_BATCH = 8
RECOVERY_LR = 3.0e-4
SOURCE_ENV = "LMFORGE_SOURCE_MODEL_URI"


class CompressionSpecError(Exception):
    """The job cannot run as specified (exit INVALID_SPEC)."""


@dataclass
class StepRecord:
    """One row of the results: the model after a step (or the baseline)."""

    step: str
    method: str | None
    model_dir: Path
    evaluation: Evaluation
    report: str = ""
    seconds: float = 0.0
    training: dict[str, Any] | None = None
    """How recovery or distillation trained (engine, ZeRO stage, precision, steps, losses); None without training."""


@dataclass
class CompressionOutcome:
    """What `compress` produced."""

    records: list[StepRecord]
    results: list[CompressionResult]
    gate_passed: bool
    perplexity_change: float | None
    compression_ratio: float | None
    model_uri: str
    report_uri: str
    message: str
    files: list[str] = field(default_factory=list)

    @property
    def perplexity_change_text(self) -> str | None:
        return None if self.perplexity_change is None else f"{100 * self.perplexity_change:+.1f}%"


class QualityGateFailed(Exception):
    """The compressed model broke the quality gate; the results are already written."""

    reason = "QualityGate"

    def __init__(self, outcome: CompressionOutcome) -> None:
        super().__init__(outcome.message)
        self.outcome = outcome


# --- helpers ---------------------------------------------------------------------------------


def _local_dir(uri: str) -> Path:
    """A local directory for an output URI: the path itself for file://, a staging dir for s3://."""
    return local_dir(uri, "compress")


def _fetch_model(uri: str, s3: Any) -> Path:
    storage = storage_for(uri, s3)
    if not storage.exists(join_uri(uri, "lmforge_model.json")):
        raise CompressionSpecError(f"model.uri {uri} is not an exported lmforge model (no lmforge_model.json)")
    return fetch(storage, uri, "models")


def source_model_uri(spec: Any) -> str:
    if spec.model.uri:
        return spec.model.uri
    resolved = os.environ.get(SOURCE_ENV)
    if resolved:
        return resolved
    raise CompressionSpecError(
        f"model.trainingJob {spec.model.training_job!r} is resolved by the operator; to run locally set "
        f"model.uri to the exported model (or {SOURCE_ENV})"
    )


def _default_prepared(model_uri: str, s3: Any) -> str | None:
    """``<run>/data`` for a model at ``<run>/model`` when it holds prepared data."""
    base = model_uri.rstrip("/")
    if not base.endswith("/model"):
        return None
    prepared = base[: -len("/model")] + "/data"
    storage = storage_for(prepared, s3)
    return prepared if storage.exists(join_uri(prepared, "val", "index.json")) else None


def result_row(record: StepRecord, baseline: Evaluation, batch_sizes: list[int]) -> CompressionResult:
    ev = record.evaluation
    best = ev.best_latency(1) or ev.best_latency(batch_sizes[0])
    base = baseline.best_latency(1) or baseline.best_latency(batch_sizes[0])
    big = max(batch_sizes)
    prefill = [r.prefill_tokens_per_second for r in ev.latency if r.batch_size == big and r.prefill_tokens_per_second]
    speedup = None
    if best and base and best.decode_ms_per_token and base.decode_ms_per_token:
        speedup = base.decode_ms_per_token / best.decode_ms_per_token
    return CompressionResult(
        step=record.step,
        method=record.method,
        parameters=ev.parameters,
        size_bytes=ev.size_bytes,
        perplexity=ev.perplexity,
        prefill_tokens_per_second=max(prefill) if prefill else None,
        decode_ms_per_token=best.decode_ms_per_token if best else None,
        speedup=speedup,
    )


# --- reports ---------------------------------------------------------------------------------


def markdown_table(results: list[CompressionResult], base_ppl: float | None, base_size: int | None) -> str:
    lines = [
        "| step | method | parameters | size (MB) | size ratio | perplexity | PPL Δ | prefill tok/s "
        "| decode ms/token | speedup |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        ratio = f"{r.size_bytes / base_size:.3f}" if r.size_bytes and base_size else "-"
        delta = f"{100 * (r.perplexity / base_ppl - 1):+.2f}%" if r.perplexity and base_ppl else "-"
        lines.append(
            f"| {r.step} | {r.method or '-'} | {r.parameters:,} | "
            f"{(r.size_bytes or 0) / 1e6:.3f} | {ratio} | "
            f"{r.perplexity:.3f} | {delta} | "
            f"{r.prefill_tokens_per_second or 0:,.0f} | {r.decode_ms_per_token or 0:.3f} | "
            f"{r.speedup or 0:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def bar_chart(results: list[CompressionResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{i}: {r.step}" for i, r in enumerate(results)]  # methods are in results.md
    panels = [
        ("size (MB)", [(r.size_bytes or 0) / 1e6 for r in results]),
        ("perplexity", [r.perplexity or 0 for r in results]),
        ("decode ms/token (batch 1)", [r.decode_ms_per_token or 0 for r in results]),
        ("prefill tokens/s", [r.prefill_tokens_per_second or 0 for r in results]),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8))
    for ax, (title, values) in zip(axes, panels, strict=True):
        bars = ax.bar(range(len(values)), values, color=["#888888"] + ["#3b7dd8"] * (len(values) - 1))
        ax.set_title(title, fontsize=10)
        ax.set_xticks(range(len(values)), labels, fontsize=7)
        for bar, value in zip(bars, values, strict=True):
            ax.annotate(
                f"{value:.3g}",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=7,
            )
    fig.suptitle("compression results (grey: baseline)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- the pipeline ------------------------------------------------------------------------------


def compress(
    manifest: CompressionJob,
    *,
    log: Callable[[str], None] = print,
    threads: int | None = None,
) -> CompressionOutcome:
    """Run the job; raise :class:`QualityGateFailed` (after writing the results) when the gate breaks."""
    from lmforge.compress.distill import distill, make_student, recover
    from lmforge.compress.prune import magnitude_prune, structured_prune
    from lmforge.compress.quantize import describe, quantize

    if threads:
        torch.set_num_threads(threads)
    spec = manifest.spec
    output = spec.output.uri
    out_dir = _local_dir(output)
    model_uri = source_model_uri(spec)
    log(f"compress: source model {model_uri}")
    source_dir = _fetch_model(model_uri, spec.s3)
    model, tokenizer, source_quant = load_any(source_dir)
    context = model.config.context_length

    if spec.data is not None:
        tokenizer_file = out_dir / ".source-tokenizer.json"
        tokenizer_file.write_text(tokenizer.to_str())
        prepared = cdata.prepare_for_compression(
            spec.data, output, tokenizer_uri=f"file://{tokenizer_file}", s3=spec.s3, log=log
        ).prepared_uri
    else:
        prepared = _default_prepared(model_uri, spec.s3)
        if prepared is None:
            raise CompressionSpecError(
                "no evaluation data: set data.sources (the text to evaluate on), or point model.uri at a "
                "TrainingJob's OUTPUT/model whose OUTPUT/data holds the prepared validation split"
            )
        log(f"compress: evaluating on the source run's validation split {prepared}")

    ev_spec = spec.evaluation
    batch_sizes = list(ev_spec.latency_batch_sizes)

    def evaluate(current: Any, directory: Path, name: str) -> Evaluation:
        log(f"compress: evaluating {name}")
        return evaluate_model(
            current,
            reader=cdata.reader(prepared, "val", context, s3=spec.s3),
            batches=ev_spec.batches,
            micro_batch=MICRO_BATCH,
            size_bytes=weights_bytes(directory),
            batch_sizes=batch_sizes,
            compile=ev_spec.compile,
            prompt_len=max(1, context // 2),
            decode_tokens=max(1, min(32, context // 4)),
            profile=True,
            log=log,
        )

    started = time.time()
    baseline = evaluate(model, source_dir, "baseline")
    records = [StepRecord("baseline", None, source_dir, baseline, "source model", time.time() - started)]
    quantized = source_quant is not None
    steps_dir = out_dir / "steps"
    for i, step in enumerate(spec.steps):
        kind = step.kind
        began = time.time()
        directory = steps_dir / f"{i:02d}-{kind}"
        if directory.exists():
            shutil.rmtree(directory)
        train = cdata.reader(prepared, "train", context, s3=spec.s3, seed=1000 + i)
        training: dict[str, Any] | None = None
        if kind in ("prune",) and quantized:
            raise CompressionSpecError(f"steps[{i}]: a quantized model cannot be pruned; put quantize last")
        if kind == "prune":
            p = step.prune
            if p.method == "structured":

                def calibration(p: Any = p, i: int = i) -> Any:
                    return cdata.batches(
                        cdata.reader(prepared, "train", context, s3=spec.s3, seed=2000 + i),
                        p.calibration_batches,
                        MICRO_BATCH,
                    )

                unpruned = model
                model, prune_report = structured_prune(model, p.sparsity, list(p.targets), p.importance, calibration)
                method = f"structured {'+'.join(p.targets)} {p.sparsity:g} ({p.importance})"
                report = prune_report.summary()
                if p.recovery_steps:
                    teacher = "distilled from the unpruned model" if p.recovery_distill else "cross-entropy only"
                    log(f"compress: recovery fine-tune, {p.recovery_steps} steps at lr {RECOVERY_LR:g}, {teacher}")
                    fitted = recover(
                        model,
                        unpruned,
                        lambda train=train: train.next_batch(MICRO_BATCH),
                        steps=p.recovery_steps,
                        lr=RECOVERY_LR,
                        use_teacher=p.recovery_distill,
                        log=log,
                    )
                    training = fitted.to_dict()
                    report += (
                        f" | recovery: {p.recovery_steps} steps at lr {RECOVERY_LR:g}, {teacher} "
                        f"({fitted.extra['loss']}), through {fitted.engine.summary()}"
                    )
                del unpruned
            else:
                model, prune_report = magnitude_prune(model, p.sparsity)
                method = f"magnitude {p.sparsity:g}"
                report = prune_report.summary()
                if p.recovery_steps:
                    report += " | recovery skipped: fine-tuning would refill the zeroed weights"
            save_float(model, tokenizer, directory)
        elif kind == "distill":
            d = step.distill
            student, init = make_student(model, d.student)
            log(f"compress: {init.summary()}")
            micro = d.micro_batch_size
            fitted = distill(
                model,
                student,
                lambda train=train, micro=micro: train.next_batch(micro),
                steps=d.steps,
                lr=d.lr,
                temperature=d.temperature,
                alpha=d.alpha,
                log=log,
            )
            model, quantized = student, False
            c = model.config
            method = f"{c.layers} layers, width {c.width}, T={d.temperature:g}, alpha={d.alpha:g}"
            training = fitted.to_dict()
            report = (
                f"{init.summary()} | {d.steps} steps, micro-batch {micro}, lr {d.lr:g}, {fitted.extra['loss']}, "
                f"through {fitted.engine.summary()}"
            )
            save_float(model, tokenizer, directory)
        else:
            q = step.quantize
            if quantized:
                raise CompressionSpecError(f"steps[{i}]: the model is already quantized; quantize once, last")
            model, info = quantize(model, q.method, q.group_size)
            quantized = True
            method = q.method
            report = describe(info)
            save_quantized(model, tokenizer, directory, info)
        log(f"compress: step {i} {kind}: {report}")
        model, _, _ = load_any(directory)  # every row measures the model as it loads from disk
        evaluation = evaluate(model, directory, f"step {i} ({kind})")
        records.append(StepRecord(kind, method, directory, evaluation, report, time.time() - began, training))

    return _finish(records, spec, out_dir, output, log)


def _finish(
    records: list[StepRecord], spec: Any, out_dir: Path, output: str, log: Callable[[str], None]
) -> CompressionOutcome:
    batch_sizes = list(spec.evaluation.latency_batch_sizes)
    baseline = records[0].evaluation
    results = [result_row(r, baseline, batch_sizes) for r in records]
    final = records[-1]
    base_ppl, final_ppl = baseline.perplexity, final.evaluation.perplexity
    change = (final_ppl / base_ppl - 1) if base_ppl and final_ppl else None
    base_size, final_size = baseline.size_bytes, final.evaluation.size_bytes
    ratio = base_size / final_size if base_size and final_size else None
    allowed = spec.evaluation.max_perplexity_increase
    passed = change is not None and change <= allowed and math.isfinite(final_ppl or math.inf)
    change_text = f"{100 * change:+.2f}%" if change is not None else "unknown"
    message = (
        f"perplexity {base_ppl:.3f} -> {final_ppl:.3f} ({change_text}, allowed +{100 * allowed:g}%); "
        f"size {ratio:.2f}x smaller"
        if ratio
        else f"perplexity change {change_text}"
    )
    if not passed:
        message = f"QualityGate: {message}: the compressed model got worse than allowed"

    model_dir = out_dir / "model"
    if model_dir.exists():
        shutil.rmtree(model_dir)
    shutil.copytree(final.model_dir, model_dir)

    table = markdown_table(results, base_ppl, base_size)
    notes = "\n".join(f"- **{i}: {r.step}**: {r.report}" for i, r in enumerate(records))
    profile = records[-1].evaluation.profile or {}
    prof_lines = "\n".join(f"| {k} | {v:.2f} |" for k, v in profile.items() if k != "total")
    markdown = (
        f"# Compression results\n\n{table}\n"
        f"Quality gate: **{'passed' if passed else 'FAILED'}**: {message}.\n\n"
        f"Decode latency is per generation step at batch 1 (best of eager"
        f"{' and compiled' if spec.evaluation.compile else ''}); prefill is at batch {max(batch_sizes)}; "
        f"size is the weight files on disk.\n\n## Steps\n\n{notes}\n\n"
        f"## Where the final model's time goes (self ms by module type, one prefill + 16 decode steps)\n\n"
        f"| module | ms |\n| --- | ---: |\n{prof_lines}\n"
    )
    document = {
        "results": [r.model_dump(mode="json", by_alias=True) for r in results],
        "gate": {
            "passed": passed,
            "reason": None if passed else "QualityGate",
            "max_perplexity_increase": allowed,
            "perplexity_change": change,
            "message": message,
        },
        "compression_ratio": ratio,
        "perplexity_change": None if change is None else f"{100 * change:+.1f}%",
        "steps": [
            {
                "step": r.step,
                "method": r.method,
                "report": r.report,
                "seconds": round(r.seconds, 2),
                "training": r.training,
                "model": str(r.model_dir),
                "evaluation": r.evaluation.to_dict(),
            }
            for r in records
        ],
        "device": torch.cuda.get_device_name(0)
        if torch.cuda.is_available()
        else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__,
    }
    (out_dir / "results.json").write_text(json.dumps(document, indent=2) + "\n")
    write_termination_message({k: document.get(k) for k in ("results", "compression_ratio", "perplexity_change")})
    (out_dir / "results.md").write_text(markdown)
    bar_chart(results, out_dir / "results.png")
    names = ["results.json", "results.md", "results.png", "model", "steps"]
    publish(storage_for(output, spec.s3), out_dir, output, names)
    log(table)
    log(("quality gate passed: " if passed else "") + message)
    outcome = CompressionOutcome(
        records=records,
        results=results,
        gate_passed=passed,
        perplexity_change=change,
        compression_ratio=ratio,
        model_uri=join_uri(output, "model"),
        report_uri=join_uri(output, "results.md"),
        message=message,
        files=names,
    )
    if not passed:
        raise QualityGateFailed(outcome)
    return outcome
