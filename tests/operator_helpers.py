"""A Kubernetes API for operator tests: kmock's emulator with the few server behaviours Kopf needs.

kmock's ``KubernetesEmulator`` stores objects as plain JSON and merges patches. A real API server
also stamps ``uid``, ``resourceVersion``, ``creationTimestamp`` and ``generation`` (Kopf needs the
uid for owner references and the resourceVersion for its own consistency checks), garbage-collects
owned objects when their owner goes, and serves pod logs. :class:`Cluster` adds exactly that.

The emulator runs in its own thread and event loop (Kopf and kmock must not share a loop); the
operator runs in another thread (:class:`OperatorThread`); the test body is plain synchronous code
that plays the Job controller and kubelet through the real ``kubernetes`` client.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import datetime
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp.web
import jsonpatch
import kmock
import kubernetes
import yaml
from kmock._internal import enums, parsing

from lmforge import API_GROUP, API_VERSION

ROOT = Path(__file__).resolve().parent.parent

RESOURCES: dict[str, dict[str, Any]] = {
    "v1/namespaces": {"kind": "Namespace", "namespaced": False},
    "v1/pods": {"kind": "Pod", "namespaced": True, "subresources": ["status", "log"]},
    "v1/services": {"kind": "Service", "namespaced": True},
    "v1/configmaps": {"kind": "ConfigMap", "namespaced": True},
    "v1/secrets": {"kind": "Secret", "namespaced": True},
    "v1/events": {"kind": "Event", "namespaced": True},
    "batch/v1/jobs": {"kind": "Job", "namespaced": True, "subresources": ["status"]},
    "events.k8s.io/v1/events": {"kind": "Event", "namespaced": True},
    "apiextensions.k8s.io/v1/customresourcedefinitions": {"kind": "CustomResourceDefinition", "namespaced": False},
    "networking.k8s.io/v1/networkpolicies": {"kind": "NetworkPolicy", "namespaced": True},
    "scheduling.volcano.sh/v1beta1/podgroups": {"kind": "PodGroup", "namespaced": True},
    f"{API_GROUP}/{API_VERSION}/trainingjobs": {
        "kind": "TrainingJob",
        "namespaced": True,
        "singular": "trainingjob",
        "shortnames": ["tj"],
        "subresources": ["status"],
    },
    f"{API_GROUP}/{API_VERSION}/compressionjobs": {
        "kind": "CompressionJob",
        "namespaced": True,
        "singular": "compressionjob",
        "shortnames": ["cj"],
        "subresources": ["status"],
    },
}
TEST_AGENT = "lmforge-tests"
"""User agent of the test's own client, so that the operator's requests can be counted apart."""
VERBS = ["get", "list", "watch", "create", "patch", "update", "delete"]
API_REQUEST_MAX_BYTES = 3 * 1024 * 1024
"""The API server's request body limit."""


_parse_path = parsing.parse_path


def _parse_namespaces_too(path: str) -> parsing.ParsedPath:
    """kmock 0.8 reads ``/api/v1/namespaces[/name]`` as a namespace prefix and fails; fix that."""
    parts = path.strip("/").split("/")
    if parts[:3] == ["api", "v1", "namespaces"] and len(parts) <= 4:
        return parsing.ParsedPath("", "v1", "namespaces", None, parts[3] if len(parts) == 4 else None, None)
    return _parse_path(path)


parsing.parse_path = _parse_namespaces_too


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


_SERVING: contextvars.ContextVar[Any] = contextvars.ContextVar("lmforge_kmock_request")


class _OnlyTheRequestBeingServed(list):  # type: ignore[type-arg]
    """kmock's request log as its reaction matching sees it: just the request being served.

    kmock decides which reaction serves a request by scanning its whole request log once per
    reaction (``request in reaction``), which costs O(requests) per request: quadratic overall,
    and the emulator's main cost when a hundred jobs are in flight. Each request is served in its
    own asyncio task, so a context variable tells which one is being matched. The log keeps only a
    count (kmock numbers requests by it); :attr:`Cluster.served` is the history tests read.
    """

    count = 0

    def append(self, request: Any) -> None:
        self.count += 1

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[Any]:
        request = _SERVING.get(None)
        return iter(() if request is None else (request,))


class Cluster(kmock.KubernetesEmulator):
    """The emulator plus uid/resourceVersion/generation stamping, owner GC and pod logs."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._version = 0
        self.served: list[tuple[str, str, str]] = []
        """(method, path, user agent) of every request: kmock's own history is trimmed, see _handle."""
        self._requests = _OnlyTheRequestBeingServed()
        self.logs: dict[tuple[str, str], str] = {}
        self.log_requests: list[dict[str, str]] = []
        """Query parameters of every pod log request."""
        for key, info in RESOURCES.items():
            self.resources[key] = kmock.ResourceInfo(verbs=VERBS, **info)

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        """Requests up to the API server's 3 MiB (aiohttp refuses over 1 MiB by default)."""
        raw_request._client_max_size = API_REQUEST_MAX_BYTES
        return await super().__call__(raw_request)

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        self.served.append((str(request.method), str(request.url.path), request.headers.get("User-Agent", "")))
        _SERVING.set(request)  # this request's own task: see _OnlyTheRequestBeingServed
        return await self._handle_tracked(request)

    async def _handle_tracked(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        if request.resource is not None and request.subresource == "log" and request.name:
            return self._serve_log(request)
        self._check_uid_precondition(request)
        if request.resource is not None and request.action in (enums.action.CREATE, enums.action.UPDATE):
            self._stamp(request)
        deleted_uid = None
        if (
            request.resource is not None
            and request.action in (enums.action.DELETE, enums.action.UPDATE)
            and request.name
        ):
            current = self._find(request)
            deleted_uid = (current or {}).get("metadata", {}).get("uid")
        try:
            response = await super()._handle(request)
        except jsonpatch.JsonPatchException as exc:  # a failed "test" op is a conflict, not a crash
            raise kmock.KubernetesError(status=422, reason="Invalid", message=str(exc)) from None
        if deleted_uid and self._find(request) is None:
            await self._collect_garbage(deleted_uid)
        return response

    def _check_uid_precondition(self, request: kmock.Request) -> None:
        """As the API server: a DELETE whose preconditions.uid, or a PATCH whose metadata.uid, is
        not the stored object's uid is refused (409), and the object stays as it is."""
        if request.resource is None or not request.name or not isinstance(request.data, dict):
            return
        if request.action == enums.action.DELETE:
            wanted = (request.data.get("preconditions") or {}).get("uid")
        elif request.action == enums.action.UPDATE:
            wanted = (request.data.get("metadata") or {}).get("uid")
        else:
            return
        current = self._find(request)
        if wanted and current is not None and current.get("metadata", {}).get("uid") != wanted:
            raise kmock.KubernetesError(
                status=409, reason="Conflict", message=f"Precondition failed: UID in precondition: {wanted}"
            )

    def _serve_log(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        """As the API server: the last ``tailLines`` lines, cut after ``limitBytes`` bytes (ASCII
        logs: characters are bytes). Slices only what it sends, so that serving a 10 MiB line
        with a limit costs the emulator no more than the limit."""
        text = self.logs.get((request.namespace or "", request.name or ""), "")
        start = 0
        tail = request.params.get("tailLines", "")
        if tail.isdigit():
            start = len(text)
            end = len(text) - 1 if text.endswith("\n") else len(text)
            for _ in range(int(tail)):
                start = text.rfind("\n", 0, end) + 1
                end = start - 1
                if start == 0:
                    break
        stop = len(text)
        limit = request.params.get("limitBytes", "")
        if limit.isdigit():
            stop = min(stop, start + int(limit))
        self.log_requests.append(dict(request.params))
        return aiohttp.web.Response(body=text[start:stop].encode(), content_type="text/plain")

    def _next_version(self) -> str:
        self._version += 1
        return str(self._version)

    async def _serve_list(self, request: kmock.Request) -> Any:
        """As kmock's, but with the current resourceVersion, from which a watch can continue."""
        async with self._lock:
            version = str(self._version)
        result = await super()._serve_list(request)
        result["metadata"]["resourceVersion"] = version
        return result

    async def _serve_watch(self, request: kmock.Request) -> Any:
        """kmock replays the objects and only then subscribes to changes, losing those in between;
        here the subscription (a bus mark) is taken under the lock, before the replay. As a real
        server, a watch from a resourceVersion replays only what changed after it."""
        yield b""
        assert request.resource is not None
        bus = self._buses[request.resource]
        since = request.params.get("resourceVersion", "")
        since_version = int(since) if since.isdigit() else -1
        async with self._lock:
            mark = await bus.mark()
            events = [
                {"type": "ADDED", "object": obj.raw}
                for (resource, namespace, name), obj in list(self.objects.items())
                if not obj.deleted
                and self._matches(request, resource, namespace, name)
                and int(obj.raw.get("metadata", {}).get("resourceVersion") or 0) > since_version
            ]
        try:
            for event in events:
                yield event
            async for event in bus.stream(since=mark):
                meta = event.get("object", {}).get("metadata", {})
                if self._matches(request, request.resource, meta.get("namespace"), meta.get("name")):
                    yield event
        finally:
            await bus.unmark(mark)

    @staticmethod
    def _matches(request: kmock.Request, resource: Any, namespace: str | None, name: str | None) -> bool:
        return bool(
            resource == request.resource
            and (request.namespace is None or namespace == request.namespace)
            and (request.name is None or name == request.name)
        )

    def _lookup(self, resource: Any, namespace: str | None, name: str | None) -> Any:
        """The stored object by key: kmock scans every object per request, which is O(N) and slow."""
        key = (resource, namespace, name)
        return self.objects[key] if key in self.objects else None

    def _find(self, request: kmock.Request) -> Any:
        obj = self._lookup(request.resource, request.namespace, request.name)
        return None if obj is None or obj.deleted else obj.raw

    async def _serve_fetch(self, request: kmock.Request) -> Any:
        obj = self._lookup(request.resource, request.namespace, request.name)
        if obj is None or obj.deleted:
            raise kmock.KubernetesObjectNotFoundError()
        return obj.raw

    async def _serve_update(self, request: kmock.Request) -> Any:
        return self._lookup(request.resource, request.namespace, request.name).last.raw

    _serve_delete = _serve_update

    async def _serve_create(self, request: kmock.Request) -> Any:
        meta = request.data.get("metadata", {})
        obj = self._lookup(request.resource, request.namespace or meta.get("namespace"), meta.get("name"))
        return obj.raw

    def _stamp(self, request: kmock.Request) -> None:
        data = request.data
        if isinstance(data, list):  # a JSON patch (Kopf's finalizers): bump the version at its end
            data.append({"op": "replace", "path": "/metadata/resourceVersion", "value": self._next_version()})
            return
        if not isinstance(data, dict):
            return
        meta = data.setdefault("metadata", {})
        meta["resourceVersion"] = self._next_version()
        if request.action == enums.action.CREATE:
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", _now())
            meta["generation"] = 1
            if request.namespace:
                meta.setdefault("namespace", request.namespace)
        elif request.subresource is None and "spec" in data:
            current = self._find(request) or {}
            meta["generation"] = current.get("metadata", {}).get("generation", 0) + 1

    async def _collect_garbage(self, owner_uid: str) -> None:
        """Delete what the removed object owned, as the real garbage collector does."""
        doomed = []
        for (resource, namespace, name), obj in list(self.objects.items()):
            if obj.deleted:
                continue
            refs = obj.raw.get("metadata", {}).get("ownerReferences", [])
            if any(ref.get("uid") == owner_uid for ref in refs):
                doomed.append((resource, namespace, name, obj))
        for resource, _namespace, _name, obj in doomed:
            uid = obj.raw.get("metadata", {}).get("uid")
            async with self._lock:
                raw = obj.raw
                obj.delete()
                await self._buses[resource].put({"type": "DELETED", "object": raw})
            if uid:
                await self._collect_garbage(uid)


class ClusterThread:
    """Serves a :class:`Cluster` on 127.0.0.1 from a background thread with its own event loop."""

    def __init__(self, namespaces: tuple[str, ...] = ("default", "other")) -> None:
        self.namespaces = namespaces
        self.cluster: Cluster | None = None
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="kmock", daemon=True)

    def __enter__(self) -> ClusterThread:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the emulator did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        async with Cluster() as cluster, kmock.Server(cluster, host="127.0.0.1") as server:
            self.cluster = cluster
            self.url = f"http://127.0.0.1:{server.port}"
            for ns in self.namespaces:  # Kopf starts watching a namespace only once it exists
                await server.client.post(
                    "/api/v1/namespaces", json={"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}
                )
            self._ready.set()
            await self._stop.wait()

    def call(self, fn: Callable[[Cluster], Any]) -> Any:
        """Run ``fn(cluster)`` on the emulator's loop (its state is not thread-safe)."""
        assert self.cluster is not None

        async def run() -> Any:
            return fn(self.cluster)

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)

    def request_count(self, operator_only: bool = True) -> int:
        """Requests served so far (by default only the operator's: Kopf's and its client's)."""
        return self.call(lambda c: sum(1 for r in c.served if not operator_only or r[2] != TEST_AGENT))

    def set_log(self, namespace: str, pod: str, text: str) -> None:
        self.call(lambda c: c.logs.__setitem__((namespace, pod), text))

    def configuration(self) -> kubernetes.client.Configuration:
        config = kubernetes.client.Configuration()
        config.host = self.url
        config.verify_ssl = False
        config.connection_pool_maxsize = 64
        return config

    def kubeconfig(self, directory: Path) -> Path:
        path = directory / "kubeconfig"
        path.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "kmock", "cluster": {"server": self.url}}],
                    "users": [{"name": "test", "user": {"token": "test"}}],
                    "contexts": [
                        {"name": "kmock", "context": {"cluster": "kmock", "user": "test", "namespace": "default"}}
                    ],
                    "current-context": "kmock",
                }
            )
        )
        return path


class OperatorThread:
    """The real lmforge operator (Kopf) in a thread with its own loop, stopped by a flag."""

    def __init__(self, config: kubernetes.client.Configuration, **options: Any) -> None:
        from lmforge.operator.main import OperatorConfig

        self.config = config
        self.options = OperatorConfig(**options)
        self.stop_flag = threading.Event()
        self.ready_flag = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="kopf", daemon=True)

    def _main(self) -> None:
        from lmforge.operator.main import operator

        try:
            asyncio.run(
                operator(self.options, kube_config=self.config, stop_flag=self.stop_flag, ready_flag=self.ready_flag)
            )
        except BaseException as exc:  # reported by the test through .error
            self.error = exc

    def __enter__(self) -> OperatorThread:
        self._thread.start()
        if not self.ready_flag.wait(30):
            raise RuntimeError(f"the operator did not become ready: {self.error!r}")
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_flag.set()
        self._thread.join(30)
        assert not self._thread.is_alive(), "the operator did not stop"


class Api:
    """The test's view of the cluster through the real kubernetes client, returning plain dicts."""

    def __init__(self, config: kubernetes.client.Configuration) -> None:
        self.client = kubernetes.client.ApiClient(config)
        self.client.user_agent = TEST_AGENT

    def call(self, method: str, path: str, body: Any = None, content_type: str = "application/merge-patch+json") -> Any:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type if method == "PATCH" else "application/json"
        response = self.client.call_api(
            path, method, header_params=headers, body=body, _preload_content=False, _return_http_data_only=True
        )
        data = response.data
        return json.loads(data) if data else None

    def get(self, path: str) -> Any:
        try:
            return self.call("GET", path)
        except kubernetes.client.ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def items(self, path: str, **labels: str) -> list[dict[str, Any]]:
        items = self.call("GET", path)["items"]
        return [i for i in items if all(i["metadata"].get("labels", {}).get(k) == v for k, v in labels.items())]

    # Typed shortcuts -------------------------------------------------------------------------
    def tj_path(self, ns: str, name: str = "", kind: str = "trainingjobs") -> str:
        base = f"/apis/{API_GROUP}/{API_VERSION}/namespaces/{ns}/{kind}"
        return f"{base}/{name}" if name else base

    def create_tj(self, manifest: dict[str, Any], kind: str = "trainingjobs") -> Any:
        ns = manifest["metadata"].get("namespace", "default")
        return self.call("POST", self.tj_path(ns, kind=kind), manifest)

    def tj(self, ns: str, name: str, kind: str = "trainingjobs") -> Any:
        return self.get(self.tj_path(ns, name, kind))

    def patch_tj(self, ns: str, name: str, patch: dict[str, Any], kind: str = "trainingjobs") -> Any:
        return self.call("PATCH", self.tj_path(ns, name, kind), patch)

    def delete_tj(self, ns: str, name: str, kind: str = "trainingjobs") -> Any:
        return self.call("DELETE", self.tj_path(ns, name, kind))

    def jobs(self, ns: str, **labels: str) -> list[dict[str, Any]]:
        return self.items(f"/apis/batch/v1/namespaces/{ns}/jobs", **labels)

    def job(self, ns: str, name: str) -> Any:
        return self.get(f"/apis/batch/v1/namespaces/{ns}/jobs/{name}")

    def pods(self, ns: str, **labels: str) -> list[dict[str, Any]]:
        return self.items(f"/api/v1/namespaces/{ns}/pods", **labels)


def wait_for(predicate: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    """Poll until ``predicate()`` is truthy; its last value in the error otherwise."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value: {last!r}")


class Kubelet:
    """Plays the Job controller and kubelet for an lmforge attempt Job by writing pod and Job status."""

    def __init__(self, api: Api) -> None:
        self.api = api

    def start(self, job: dict[str, Any], pod_ip: str = "127.0.0.1", node: str = "node-1") -> list[str]:
        """Create the Job's pods, Running and ready; the Job becomes active."""
        ns = job["metadata"]["namespace"]
        template = job["spec"]["template"]
        names = []
        for index in range(job["spec"]["completions"]):
            name = f"{job['metadata']['name']}-{index}-x{index}"
            labels = dict(template["metadata"].get("labels", {}))
            labels["batch.kubernetes.io/job-completion-index"] = str(index)
            labels["job-name"] = job["metadata"]["name"]
            pod = {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": name,
                    "namespace": ns,
                    "labels": labels,
                    "annotations": {"batch.kubernetes.io/job-completion-index": str(index)},
                    "ownerReferences": [
                        {
                            "apiVersion": "batch/v1",
                            "kind": "Job",
                            "name": job["metadata"]["name"],
                            "uid": job["metadata"]["uid"],
                            "controller": True,
                        }
                    ],
                },
                "spec": {**template["spec"], "nodeName": node},
                "status": {
                    "phase": "Running",
                    "podIP": pod_ip,
                    "conditions": [{"type": "Ready", "status": "True"}],
                    "containerStatuses": [
                        {"name": "trainer", "ready": True, "state": {"running": {"startedAt": _now()}}}
                    ],
                },
            }
            self.api.call("POST", f"/api/v1/namespaces/{ns}/pods", pod)
            names.append(name)
        self.api.call(
            "PATCH",
            f"/apis/batch/v1/namespaces/{ns}/jobs/{job['metadata']['name']}/status",
            {"status": {"active": len(names), "ready": len(names), "startTime": _now()}},
        )
        return names

    def terminate(
        self,
        job: dict[str, Any],
        index: int,
        exit_code: int,
        reason: str = "Error",
        pod_reason: str | None = None,
        message: str | None = None,
    ) -> None:
        """Pod ``index`` ends with ``exit_code`` (and ``message``, what the kubelet copies from the
        container's terminationMessagePath); non-zero fails the Job (backoffLimit 0)."""
        ns = job["metadata"]["namespace"]
        name = job["metadata"]["name"]
        pod = next(
            p
            for p in self.api.pods(ns, **{"job-name": name})
            if p["metadata"]["labels"]["batch.kubernetes.io/job-completion-index"] == str(index)
        )
        phase = "Succeeded" if exit_code == 0 else "Failed"
        status: dict[str, Any] = {
            "phase": phase,
            "conditions": [{"type": "Ready", "status": "False"}],
            "containerStatuses": [
                {
                    "name": "trainer",
                    "ready": False,
                    "state": {"terminated": {"exitCode": exit_code, "reason": reason, "finishedAt": _now()}},
                }
            ],
        }
        if pod_reason:
            status["reason"] = pod_reason
        if message is not None:
            status["containerStatuses"][0]["state"]["terminated"]["message"] = message
        self.api.call("PATCH", f"/api/v1/namespaces/{ns}/pods/{pod['metadata']['name']}/status", {"status": status})
        if exit_code != 0:
            self.api.call(
                "PATCH",
                f"/apis/batch/v1/namespaces/{ns}/jobs/{name}/status",
                {
                    "status": {
                        "active": 0,
                        "failed": 1,
                        "conditions": [
                            {
                                "type": "Failed",
                                "status": "True",
                                "reason": "BackoffLimitExceeded",
                                "message": "Job has reached the specified backoff limit",
                            }
                        ],
                    }
                },
            )

    def succeed(self, job: dict[str, Any], message: str | None = None) -> None:
        """Every pod exits 0 (with termination ``message``) and the Job completes."""
        ns = job["metadata"]["namespace"]
        for index in range(job["spec"]["completions"]):
            self.terminate(job, index, 0, reason="Completed", message=message)
        self.api.call(
            "PATCH",
            f"/apis/batch/v1/namespaces/{ns}/jobs/{job['metadata']['name']}/status",
            {
                "status": {
                    "active": 0,
                    "succeeded": job["spec"]["completions"],
                    "completionTime": _now(),
                    "conditions": [{"type": "Complete", "status": "True"}],
                }
            },
        )


def training_job(name: str, namespace: str = "default", **spec_overrides: Any) -> dict[str, Any]:
    """A small valid TrainingJob manifest; ``spec_overrides`` are merged into its spec blocks."""
    spec: dict[str, Any] = {
        "model": {"layers": 2, "width": 64, "heads": 4, "contextLength": 64},
        "data": {"sources": ["s3://corpus/text/"]},
        "training": {"maxSteps": 100, "microBatchSize": 2, "precision": "fp32"},
        "output": {"uri": f"s3://runs/{name}"},
        "s3": {"endpoint": "http://minio.storage:9000", "addressingStyle": "path", "credentialsSecret": "s3-creds"},
        "resources": {"nodes": 2, "gpusPerNode": 0, "cpu": "2", "memory": "4Gi"},
        "runPolicy": {"backoffLimit": 2},
    }
    for key, value in spec_overrides.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": "TrainingJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


@contextlib.contextmanager
def kubectl_env(cluster: ClusterThread) -> Iterator[dict[str, str]]:
    """Environment for running kubectl against the emulator (None when kubectl is missing)."""
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, KUBECONFIG=str(cluster.kubeconfig(Path(tmp))), HOME=tmp)
        yield env


def kubectl(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("kubectl")
    assert exe is not None
    return subprocess.run([exe, *args], env=env, capture_output=True, text=True, timeout=60)
