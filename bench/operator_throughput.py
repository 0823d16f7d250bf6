"""Operator throughput: N TrainingJobs created at once against kmock's Kubernetes emulator.

Prints TrainingJobs per second reconciled to their children (ConfigMap, Service and attempt Job
all exist, phase Pending) and the API requests the operator made per TrainingJob. The emulator,
the operator and this client share one Python process (and its GIL), so the figure is a lower
bound for an operator talking to a real API server.

    python bench/operator_throughput.py [--jobs 200] [--poll-interval 1.0]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.operator_helpers import Api, ClusterThread, OperatorThread, training_job  # noqa: E402

NS = "default"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--poll-interval", type=float, default=1.0, help="seconds between supervision steps")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)

    with ClusterThread() as cluster:
        api = Api(cluster.configuration())
        with OperatorThread(cluster.configuration(), namespaces=[NS], poll_interval=args.poll_interval):
            before = cluster.request_count()
            names = [f"bench-{i:05d}" for i in range(args.jobs)]
            started = time.perf_counter()
            with ThreadPoolExecutor(16) as pool:
                list(pool.map(lambda n: api.create_tj(training_job(n)), names))
            created = time.perf_counter() - started

            def reconciled() -> int:
                jobs = {j["metadata"]["name"] for j in api.jobs(NS)}
                cms = {c["metadata"]["name"] for c in api.items(f"/api/v1/namespaces/{NS}/configmaps")}
                svcs = {s["metadata"]["name"] for s in api.items(f"/api/v1/namespaces/{NS}/services")}
                tjs = api.call("GET", api.tj_path(NS))["items"]
                pending = {t["metadata"]["name"] for t in tjs if (t.get("status") or {}).get("phase") == "Pending"}
                return sum(
                    1 for n in names
                    if f"{n}-a0" in jobs and f"{n}-config" in cms and f"{n}-nodes" in svcs and n in pending
                )

            done = 0
            while done < args.jobs and time.perf_counter() - started < 600:
                done = reconciled()
                time.sleep(0.1)
            elapsed = time.perf_counter() - started
            requests = cluster.request_count() - before
    print(f"TrainingJobs: {args.jobs} (created by the client in {created:.2f}s)")
    print(f"reconciled to children: {done} in {elapsed:.2f}s -> {done / elapsed:.1f} TrainingJobs/s")
    print(f"API requests by the operator: {requests} -> {requests / max(done, 1):.1f} per TrainingJob")


if __name__ == "__main__":
    main()
