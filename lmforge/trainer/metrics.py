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

from lmforge import contract
from lmforge.data.reader_protocol import Reader

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
        self.labels = dict(zip(contract.TRAINER_LABELS, (job, namespace, str(rank)), strict=True))
        names = list(self.labels)

        def family(metric: contract.Metric) -> Any:
            kind = Gauge if metric.kind == "gauge" else Counter
            return kind(metric.name, metric.help, names, registry=self.registry).labels(**self.labels)

        self.train_loss = family(contract.TRAIN_LOSS)
        self.eval_loss = family(contract.EVAL_LOSS)
        self.learning_rate = family(contract.LEARNING_RATE)
        self.train_step = family(contract.TRAIN_STEP)
        self.total_steps = family(contract.TRAIN_TOTAL_STEPS)
        self.tokens_per_second = family(contract.TOKENS_PER_SECOND)
        self.grad_norm = family(contract.GRAD_NORM)
        self.data_wait = family(contract.DATA_WAIT)
        self.checkpoint_step = family(contract.CHECKPOINT_LAST_STEP)
        self.checkpoint_time = family(contract.CHECKPOINT_LAST_TIME)
        self.checkpoint_seconds = family(contract.CHECKPOINT_SECONDS)
        self.eta_seconds = family(contract.ETA_SECONDS)
        self.mfu = family(contract.MFU)
        self.gpu_memory = family(contract.GPU_MEMORY)
        self.tokens = family(contract.TOKENS)
        # Data streaming (the readers' counters), updated at each log interval.
        self.data_samples = family(contract.DATA_SAMPLES_READ)
        self.data_bytes = family(contract.DATA_BYTES_READ)
        self.data_s3_errors = family(contract.DATA_S3_ERRORS)
        self.data_s3_retries = family(contract.DATA_S3_RETRIES)
        self.data_prefetch_depth = family(contract.DATA_PREFETCH_DEPTH)
        self._data_seen: dict[str, float] = {}
        self.port = port + local_rank
        address = os.environ.get("LMFORGE_METRICS_ADDR", "127.0.0.1")
        self.server = None
        try:
            self.server, _ = start_http_server(self.port, addr=address, registry=self.registry)
        except OSError as exc:  # a busy port must not kill a training run
            log.warning("metrics endpoint %s:%d not started: %s", address, self.port, exc)

    def observe_data(self, reader: Reader) -> dict[str, float]:
        """Export a reader's cumulative counters (:meth:`~lmforge.data.reader_protocol.Reader.counters`); returns
        the metrics.jsonl fields for them.

        The reader's counters are cumulative, Prometheus counters only go up: each call adds the
        growth since the previous call.
        """
        counters = reader.counters()
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
