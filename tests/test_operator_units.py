"""Pure parts of the operator: exit-code classification, child builders, progress parsing."""

from __future__ import annotations

import pytest

from lmforge.api.manifest import TrainingJob
from lmforge.operator import children, classify, progress
from lmforge.operator.status import status_patch
from tests.operator_helpers import training_job


@pytest.mark.parametrize(
    "code,reason,retryable",
    [(78, "InvalidSpec", False), (75, "Retryable", True), (143, "Preempted", True), (137, "Signal", True),
     (1, "Error", True), (0, "Completed", False)],
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
        return {"metadata": {"name": f"p{index}", "labels": {children.INDEX_LABEL: str(index)}},
                "status": {"containerStatuses": [{"state": {"terminated": {"exitCode": code, "finishedAt": at}}}]}}

    # The earliest failure is the cause; a fatal one wins over retryable ones.
    assert classify.first_failed_pod([pod(0, 1, "T2"), pod(1, 137, "T1")])[0]["metadata"]["name"] == "p1"
    assert classify.first_failed_pod([pod(0, 1, "T1"), pod(1, 78, "T3")])[1].reason == "InvalidSpec"


def test_gpu_job_shape() -> None:
    manifest = TrainingJob.model_validate(
        training_job("gpu", resources={"nodes": 4, "gpusPerNode": 8, "cpu": "32", "memory": "256Gi",
                                       "sharedMemory": "64Gi", "nodeSelector": {"gpu": "h100"},
                                       "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}]},
                     training={"maxSteps": 10, "precision": "bf16"})
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
