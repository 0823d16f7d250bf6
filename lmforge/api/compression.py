"""The CompressionJob spec: an ordered list of prune, distill and quantize steps with a quality gate."""

from __future__ import annotations

from typing import Literal

from pydantic import model_validator

from lmforge.api.base import K8sName, SpecModel, Uri, describe, rule_error
from lmforge.api.common import Metrics, Resources, RunPolicy, S3Settings, Scheduling
from lmforge.api.data import Data
from lmforge.api.training import Output


class SourceModel(SpecModel):
    """The model to compress: an exported model URI, or the output of a TrainingJob."""

    uri: Uri | None = describe("Exported lmforge model directory.", default=None)
    training_job: K8sName | None = describe(
        "Name of a Succeeded TrainingJob in the same namespace; its output model is used.",
        default=None,
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> SourceModel:
        if (self.uri is None) == (self.training_job is None):
            raise rule_error("uri", "set exactly one of model.uri or model.trainingJob")
        return self


class Prune(SpecModel):
    """Remove weights. Structured pruning shrinks the model; magnitude pruning only zeroes."""

    method: Literal["structured", "magnitude"] = describe(
        "structured: remove whole heads, FFN channels or layers (real speed-up); magnitude: "
        "unstructured zeroing (no size or CPU speed gain without sparse kernels).",
        default="structured",
    )
    sparsity: float = describe(
        "Fraction of the targeted structures (or weights) to remove.", default=0.25, gt=0.0, lt=1.0
    )
    targets: list[Literal["heads", "ffn", "layers"]] = describe(
        "What structured pruning removes.", default_factory=lambda: ["heads", "ffn"], min_length=1
    )
    importance: Literal["magnitude", "activation"] = describe(
        "Importance score: weight magnitude, or mean activation on calibration batches.",
        default="activation",
    )
    calibration_batches: int = describe("Batches used to score activations.", default=8, ge=1, le=10000)
    recovery_steps: int = describe("Fine-tuning steps after pruning to recover quality; 0 skips.", default=0, ge=0)
    recovery_distill: bool = describe(
        "Recovery learns from the unpruned model (0.5 x KL on its temperature-2 logits + 0.5 x "
        "cross-entropy), which recovers more perplexity than cross-entropy alone at equal steps; "
        "false: cross-entropy only.",
        default=True,
    )

    @model_validator(mode="after")
    def _targets_apply(self) -> Prune:
        if self.method == "magnitude" and self.targets != ["heads", "ffn"]:
            raise rule_error("targets", "targets only apply to method: structured; remove them")
        if "recovery_distill" in self.model_fields_set and self.recovery_steps == 0:
            raise rule_error(
                "recoveryDistill",
                "recoveryDistill sets how the recovery fine-tune learns, and recoverySteps is 0 (no recovery); "
                "set recoverySteps (e.g. 200) or remove recoveryDistill",
            )
        return self


class StudentShape(SpecModel):
    """Shape of the distilled student; unset fields copy the teacher."""

    layers: int | None = describe("Blocks in the student.", default=None, ge=1, le=512)
    width: int | None = describe("Hidden size of the student.", default=None, ge=8, le=65536)
    heads: int | None = describe("Attention heads of the student.", default=None, ge=1, le=1024)
    kv_heads: int | None = describe("Key/value heads of the student.", default=None, ge=1, le=1024)
    ffn_size: int | None = describe("SwiGLU hidden size of the student.", default=None, ge=1)
    init_from_layers: list[int] | None = describe(
        "Teacher layers copied into the student (same width only); default every other layer.",
        default=None,
    )


class Distill(SpecModel):
    """Train a smaller student on the teacher's softened logits plus the normal loss."""

    student: StudentShape = describe("Student architecture.", default_factory=StudentShape)
    temperature: float = describe("Softmax temperature of the KL term.", default=2.0, gt=0.0, le=100.0)
    alpha: float = describe(
        "Loss mix: alpha x KL(teacher || student) + (1 - alpha) x cross-entropy.",
        default=0.5,
        ge=0.0,
        le=1.0,
    )
    steps: int = describe("Distillation steps.", default=1000, ge=1, le=100_000_000)
    lr: float = describe("Peak learning rate of the student.", default=3.0e-4, gt=0.0, le=10.0)
    micro_batch_size: int = describe("Sequences per process per step.", default=8, ge=1, le=65536)


class Quantize(SpecModel):
    """Post-training weight quantization with torchao."""

    method: Literal["int8-dynamic", "int8-weight-only", "int4-weight-only"] = describe(
        "int8-dynamic: int8 weights and dynamically quantized activations; int8-weight-only; "
        "int4-weight-only: group-wise int4 (needs a supported kernel on the target).",
        default="int8-dynamic",
    )
    group_size: int = describe("Group size for int4.", default=128, ge=16, le=1024)


class CompressionStep(SpecModel):
    """One step; set exactly one of prune, distill or quantize."""

    prune: Prune | None = describe("Pruning step.", default=None)
    distill: Distill | None = describe("Distillation step.", default=None)
    quantize: Quantize | None = describe("Quantization step.", default=None)

    @model_validator(mode="after")
    def _exactly_one(self) -> CompressionStep:
        chosen = [k for k in ("prune", "distill", "quantize") if getattr(self, k) is not None]
        if len(chosen) != 1:
            raise rule_error(
                "prune",
                "each step sets exactly one of prune, distill or quantize"
                + (f" (this one sets {', '.join(chosen)})" if chosen else " (this one sets none)"),
            )
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("prune", "distill", "quantize") if getattr(self, k) is not None)


class Evaluation(SpecModel):
    """Measured after every step; the gate fails the job when quality drops too far."""

    batches: int = describe("Held-out batches for perplexity.", default=20, ge=1, le=100000)
    max_perplexity_increase: float = describe(
        "Allowed relative perplexity increase over the uncompressed model (0.1 = +10%); "
        "beyond it the job fails with reason QualityGate after writing its results.",
        default=0.1,
        ge=0.0,
        le=100.0,
    )
    latency_batch_sizes: list[int] = describe(
        "Batch sizes for the prefill and decode latency measurement.",
        default_factory=lambda: [1, 8],
        min_length=1,
    )
    compile: bool = describe("Also measure with torch.compile.", default=True)


class CompressionJobSpec(SpecModel):
    """Compress a trained model step by step and refuse one that got worse than allowed."""

    model: SourceModel = describe("The model to compress.")
    steps: list[CompressionStep] = describe("Steps applied in order.", min_length=1, max_length=32)
    data: Data | None = describe(
        "Text for calibration, recovery, distillation and evaluation; defaults to the "
        "validation data of the source model.",
        default=None,
    )
    evaluation: Evaluation = describe("Evaluation and quality gate.", default_factory=Evaluation)
    output: Output = describe("Where the compressed model and results go.")
    s3: S3Settings = describe("S3-compatible storage settings.", default_factory=S3Settings)
    resources: Resources = describe("Pod size and placement.", default_factory=Resources)
    scheduling: Scheduling = describe("Batch scheduler integration.", default_factory=Scheduling)
    run_policy: RunPolicy = describe("Retries, deadline, TTL.", default_factory=RunPolicy)
    metrics: Metrics = describe("Prometheus endpoint.", default_factory=Metrics)

    @model_validator(mode="after")
    def _data_for_training_steps(self) -> CompressionJobSpec:
        for i, step in enumerate(self.steps):
            needs_data = step.distill is not None or (step.prune is not None and step.prune.recovery_steps > 0)
            if needs_data and self.data is None:
                raise rule_error(
                    f"steps[{i}].{step.kind}",
                    f"a {step.kind} step trains the model, so set data.sources (the text it trains on)",
                )
        if self.data is not None:
            for name, value in (("mix", self.data.mix), ("replay", self.data.replay)):
                if value:
                    raise rule_error(
                        f"data.{name}",
                        f"data.{name} mixes corpora into a TrainingJob's training; a CompressionJob reads "
                        f"data.sources only, so remove data.{name}",
                    )
        if self.resources.nodes != 1:
            raise rule_error("resources.nodes", "a CompressionJob runs on one node; set nodes: 1")
        return self
