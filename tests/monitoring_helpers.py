"""Prometheus for the monitoring tests: the chart's rules and dashboard, promtool, and a real server.

Debian's ``prometheus`` package provides ``prometheus`` and ``promtool`` (`.ci/run` installs it).
The server listens on 127.0.0.1 only, on a free port, with its data in a temporary directory.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "lmforge"

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
MISSING = "Prometheus is not installed (Debian: apt-get install -y prometheus; .ci/run does it)"

ALERTS = {
    "LmforgeJobFailed",
    "LmforgeJobStalled",
    "LmforgeRestartsClimbing",
    "LmforgeTokensPerSecondCollapsed",
    "LmforgeCheckpointTooOld",
}
"""The alerts the chart's PrometheusRule must define (the issue's list)."""

# Grafana's variables, as the dashboard would expand them with "All" selected.
GRAFANA_VARIABLES = {
    "$__rate_interval": "30s",
    "$__interval": "5s",
    "$__range": "5m",
    "$namespace": ".*",
    "$job": ".*",
}

_KEYWORDS = {
    "and",
    "or",
    "unless",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "offset",
    "bool",
    "inf",
    "nan",
    "le",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rule_groups(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """spec.groups of the PrometheusRule the chart renders (all alerts on by default)."""
    values = {"prometheusRule": {"enabled": True}, **(values or {})}
    with helm.Chart.load(CHART) as chart:
        text = chart.render(values, name="lmforge", namespace="lmforge-system")["lmforge/templates/prometheusrule.yaml"]
    return yaml.safe_load(text)["spec"]["groups"]


def alert_expressions() -> dict[str, str]:
    return {rule["alert"]: rule["expr"] for group in rule_groups() for rule in group["rules"]}


def dashboard() -> dict[str, Any]:
    return json.loads((CHART / "dashboards" / "lmforge.json").read_text())


def dashboard_queries() -> dict[str, str]:
    """'<panel> / <legend>' -> PromQL with Grafana's variables expanded."""
    queries = {}
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", []):
            queries[f"{panel['title']} / {target['refId']}"] = expand(target["expr"])
    return queries


def dashboard_variable_selectors() -> dict[str, tuple[str, str]]:
    """Variable -> (label, series selector) from label_values(selector, label) queries."""
    out = {}
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] != "query":
            continue
        match = re.fullmatch(r"label_values\((.+), (\w+)\)", variable["query"]["query"])
        assert match, variable["query"]
        out[variable["name"]] = (match[2], expand(match[1]))
    return out


def expand(expr: str) -> str:
    for name, value in sorted(GRAFANA_VARIABLES.items(), key=lambda item: -len(item[0])):
        expr = expr.replace(name, value)
    return expr


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression reads (identifiers that are not functions, labels or keywords)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)  # label lists
    text = re.sub(r"\boffset\s+\w+", "", text)
    names = set()
    for match in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", text):
        following = text[match.end() :].lstrip()
        word = match.group()
        if following.startswith("(") or word in _KEYWORDS:
            continue  # a function call or an operator
        if re.fullmatch(r"\d+[smhdwy]", word) or match.start() > 0 and text[match.start() - 1].isdigit():
            continue
        names.add(word)
    return names


class Prometheus:
    """A real Prometheus on 127.0.0.1 scraping the given targets every second."""

    def __init__(self, directory: Path, jobs: list[dict[str, Any]]) -> None:
        assert PROMETHEUS, MISSING
        self.directory = directory
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "scrape_configs": jobs,
        }
        (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = (directory / "prometheus.log").open("w")
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Prometheus:
        self.process = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={self.directory / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=1h",
                "--log.level=warn",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.logs()
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(0.2)
        raise AssertionError(f"Prometheus did not become ready:\n{self.logs()}")

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.log.close()

    def logs(self) -> str:
        self.log.flush()
        return (self.directory / "prometheus.log").read_text()[-3000:]

    def api(self, path: str, **params: Any) -> Any:
        query = urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as response:
                body = json.load(response)
        except urllib.error.HTTPError as exc:  # 400/422: a bad expression; the body says why
            body = json.load(exc)
        return body

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        body = self.api("query", **params)
        assert body["status"] == "success", f"{expr}: {body.get('errorType')}: {body.get('error')}"
        return body["data"]["result"]

    def metric_names(self) -> set[str]:
        return set(self.api("label/__name__/values")["data"])

    def targets_up(self) -> dict[str, str]:
        active = self.api("targets")["data"]["activeTargets"]
        return {t["scrapePool"]: t["health"] for t in active}
