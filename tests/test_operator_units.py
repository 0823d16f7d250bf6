"""Pure parts of the operator: exit-code classification, child builders, progress parsing."""

from __future__ import annotations

from typing import Any

import pytest

from lmforge.api.manifest import TrainingJob
from lmforge.operator import children, classify, progress
from lmforge.operator.status import status_patch
from tests.operator_helpers import training_job


@pytest.mark.parametrize(
    "code,reason,retryable",
    [
        (78, "InvalidSpec", False),
        (75, "Retryable", True),
        (143, "Preempted", True),
        (137, "Signal", True),
        (1, "Error", True),
        (0, "Completed", False),
    ],
)
def test_exit_codes(code: int, reason: str, retryable: bool) -> None:
    failure = classify.classify_exit_code(code)
    assert (failure.reason, failure.retryable) == (reason, retryable)


def test_pod_reasons_and_first_failure() -> None:
    evicted = {"metadata": {"name": "a"}, "status": {"phase": "Failed", "reason": "Evicted"}}
    assert classify.classify_pod(evicted).reason == "Evicted"
    oom = {"status": {"containerStatuses": [{"state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}]}}
    assert classify.classify_pod(oom).reason == "OOMKilled"
    running = {"status": {"phase": "Running"}}
    assert classify.classify_pod(running) is None

    def pod(index: int, code: int, at: str) -> dict:
        return {
            "metadata": {"name": f"p{index}", "labels": {children.INDEX_LABEL: str(index)}},
            "status": {"containerStatuses": [{"state": {"terminated": {"exitCode": code, "finishedAt": at}}}]},
        }

    # The earliest failure is the cause; a fatal one wins over retryable ones.
    assert classify.first_failed_pod([pod(0, 1, "T2"), pod(1, 137, "T1")])[0]["metadata"]["name"] == "p1"
    assert classify.first_failed_pod([pod(0, 1, "T1"), pod(1, 78, "T3")])[1].reason == "InvalidSpec"


def test_gpu_job_shape() -> None:
    manifest = TrainingJob.model_validate(
        training_job(
            "gpu",
            resources={
                "nodes": 4,
                "gpusPerNode": 8,
                "cpu": "32",
                "memory": "256Gi",
                "sharedMemory": "64Gi",
                "nodeSelector": {"gpu": "h100"},
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
            },
            training={"maxSteps": 10, "precision": "bf16"},
        )
    )
    job = children.training_job(manifest, 3)
    assert job["metadata"]["name"] == "gpu-a3" and job["spec"]["completions"] == 4
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["NPROC_PER_NODE"] == "8" and "DS_ACCELERATOR" not in env
    assert env["MASTER_ADDR"] == "gpu-a3-0.gpu-nodes.default.svc"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert pod["nodeSelector"] == {"gpu": "h100"} and pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "64Gi"}} in pod["volumes"]
    assert children.pod_group(manifest) is None


def test_progress_parse_keeps_rank_zero() -> None:
    text = (
        'lmforge_train_step{job="j",namespace="n",rank="0"} 5.0\n'
        'lmforge_train_step{job="j",namespace="n",rank="1"} 9.0\n'
        '# TYPE lmforge_tokens counter\nlmforge_tokens_total{job="j",namespace="n",rank="0"} 640.0\n'
    )
    assert progress.parse(text) == {"step": 5.0, "tokens": 640.0}


def test_status_patch_removes_vanished_keys() -> None:
    assert status_patch({"phase": "Running", "message": "x"}, {"phase": "Running"}) == {"message": None}
    assert status_patch({"phase": "Running"}, {"phase": "Running"}) is None


def test_termination_message_is_written_only_in_a_pod(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from lmforge.termination import read_termination_message, write_termination_message

    monkeypatch.delenv("LMFORGE_TERMINATION_LOG", raising=False)
    assert write_termination_message({"results": [{"step": "baseline"}]}) is None  # lmforge compress locally
    target = tmp_path / "termination-log"
    monkeypatch.setenv("LMFORGE_TERMINATION_LOG", str(target))
    assert write_termination_message({"results": [{"step": "baseline", "method": None}], "ratio": 2.0}) == target
    assert read_termination_message(target.read_text()) == {"results": [{"step": "baseline"}], "ratio": 2.0}
    monkeypatch.setenv("LMFORGE_TERMINATION_LOG", str(tmp_path / "missing" / "log"))
    assert write_termination_message({"x": 1}) is None  # not writable: logged, never fatal
    assert read_termination_message("Traceback (most recent call last):") is None


def test_termination_message_fits_4096_bytes_keeping_first_and_last_rows() -> None:
    import json

    from lmforge.termination import fit

    rows = [{"step": f"step-{i}", "method": "structured", "perplexity": 20.0 + i} for i in range(200)]
    text = fit({"results": rows, "compression_ratio": 3.5, "message": "x" * 10_000})
    assert len(text.encode()) <= 4096
    data = json.loads(text)
    kept = [r["step"] for r in data["results"]]
    assert kept[0] == "step-0" and kept[-1] == "step-199" and len(kept) >= 2
    assert data["truncated"]["results"] == 200 - len(kept) and data["truncated"]["text"] is True
    assert data["compression_ratio"] == 3.5 and len(data["message"]) <= 201
    small = fit({"results": rows[:3]})
    assert "truncated" not in json.loads(small)


def test_trainer_defaults_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from lmforge.api.common import DEFAULT_TRAINER_IMAGE
    from lmforge.operator.main import trainer_defaults_from_env

    monkeypatch.delenv("LMFORGE_TRAINER_IMAGE", raising=False)
    monkeypatch.delenv("LMFORGE_TRAINER_IMAGE_PULL_POLICY", raising=False)
    assert trainer_defaults_from_env() == children.TrainerDefaults(DEFAULT_TRAINER_IMAGE, "IfNotPresent")
    job = children.training_job(TrainingJob.model_validate(training_job("bare")), 0)
    assert job["spec"]["template"]["spec"]["containers"][0]["image"] == DEFAULT_TRAINER_IMAGE
    monkeypatch.setenv("LMFORGE_TRAINER_IMAGE_PULL_POLICY", "Sometimes")
    with pytest.raises(SystemExit, match="LMFORGE_TRAINER_IMAGE_PULL_POLICY='Sometimes'.*Always, IfNotPresent, Never"):
        trainer_defaults_from_env()
    manifest = TrainingJob.model_validate(training_job("pinned", resources={"image": "mine:1"}))
    filled = children.with_defaults(manifest, children.TrainerDefaults("site/trainer:2", "Never"))
    assert (filled.spec.resources.image, filled.spec.resources.image_pull_policy) == ("mine:1", "Never")
    assert manifest.spec.resources.image_pull_policy is None, "the validated manifest is not changed"


def test_metrics_ports_per_local_rank() -> None:
    ports = children.metrics_ports(9400, 4)
    assert ports == [
        {"name": "metrics", "containerPort": 9400},
        {"name": "metrics-1", "containerPort": 9401},
        {"name": "metrics-2", "containerPort": 9402},
        {"name": "metrics-3", "containerPort": 9403},
    ]
    assert len(children.metrics_ports(9400, 256)) == children.METRICS_PORTS_MAX
    near = children.metrics_ports(children.MASTER_PORT - 1, 4)  # never a second declaration of a rendezvous port
    assert [p["containerPort"] for p in near] == [children.MASTER_PORT - 1, children.MASTER_PORT + 2]
    assert all(len(p["name"]) <= 15 for p in children.metrics_ports(9400, 256)), "IANA_SVC_NAME limit"


def _pods_of_every_kind() -> dict[str, dict[str, Any]]:
    from lmforge.api.loading import load_one
    from tests.operator_helpers import ROOT

    training = TrainingJob.model_validate(training_job("hard", data={"prepare": {}}))
    compression, problems = load_one(ROOT / "examples" / "compress.yaml", kind="CompressionJob")
    assert not problems
    return {
        "attempt": children.training_job(training, 0)["spec"]["template"]["spec"],
        "prepare": children.prepare_job(training, 0)["spec"]["template"]["spec"],
        "compression": children.compression_job(compression, 0, "s3://m/model")["spec"]["template"]["spec"],
    }


@pytest.mark.parametrize("kind", ["attempt", "prepare", "compression"])
def test_every_pod_runs_without_token_on_a_read_only_root(kind: str) -> None:
    """No service-account token, a high UID, a read-only root filesystem, and every place the
    trainer writes (HOME, TMPDIR, the caches) inside a mounted emptyDir."""
    pod = _pods_of_every_kind()[kind]
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsUser"] == pod["securityContext"]["runAsGroup"] == children.RUN_AS_USER > 10000
    (container,) = pod["containers"]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["runAsNonRoot"] is True
    assert security["runAsUser"] == children.RUN_AS_USER and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]} and security["seccompProfile"] == {"type": "RuntimeDefault"}
    empty_dirs = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
    writable = [m["mountPath"] for m in container["volumeMounts"] if m["name"] in empty_dirs and not m.get("readOnly")]
    env = {e["name"]: e.get("value") for e in container["env"]}
    for name in children.SCRATCH_ENV:
        path = env[name]
        assert any(path == root or path.startswith(root.rstrip("/") + "/") for root in writable), (name, path)
    assert {v["name"]: v["emptyDir"] for v in pod["volumes"] if v["name"] == children.SCRATCH_VOLUME} == {
        children.SCRATCH_VOLUME: {}
    }
    if kind == "compression":  # the results summary: a file the kubelet mounts writable
        assert container["terminationMessagePath"] == env["LMFORGE_TERMINATION_LOG"]


def test_network_policy_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from lmforge.operator.network_policy import NetworkPolicySettings, network_policy_settings_from_env

    for name in ("LMFORGE_NETWORK_POLICY", "LMFORGE_NETWORK_POLICY_METRICS_FROM"):
        monkeypatch.delenv(name, raising=False)
    assert network_policy_settings_from_env() == NetworkPolicySettings(enabled=True, metrics_from=None)
    manifest = TrainingJob.model_validate(training_job("open"))
    (policy,) = [o for o in children.static_children(manifest) if o["kind"] == "NetworkPolicy"]
    own, scrape = policy["spec"]["ingress"]
    assert own == {"from": [{"podSelector": {"matchLabels": children.selector_labels(manifest)}}]}
    assert "from" not in scrape, "outside the chart the operator's address is unknown: metrics stay open"
    assert [p["port"] for p in scrape["ports"]] == [manifest.spec.metrics.port]

    monkeypatch.setenv("LMFORGE_NETWORK_POLICY", "false")
    settings = network_policy_settings_from_env()
    assert [
        o["kind"] for o in children.static_children(manifest, children.TrainerDefaults(network_policy=settings))
    ] == [
        "ConfigMap",
        "Service",
    ]
    monkeypatch.setenv("LMFORGE_NETWORK_POLICY", "maybe")
    with pytest.raises(SystemExit, match="LMFORGE_NETWORK_POLICY='maybe' is neither true nor false.*networkPolicy"):
        network_policy_settings_from_env()
    monkeypatch.setenv("LMFORGE_NETWORK_POLICY", "true")
    monkeypatch.setenv("LMFORGE_NETWORK_POLICY_METRICS_FROM", "[{not json")
    with pytest.raises(SystemExit, match="LMFORGE_NETWORK_POLICY_METRICS_FROM is not JSON.*metricsScrapers"):
        network_policy_settings_from_env()
    monkeypatch.setenv("LMFORGE_NETWORK_POLICY_METRICS_FROM", '{"podSelector": {}}')
    with pytest.raises(SystemExit, match="must be a JSON list of NetworkPolicyPeer objects"):
        network_policy_settings_from_env()
