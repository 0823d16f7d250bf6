"""The real operator in a process of its own, so that a test can measure its memory.

``python -m tests.operator_process URL NAMESPACE`` runs the operator against the API at URL (the
emulator of :mod:`tests.operator_helpers`) with fast polling, prints ``READY`` once Kopf is up
and stops on SIGTERM (Kopf's own signal handling: it runs on the main thread here). Its memory
is read from outside, in ``/proc/<pid>/status`` (:func:`memory_kib`).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS (resident now) and VmHWM (peak resident) of process ``pid``, in KiB."""
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


class OperatorProcess:
    """Start the operator in a subprocess against ``url``; stop it (SIGTERM) on exit."""

    def __init__(self, url: str, namespace: str = "default") -> None:
        self.url, self.namespace = url, namespace
        self.process: subprocess.Popen[str] | None = None

    def __enter__(self) -> OperatorProcess:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(ROOT)])))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.operator_process", self.url, self.namespace],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert self.process.stdout is not None
        deadline = time.monotonic() + 60
        seen: list[str] = []
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                break
            seen.append(line)
            if line.strip() == "READY":
                threading.Thread(target=self._drain, daemon=True).start()
                return self
        self.process.kill()
        raise RuntimeError("the operator process did not become ready:\n" + "".join(seen[-40:]))

    def _drain(self) -> None:
        """Keep reading its output (a full pipe would block the operator); keep the last lines."""
        assert self.process is not None and self.process.stdout is not None
        self.output: list[str] = []
        for line in self.process.stdout:
            self.output = [*self.output[-200:], line]

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def memory(self) -> dict[str, int]:
        return memory_kib(self.pid)

    def __exit__(self, *exc: object) -> None:
        assert self.process is not None
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


def main(url: str, namespace: str) -> None:
    import kubernetes

    from lmforge.operator.main import OperatorConfig, operator

    config = kubernetes.client.Configuration()
    config.host = url
    config.verify_ssl = False
    ready = threading.Event()

    def announce() -> None:
        ready.wait()
        print("READY", flush=True)

    threading.Thread(target=announce, daemon=True).start()
    options = OperatorConfig(namespaces=[namespace], poll_interval=0.05, progress_interval=0.05)
    asyncio.run(operator(options, kube_config=config, ready_flag=ready))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
