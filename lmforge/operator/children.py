"""Pure builders of the objects a TrainingJob or CompressionJob owns.

Nothing here talks to the API: every function maps a validated manifest (and an attempt number)
to a plain dict, so the shapes are unit-testable and the reconciler stays small. Ownership
(``kopf.adopt``) is applied by the caller, which has the owner's body.

Names are deterministic (``<job>-config``, ``<job>-nodes``, ``<job>-a<attempt>``,
``<job>-prepare[-r<try>]``): that is what
makes every handler idempotent — a restarted operator finds the children by name instead of
creating duplicates.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from lmforge.api.common import DEFAULT_PULL_POLICY, DEFAULT_TRAINER_IMAGE, Resources, Scheduling
from lmforge.api.manifest import CompressionJob, TrainingJob
from lmforge.operator.network_policy import NetworkPolicySettings, job_network_policy
from lmforge.termination import TERMINATION_LOG_ENV, TERMINATION_LOG_PATH

LABEL_JOB = "lmforge.dev/job"
"""Name of the owning TrainingJob/CompressionJob, on every child and every pod."""
LABEL_KIND = "lmforge.dev/kind"
"""``training`` or ``compression``: the two kinds may share names in a namespace."""
LABEL_ATTEMPT = "lmforge.dev/attempt"
"""Attempt number of a Job and its pods."""
LABEL_PREPARE = "lmforge.dev/prepare"
"""Try number of a data-prepare Job and its pod (never set together with ``lmforge.dev/attempt``)."""
INDEX_LABEL = "batch.kubernetes.io/job-completion-index"
KUEUE_LABEL = "kueue.x-k8s.io/queue-name"
VOLCANO_GROUP_ANNOTATION = "scheduling.k8s.io/group-name"

CONFIG_DIR = "/etc/lmforge"
CONFIG_KEY = "job.yaml"
MASTER_PORT = 29500
"""Rendezvous gate; torch's elastic rendezvous uses MASTER_PORT + 1."""
TERMINATION_GRACE_SECONDS = 660
"""The trainer checkpoints on SIGTERM within LMFORGE_SHUTDOWN_TIMEOUT (600 s); a minute more."""
RUN_AS_USER = 10001
"""UID and GID of every container the operator starts (trainer/Dockerfile creates this user).
Above 10000, so it is no user of a typical node: a process that escapes the container owns no
node account's files (what security scanners such as checkov's CKV_K8S_40 ask for)."""
SCRATCH_VOLUME = "scratch"
SCRATCH_DIR = "/tmp"
"""The pod's writable directory (an emptyDir) on a read-only root filesystem. Everything the pods
write locally lands here: see :data:`SCRATCH_ENV`."""
SCRATCH_ENV = {
    # tempfile.gettempdir(): lmforge's staging and block caches (lmforge.data.storage.cache_dir:
    # checkpoints, outputs, fetched models, shards), `lmforge prepare`'s and `compress`'s temporary
    # directories, torch elastic's per-run log directories, torch inductor's cache.
    "TMPDIR": SCRATCH_DIR,
    # ~: anything that falls back to the home directory (CUDA's JIT cache ~/.nv, Triton's ~/.triton).
    "HOME": SCRATCH_DIR,
    "XDG_CACHE_HOME": f"{SCRATCH_DIR}/.cache",
    # DeepSpeed JIT-compiles its ops (CPU shared-memory collectives, FusedAdam) on first use.
    "TORCH_EXTENSIONS_DIR": f"{SCRATCH_DIR}/.cache/torch_extensions",
    "TRITON_CACHE_DIR": f"{SCRATCH_DIR}/.cache/triton",
    "HF_HOME": f"{SCRATCH_DIR}/.cache/huggingface",
    # The training report's plots (lmforge.trainer.report): matplotlib's font cache.
    "MPLCONFIGDIR": f"{SCRATCH_DIR}/.config/matplotlib",
}
"""Where the trainer, DeepSpeed, torch, Triton, Hugging Face and matplotlib write, all inside the
scratch emptyDir. Not covered here: /dev/shm (its own in-memory emptyDir) and the termination
message file (the kubelet mounts it writable at ``terminationMessagePath``)."""
METRICS_PORTS_MAX = 32
"""Local ranks per pod whose metrics ports are declared (and so scraped by the PodMonitor); ranks
beyond it still serve metrics, but only on undeclared ports. 32 covers every GPU node (≤ 16 GPUs)
and CPU pods with up to 32 processes."""
CONTAINER = "trainer"

Manifest = TrainingJob | CompressionJob
PULL_POLICIES = ("Always", "IfNotPresent", "Never")


@dataclass(frozen=True)
class TrainerDefaults:
    """What the installation decides for every job's pods: the image where a job's
    spec.resources leaves it unset (the cluster's registry and tag belong to the installation, the
    Helm chart's trainer.image, not to every manifest) and the jobs' NetworkPolicy (the chart's
    networkPolicy values)."""

    image: str = DEFAULT_TRAINER_IMAGE
    pull_policy: str = DEFAULT_PULL_POLICY
    network_policy: NetworkPolicySettings = field(default_factory=NetworkPolicySettings)


def with_defaults(manifest: Manifest, defaults: TrainerDefaults) -> Manifest:
    """``manifest`` with spec.resources.image and imagePullPolicy filled from ``defaults`` where unset."""
    res = manifest.spec.resources
    if res.image is not None and res.image_pull_policy is not None:
        return manifest
    resources = res.model_copy(
        update={
            "image": res.image or defaults.image,
            "image_pull_policy": res.image_pull_policy or defaults.pull_policy,
        }
    )
    spec = manifest.spec.model_copy(update={"resources": resources})
    return manifest.model_copy(update={"spec": spec})


def kind_label(manifest: Manifest) -> str:
    return "training" if manifest.kind == "TrainingJob" else "compression"


def config_map_name(job: str) -> str:
    return f"{job}-config"


def service_name(job: str) -> str:
    return f"{job}-nodes"


def attempt_job_name(job: str, attempt: int) -> str:
    return f"{job}-a{attempt}"


def network_policy_name(manifest: Manifest) -> str:
    """``<job>-ingress`` / ``<job>-compress-ingress``: a TrainingJob and a CompressionJob may share a name."""
    suffix = "ingress" if isinstance(manifest, TrainingJob) else "compress-ingress"
    return f"{manifest.metadata.name}-{suffix}"


def prepare_job_name(job: str, try_: int) -> str:
    """``<job>-prepare`` for the first try, ``<job>-prepare-r<try>`` for retries (new names, so a
    retry never collides with a failed Job that is still being deleted)."""
    return f"{job}-prepare" if try_ == 0 else f"{job}-prepare-r{try_}"


def compression_job_name(job: str, attempt: int) -> str:
    return f"{job}-compress-a{attempt}"


def master_addr(job: str, attempt: int, namespace: str) -> str:
    """Index 0's stable DNS name: Indexed Job pods are ``<jobname>-<index>`` under the Service."""
    return f"{attempt_job_name(job, attempt)}-0.{service_name(job)}.{namespace}.svc"


def selector_labels(manifest: Manifest) -> dict[str, str]:
    return {LABEL_JOB: manifest.metadata.name, LABEL_KIND: kind_label(manifest)}


def pod_manifest(manifest: Manifest) -> dict[str, Any]:
    """What the pods read at /etc/lmforge/job.yaml: the validated manifest, defaults filled in."""
    body = manifest.model_dump(mode="json", by_alias=True, exclude_none=True, exclude={"status"})
    body["metadata"] = {"name": manifest.metadata.name, "namespace": manifest.metadata.namespace}
    return body


_SAFE_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
"""libyaml's safe dumper when PyYAML has it: the pure-Python one was 7% of the operator's CPU per new job."""


def config_map(manifest: Manifest) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": config_map_name(manifest.metadata.name), "labels": selector_labels(manifest)},
        "data": {CONFIG_KEY: yaml.dump(pod_manifest(manifest), Dumper=_SAFE_DUMPER, sort_keys=False)},
    }


def headless_service(manifest: Manifest) -> dict[str, Any]:
    """Stable pod hostnames for rendezvous; not-ready pods must resolve while they wait."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": service_name(manifest.metadata.name), "labels": selector_labels(manifest)},
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": selector_labels(manifest),
            "ports": [
                {"name": "rendezvous", "port": MASTER_PORT},
                {"name": "elastic", "port": MASTER_PORT + 1},
                {"name": "metrics", "port": manifest.spec.metrics.port},
            ],
        },
    }


def pod_group(manifest: Manifest) -> dict[str, Any] | None:
    """A Volcano PodGroup when gang scheduling is asked for: all pods start together or none."""
    if not manifest.spec.scheduling.gang:
        return None
    return {
        "apiVersion": "scheduling.volcano.sh/v1beta1",
        "kind": "PodGroup",
        "metadata": {"name": manifest.metadata.name, "labels": selector_labels(manifest)},
        "spec": {"minMember": manifest.spec.resources.nodes},
    }


def network_policy(manifest: Manifest, settings: NetworkPolicySettings) -> dict[str, Any] | None:
    """Ingress to every pod of the job: from its own pods, and the scrape to its metrics ports
    (:mod:`lmforge.operator.network_policy`)."""
    ports = [p["containerPort"] for p in metrics_ports(manifest.spec.metrics.port, manifest.spec.resources.processes)]
    return job_network_policy(network_policy_name(manifest), selector_labels(manifest), ports, settings)


def _resources(res: Resources) -> dict[str, Any]:
    amounts: dict[str, Any] = {"cpu": res.cpu, "memory": res.memory}
    if res.gpus_per_node:
        amounts["nvidia.com/gpu"] = str(res.gpus_per_node)
    return {"requests": dict(amounts), "limits": dict(amounts)}


def metrics_ports(port: int, processes: int) -> list[dict[str, Any]]:
    """One named container port per local rank, whose trainer process serves /metrics on
    ``port + local rank``: ``metrics`` (rank 0, what the operator and the Service use), then
    ``metrics-1`` ... up to :data:`METRICS_PORTS_MAX` ranks. The chart's PodMonitor keeps every port
    whose name matches ``metrics(-[0-9]+)?``, so it scrapes all ranks without knowing how many."""
    ports = []
    for rank in range(min(processes, METRICS_PORTS_MAX)):
        number = port + rank
        if number in (MASTER_PORT, MASTER_PORT + 1) or number > 65535:
            continue  # a port of the rendezvous (or none at all) cannot be declared twice
        ports.append({"name": "metrics" if rank == 0 else f"metrics-{rank}", "containerPort": number})
    return ports


def _env(manifest: Manifest, attempt: int) -> list[dict[str, Any]]:
    res = manifest.spec.resources
    name, namespace = manifest.metadata.name, manifest.metadata.namespace or "default"
    env: list[dict[str, Any]] = []
    if isinstance(manifest, TrainingJob):
        env += [
            {"name": "MASTER_ADDR", "value": master_addr(name, attempt, namespace)},
            {"name": "MASTER_PORT", "value": str(MASTER_PORT)},
            {"name": "NNODES", "value": str(res.nodes)},
            {
                "name": "NODE_RANK",
                "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{INDEX_LABEL}']"}},
            },
            {"name": "NPROC_PER_NODE", "value": str(res.processes)},
        ]
    env += [
        {"name": "LMFORGE_METRICS_ADDR", "value": "0.0.0.0"},
        {"name": "LMFORGE_ATTEMPT", "value": str(attempt)},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        *({"name": key, "value": value} for key, value in SCRATCH_ENV.items()),
    ]
    if res.gpus_per_node == 0:
        env.append({"name": "DS_ACCELERATOR", "value": "cpu"})
    secret = manifest.spec.s3.credentials_secret
    if secret:
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            env.append({"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}})
    return env


def _pod_spec(manifest: Manifest, attempt: int, command: list[str]) -> dict[str, Any]:
    res = manifest.spec.resources
    scheduling: Scheduling = manifest.spec.scheduling
    container = {
        "name": CONTAINER,
        "image": res.image or DEFAULT_TRAINER_IMAGE,
        "imagePullPolicy": res.image_pull_policy or DEFAULT_PULL_POLICY,
        "command": command,
        "env": _env(manifest, attempt),
        "ports": [
            {"name": "rendezvous", "containerPort": MASTER_PORT},
            {"name": "elastic", "containerPort": MASTER_PORT + 1},
            *metrics_ports(manifest.spec.metrics.port, res.processes),
        ],
        "resources": _resources(res),
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": SCRATCH_VOLUME, "mountPath": SCRATCH_DIR},
            {"name": "dshm", "mountPath": "/dev/shm"},
        ],
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_USER,
            "runAsGroup": RUN_AS_USER,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": TERMINATION_GRACE_SECONDS,
        # The trainer never calls the Kubernetes API: no token for a user's code (or a crafted
        # model) to find in the pod.
        "automountServiceAccountToken": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_USER,
            "runAsGroup": RUN_AS_USER,
            "fsGroup": RUN_AS_USER,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [
            {"name": "config", "configMap": {"name": config_map_name(manifest.metadata.name)}},
            # Node disk, bounded by the node's ephemeral storage like the container layer it
            # replaces (checkpoint staging can be tens of GiB: no fixed sizeLimit).
            {"name": SCRATCH_VOLUME, "emptyDir": {}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": res.shared_memory}},
        ],
    }
    if res.node_selector:
        spec["nodeSelector"] = dict(res.node_selector)
    if res.tolerations:
        spec["tolerations"] = [t.to_manifest() for t in res.tolerations]
    if res.priority_class_name:
        spec["priorityClassName"] = res.priority_class_name
    if scheduling.scheduler_name:
        spec["schedulerName"] = scheduling.scheduler_name
    return spec


def _batch_job(manifest: Manifest, name: str, attempt: int, command: list[str], nodes: int) -> dict[str, Any]:
    labels = {**selector_labels(manifest), LABEL_ATTEMPT: str(attempt)}
    job_labels = dict(labels)
    if manifest.spec.scheduling.queue:
        job_labels[KUEUE_LABEL] = manifest.spec.scheduling.queue
    pod_annotations = {}
    if manifest.spec.scheduling.gang:
        pod_annotations[VOLCANO_GROUP_ANNOTATION] = manifest.metadata.name
    pod_spec = _pod_spec(manifest, attempt, command)
    if isinstance(manifest, TrainingJob):
        pod_spec["subdomain"] = service_name(manifest.metadata.name)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "labels": job_labels},
        "spec": {
            "completionMode": "Indexed",
            "completions": nodes,
            "parallelism": nodes,
            # The operator, not the Job controller, decides about restarts: one failed rank
            # fails the Job, and the whole gang is replaced by a new attempt.
            "backoffLimit": 0,
            "template": {
                "metadata": {"labels": labels, "annotations": pod_annotations},
                "spec": pod_spec,
            },
        },
    }


def training_job(manifest: TrainingJob, attempt: int) -> dict[str, Any]:
    """One Indexed Job per attempt: completions = parallelism = nodes, every pod one node rank."""
    return _batch_job(
        manifest,
        attempt_job_name(manifest.metadata.name, attempt),
        attempt,
        ["lmforge", "run", f"{CONFIG_DIR}/{CONFIG_KEY}"],
        manifest.spec.resources.nodes,
    )


def prepare_job(manifest: TrainingJob, try_: int) -> dict[str, Any]:
    """The one-pod CPU Job that runs ``lmforge prepare`` before attempt 0 (``spec.data.prepare`` set).

    It reads the same ConfigMap as the attempts, gets the same S3 credentials, image, CPU and memory
    and the same restricted security context, but no GPUs, no rendezvous ports, no /dev/shm and no
    gang scheduling (a one-pod Job must not wait for a PodGroup of ``nodes`` members). Kueue's queue
    label is kept so the Job is admitted under the same quota.
    """
    name = prepare_job_name(manifest.metadata.name, try_)
    labels = {**selector_labels(manifest), LABEL_PREPARE: str(try_)}
    job_labels = dict(labels)
    if manifest.spec.scheduling.queue:
        job_labels[KUEUE_LABEL] = manifest.spec.scheduling.queue
    res = manifest.spec.resources
    pod_spec = _pod_spec(manifest, 0, ["lmforge", "prepare", f"{CONFIG_DIR}/{CONFIG_KEY}"])
    container = pod_spec["containers"][0]
    amounts = {"cpu": res.cpu, "memory": res.memory}
    container["resources"] = {"requests": dict(amounts), "limits": dict(amounts)}
    keep = {"PYTHONUNBUFFERED", *SCRATCH_ENV, "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    container["env"] = [e for e in container["env"] if e["name"] in keep]
    del container["ports"]
    volumes = {"config", SCRATCH_VOLUME}
    container["volumeMounts"] = [m for m in container["volumeMounts"] if m["name"] in volumes]
    pod_spec["volumes"] = [v for v in pod_spec["volumes"] if v["name"] in volumes]
    pod_spec.pop("terminationGracePeriodSeconds", None)
    pod_spec.pop("schedulerName", None)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "labels": job_labels},
        "spec": {
            "completions": 1,
            "parallelism": 1,
            "backoffLimit": 0,  # the operator retries with a new Job, counted against runPolicy.backoffLimit
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    }


SOURCE_MODEL_ENV = "LMFORGE_SOURCE_MODEL_URI"
"""Where `lmforge compress` finds a ``model.trainingJob``'s exported model (resolved by the operator)."""


def compression_job(manifest: CompressionJob, attempt: int, source_model_uri: str | None = None) -> dict[str, Any]:
    """A CompressionJob runs on one node: ``lmforge compress`` on the same manifest contract."""
    job = _batch_job(
        manifest,
        compression_job_name(manifest.metadata.name, attempt),
        attempt,
        ["lmforge", "compress", f"{CONFIG_DIR}/{CONFIG_KEY}"],
        1,
    )
    container = job["spec"]["template"]["spec"]["containers"][0]
    if source_model_uri is not None:
        container["env"].append({"name": SOURCE_MODEL_ENV, "value": source_model_uri})
    # The results table comes back through the termination message (lmforge.termination): the
    # operator has no S3 client to read results.json.
    container["env"].append({"name": TERMINATION_LOG_ENV, "value": TERMINATION_LOG_PATH})
    container["terminationMessagePath"] = TERMINATION_LOG_PATH
    container["terminationMessagePolicy"] = "File"
    return job


def attempt_job(manifest: Manifest, attempt: int, source_model_uri: str | None = None) -> dict[str, Any]:
    if isinstance(manifest, TrainingJob):
        return training_job(manifest, attempt)
    return compression_job(manifest, attempt, source_model_uri)


def attempt_job_name_for(manifest: Manifest, attempt: int) -> str:
    if isinstance(manifest, TrainingJob):
        return attempt_job_name(manifest.metadata.name, attempt)
    return compression_job_name(manifest.metadata.name, attempt)


def static_children(manifest: Manifest, defaults: TrainerDefaults | None = None) -> list[dict[str, Any]]:
    """What exists for the whole life of the job, independent of attempts. The NetworkPolicy comes
    before any pod does, so no pod of the job is ever reachable from outside it."""
    objs = [config_map(manifest)]
    if isinstance(manifest, TrainingJob):
        objs.append(headless_service(manifest))
    policy = network_policy(manifest, (defaults or TrainerDefaults()).network_policy)
    if policy is not None:
        objs.append(policy)
    group = pod_group(manifest)
    if group is not None:
        objs.append(group)
    return objs
