"""The few Kubernetes API calls the operator makes, as plain dicts over the ``kubernetes`` client.

Kopf watches and patches the lmforge objects itself; this module creates and deletes the
children, writes status from the daemons, and reads pod logs. It uses the client's raw
``call_api`` with JSON in and out: the generated model classes cost more CPU than the whole
reconciliation, and the children are built as dicts anyway (:mod:`children`).

Creation is idempotent: an existing object with the same name is returned, not an error, when
the job creating it owns it (:func:`lmforge.operator.ownership.check_existing`; another object
with a child's name is never adopted). Deletions and patches of children carry the uid of the
object the operator checked as its own, so they cannot land on an object that replaced it.

Pod logs are the trainer image's output, which is the user's choice: they are read with the API
server's ``limitBytes`` and a bounded read of the response (:data:`LOG_TAIL_BYTES`).
"""

from __future__ import annotations

import json
from typing import Any

import kubernetes
import urllib3

from lmforge import API_GROUP, API_VERSION
from lmforge.operator.ownership import check_existing

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
LOG_TAIL_BYTES = 64 * 1024
"""Most log bytes read for a failed rank's tail: the status keeps 4000 characters of it, and a pod
that prints a 10 MiB line (or logs without newlines) must not make the operator hold it."""
LOG_TAIL_SHOWN_CHARS = 2000
"""How much of an over-long last line the tail keeps (its start: where an error names itself)."""


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
        """One API call: the decoded JSON (with ``raw``, the text)."""
        data = self.request_bytes(method, path, body, query=query, content_type=content_type)
        if raw:
            return data.decode("utf-8", "replace")
        return json.loads(data) if data else None

    def request_bytes(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        query: list[tuple[str, str]] | None = None,
        content_type: str = "application/json",
        max_bytes: int | None = None,
    ) -> bytes:
        """The response body; with ``max_bytes``, at most that many bytes of it are read (the rest
        is dropped with the connection), whatever the server sends."""
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
            if max_bytes is None:
                return response.data
            try:
                return response.read(max_bytes)
            finally:
                response.close()
                response.release_conn()
        except kubernetes.client.ApiException as exc:
            raise ApiError(exc.status or 0, (exc.body or exc.reason or "").strip()[:500]) from None
        except (OSError, urllib3.exceptions.HTTPError) as exc:  # unreachable, or the body broke off
            raise ApiError(0, str(exc)) from None

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self.request("GET", path_for(api_version, kind, namespace, name))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    def ensure(self, obj: dict[str, Any], namespace: str, owner: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """Create ``obj`` unless one with its name exists: (object, created).

        An existing object is returned only when ``owner`` (the job's body, whose uid ``obj``'s
        owner reference names) controls it; otherwise :class:`~lmforge.operator.ownership.ForeignObject`
        (or ChildLeftover, for an earlier job's child awaiting garbage collection) is raised and
        the object is left as it is.
        """
        api_version, kind, name = obj["apiVersion"], obj["kind"], obj["metadata"]["name"]
        try:
            return self.request("POST", path_for(api_version, kind, namespace), obj), True
        except ApiError as exc:
            if exc.status != 409:
                raise
        existing = self.get(api_version, kind, namespace, name)
        if existing is None:  # deleted in between: try once more
            return self.request("POST", path_for(api_version, kind, namespace), obj), True
        existing.setdefault("kind", kind)
        check_existing(existing, owner)
        return existing, False

    def patch(
        self,
        api_version: str,
        kind: str,
        namespace: str,
        name: str,
        patch: dict[str, Any],
        sub: str | None = None,
        *,
        uid: str | None = None,
    ) -> dict[str, Any]:
        """A JSON merge patch; with ``uid``, only of the object with that uid (the API server
        refuses the patch when the name now holds another object: uid is immutable)."""
        if uid is not None:
            patch = {**patch, "metadata": {**(patch.get("metadata") or {}), "uid": uid}}
        path = path_for(api_version, kind, namespace, name, sub)
        return self.request("PATCH", path, patch, content_type="application/merge-patch+json")

    def delete(
        self,
        api_version: str,
        kind: str,
        namespace: str,
        name: str,
        grace_seconds: int | None = None,
        *,
        uid: str | None = None,
    ) -> bool:
        """Delete with background propagation (pods go with their Job); False when already gone.

        With ``uid``, only the object with that uid (a DeleteOptions precondition): a name that
        now holds another object is left alone (409, reported as False).
        """
        body: dict[str, Any] = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"}
        if grace_seconds is not None:
            body["gracePeriodSeconds"] = grace_seconds
        if uid is not None:
            body["preconditions"] = {"uid": uid}
        try:
            self.request("DELETE", path_for(api_version, kind, namespace, name), body)
            return True
        except ApiError as exc:
            if exc.status == 404 or (uid is not None and exc.status == 409):
                return False
            raise

    def pod_log_tail(self, namespace: str, pod: str, lines: int = 20) -> str | None:
        """The last log lines of a pod's trainer container; None when they cannot be read.

        Bounded twice: ``limitBytes`` asks the API server to stop after :data:`LOG_TAIL_BYTES`,
        and no more than that is read whatever it sends. When the last ``lines`` lines are longer
        than that, the tail says so and holds the start of the last line (where an error names itself).
        """
        path = path_for("v1", "Pod", namespace, pod, "log")

        def read(count: int) -> tuple[str, bool]:
            query = [("tailLines", str(count)), ("container", "trainer"), ("limitBytes", str(LOG_TAIL_BYTES))]
            data = self.request_bytes("GET", path, query=query, max_bytes=LOG_TAIL_BYTES)
            return data.decode("utf-8", "replace"), len(data) >= LOG_TAIL_BYTES

        try:
            text, cut = read(lines)
            if cut:
                last, _ = read(1) if lines > 1 else (text, True)
                return (
                    f"[log cut: the last {lines} line(s) are over {LOG_TAIL_BYTES // 1024} KiB; "
                    f"the start of the last line follows]\n{last[:LOG_TAIL_SHOWN_CHARS]}"
                )
        except ApiError:
            return None
        tail = "\n".join(text.splitlines()[-lines:])
        return tail[-4000:] or None
