"""Blocks that TrainingJob and CompressionJob share: where they run and how they are retried."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import model_validator

from lmforge import __version__
from lmforge.api.base import K8sName, Quantity, SpecModel, describe, rule_error

DEFAULT_TRAINER_IMAGE = f"ghcr.io/lmforge/trainer:{__version__}"
"""The operator's trainer image when neither the job (spec.resources.image) nor the operator's
LMFORGE_TRAINER_IMAGE (the Helm chart's trainer.image) names one."""
DEFAULT_PULL_POLICY = "IfNotPresent"

# Keys people paste from AWS examples. Rejected with a pointer to the Secret, never stored.
_INLINE_CREDENTIAL_KEYS = {
    "accesskey",
    "accesskeyid",
    "secretkey",
    "secretaccesskey",
    "sessiontoken",
    "password",
    "token",
    "awsaccesskeyid",
    "awssecretaccesskey",
}


class S3Settings(SpecModel):
    """How to reach S3-compatible storage (AWS S3, MinIO, Ceph RGW, ...)."""

    endpoint: str | None = describe(
        "Endpoint URL of an S3-compatible server, e.g. http://minio.storage:9000. Leave unset for AWS S3.",
        default=None,
        pattern=r"^https?://[^\s/]+(/.*)?$",
    )
    region: str = describe("Region sent with requests.", default="us-east-1", min_length=1)
    addressing_style: Literal["auto", "path", "virtual"] = describe(
        "Bucket addressing: path (MinIO and most self-hosted stores), virtual, or auto.",
        default="auto",
    )
    credentials_secret: K8sName | None = describe(
        "Name of a Secret in the job's namespace with keys AWS_ACCESS_KEY_ID and "
        "AWS_SECRET_ACCESS_KEY. Credentials are only ever taken from a Secret.",
        default=None,
    )

    @model_validator(mode="before")
    @classmethod
    def _refuse_inline_credentials(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in data:
                if isinstance(key, str) and key.replace("_", "").lower() in _INLINE_CREDENTIAL_KEYS:
                    raise rule_error(
                        key,
                        "credentials must not be written in the manifest; put them in a Secret "
                        "(kubectl create secret generic s3-creds --from-literal="
                        "AWS_ACCESS_KEY_ID=... --from-literal=AWS_SECRET_ACCESS_KEY=...) and set "
                        "s3.credentialsSecret: s3-creds",
                    )
        return data


class Toleration(SpecModel):
    """A Kubernetes toleration, copied onto every pod of the job."""

    key: str | None = describe("Taint key the toleration applies to.", default=None)
    operator: Literal["Exists", "Equal"] = describe("Exists or Equal.", default="Equal")
    value: str | None = describe("Taint value to match when operator is Equal.", default=None)
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = describe(
        "Taint effect to match; unset matches all effects.", default=None
    )
    toleration_seconds: int | None = describe(
        "For NoExecute: how long the pod stays bound after the taint appears.",
        default=None,
        ge=0,
    )


class Resources(SpecModel):
    """The pods a job runs on: how many, how big, which image, where."""

    nodes: int = describe("Number of pods (nodes) in the gang.", default=1, ge=1, le=1024)
    gpus_per_node: int = describe("GPUs per pod (nvidia.com/gpu). 0 trains on CPU.", default=0, ge=0, le=16)
    processes_per_node: int | None = describe(
        "Trainer processes per pod. Defaults to gpusPerNode, or 1 on CPU.",
        default=None,
        ge=1,
        le=256,
    )
    cpu: Quantity = describe("CPU request and limit per pod.", default="4")
    memory: Quantity = describe("Memory request and limit per pod.", default="16Gi")
    shared_memory: Quantity = describe(
        "Size of the in-memory /dev/shm volume per pod (data loader workers and NCCL use it).",
        default="2Gi",
    )
    image: str | None = describe(
        "Trainer container image. Unset: the operator's default (the Helm chart's trainer.image, "
        f"else {DEFAULT_TRAINER_IMAGE}). `lmforge run` ignores it.",
        default=None,
        min_length=1,
        max_length=512,
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = describe(
        "Image pull policy of the trainer container. Unset: the operator's default (the Helm chart's "
        "trainer.image.pullPolicy, else IfNotPresent).",
        default=None,
    )
    node_selector: dict[str, str] = describe("Node labels the pods must match.", default_factory=dict)
    tolerations: list[Toleration] = describe(
        "Tolerations for tainted (e.g. GPU) nodes.", default_factory=list, max_length=64
    )
    priority_class_name: K8sName | None = describe("PriorityClass of the pods.", default=None)

    @property
    def processes(self) -> int:
        """Trainer processes per pod after defaulting."""
        if self.processes_per_node is not None:
            return self.processes_per_node
        return self.gpus_per_node or 1

    @property
    def world_size(self) -> int:
        """Total data-parallel processes across the gang."""
        return self.nodes * self.processes

    @model_validator(mode="after")
    def _processes_match_gpus(self) -> Resources:
        if self.gpus_per_node and self.processes_per_node not in (None, self.gpus_per_node):
            raise rule_error(
                "processesPerNode",
                f"with gpusPerNode={self.gpus_per_node} each process drives one GPU, so "
                f"processesPerNode must be {self.gpus_per_node} (or unset)",
            )
        return self


class Scheduling(SpecModel):
    """Hand the gang to a batch scheduler instead of the default one."""

    queue: K8sName | None = describe(
        "Kueue LocalQueue name; set as the kueue.x-k8s.io/queue-name label on the Job.",
        default=None,
    )
    scheduler_name: str | None = describe(
        "Pod schedulerName, e.g. volcano.", default=None, min_length=1, max_length=253
    )
    gang: bool = describe(
        "Volcano gang scheduling: create a PodGroup with minMember = nodes so that all pods "
        "start together or not at all. Requires schedulerName: volcano.",
        default=False,
    )

    @model_validator(mode="after")
    def _gang_needs_volcano(self) -> Scheduling:
        if self.gang and self.scheduler_name != "volcano":
            raise rule_error(
                "schedulerName",
                "gang: true creates a Volcano PodGroup; set schedulerName: volcano (or use a Kueue queue instead)",
            )
        return self


class RunPolicy(SpecModel):
    """When the operator retries, gives up, suspends and cleans up."""

    backoff_limit: int = describe(
        "Gang restarts allowed after retryable failures before the job fails.",
        default=3,
        ge=0,
        le=100,
    )
    active_deadline_seconds: int | None = describe(
        "Wall-clock limit for the whole job; past it the job fails with DeadlineExceeded.",
        default=None,
        ge=1,
    )
    ttl_seconds_after_finished: int | None = describe(
        "Delete the finished job (and its children) this many seconds after it ends.",
        default=None,
        ge=0,
    )
    suspend: bool = describe(
        "true: checkpoint and remove the pods (phase Suspended); false again resumes.",
        default=False,
    )
    stall_timeout_seconds: int = describe(
        "Restart the gang when the training step has not advanced for this long. 0 disables.",
        default=1800,
        ge=0,
    )


class Metrics(SpecModel):
    """The Prometheus endpoint each trainer process serves."""

    port: int = describe(
        "Base port of the metrics endpoint; local rank r serves on port + r.",
        default=9400,
        ge=1024,
        le=65000,
    )
