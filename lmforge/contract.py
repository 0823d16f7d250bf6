"""What a run leaves behind for others to read: its output layout and its Prometheus metric names.

Like :mod:`lmforge.exitcodes`, this is a contract, written down once and torch-free, because
both sides of it live in different images: the trainer and the compressor write the files and
serve the metrics; the operator (``status.outputs``, progress scraping, the default checkpoint
URI), ``lmforge report``, the chart's alert rules and the Grafana dashboard read them. A test
fails when the dashboard or the alerts name a metric that nothing here exports.

Layout of a TrainingJob's ``spec.output.uri``::

    model/                 the exported model (MODEL_META, weights, tokenizer)
    checkpoints/           step-NNNNNNNN/ tags, unless spec.checkpoint.uri says otherwise
    data/                  prepared shards and tokenizer, unless spec.data.preparedUri says otherwise
    metrics.jsonl          one record per log interval and per evaluation
    summary.json           written once at the end
    forgetting.json        stage: continual with earlier data

Layout of a CompressionJob's ``spec.output.uri``::

    model/                 the compressed model
    steps/                 the model after each step
    results.json / .md / .png
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# --- output layout --------------------------------------------------------------------------

MODEL_DIR = "model"
CHECKPOINTS_DIR = "checkpoints"
DATA_DIR = "data"
METRICS_JSONL = "metrics.jsonl"
SUMMARY_JSON = "summary.json"
FORGETTING_JSON = "forgetting.json"
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
RESULTS_PNG = "results.png"
STEPS_DIR = "steps"
MODEL_META = "lmforge_model.json"
"""The file that marks a directory as an exported lmforge model (its GPTConfig and format version)."""
CHECKPOINT_TAG_PREFIX = "step-"


def under(base_uri: str, name: str) -> str:
    """``name`` inside ``base_uri`` with one slash between (``file://``, ``s3://`` or a path)."""
    return f"{base_uri.rstrip('/')}/{name.strip('/')}"


def checkpoint_tag(step: int) -> str:
    """The tag of the checkpoint saved after ``step`` optimizer steps: ``step-00000200``."""
    return f"{CHECKPOINT_TAG_PREFIX}{step:08d}"


@dataclass(frozen=True)
class RunLayout:
    """Where one TrainingJob's outputs live, from the three URIs of its spec that place them."""

    output_uri: str
    checkpoint_uri: str | None = None
    """``spec.checkpoint.uri``; None: ``checkpoints/`` under the output."""
    prepared_uri: str | None = None
    """``spec.data.preparedUri``; None: ``data/`` under the output."""

    @property
    def model(self) -> str:
        return under(self.output_uri, MODEL_DIR)

    @property
    def metrics(self) -> str:
        return under(self.output_uri, METRICS_JSONL)

    @property
    def checkpoints(self) -> str:
        return self.checkpoint_uri or under(self.output_uri, CHECKPOINTS_DIR)

    @property
    def data(self) -> str:
        return self.prepared_uri or under(self.output_uri, DATA_DIR)

    def checkpoint(self, step: int) -> str:
        return under(self.checkpoints, checkpoint_tag(step))


@dataclass(frozen=True)
class CompressionLayout:
    """Where one CompressionJob's outputs live."""

    output_uri: str

    @property
    def model(self) -> str:
        return under(self.output_uri, MODEL_DIR)

    @property
    def report(self) -> str:
        return under(self.output_uri, RESULTS_MD)


# --- metric names ---------------------------------------------------------------------------

MetricKind = Literal["gauge", "counter", "histogram"]


@dataclass(frozen=True)
class Metric:
    """One Prometheus metric family: ``name`` as passed to prometheus-client, its kind and help."""

    name: str
    kind: MetricKind
    help: str

    @property
    def series(self) -> tuple[str, ...]:
        """The sample names a scrape shows (what PromQL, the dashboard and the operator read)."""
        if self.kind == "counter":
            return (self.name if self.name.endswith("_total") else f"{self.name}_total",)
        if self.kind == "histogram":
            return (f"{self.name}_bucket", f"{self.name}_sum", f"{self.name}_count")
        return (self.name,)


# Every trainer process serves these on spec.metrics.port + local rank, labelled job, namespace, rank.
TRAIN_LOSS = Metric("lmforge_train_loss", "gauge", "Training loss (mean over the last log interval).")
EVAL_LOSS = Metric("lmforge_eval_loss", "gauge", "Held-out loss at the last evaluation.")
LEARNING_RATE = Metric("lmforge_learning_rate", "gauge", "Current learning rate.")
TRAIN_STEP = Metric("lmforge_train_step", "gauge", "Optimizer steps completed.")
TRAIN_TOTAL_STEPS = Metric("lmforge_train_total_steps", "gauge", "Optimizer steps planned.")
TOKENS_PER_SECOND = Metric("lmforge_tokens_per_second", "gauge", "Training tokens per second, all ranks.")
GRAD_NORM = Metric("lmforge_grad_norm", "gauge", "Global gradient norm before clipping.")
DATA_WAIT = Metric("lmforge_data_wait_seconds", "gauge", "Seconds this rank waited for data in the last log interval.")
CHECKPOINT_LAST_STEP = Metric("lmforge_checkpoint_last_step", "gauge", "Step of the newest committed checkpoint.")
CHECKPOINT_LAST_TIME = Metric(
    "lmforge_checkpoint_last_timestamp_seconds", "gauge", "Unix time of the newest committed checkpoint."
)
CHECKPOINT_SECONDS = Metric("lmforge_checkpoint_seconds", "gauge", "Duration of the last checkpoint save.")
ETA_SECONDS = Metric("lmforge_eta_seconds", "gauge", "Estimated seconds until training ends.")
MFU = Metric("lmforge_mfu", "gauge", "Model FLOPs utilisation (GPU only).")
GPU_MEMORY = Metric("lmforge_gpu_memory_bytes", "gauge", "Peak GPU memory allocated (GPU only).")
TOKENS = Metric("lmforge_tokens", "counter", "Training tokens consumed, all ranks.")
DATA_SAMPLES_READ = Metric("lmforge_data_samples_read", "counter", "Training samples read by this rank.")
DATA_BYTES_READ = Metric(
    "lmforge_data_bytes_read", "counter", "Bytes of token data read from storage by this rank (downloaded for s3://)."
)
DATA_S3_ERRORS = Metric("lmforge_data_s3_errors", "counter", "Failed S3 GETs of training data (each attempt).")
DATA_S3_RETRIES = Metric("lmforge_data_s3_retries", "counter", "Retried S3 GETs of training data.")
DATA_PREFETCH_DEPTH = Metric(
    "lmforge_data_prefetch_queue_depth", "gauge", "Data blocks fetched or in flight ahead of this rank's reader."
)

TRAINER_METRICS: tuple[Metric, ...] = (
    TRAIN_LOSS,
    EVAL_LOSS,
    LEARNING_RATE,
    TRAIN_STEP,
    TRAIN_TOTAL_STEPS,
    TOKENS_PER_SECOND,
    GRAD_NORM,
    DATA_WAIT,
    CHECKPOINT_LAST_STEP,
    CHECKPOINT_LAST_TIME,
    CHECKPOINT_SECONDS,
    ETA_SECONDS,
    MFU,
    GPU_MEMORY,
    TOKENS,
    DATA_SAMPLES_READ,
    DATA_BYTES_READ,
    DATA_S3_ERRORS,
    DATA_S3_RETRIES,
    DATA_PREFETCH_DEPTH,
)
TRAINER_LABELS = ("job", "namespace", "rank")

# The operator serves these on its own metrics port (--metrics-port).
OPERATOR_JOBS_CREATED = Metric(
    "lmforge_operator_jobs_created_total", "counter", "TrainingJobs and CompressionJobs seen created."
)
OPERATOR_JOBS_SUCCEEDED = Metric("lmforge_operator_jobs_succeeded_total", "counter", "Jobs that succeeded.")
OPERATOR_JOBS_FAILED = Metric("lmforge_operator_jobs_failed_total", "counter", "Jobs that failed, by reason.")
OPERATOR_RESTARTS = Metric(
    "lmforge_operator_restarts_total", "counter", "Gang restarts (new attempts after a failure)."
)
OPERATOR_RECONCILE_DURATION = Metric(
    "lmforge_operator_reconcile_duration_seconds", "histogram", "Duration of one reconciliation of one job."
)
OPERATOR_JOBS = Metric("lmforge_operator_jobs", "gauge", "Jobs by phase.")

OPERATOR_METRICS: tuple[Metric, ...] = (
    OPERATOR_JOBS_CREATED,
    OPERATOR_JOBS_SUCCEEDED,
    OPERATOR_JOBS_FAILED,
    OPERATOR_RESTARTS,
    OPERATOR_RECONCILE_DURATION,
    OPERATOR_JOBS,
)


def exported_series() -> frozenset[str]:
    """Every sample name lmforge's processes expose (trainer and operator)."""
    return frozenset(name for metric in (*TRAINER_METRICS, *OPERATOR_METRICS) for name in metric.series)
