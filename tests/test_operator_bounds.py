"""An operator a tenant cannot break: every read of what a pod or a user controls is bounded.

The pod's /metrics body, its log tail, the strings the status copies from the spec and the pods,
and the nesting depth of a spec each have a bound (lmforge.api.bounds, lmforge.operator.progress,
lmforge.operator.kube). Beyond it the job gets a verdict or a message, and the operator's memory
stays far below its limit (the chart's 512Mi): measured on the real operator in its own process.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from lmforge.api import bounds
from lmforge.api.status import Progress, TrainingJobStatus
from lmforge.operator import progress
from lmforge.operator.kube import LOG_TAIL_BYTES, Kube
from tests.operator_helpers import (
    Api,
    ClusterThread,
    Kubelet,
    OperatorThread,
    training_job,
    wait_for,
)
from tests.operator_process import OperatorProcess

NS = "default"
MIB = 1024 * 1024
OPERATOR_LIMIT_KIB = 512 * 1024
"""The chart's memory limit of the operator (values.yaml resources.limits.memory: 512Mi)."""


# A loopback metrics endpoint ---------------------------------------------------------------
def rank0_metrics(step: int, loss: str) -> bytes:
    """What a trainer's rank 0 serves, with ``loss`` as Prometheus writes it (``+Inf``, ``NaN``, ``2.5``)."""
    return (
        "# TYPE lmforge_train_step gauge\n"
        f'lmforge_train_step{{job="j",namespace="default",rank="0"}} {step}\n'
        "# TYPE lmforge_train_loss gauge\n"
        f'lmforge_train_loss{{job="j",namespace="default",rank="0"}} {loss}\n'
        "# TYPE lmforge_eval_loss gauge\n"
        'lmforge_eval_loss{job="j",namespace="default",rank="0"} NaN\n'
        "# TYPE lmforge_learning_rate gauge\n"
        'lmforge_learning_rate{job="j",namespace="default",rank="0"} 0.0003\n'
    ).encode()


@contextlib.contextmanager
def metrics_server(
    body: Callable[[], Iterator[bytes]], length: Callable[[], int | None] = lambda: None
) -> Iterator[int]:
    """Serve ``body()`` (chunks) at http://127.0.0.1:<port>/metrics; yields the port. Without a
    length the body ends when the connection closes, so only a bounded read stops early."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            size = length()
            if size is not None:
                self.send_header("Content-Length", str(size))
            self.end_headers()
            try:
                for chunk in body():
                    self.wfile.write(chunk)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the operator stopped reading: what a bound does
            self.close_connection = True

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def huge_body(total: int = 128 * MIB) -> Callable[[], Iterator[bytes]]:
    """A valid-looking exposition of ``total`` bytes: rank 0's series, then comment lines."""

    def chunks() -> Iterator[bytes]:
        head = rank0_metrics(5, "2.5")
        yield head
        line = b"# " + b"x" * 1021 + b"\n"
        block = line * 64  # 64 KiB
        sent = len(head)
        while sent < total:
            yield block
            sent += len(block)

    return chunks


# Units: progress ---------------------------------------------------------------------------
def test_a_non_finite_loss_is_reported_and_the_step_still_counts() -> None:
    values = progress.parse(rank0_metrics(12, "+Inf").decode())
    assert values["step"] == 12 and values["loss"] == float("inf")
    assert progress.step_of(values) == 12
    block = progress.to_progress(values, None)
    assert block.step == 12 and block.loss is None and block.lr == 0.0003
    assert block.message == "loss is not finite (+Inf); evalLoss is not finite (NaN)"
    assert progress.loss_not_finite(block)
    # The status it goes into is valid JSON for the API server (no Infinity/NaN tokens).
    status = TrainingJobStatus(progress=block).to_manifest()
    assert json.loads(json.dumps(status, allow_nan=False))["progress"]["message"].startswith("loss is not finite")
    nan = progress.to_progress(progress.parse(rank0_metrics(13, "NaN").decode()), None)
    assert nan.message is not None and "loss is not finite (NaN)" in nan.message
    assert progress.to_progress({"step": -1.0, "loss": 2.0}, None).message == "step -1 is not a count"
    assert progress.step_of({"step": float("nan")}) is None
    assert progress.to_checkpoint({"checkpoint_step": float("inf")}, "s3://b/c") is None
    assert progress.to_checkpoint({"checkpoint_step": 4.0, "checkpoint_time": float("inf")}, "s3://b/c").time is None


def test_scrape_reads_a_non_finite_loss_over_http() -> None:
    with metrics_server(lambda: iter([rank0_metrics(7, "+Inf")])) as port:
        read = progress.scrape(f"http://127.0.0.1:{port}/metrics")
    assert read is not None and read.unavailable is None
    assert read.values["step"] == 7 and read.values["loss"] == float("inf")


@pytest.mark.parametrize("declared", [False, True], ids=["streamed", "content-length"])
def test_a_128_mib_metrics_body_is_not_read(declared: bool) -> None:
    total = 128 * MIB
    with metrics_server(huge_body(total), (lambda: total) if declared else (lambda: None)) as port:
        tracemalloc.start()
        started = time.monotonic()
        read = progress.scrape(f"http://127.0.0.1:{port}/metrics")
        elapsed = time.monotonic() - started
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert read is not None and read.values == {}
    assert read.unavailable == "metrics body over 1 MiB (the limit of a scrape)"
    assert peak < 4 * MIB, f"scrape held {peak / MIB:.1f} MiB"
    assert elapsed < 5


def test_a_body_sent_slowly_is_given_up_at_the_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "SCRAPE_DEADLINE_SECONDS", 0.5)

    def drip() -> Iterator[bytes]:
        for _ in range(100):
            time.sleep(0.05)
            yield b"# x\n"

    with metrics_server(drip) as port:
        started = time.monotonic()
        read = progress.scrape(f"http://127.0.0.1:{port}/metrics")
        elapsed = time.monotonic() - started
    assert read is not None and read.unavailable == "metrics body not read within 0.5s (the limit of a scrape)"
    assert elapsed < 2


# Units: spec bounds and status text ----------------------------------------------------------
def nested(depth: int) -> dict[str, Any]:
    value: Any = 0.0003
    for _ in range(depth):
        value = {"a": value}
    return value


@contextlib.contextmanager
def deep_json_allowed() -> Iterator[None]:
    """This test process (client and emulator) must be able to send and store a deep body, as
    the API server does; the operator raises its own limit (lmforge.api.bounds.allow_api_nesting)."""
    limit, stack = sys.getrecursionlimit(), threading.stack_size()
    bounds.allow_api_nesting()
    try:
        yield
    finally:
        sys.setrecursionlimit(limit)
        threading.stack_size(stack)


def test_spec_problems_name_the_field_and_the_bound() -> None:
    spec = training_job("x", training={"optimizer": {"lr": nested(5000)}})["spec"]
    (deep,) = bounds.spec_problems(spec, "TrainingJob default/x")
    assert deep.path.startswith("spec.training.optimizer.lr.a")
    assert f"nested more than {bounds.MAX_SPEC_DEPTH} levels deep" in deep.message
    big = training_job("x", training={"optimizer": {"lr": "9" * MIB}})["spec"]
    (long,) = bounds.spec_problems(big, "TrainingJob default/x")
    assert long.path == "spec.training.optimizer.lr"
    assert f"a string of {MIB} bytes" in long.message and str(bounds.MAX_SPEC_STRING_BYTES) in long.message
    assert bounds.spec_problems(training_job("x")["spec"], "x") == []


def test_status_text_is_cut_with_a_marker_and_cutting_again_changes_nothing() -> None:
    text = "e" * MIB
    cut = bounds.cut_message(text)
    assert cut is not None and len(cut) <= bounds.MAX_MESSAGE_CHARS and "[cut:" in cut
    assert bounds.cut_message(cut) == cut
    status = TrainingJobStatus(message=text, progress=Progress(message=text))
    status.message = text  # assigned after validation, as the operator's helpers do
    written = json.dumps(status.to_manifest())
    assert len(written) < 3 * bounds.MAX_MESSAGE_CHARS
    assert TrainingJobStatus.model_validate(status.to_manifest()).to_manifest() == status.to_manifest()


# Units: log tails ----------------------------------------------------------------------------
def noisy_log() -> Iterator[bytes]:
    """A pod log whose last line is 10 MiB long, streamed in 64 KiB chunks."""
    yield b"step 1\n"
    block = b"x" * (64 * 1024)
    for _ in range(160):
        yield block
    yield b"\nRuntimeError: boom\n"


def test_a_10_mib_log_line_is_not_read_whole() -> None:
    """limitBytes asks the API server to stop; a server that sends everything anyway (here a
    loopback server) is read no further than the bound."""
    with metrics_server(noisy_log) as port:  # answers any path, ignoring every query parameter
        config = ClusterThread().configuration()
        config.host = f"http://127.0.0.1:{port}"
        tracemalloc.start()
        tail = Kube(config).pod_log_tail(NS, "noisy", 20)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert tail is not None and tail.startswith("[log cut: the last 20 line(s) are over 64 KiB")
    assert len(tail) < 2200
    assert peak < 4 * MIB, f"the log tail held {peak / MIB:.1f} MiB"


def test_log_tails_ask_the_api_server_for_a_bounded_tail() -> None:
    with ClusterThread() as cluster:
        cluster.set_log(NS, "noisy", "step 1\n" + "x" * (10 * MIB) + "\nRuntimeError: boom\n")
        cluster.set_log(NS, "calm", "step 1\nstep 2\nRuntimeError: NCCL timeout\n")
        kube = Kube(cluster.configuration())
        tail = kube.pod_log_tail(NS, "noisy", 20)
        assert kube.pod_log_tail(NS, "calm", 2) == "step 2\nRuntimeError: NCCL timeout"
        asked = cluster.call(lambda c: list(c.log_requests))
    assert tail is not None and tail.startswith("[log cut: the last 20 line(s) are over 64 KiB")
    assert [params["limitBytes"] for params in asked] == [str(LOG_TAIL_BYTES)] * 3
    assert [params["tailLines"] for params in asked] == ["20", "1", "2"]


# The operator: real Kopf against the emulator ------------------------------------------------
def status_of(api: Api, name: str) -> dict[str, Any]:
    return (api.tj(NS, name) or {}).get("status") or {}


def conditions(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in status.get("conditions", [])}


def test_a_tenant_cannot_break_the_operator(capsys: pytest.CaptureFixture[str]) -> None:
    """A 128 MiB metrics body, a 10 MiB log line, a spec nested 5000 levels deep and a 1 MiB
    string in spec.training.optimizer.lr (preserve-unknown): each job gets a verdict or a
    message, a well-behaved job next to them still runs, and the operator process grows by far
    less than its 512Mi limit."""
    total = 128 * MIB
    with deep_json_allowed(), ClusterThread() as cluster, metrics_server(huge_body(total)) as port:
        api = Api(cluster.configuration())
        kubelet = Kubelet(api)
        with OperatorProcess(cluster.url, NS) as operator:
            api.create_tj(training_job("calm"))
            wait_for(lambda: api.job(NS, "calm-a0"), what="the well-behaved job's attempt")
            before = operator.memory()

            api.create_tj(training_job("flood", metrics={"port": port}, runPolicy={"backoffLimit": 0}))
            flood = wait_for(lambda: api.job(NS, "flood-a0"), what="flood-a0")
            kubelet.start(flood)
            unavailable = wait_for(
                lambda: (status_of(api, "flood").get("progress") or {}).get("message"), 30, "progress message"
            )
            assert unavailable == "progress unavailable: metrics body over 1 MiB (the limit of a scrape)"
            time.sleep(1)  # twenty scrapes of the 128 MiB body
            assert status_of(api, "flood")["phase"] == "Running"
            cluster.set_log(NS, "flood-a0-0-x0", "step 1\n" + "x" * (10 * MIB) + "\nRuntimeError: boom\n")
            kubelet.terminate(flood, 0, 1)
            failed = wait_for(lambda: status_of(api, "flood").get("phase") == "Failed" and status_of(api, "flood"), 30)
            tail = failed["attempts"][0]["logTail"]
            assert tail.startswith("[log cut: the last 20 line(s) are over 64 KiB") and len(tail) <= 4000

            api.create_tj(training_job("deep", training={"optimizer": {"lr": nested(5000)}}))
            api.create_tj(training_job("huge", training={"optimizer": {"lr": "9" * MIB}}))
            for name in ("deep", "huge"):
                status = wait_for(lambda n=name: status_of(api, n).get("phase") == "Failed" and status_of(api, n), 30)
                invalid = conditions(status)["InvalidSpec"]
                assert invalid["status"] == "True" and "spec.training.optimizer.lr" in invalid["message"]
                assert len(json.dumps(status)) < 16 * 1024, f"{name}: the status copies the value"
            assert "nested more than 32 levels deep" in conditions(status_of(api, "deep"))["InvalidSpec"]["message"]
            assert f"a string of {MIB} bytes" in conditions(status_of(api, "huge"))["InvalidSpec"]["message"]
            assert api.job(NS, "deep-a0") is None and api.job(NS, "huge-a0") is None

            # The operator still serves the well-behaved job: it runs and succeeds.
            kubelet.start(api.job(NS, "calm-a0"))
            kubelet.succeed(api.job(NS, "calm-a0"))
            wait_for(lambda: status_of(api, "calm").get("phase") == "Succeeded", 30, what="calm Succeeded")
            after = operator.memory()
            assert operator.process is not None and operator.process.poll() is None, "the operator is up"
    growth = after["VmHWM"] - before["VmRSS"]
    with capsys.disabled():
        print(
            f"\noperator memory: {before['VmRSS'] / 1024:.0f} MiB resident before, peak {after['VmHWM'] / 1024:.0f} MiB, "
            f"growth {growth / 1024:.0f} MiB (limit {OPERATOR_LIMIT_KIB // 1024} MiB)"
        )
    assert growth < 64 * 1024, f"the operator grew by {growth / 1024:.0f} MiB"
    assert after["VmHWM"] < OPERATOR_LIMIT_KIB // 2


def test_an_infinite_loss_is_reported_and_does_not_stall_a_gang(tmp_path: Any) -> None:
    """A real scrape of +Inf/NaN losses while the step advances: no Stalled, no restart, the
    status says the loss is not finite, one LossNotFinite event. Once the step stops, the stall
    clock (which the scrape kept fed) does restart the gang."""
    state = {"step": 1}

    def body() -> Iterator[bytes]:
        yield rank0_metrics(state["step"], "+Inf")

    with ClusterThread() as cluster, metrics_server(body) as port:
        api = Api(cluster.configuration())
        kubelet = Kubelet(api)
        fast = {"poll_interval": 0.05, "progress_interval": 0.05}
        with OperatorThread(cluster.configuration(), namespaces=[NS], **fast):
            api.create_tj(training_job("diverged", metrics={"port": port}, runPolicy={"stallTimeoutSeconds": 1}))
            kubelet.start(wait_for(lambda: api.job(NS, "diverged-a0"), what="diverged-a0"))
            for step in range(2, 9):  # 2.8 s: almost three stall timeouts, the step advancing
                time.sleep(0.4)
                state["step"] = step
            status = status_of(api, "diverged")
            assert status["phase"] == "Running" and status["restarts"] == 0, status.get("message")
            assert api.job(NS, "diverged-a1") is None
            shown = wait_for(lambda: status_of(api, "diverged").get("progress") or {}, what="progress")
            assert shown["step"] >= 7 and "loss" not in shown
            assert shown["message"] == "loss is not finite (+Inf); evalLoss is not finite (NaN)"
            events = [e for e in api.items(f"/api/v1/namespaces/{NS}/events") if e["reason"] == "LossNotFinite"]
            assert len(events) == 1 and "the training diverged" in events[0]["message"]
            # The step stops: now it is a stall.
            wait_for(lambda: api.job(NS, "diverged-a1"), 10, "the stalled gang replaced")
            assert status_of(api, "diverged")["attempts"][0]["reason"] == "Stalled"


def test_kopfs_finalizer_patch_of_a_deep_body_is_the_same_and_linear() -> None:
    """jsonpatch's diff (Kopf's finalizer patches) descends equal subtrees with a path per level:
    quadratic on a deep spec. With equal subtrees skipped, the patch is unchanged."""
    import copy

    import jsonpatch

    from lmforge.operator import patch_diff

    with deep_json_allowed():
        body = {"metadata": {"name": "x", "n": 1}, "spec": {"training": {"optimizer": {"lr": nested(3000)}}}}
        wanted = copy.deepcopy(body)
        wanted["metadata"]["finalizers"] = ["kopf.zalando.org/KopfFinalizerMarker"]
        wanted["metadata"]["n"] = 1.0  # a change only the type shows: still a change
        before = jsonpatch.JsonPatch.from_diff(body, wanted).patch
        patch_diff.skip_equal_subtrees()
        tracemalloc.start()
        after = jsonpatch.JsonPatch.from_diff(body, wanted).patch
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert after == before and len(after) == 2
    assert peak < 2 * MIB, f"the diff held {peak / MIB:.1f} MiB"
    assert not patch_diff.json_equal({"a": [1, True]}, {"a": [1, 1]})
    assert patch_diff.json_equal({"a": [1, {"b": None}]}, {"a": [1, {"b": None}]})
