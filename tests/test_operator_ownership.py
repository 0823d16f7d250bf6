"""Children checked by owner: an object with a child's name that the job does not control is
never adopted, patched, deleted nor supervised; the job fails with reason NameConflict.

Real Kopf against kmock's emulator (tests/operator_helpers.py), as tests/test_operator.py.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from lmforge.operator import ownership
from lmforge.operator.kube import Kube
from tests.operator_helpers import Api, ClusterThread, Kubelet, OperatorThread, training_job, wait_for

NS = "default"
FAST = {"poll_interval": 0.05, "progress_interval": 0.05}
CONFIGMAPS = f"/api/v1/namespaces/{NS}/configmaps"
JOBS = f"/apis/batch/v1/namespaces/{NS}/jobs"


@pytest.fixture
def cluster() -> Iterator[ClusterThread]:
    with ClusterThread() as running:
        yield running


@pytest.fixture
def api(cluster: ClusterThread) -> Api:
    return Api(cluster.configuration())


@pytest.fixture
def operator(cluster: ClusterThread) -> Iterator[OperatorThread]:
    with OperatorThread(cluster.configuration(), namespaces=[NS], **FAST) as running:
        yield running


def status_of(api: Api, name: str) -> dict[str, Any]:
    return (api.tj(NS, name) or {}).get("status") or {}


def conditions(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in status.get("conditions", [])}


def events(api: Api, reason: str) -> list[dict[str, Any]]:
    return [e for e in api.items(f"/api/v1/namespaces/{NS}/events") if e.get("reason") == reason]


def failed(api: Api, name: str) -> dict[str, Any]:
    return wait_for(
        lambda: status_of(api, name).get("phase") == "Failed" and status_of(api, name), what=f"{name} Failed"
    )


def foreign_job(name: str, labels: dict[str, str]) -> dict[str, Any]:
    """Someone else's Job: no owner, labelled as if it were the child (the index selects by label)."""
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": NS, "labels": labels},
        "spec": {
            "completions": 1,
            "template": {"spec": {"containers": [{"name": "app", "image": "team-b/app:1"}], "restartPolicy": "Never"}},
        },
    }


def test_a_foreign_configmap_is_left_untouched_and_reported(api: Api, operator: OperatorThread) -> None:
    theirs = api.call(
        "POST",
        CONFIGMAPS,
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "taken-config"}, "data": {"db": "prod"}},
    )
    api.create_tj(training_job("taken"))
    status = failed(api, "taken")
    conflict = conditions(status)["NameConflict"]
    assert conflict["status"] == "True" and conditions(status)["Failed"]["reason"] == "NameConflict"
    assert conflict["message"].startswith("ConfigMap taken-config exists and is not owned by this TrainingJob")
    assert (
        "delete that object and create TrainingJob taken again, or create the TrainingJob under another name"
        in (conflict["message"])
    )
    assert wait_for(lambda: events(api, "NameConflict"), what="a NameConflict event")[0]["type"] == "Warning"
    time.sleep(0.3)  # several supervision steps
    kept = api.get(f"{CONFIGMAPS}/taken-config")
    assert (
        kept["data"] == {"db": "prod"} and kept["metadata"]["resourceVersion"] == theirs["metadata"]["resourceVersion"]
    )
    assert "ownerReferences" not in kept["metadata"]
    assert api.job(NS, "taken-a0") is None, "no gang for a job whose ConfigMap is someone else's"
    assert len(events(api, "NameConflict")) == 1, "reported once"
    api.delete_tj(NS, "taken")
    wait_for(lambda: api.tj(NS, "taken") is None, what="the job deleted")
    assert api.get(f"{CONFIGMAPS}/taken-config")["data"] == {"db": "prod"}, "not deleted with the job"


def test_a_foreign_job_with_an_attempts_name_is_left_untouched_and_reported(
    cluster: ClusterThread, api: Api, operator: OperatorThread
) -> None:
    labels = {"lmforge.dev/job": "clash", "lmforge.dev/kind": "training", "lmforge.dev/attempt": "0"}
    theirs = api.call("POST", JOBS, foreign_job("clash-a0", labels))
    # Finished, as if it were attempt 0 succeeding: a job that took it for its own would succeed.
    api.call(
        "PATCH",
        f"{JOBS}/clash-a0/status",
        {"status": {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}},
    )
    seen = api.job(NS, "clash-a0")
    api.create_tj(training_job("clash"))
    status = failed(api, "clash")
    assert conditions(status)["Failed"]["reason"] == "NameConflict"
    assert conditions(status)["NameConflict"]["message"].startswith(
        "Job clash-a0 exists and is not owned by this TrainingJob"
    )
    assert status.get("attempts", []) == [] and "outputs" not in status
    time.sleep(0.3)
    kept = api.job(NS, "clash-a0")
    assert kept["metadata"]["resourceVersion"] == seen["metadata"]["resourceVersion"]
    assert kept["spec"] == theirs["spec"] and "ownerReferences" not in kept["metadata"]
    writes = cluster.call(
        lambda c: [
            r
            for r in c.served
            if r[1].startswith(f"{JOBS}/clash-a0") and r[0] != "method.GET" and r[2] != "lmforge-tests"
        ]
    )
    assert writes == [], f"the operator wrote to the foreign Job: {writes}"
    api.delete_tj(NS, "clash")
    wait_for(lambda: api.tj(NS, "clash") is None, what="the job deleted")
    assert api.job(NS, "clash-a0") is not None


def test_a_foreign_pod_labelled_as_a_rank_is_not_supervised(api: Api, operator: OperatorThread) -> None:
    """A pod anyone could create with the rank-1 labels of a running gang exits 78 (fatal):
    not the gang's pod (its controller is no Job of this job), so the job keeps running."""
    api.create_tj(training_job("guarded"))
    job = wait_for(lambda: api.job(NS, "guarded-a0"), what="guarded-a0")
    Kubelet(api).start(job)
    wait_for(lambda: status_of(api, "guarded").get("phase") == "Running", what="Running")
    labels = dict(job["spec"]["template"]["metadata"]["labels"])
    labels["batch.kubernetes.io/job-completion-index"] = "1"
    api.call(
        "POST",
        f"/api/v1/namespaces/{NS}/pods",
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": "impostor",
                "labels": labels,
                "annotations": {"batch.kubernetes.io/job-completion-index": "1"},
            },
            "spec": {"containers": [{"name": "trainer", "image": "x"}]},
            "status": {
                "phase": "Failed",
                "containerStatuses": [
                    {"name": "trainer", "state": {"terminated": {"exitCode": 78, "reason": "Error"}}}
                ],
            },
        },
    )
    time.sleep(0.5)
    status = status_of(api, "guarded")
    assert status["phase"] == "Running" and status["attempts"][0].get("endTime") is None
    assert api.get(f"/api/v1/namespaces/{NS}/pods/impostor") is not None


def test_an_earlier_jobs_leftover_child_is_waited_for_then_replaced(api: Api, operator: OperatorThread) -> None:
    """A job deleted and created again before the garbage collector removed its ConfigMap: the
    leftover is controlled by the earlier job (same kind and name, another uid), so this one waits
    for the collector instead of failing; then it creates its own."""
    api.call(
        "POST",
        CONFIGMAPS,
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": "again-config",
                "ownerReferences": [
                    {
                        "apiVersion": "lmforge.dev/v1alpha1",
                        "kind": "TrainingJob",
                        "name": "again",
                        "uid": "earlier-uid",
                        "controller": True,
                    }
                ],
            },
            "data": {"job.yaml": "earlier"},
        },
    )
    api.create_tj(training_job("again"))
    waiting = wait_for(
        lambda: (
            "being garbage collected"
            in (conditions(status_of(api, "again")).get("Reconciled") or {}).get("message", "")
            and status_of(api, "again")
        ),
        what="waiting for the garbage collector",
    )
    assert (
        waiting.get("phase", "Pending") == "Pending" and conditions(waiting)["Reconciled"]["reason"] == "ChildLeftover"
    )
    time.sleep(0.3)
    assert api.job(NS, "again-a0") is None, "no gang reading the earlier job's ConfigMap"
    assert api.get(f"{CONFIGMAPS}/again-config")["data"] == {"job.yaml": "earlier"}
    api.call("DELETE", f"{CONFIGMAPS}/again-config")  # what the garbage collector does
    wait_for(lambda: api.job(NS, "again-a0"), what="the attempt after the leftover went")
    mine = api.get(f"{CONFIGMAPS}/again-config")
    assert mine["metadata"]["ownerReferences"][0]["uid"] == api.tj(NS, "again")["metadata"]["uid"]


def test_deletes_and_patches_land_only_on_the_object_checked(cluster: ClusterThread, api: Api) -> None:
    """Kube.delete and Kube.patch with the uid of the object the operator saw as its own: a name
    that now holds another object is refused by the API server and left as it is."""
    kube = Kube(cluster.configuration())
    other = api.call("POST", JOBS, foreign_job("swapped-a0", {}))
    assert kube.delete("batch/v1", "Job", NS, "swapped-a0", uid="uid-of-our-deleted-job") is False
    assert api.job(NS, "swapped-a0")["metadata"]["uid"] == other["metadata"]["uid"]
    cm = api.call(
        "POST",
        CONFIGMAPS,
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "swapped"}, "data": {"a": "1"}},
    )
    with pytest.raises(Exception, match="409"):
        kube.patch("v1", "ConfigMap", NS, "swapped", {"data": {"a": "2"}}, uid="uid-of-our-deleted-configmap")
    assert api.get(f"{CONFIGMAPS}/swapped")["data"] == {"a": "1"}
    kube.patch("v1", "ConfigMap", NS, "swapped", {"data": {"a": "2"}}, uid=cm["metadata"]["uid"])
    assert api.get(f"{CONFIGMAPS}/swapped")["data"] == {"a": "2"}
    assert kube.delete("batch/v1", "Job", NS, "swapped-a0", uid=other["metadata"]["uid"]) is True


def test_ownership_rules() -> None:
    owner = {"apiVersion": "lmforge.dev/v1alpha1", "kind": "TrainingJob", "metadata": {"name": "j", "uid": "u1"}}

    def child(*refs: dict[str, Any]) -> dict[str, Any]:
        return {"kind": "ConfigMap", "metadata": {"name": "j-config", "ownerReferences": list(refs)}}

    mine = {"apiVersion": "lmforge.dev/v1alpha1", "kind": "TrainingJob", "name": "j", "uid": "u1", "controller": True}
    ownership.check_existing(child(mine), owner)
    with pytest.raises(ownership.ForeignObject, match="it has no controller"):
        ownership.check_existing(child(), owner)
    with pytest.raises(ownership.ForeignObject, match="not owned"):  # named as owner, but not the controller
        ownership.check_existing(child({**mine, "controller": False}), owner)
    with pytest.raises(ownership.ForeignObject, match="its controller is Deployment web"):
        ownership.check_existing(
            child({"apiVersion": "apps/v1", "kind": "Deployment", "name": "web", "uid": "u9", "controller": True}),
            owner,
        )
    with pytest.raises(ownership.ChildLeftover):
        ownership.check_existing(child({**mine, "uid": "u0"}), owner)
