"""Atomic, resumable checkpoints on file:// or s3://.

Layout under the checkpoint URI::

    step-00000200/            one tag per checkpoint
        ...                   DeepSpeed's model and (sharded) optimizer files
        trainer_state.json    step, data-reader position, tokens seen
        rng/rank-00000.pt     per-rank RNG states
        COMMIT                written last: the checkpoint is complete
    latest                    name of the newest committed tag, written after COMMIT

A tag without COMMIT (a save interrupted by a crash or preemption) is never resumed from;
resumption always picks the newest committed tag, whatever ``latest`` says, so nothing depends on
the pointer having been written. Old tags beyond ``keep`` are deleted only after a newer commit.

:class:`CheckpointLocation` is that layout on storage; :class:`Checkpointer` is what a run does
with it: find the checkpoint to resume from, load it into the engine and the reader, and save one
(every rank its shards and RNG state, then node-local uploads, then rank 0's commit).
"""

from __future__ import annotations

import json
import logging
import pickle
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from lmforge import contract
from lmforge.api.training import TrainingJobSpec
from lmforge.data.reader_protocol import Reader
from lmforge.data.staging import fetch, local_dir, publish
from lmforge.data.storage import Storage, join_uri, storage_for
from lmforge.trainer.collectives import broadcast
from lmforge.trainer.context import WorldContext
from lmforge.trainer.logger import StepLogger
from lmforge.trainer.outputs import RunOutputs

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

log = logging.getLogger(__name__)

COMMIT = "COMMIT"
LATEST = "latest"
STATE_FILE = "trainer_state.json"
_TAG_RE = re.compile(rf"^{re.escape(contract.CHECKPOINT_TAG_PREFIX)}(\d{{8}})$")


def step_of(tag: str) -> int:
    match = _TAG_RE.match(tag)
    if not match:
        raise ValueError(f"not a checkpoint tag: {tag}")
    return int(match.group(1))


@dataclass
class CheckpointLocation:
    """Where checkpoints live (``uri``) and the local directory DeepSpeed reads and writes."""

    uri: str
    storage: Storage

    @property
    def is_local(self) -> bool:
        return self.uri.startswith("file://")

    @property
    def staging(self) -> Path:
        """Local directory: the checkpoint directory itself for file://, a cache for s3://."""
        return local_dir(self.uri, "checkpoints")

    def tags(self) -> dict[str, bool]:
        """Every tag found, mapped to whether it is committed."""
        found: dict[str, bool] = {}
        prefix = self.uri.rstrip("/") + "/"
        for uri in self.storage.list(self.uri):
            relative = uri[len(prefix) :] if uri.startswith(prefix) else uri
            parts = relative.split("/")
            if len(parts) >= 2 and _TAG_RE.match(parts[0]):
                found[parts[0]] = found.get(parts[0], False) or parts[-1] == COMMIT and len(parts) == 2
        return found

    def newest_committed(self) -> str | None:
        committed = [tag for tag, done in self.tags().items() if done]
        return max(committed, key=step_of) if committed else None

    def commit(self, tag: str, state: dict[str, Any]) -> None:
        """Write COMMIT (listing the files) and then the ``latest`` pointer."""
        prefix = join_uri(self.uri, tag) + "/"
        files = sorted(uri[len(prefix) :] for uri in self.storage.list(join_uri(self.uri, tag)))
        marker = {"step": state["step"], "time": time.time(), "files": files}
        self.storage.write_bytes(join_uri(self.uri, tag, COMMIT), json.dumps(marker, indent=1).encode())
        self.storage.write_bytes(join_uri(self.uri, LATEST), tag.encode())

    def upload(self, tag: str) -> None:
        """Copy this node's staged files of ``tag`` to object storage (no-op for file://)."""
        publish(self.storage, self.staging, self.uri, [tag])

    def download(self, tag: str) -> None:
        """Fetch ``tag`` into the staging directory (no-op for file://)."""
        if not self.is_local:
            fetch(self.storage, join_uri(self.uri, tag), "checkpoints", target=self.staging / tag)

    def prune(self, keep: int) -> list[str]:
        """Delete all but the newest ``keep`` committed tags, and uncommitted tags older than them."""
        tags = self.tags()
        committed = sorted((t for t, done in tags.items() if done), key=step_of, reverse=True)
        if not committed:
            return []
        kept = set(committed[:keep])
        oldest_kept = min(step_of(t) for t in kept)
        doomed = [t for t in tags if t not in kept and (tags[t] or step_of(t) < oldest_kept)]
        for tag in doomed:
            # Delete COMMIT first so a half-deleted tag is never mistaken for a good one.
            marker = join_uri(self.uri, tag, COMMIT)
            if self.storage.exists(marker):
                self.storage.delete(marker)
            for uri in self.storage.list(join_uri(self.uri, tag)):
                self.storage.delete(uri)
            shutil.rmtree(self.staging / tag, ignore_errors=True)  # empty dirs (file://), cache (s3://)
        return doomed

    def read_state(self, tag: str) -> dict[str, Any]:
        return json.loads(self.storage.read_bytes(join_uri(self.uri, tag, STATE_FILE)))


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain values only, so that a resume can read them with
    ``torch.load(weights_only=True)`` (numpy's key array travels as an int64 tensor)."""
    algorithm, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {
            "algorithm": str(algorithm),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    saved = state["numpy"]
    keys = saved["keys"].numpy().astype(np.uint32)
    np.random.set_state(
        (saved["algorithm"], keys, saved["position"], saved["has_gauss"], saved["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_rank_rng(staging_tag: Path, rank: int) -> None:
    path = staging_tag / "rng" / f"rank-{rank:05d}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(), path)


def load_rank_rng(staging_tag: Path, rank: int) -> bool:
    """Restore this rank's RNG states from the checkpoint; False (seeded state kept) when there are none.

    The file comes from object storage, which others may write to: it is read with
    ``weights_only=True``, which runs no code. A file that needs more than tensors and plain values (a
    crafted pickle, or an RNG file of an older lmforge that pickled numpy's state) is not restored:
    the run goes on from its seeded state, with a warning.
    """
    path = staging_tag / "rng" / f"rank-{rank:05d}.pt"
    if not path.exists():
        return False  # world size grew: new ranks keep their seeded state
    try:
        state = torch.load(path, weights_only=True)
        restore_rng_state(state)
    except (pickle.UnpicklingError, RuntimeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        log.warning("RNG state %s not restored (not only tensors and plain values: %s); seeded state kept", path, first)
        return False
    return True


@dataclass(frozen=True)
class Resume:
    """The newest committed checkpoint, as rank 0 found it (broadcast to every rank)."""

    tag: str
    state: dict[str, Any]
    """Its trainer_state.json: step, tokens, reader state, peak_lr, world_size."""

    @property
    def step(self) -> int:
        return int(self.state["step"])

    @property
    def peak_lr(self) -> float | None:
        """The peak LR the run used (the LR range test's suggestion is kept across restarts)."""
        return self.state.get("peak_lr")


class Checkpointer:
    """A run's checkpoints: :meth:`newest` to resume from, :meth:`load` it, :meth:`save` one.

    Every rank makes each call at the same point (they hold barriers and broadcasts); within a
    call each rank does its part: its shards and RNG state, the node's first rank the node's
    uploads and downloads, rank 0 the lookup, the commit, pruning and metrics.jsonl.
    """

    def __init__(self, spec: TrainingJobSpec, ctx: WorldContext, outputs: RunOutputs) -> None:
        self.location = CheckpointLocation(
            outputs.layout.checkpoints, storage_for(spec.checkpoint.uri or spec.output.uri, spec.s3)
        )
        self.keep = spec.checkpoint.keep
        self.ctx = ctx
        self.outputs = outputs

    def newest(self) -> Resume | None:
        """The newest committed checkpoint (None: start from step 0), the same on every rank."""
        main = self.ctx.is_main
        tag = broadcast(self.location.newest_committed() if main else None)
        state = broadcast(self.location.read_state(tag) if main and tag else None)
        return Resume(tag, state) if tag is not None else None

    def load(self, engine: DeepSpeedEngine, reader: Reader, resume: Resume) -> tuple[int, int]:
        """Restore the engine (weights, optimizer), the reader's position and this rank's RNG; ``(step, tokens)``."""
        location = self.location
        if self.ctx.is_node_main:
            location.download(resume.tag)
        dist.barrier()
        engine.load_checkpoint(str(location.staging), tag=resume.tag, load_lr_scheduler_states=False)
        reader.load_state_dict(resume.state["reader"])
        load_rank_rng(location.staging / resume.tag, self.ctx.rank)
        return resume.step, int(resume.state["tokens"])

    def save(
        self, engine: DeepSpeedEngine, reader: Reader, *, step: int, tokens: int, peak_lr: float, logger: StepLogger
    ) -> None:
        """Save, upload and commit the checkpoint after ``step``; prune old ones; publish metrics.jsonl."""
        begin = time.time()
        ctx, location = self.ctx, self.location
        tag = contract.checkpoint_tag(step)
        staging = location.staging
        engine.save_checkpoint(str(staging), tag=tag, save_latest=False)
        write_rank_rng(staging / tag, ctx.rank)
        state = {
            "step": step,
            "tokens": tokens,
            "reader": reader.state_dict(),
            "peak_lr": peak_lr,
            "world_size": ctx.world_size,
        }
        if ctx.is_main:
            (staging / tag / STATE_FILE).write_text(json.dumps(state))
        dist.barrier()
        if ctx.is_node_main:
            location.upload(tag)
        dist.barrier()
        if ctx.is_main:
            location.commit(tag, state)
            location.prune(self.keep)
            self.outputs.publish([contract.METRICS_JSONL])
        dist.barrier()
        logger.checkpointed(step, tag, begin)
