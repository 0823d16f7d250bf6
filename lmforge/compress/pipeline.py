"""`lmforge compress job.yaml`: run a CompressionJob's ordered steps and refuse a model that got worse.

1. The source model (``spec.model.uri``, file:// or s3://; for ``model.trainingJob`` the operator
   passes the resolved URI in ``LMFORGE_SOURCE_MODEL_URI``) is fetched and loaded.
2. Data: ``spec.data`` is prepared as for training, with the source model's tokenizer
   (:func:`lmforge.compress.data.prepare_for_compression`; ``data.preparedUri`` or ``OUTPUT/data``);
   without it, the prepared data next to the source model (``<run>/data`` for ``<run>/model``, as a
   TrainingJob writes it) gives the validation split.
3. The baseline is evaluated, then every step runs on the model the previous step left (one
   function per kind: :func:`_prune_step`, :func:`_distill_step`, :func:`_quantize_step`), is written
   to ``OUTPUT/steps/NN-<kind>/``, loaded back from there and evaluated (:func:`_evaluate`; so every
   row measures a model that really loads). Pruning recovery and distillation train through the
   trainer's DeepSpeed engine on a world of one process (:mod:`lmforge.compress.train`); the step's
   report and its ``training`` record in results.json name the engine, ZeRO stage and precision
   that ran.
4. The quality gate decides (:func:`lmforge.compress.gate.quality_gate`, a pure function); then
   ``OUTPUT/results.json`` (rows, full evaluations, step reports, gate), ``results.md`` and
   ``results.png`` are written (:mod:`lmforge.compress.results`), the final model is copied to
   ``OUTPUT/model`` and everything is published to ``spec.output.uri``.
5. When the final perplexity exceeds the baseline's by more than ``evaluation.maxPerplexityIncrease``,
   :class:`QualityGateFailed` is raised *after* everything above is written; the CLI exits with
   :data:`QUALITY_GATE_EXIT`.

Batches: calibration, recovery, distillation and evaluation use micro-batches of
``distill.microBatchSize`` (distill) or :data:`MICRO_BATCH` sequences of the model's context length.
Latency uses prompts of half the context and ``min(32, context / 4)`` decode steps.
"""

from __future__ import annotations

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
from lmforge.compress.gate import GATE_REASON, quality_gate
from lmforge.compress.modelio import load_any, save_float, save_quantized, weights_bytes
from lmforge.compress.results import (
    StepRecord,
    markdown_table,
    result_row,
    results_document,
    results_markdown,
    write_results,
)
from lmforge.contract import (
    DATA_DIR,
    MODEL_DIR,
    MODEL_META,
    RESULTS_JSON,
    RESULTS_MD,
    RESULTS_PNG,
    STEPS_DIR,
    CompressionLayout,
)
from lmforge.data.reader import SampleReader
from lmforge.data.shards import INDEX
from lmforge.data.staging import fetch, local_dir, publish
from lmforge.data.storage import join_uri, storage_for

QUALITY_GATE_EXIT = exitcodes.QUALITY_GATE
"""Exit code of `lmforge compress` when the quality gate fails (not retryable: the same job fails again)."""
MICRO_BATCH = 8
RECOVERY_LR = 3.0e-4
SOURCE_ENV = "LMFORGE_SOURCE_MODEL_URI"


class CompressionSpecError(Exception):
    """The job cannot run as specified (exit INVALID_SPEC)."""


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

    reason = GATE_REASON

    def __init__(self, outcome: CompressionOutcome) -> None:
        super().__init__(outcome.message)
        self.outcome = outcome


# --- helpers ---------------------------------------------------------------------------------


def _local_dir(uri: str) -> Path:
    """A local directory for an output URI: the path itself for file://, a staging dir for s3://."""
    return local_dir(uri, "compress")


def _fetch_model(uri: str, s3: Any) -> Path:
    storage = storage_for(uri, s3)
    if not storage.exists(join_uri(uri, MODEL_META)):
        raise CompressionSpecError(f"model.uri {uri} is not an exported lmforge model (no {MODEL_META})")
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
    if not base.endswith(f"/{MODEL_DIR}"):
        return None
    prepared = base[: -len(f"/{MODEL_DIR}")] + f"/{DATA_DIR}"
    storage = storage_for(prepared, s3)
    return prepared if storage.exists(join_uri(prepared, "val", INDEX)) else None


@dataclass
class _JobData:
    """The job's prepared data: every reader of a step or an evaluation comes from here."""

    prepared: str
    context: int
    s3: Any

    def reader(self, split: str, seed: int = 0) -> SampleReader:
        return cdata.reader(self.prepared, split, self.context, s3=self.s3, seed=seed)


@dataclass
class _StepResult:
    """What a step did; the model itself is in the step's directory."""

    method: str
    report: str
    training: dict[str, Any] | None = None


# --- the pipeline ------------------------------------------------------------------------------


def compress(
    manifest: CompressionJob,
    *,
    log: Callable[[str], None] = print,
    threads: int | None = None,
) -> CompressionOutcome:
    """Run the job; raise :class:`QualityGateFailed` (after writing the results) when the gate breaks."""
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
    data = _JobData(prepared, context, spec.s3)
    ev_spec = spec.evaluation

    started = time.time()
    baseline = _evaluate(model, source_dir, "baseline", data, ev_spec, log)
    records = [StepRecord("baseline", None, source_dir, baseline, "source model", time.time() - started)]
    quantized = source_quant is not None
    steps_dir = out_dir / STEPS_DIR
    for i, step in enumerate(spec.steps):
        kind = step.kind
        began = time.time()
        directory = steps_dir / f"{i:02d}-{kind}"
        if directory.exists():
            shutil.rmtree(directory)
        train = data.reader("train", seed=1000 + i)
        if kind == "prune" and quantized:
            raise CompressionSpecError(f"steps[{i}]: a quantized model cannot be pruned; put quantize last")
        if kind == "quantize" and quantized:
            raise CompressionSpecError(f"steps[{i}]: the model is already quantized; quantize once, last")
        if kind == "prune":
            done = _prune_step(model, step.prune, i, train, data, tokenizer, directory, log)
        elif kind == "distill":
            done = _distill_step(model, step.distill, train, tokenizer, directory, log)
            quantized = False
        else:
            done = _quantize_step(model, step.quantize, tokenizer, directory)
            quantized = True
        log(f"compress: step {i} {kind}: {done.report}")
        model, _, _ = load_any(directory)  # every row measures the model as it loads from disk
        evaluation = _evaluate(model, directory, f"step {i} ({kind})", data, ev_spec, log)
        records.append(
            StepRecord(kind, done.method, directory, evaluation, done.report, time.time() - began, done.training)
        )

    return _finish(records, spec, out_dir, output, log)


def _evaluate(
    model: Any, directory: Path, name: str, data: _JobData, ev_spec: Any, log: Callable[[str], None]
) -> Evaluation:
    """One row's evaluation: perplexity on the val split, size of ``directory``'s weights, speed, profile."""
    log(f"compress: evaluating {name}")
    context = data.context
    return evaluate_model(
        model,
        reader=data.reader("val"),
        batches=ev_spec.batches,
        micro_batch=MICRO_BATCH,
        size_bytes=weights_bytes(directory),
        batch_sizes=list(ev_spec.latency_batch_sizes),
        compile=ev_spec.compile,
        prompt_len=max(1, context // 2),
        decode_tokens=max(1, min(32, context // 4)),
        profile=True,
        log=log,
    )


def _prune_step(
    model: Any,
    p: Any,
    i: int,
    train: SampleReader,
    data: _JobData,
    tokenizer: Any,
    directory: Path,
    log: Callable[[str], None],
) -> _StepResult:
    """Structured pruning (with recovery fine-tuning when asked) or magnitude pruning; saved to ``directory``."""
    from lmforge.compress.distill import recover
    from lmforge.compress.prune import magnitude_prune, structured_prune

    training: dict[str, Any] | None = None
    if p.method == "structured":

        def calibration(p: Any = p, i: int = i) -> Any:
            return cdata.batches(data.reader("train", seed=2000 + i), p.calibration_batches, MICRO_BATCH)

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
    return _StepResult(method, report, training)


def _distill_step(
    model: Any, d: Any, train: SampleReader, tokenizer: Any, directory: Path, log: Callable[[str], None]
) -> _StepResult:
    """A student distilled from ``model`` (the teacher); saved to ``directory``."""
    from lmforge.compress.distill import distill, make_student

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
    c = student.config
    method = f"{c.layers} layers, width {c.width}, T={d.temperature:g}, alpha={d.alpha:g}"
    report = (
        f"{init.summary()} | {d.steps} steps, micro-batch {micro}, lr {d.lr:g}, {fitted.extra['loss']}, "
        f"through {fitted.engine.summary()}"
    )
    save_float(student, tokenizer, directory)
    return _StepResult(method, report, fitted.to_dict())


def _quantize_step(model: Any, q: Any, tokenizer: Any, directory: Path) -> _StepResult:
    """Weight quantization (``q.method``); saved to ``directory``."""
    from lmforge.compress.quantize import describe, quantize

    model, info = quantize(model, q.method, q.group_size)
    report = describe(info)
    save_quantized(model, tokenizer, directory, info)
    return _StepResult(q.method, report)


def _finish(
    records: list[StepRecord], spec: Any, out_dir: Path, output: str, log: Callable[[str], None]
) -> CompressionOutcome:
    """Gate, copy the final model to ``OUTPUT/model``, write and publish the results; raise if the gate failed."""
    batch_sizes = list(spec.evaluation.latency_batch_sizes)
    baseline = records[0].evaluation
    results = [result_row(r, baseline, batch_sizes) for r in records]
    final = records[-1]
    allowed = spec.evaluation.max_perplexity_increase
    verdict = quality_gate(
        baseline.perplexity, final.evaluation.perplexity, baseline.size_bytes, final.evaluation.size_bytes, allowed
    )

    model_dir = out_dir / MODEL_DIR
    if model_dir.exists():
        shutil.rmtree(model_dir)
    shutil.copytree(final.model_dir, model_dir)

    table = markdown_table(results, baseline.perplexity, baseline.size_bytes)
    markdown = results_markdown(table, records, verdict, compiled=spec.evaluation.compile, batch_sizes=batch_sizes)
    document = results_document(results, records, verdict, allowed)
    write_results(out_dir, document, markdown, results)
    names = [RESULTS_JSON, RESULTS_MD, RESULTS_PNG, MODEL_DIR, STEPS_DIR]
    publish(storage_for(output, spec.s3), out_dir, output, names)
    log(table)
    log(("quality gate passed: " if verdict.passed else "") + verdict.message)
    layout = CompressionLayout(output)
    outcome = CompressionOutcome(
        records=records,
        results=results,
        gate_passed=verdict.passed,
        perplexity_change=verdict.perplexity_change,
        compression_ratio=verdict.compression_ratio,
        model_uri=layout.model,
        report_uri=layout.report,
        message=verdict.message,
        files=names,
    )
    if not verdict.passed:
        raise QualityGateFailed(outcome)
    return outcome
