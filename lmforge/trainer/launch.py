"""`lmforge run`: start the world of trainer processes, locally or inside a pod.

Locally the world is one node with ``--processes`` processes on 127.0.0.1. In a pod the operator
sets MASTER_ADDR, MASTER_PORT, NNODES, NODE_RANK and NPROC_PER_NODE; every node runs the same
command. Before torch's elastic launcher starts the workers, the nodes meet at a rendezvous gate
on MASTER_ADDR:MASTER_PORT with a bounded timeout (LMFORGE_RENDEZVOUS_TIMEOUT, default 600 s),
so a node that never comes up produces an error naming it instead of a silent hang. The elastic
rendezvous itself uses MASTER_PORT + 1.

Exit codes (see :mod:`lmforge.exitcodes`): 0 done; 3 quality gate failed (continual.maxForgetting:
the model and reports are written; never retried); 78 invalid spec (never retried); 75 retryable
fault (rendezvous timeout, lost peer, storage outage, unexpected error); 143 stopped by SIGTERM
after saving a checkpoint; a worker's own exit code (or 128 + its signal) when it failed otherwise.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import sys
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import TCPStore
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from lmforge import exitcodes
from lmforge.api.manifest import TrainingJob
from lmforge.data.other_job_data import UnusablePreparedData
from lmforge.data.safe_paths import UnsafeName
from lmforge.trainer.loop import find_lr, train
from lmforge.trainer.world import InvalidForThisRun


class RendezvousTimeout(Exception):
    """Some nodes never reached the rendezvous gate."""

    def __init__(self, missing: list[int], endpoint: str, timeout: float) -> None:
        self.missing = missing
        names = ", ".join(str(r) for r in missing)
        super().__init__(
            f"rendezvous timed out after {timeout:.0f}s at {endpoint}: node rank(s) {names} never arrived. "
            "Check that those pods are scheduled and can reach MASTER_ADDR (see kubectl get pods -o wide)."
        )


@dataclass(frozen=True)
class WorldPlan:
    nnodes: int
    node_rank: int
    nproc_per_node: int
    master_addr: str
    master_port: int

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_taken(port: int) -> bool:
    """Whether another process already listens on ``port`` on this host (any interface)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as torch's store does: TIME_WAIT is fine
        try:
            sock.bind(("", port))
        except OSError:
            return True
    return False


def plan_world(processes: int | None, default_processes: int) -> WorldPlan:
    """From the pod environment when NNODES is set, else a local single-node world."""
    env = os.environ
    if "NNODES" in env:
        return WorldPlan(
            nnodes=int(env["NNODES"]),
            node_rank=int(env.get("NODE_RANK", 0)),
            nproc_per_node=int(env.get("NPROC_PER_NODE", processes or default_processes)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
        )
    return WorldPlan(1, 0, processes or default_processes, "127.0.0.1", free_port())


def rendezvous_gate(plan: WorldPlan, timeout: float) -> Any:
    """Wait until every node has arrived; raise :class:`RendezvousTimeout` naming the missing ones.

    Returns the store, which node 0 must keep alive while the others may still be reading it.
    """
    endpoint = f"{plan.master_addr}:{plan.master_port}"
    deadline = time.monotonic() + timeout
    try:
        store = TCPStore(
            plan.master_addr,
            plan.master_port,
            is_master=plan.node_rank == 0,
            timeout=datetime.timedelta(seconds=max(1.0, timeout)),
            wait_for_workers=False,
        )
    except (RuntimeError, OSError) as exc:  # node 0 never opened the store
        raise RendezvousTimeout([0], endpoint, timeout) from exc
    store.set(f"lmforge/arrived/{plan.node_rank}", "1")
    keys = [f"lmforge/arrived/{rank}" for rank in range(plan.nnodes)]
    while time.monotonic() < deadline:
        if all(store.check([key]) for key in keys):
            return store
        time.sleep(0.2)
    missing = [rank for rank, key in enumerate(keys) if not store.check([key])]
    raise RendezvousTimeout(missing, endpoint, timeout)


@dataclass
class RunOutcome:
    exit_code: int
    result: dict[str, Any] | None = None
    message: str | None = None


def _leave_world() -> None:
    """Tear the process group down after the final barrier: at ZeRO 3 a rank that exits with the group
    still up can abort in gloo's destructor and turn a finished run into a failed one."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def worker_main(manifest_json: str, threads: int | None, mode: str = "train") -> dict[str, Any] | None:
    """Entry point of every trainer process (spawned by torch's elastic agent)."""
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # torch.distributed deprecation notices from inside DeepSpeed, once per collective call site.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed.*")
    manifest = TrainingJob.model_validate_json(manifest_json)
    try:
        if mode == "lr-find":
            suggestion = find_lr(manifest, threads=threads)
            _leave_world()
            return {"suggestion": suggestion} if int(os.environ.get("RANK", 0)) == 0 else None
        result = train(manifest, threads=threads)
    except (InvalidForThisRun, UnusablePreparedData, UnsafeName) as exc:
        print(f"error: invalid spec: {exc}", file=sys.stderr, flush=True)
        sys.exit(exitcodes.INVALID_SPEC)
    except SystemExit:
        raise
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        sys.exit(exitcodes.RETRYABLE)
    _leave_world()
    if int(os.environ.get("RANK", 0)) == 0:
        return asdict(result)
    return {"quality_gate": result.quality_gate} if result.quality_gate else None  # so every node exits 3


def launch(
    manifest: TrainingJob, *, processes: int | None = None, threads: int | None = None, mode: str = "train"
) -> RunOutcome:
    """Run the manifest's training on this node; returns the exit code for the process."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    spec = manifest.spec
    plan = plan_world(processes, spec.resources.processes)
    try:
        spec.check_world_size(plan.world_size, origin="--processes / NPROC_PER_NODE x NNODES")
    except Exception as exc:
        return RunOutcome(exitcodes.INVALID_SPEC, message=f"invalid spec: {exc}")
    if threads is None and os.environ.get("DS_ACCELERATOR") == "cpu":
        threads = max(1, (os.cpu_count() or 1) // plan.nproc_per_node)

    store = None
    rdzv_port = plan.master_port
    if plan.nnodes > 1:
        if plan.node_rank == 0 and port_taken(plan.master_port + 1):
            return RunOutcome(
                exitcodes.RETRYABLE,
                message=(
                    f"port {plan.master_port + 1} (MASTER_PORT + 1, used by the workers' rendezvous) is already in use "
                    "on node 0; pick a MASTER_PORT whose next port is free too"
                ),
            )
        timeout = float(os.environ.get("LMFORGE_RENDEZVOUS_TIMEOUT", 600))
        try:
            store = rendezvous_gate(plan, timeout)
        except RendezvousTimeout as exc:
            return RunOutcome(exitcodes.RETRYABLE, message=str(exc))
        rdzv_port = plan.master_port + 1

    # shutdown_timeout (how long a failed gang's survivors get to exit) is torch >= 2.12's; older
    # torch (GPU images pin their own) waits its fixed default instead.
    shutdown = (
        {"shutdown_timeout": int(os.environ.get("LMFORGE_SHUTDOWN_TIMEOUT", 600))}
        if "shutdown_timeout" in {f.name for f in fields(LaunchConfig)}
        else {}
    )
    config = LaunchConfig(
        min_nodes=plan.nnodes,
        max_nodes=plan.nnodes,
        nproc_per_node=plan.nproc_per_node,
        run_id=f"{manifest.metadata.name}",
        rdzv_backend="static",
        rdzv_endpoint=f"{plan.master_addr}:{rdzv_port}",
        rdzv_configs={"rank": plan.node_rank, "timeout": int(os.environ.get("LMFORGE_RENDEZVOUS_TIMEOUT", 600))},
        max_restarts=0,
        monitor_interval=0.5,
        start_method="spawn",
        **shutdown,
    )
    # Workers report their own failures (the error for 78, a traceback for 75); torch's logged
    # ProcessExitedException traceback for a deliberate exit code would only bury that message.
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    try:
        results = elastic_launch(config, worker_main)(manifest.model_dump_json(by_alias=True), threads, mode)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()  # (global rank, ProcessFailure: it has no rank of its own)
        code = failure.exitcode if failure.exitcode and failure.exitcode > 0 else 128 + abs(failure.exitcode or 0)
        return RunOutcome(code, message=f"rank {rank} exited with code {failure.exitcode}")
    except SignalException as exc:  # SIGTERM reached the launcher: workers were told to checkpoint
        return RunOutcome(128 + int(exc.sigval), message=f"stopped by {exc.sigval.name}; workers saved a checkpoint")
    finally:
        del store
    # Rank 0's report: a run's RunResult, or lr-find's suggestion (the other ranks return None).
    result = next((value for value in results.values() if value and ("steps" in value or "suggestion" in value)), None)
    gate = next((value["quality_gate"] for value in results.values() if value and value.get("quality_gate")), None)
    if gate:  # continual.maxForgetting: the model and reports are written, the job still fails (not retried)
        return RunOutcome(exitcodes.QUALITY_GATE, result=result, message=gate)
    return RunOutcome(exitcodes.OK, result=result)
