"""Run the operator: ``run_operator(...)`` for ``lmforge operator``, ``operator(...)`` for embedding.

The API configuration is resolved once (in-cluster service account, else kubeconfig, else what
the caller passes) and shared by Kopf's login and the client that manages the children.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import kopf
import kubernetes

from lmforge.api.bounds import allow_api_nesting
from lmforge.api.common import DEFAULT_PULL_POLICY, DEFAULT_TRAINER_IMAGE
from lmforge.operator import metrics, patch_diff
from lmforge.operator.children import PULL_POLICIES, TrainerDefaults
from lmforge.operator.kube import Kube
from lmforge.operator.network_policy import network_policy_settings_from_env

NAMESPACES_ENV = "LMFORGE_NAMESPACES"
TRAINER_IMAGE_ENV = "LMFORGE_TRAINER_IMAGE"
"""Trainer image for jobs whose spec.resources.image is unset (the Helm chart sets it from trainer.image)."""
TRAINER_PULL_POLICY_ENV = "LMFORGE_TRAINER_IMAGE_PULL_POLICY"


def trainer_defaults_from_env() -> TrainerDefaults:
    """The trainer pods' image defaults and NetworkPolicy settings from the environment; a bad value
    stops the operator with a message."""
    image = os.environ.get(TRAINER_IMAGE_ENV, "").strip() or DEFAULT_TRAINER_IMAGE
    policy = os.environ.get(TRAINER_PULL_POLICY_ENV, "").strip() or DEFAULT_PULL_POLICY
    if policy not in PULL_POLICIES:
        raise SystemExit(
            f"{TRAINER_PULL_POLICY_ENV}={policy!r} is not an image pull policy: use one of "
            f"{', '.join(PULL_POLICIES)} (Helm value trainer.image.pullPolicy)"
        )
    if any(c.isspace() for c in image):
        raise SystemExit(f"{TRAINER_IMAGE_ENV}={image!r} is not an image reference (Helm value trainer.image)")
    return TrainerDefaults(image=image, pull_policy=policy, network_policy=network_policy_settings_from_env())


@dataclass
class OperatorConfig:
    """Operator-wide options; everything has a production default."""

    namespaces: list[str] = field(default_factory=list)
    """Namespaces to watch; empty → ``LMFORGE_NAMESPACES`` (comma-separated) → cluster-wide."""
    metrics_port: int = 0
    """Port of the operator's own /metrics (0: not served)."""
    metrics_addr: str = "0.0.0.0"
    liveness: str | None = None
    """Kopf liveness endpoint URL, e.g. http://0.0.0.0:8080/healthz."""
    peering: bool = False
    """Use Kopf peering (needs the KopfPeering CRD) for several replicas; standalone otherwise."""
    poll_interval: float = 5.0
    """Seconds between supervision steps of one job (reads in-memory indices, not the API)."""
    progress_interval: float = 10.0
    """Seconds between reads of rank 0's metrics endpoint."""
    workers: int = 32
    """Threads for synchronous handlers and API calls."""
    log_lines: int = 20
    """Log lines of a failed rank kept in status.attempts[].logTail."""
    metrics_url: Callable[[dict[str, Any], int], str] | None = None
    """Override of the rank-0 metrics URL (tests; default http://<pod IP>:<port>/metrics)."""
    trainer: TrainerDefaults = field(default_factory=trainer_defaults_from_env)
    """Image and pull policy of trainer pods whose spec leaves them unset (LMFORGE_TRAINER_IMAGE...)."""


def namespaces_from_env() -> list[str]:
    return [ns.strip() for ns in os.environ.get(NAMESPACES_ENV, "").split(",") if ns.strip()]


def load_kube_config() -> kubernetes.client.Configuration:
    """In-cluster service account first, then the kubeconfig (KUBECONFIG or ~/.kube/config)."""
    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))
    config = kubernetes.client.Configuration.get_default_copy()
    config.connection_pool_maxsize = max(config.connection_pool_maxsize or 0, 64)
    return config


async def operator(
    config: OperatorConfig,
    *,
    kube_config: kubernetes.client.Configuration | None = None,
    stop_flag: Any = None,
    ready_flag: Any = None,
) -> None:
    """Run until ``stop_flag`` is set (or a signal, when on the main thread)."""
    from lmforge.operator import handlers  # noqa: F401 - registers the handlers

    allow_api_nesting()  # before any thread starts: parse (and refuse) what the API server stores
    patch_diff.skip_equal_subtrees()  # Kopf's finalizer patches stay linear in a deep body
    kube = Kube(kube_config or load_kube_config())
    # Supervisors run their (blocking) API calls in the default executor: size it like Kopf's.
    asyncio.get_running_loop().set_default_executor(
        concurrent.futures.ThreadPoolExecutor(config.workers, thread_name_prefix="lmforge")
    )
    metrics.serve(config.metrics_port, config.metrics_addr)
    namespaces = config.namespaces or namespaces_from_env()
    await kopf.operator(
        clusterwide=not namespaces,
        namespaces=namespaces,
        standalone=not config.peering,
        liveness_endpoint=config.liveness,
        stop_flag=stop_flag,
        ready_flag=ready_flag,
        memo=kopf.Memo(config=config, kube=kube, wakers={}),
    )


def run_operator(
    namespaces: list[str] | None = None,
    metrics_port: int = 9402,
    liveness: str | None = "http://0.0.0.0:8080/healthz",
    *,
    peering: bool = False,
    poll_interval: float = 5.0,
    progress_interval: float = 10.0,
) -> None:
    """Blocking entry point of ``lmforge operator``."""
    config = OperatorConfig(
        namespaces=list(namespaces or []),
        metrics_port=metrics_port,
        liveness=liveness,
        peering=peering,
        poll_interval=poll_interval,
        progress_interval=progress_interval,
    )
    asyncio.run(operator(config))
