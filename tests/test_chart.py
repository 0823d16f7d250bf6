"""The Helm chart, rendered by the real Helm engine (helm-python-sdk), against the Kubernetes schemas.

Every object of every values set is validated with kubernetes-validate (strict: unknown fields are
errors). Prometheus Operator kinds (monitoring.coreos.com) have no schema there, so their shape is
checked against the subset of the Prometheus Operator CRDs the chart uses. RBAC is compared with
the API calls the real operator makes against the Kubernetes emulator.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.monitoring_helpers import ALERTS

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "lmforge"
RELEASE, NAMESPACE = "lmforge", "lmforge-system"
KUBE_VERSION = "1.30.0"  # the chart's kubeVersion is >=1.27; kind ships 1.30+

ALL_MONITORING = {
    "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
    "podMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
    "prometheusRule": {
        "enabled": True,
        "additionalAlertLabels": {"team": "ml"},
        "additionalRules": [{"alert": "Custom", "expr": "vector(0) > 1", "labels": {"severity": "info"}}],
    },
    "grafanaDashboard": {"enabled": True, "annotations": {"grafana_folder": "lmforge"}},
}
VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "everything-on": {**ALL_MONITORING, "operator": {"peering": {"enabled": True}}},
    "namespaced-everything-on": {
        **ALL_MONITORING,
        "watchNamespaces": ["team-a", "team-b"],
        "operator": {"peering": {"enabled": True}, "extraArgs": ["--poll-interval=10"]},
        "imagePullSecrets": [{"name": "regcred"}],
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ops", "effect": "NoSchedule"}],
        "podAnnotations": {"example.com/a": "b"},
        "commonLabels": {"team": "ml-platform"},
        "image": {"digest": "sha256:" + "a" * 64},
    },
}
MONITORING_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}


@pytest.fixture(scope="module")
def chart() -> Any:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def render(chart: Any, values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every object the chart renders (NOTES.txt left out)."""
    out = chart.render(values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)
    objects = []
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt"):
            continue
        objects += [doc for doc in yaml.safe_load_all(text) if doc]
    return objects


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(objects, kind)
    assert len(found) == 1, f"{kind}: {len(found)} objects"
    return found[0]


# Chart metadata and lint ------------------------------------------------------------------------


def test_chart_versions_follow_lmforge(chart: Any) -> None:
    from lmforge import __version__
    from lmforge.api.common import DEFAULT_TRAINER_IMAGE

    assert chart.metadata["appVersion"] == __version__
    notes = chart.render({}, name=RELEASE, namespace=NAMESPACE)["lmforge/templates/NOTES.txt"]
    assert DEFAULT_TRAINER_IMAGE in notes, "NOTES.txt names the CRD's default trainer image"


@pytest.mark.parametrize("values", list(VALUE_SETS.values()), ids=list(VALUE_SETS))
def test_helm_lint_strict_is_clean(values: dict[str, Any]) -> None:
    report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE, kube_version=f"v{KUBE_VERSION}")
    assert report["errors"] == []
    # Severity 1 is informational (Helm recommends an icon); 2 and 3 are warnings and errors.
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_chart_crds_are_the_generated_ones(chart: Any) -> None:
    from lmforge.api.crd import KIND_DEFINITIONS, render_crd

    chart_crds = {Path(c["filename"]).name: c["data"] for c in chart.crds}
    files = {k.file_name for k in KIND_DEFINITIONS}
    assert set(chart_crds) == files
    for definition in KIND_DEFINITIONS:
        assert (CHART / "crds" / definition.file_name).read_bytes() == (
            REPO / "crds" / definition.file_name
        ).read_bytes()
        assert chart_crds[definition.file_name] == render_crd(definition), "run `lmforge crds`"


def test_defaults_render_no_monitoring_objects(chart: Any) -> None:
    kinds = sorted(o["kind"] for o in render(chart))
    assert kinds == ["ClusterRole", "ClusterRoleBinding", "Deployment", "NetworkPolicy", "Service", "ServiceAccount"]


# Every object against the Kubernetes schemas ----------------------------------------------------

# The subset of the Prometheus Operator CRDs (monitoring.coreos.com/v1) the chart writes; unknown
# keys are errors, as with kubectl's strict field validation.
_STR = {"type": "string"}
_DURATION = {
    "type": "string",
    "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$",
}
_LABELS = {"type": "object", "additionalProperties": _STR}
_RELABEL = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "sourceLabels": {"type": "array", "items": _STR},
        "separator": _STR,
        "targetLabel": _STR,
        "regex": _STR,
        "modulus": {"type": "integer"},
        "replacement": _STR,
        "action": _STR,
    },
}
_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "matchLabels": _LABELS,
        "matchExpressions": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["key", "operator"],
                "additionalProperties": False,
                "properties": {
                    "key": _STR,
                    "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                    "values": {"type": "array", "items": _STR},
                },
            },
        },
    },
}
_NS_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {"any": {"type": "boolean"}, "matchNames": {"type": "array", "items": _STR}},
}
_ENDPOINT = {
    "type": "object",
    "required": ["port"],
    "additionalProperties": False,
    "properties": {
        "port": _STR,
        "path": _STR,
        "interval": _DURATION,
        "scrapeTimeout": _DURATION,
        "honorLabels": {"type": "boolean"},
        "relabelings": {"type": "array", "items": _RELABEL},
        "metricRelabelings": {"type": "array", "items": _RELABEL},
    },
}
# In the PodMonitor CRD the port is optional (prometheus-operator then targets every declared
# container port, which the chart narrows with a keep relabeling).
_POD_ENDPOINT = {**_ENDPOINT, "required": []}
_RULE = {
    "type": "object",
    "required": ["expr"],
    "additionalProperties": False,
    "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
    "properties": {
        "alert": _STR,
        "record": _STR,
        "expr": _STR,
        "for": _DURATION,
        "labels": _LABELS,
        "annotations": _LABELS,
    },
}
_META = {"type": "object", "required": ["name", "namespace", "labels"], "properties": {"labels": _LABELS}}


def _cr(spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": _STR,
            "metadata": _META,
            "spec": spec,
        },
    }


MONITORING_SCHEMAS = {
    "ServiceMonitor": _cr(
        {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": _SELECTOR,
                "namespaceSelector": _NS_SELECTOR,
                "endpoints": {"type": "array", "minItems": 1, "items": _ENDPOINT},
            },
        }
    ),
    "PodMonitor": _cr(
        {
            "type": "object",
            "required": ["selector", "podMetricsEndpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": _SELECTOR,
                "namespaceSelector": _NS_SELECTOR,
                "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": _POD_ENDPOINT},
            },
        }
    ),
    "PrometheusRule": _cr(
        {
            "type": "object",
            "required": ["groups"],
            "additionalProperties": False,
            "properties": {
                "groups": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["name", "rules"],
                        "additionalProperties": False,
                        "properties": {
                            "name": _STR,
                            "interval": _DURATION,
                            "rules": {"type": "array", "minItems": 1, "items": _RULE},
                        },
                    },
                }
            },
        }
    ),
}


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_every_rendered_object_is_valid(chart: Any, name: str) -> None:
    objects = render(chart, VALUE_SETS[name])
    assert objects
    for obj in objects:
        where = f"{obj['kind']} {obj['metadata'].get('name')}"
        if obj["kind"] in MONITORING_KINDS:
            # kubernetes-validate only knows the built-in kinds: check the Prometheus Operator
            # objects against the subset of their CRD schemas written above instead.
            errors = [e.message for e in jsonschema.Draft7Validator(MONITORING_SCHEMAS[obj["kind"]]).iter_errors(obj)]
            assert errors == [], where
        else:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/instance"] == RELEASE, where
        assert labels["app.kubernetes.io/managed-by"] == "Helm", where
        assert labels["app.kubernetes.io/name"] == "lmforge", where
        assert labels["helm.sh/chart"] == "lmforge-0.1.0", where
        if obj["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
            assert obj["metadata"]["namespace"], where


def test_namespace_override_moves_every_namespaced_object(chart: Any) -> None:
    objects = render(chart, {**ALL_MONITORING, "namespaceOverride": "ops"})
    namespaces = {
        o["metadata"].get("namespace") for o in objects if o["kind"] not in ("ClusterRole", "ClusterRoleBinding")
    }
    assert namespaces == {"ops"}
    binding = one(objects, "ClusterRoleBinding")
    assert binding["subjects"][0]["namespace"] == "ops"


# The operator Deployment ------------------------------------------------------------------------


def test_operator_deployment(chart: Any) -> None:
    objects = render(chart)
    deployment = one(objects, "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    assert set(spec["selector"]["matchLabels"].items()) <= set(spec["template"]["metadata"]["labels"].items())
    assert pod["serviceAccountName"] == one(objects, "ServiceAccount")["metadata"]["name"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    (container,) = pod["containers"]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert container["resources"]["requests"] and container["resources"]["limits"]
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"], "a writable /tmp on a read-only root"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    args = container["args"]
    assert f"--liveness=http://0.0.0.0:{ports['health']}/healthz" in args
    assert f"--metrics-port={ports['metrics']}" in args
    assert "--standalone" in args and not any(a.startswith("--namespace") for a in args)
    probe = container["livenessProbe"]["httpGet"]
    assert probe == {"path": "/healthz", "port": "health"}
    # Readiness: the same endpoint, which Kopf serves only once the operator has started.
    assert container["readinessProbe"]["httpGet"] == probe
    assert pod["securityContext"]["runAsUser"] >= 10000 and pod["securityContext"]["runAsGroup"] >= 10000


def test_trainer_image_values_reach_the_operator(chart: Any, monkeypatch: Any) -> None:
    """trainer.image becomes the operator's LMFORGE_TRAINER_IMAGE*, which it reads at startup."""
    from lmforge import __version__
    from lmforge.api.common import DEFAULT_TRAINER_IMAGE
    from lmforge.operator.main import trainer_defaults_from_env

    def env_of(values: dict[str, Any]) -> dict[str, str]:
        container = one(render(chart, values), "Deployment")["spec"]["template"]["spec"]["containers"][0]
        return {e["name"]: e.get("value") for e in container["env"]}

    env = env_of({})
    assert env["LMFORGE_TRAINER_IMAGE"] == f"ghcr.io/lmforge/trainer:{__version__}" == DEFAULT_TRAINER_IMAGE
    assert env["LMFORGE_TRAINER_IMAGE_PULL_POLICY"] == "IfNotPresent"
    env = env_of(
        {
            "trainer": {
                "image": {
                    "registry": "registry.local:5000",
                    "repository": "ml/trainer",
                    "tag": "2.0-cpu",
                    "pullPolicy": "Always",
                }
            }
        }
    )
    assert env["LMFORGE_TRAINER_IMAGE"] == "registry.local:5000/ml/trainer:2.0-cpu"
    for key in ("LMFORGE_TRAINER_IMAGE", "LMFORGE_TRAINER_IMAGE_PULL_POLICY"):
        monkeypatch.setenv(key, env[key])
    defaults = trainer_defaults_from_env()
    assert (defaults.image, defaults.pull_policy) == ("registry.local:5000/ml/trainer:2.0-cpu", "Always")
    assert env_of({"trainer": {"image": {"registry": ""}}})["LMFORGE_TRAINER_IMAGE"] == f"lmforge/trainer:{__version__}"
    digest = "sha256:" + "b" * 64
    pinned = env_of({"trainer": {"image": {"digest": digest, "tag": "ignored"}}})["LMFORGE_TRAINER_IMAGE"]
    assert pinned == f"ghcr.io/lmforge/trainer@{digest}"
    monkeypatch.setenv("LMFORGE_TRAINER_IMAGE", pinned)
    assert trainer_defaults_from_env().image == pinned


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_operator_command_line_is_accepted_by_lmforge_operator(chart: Any, name: str, monkeypatch: Any) -> None:
    """The rendered args parse with the real `lmforge operator` command (its runner is stubbed)."""
    from typer.testing import CliRunner

    import lmforge.operator.main
    from lmforge.cli import app

    calls: list[tuple[Any, ...]] = []
    monkeypatch.setattr(lmforge.operator.main, "run_operator", lambda *a, **k: calls.append((a, k)))
    container = one(render(chart, VALUE_SETS[name]), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    result = CliRunner().invoke(app, ["operator", *container["args"]])
    assert result.exit_code == 0, result.output
    ((args, kwargs),) = calls
    namespaces, metrics_port, liveness = args
    assert namespaces == VALUE_SETS[name].get("watchNamespaces", [])
    assert metrics_port == 9402 and liveness == "http://0.0.0.0:8080/healthz"
    assert kwargs["peering"] is VALUE_SETS[name].get("operator", {}).get("peering", {}).get("enabled", False)


def test_metrics_service_targets_the_operator_metrics_port(chart: Any) -> None:
    objects = render(chart)
    service = one(objects, "Service")
    pod = one(objects, "Deployment")["spec"]["template"]
    assert set(service["spec"]["selector"].items()) <= set(pod["metadata"]["labels"].items())
    (port,) = service["spec"]["ports"]
    assert port["name"] == "metrics" and port["targetPort"] == "metrics"


# RBAC ------------------------------------------------------------------------------------------


def rules_of(objects: list[dict[str, Any]], kind: str, namespace: str | None = None) -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) granted by the roles of that kind (in that namespace)."""
    granted = set()
    for role in by_kind(objects, kind):
        if namespace is not None and role["metadata"]["namespace"] != namespace:
            continue
        for rule in role["rules"]:
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    for verb in rule["verbs"]:
                        granted.add((group, resource, verb))
    return granted


def expand(spec: dict[tuple[str, str], str]) -> set[tuple[str, str, str]]:
    return {(g, r, v) for (g, r), verbs in spec.items() for v in verbs.split()}


# What the operator's code calls (lmforge/operator/kube.py, handlers.py, admission.py, context.py and the
# reconciler's concerns: attempts, preparing, stall, compression) plus Kopf's
# own needs. tests: test_rbac_is_what_the_operator_uses_against_the_emulator checks it against
# the requests the real operator makes.
JOB_RULES = expand(
    {
        ("lmforge.dev", "trainingjobs"): "get list watch patch delete",  # Kopf; delete = TTL; get: a CJ's source
        ("lmforge.dev", "compressionjobs"): "list watch patch delete",
        ("lmforge.dev", "trainingjobs/status"): "patch",
        ("lmforge.dev", "compressionjobs/status"): "patch",
        ("", "configmaps"): "get create patch",  # Kube.ensure (GET after 409), patched on spec change
        ("", "services"): "get create",
        ("batch", "jobs"): "get list watch create delete",  # Kube.ensure, Kopf index, attempt replaced
        ("", "pods"): "list watch",  # Kopf index
        ("", "pods/log"): "get",  # Kube.pod_log_tail
        ("", "events"): "create",  # kopf.warn
        ("networking.k8s.io", "networkpolicies"): "get create",  # Kube.ensure: one per job
        ("scheduling.volcano.sh", "podgroups"): "get create",  # Kube.ensure
    }
)
KOPF_SCANNING = expand({("apiextensions.k8s.io", "customresourcedefinitions"): "list watch"})
NAMESPACE_SCANNING = expand({("", "namespaces"): "list watch"})
PEERING = {"get", "list", "watch", "patch"}


def _no_wildcards(objects: list[dict[str, Any]]) -> None:
    for role in by_kind(objects, "ClusterRole") + by_kind(objects, "Role"):
        for rule in role["rules"]:
            for key in ("apiGroups", "resources", "verbs", "resourceNames", "nonResourceURLs"):
                assert "*" not in rule.get(key, []), f"{role['kind']} {role['metadata']['name']}: {key} has *"


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_rbac_has_no_wildcards(chart: Any, name: str) -> None:
    _no_wildcards(render(chart, VALUE_SETS[name]))


def test_cluster_wide_rbac_is_exactly_what_the_operator_uses(chart: Any) -> None:
    objects = render(chart)
    assert by_kind(objects, "Role") == []
    assert rules_of(objects, "ClusterRole") == JOB_RULES | KOPF_SCANNING
    peering = render(
        chart,
        {
            "operator": {"peering": {"enabled": True}},
            "volcano": {"enabled": False},
            "networkPolicy": {"enabled": False},
            "rbac": {"kopfScanning": False},
        },
    )
    expected = {r for r in JOB_RULES if r[0] not in ("scheduling.volcano.sh", "networking.k8s.io")}
    assert rules_of(peering, "ClusterRole") == expected | {("kopf.dev", "clusterkopfpeerings", v) for v in PEERING}


def test_namespaced_rbac_grants_jobs_only_in_the_watched_namespaces(chart: Any) -> None:
    objects = render(chart, {"watchNamespaces": ["team-a", "team-b"], "operator": {"peering": {"enabled": True}}})
    for ns in ("team-a", "team-b"):
        assert rules_of(objects, "Role", ns) == JOB_RULES | {("kopf.dev", "kopfpeerings", v) for v in PEERING}
        (binding,) = [b for b in by_kind(objects, "RoleBinding") if b["metadata"]["namespace"] == ns]
        assert binding["roleRef"]["name"] == by_kind(objects, "Role")[0]["metadata"]["name"]
        assert binding["subjects"][0]["namespace"] == NAMESPACE
    # Cluster-wide only what Kopf needs to notice CRDs and namespaces: no jobs, pods or config maps.
    assert rules_of(objects, "ClusterRole") == KOPF_SCANNING | NAMESPACE_SCANNING
    strict = render(chart, {"watchNamespaces": ["team-a"], "rbac": {"kopfScanning": False}})
    assert by_kind(strict, "ClusterRole") == [] and by_kind(strict, "ClusterRoleBinding") == []


def test_rbac_can_be_left_to_the_user(chart: Any) -> None:
    objects = render(chart, {"rbac": {"create": False}, "serviceAccount": {"create": False, "name": "mine"}})
    assert {o["kind"] for o in objects} == {"Deployment", "NetworkPolicy", "Service"}
    assert one(objects, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "mine"


_OPERATOR_PATH = re.compile(
    r"^/(?:api/(?P<core>v1)|apis/(?P<group>[^/]+)/(?P<version>[^/]+))"
    r"(?:/namespaces/(?P<ns>[^/]+))?/(?P<resource>[^/]+)(?:/(?P<name>[^/]+))?(?:/(?P<sub>[^/]+))?$"
)


def _permission(method: str, path: str) -> set[tuple[str, str, str]] | None:
    """The RBAC (group, resource, verb) a request needs; None for discovery (non-resource URLs)."""
    match = _OPERATOR_PATH.match(path)
    if match is None:
        return None
    parts = match.groupdict()
    group = "" if parts["core"] else parts["group"]
    resource = parts["resource"] + (f"/{parts['sub']}" if parts["sub"] else "")
    method = method.upper().removeprefix("METHOD.")
    if method == "GET":
        verbs = {"get"} if parts["name"] else {"list", "watch"}  # Kopf lists, then watches
    else:
        verbs = {{"POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}[method]}
    return {(group, resource, verb) for verb in verbs}


@pytest.mark.timeout(120)
def test_rbac_is_what_the_operator_uses_against_the_emulator(chart: Any) -> None:
    """Run the real operator through a job's whole life and compare its requests with the Role.

    Scenario: a gang-scheduled TrainingJob whose first attempt fails (log tail, attempt Job
    deleted, new attempt), succeeds and is deleted by its TTL; a spec change (ConfigMap patch);
    an invalid spec (Event); a CompressionJob to success and TTL.
    """
    sys.path.insert(0, str(REPO))
    from tests.operator_helpers import TEST_AGENT, Api, ClusterThread, Kubelet, OperatorThread, training_job, wait_for

    ns = "team-a"
    with ClusterThread() as cluster:
        api = Api(cluster.configuration())
        kubelet = Kubelet(api)
        api.call("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
        with OperatorThread(cluster.configuration(), namespaces=[ns], poll_interval=0.05, progress_interval=0.05):
            api.create_tj(
                training_job(
                    "rb",
                    ns,
                    scheduling={"schedulerName": "volcano", "gang": True},
                    runPolicy={"ttlSecondsAfterFinished": 1, "backoffLimit": 2},
                )
            )
            job = wait_for(lambda: api.job(ns, "rb-a0"), what="first attempt")
            kubelet.start(job)
            kubelet.terminate(api.job(ns, "rb-a0"), 0, 1)
            job = wait_for(lambda: api.job(ns, "rb-a1"), what="second attempt")
            kubelet.start(job)
            kubelet.succeed(api.job(ns, "rb-a1"))
            wait_for(lambda: api.tj(ns, "rb") is None, what="TTL deletion")

            bad = training_job("bad", ns)
            bad["spec"]["training"]["maxSteps"] = 0
            api.create_tj(bad)
            api.create_tj(training_job("change", ns))
            wait_for(lambda: api.job(ns, "change-a0"), what="change-a0")
            api.patch_tj(ns, "change", {"spec": {"training": {"maxSteps": 200}}})
            wait_for(
                lambda: (
                    "maxSteps: 200" in api.get(f"/api/v1/namespaces/{ns}/configmaps/change-config")["data"]["job.yaml"]
                ),
                what="ConfigMap patched",
            )

            cj = {
                "apiVersion": "lmforge.dev/v1alpha1",
                "kind": "CompressionJob",
                "metadata": {"name": "shrink", "namespace": ns},
                "spec": {
                    "model": {"uri": "s3://runs/base/model"},
                    "steps": [{"quantize": {"method": "int8-dynamic"}}],
                    "output": {"uri": "s3://runs/shrink"},
                    "runPolicy": {"ttlSecondsAfterFinished": 1},
                },
            }
            api.create_tj(cj, kind="compressionjobs")
            job = wait_for(lambda: api.job(ns, "shrink-compress-a0"), what="compression Job")
            kubelet.start(job)
            kubelet.succeed(api.job(ns, "shrink-compress-a0"))
            wait_for(lambda: api.tj(ns, "shrink", "compressionjobs") is None, what="CompressionJob TTL deletion")

            # A CompressionJob of a TrainingJob's model (examples/compress.yaml) reads that job:
            # it waits while the TrainingJob runs, then compresses its model to Succeeded.
            api.create_tj(training_job("base", ns))
            of_job = {**cj, "metadata": {"name": "of-job", "namespace": ns}}
            of_job["spec"] = {**cj["spec"], "model": {"trainingJob": "base"}, "runPolicy": {}}
            api.create_tj(of_job, kind="compressionjobs")
            wait_for(
                lambda: (
                    "waiting for it to succeed"
                    in (((api.tj(ns, "of-job", "compressionjobs") or {}).get("status") or {}).get("message") or "")
                ),
                what="CompressionJob waiting for its TrainingJob",
            )
            job = wait_for(lambda: api.job(ns, "base-a0"), what="base-a0")
            kubelet.start(job)
            kubelet.succeed(api.job(ns, "base-a0"))
            job = wait_for(lambda: api.job(ns, "of-job-compress-a0"), what="compression Job of the TrainingJob")
            env = {e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
            assert env["LMFORGE_SOURCE_MODEL_URI"] == "s3://runs/base/model"
            kubelet.start(job)
            kubelet.succeed(api.job(ns, "of-job-compress-a0"))
            wait_for(
                lambda: ((api.tj(ns, "of-job", "compressionjobs") or {}).get("status") or {}).get("phase") == "Succeeded",
                what="CompressionJob of the TrainingJob Succeeded",
            )
        served = cluster.call(lambda c: list(c.served))

    used: set[tuple[str, str, str]] = set()
    for method, path, agent in served:
        if agent == TEST_AGENT or agent.startswith("kmock"):
            continue
        needed = _permission(str(method), path)
        if needed is not None:
            used |= needed

    objects = render(chart, {"watchNamespaces": [ns]})
    granted = rules_of(objects, "Role", ns) | rules_of(objects, "ClusterRole")
    missing = used - granted
    assert not missing, f"the operator made calls the chart does not allow: {sorted(missing)}"
    # Granted but not seen here: GET after a 409 on create (operator restarted mid-job) for the
    # Job and PodGroup, which this scenario does not provoke.
    not_provoked = {
        ("batch", "jobs", "get"),
        ("scheduling.volcano.sh", "podgroups", "get"),
        ("networking.k8s.io", "networkpolicies", "get"),
    }
    unused = granted - used - not_provoked
    assert not unused, f"the chart grants what the operator never used: {sorted(unused)}"


# NetworkPolicies and the readiness probe ---------------------------------------------------------


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A LabelSelector with matchLabels only (what lmforge and the chart write) against pod labels."""
    assert set(selector) <= {"matchLabels"}, selector
    return set(selector.get("matchLabels", {}).items()) <= set(labels.items())


def admits(policy: dict[str, Any], source: tuple[str, dict[str, str]], port: int | str, policy_ns: str) -> bool:
    """Whether a NetworkPolicy admits a TCP connection from a pod (namespace, labels) to ``port`` of
    a pod it selects (Kubernetes' rules for podSelector / namespaceSelector peers and ports)."""
    namespace, labels = source
    namespace_labels = {"kubernetes.io/metadata.name": namespace}
    for rule in policy["spec"].get("ingress", []):
        if "ports" in rule and not any(p.get("port") == port for p in rule["ports"]):
            continue
        if "from" not in rule:
            return True
        for peer in rule["from"]:
            in_namespace = (
                _selects(peer["namespaceSelector"], namespace_labels)
                if "namespaceSelector" in peer
                else namespace == policy_ns
            )
            if in_namespace and _selects(peer.get("podSelector", {}), labels):
                return True
    return False


def test_job_network_policy_admits_only_the_job_and_the_scrape(chart: Any, monkeypatch: Any) -> None:
    """The chart's networkPolicy values reach the operator (env), whose per-job NetworkPolicy lets
    the job's own pods reach each other on every port, the operator and Prometheus reach only the
    metrics ports, and nobody else in."""
    from lmforge.api.loading import load_one
    from lmforge.operator import children
    from lmforge.operator.main import trainer_defaults_from_env

    objects = render(chart)
    deployment = one(objects, "Deployment")
    env = {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    for key in ("LMFORGE_NETWORK_POLICY", "LMFORGE_NETWORK_POLICY_METRICS_FROM"):
        monkeypatch.setenv(key, env[key])
    defaults = trainer_defaults_from_env()

    manifest, problems = load_one(REPO / "examples" / "quickstart.yaml", kind="TrainingJob")
    assert not problems
    manifest = manifest.model_copy(update={"metadata": manifest.metadata.model_copy(update={"namespace": "team-a"})})
    (policy,) = by_kind(children.static_children(manifest, defaults), "NetworkPolicy")
    kubernetes_validate.validate(policy, KUBE_VERSION, strict=True)
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    attempt = children.training_job(manifest, 1)["spec"]["template"]
    prepare = children.prepare_job(manifest, 0)["spec"]["template"]
    for template in (attempt, prepare):  # every pod of the job is covered
        assert _selects(policy["spec"]["podSelector"], template["metadata"]["labels"])

    own = ("team-a", children.training_job(manifest, 0)["spec"]["template"]["metadata"]["labels"])
    other_job = ("team-a", {**own[1], children.LABEL_JOB: "someone-else"})
    same_name_elsewhere = ("team-b", own[1])
    operator_pod = (NAMESPACE, deployment["spec"]["template"]["metadata"]["labels"])
    prometheus = ("monitoring", {"app.kubernetes.io/name": "prometheus"})
    tenant = ("team-a", {"app": "notebook"})
    metrics = [p["containerPort"] for p in attempt["spec"]["containers"][0]["ports"] if p["name"].startswith("metrics")]
    assert len(metrics) == manifest.spec.resources.processes
    rendezvous = [children.MASTER_PORT, children.MASTER_PORT + 1]
    collective = 40123  # gloo / NCCL pick their own ports between ranks
    for port in rendezvous + [collective] + metrics:
        assert admits(policy, own, port, "team-a"), port
    for port in rendezvous + [collective]:
        for source in (other_job, same_name_elsewhere, operator_pod, prometheus, tenant):
            assert not admits(policy, source, port, "team-a"), (source, port)
    for port in metrics:
        assert admits(policy, operator_pod, port, "team-a") and admits(policy, prometheus, port, "team-a")
        for source in (other_job, same_name_elsewhere, tenant):
            assert not admits(policy, source, port, "team-a"), (source, port)

    # The operator's own pod: its metrics port admits Prometheus only (the kubelet's probes come
    # from the node, which a NetworkPolicy never blocks).
    operator_policy = one(objects, "NetworkPolicy")
    assert _selects(operator_policy["spec"]["podSelector"], operator_pod[1])
    assert admits(operator_policy, prometheus, "metrics", NAMESPACE)
    for source in (tenant, own, (NAMESPACE, {"app": "other"})):
        assert not admits(operator_policy, source, "metrics", NAMESPACE)
        assert not admits(operator_policy, source, "health", NAMESPACE)


def test_network_policy_values(chart: Any, monkeypatch: Any) -> None:
    from lmforge.api.loading import load_one
    from lmforge.operator import children
    from lmforge.operator.main import trainer_defaults_from_env

    manifest, _ = load_one(REPO / "examples" / "compress.yaml", kind="CompressionJob")

    def operator_settings(values: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        objects = render(chart, values)
        container = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e.get("value") for e in container["env"]}
        for key in ("LMFORGE_NETWORK_POLICY", "LMFORGE_NETWORK_POLICY_METRICS_FROM"):
            monkeypatch.delenv(key, raising=False)
            if key in env:
                monkeypatch.setenv(key, env[key])
        job = by_kind(children.static_children(manifest, trainer_defaults_from_env()), "NetworkPolicy")
        return by_kind(objects, "NetworkPolicy"), job

    chart_policies, job_policies = operator_settings({"networkPolicy": {"enabled": False}})
    assert chart_policies == [] and job_policies == []
    scraper = {"ipBlock": {"cidr": "10.1.2.0/24"}}
    (chart_policy,), (job_policy,) = operator_settings({"networkPolicy": {"metricsScrapers": [scraper]}})
    assert chart_policy["spec"]["ingress"][0]["from"] == [scraper]
    assert job_policy["metadata"]["name"] == "gpt-124m-sft-small-compress-ingress"
    assert job_policy["spec"]["ingress"][1]["from"][1:] == [scraper], "after the operator itself"
    (chart_policy,), (job_policy,) = operator_settings({"networkPolicy": {"metricsScrapers": []}})
    assert chart_policy["spec"]["ingress"] == [], "no scraper: nobody reaches the operator's metrics"
    assert len(job_policy["spec"]["ingress"][1]["from"]) == 1, "the operator still reads progress"


@pytest.mark.timeout(60)
def test_readiness_probe_is_served_by_the_operator(chart: Any) -> None:
    """The rendered readiness probe (path, named port) reaches the real operator's health server."""
    import urllib.request

    sys.path.insert(0, str(REPO))
    from tests.operator_helpers import ClusterThread, OperatorThread
    from tests.trainer_helpers import free_port

    container = one(render(chart), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    probe = container["readinessProbe"]["httpGet"]
    (liveness,) = [a.split("=", 1)[1] for a in container["args"] if a.startswith("--liveness=")]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert liveness == f"http://0.0.0.0:{ports[probe['port']]}{probe['path']}"
    port = free_port()  # the same endpoint on a free loopback port
    with ClusterThread() as cluster:
        with OperatorThread(cluster.configuration(), liveness=f"http://127.0.0.1:{port}{probe['path']}"):
            url = f"http://127.0.0.1:{port}{probe['path']}"
            deadline = time.monotonic() + 20
            while True:
                try:
                    with urllib.request.urlopen(url, timeout=5) as response:
                        assert response.status == 200
                        assert "jobs" in json.loads(response.read())  # lmforge's @kopf.on.probe
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)


# Monitoring objects -----------------------------------------------------------------------------


def test_podmonitor_selects_the_pods_the_operator_creates(chart: Any) -> None:
    from lmforge.api.loading import load_one
    from lmforge.operator import children

    manifest, problems = load_one(REPO / "examples" / "quickstart.yaml", kind="TrainingJob")
    assert not problems
    template = children.training_job(manifest, attempt=0)["spec"]["template"]
    labels = template["metadata"]["labels"]
    for name, values in (
        ("everything-on", VALUE_SETS["everything-on"]),
        ("namespaced", VALUE_SETS["namespaced-everything-on"]),
    ):
        monitor = one(render(chart, values), "PodMonitor")["spec"]
        selector = monitor["selector"]
        assert set(selector["matchLabels"].items()) <= set(labels.items()), name
        for expression in selector["matchExpressions"]:
            assert expression["operator"] == "Exists" and expression["key"] in labels, name
        (endpoint,) = monitor["podMetricsEndpoints"]
        # No port: every declared container port is a target; the first relabeling keeps those of
        # the trainer's local ranks (Prometheus anchors the regex: fullmatch).
        assert "port" not in endpoint and "portNumber" not in endpoint
        keep = endpoint["relabelings"][0]
        assert keep["action"] == "keep" and keep["sourceLabels"] == ["__meta_kubernetes_pod_container_port_name"]
        ports = {p["name"]: p["containerPort"] for p in template["spec"]["containers"][0]["ports"]}
        scraped = {n: p for n, p in ports.items() if re.fullmatch(keep["regex"], n)}
        per_pod = manifest.spec.resources.processes
        assert sorted(scraped.values()) == [manifest.spec.metrics.port + r for r in range(per_pod)], "every local rank"
        assert scraped["metrics"] == manifest.spec.metrics.port, "rank 0 keeps the name the Service uses"
        # The trainer's own job/namespace labels must win over Prometheus' target labels.
        assert endpoint["honorLabels"] is True
        attempt = endpoint["relabelings"][1]
        sanitized = "__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", children.LABEL_ATTEMPT)
        assert attempt == {"sourceLabels": [sanitized], "targetLabel": "attempt"}
        gpu = manifest.model_copy(deep=True)
        gpu.spec.resources.gpus_per_node = gpu.spec.resources.processes_per_node = 8
        gpu_ports = children.training_job(gpu, attempt=0)["spec"]["template"]["spec"]["containers"][0]["ports"]
        scraped = {p["containerPort"] for p in gpu_ports if re.fullmatch(keep["regex"], p["name"])}
        base = manifest.spec.metrics.port
        assert scraped == {base + rank for rank in range(8)}, "8 GPUs: 8 ranks, metrics on port + local rank"
        if name == "namespaced":
            assert monitor["namespaceSelector"] == {"matchNames": ["team-a", "team-b"]}
        else:
            assert monitor["namespaceSelector"] == {"any": True}


def test_servicemonitor_selects_the_metrics_service(chart: Any) -> None:
    objects = render(chart, VALUE_SETS["everything-on"])
    monitor = one(objects, "ServiceMonitor")
    service = one(objects, "Service")
    assert set(monitor["spec"]["selector"]["matchLabels"].items()) <= set(service["metadata"]["labels"].items())
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [service["metadata"]["namespace"]]}
    assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_servicemonitor_without_service_fails_clearly(chart: Any) -> None:
    with pytest.raises(helm.HelmError, match="serviceMonitor.enabled needs metrics.service.enabled"):
        render(chart, {"serviceMonitor": {"enabled": True}, "metrics": {"service": {"enabled": False}}})


def test_prometheusrule_has_the_alerts(chart: Any) -> None:
    rule = one(render(chart, VALUE_SETS["everything-on"]), "PrometheusRule")
    groups = rule["spec"]["groups"]
    alerts = {r["alert"]: r for g in groups for r in g["rules"]}
    assert set(alerts) == ALERTS | {"Custom"}
    for name in ALERTS:
        assert alerts[name]["labels"] == {"severity": "warning", "team": "ml"}
        assert alerts[name]["annotations"]["summary"] and alerts[name]["annotations"]["description"]
    assert "lmforge_checkpoint_last_timestamp_seconds" in alerts["LmforgeCheckpointTooOld"]["expr"]
    only = one(
        render(
            chart,
            {
                "prometheusRule": {
                    "enabled": True,
                    "alerts": {"jobFailed": {"enabled": False}, "restartsClimbing": {"threshold": 7, "window": "2h"}},
                }
            },
        ),
        "PrometheusRule",
    )
    alerts = {r["alert"]: r for g in only["spec"]["groups"] for r in g["rules"]}
    assert "LmforgeJobFailed" not in alerts
    assert alerts["LmforgeRestartsClimbing"]["expr"].strip() == "sum(increase(lmforge_operator_restarts_total[2h])) > 7"


def dashboard(chart: Any, values: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    config_map = one(render(chart, values or VALUE_SETS["everything-on"]), "ConfigMap")
    return config_map, json.loads(config_map["data"]["lmforge.json"])


def test_grafana_dashboard_configmap(chart: Any) -> None:
    config_map, board = dashboard(chart)
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["annotations"] == {"grafana_folder": "lmforge"}
    assert board == json.loads((CHART / "dashboards" / "lmforge.json").read_text())
    assert board["uid"] == "lmforge-training" and board["title"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert set(variables) == {"datasource", "namespace", "job"}
    assert variables["job"]["query"]["query"] == 'label_values(lmforge_train_step{namespace=~"$namespace"}, job)'
    panels = [p for p in board["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in board["panels"]}) == len(board["panels"])
    titles = {p["title"] for p in panels}
    for wanted in (
        "Jobs by phase",
        "Progress",
        "Loss",
        "Learning rate",
        "Tokens/s per rank",
        "MFU",
        "Data wait",
        "Samples read/s per rank",
        "S3 errors and retries",
        "Prefetch queue depth",
        "Checkpoint age",
        "Checkpoint duration",
        "Gang restarts",
        "Attempts",
        "Reconcile latency",
    ):
        assert wanted in titles, wanted
    for panel in panels:
        assert panel["targets"] and all(t["expr"] for t in panel["targets"]), panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        for target in panel["targets"]:
            if "lmforge_operator" not in target["expr"] and "$job" not in target["expr"]:
                pytest.fail(f"{panel['title']}: a trainer query that ignores the job variable")
    # Custom sidecar labels replace the default one.
    config_map, _ = dashboard(chart, {"grafanaDashboard": {"enabled": True, "labels": {"dashboards": "lmforge"}}})
    assert config_map["metadata"]["labels"]["dashboards"] == "lmforge"


# values.schema.json -----------------------------------------------------------------------------

BAD_VALUES = [
    ({"replicaCount": 2}, "additional properties 'replicaCount' not allowed"),
    (
        {"image": {"pullPolicy": "Sometimes"}},
        "/image/pullPolicy': value must be one of 'Always', 'IfNotPresent', 'Never'",
    ),
    ({"image": {"digest": "latest"}}, "/image/digest"),
    (
        {"trainer": {"image": {"pullPolicy": "Sometimes"}}},
        "/trainer/image/pullPolicy': value must be one of 'Always', 'IfNotPresent', 'Never'",
    ),
    ({"trainer": {"image": {"tag": "v1 beta"}}}, "/trainer/image/tag'"),
    ({"trainer": {"image": {"digest": "sha256:short"}}}, "/trainer/image/digest'"),
    ({"networkPolicy": {"metricsScrapers": [{"podSelectr": {}}]}}, "additional properties 'podSelectr' not allowed"),
    ({"networkPolicy": {"enabled": "yes"}}, "/networkPolicy/enabled': got string, want boolean"),
    ({"watchNamespaces": ["Team_A"]}, "/watchNamespaces/0': 'Team_A' does not match pattern"),
    ({"watchNamespaces": "team-a"}, "/watchNamespaces': got string, want array"),
    ({"metrics": {"port": 70000}}, "/metrics/port': maximum: got 70,000, want 65,535"),
    ({"serviceMonitor": {"enabled": "yes"}}, "/serviceMonitor/enabled': got string, want boolean"),
    ({"serviceMonitor": {"interval": "30 seconds"}}, "/serviceMonitor/interval'"),
    (
        {"prometheusRule": {"alerts": {"jobStalled": {"window": "half an hour"}}}},
        "/prometheusRule/alerts/jobStalled/window'",
    ),
    (
        {"prometheusRule": {"alerts": {"tokensPerSecondCollapsed": {"ratio": 1.5}}}},
        "/prometheusRule/alerts/tokensPerSecondCollapsed/ratio': exclusiveMaximum",
    ),
    (
        {"prometheusRule": {"alerts": {"jobFailed": {"severity": "page-me"}}}},
        "/prometheusRule/alerts/jobFailed/severity'",
    ),
    ({"operator": {"peering": {"enabeld": True}}}, "additional properties 'enabeld' not allowed"),
    (
        {"grafanaDashboard": {"labels": {"grafana_dashboard": 1}}},
        "/grafanaDashboard/labels/grafana_dashboard': got number, want string",
    ),
]


@pytest.mark.parametrize("values,message", BAD_VALUES, ids=[json.dumps(v) for v, _ in BAD_VALUES])
def test_schema_rejects_bad_values_with_a_clear_message(chart: Any, values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmValuesError) as caught:
        chart.render(values, name=RELEASE, namespace=NAMESPACE)
    assert message in str(caught.value)


def test_every_value_is_documented() -> None:
    """Every key in values.yaml has a comment line right above it, and one in the schema."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    schema = json.loads((CHART / "values.schema.json").read_text())

    def walk(node: dict[str, Any], path: str) -> None:
        for key, sub in node.get("properties", {}).items():
            assert sub.get("description") or sub.get("properties"), f"schema: {path}{key} has no description"
            walk(sub, f"{path}{key}.")

    walk(schema, "")
    # Kubernetes objects passed through verbatim (resources, security contexts, sidecar labels) are
    # documented as a whole on their parent key.
    passthrough = {"resources", "podSecurityContext", "securityContext", "labels"}
    parents: list[tuple[int, str]] = []
    for number, line in enumerate(lines):
        match = re.match(r"^(\s*)([A-Za-z][\w]*):", line)
        if not match:
            continue
        indent = len(match[1])
        parents = [(i, k) for i, k in parents if i < indent]
        inside_passthrough = any(k in passthrough for _, k in parents)
        parents.append((indent, match[2]))
        if inside_passthrough or (number > 0 and lines[number - 1].strip().startswith("#")):
            continue
        # A block heading (its children are documented) is fine; a leaf must have its comment.
        following = lines[number + 1] if number + 1 < len(lines) else ""
        is_block = line.rstrip().endswith(":") and len(following) - len(following.lstrip()) > indent
        assert is_block, f"values.yaml:{number + 1}: `{match[2]}` has no comment"


# Images (built by hack/kind-e2e.sh where Docker exists; only their contract is checked here) ------


def _instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule for one relative path: the last matching pattern wins, ``!``
    re-includes, a pattern matching a parent directory matches everything below it, ``**`` spans
    directories (enough for the patterns lmforge uses)."""
    ignored = False
    parts = path.split("/")
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw[1:] if negate else raw
        regex = re.escape(pattern.strip("/")).replace(r"\*\*/", "(?:.*/)?").replace(r"\*", "[^/]*")
        if any(re.fullmatch(regex, "/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_the_build_context_to_what_the_images_copy() -> None:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    sources = set()
    for dockerfile in (REPO / "operator" / "Dockerfile", REPO / "trainer" / "Dockerfile"):
        for op, arg in _instructions(dockerfile):
            if op == "COPY" and "--from=" not in arg:
                *copied, _ = [a for a in arg.split() if not a.startswith("--")]
                sources.update(copied)
    assert sources == {"pyproject.toml", "README.md", "lmforge", "examples"}
    for source in sources:  # each COPY source, and what is inside it, reaches the build
        assert not _dockerignored(source, patterns), source
        for inner in (REPO / source).rglob("*.py") if (REPO / source).is_dir() else []:
            rel = inner.relative_to(REPO).as_posix()
            assert "__pycache__" in rel or not _dockerignored(rel, patterns), rel
    assert not _dockerignored("examples/data/python-docs.txt", patterns)
    for kept_out in (
        ".git/config",
        ".venv/bin/python",
        "tests/test_chart.py",
        "runs/quickstart/model.safetensors",
        ".benchmarks/x.json",
        "lmforge/__pycache__/cli.cpython-311.pyc",
        "lmforge.egg-info/PKG-INFO",
        ".pytest_cache/v/cache",
        "bench/operator_throughput.py",
        "kubeconfig",
        "charts/lmforge/Chart.yaml",
    ):
        assert _dockerignored(kept_out, patterns), kept_out


def test_operator_image_contract() -> None:
    steps = _instructions(REPO / "operator" / "Dockerfile")
    runs = " ".join(arg for op, arg in steps if op == "RUN")
    assert '".[operator]"' in runs and "trainer" not in runs and "torch==" not in runs
    assert ("USER", "10001:10001") in steps
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["podSecurityContext"]["runAsUser"] == values["podSecurityContext"]["runAsGroup"] == 10001
    assert steps[-1] == ("ENTRYPOINT", '["lmforge", "operator"]')


def test_trainer_image_contract() -> None:
    from lmforge.operator import children

    steps = _instructions(REPO / "trainer" / "Dockerfile")
    assert ("ARG", "VARIANT=cuda") in steps and ("FROM", "base-${VARIANT}") in steps
    assert any(op == "ARG" and arg.startswith("CUDA_IMAGE=nvidia/cuda:") for op, arg in steps)
    assert ("ARG", "CPU_IMAGE=python:3.11-slim") in steps and ("ARG", "TORCH_VERSION=2.13.0") in steps
    runs = " ".join(arg for op, arg in steps if op == "RUN")
    assert '"/src[trainer]"' in runs
    assert ("USER", f"{children.RUN_AS_USER}:{children.RUN_AS_USER}") in steps
    assert children.RUN_AS_USER > 10000
    assert f"--uid {children.RUN_AS_USER} --gid {children.RUN_AS_USER}" in runs
    assert ("ENTRYPOINT", '["lmforge"]') in steps
    # `docker run` gets the scratch paths the operator sets in pods (all under the writable /tmp).
    env = dict(pair.split("=", 1) for op, arg in steps if op == "ENV" for pair in arg.split() if "=" in pair)
    assert {k: env.get(k) for k in children.SCRATCH_ENV} == children.SCRATCH_ENV
