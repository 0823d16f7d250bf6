"""The chart's alerts and dashboard against promtool and a real Prometheus.

End to end: a real Prometheus (loopback only) scrapes a short real `lmforge run` and the real
operator's metrics endpoint (the operator runs against the Kubernetes emulator through a job that
restarts once and succeeds, and one that fails). Every dashboard query must return data, every
alert expression must evaluate, and every metric any of them names must be exported by someone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.monitoring_helpers import (
    ALERTS,
    MISSING,
    PROMETHEUS,
    PROMTOOL,
    REPO,
    Prometheus,
    alert_expressions,
    dashboard_queries,
    dashboard_variable_selectors,
    free_port,
    metric_names,
    rule_groups,
)


def test_metric_name_extraction() -> None:
    assert metric_names(
        'time() - max by (namespace, job) (lmforge_checkpoint_last_timestamp_seconds{job=~"$job"} > 0) > 7200'
    ) == {"lmforge_checkpoint_last_timestamp_seconds"}
    assert metric_names("histogram_quantile(0.99, sum by (le) (rate(x_bucket[5m])))") == {"x_bucket"}
    assert metric_names("a and on (namespace, job) count by (namespace, job) (b offset 30m) < 0.5 * c") == {
        "a",
        "b",
        "c",
    }
    assert metric_names("sum(increase(lmforge_operator_restarts_total[1h])) > 3") == {"lmforge_operator_restarts_total"}


@pytest.mark.skipif(PROMTOOL is None, reason=MISSING)
def test_promtool_check_rules(tmp_path: Path) -> None:
    groups = rule_groups(
        {
            "prometheusRule": {
                "enabled": True,
                "additionalRules": [
                    {
                        "record": "lmforge:tokens_per_second:max",
                        "expr": "max by (namespace, job) (lmforge_tokens_per_second)",
                    }
                ],
            }
        }
    )
    assert {r.get("alert") for g in groups for r in g["rules"]} >= ALERTS
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    result = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(ALERTS) + 1} rules found" in result.stdout


def _series(name: str, values: str, **labels: str) -> dict[str, str]:
    selector = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return {"series": f"{name}{{{selector}}}", "values": values}


def _alert(at: str, name: str, *firing: dict[str, str]) -> dict[str, Any]:
    """At ``at``, exactly the ``firing`` label sets of alert ``name`` (none: it must stay quiet)."""
    return {
        "eval_time": at,
        "alertname": name,
        "exp_alerts": [{"exp_labels": {"severity": "warning", **labels}} for labels in firing],
    }


STEP, TOTAL = "lmforge_train_step", "lmforge_train_total_steps"
FAILED, RESTARTS = "lmforge_operator_jobs_failed_total", "lmforge_operator_restarts_total"
TPS, CKPT = "lmforge_tokens_per_second", "lmforge_checkpoint_last_timestamp_seconds"
# promtool unit tests for the five alerts at the chart's default thresholds (jobStalled 30m,
# restarts > 3 in 1h, tokens/s < 0.5 x the 1h average for 10m, checkpoint older than 7200 s);
# series at 1-minute resolution, promtool's clock starts at 0 (so time() is the eval time).
ALERT_TESTS: list[dict[str, Any]] = [
    {  # A failure counter that grows fires; so does one that just appeared; a flat one does not.
        "input_series": [
            _series(FAILED, "0x10 1x30", reason="BackoffLimitExceeded"),  # 0 -> 1 at minute 11
            _series(FAILED, "_x9 1x30", reason="InvalidSpec"),  # first seen at minute 10
            _series(FAILED, "2x60", reason="Stalled"),  # failed long ago, nothing new
        ],
        "alert_rule_test": [
            _alert("20m", "LmforgeJobFailed", {"reason": "BackoffLimitExceeded"}, {"reason": "InvalidSpec"}),
            _alert("40m", "LmforgeJobFailed"),
        ],
    },
    {  # The step stops at minute 40 of 1000: stalled after the 30m window plus `for: 5m`.
        "input_series": [
            _series(STEP, "0+1x40 40x60", namespace="ml", job="stuck", rank="0"),
            _series(TOTAL, "1000x100", namespace="ml", job="stuck", rank="0"),
            _series(STEP, "0+1x100", namespace="ml", job="moving", rank="0"),
            _series(TOTAL, "1000x100", namespace="ml", job="moving", rank="0"),
            _series(STEP, "0+1x40 40x60", namespace="ml", job="done", rank="0"),  # finished: step == total
            _series(TOTAL, "40x100", namespace="ml", job="done", rank="0"),
        ],
        "alert_rule_test": [
            _alert("60m", "LmforgeJobStalled"),
            _alert("72m", "LmforgeJobStalled"),  # stalled 32m, but not yet for 5m
            _alert("80m", "LmforgeJobStalled", {"namespace": "ml", "job": "stuck"}),
        ],
    },
    {  # Five restarts within the hour fire; two do not; the five are forgotten an hour later.
        "input_series": [_series(RESTARTS, "0 1 2 3 4 5x80")],
        "alert_rule_test": [_alert("10m", "LmforgeRestartsClimbing", {}), _alert("80m", "LmforgeRestartsClimbing")],
    },
    {
        "input_series": [_series(RESTARTS, "0 1 2x60")],
        "alert_rule_test": [_alert("10m", "LmforgeRestartsClimbing")],
    },
    {  # 1000 tokens/s for an hour, then 100 (slow) or a 5-minute dip (dip) or steady (steady).
        "input_series": [
            _series(TPS, "1000x60 100x60", namespace="ml", job="slow", rank="0"),
            _series(TPS, "1000x60 100x5 1000x60", namespace="ml", job="dip", rank="0"),
            _series(TPS, "1000x120", namespace="ml", job="steady", rank="0"),
        ],
        "alert_rule_test": [
            _alert("60m", "LmforgeTokensPerSecondCollapsed"),
            _alert("66m", "LmforgeTokensPerSecondCollapsed"),  # collapsed, not yet for 10m
            _alert("75m", "LmforgeTokensPerSecondCollapsed", {"namespace": "ml", "job": "slow"}),
        ],
    },
    {  # Last checkpoint at t=60s (old by minute 127), one every minute (fresh), none yet (0).
        "input_series": [
            _series(CKPT, "60x200", namespace="ml", job="old", rank="0"),
            _series(CKPT, "60+60x200", namespace="ml", job="fresh", rank="0"),
            _series(CKPT, "0x200", namespace="ml", job="none-yet", rank="0"),
        ],
        "alert_rule_test": [
            _alert("121m", "LmforgeCheckpointTooOld"),  # 7200 s just passed, not yet for 5m
            _alert("130m", "LmforgeCheckpointTooOld", {"namespace": "ml", "job": "old"}),
        ],
    },
]


@pytest.mark.skipif(PROMTOOL is None, reason=MISSING)
def test_promtool_unit_tests_fire_each_alert_only_when_it_should(tmp_path: Path) -> None:
    """`promtool test rules` on the chart's rendered alerts (annotations left out: promtool compares
    them verbatim, and `promtool check rules` above already checks their templates)."""
    groups = rule_groups()
    for group in groups:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    tested = {t["alertname"] for case in ALERT_TESTS for t in case["alert_rule_test"]}
    assert tested == ALERTS, "every alert has a unit test"
    for case in ALERT_TESTS:  # each alert is seen firing and seen quiet
        case.setdefault("interval", "1m")
    fires = {t["alertname"] for c in ALERT_TESTS for t in c["alert_rule_test"] if t["exp_alerts"]}
    quiet = {t["alertname"] for c in ALERT_TESTS for t in c["alert_rule_test"] if not t["exp_alerts"]}
    assert fires == quiet == ALERTS
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    tests = {"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": ALERT_TESTS}
    (tmp_path / "alerts_test.yaml").write_text(yaml.safe_dump(tests, sort_keys=False))
    result = subprocess.run(
        [PROMTOOL, "test", "rules", "alerts_test.yaml"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


TINY = {
    "apiVersion": "lmforge.dev/v1alpha1",
    "kind": "TrainingJob",
    "metadata": {"name": "tiny", "namespace": "ml"},
    "spec": {
        "model": {"layers": 1, "width": 32, "heads": 2, "kvHeads": 1, "contextLength": 32},
        "tokenizer": {"vocabSize": 300},
        "data": {
            "sources": [f"file://{REPO}/examples/data/python-docs.txt"],
            "format": "text",
            "validationFraction": 0.05,
        },
        "training": {
            "maxSteps": 2000,
            "microBatchSize": 4,
            "precision": "fp32",
            "evalInterval": 4,
            "evalBatches": 1,
            "logInterval": 2,
            "optimizer": {"lr": 1.0e-3},
        },
        "checkpoint": {"interval": 4, "keep": 1},
        "resources": {"nodes": 1, "gpusPerNode": 0, "processesPerNode": 1},
    },
}


def _drive_operator(api: Any, kubelet: Any, wait_for: Any, training_job: Any) -> None:
    """One job restarts once and succeeds; another fails at once (exit 78, invalid spec)."""
    ns = "default"
    api.create_tj(training_job("restarts", ns, runPolicy={"backoffLimit": 2}))
    job = wait_for(lambda: api.job(ns, "restarts-a0"), what="restarts-a0")
    kubelet.start(job)
    kubelet.terminate(api.job(ns, "restarts-a0"), 0, 1)
    job = wait_for(lambda: api.job(ns, "restarts-a1"), what="restarts-a1")
    kubelet.start(job)
    kubelet.succeed(api.job(ns, "restarts-a1"))
    api.create_tj(training_job("fatal", ns))
    job = wait_for(lambda: api.job(ns, "fatal-a0"), what="fatal-a0")
    kubelet.start(job)
    kubelet.terminate(api.job(ns, "fatal-a0"), 0, 78)
    for name, phase in (("restarts", "Succeeded"), ("fatal", "Failed")):
        wait_for(
            lambda n=name, p=phase: ((api.tj(ns, n) or {}).get("status") or {}).get("phase") == p,
            what=f"{name} {phase}",
        )


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.skipif(PROMETHEUS is None, reason=MISSING)
def test_dashboard_and_alerts_against_a_real_prometheus(tmp_path: Path) -> None:
    from tests.operator_helpers import Api, ClusterThread, Kubelet, OperatorThread, training_job, wait_for

    operator_port, trainer_port = free_port(), free_port()
    manifest = tmp_path / "tiny.yaml"
    TINY["spec"]["output"] = {"uri": f"file://{tmp_path}/out"}
    manifest.write_text(yaml.safe_dump(TINY))
    env = {**os.environ, "LMFORGE_METRICS_PORT": str(trainer_port), "LMFORGE_METRICS_ADDR": "127.0.0.1"}
    # The real trainer, in the background: about 10 s to its first evaluation and checkpoint.
    trainer = subprocess.Popen(
        [sys.executable, "-m", "lmforge.cli", "run", str(manifest), "--processes", "1"],
        cwd=tmp_path,
        env=env,
        stdout=(tmp_path / "run.log").open("w"),
        stderr=subprocess.STDOUT,
    )
    # Scrape as the chart's PodMonitor does: honour the trainer's job/namespace labels and carry
    # the pod's attempt label; the operator as its ServiceMonitor does.
    jobs = [
        {"job_name": "lmforge-operator", "static_configs": [{"targets": [f"127.0.0.1:{operator_port}"]}]},
        {
            "job_name": "lmforge-trainer",
            "honor_labels": True,
            "static_configs": [{"targets": [f"127.0.0.1:{trainer_port}"], "labels": {"attempt": "0"}}],
        },
    ]
    try:
        with ClusterThread() as cluster, Prometheus(tmp_path, jobs) as prometheus:
            api = Api(cluster.configuration())
            with OperatorThread(
                cluster.configuration(),
                namespaces=["default"],
                poll_interval=0.05,
                progress_interval=0.05,
                metrics_port=operator_port,
                metrics_addr="127.0.0.1",
            ):
                _drive_operator(api, Kubelet(api), wait_for, training_job)

                def ready() -> bool:
                    assert trainer.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
                    return all(
                        prometheus.query(q)
                        for q in (
                            "lmforge_eval_loss > 0",
                            "lmforge_checkpoint_seconds > 0",
                            "lmforge_operator_jobs_failed_total",
                            "lmforge_operator_restarts_total > 0",
                            "count_over_time(lmforge_tokens_total[30s]) > 3",
                            "count_over_time(lmforge_operator_reconcile_duration_seconds_count[30s]) > 3",
                        )
                    )

                wait_for(ready, timeout=150, what="trainer and operator series in Prometheus")
                at = time.time()
                exported = prometheus.metric_names()

                # Every dashboard query returns data; every alert expression evaluates.
                empty = [name for name, expr in dashboard_queries().items() if not prometheus.query(expr, at)]
                assert not empty, f"dashboard queries without data: {empty}"
                for expr in alert_expressions().values():
                    prometheus.query(expr, at)  # raises with Prometheus' error on a bad expression
                # The dashboard's variables find the job and its namespace.
                for variable, (label, selector) in dashboard_variable_selectors().items():
                    values = prometheus.api(f"label/{label}/values", **{"match[]": selector})["data"]
                    assert {"namespace": "ml", "job": "tiny"}[variable] in values, (variable, values)

                # No expression names a metric nobody exports.
                named = {
                    n for e in [*dashboard_queries().values(), *alert_expressions().values()] for n in metric_names(e)
                }
                unknown = named - exported
                assert not unknown, f"metrics no one exports: {sorted(unknown)}"
                assert metric_names("rate(lmforge_not_a_metric_total[5m])") - exported, "the check above can fail"
                # Trainer series keep the trainer's labels (honor_labels), as on a cluster.
                (sample,) = prometheus.query('lmforge_train_step{rank="0"}', at)
                assert sample["metric"]["job"] == "tiny" and sample["metric"]["namespace"] == "ml"
                assert sample["metric"]["attempt"] == "0"
    finally:
        if trainer.poll() is None:
            trainer.send_signal(signal.SIGTERM)  # checkpoints and exits 143
            try:
                trainer.wait(60)
            except subprocess.TimeoutExpired:
                trainer.kill()
                trainer.wait(10)
