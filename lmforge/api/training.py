"""The TrainingJob spec: model shape, tokenizer, data, optimisation, checkpoints and placement."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import PlainValidator, WithJsonSchema, model_validator
from pydantic_core import PydanticCustomError

from lmforge.api.base import SpecModel, Uri, describe, rule_error
from lmforge.api.common import Metrics, Resources, RunPolicy, S3Settings, Scheduling
from lmforge.api.data import Data


def _parse_learning_rate(value: Any) -> float | Literal["auto"]:
    """A positive number, or ``auto`` for the LR range test.

    Numeric strings are accepted because YAML 1.1 (PyYAML) reads ``3e-4`` as a string.
    """
    if isinstance(value, str):
        if value.strip().lower() == "auto":
            return "auto"
        try:
            value = float(value)
        except ValueError:
            raise PydanticCustomError(
                "learning_rate",
                "'{value}' is not a learning rate; write a number such as 3.0e-4, or auto",
                {"value": value},
            ) from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PydanticCustomError("learning_rate", "expected a number such as 3.0e-4 or the word auto", {})
    value = float(value)
    if not (0.0 < value <= 10.0):
        raise PydanticCustomError(
            "learning_rate",
            "learning rate {value} is out of range; use a value in (0, 10], typically 1e-4..1e-3",
            {"value": value},
        )
    return value


LearningRate = Annotated[
    float | Literal["auto"],
    PlainValidator(_parse_learning_rate),
    # A number or the string "auto": no structural CRD type expresses that, so the node keeps
    # its value and the operator's validation (these models) decides.
    WithJsonSchema({"x-kubernetes-preserve-unknown-fields": True}),
]


class Attention(SpecModel):
    """Which positions each token attends to."""

    type: Literal["dense", "slidingWindow"] = describe(
        "dense: full causal attention; slidingWindow: each token sees the last `window` tokens.",
        default="dense",
    )
    window: int | None = describe("Window size for slidingWindow attention (tokens).", default=None, ge=1)

    @model_validator(mode="after")
    def _window_matches_type(self) -> Attention:
        if self.type == "slidingWindow" and self.window is None:
            raise rule_error("window", "slidingWindow attention needs window: N (e.g. 256)")
        if self.type == "dense" and self.window is not None:
            raise rule_error("window", "window only applies to type: slidingWindow; remove it or change type")
        return self


class ModelShape(SpecModel):
    """A decoder-only Transformer in the Llama style (RMSNorm, RoPE, SwiGLU, grouped-query)."""

    layers: int = describe("Number of Transformer blocks (depth).", default=12, ge=1, le=512)
    width: int = describe("Hidden size (d_model).", default=768, ge=8, le=65536)
    heads: int = describe("Attention (query) heads; must divide width.", default=12, ge=1, le=1024)
    kv_heads: int | None = describe(
        "Key/value heads for grouped-query attention; must divide heads. Defaults to heads.",
        default=None,
        ge=1,
        le=1024,
    )
    ffn_size: int | None = describe(
        "SwiGLU hidden size. Defaults to 8/3 x width rounded up to a multiple of 64.",
        default=None,
        ge=1,
        le=1_048_576,
    )
    context_length: int = describe("Maximum sequence length (tokens).", default=1024, ge=8, le=1_048_576)
    dropout: float = describe("Dropout probability.", default=0.0, ge=0.0, lt=1.0)
    attention: Attention = describe("Dense or sliding-window attention.", default_factory=Attention)
    tied_embeddings: bool = describe("Share the input embedding and output head weights.", default=True)
    rope_theta: float = describe("Base of the rotary position frequencies.", default=10000.0, gt=0)
    initial_model: Uri | None = describe(
        "Exported lmforge model to start from (stage finetune or continual).", default=None
    )

    @property
    def resolved_kv_heads(self) -> int:
        return self.kv_heads or self.heads

    @property
    def resolved_ffn_size(self) -> int:
        if self.ffn_size is not None:
            return self.ffn_size
        return ((8 * self.width // 3) + 63) // 64 * 64

    @model_validator(mode="after")
    def _shape_is_consistent(self) -> ModelShape:
        if self.width % self.heads:
            divisors = [h for h in range(1, min(self.width, 128) + 1) if self.width % h == 0]
            near = min(divisors, key=lambda h: abs(h - self.heads))
            raise rule_error(
                "heads",
                f"heads ({self.heads}) must divide width ({self.width}); "
                f"try heads: {near} or a width that is a multiple of {self.heads}",
            )
        if (self.width // self.heads) % 2:
            raise rule_error(
                "heads",
                f"head size width/heads = {self.width // self.heads} must be even for rotary "
                "positions; change width or heads",
            )
        kv = self.resolved_kv_heads
        if kv > self.heads or self.heads % kv:
            raise rule_error(
                "kvHeads",
                f"kvHeads ({kv}) must divide heads ({self.heads}); "
                f"use one of {[k for k in range(1, self.heads + 1) if self.heads % k == 0]}",
            )
        if self.attention.window is not None and self.attention.window > self.context_length:
            raise rule_error(
                "attention.window",
                f"window ({self.attention.window}) must be <= contextLength "
                f"({self.context_length}); lower the window or use type: dense",
            )
        return self


class Tokenizer(SpecModel):
    """Train a byte-level BPE on the training text, or reuse an existing tokenizer.json."""

    vocab_size: int = describe(
        "Vocabulary size of the BPE trained on the data (ignored when uri is set).",
        default=8192,
        ge=260,
        le=262144,
    )
    min_frequency: int = describe("Minimum pair frequency for a BPE merge.", default=2, ge=1)
    uri: Uri | None = describe("Existing tokenizer.json (or model directory) to reuse.", default=None)


class Optimizer(SpecModel):
    """AdamW."""

    lr: LearningRate = describe(
        "Peak learning rate, or auto to run the LR range test (training.lrFinder) first.",
        default=3.0e-4,
    )
    betas: list[float] = describe(
        "Adam beta1 and beta2.", default_factory=lambda: [0.9, 0.95], min_length=2, max_length=2
    )
    weight_decay: float = describe(
        "Decoupled weight decay (not applied to norms and biases).", default=0.1, ge=0.0, le=1.0
    )
    eps: float = describe("Adam epsilon.", default=1e-8, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _betas_in_range(self) -> Optimizer:
        for i, beta in enumerate(self.betas):
            if not 0.0 <= beta < 1.0:
                raise rule_error(f"betas[{i}]", f"beta {beta} must be in [0, 1), e.g. 0.9 and 0.95")
        return self


class Schedule(SpecModel):
    """Linear warm-up, then decay to minLrRatio x lr at the end of training."""

    warmup_steps: int = describe("Linear warm-up steps.", default=100, ge=0)
    decay: Literal["cosine", "linear", "constant"] = describe("Decay shape after warm-up.", default="cosine")
    min_lr_ratio: float = describe("Final learning rate as a fraction of the peak.", default=0.1, ge=0.0, le=1.0)


class LrFinder(SpecModel):
    """Exponential learning-rate range test (used by lr: auto and `lmforge lr-find`)."""

    min_lr: float = describe("First learning rate tried.", default=1e-6, gt=0.0)
    max_lr: float = describe("Last learning rate tried.", default=1.0, gt=0.0, le=100.0)
    steps: int = describe("Steps of the range test.", default=100, ge=10, le=10000)

    @model_validator(mode="after")
    def _bounds_ordered(self) -> LrFinder:
        if self.max_lr <= self.min_lr:
            raise rule_error("maxLr", f"maxLr ({self.max_lr}) must be greater than minLr ({self.min_lr})")
        return self


class Zero(SpecModel):
    """DeepSpeed ZeRO partitioning and offload."""

    stage: int = describe(
        "0: plain data parallel; 1: shard optimizer state; 2: + gradients; 3: + parameters.",
        default=1,
        ge=0,
        le=3,
    )
    offload_optimizer: Literal["none", "cpu"] = describe(
        "Keep optimizer state in CPU memory (stage >= 1).", default="none"
    )
    offload_params: Literal["none", "cpu"] = describe("Keep parameters in CPU memory (stage 3 only).", default="none")

    @model_validator(mode="after")
    def _offload_fits_stage(self) -> Zero:
        if self.offload_optimizer != "none" and self.stage == 0:
            raise rule_error("offloadOptimizer", "optimizer offload needs ZeRO stage 1, 2 or 3")
        if self.offload_params != "none" and self.stage != 3:
            raise rule_error("offloadParams", "parameter offload needs ZeRO stage 3; set stage: 3")
        return self


class Training(SpecModel):
    """How long and how to optimise."""

    max_steps: int | None = describe(
        "Optimizer steps to train. Set this or maxTokens; 1000 when neither is set.",
        default=None,
        ge=1,
        le=100_000_000,
    )
    max_tokens: int | None = describe(
        "Training tokens to consume (converted to steps from the global batch).",
        default=None,
        ge=1,
        le=10**15,
    )
    micro_batch_size: int = describe("Sequences per process per forward pass.", default=8, ge=1, le=65536)
    global_batch_size: int | None = describe(
        "Sequences per optimizer step across all processes; must be a multiple of "
        "microBatchSize x world size (the rest is gradient accumulation). "
        "Defaults to microBatchSize x world size.",
        default=None,
        ge=1,
        le=16_777_216,
    )
    optimizer: Optimizer = describe("AdamW settings.", default_factory=Optimizer)
    schedule: Schedule = describe("Learning-rate schedule.", default_factory=Schedule)
    lr_finder: LrFinder | None = describe("LR range test bounds; required when optimizer.lr is auto.", default=None)
    gradient_clipping: float = describe("Clip the global gradient norm; 0 disables.", default=1.0, ge=0.0)
    precision: Literal["bf16", "fp16", "fp32"] = describe("Compute precision.", default="bf16")
    zero: Zero = describe("DeepSpeed ZeRO settings.", default_factory=Zero)
    seed: int = describe("Seed for weights, data order and dropout.", default=1337, ge=0, le=2**32 - 1)
    eval_interval: int = describe("Evaluate every N steps (and at the end).", default=200, ge=1)
    eval_batches: int = describe("Micro-batches per evaluation.", default=20, ge=1, le=100000)
    log_interval: int = describe("Log and export metrics every N steps.", default=10, ge=1)

    @model_validator(mode="after")
    def _length_and_lr_finder(self) -> Training:
        if self.max_steps is not None and self.max_tokens is not None:
            raise rule_error("maxTokens", "set maxSteps or maxTokens, not both")
        if self.optimizer.lr == "auto" and self.lr_finder is None:
            raise rule_error(
                "lrFinder",
                "optimizer.lr: auto needs the range-test bounds; add lrFinder: {minLr: 1.0e-6, maxLr: 1.0, steps: 100}",
            )
        return self


class Ewc(SpecModel):
    """Elastic weight consolidation: pull the weights that mattered for the earlier data back toward their start."""

    weight: float = describe(
        "lambda in the penalty lambda/2 x sum F (theta - theta0)^2 added to the loss, where theta0 are the "
        "initial model's weights and F the diagonal Fisher information (mean squared per-sequence gradient) "
        "on the earlier data. F scales with the data, so tune it: try 10..10000.",
        gt=0.0,
        le=1e12,
    )
    samples: int = describe(
        "Earlier training sequences used to estimate F at the start (spread over the processes).",
        default=64,
        ge=1,
        le=1_000_000,
    )


class Continual(SpecModel):
    """Continual training (stage: continual): forgetting report and gate, optional EWC."""

    earlier_data: list[Uri] = describe(
        "Prepared data of earlier jobs (directories with train/ and val/, like data.replay.sources) "
        "to measure forgetting on (val/) and to estimate the EWC Fisher on (train/). Defaults to "
        "data.replay.sources; set it to measure forgetting without replaying.",
        default_factory=list,
        max_length=256,
    )
    max_forgetting: float | None = describe(
        "Quality gate: fail the job (exit 3, after writing the model and forgetting.json) when the "
        "perplexity on any earlier validation set rose by more than this fraction (0.05 = +5%).",
        default=None,
        ge=0.0,
        le=1000.0,
    )
    ewc: Ewc | None = describe("EWC penalty; unset disables it.", default=None)


class Checkpoint(SpecModel):
    """Periodic, atomic checkpoints; a restarted run resumes from the newest committed one."""

    interval: int = describe("Save every N steps (and on SIGTERM).", default=500, ge=1)
    keep: int = describe("Committed checkpoints to keep.", default=3, ge=1, le=1000)
    uri: Uri | None = describe("Where checkpoints go. Defaults to OUTPUT/checkpoints.", default=None)


class Output(SpecModel):
    """Where the exported model, metrics and reports go."""

    uri: Uri = describe("Output location: model (safetensors, config.json, tokenizer.json), metrics.jsonl, reports.")


class TrainingJobSpec(SpecModel):
    """What to train, on what, for how long, and where it runs."""

    stage: Literal["pretrain", "finetune", "continual"] = describe(
        "pretrain from scratch; finetune (SFT) or continual from model.initialModel.",
        default="pretrain",
    )
    model: ModelShape = describe("Model architecture.", default_factory=ModelShape)
    tokenizer: Tokenizer = describe("Tokenizer.", default_factory=Tokenizer)
    data: Data = describe("Training data.")
    training: Training = describe("Optimisation.", default_factory=Training)
    checkpoint: Checkpoint = describe("Checkpointing.", default_factory=Checkpoint)
    output: Output = describe("Outputs.")
    s3: S3Settings = describe("S3-compatible storage settings.", default_factory=S3Settings)
    resources: Resources = describe("Pods, GPUs and placement.", default_factory=Resources)
    scheduling: Scheduling = describe("Batch scheduler integration.", default_factory=Scheduling)
    run_policy: RunPolicy = describe("Retries, deadline, TTL, suspend.", default_factory=RunPolicy)
    metrics: Metrics = describe("Prometheus endpoint.", default_factory=Metrics)
    continual: Continual | None = describe(
        "Forgetting report, its gate and EWC (stage: continual). The report runs whenever there is "
        "earlier data (data.replay.sources or continual.earlierData).",
        default=None,
    )

    @property
    def earlier_data(self) -> list[tuple[str, str]]:
        """``(field path, URI)`` of the earlier jobs' prepared data: the replay sources, else continual.earlierData."""
        if self.data.replay is not None:
            return [(f"data.replay.sources[{i}]", uri) for i, uri in enumerate(self.data.replay.sources)]
        if self.continual is not None:
            return [(f"continual.earlierData[{i}]", uri) for i, uri in enumerate(self.continual.earlier_data)]
        return []

    @model_validator(mode="after")
    def _cross_block_rules(self) -> TrainingJobSpec:
        if self.stage in ("finetune", "continual") and self.model.initial_model is None:
            raise rule_error(
                "model.initialModel",
                f"stage: {self.stage} starts from a trained model; set model.initialModel to "
                "the output URI of an earlier job (e.g. s3://bucket/runs/base/model)",
            )
        if self.data.replay is not None and self.stage != "continual":
            raise rule_error("data.replay", "replay mixes earlier data into continual training; use stage: continual")
        self._continual_rules()
        self.check_world_size(self.resources.world_size, origin="resources")
        if self.training.precision == "fp16" and self.resources.gpus_per_node == 0:
            raise rule_error("training.precision", "fp16 needs a GPU; on CPU use bf16 or fp32")
        return self

    def _continual_rules(self) -> None:
        """Rules that keep a continual job from reading or overwriting the earlier job's files."""
        if self.continual is not None and self.stage != "continual":
            raise rule_error("continual", "the continual block applies to stage: continual; set it or remove the block")
        output = self.output.uri.rstrip("/") + "/"
        initial = self.model.initial_model
        if initial is not None and (initial.rstrip("/") + "/").startswith(output):
            raise rule_error(
                "model.initialModel",
                f"{initial} is inside this job's output.uri ({self.output.uri}): the job would resume the "
                "earlier job's checkpoints and overwrite its model; give this job its own output.uri",
            )
        prepared = (self.data.prepared_uri or output + "data").rstrip("/")
        mixed = [(f"data.mix[{i}].uri", source.uri) for i, source in enumerate(self.data.mix)]
        for path, uri in [*self.earlier_data, *mixed]:
            if uri.rstrip("/") == prepared:
                raise rule_error(
                    path,
                    f"{uri} is where this job writes its own prepared data (data.preparedUri, default "
                    "OUTPUT/data); point it at another job's prepared data, or set data.preparedUri elsewhere",
                )
        settings = self.continual
        if settings is None:
            return
        if self.data.replay is not None and settings.earlier_data:
            raise rule_error(
                "continual.earlierData",
                "data.replay.sources already name the earlier data (their val/ measures forgetting); "
                "remove continual.earlierData, or remove data.replay to measure without replaying",
            )
        if not self.earlier_data:
            for name, value in (("maxForgetting", settings.max_forgetting), ("ewc", settings.ewc)):
                if value is not None:
                    raise rule_error(
                        f"continual.{name}",
                        f"continual.{name} needs the earlier job's data; set data.replay.sources or "
                        "continual.earlierData to its prepared data (e.g. s3://bucket/runs/base/data)",
                    )
        if settings.ewc is not None and self.training.zero.stage == 3:
            raise rule_error(
                "continual.ewc",
                "EWC needs every weight on every process, and ZeRO stage 3 partitions them; use "
                "training.zero.stage 0, 1 or 2 with EWC, or remove continual.ewc",
            )

    def check_world_size(self, world_size: int, origin: str = "resources") -> None:
        """Raise when the global batch cannot be split over ``world_size`` processes."""
        global_batch = self.training.global_batch_size
        if global_batch is None:
            return
        per_step = self.training.micro_batch_size * world_size
        if global_batch % per_step:
            lower = max(per_step, global_batch // per_step * per_step)
            raise rule_error(
                "training.globalBatchSize",
                f"globalBatchSize ({global_batch}) must be a multiple of microBatchSize x "
                f"world size ({self.training.micro_batch_size} x {world_size} = {per_step}, "
                f"world size from {origin}); use {lower} or {lower + per_step}",
            )

    def gradient_accumulation_steps(self, world_size: int) -> int:
        """Micro-batches each process accumulates per optimizer step."""
        if self.training.global_batch_size is None:
            return 1
        return self.training.global_batch_size // (self.training.micro_batch_size * world_size)

    def total_steps(self, world_size: int) -> int:
        """Optimizer steps after resolving maxTokens against the global batch."""
        if self.training.max_steps is not None:
            return self.training.max_steps
        global_batch = self.training.global_batch_size or self.training.micro_batch_size * world_size
        tokens_per_step = global_batch * self.model.context_length
        if self.training.max_tokens is not None:
            return max(1, -(-self.training.max_tokens // tokens_per_step))
        return 1000
