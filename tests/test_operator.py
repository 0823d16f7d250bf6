"""The operator end to end at the API level: real Kopf against kmock's Kubernetes emulator over HTTP.

The test plays the Job controller and kubelet (creating pods, writing Job and pod status); the
operator sees only the API, as in a cluster.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Gauge, start_http_server

from tests.operator_helpers import (
    Api,
    ClusterThread,
    Kubelet,
    OperatorThread,
    kubectl,
    kubectl_env,
    training_job,
    wait_for,
)

NS = "default"
FAST = {"poll_interval": 0.05, "progress_interval": 0.05}


@pytest.fixture
def cluster() -> Iterator[ClusterThread]:
    with ClusterThread() as running:
        yield running


@pytest.fixture
def api(cluster: ClusterThread) -> Api:
    return Api(cluster.configuration())


@pytest.fixture
def kubelet(api: Api) -> Kubelet:
    return Kubelet(api)


@pytest.fixture
def operator(cluster: ClusterThread) -> Iterator[OperatorThread]:
    with OperatorThread(cluster.configuration(), namespaces=[NS], **FAST) as running:
        yield running


def phase_of(api: Api, name: str, kind: str = "trainingjobs") -> str | None:
    obj = api.tj(NS, name, kind)
    return ((obj or {}).get("status") or {}).get("phase")


def wait_phase(api: Api, name: str, phase: str, timeout: float = 20, kind: str = "trainingjobs") -> dict[str, Any]:
    wait_for(
        lambda: phase_of(api, name, kind) == phase, timeout, f"{name} phase {phase} (now {phase_of(api, name, kind)})"
    )
    return api.tj(NS, name, kind)


def wait_job(api: Api, name: str) -> dict[str, Any]:
    return wait_for(lambda: api.job(NS, name), 20, f"Job {name}")


def test_happy_path_creates_children_and_succeeds(api: Api, kubelet: Kubelet, operator: OperatorThread) -> None:
    api.create_tj(training_job("happy"))
    job = wait_job(api, "happy-a0")
    tj = wait_phase(api, "happy", "Pending")

    # Children: ConfigMap with the validated manifest, headless Service, the attempt Job; all owned.
    cm = wait_for(lambda: api.get(f"/api/v1/namespaces/{NS}/configmaps/happy-config"), what="ConfigMap")
    svc = wait_for(lambda: api.get(f"/api/v1/namespaces/{NS}/services/happy-nodes"), what="Service")
    uid = tj["metadata"]["uid"]
    for child in (cm, svc, job):
        assert child["metadata"]["ownerReferences"][0]["uid"] == uid
        assert child["metadata"]["ownerReferences"][0]["controller"] is True
    assert "name: happy" in cm["data"]["job.yaml"] and "maxSteps: 100" in cm["data"]["job.yaml"]
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True

    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == 2
    assert spec["backoffLimit"] == 0
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == "happy-nodes"
    container = pod["containers"][0]
    assert container["command"] == ["lmforge", "run", "/etc/lmforge/job.yaml"]
    env = {e["name"]: e for e in container["env"]}
    assert env["MASTER_ADDR"]["value"] == "happy-a0-0.happy-nodes.default.svc"
    assert env["MASTER_PORT"]["value"] == "29500"
    assert env["NNODES"]["value"] == "2" and env["NPROC_PER_NODE"]["value"] == "1"
    assert "job-completion-index" in env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert env["DS_ACCELERATOR"]["value"] == "cpu"
    assert env["LMFORGE_METRICS_ADDR"]["value"] == "0.0.0.0"
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {"name": "s3-creds", "key": "AWS_ACCESS_KEY_ID"}
    assert container["resources"]["limits"] == {"cpu": "2", "memory": "4Gi"}
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["terminationGracePeriodSeconds"] >= 600
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}} in pod["volumes"]
    assert pod["automountServiceAccountToken"] is False
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    policy = wait_for(
        lambda: api.get(f"/apis/networking.k8s.io/v1/namespaces/{NS}/networkpolicies/happy-ingress"),
        what="NetworkPolicy",
    )
    assert policy["metadata"]["ownerReferences"][0]["uid"] == uid
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()

    kubelet.start(job)
    wait_phase(api, "happy", "Running")
    kubelet.succeed(api.job(NS, "happy-a0"))
    tj = wait_phase(api, "happy", "Succeeded")
    status = tj["status"]
    assert status["restarts"] == 0
    assert status["attempts"][0]["reason"] == "Completed" and status["attempts"][0]["endTime"]
    assert status["completionTime"]
    assert {c["type"]: c["status"] for c in status["conditions"]}["Succeeded"] == "True"
    assert len(api.jobs(NS)) == 1


def conditions(tj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in tj["status"].get("conditions", [])}


def test_invalid_spec_fails_with_field_errors_and_creates_nothing(
    cluster: ClusterThread, api: Api, operator: OperatorThread
) -> None:
    bad = training_job("bad", model={"layers": 2, "width": 64, "heads": 5}, training={"maxSteps": 0})
    api.create_tj(bad)
    tj = wait_phase(api, "bad", "Failed")
    cond = conditions(tj)["InvalidSpec"]
    assert cond["status"] == "True" and cond["reason"] == "InvalidSpec"
    assert "spec.model.heads" in cond["message"] and "spec.training.maxSteps" in cond["message"]
    events = wait_for(lambda: api.items(f"/api/v1/namespaces/{NS}/events"), what="an event")
    assert any(e["type"] == "Warning" and e["reason"] == "InvalidSpec" for e in events)
    time.sleep(0.3)  # several supervision steps
    assert api.jobs(NS) == [] and api.items(f"/api/v1/namespaces/{NS}/configmaps") == []

    # Fixing the spec runs it.
    api.patch_tj(NS, "bad", {"spec": {"model": {"heads": 4}, "training": {"maxSteps": 10}}})
    wait_job(api, "bad-a0")
    tj = wait_phase(api, "bad", "Pending")
    assert conditions(tj)["InvalidSpec"]["status"] == "False"


@pytest.mark.parametrize("exit_code,reason", [(1, "Error"), (137, "OOMKilled"), (75, "Error")])
def test_failed_rank_restarts_the_gang_and_records_the_attempt(
    cluster: ClusterThread, api: Api, kubelet: Kubelet, operator: OperatorThread, exit_code: int, reason: str
) -> None:
    api.create_tj(training_job("flaky"))
    job = wait_job(api, "flaky-a0")
    kubelet.start(job, node="node-7")
    wait_phase(api, "flaky", "Running")
    cluster.set_log(NS, "flaky-a0-1-x1", "step 40 loss 3.1\nRuntimeError: NCCL timeout\n")
    kubelet.terminate(job, 1, exit_code, reason=reason)

    job1 = wait_job(api, "flaky-a1")
    tj = wait_phase(api, "flaky", "Restarting")
    assert wait_for(lambda: api.job(NS, "flaky-a0") is None, what="old gang removed")
    env = {e["name"]: e.get("value") for e in job1["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["MASTER_ADDR"] == "flaky-a1-0.flaky-nodes.default.svc"
    kubelet.start(job1)
    wait_phase(api, "flaky", "Running")
    kubelet.succeed(api.job(NS, "flaky-a1"))
    tj = wait_phase(api, "flaky", "Succeeded")
    status = tj["status"]
    assert status["restarts"] == 1
    first, second = status["attempts"]
    assert first["exitCode"] == exit_code and first["failedRank"] == 1 and first["retryable"] is True
    assert first["failedPod"] == "flaky-a0-1-x1" and first["node"] == "node-7"
    expected = {1: "Error", 137: "OOMKilled", 75: "Retryable"}[exit_code]
    assert first["reason"] == expected
    assert "NCCL timeout" in first["logTail"]
    assert second["reason"] == "Completed" and second["index"] == 1


def test_backoff_limit_exhausted_fails(api: Api, kubelet: Kubelet, operator: OperatorThread) -> None:
    api.create_tj(training_job("doomed", runPolicy={"backoffLimit": 1}))
    for attempt in (0, 1):
        job = wait_job(api, f"doomed-a{attempt}")
        kubelet.start(job)
        wait_for(lambda: phase_of(api, "doomed") == "Running", what="running")
        kubelet.terminate(job, 0, 143, reason="Error")
    tj = wait_phase(api, "doomed", "Failed")
    assert conditions(tj)["Failed"]["reason"] == "BackoffLimitExceeded"
    assert tj["status"]["restarts"] == 1 and len(tj["status"]["attempts"]) == 2
    time.sleep(0.3)
    assert api.job(NS, "doomed-a2") is None


def test_fatal_exit_code_fails_at_once(api: Api, kubelet: Kubelet, operator: OperatorThread) -> None:
    api.create_tj(training_job("fatal"))
    job = wait_job(api, "fatal-a0")
    kubelet.start(job)
    wait_phase(api, "fatal", "Running")
    kubelet.terminate(job, 0, 78)
    tj = wait_phase(api, "fatal", "Failed")
    assert conditions(tj)["Failed"]["reason"] == "InvalidSpec"
    assert tj["status"]["restarts"] == 0 and tj["status"]["attempts"][0]["retryable"] is False
    time.sleep(0.3)
    assert api.job(NS, "fatal-a1") is None


def test_prepare_job_runs_before_attempt_0(api: Api, kubelet: Kubelet, operator: OperatorThread) -> None:
    api.create_tj(training_job("prep", data={"prepare": {}}))
    prep = wait_job(api, "prep-prepare")
    tj = wait_phase(api, "prep", "Preparing")
    assert conditions(tj)["DataPrepared"]["status"] == "Unknown"
    assert conditions(tj)["Ready"]["status"] == "False"

    # One CPU pod running `lmforge prepare` on the same config and credentials, owned by the job.
    assert prep["metadata"]["ownerReferences"][0]["uid"] == tj["metadata"]["uid"]
    spec = prep["spec"]
    assert spec["completions"] == spec["parallelism"] == 1 and spec["backoffLimit"] == 0
    pod = spec["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"] == ["lmforge", "prepare", "/etc/lmforge/job.yaml"]
    assert container["resources"]["limits"] == {"cpu": "2", "memory": "4Gi"}
    assert "nvidia.com/gpu" not in container["resources"]["requests"]
    env = {e["name"]: e for e in container["env"]}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "s3-creds",
        "key": "AWS_SECRET_ACCESS_KEY",
    }
    assert "MASTER_ADDR" not in env and "NODE_RANK" not in env
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["volumes"] == [
        {"name": "config", "configMap": {"name": "prep-config"}},
        {"name": "scratch", "emptyDir": {}},  # /tmp on the read-only root: no /dev/shm volume
    ]
    time.sleep(0.3)  # several supervision steps: no gang while the data is being prepared
    assert api.job(NS, "prep-a0") is None

    kubelet.start(prep)
    kubelet.succeed(api.job(NS, "prep-prepare"))
    job = wait_job(api, "prep-a0")
    tj = wait_phase(api, "prep", "Pending")
    assert conditions(tj)["DataPrepared"]["status"] == "True"
    trainer = job["spec"]["template"]["spec"]["containers"][0]
    assert trainer["command"][:2] == ["lmforge", "run"] and trainer["image"] == container["image"]
    kubelet.start(job)
    wait_phase(api, "prep", "Running")
    kubelet.succeed(api.job(NS, "prep-a0"))
    tj = wait_phase(api, "prep", "Succeeded")
    assert tj["status"]["restarts"] == 0 and len(tj["status"]["attempts"]) == 1
    assert sorted(j["metadata"]["name"] for j in api.jobs(NS)) == ["prep-a0", "prep-prepare"]


def test_prepare_invalid_data_fails_without_an_attempt(
    cluster: ClusterThread, api: Api, kubelet: Kubelet, operator: OperatorThread
) -> None:
    api.create_tj(training_job("baddata", data={"prepare": {}}))
    prep = wait_job(api, "baddata-prepare")
    kubelet.start(prep)
    cluster.set_log(NS, "baddata-prepare-0-x0", "error: no documents left after filtering\n")
    kubelet.terminate(prep, 0, 78)
    tj = wait_phase(api, "baddata", "Failed")
    assert conditions(tj)["Failed"]["reason"] == "InvalidData"
    cond = conditions(tj)["DataPrepared"]
    assert cond["status"] == "False" and cond["reason"] == "InvalidData"
    assert "no documents left" in cond["message"]
    assert tj["status"]["restarts"] == 0 and tj["status"].get("attempts", []) == []
    time.sleep(0.3)
    assert [j["metadata"]["name"] for j in api.jobs(NS)] == ["baddata-prepare"]


def test_prepare_retries_then_runs(api: Api, kubelet: Kubelet, operator: OperatorThread) -> None:
    api.create_tj(training_job("storm", data={"prepare": {}}))
    prep = wait_job(api, "storm-prepare")
    kubelet.start(prep)
    kubelet.terminate(prep, 0, 75)
    retry = wait_job(api, "storm-prepare-r1")
    tj = wait_phase(api, "storm", "Preparing")
    assert tj["status"]["restarts"] == 1
    kubelet.start(retry)
    kubelet.succeed(api.job(NS, "storm-prepare-r1"))
    wait_job(api, "storm-a0")
    tj = wait_phase(api, "storm", "Pending")
    assert conditions(tj)["DataPrepared"]["status"] == "True"


def test_prepare_backoff_limit_exhausted_fails(api: Api, kubelet: Kubelet, operator: OperatorThread) -> None:
    api.create_tj(training_job("outage", data={"prepare": {}}, runPolicy={"backoffLimit": 1}))
    for name in ("outage-prepare", "outage-prepare-r1"):
        prep = wait_job(api, name)
        kubelet.start(prep)
        kubelet.terminate(prep, 0, 75)
    tj = wait_phase(api, "outage", "Failed")
    assert conditions(tj)["Failed"]["reason"] == "PrepareFailed"
    assert tj["status"]["restarts"] == 1
    time.sleep(0.3)
    assert sorted(j["metadata"]["name"] for j in api.jobs(NS)) == ["outage-prepare", "outage-prepare-r1"]


def test_operator_restart_while_preparing_creates_no_duplicates(
    cluster: ClusterThread, api: Api, kubelet: Kubelet
) -> None:
    config = cluster.configuration()
    with OperatorThread(config, namespaces=[NS], **FAST):
        api.create_tj(training_job("patient", data={"prepare": {}}))
        prep = wait_job(api, "patient-prepare")
        kubelet.start(prep)
        wait_phase(api, "patient", "Preparing")
    with OperatorThread(config, namespaces=[NS], **FAST):
        time.sleep(0.5)
        assert [j["metadata"]["name"] for j in api.jobs(NS)] == ["patient-prepare"]
        assert phase_of(api, "patient") == "Preparing"
        kubelet.succeed(api.job(NS, "patient-prepare"))
        wait_job(api, "patient-a0")
        wait_phase(api, "patient", "Pending")
        time.sleep(0.3)
        assert sorted(j["metadata"]["name"] for j in api.jobs(NS)) == ["patient-a0", "patient-prepare"]


def test_operator_restart_mid_job_creates_no_duplicates(cluster: ClusterThread, api: Api, kubelet: Kubelet) -> None:
    config = cluster.configuration()
    with OperatorThread(config, namespaces=[NS], **FAST):
        api.create_tj(training_job("steady"))
        job = wait_job(api, "steady-a0")
        kubelet.start(job)
        wait_phase(api, "steady", "Running")
    posts_before = cluster.call(lambda c: sum(1 for r in c.served if r[0] == "method.POST"))
    with OperatorThread(config, namespaces=[NS], **FAST):
        time.sleep(0.5)
        assert [j["metadata"]["name"] for j in api.jobs(NS)] == ["steady-a0"]
        assert len(api.items(f"/api/v1/namespaces/{NS}/configmaps")) == 1
        assert len(api.items(f"/api/v1/namespaces/{NS}/services")) == 1
        assert len(api.items(f"/apis/networking.k8s.io/v1/namespaces/{NS}/networkpolicies")) == 1
        assert phase_of(api, "steady") == "Running"
        kubelet.succeed(api.job(NS, "steady-a0"))
        tj = wait_phase(api, "steady", "Succeeded")
    assert len(tj["status"]["attempts"]) == 1
    new_jobs = cluster.call(lambda c: [r for r in c.served if r[0] == "method.POST" and r[1].endswith("/jobs")])
    assert len(new_jobs) == 1, "the restarted operator created no Job"
    assert posts_before > 0


def test_suspend_and_resume(api: Api, kubelet: Kubelet, operator: OperatorThread) -> None:
    api.create_tj(training_job("pausable"))
    job = wait_job(api, "pausable-a0")
    kubelet.start(job)
    wait_phase(api, "pausable", "Running")
    api.patch_tj(NS, "pausable", {"spec": {"runPolicy": {"suspend": True}}})
    tj = wait_phase(api, "pausable", "Suspended")
    assert wait_for(lambda: api.job(NS, "pausable-a0") is None, what="pods removed")
    assert tj["status"]["attempts"][0]["reason"] == "Suspended"
    time.sleep(0.3)
    assert api.jobs(NS) == []

    api.patch_tj(NS, "pausable", {"spec": {"runPolicy": {"suspend": False}}})
    job1 = wait_job(api, "pausable-a1")
    tj = wait_phase(api, "pausable", "Restarting")
    assert conditions(tj)["Ready"]["reason"] == "Resumed"
    kubelet.start(job1)
    wait_phase(api, "pausable", "Running")
    assert api.tj(NS, "pausable")["status"]["restarts"] == 0, "a suspension is not a failure"


def test_active_deadline_fails_with_deadline_exceeded(api: Api, kubelet: Kubelet, operator: OperatorThread) -> None:
    api.create_tj(training_job("late", runPolicy={"activeDeadlineSeconds": 1}))
    job = wait_job(api, "late-a0")
    kubelet.start(job)
    tj = wait_phase(api, "late", "Failed", timeout=10)
    assert conditions(tj)["Failed"]["reason"] == "DeadlineExceeded"
    assert tj["status"]["attempts"][0]["reason"] == "DeadlineExceeded"
    assert wait_for(lambda: api.job(NS, "late-a0") is None, what="pods removed")


def test_ttl_deletes_the_finished_job_and_its_children(api: Api, kubelet: Kubelet, operator: OperatorThread) -> None:
    api.create_tj(training_job("brief", runPolicy={"ttlSecondsAfterFinished": 1}))
    job = wait_job(api, "brief-a0")
    wait_for(lambda: api.get(f"/api/v1/namespaces/{NS}/configmaps/brief-config"), what="ConfigMap")
    kubelet.start(job)
    kubelet.succeed(api.job(NS, "brief-a0"))
    wait_phase(api, "brief", "Succeeded")
    assert api.tj(NS, "brief") is not None
    wait_for(lambda: api.tj(NS, "brief") is None, timeout=10, what="TTL deletion")
    # Deletion cascades through the owner references (the emulator plays the garbage collector).
    assert api.jobs(NS) == [] and api.pods(NS) == []
    assert api.items(f"/api/v1/namespaces/{NS}/configmaps") == []
    assert api.items(f"/api/v1/namespaces/{NS}/services") == []
    assert api.items(f"/apis/networking.k8s.io/v1/namespaces/{NS}/networkpolicies") == []


def test_delete_cascades(api: Api, operator: OperatorThread) -> None:
    api.create_tj(training_job("gone", scheduling={"schedulerName": "volcano", "gang": True, "queue": "team-a"}))
    job = wait_job(api, "gone-a0")
    group = wait_for(
        lambda: api.get(f"/apis/scheduling.volcano.sh/v1beta1/namespaces/{NS}/podgroups/gone"), what="PodGroup"
    )
    assert group["spec"]["minMember"] == 2
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    template = job["spec"]["template"]
    assert template["spec"]["schedulerName"] == "volcano"
    assert template["metadata"]["annotations"]["scheduling.k8s.io/group-name"] == "gone"
    api.delete_tj(NS, "gone")
    wait_for(lambda: api.tj(NS, "gone") is None, what="finalizer released")
    assert api.jobs(NS) == [] and api.items(f"/api/v1/namespaces/{NS}/configmaps") == []
    assert api.get(f"/apis/scheduling.volcano.sh/v1beta1/namespaces/{NS}/podgroups/gone") is None


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_progress_is_copied_from_the_trainer_metrics_endpoint(
    api: Api, kubelet: Kubelet, operator: OperatorThread
) -> None:
    from lmforge.trainer.metrics import TrainerMetrics

    port = _free_port()
    trainer = TrainerMetrics(job="watched", namespace=NS, rank=0, local_rank=0, port=port)
    try:
        trainer.train_step.set(42)
        trainer.total_steps.set(100)
        trainer.train_loss.set(2.5)
        trainer.tokens_per_second.set(1234.5)
        trainer.eta_seconds.set(60)
        trainer.tokens.inc(86016)
        trainer.checkpoint_step.set(40)
        trainer.checkpoint_time.set(1_700_000_000)
        api.create_tj(training_job("watched", metrics={"port": port}))
        job = wait_job(api, "watched-a0")
        kubelet.start(job, pod_ip="127.0.0.1")
        wait_phase(api, "watched", "Running")
        progress = wait_for(
            lambda: (api.tj(NS, "watched")["status"].get("progress") or {}).get("step"), what="progress"
        )
        assert progress == 42
        status = api.tj(NS, "watched")["status"]
        assert status["progress"]["totalSteps"] == 100 and status["progress"]["loss"] == 2.5
        assert status["progress"]["tokensPerSecond"] == 1234.5 and status["progress"]["tokens"] == 86016
        assert status["progress"]["etaSeconds"] == 60
        assert status["lastCheckpoint"]["step"] == 40
        assert status["lastCheckpoint"]["uri"] == "s3://runs/watched/checkpoints/step-00000040"
        trainer.train_step.set(43)
        wait_for(lambda: api.tj(NS, "watched")["status"]["progress"]["step"] == 43, what="step 43")
    finally:
        trainer.close()


def test_stall_detection_restarts_a_gang_that_stopped_advancing(
    api: Api, kubelet: Kubelet, operator: OperatorThread
) -> None:
    registry = CollectorRegistry()
    step = Gauge("lmforge_train_step", "step", ["job", "namespace", "rank"], registry=registry)
    step.labels(job="stuck", namespace=NS, rank="0").set(7)
    port = _free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    try:
        api.create_tj(training_job("stuck", metrics={"port": port}, runPolicy={"stallTimeoutSeconds": 1}))
        job = wait_job(api, "stuck-a0")
        kubelet.start(job)
        wait_phase(api, "stuck", "Running")
        # Advancing steps keep it alive past the timeout.
        for value in (8, 9, 10, 11):
            time.sleep(0.4)
            step.labels(job="stuck", namespace=NS, rank="0").set(value)
        assert phase_of(api, "stuck") == "Running"
        # Then nothing moves: Stalled, and a new gang.
        wait_for(lambda: phase_of(api, "stuck") == "Stalled", timeout=5, what="Stalled")
        tj = api.tj(NS, "stuck")
        assert conditions(tj)["Stalled"]["status"] == "True"
        wait_job(api, "stuck-a1")
        tj = wait_phase(api, "stuck", "Restarting")
        assert tj["status"]["attempts"][0]["reason"] == "Stalled" and tj["status"]["restarts"] == 1
    finally:
        server.shutdown()
        thread.join(5)


def test_operator_restart_keeps_the_stall_clock(cluster: ClusterThread, api: Api, kubelet: Kubelet) -> None:
    """The stall clock lives in status.progress.lastProgressTime: an operator that restarts while a
    gang is stalling catches it at the original deadline, not a full stallTimeoutSeconds later."""
    registry = CollectorRegistry()
    step = Gauge("lmforge_train_step", "step", ["job", "namespace", "rank"], registry=registry)
    step.labels(job="frozen", namespace=NS, rank="0").set(7)
    port = _free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    config = cluster.configuration()
    timeout = 4
    try:
        with OperatorThread(config, namespaces=[NS], **FAST):
            api.create_tj(training_job("frozen", metrics={"port": port}, runPolicy={"stallTimeoutSeconds": timeout}))
            kubelet.start(wait_job(api, "frozen-a0"))
            progress = wait_for(
                lambda: (p := (api.tj(NS, "frozen")["status"].get("progress") or {})).get("step") == 7 and p,
                what="step 7 and the stall clock in the status",
            )
            assert progress["lastProgressTime"]
        assert phase_of(api, "frozen") == "Running", "the first operator must stop before the stall deadline"
        time.sleep(timeout)  # the deadline passes while no operator runs
        # The second operator takes one supervision step, then would wait an hour: only a restored
        # clock can call the gang stalled on that step (a reset clock would start counting anew).
        with OperatorThread(config, namespaces=[NS], poll_interval=3600, progress_interval=0.05):
            tj = wait_phase(api, "frozen", "Stalled", timeout=10)
        assert tj["status"]["attempts"][0]["reason"] == "Stalled"
        assert f"no step progress for {timeout}s (step 7)" in tj["status"]["message"]
    finally:
        server.shutdown()
        thread.join(5)


def test_suspend_wakes_the_supervisor_at_once(api: Api, kubelet: Kubelet, cluster: ClusterThread) -> None:
    """A spec change does not wait for the next poll: with an hour between supervision steps, only
    the first step (creating attempt 0) is timed; suspend and resume happen because they wake it."""
    with OperatorThread(cluster.configuration(), namespaces=[NS], poll_interval=3600, progress_interval=3600):
        api.create_tj(training_job("sleepy"))
        wait_job(api, "sleepy-a0")
        wait_phase(api, "sleepy", "Pending")
        api.patch_tj(NS, "sleepy", {"spec": {"runPolicy": {"suspend": True}}})
        tj = wait_phase(api, "sleepy", "Suspended", timeout=10)
        assert tj["status"]["attempts"][0]["reason"] == "Suspended"
        assert wait_for(lambda: api.job(NS, "sleepy-a0") is None, what="the gang stopped")
        api.patch_tj(NS, "sleepy", {"spec": {"runPolicy": {"suspend": False}}})
        wait_job(api, "sleepy-a1")
        tj = wait_phase(api, "sleepy", "Restarting", timeout=10)
        assert conditions(tj)["Ready"]["reason"] == "Resumed"
        # A status write (not a spec change) wakes nothing: still one step per change.
        api.call("PATCH", api.tj_path(NS, "sleepy") + "/status", {"status": {"message": "hello"}})
        time.sleep(0.5)
        assert api.tj(NS, "sleepy")["status"]["message"] == "hello"


def test_compression_job_runs_one_job(api: Api, kubelet: Kubelet, operator: OperatorThread) -> None:
    manifest = {
        "apiVersion": "lmforge.dev/v1alpha1",
        "kind": "CompressionJob",
        "metadata": {"name": "shrink", "namespace": NS},
        "spec": {
            "model": {"uri": "s3://runs/base/model"},
            "steps": [{"quantize": {"method": "int8-dynamic"}}],
            "output": {"uri": "s3://runs/shrink"},
        },
    }
    api.create_tj(manifest, kind="compressionjobs")
    job = wait_for(lambda: api.job(NS, "shrink-compress-a0"), what="compression Job")
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["lmforge", "compress", "/etc/lmforge/job.yaml"]
    assert job["spec"]["completions"] == 1 and "subdomain" not in job["spec"]["template"]["spec"]
    wait_phase(api, "shrink", "Pending", kind="compressionjobs")
    kubelet.start(job)
    wait_phase(api, "shrink", "Running", kind="compressionjobs")
    kubelet.succeed(api.job(NS, "shrink-compress-a0"))
    cj = wait_phase(api, "shrink", "Succeeded", kind="compressionjobs")
    assert conditions(cj)["Succeeded"]["status"] == "True"
    assert api.items(f"/api/v1/namespaces/{NS}/services") == []


def test_trainer_image_defaults_come_from_the_operator_environment(
    cluster: ClusterThread, api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the Helm chart's trainer.image sets: the image of every job that names none."""
    monkeypatch.setenv("LMFORGE_TRAINER_IMAGE", "registry.local/team/trainer:1.2.3")
    monkeypatch.setenv("LMFORGE_TRAINER_IMAGE_PULL_POLICY", "Always")
    with OperatorThread(cluster.configuration(), namespaces=[NS], **FAST):
        api.create_tj(training_job("plain"))
        api.create_tj(training_job("pinned", resources={"nodes": 1, "image": "mine/trainer:dev"}))
        api.create_tj(training_job("prepped", data={"prepare": {}}))
        plain = wait_job(api, "plain-a0")["spec"]["template"]["spec"]["containers"][0]
        pinned = wait_job(api, "pinned-a0")["spec"]["template"]["spec"]["containers"][0]
        prepped = wait_job(api, "prepped-prepare")["spec"]["template"]["spec"]["containers"][0]
    assert (plain["image"], plain["imagePullPolicy"]) == ("registry.local/team/trainer:1.2.3", "Always")
    assert (prepped["image"], prepped["imagePullPolicy"]) == ("registry.local/team/trainer:1.2.3", "Always")
    assert (pinned["image"], pinned["imagePullPolicy"]) == ("mine/trainer:dev", "Always")


def _compression(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "lmforge.dev/v1alpha1",
        "kind": "CompressionJob",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "model": {"uri": "s3://runs/base/model"},
            "steps": [{"prune": {"method": "structured", "sparsity": 0.25}}, {"quantize": {"method": "int8-dynamic"}}],
            "output": {"uri": f"s3://runs/{name}"},
        },
    }


def _results_message(rows: int = 3, change: str = "+1.2%") -> str:
    """What `lmforge compress` leaves in the termination message (see lmforge.termination)."""
    from lmforge.termination import fit

    table = [{"step": "baseline", "parameters": 1_000_000, "sizeBytes": 4_000_000, "perplexity": 20.5}]
    table += [
        {
            "step": f"prune-{i}",
            "method": "structured",
            "parameters": 750_000,
            "sizeBytes": 3_000_000,
            "perplexity": 21.0 + i,
            "decodeMsPerToken": 1.5,
            "speedup": 1.3,
        }
        for i in range(rows - 2)
    ]
    table.append({"step": "quantize", "method": "int8-dynamic", "sizeBytes": 1_000_000, "perplexity": 20.75})
    return fit(
        {
            "results": table,
            "compression_ratio": 4.0,
            "perplexity_change": change,
            "gate": {"passed": True, "message": "perplexity 20.5 -> 20.75"},
        }
    )


def test_compression_results_come_from_the_termination_message(
    api: Api, kubelet: Kubelet, operator: OperatorThread
) -> None:
    api.create_tj(_compression("table"), kind="compressionjobs")
    job = wait_for(lambda: api.job(NS, "table-compress-a0"), what="compression Job")
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["terminationMessagePath"] == "/dev/termination-log"
    assert container["terminationMessagePolicy"] == "File"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["LMFORGE_TERMINATION_LOG"] == "/dev/termination-log"
    kubelet.start(job)
    wait_phase(api, "table", "Running", kind="compressionjobs")
    kubelet.succeed(api.job(NS, "table-compress-a0"), message=_results_message())
    status = wait_phase(api, "table", "Succeeded", kind="compressionjobs")["status"]
    assert [r["step"] for r in status["results"]] == ["baseline", "prune-0", "quantize"]
    assert status["results"][1] == {
        "step": "prune-0",
        "method": "structured",
        "parameters": 750000,
        "sizeBytes": 3000000,
        "perplexity": 21.0,
        "decodeMsPerToken": 1.5,
        "speedup": 1.3,
    }
    assert status["compressionRatio"] == 4.0 and status["perplexityChange"] == "+1.2%"


def test_failed_quality_gate_keeps_the_results_and_is_not_retried(
    api: Api, kubelet: Kubelet, operator: OperatorThread
) -> None:
    api.create_tj(_compression("strict"), kind="compressionjobs")
    job = wait_for(lambda: api.job(NS, "strict-compress-a0"), what="compression Job")
    kubelet.start(job)
    wait_phase(api, "strict", "Running", kind="compressionjobs")
    big = _results_message(rows=60, change="+40.0%")  # more rows than 4096 bytes hold: middle rows dropped
    assert len(big.encode()) <= 4096
    kubelet.terminate(job, 0, 3, message=big)
    cj = wait_phase(api, "strict", "Failed", kind="compressionjobs")
    assert conditions(cj)["Failed"]["reason"] == "QualityGate"
    status = cj["status"]
    assert status["attempts"][0]["retryable"] is False and status["restarts"] == 0
    assert status["perplexityChange"] == "+40.0%"
    steps = [r["step"] for r in status["results"]]
    assert steps[0] == "baseline" and steps[-1] == "quantize" and 3 <= len(steps) < 60
    events = wait_for(
        lambda: [e for e in api.items(f"/api/v1/namespaces/{NS}/events") if e["reason"] == "ResultsTruncated"],
        what="a ResultsTruncated event",
    )
    assert "results.md has them all" in events[0]["message"]
    time.sleep(0.3)
    assert api.job(NS, "strict-compress-a1") is None


def test_compression_of_a_training_job_waits_for_its_model(
    api: Api, kubelet: Kubelet, operator: OperatorThread
) -> None:
    manifest = {
        "apiVersion": "lmforge.dev/v1alpha1",
        "kind": "CompressionJob",
        "metadata": {"name": "after", "namespace": NS},
        "spec": {
            "model": {"trainingJob": "base"},
            "steps": [{"quantize": {"method": "int8-dynamic"}}],
            "output": {"uri": "s3://runs/after"},
        },
    }
    api.create_tj(manifest, kind="compressionjobs")
    wait_phase(api, "after", "Pending", kind="compressionjobs")
    cj = wait_for(
        lambda: (
            (c := api.tj(NS, "after", "compressionjobs"))
            and conditions(c).get("Ready", {}).get("reason") == "WaitingForModel"
            and c
        ),
        what="condition reason WaitingForModel",
    )
    assert cj["status"]["message"] == "TrainingJob base does not exist; waiting for it to succeed"
    assert api.job(NS, "after-compress-a0") is None

    api.create_tj(training_job("base"))
    job = wait_job(api, "base-a0")
    kubelet.start(job)
    kubelet.succeed(api.job(NS, "base-a0"))
    tj = wait_phase(api, "base", "Succeeded")
    assert tj["status"]["outputs"]["modelUri"] == "s3://runs/base/model"
    compress_job = wait_for(lambda: api.job(NS, "after-compress-a0"), what="compression Job after the model exists")
    env = {e["name"]: e.get("value") for e in compress_job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["LMFORGE_SOURCE_MODEL_URI"] == "s3://runs/base/model"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed on this machine")
def test_kubectl_creates_and_reads_a_training_job(
    cluster: ClusterThread, api: Api, kubelet: Kubelet, operator: OperatorThread, tmp_path: Any
) -> None:
    import yaml

    manifest = tmp_path / "tj.yaml"
    manifest.write_text(yaml.safe_dump(training_job("viakubectl")))
    with kubectl_env(cluster) as env:
        created = kubectl(env, "create", "--validate=false", "-f", str(manifest))
        assert created.returncode == 0, created.stderr
        job = wait_job(api, "viakubectl-a0")
        kubelet.start(job)
        wait_phase(api, "viakubectl", "Running")
        got = kubectl(env, "get", "trainingjobs", "viakubectl", "-o", "jsonpath={.status.phase}")
        assert got.returncode == 0, got.stderr
        assert got.stdout == "Running"


@pytest.mark.slow
def test_hundred_training_jobs_at_once(cluster: ClusterThread, api: Api, operator: OperatorThread) -> None:
    names = [f"many-{i:03d}" for i in range(100)]
    threads = [threading.Thread(target=api.create_tj, args=(training_job(n),)) for n in names]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wait_for(lambda: len(api.jobs(NS)) == 100, timeout=60, what="100 Jobs")
    wait_for(lambda: all(phase_of(api, n) == "Pending" for n in names), timeout=60, what="100 Pending")
    elapsed = time.monotonic() - started
    assert sorted(j["metadata"]["name"] for j in api.jobs(NS)) == [f"{n}-a0" for n in names]
    wait_for(lambda: len(api.items(f"/api/v1/namespaces/{NS}/configmaps")) == 100, timeout=60, what="100 ConfigMaps")
    assert elapsed < 60
