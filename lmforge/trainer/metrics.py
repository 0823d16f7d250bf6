"""Training metrics: a Prometheus endpoint per process and metrics.jsonl for reports.

MFU (model FLOPs utilisation) = tokens/s x FLOPs per token / (GPUs x peak FLOP/s), with FLOPs per
token from :meth:`lmforge.trainer.model.GPT.flops_per_token` (6N for the matmuls plus the
attention term, forward and backward) and the dense bf16 peak of the card from ``PEAK_FLOPS``:

======================  =================
GPU (name contains)     bf16 dense peak
======================  =================
H200                    989 TFLOP/s
H100                    989 TFLOP/s (SXM)
A100                    312 TFLOP/s
L40S                    362 TFLOP/s
A10                     125 TFLOP/s
======================  =================

An unknown GPU exports no MFU rather than a wrong one.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

log = logging.getLogger(__name__)

PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def peak_flops(device_name: str) -> float | None:
    for key, value in PEAK_FLOPS.items():
        if key in device_name:
            return value
    return None


class TrainerMetrics:
    """Gauges and counters labelled job, namespace, rank; served on port + local rank."""

    def __init__(self, *, job: str, namespace: str, rank: int, local_rank: int, port: int) -> None:
        self.registry = CollectorRegistry()
        self.labels = {"job": job, "namespace": namespace, "rank": str(rank)}
        names = list(self.labels)

        def gauge(name: str, text: str) -> Any:
            return Gauge(name, text, names, registry=self.registry).labels(**self.labels)

        self.train_loss = gauge("lmforge_train_loss", "Training loss (mean over the last log interval).")
        self.eval_loss = gauge("lmforge_eval_loss", "Held-out loss at the last evaluation.")
        self.learning_rate = gauge("lmforge_learning_rate", "Current learning rate.")
        self.train_step = gauge("lmforge_train_step", "Optimizer steps completed.")
        self.total_steps = gauge("lmforge_train_total_steps", "Optimizer steps planned.")
        self.tokens_per_second = gauge("lmforge_tokens_per_second", "Training tokens per second, all ranks.")
        self.grad_norm = gauge("lmforge_grad_norm", "Global gradient norm before clipping.")
        self.data_wait = gauge(
            "lmforge_data_wait_seconds", "Seconds this rank waited for data in the last log interval."
        )
        self.checkpoint_step = gauge("lmforge_checkpoint_last_step", "Step of the newest committed checkpoint.")
        self.checkpoint_time = gauge(
            "lmforge_checkpoint_last_timestamp_seconds", "Unix time of the newest committed checkpoint."
        )
        self.checkpoint_seconds = gauge("lmforge_checkpoint_seconds", "Duration of the last checkpoint save.")
        self.eta_seconds = gauge("lmforge_eta_seconds", "Estimated seconds until training ends.")
        self.mfu = gauge("lmforge_mfu", "Model FLOPs utilisation (GPU only).")
        self.gpu_memory = gauge("lmforge_gpu_memory_bytes", "Peak GPU memory allocated (GPU only).")
        self.tokens = Counter(
            "lmforge_tokens", "Training tokens consumed, all ranks.", names, registry=self.registry
        ).labels(**self.labels)

        # Data streaming (lmforge/data/reader.py counters), updated at each log interval.
        def counter(name: str, text: str) -> Any:
            return Counter(name, text, names, registry=self.registry).labels(**self.labels)

        self.data_samples = counter("lmforge_data_samples_read", "Training samples read by this rank.")
        self.data_bytes = counter(
            "lmforge_data_bytes_read", "Bytes of token data read from storage by this rank (downloaded for s3://)."
        )
        self.data_s3_errors = counter("lmforge_data_s3_errors", "Failed S3 GETs of training data (each attempt).")
        self.data_s3_retries = counter("lmforge_data_s3_retries", "Retried S3 GETs of training data.")
        self.data_prefetch_depth = gauge(
            "lmforge_data_prefetch_queue_depth", "Data blocks fetched or in flight ahead of this rank's reader."
        )
        self._data_seen: dict[str, float] = {}
        self.port = port + local_rank
        address = os.environ.get("LMFORGE_METRICS_ADDR", "127.0.0.1")
        self.server = None
        try:
            self.server, _ = start_http_server(self.port, addr=address, registry=self.registry)
        except OSError as exc:  # a busy port must not kill a training run
            log.warning("metrics endpoint %s:%d not started: %s", address, self.port, exc)

    def observe_data(self, reader: Any) -> dict[str, float]:
        """Export a reader's cumulative counters (:func:`lmforge.data.reader.reader_counters`); returns
        the metrics.jsonl fields for them.

        The reader's counters are cumulative, Prometheus counters only go up: each call adds the
        growth since the previous call.
        """
        from lmforge.data.reader import reader_counters

        counters = reader_counters(reader)
        pairs = {
            "samples_read": self.data_samples,
            "bytes_read": self.data_bytes,
            "s3_errors": self.data_s3_errors,
            "s3_retries": self.data_s3_retries,
        }
        for key, metric in pairs.items():
            value = float(counters.get(key, 0))
            growth = value - self._data_seen.get(key, 0.0)
            if growth > 0:
                metric.inc(growth)
            self._data_seen[key] = value
        self.data_prefetch_depth.set(float(counters.get("prefetch_depth", 0)))
        return {
            "data_samples_read": int(counters.get("samples_read", 0)),
            "data_bytes_read": int(counters.get("bytes_read", 0)),
            "data_s3_errors": int(counters.get("s3_errors", 0)),
            "data_s3_retries": int(counters.get("s3_retries", 0)),
            "data_prefetch_depth": int(counters.get("prefetch_depth", 0)),
        }

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None


class JsonlWriter:
    """Appends one JSON object per line; rank 0 writes the run's metrics.jsonl."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")
