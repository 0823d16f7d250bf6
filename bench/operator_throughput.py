"""Operator throughput: N TrainingJobs created at once against kmock's Kubernetes emulator.

Prints TrainingJobs per second reconciled to their children (ConfigMap, Service and attempt Job
all exist, phase Pending) and the API requests the operator made per TrainingJob. The emulator,
the operator and this client share one Python process (and its GIL), so the figure is a lower
bound for an operator talking to a real API server.

Completion is checked with one list of TrainingJobs every --check-interval seconds; only once
all of them are Pending are the Jobs, ConfigMaps and Services listed to verify every child (and
the check goes on if one is missing). Listing everything every 0.1 s, as an earlier version did,
spent the shared GIL on the benchmark instead of the operator.

    python bench/operator_throughput.py [--jobs 200] [--poll-interval 1.0]
    python bench/operator_throughput.py --jobs 200 --baseline /tmp/lmforge-before

``--baseline DIR`` first runs the same benchmark (this file, same process settings) against the
lmforge package in DIR (e.g. ``git archive <commit> | tar -x -C DIR``) in a subprocess, then
against this checkout, and prints the ratio: before and after from one invocation and machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NS = "default"


def measure(jobs: int, poll_interval: float, check_interval: float) -> dict[str, float]:
    from tests.operator_helpers import Api, ClusterThread, OperatorThread, training_job

    with ClusterThread() as cluster:
        api = Api(cluster.configuration())
        with OperatorThread(cluster.configuration(), namespaces=[NS], poll_interval=poll_interval):
            before = cluster.request_count()
            names = [f"bench-{i:05d}" for i in range(jobs)]
            started = time.perf_counter()
            with ThreadPoolExecutor(16) as pool:
                list(pool.map(lambda n: api.create_tj(training_job(n)), names))
            created = time.perf_counter() - started

            def pending() -> set[str]:
                tjs = api.call("GET", api.tj_path(NS))["items"]
                return {t["metadata"]["name"] for t in tjs if (t.get("status") or {}).get("phase") == "Pending"}

            def reconciled(ready: set[str]) -> int:
                """How many of the Pending jobs have all three children (Job, ConfigMap, Service)."""
                found = {j["metadata"]["name"] for j in api.jobs(NS)}
                found |= {c["metadata"]["name"] for c in api.items(f"/api/v1/namespaces/{NS}/configmaps")}
                found |= {s["metadata"]["name"] for s in api.items(f"/api/v1/namespaces/{NS}/services")}
                return sum(1 for n in ready if {f"{n}-a0", f"{n}-config", f"{n}-nodes"} <= found)

            done = 0
            while done < jobs and time.perf_counter() - started < 600:
                ready = pending()
                done = reconciled(ready) if len(ready) == jobs else len(ready) - 1
                if done < jobs:
                    time.sleep(check_interval)
            elapsed = time.perf_counter() - started
            requests = cluster.request_count() - before
    return {"jobs": jobs, "created": created, "done": done, "elapsed": elapsed, "requests": requests}


def report(label: str, r: dict[str, float]) -> None:
    done = max(r["done"], 1)
    print(f"{label}TrainingJobs: {r['jobs']} (created by the client in {r['created']:.2f}s)")
    rate = r["done"] / r["elapsed"]
    print(f"{label}reconciled to children: {r['done']} in {r['elapsed']:.2f}s -> {rate:.1f} TrainingJobs/s")
    print(f"{label}API requests by the operator: {r['requests']} -> {r['requests'] / done:.1f} per TrainingJob")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--poll-interval", type=float, default=1.0, help="seconds between supervision steps")
    parser.add_argument("--check-interval", type=float, default=0.2, help="seconds between completion checks")
    parser.add_argument("--baseline", type=Path, help="a checkout of the lmforge to compare with (run first)")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # used for the baseline run
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    if str(ROOT) not in sys.path:  # tests.operator_helpers (the baseline run has it after its lmforge)
        sys.path.insert(0, str(ROOT))

    baseline = None
    if args.baseline is not None:
        env = dict(os.environ, PYTHONPATH=f"{args.baseline.resolve()}:{ROOT}")
        command = [
            sys.executable,
            __file__,
            "--jobs",
            str(args.jobs),
            "--poll-interval",
            str(args.poll_interval),
            "--check-interval",
            str(args.check_interval),
            "--json",
        ]
        out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
        baseline = json.loads(out.strip().splitlines()[-1])
        report(f"baseline ({args.baseline}): ", baseline)

    result = measure(args.jobs, args.poll_interval, args.check_interval)
    if args.json:
        print(json.dumps(result))
        return
    report("", result)
    if baseline is not None:
        speed = (result["done"] / result["elapsed"]) / (baseline["done"] / baseline["elapsed"])
        per_job = (result["requests"] / max(result["done"], 1)) / (baseline["requests"] / max(baseline["done"], 1))
        print(f"ratio vs baseline: {speed:.2f}x TrainingJobs/s, {per_job:.2f}x API requests per TrainingJob")


if __name__ == "__main__":
    main()
