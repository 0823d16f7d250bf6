"""The few Kubernetes API calls the operator makes, as plain dicts over the ``kubernetes`` client.

Kopf watches and patches the lmforge objects itself; this module creates and deletes the
children, writes status from the daemons, and reads pod logs. It uses the client's raw
``call_api`` with JSON in and out: the generated model classes cost more CPU than the whole
reconciliation, and the children are built as dicts anyway (:mod:`children`).

Creation is idempotent: an existing object with the same name is returned, not an error.
"""

from __future__ import annotations

import json
from typing import Any

import kubernetes

from lmforge import API_GROUP, API_VERSION

# apiVersion/kind -> (URL prefix, plural) for everything the operator creates.
_PATHS = {
    ("v1", "ConfigMap"): ("/api/v1", "configmaps"),
    ("v1", "Service"): ("/api/v1", "services"),
    ("v1", "Pod"): ("/api/v1", "pods"),
    ("batch/v1", "Job"): ("/apis/batch/v1", "jobs"),
    ("networking.k8s.io/v1", "NetworkPolicy"): ("/apis/networking.k8s.io/v1", "networkpolicies"),
    ("scheduling.volcano.sh/v1beta1", "PodGroup"): ("/apis/scheduling.volcano.sh/v1beta1", "podgroups"),
    (f"{API_GROUP}/{API_VERSION}", "TrainingJob"): (f"/apis/{API_GROUP}/{API_VERSION}", "trainingjobs"),
    (f"{API_GROUP}/{API_VERSION}", "CompressionJob"): (f"/apis/{API_GROUP}/{API_VERSION}", "compressionjobs"),
}
PLURALS = {kind: plural for (_, kind), (_, plural) in _PATHS.items()}


class ApiError(Exception):
    """An API call failed; ``status`` is the HTTP code (0 when the server was not reached)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


def path_for(api_version: str, kind: str, namespace: str, name: str | None = None, sub: str | None = None) -> str:
    prefix, plural = _PATHS[(api_version, kind)]
    path = f"{prefix}/namespaces/{namespace}/{plural}"
    if name:
        path += f"/{name}"
    if sub:
        path += f"/{sub}"
    return path


class Kube:
    """A thread-safe API handle (the client's connection pool is shared by Kopf's executor threads)."""

    def __init__(self, configuration: kubernetes.client.Configuration) -> None:
        self.configuration = configuration
        self.client = kubernetes.client.ApiClient(configuration)

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        query: list[tuple[str, str]] | None = None,
        content_type: str = "application/json",
        raw: bool = False,
    ) -> Any:
        headers = {"Accept": "application/json", "Content-Type": content_type}
        try:
            response = self.client.call_api(
                path,
                method,
                query_params=query or [],
                header_params=headers,
                body=body,
                auth_settings=["BearerToken"],
                _preload_content=False,
                _return_http_data_only=True,
                _request_timeout=30,
            )
        except kubernetes.client.ApiException as exc:
            raise ApiError(exc.status or 0, (exc.body or exc.reason or "").strip()[:500]) from None
        except OSError as exc:
            raise ApiError(0, str(exc)) from None
        data = response.data
        if raw:
            return data.decode("utf-8", "replace")
        return json.loads(data) if data else None

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self.request("GET", path_for(api_version, kind, namespace, name))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    def ensure(self, obj: dict[str, Any], namespace: str) -> tuple[dict[str, Any], bool]:
        """Create ``obj`` unless one with its name exists: (object, created)."""
        api_version, kind, name = obj["apiVersion"], obj["kind"], obj["metadata"]["name"]
        try:
            return self.request("POST", path_for(api_version, kind, namespace), obj), True
        except ApiError as exc:
            if exc.status != 409:
                raise
        existing = self.get(api_version, kind, namespace, name)
        if existing is None:  # deleted in between: try once more
            return self.request("POST", path_for(api_version, kind, namespace), obj), True
        return existing, False

    def patch(
        self, api_version: str, kind: str, namespace: str, name: str, patch: dict[str, Any], sub: str | None = None
    ) -> dict[str, Any]:
        path = path_for(api_version, kind, namespace, name, sub)
        return self.request("PATCH", path, patch, content_type="application/merge-patch+json")

    def delete(self, api_version: str, kind: str, namespace: str, name: str, grace_seconds: int | None = None) -> bool:
        """Delete with background propagation (pods go with their Job); False when already gone."""
        body: dict[str, Any] = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"}
        if grace_seconds is not None:
            body["gracePeriodSeconds"] = grace_seconds
        try:
            self.request("DELETE", path_for(api_version, kind, namespace, name), body)
            return True
        except ApiError as exc:
            if exc.status == 404:
                return False
            raise

    def pod_log_tail(self, namespace: str, pod: str, lines: int = 20) -> str | None:
        """The last log lines of a pod's trainer container; None when they cannot be read."""
        try:
            text = self.request(
                "GET",
                path_for("v1", "Pod", namespace, pod, "log"),
                query=[("tailLines", str(lines)), ("container", "trainer")],
                raw=True,
            )
        except ApiError:
            return None
        tail = "\n".join(text.splitlines()[-lines:])
        return tail[-4000:] or None
