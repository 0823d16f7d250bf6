"""What a run leaves in ``spec.output.uri``, staged locally and published: metrics, model, summary.

The trainer writes every output file into one local directory and then publishes it (a no-op for
``file://``, where that directory is the output itself; see :mod:`lmforge.data.staging`). That
directory, publishing, the export of the final model and ``summary.json`` live here, in one
module, because the loop, the checkpointer, the LR finder and the CLI all need a part of them;
the file names are the contract's (:mod:`lmforge.contract`), which the operator and
``lmforge report`` read.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from lmforge import contract
from lmforge.api.common import S3Settings
from lmforge.api.training import TrainingJobSpec
from lmforge.data.staging import fetch, local_dir, publish
from lmforge.data.storage import storage_for
from lmforge.trainer.continual import summary_entry
from lmforge.trainer.export import export_model
from lmforge.trainer.model import GPT, GPTConfig


@dataclass
class RunResult:
    """What rank 0 reports back to the launcher (and, most of it, ``summary.json``)."""

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


def materialize(uri: str, s3: S3Settings | None) -> Path:
    """A local directory holding the files under ``uri`` (downloaded once for s3://)."""
    return fetch(storage_for(uri, s3), uri, "models")


class RunOutputs:
    """One run's output location: its layout, its storage and the local directory staging it."""

    def __init__(self, spec: TrainingJobSpec) -> None:
        self.uri = spec.output.uri
        self.layout = contract.RunLayout(spec.output.uri, spec.checkpoint.uri, spec.data.prepared_uri)
        self.storage = storage_for(spec.output.uri, spec.s3)

    @property
    def is_local(self) -> bool:
        return self.uri.startswith("file://")

    @cached_property
    def dir(self) -> Path:
        """Local directory the run writes its outputs to before they are published (if s3://); made on first use."""
        return local_dir(self.uri, "output")

    def publish(self, names: list[str]) -> None:
        """Upload the named files or directories of :attr:`dir` to the output (no-op for file://)."""
        publish(self.storage, self.dir, self.uri, names)

    def fetch_metrics(self) -> None:
        """Continue an earlier attempt's metrics.jsonl (s3://): download it, if there is one, to append to it."""
        if self.storage.exists(self.layout.metrics):
            self.storage.download_file(self.layout.metrics, self.dir / contract.METRICS_JSONL)

    def export(self, state: dict[str, torch.Tensor] | None, config: GPTConfig, tokenizer: Tokenizer) -> str:
        """Rank 0: the final weights as an exported model under ``model/``, published with metrics.jsonl; its URI."""
        model = GPT(config)
        model.load_state_dict(state)
        tokenizer_json = self.dir / "tokenizer.json.tmp"
        tokenizer_json.write_text(tokenizer.to_str())
        export_model(model, tokenizer_json, self.dir / contract.MODEL_DIR)
        tokenizer_json.unlink()
        self.publish([contract.MODEL_DIR, contract.METRICS_JSONL])
        return self.layout.model

    def write_summary(self, result: RunResult, started: float) -> None:
        """Rank 0: ``summary.json`` (``seconds`` counted from ``started``, the world's start), published."""
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
            summary["forgetting"] = summary_entry(result.forgetting)
        (self.dir / contract.SUMMARY_JSON).write_text(json.dumps(summary, indent=2))
        self.publish([contract.SUMMARY_JSON])
