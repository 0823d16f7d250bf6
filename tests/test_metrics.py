"""The trainer's Prometheus endpoint serves the documented series with job/namespace/rank labels."""

from __future__ import annotations

import urllib.request

from lmforge.trainer.metrics import TrainerMetrics, peak_flops
from tests.trainer_helpers import free_port

DOCUMENTED = [
    "lmforge_train_loss",
    "lmforge_eval_loss",
    "lmforge_learning_rate",
    "lmforge_train_step",
    "lmforge_tokens_total",
    "lmforge_tokens_per_second",
    "lmforge_grad_norm",
    "lmforge_data_wait_seconds",
    "lmforge_checkpoint_last_step",
    "lmforge_checkpoint_seconds",
    "lmforge_mfu",
    "lmforge_gpu_memory_bytes",
]


def test_endpoint_serves_every_documented_series() -> None:
    port = free_port()
    metrics = TrainerMetrics(job="j", namespace="ns", rank=3, local_rank=0, port=port)
    try:
        metrics.train_loss.set(2.5)
        metrics.tokens.inc(4096)
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        metrics.close()
    for name in DOCUMENTED:
        assert f'{name}{{job="j",namespace="ns",rank="3"}}' in body, name
    assert 'lmforge_train_loss{job="j",namespace="ns",rank="3"} 2.5' in body
    assert 'lmforge_tokens_total{job="j",namespace="ns",rank="3"} 4096.0' in body


def test_busy_port_does_not_stop_training() -> None:
    port = free_port()
    first = TrainerMetrics(job="j", namespace="ns", rank=0, local_rank=0, port=port)
    try:
        second = TrainerMetrics(job="j", namespace="ns", rank=1, local_rank=0, port=port)
        assert second.server is None
        second.train_loss.set(1.0)
    finally:
        first.close()


def test_peak_table() -> None:
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA A100-SXM4-40GB") == 312e12
    assert peak_flops("Some Future GPU") is None
