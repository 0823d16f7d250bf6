"""What is particular to a CompressionJob: the model it compresses and the results it reports.

* A CompressionJob of ``model.trainingJob`` compresses that TrainingJob's exported model: its
  attempt starts only once the TrainingJob has Succeeded, with the model's URI in the pod's
  environment (:data:`lmforge.operator.children.SOURCE_MODEL_ENV`). :func:`source_model`
  resolves it at most once per step.
* The results table comes back in the pod's termination message (the operator has no S3
  client to read results.json) and is copied into the status by :func:`copy_results`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lmforge import API_GROUP, API_VERSION, contract
from lmforge.api.manifest import CompressionJob
from lmforge.api.status import CompressionJobStatus, CompressionResult
from lmforge.operator.context import StepContext
from lmforge.termination import read_termination_message

WAITING_FOR_MODEL = "WaitingForModel"
"""Reason of phase Pending while the TrainingJob whose model a CompressionJob compresses has not succeeded."""


@dataclass(frozen=True)
class SourceModel:
    """Where an attempt's model comes from, as far as the operator resolves it."""

    uri: str | None = None
    """The model URI the attempt gets; None when nothing needs resolving (a TrainingJob, a
    CompressionJob of a model URI) or while waiting."""
    waiting: bool = False
    """The TrainingJob of ``model.trainingJob`` is missing or has not succeeded yet: no attempt starts."""
    reason: str = ""
    """Why it is waiting (:data:`WAITING_FOR_MODEL`), for phase Pending."""
    message: str = ""


def source_model(context: StepContext) -> SourceModel:
    """The source model of this step's job, resolved the first time a step asks for it.

    For a CompressionJob of ``model.trainingJob``: that job's ``status.outputs.modelUri`` (else
    ``model/`` under its output) once it has Succeeded. While it is missing or not finished, the
    phase says so (Pending, WaitingForModel).
    """
    if context.source_model is None:
        context.source_model = _resolve(context)
        if context.source_model.waiting:
            context.enter_phase("Pending", context.source_model.reason, context.source_model.message)
    return context.source_model


def _resolve(context: StepContext) -> SourceModel:
    manifest = context.manifest
    if not isinstance(manifest, CompressionJob) or manifest.spec.model.training_job is None:
        return SourceModel()
    name = manifest.spec.model.training_job
    source = context.kube.get(f"{API_GROUP}/{API_VERSION}", "TrainingJob", context.namespace, name)
    phase = ((source or {}).get("status") or {}).get("phase")
    if source is None or phase != "Succeeded":
        what = "does not exist" if source is None else f"is {phase or 'Pending'}"
        message = f"TrainingJob {name} {what}; waiting for it to succeed"
        return SourceModel(waiting=True, reason=WAITING_FOR_MODEL, message=message)
    outputs = (source.get("status") or {}).get("outputs") or {}
    output_uri = ((source.get("spec") or {}).get("output") or {}).get("uri", "")
    return SourceModel(uri=outputs.get("modelUri") or contract.RunLayout(output_uri).model)


def copy_results(context: StepContext, pods: list[dict[str, Any]]) -> None:
    """A CompressionJob's results table from its pod's termination message into the status
    (on success and on a failed quality gate alike; absent or unreadable → left as it was)."""
    status = context.status
    if not isinstance(status, CompressionJobStatus):
        return
    for pod in pods:
        for container in (pod.get("status") or {}).get("containerStatuses") or []:
            ended = (container.get("state") or {}).get("terminated") or {}
            summary = read_termination_message(ended.get("message"))
            if summary is None:
                continue
            try:
                results = [CompressionResult.model_validate(row) for row in summary.get("results") or []]
            except ValueError:
                continue
            status.results = results or status.results
            ratio, change = summary.get("compression_ratio"), summary.get("perplexity_change")
            if isinstance(ratio, int | float):
                status.compression_ratio = round(float(ratio), 4)
            status.perplexity_change = change if isinstance(change, str) else status.perplexity_change
            dropped = (summary.get("truncated") or {}).get("results")
            if dropped:
                context.warn(
                    "ResultsTruncated",
                    f"{dropped} middle row(s) of the results table did not fit the "
                    f"pod's 4096-byte termination message; {contract.RESULTS_MD} has them all",
                )
            return
