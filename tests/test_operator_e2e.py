"""A 2-node CPU TrainingJob really trains through the operator, survives a lost node, and succeeds.

The test plays the Job controller and kubelet for real: for each pod the operator's Job describes,
it runs the container's command with the container's environment as a local process (Secret and
downward-API references resolved from the API, the ConfigMap written where it is mounted, pod
hostnames resolved to 127.0.0.1). DeepSpeed talks gloo over loopback, data and checkpoints live on a
real S3 server on loopback. Mid-run one node is killed; the operator must replace the gang, the new
attempt must resume from the newest committed checkpoint, and the job must end Succeeded with the
model in S3 and both attempts in its status.
"""

# ruff: noqa: F811
from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.operator_helpers import Api, ClusterThread, Kubelet, OperatorThread, training_job, wait_for
from tests.s3fixture import s3_client, s3_server  # noqa: F401
from tests.trainer_helpers import CORPUS, REPO, free_port, free_port_pair

pytestmark = pytest.mark.slow
NS = "default"
INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"


class LocalPods:
    """Runs an attempt Job's pods as local processes, as a kubelet would run their containers."""

    def __init__(self, api: Api, workdir: Path, s3_endpoint: str) -> None:
        self.api = api
        self.workdir = workdir
        self.s3_endpoint = s3_endpoint
        self.processes: dict[int, subprocess.Popen[bytes]] = {}

    def _env(
        self, container: dict[str, Any], pod: dict[str, Any], master_port: int, metrics_port: int
    ) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MASTER_", "NNODES", "NODE_RANK"))}
        for item in container.get("env", []):
            name = item["name"]
            if "value" in item:
                env[name] = str(item["value"])
                continue
            source = item["valueFrom"]
            if "fieldRef" in source:
                path = source["fieldRef"]["fieldPath"]
                match = re.fullmatch(r"metadata\.annotations\['(.+)'\]", path)
                assert match, f"unsupported fieldRef {path}"
                env[name] = pod["metadata"]["annotations"][match.group(1)]
            elif "secretKeyRef" in source:
                ref = source["secretKeyRef"]
                secret = self.api.get(f"/api/v1/namespaces/{NS}/secrets/{ref['name']}")
                env[name] = base64.b64decode(secret["data"][ref["key"]]).decode()
        assert env["MASTER_ADDR"].endswith(f".{NS}.svc"), env["MASTER_ADDR"]
        env["MASTER_ADDR"] = "127.0.0.1"  # the pod hostname, resolved on this one machine
        env["MASTER_PORT"] = str(master_port)  # both "pods" share one network namespace here
        env["LMFORGE_METRICS_ADDR"] = "127.0.0.1"  # never listen beyond loopback in tests
        env["LMFORGE_METRICS_PORT"] = str(metrics_port)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def run(self, job: dict[str, Any], metrics_port: int) -> None:
        pods = sorted(
            self.api.pods(NS, **{"job-name": job["metadata"]["name"]}),
            key=lambda p: int(p["metadata"]["annotations"][INDEX_ANNOTATION]),
        )
        assert len(pods) == job["spec"]["completions"]
        template = job["spec"]["template"]["spec"]
        config_map = next(v["configMap"]["name"] for v in template["volumes"] if "configMap" in v)
        manifest = self.api.get(f"/api/v1/namespaces/{NS}/configmaps/{config_map}")["data"]["job.yaml"]
        master_port = free_port_pair(avoid=(metrics_port,))
        for pod in pods:
            index = int(pod["metadata"]["annotations"][INDEX_ANNOTATION])
            container = pod["spec"]["containers"][0]
            mount = next(m["mountPath"] for m in container["volumeMounts"] if m["mountPath"].startswith("/etc/lmforge"))
            root = self.workdir / f"{job['metadata']['name']}-{index}"
            (root / mount.lstrip("/")).mkdir(parents=True, exist_ok=True)
            (root / mount.lstrip("/") / "job.yaml").write_text(manifest)
            command = [root / c.lstrip("/") if c.startswith("/etc/lmforge") else c for c in container["command"]]
            assert command[0] == "lmforge"
            argv = [sys.executable, "-m", "lmforge.cli", *map(str, command[1:])]
            port = metrics_port if index == 0 else free_port()
            log = open(root / "log.txt", "wb")  # noqa: SIM115 - kept open for the process
            self.processes[index] = subprocess.Popen(
                argv,
                env=self._env(container, pod, master_port, port),
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def kill(self, index: int) -> int:
        process = self.processes.pop(index)
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        return process.wait()

    def wait_all(self, timeout: float) -> dict[int, int]:
        deadline = time.time() + timeout
        codes = {}
        for index, process in list(self.processes.items()):
            codes[index] = process.wait(max(1.0, deadline - time.time()))
        self.processes.clear()
        return codes

    def failed(self) -> bool:
        """Whether a "pod" process already ended with an error (then waiting on it is pointless)."""
        return any(p.poll() not in (None, 0) for p in self.processes.values())

    def kill_all(self) -> None:
        for index in list(self.processes):
            self.kill(index)


@pytest.fixture
def cluster() -> Iterator[ClusterThread]:
    with ClusterThread() as running:
        yield running


def committed_steps(client: Any, prefix: str) -> list[int]:
    listing = client.list_objects_v2(Bucket="lmforge", Prefix=prefix).get("Contents", [])
    return sorted(int(m.group(1)) for o in listing if (m := re.search(r"step-(\d{8})/COMMIT$", o["Key"])))


def test_two_node_job_survives_a_lost_node_and_succeeds(s3_server: str, cluster: ClusterThread, tmp_path: Path) -> None:
    client = s3_client(s3_server)
    client.create_bucket(Bucket="lmforge")
    client.put_object(Bucket="lmforge", Key="corpus/docs.txt", Body=CORPUS.read_bytes()[:150_000])
    api = Api(cluster.configuration())
    api.call(
        "POST",
        f"/api/v1/namespaces/{NS}/secrets",
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "s3-creds", "namespace": NS},
            "data": {k: base64.b64encode(b"testing").decode() for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")},
        },
    )
    metrics_port = free_port()
    manifest = training_job(
        "e2e",
        model={"layers": 2, "width": 64, "heads": 4, "kvHeads": 2, "contextLength": 64},
        tokenizer={"vocabSize": 512},
        data={"sources": ["s3://lmforge/corpus/docs.txt"], "validationFraction": 0.1},
        training={
            "maxSteps": 160,
            "microBatchSize": 4,
            "precision": "fp32",
            "evalInterval": 80,
            "evalBatches": 2,
            "logInterval": 5,
            "schedule": {"warmupSteps": 5},
            "optimizer": {"lr": 3.0e-3},
        },
        checkpoint={"interval": 20, "keep": 2},
        output={"uri": "s3://lmforge/runs/e2e"},
        s3={"endpoint": s3_server, "addressingStyle": "path", "credentialsSecret": "s3-creds"},
        resources={"nodes": 2, "gpusPerNode": 0, "processesPerNode": 1, "cpu": "1", "memory": "2Gi"},
        metrics={"port": metrics_port},
        runPolicy={"backoffLimit": 2, "stallTimeoutSeconds": 0},
    )
    kubelet = Kubelet(api)
    pods = LocalPods(api, tmp_path, s3_server)
    try:
        with OperatorThread(cluster.configuration(), namespaces=[NS], poll_interval=0.2, progress_interval=0.5):
            api.create_tj(manifest)
            first = wait_for(lambda: api.job(NS, "e2e-a0"), 120, "attempt 0")
            kubelet.start(first)
            pods.run(first, metrics_port)

            # Lose node 1 as soon as a checkpoint is committed (as a node crash would, without warning).
            wait_for(
                lambda: committed_steps(client, "runs/e2e/checkpoints/") or pods.failed(), 240, "a committed checkpoint"
            )
            assert committed_steps(client, "runs/e2e/checkpoints/"), (tmp_path / "e2e-a0-0" / "log.txt").read_text()[
                -3000:
            ]
            assert pods.kill(1) != 0
            kubelet.terminate(first, 1, 137, reason="Error")
            wait_for(lambda: api.job(NS, "e2e-a0") is None, 120, "the failed gang removed")
            pods.kill_all()  # the kubelet stops node 0 once its Job is gone
            kept = committed_steps(client, "runs/e2e/checkpoints/")[-1]

            second = wait_for(lambda: api.job(NS, "e2e-a1"), 120, "attempt 1")
            kubelet.start(second)
            pods.run(second, metrics_port)
            wait_for(
                lambda: (api.tj(NS, "e2e").get("status", {}).get("progress") or {}).get("step", 0) > kept,
                240,
                "progress read from rank 0's metrics",
            )
            codes = pods.wait_all(timeout=300)
            assert codes == {0: 0, 1: 0}, (tmp_path / "e2e-a1-0" / "log.txt").read_text()[-3000:]
            kubelet.succeed(api.job(NS, "e2e-a1"))
            tj = wait_for(
                lambda: (t := api.tj(NS, "e2e")) and t["status"].get("phase") == "Succeeded" and t, 120, "Succeeded"
            )
    finally:
        pods.kill_all()

    status = tj["status"]
    assert status["restarts"] == 1
    first_attempt, second_attempt = status["attempts"]
    assert first_attempt["failedRank"] == 1 and first_attempt["exitCode"] == 137 and first_attempt["retryable"]
    assert second_attempt["reason"] == "Completed"
    assert status["progress"]["totalSteps"] == 160
    keys = {o["Key"] for o in client.list_objects_v2(Bucket="lmforge", Prefix="runs/e2e/")["Contents"]}
    assert "runs/e2e/model/model.safetensors" in keys and "runs/e2e/model/config.json" in keys
    summary = json.loads(client.get_object(Bucket="lmforge", Key="runs/e2e/summary.json")["Body"].read())
    assert summary["steps"] == 160
    assert summary["resumed_from"] is not None and summary["resumed_from"] >= kept >= 20
