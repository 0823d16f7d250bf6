"""The pods the operator starts work on a read-only root filesystem, with their emptyDirs as the only writable places.

A container runtime is not needed to check that: each pod's container command runs here in its own
mount namespace whose root is remounted read-only, with a fresh directory bound at every emptyDir
the pod spec mounts (as the kubelet would), and with the container's environment from the pod spec
(HOME, TMPDIR, the cache variables). Anything the trainer, DeepSpeed or torch writes outside those
places fails the run with EROFS, as it would in the cluster. Data, checkpoints and the model go to
S3 (a moto server on loopback), as operator-run jobs do.
"""

# ruff: noqa: F811
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from lmforge.api.manifest import TrainingJob
from lmforge.operator import children
from tests.s3fixture import s3_client, s3_server  # noqa: F401
from tests.trainer_helpers import CORPUS, REPO, free_port, free_port_pair

pytestmark = pytest.mark.slow
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
ON_MEMORY = {"/dev/shm"}
"""emptyDir mount points that are their own writable tmpfs here already (not on the root filesystem)."""
# Bind the scratch directories, then make the root read-only (a bind made after it would be read-only too).
_NAMESPACE_SCRIPT = (
    'while [ "$1" != -- ]; do mount --bind "$1" "$2"; shift 2; done; shift; mount -o remount,bind,ro /; exec "$@"'
)


def _unshare_prefix() -> list[str] | None:
    """``unshare`` for a private mount namespace (user namespace too when not root); None if refused."""
    if shutil.which("unshare") is None:
        return None
    prefix = ["unshare", "--mount", "--propagation", "private"]
    if os.geteuid() != 0:
        prefix[1:1] = ["--user", "--map-root-user"]
    probe = subprocess.run(
        [*prefix, "sh", "-c", "mount -o remount,bind,ro / && ! touch /.lmforge-probe"], capture_output=True
    )
    return prefix if probe.returncode == 0 else None


@pytest.fixture
def pod_root() -> Iterator[Path]:
    """Host directories for a pod's volumes, outside /tmp (the scratch is bound over /tmp)."""
    root = Path(tempfile.mkdtemp(prefix="lmforge-pod-", dir="/var/tmp"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run_pod(
    prefix: list[str], job: dict[str, Any], manifest_text: str, root: Path, name: str
) -> subprocess.CompletedProcess[str]:
    """Run the pod of ``job`` (index 0) as its kubelet would, on a read-only root filesystem."""
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    binds: list[str] = []
    for mount in container["volumeMounts"]:
        volume = volumes[mount["name"]]
        if "configMap" in volume:
            config = root / name / "config"
            config.mkdir(parents=True)
            (config / children.CONFIG_KEY).write_text(manifest_text)
            config_dir = mount["mountPath"]
        elif "emptyDir" in volume and mount["mountPath"] not in ON_MEMORY:
            assert Path(mount["mountPath"]).is_dir(), mount  # a mount point that exists here
            host = root / name / mount["name"]
            host.mkdir(parents=True)
            binds += [str(host), mount["mountPath"]]
        else:
            assert "emptyDir" in volume, f"unexpected volume {volume}"
    # /etc/lmforge does not exist on this machine: the config file is read at its host path (it is
    # a read-only ConfigMap mount in the pod, so nothing writes there).
    command = [c.replace(config_dir, str(root / name / "config")) for c in container["command"]]
    assert command[0] == "lmforge"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "LMFORGE_", "MASTER_", "TORCH", "XDG_"))}
    for item in container["env"]:
        if "value" in item:
            env[item["name"]] = item["value"]
        elif "secretKeyRef" in item["valueFrom"]:
            env[item["name"]] = CREDENTIALS[item["valueFrom"]["secretKeyRef"]["key"]]
        else:  # the completion index annotation
            env[item["name"]] = "0"
    if "MASTER_ADDR" in env:
        env["MASTER_ADDR"] = "127.0.0.1"  # one "pod": its own hostname
        env["MASTER_PORT"] = str(free_port_pair())
    env["LMFORGE_METRICS_ADDR"] = "127.0.0.1"  # never listen beyond loopback in tests
    env["LMFORGE_METRICS_PORT"] = str(free_port())
    env["PYTHONPATH"] = str(REPO)
    argv = [
        *prefix,
        "sh",
        "-c",
        _NAMESPACE_SCRIPT,
        "sh",
        *binds,
        "--",
        sys.executable,
        "-m",
        "lmforge.cli",
        *command[1:],
    ]
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600, cwd=REPO)


@pytest.mark.timeout(900)
def test_prepare_and_training_pods_run_on_a_read_only_root(s3_server: str, pod_root: Path) -> None:
    prefix = _unshare_prefix()
    if prefix is None:
        pytest.skip("no private mount namespace here (unshare refused): cannot remount / read-only for the pod")
    client = s3_client(s3_server)
    client.create_bucket(Bucket="lmforge")
    client.put_object(Bucket="lmforge", Key="raw/docs.txt", Body=CORPUS.read_bytes()[:400_000])
    manifest = TrainingJob.model_validate(
        {
            "apiVersion": "lmforge.dev/v1alpha1",
            "kind": "TrainingJob",
            "metadata": {"name": "rofs", "namespace": "team-a"},
            "spec": {
                "model": {"layers": 2, "width": 64, "heads": 4, "kvHeads": 2, "contextLength": 64},
                "tokenizer": {"vocabSize": 512},
                "data": {
                    "sources": ["s3://lmforge/raw/docs.txt"],
                    "format": "text",
                    "validationFraction": 0.1,
                    "prepare": {"exactDedup": True},
                },
                "training": {
                    "maxSteps": 4,
                    "microBatchSize": 4,
                    "precision": "fp32",
                    "zero": {"stage": 1},
                    "evalInterval": 4,
                    "evalBatches": 2,
                    "logInterval": 1,
                    "optimizer": {"lr": 3.0e-3},
                    "schedule": {"warmupSteps": 1},
                },
                "checkpoint": {"interval": 2, "keep": 1},
                "output": {"uri": "s3://lmforge/runs/rofs"},
                "s3": {"endpoint": s3_server, "addressingStyle": "path", "credentialsSecret": "s3-creds"},
                "resources": {"nodes": 1, "processesPerNode": 2, "cpu": "2", "memory": "4Gi"},
            },
        }
    )
    text = children.config_map(manifest)["data"][children.CONFIG_KEY]

    prepared = run_pod(prefix, children.prepare_job(manifest, 0), text, pod_root, "prepare")
    assert prepared.returncode == 0, (prepared.stdout[-2000:], prepared.stderr[-3000:])
    trained = run_pod(prefix, children.training_job(manifest, 0), text, pod_root, "attempt")
    assert trained.returncode == 0, (trained.stdout[-2000:], trained.stderr[-3000:])

    keys = {o["Key"] for o in client.list_objects_v2(Bucket="lmforge", Prefix="runs/rofs/")["Contents"]}
    assert {"runs/rofs/model/model.safetensors", "runs/rofs/summary.json", "runs/rofs/checkpoints/latest"} <= keys
    # What the pods wrote locally went to their scratch emptyDir (HOME, TMPDIR and the caches).
    assert any((pod_root / "attempt" / children.SCRATCH_VOLUME).iterdir())
    assert yaml.safe_load(text)["metadata"]["name"] == "rofs"
