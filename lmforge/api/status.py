"""Status of TrainingJobs and CompressionJobs, written by the operator and shown by kubectl."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, PlainSerializer

from lmforge.api.base import StatusModel, describe
from lmforge.api.bounds import cut_log_tail, cut_message, cut_reason

TrainingPhase = Literal["Pending", "Preparing", "Running", "Restarting", "Suspended", "Stalled", "Succeeded", "Failed"]
CompressionPhase = Literal["Pending", "Running", "Succeeded", "Failed"]

# Text the operator copies from what a user or a pod controls (messages quoting spec values,
# pod reasons, log tails) is bounded when read and when written, whichever code assigned it
# (see lmforge.api.bounds): the status stays far below the API server's object size limit.
Message = Annotated[str, AfterValidator(cut_message), PlainSerializer(cut_message, return_type=str)]
Reason = Annotated[str, AfterValidator(cut_reason), PlainSerializer(cut_reason, return_type=str)]
LogTail = Annotated[str, AfterValidator(cut_log_tail), PlainSerializer(cut_log_tail, return_type=str)]


class Condition(StatusModel):
    """A Kubernetes-style condition (Ready, InvalidSpec, Stalled, QualityGate, ...)."""

    type: str = describe("Condition type.")
    status: Literal["True", "False", "Unknown"] = describe("True, False or Unknown.")
    reason: Reason | None = describe("One-word CamelCase reason.", default=None)
    message: Message | None = describe("Human-readable explanation, including how to fix it.", default=None)
    last_transition_time: datetime | None = describe("When status last changed.", default=None)
    last_update_time: datetime | None = describe("When the condition was last written.", default=None)


class Attempt(StatusModel):
    """One gang launch. Kept after its pods are gone so failures stay explainable."""

    index: int = describe("0 for the first attempt, then 1, 2, ...", ge=0)
    start_time: datetime | None = describe("When the attempt's Job was created.", default=None)
    end_time: datetime | None = describe("When it finished.", default=None)
    exit_code: int | None = describe("Exit code of the failed (or last) rank.", default=None)
    failed_pod: str | None = describe("Pod that failed first.", default=None)
    failed_rank: int | None = describe("Node rank of that pod.", default=None)
    node: str | None = describe("Kubernetes node it ran on.", default=None)
    reason: Reason | None = describe(
        "Why it ended: Completed, Error, OOMKilled, Evicted, NodeLost, Stalled, Suspended, ...",
        default=None,
    )
    retryable: bool | None = describe("Whether the failure allowed a restart.", default=None)
    log_tail: LogTail | None = describe("Last log lines of the failed rank.", default=None)


class Progress(StatusModel):
    """Training progress read from rank 0's metrics endpoint."""

    step: int | None = describe("Optimizer step.", default=None, ge=0)
    total_steps: int | None = describe("Planned steps.", default=None, ge=0)
    tokens: int | None = describe("Tokens trained on.", default=None, ge=0)
    loss: float | None = describe("Latest training loss.", default=None)
    eval_loss: float | None = describe("Latest held-out loss.", default=None)
    lr: float | None = describe("Current learning rate.", default=None)
    tokens_per_second: float | None = describe("Throughput across all ranks.", default=None)
    eta_seconds: float | None = describe("Estimated seconds to finish.", default=None)
    updated_at: datetime | None = describe("When this was read.", default=None)
    message: Message | None = describe(
        "What the values above leave out: a value rank 0 reported that is not a number the status holds "
        "(e.g. loss is not finite (+Inf): the training diverged; the stall clock still follows the step), "
        "or why the last read failed (progress unavailable: metrics body over 1 MiB).",
        default=None,
    )
    last_progress_time: datetime | None = describe(
        "When the step last advanced (or the attempt started running, before any step was reported): "
        "the stall clock of runPolicy.stallTimeoutSeconds, kept here so an operator restart does not reset it.",
        default=None,
    )


class CheckpointRef(StatusModel):
    """The newest committed checkpoint."""

    step: int = describe("Step of the checkpoint.", ge=0)
    uri: str = describe("Where it is.")
    time: datetime | None = describe("When it was committed.", default=None)


class Outputs(StatusModel):
    """Where the results are."""

    model_uri: str | None = describe("Exported model directory.", default=None)
    metrics_uri: str | None = describe("metrics.jsonl.", default=None)
    report_uri: str | None = describe("Reports (data report, curves, results table).", default=None)


class JobStatusBase(StatusModel):
    """Fields both kinds share."""

    observed_generation: int | None = describe("Generation the status describes.", default=None)
    conditions: list[Condition] = describe("Conditions.", default_factory=list)
    attempts: list[Attempt] = describe("Launch history, oldest first.", default_factory=list)
    restarts: int = describe("Gang restarts so far.", default=0, ge=0)
    start_time: datetime | None = describe("When the job started.", default=None)
    completion_time: datetime | None = describe("When it succeeded or failed.", default=None)
    outputs: Outputs | None = describe("Output locations.", default=None)
    message: Message | None = describe("Short summary of the current phase.", default=None)


class TrainingJobStatus(JobStatusBase):
    """Observed state of a TrainingJob."""

    phase: TrainingPhase = describe("Lifecycle phase.", default="Pending")
    progress: Progress | None = describe("Training progress.", default=None)
    last_checkpoint: CheckpointRef | None = describe("Newest committed checkpoint.", default=None)


class CompressionResult(StatusModel):
    """One row of the results table: the model after a step (or the baseline)."""

    step: str = describe("baseline, or the step: prune, distill, quantize.")
    method: str | None = describe("Method of the step.", default=None)
    parameters: int | None = describe("Parameter count.", default=None, ge=0)
    size_bytes: int | None = describe("Size on disk.", default=None, ge=0)
    perplexity: float | None = describe("Held-out perplexity.", default=None)
    prefill_tokens_per_second: float | None = describe("Prefill throughput.", default=None)
    decode_ms_per_token: float | None = describe("Decode latency per token at batch 1.", default=None)
    speedup: float | None = describe("Decode speed relative to the baseline.", default=None)


class CompressionJobStatus(JobStatusBase):
    """Observed state of a CompressionJob."""

    phase: CompressionPhase = describe("Lifecycle phase.", default="Pending")
    results: list[CompressionResult] = describe("Results table.", default_factory=list)
    compression_ratio: float | None = describe("Baseline size / final size (printer column Ratio).", default=None)
    perplexity_change: str | None = describe(
        "Relative perplexity change of the final model, e.g. +1.2% (printer column PPL Δ).",
        default=None,
    )


__all__ = [
    "Attempt",
    "CheckpointRef",
    "CompressionJobStatus",
    "CompressionResult",
    "Condition",
    "Outputs",
    "Progress",
    "TrainingJobStatus",
]
