"""The NetworkPolicy of one job's pods: only the job's own pods reach them, the scrape reaches the metrics ports.

Why per job, created by the operator, and not one policy in the chart: a NetworkPolicy applies to
the pods of its own namespace, and the jobs run in the watched namespaces (every namespace by
default), not in the release namespace; and "only the same job's pods" is a rule about a label
*value* (``lmforge.dev/job=<name>``), which a single label-selector policy cannot express for
every job at once.

The policy selects every pod of the job (attempts, data preparation, compression) and admits

- from the job's own pods: every port. The rendezvous (``MASTER_PORT``, ``MASTER_PORT + 1``)
  is only the start: gloo and NCCL then connect rank to rank on ports they pick themselves, so a
  rule limited to the rendezvous ports would hang the first collective of a multi-node job;
- from the scrapers: the metrics ports (one per local rank, :func:`children.metrics_ports`). The
  Helm chart names them (the operator's own pod, which reads rank 0's progress, and Prometheus)
  in ``LMFORGE_NETWORK_POLICY_METRICS_FROM``; unset (an operator run outside the chart) the
  metrics ports stay open to every source, since such an operator's address is unknown here.

Egress is not restricted: pods need S3, DNS and each other, and the endpoints are the user's.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

NETWORK_POLICY_ENV = "LMFORGE_NETWORK_POLICY"
"""``true`` (default) or ``false``: create a NetworkPolicy per job (Helm value networkPolicy.enabled)."""
METRICS_FROM_ENV = "LMFORGE_NETWORK_POLICY_METRICS_FROM"
"""JSON list of NetworkPolicyPeer objects admitted to the metrics ports (rendered by the chart)."""
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


@dataclass(frozen=True)
class NetworkPolicySettings:
    """What the installation decides about the jobs' NetworkPolicies."""

    enabled: bool = True
    metrics_from: tuple[dict[str, Any], ...] | None = None
    """NetworkPolicyPeers admitted to the metrics ports; None: every source."""


def network_policy_settings_from_env() -> NetworkPolicySettings:
    """The settings from the environment; a bad value stops the operator with a message naming the Helm value."""
    raw = os.environ.get(NETWORK_POLICY_ENV, "").strip().lower()
    if raw and raw not in _TRUE + _FALSE:
        raise SystemExit(f"{NETWORK_POLICY_ENV}={raw!r} is neither true nor false (Helm value networkPolicy.enabled)")
    enabled = raw not in _FALSE
    peers = os.environ.get(METRICS_FROM_ENV, "").strip()
    if not peers:
        return NetworkPolicySettings(enabled=enabled)
    try:
        parsed = json.loads(peers)
    except ValueError as exc:
        raise SystemExit(
            f"{METRICS_FROM_ENV} is not JSON ({exc}); it is rendered from the Helm value networkPolicy.metricsScrapers"
        ) from None
    if not isinstance(parsed, list) or not all(isinstance(p, dict) and p for p in parsed):
        raise SystemExit(
            f"{METRICS_FROM_ENV} must be a JSON list of NetworkPolicyPeer objects (podSelector, "
            "namespaceSelector or ipBlock), e.g. the Helm value networkPolicy.metricsScrapers"
        )
    return NetworkPolicySettings(enabled=enabled, metrics_from=tuple(parsed))


def job_network_policy(
    name: str, labels: dict[str, str], metrics_ports: list[int], settings: NetworkPolicySettings
) -> dict[str, Any] | None:
    """The NetworkPolicy ``name`` over the pods with ``labels`` (None when turned off)."""
    if not settings.enabled:
        return None
    ingress: list[dict[str, Any]] = [{"from": [{"podSelector": {"matchLabels": dict(labels)}}]}]
    if metrics_ports:
        scrape: dict[str, Any] = {"ports": [{"protocol": "TCP", "port": port} for port in metrics_ports]}
        if settings.metrics_from is not None:
            scrape["from"] = [dict(peer) for peer in settings.metrics_from]
        ingress.append(scrape)
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "labels": dict(labels)},
        "spec": {"podSelector": {"matchLabels": dict(labels)}, "policyTypes": ["Ingress"], "ingress": ingress},
    }
