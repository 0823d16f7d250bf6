"""The run contract (lmforge/contract.py) is what the chart's alerts, the dashboard, the operator and
the trainer agree on: a metric named anywhere must be one the processes export."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from lmforge import contract
from tests.monitoring_helpers import alert_expressions, dashboard_queries, dashboard_variable_selectors, metric_names


def test_dashboard_and_alerts_name_only_exported_metrics() -> None:
    exported = contract.exported_series()
    named = {
        name
        for expr in [
            *dashboard_queries().values(),
            *alert_expressions().values(),
            *(selector for _, selector in dashboard_variable_selectors().values()),
        ]
        for name in metric_names(expr)
    }
    assert named, "the dashboard and alerts name metrics"
    assert named <= exported, f"named but not exported by lmforge: {sorted(named - exported)}"
    assert metric_names("rate(lmforge_not_a_metric_total[5m])") - exported, "the check above can fail"


def test_trainer_serves_every_trainer_metric_of_the_contract() -> None:
    from prometheus_client import generate_latest

    from lmforge.trainer.metrics import TrainerMetrics
    from tests.monitoring_helpers import free_port

    metrics = TrainerMetrics(job="j", namespace="n", rank=0, local_rank=0, port=free_port())
    try:
        families = {
            family.name: family.type
            for family in text_string_to_metric_families(generate_latest(metrics.registry).decode())
            if not family.name.endswith("_created")
        }  # prometheus-client's own timestamp of each counter
    finally:
        metrics.close()
    # prometheus-client names a counter family without its _total suffix
    wanted = {metric.name.removesuffix("_total"): metric.kind for metric in contract.TRAINER_METRICS}
    assert families == wanted


def test_operator_serves_every_operator_metric_of_the_contract() -> None:
    from lmforge.operator.metrics import REGISTRY

    families = {family.name: family.type for family in REGISTRY.collect()}
    wanted = {metric.name.removesuffix("_total"): metric.kind for metric in contract.OPERATOR_METRICS}
    assert families == wanted


def test_layout_defaults_and_overrides() -> None:
    layout = contract.RunLayout("s3://bucket/runs/a/")
    assert layout.model == "s3://bucket/runs/a/model"
    assert layout.checkpoints == "s3://bucket/runs/a/checkpoints"
    assert layout.checkpoint(200) == "s3://bucket/runs/a/checkpoints/step-00000200"
    assert layout.data == "s3://bucket/runs/a/data"
    moved = contract.RunLayout("file:///out", checkpoint_uri="s3://ck/x", prepared_uri="s3://d/y")
    assert (moved.checkpoints, moved.data, moved.metrics) == ("s3://ck/x", "s3://d/y", "file:///out/metrics.jsonl")
