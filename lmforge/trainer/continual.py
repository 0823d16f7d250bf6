"""What ``stage: continual`` adds to a run: replay mix, EWC, forgetting report and its gate.

The earlier data is the earlier jobs' *prepared* data (``data.replay.sources``, else
``continual.earlierData``): directories holding ``train/`` and ``val/`` split indexes and shards, as
:func:`lmforge.data.preparation.prepare_data` writes them. Their ``index.json`` records the hash of
the tokenizer that made them; it must equal this job's, or the token ids mean different things
(the run stops with exit 78 naming the field and the fix: :mod:`lmforge.data.other_job_data`).

- Replay: the train reader becomes a :class:`lmforge.data.mixing.MixedReader` of the new training
  split (with ``data.mix``, if any) and each replay source's ``train/`` (together ``fraction``, split
  across the sources in proportion to their number of training samples, so a big earlier corpus
  is not under-sampled relative to a small one). Its state rides in the checkpoint like the plain
  reader's.
- Learning rate: nothing special is needed. The schedule is a pure function of this job's step
  (:mod:`lmforge.trainer.schedule`), a continual job starts from the exported weights only (no
  optimizer state, step 0), so it warms up again to the peak and decays over this job's steps.
- EWC (``continual.ewc``): :mod:`lmforge.trainer.ewc`, Fisher on the earlier ``train/`` splits.
- Forgetting: held-out loss on each earlier ``val/`` split before training (the initial weights;
  recomputed identically after a restart, before the checkpoint is loaded) and after, with the
  same micro-batches as the run's evaluation (``training.evalBatches``). Rank 0 writes
  ``forgetting.json`` to the output, a ``forgetting`` entry in ``summary.json`` and a printed
  line; with ``continual.maxForgetting`` set, a perplexity rise above it on any earlier set fails
  the job with exit 3 after the model and the reports are written.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from lmforge import contract
from lmforge.api.training import TrainingJobSpec
from lmforge.data.mixing import MixedReader
from lmforge.data.other_job_data import open_prepared_split
from lmforge.data.reader import SampleReader
from lmforge.data.staging import publish
from lmforge.data.storage import Storage, storage_for
from lmforge.data.tokenizer import tokenizer_hash
from lmforge.trainer.ewc import EwcPenalty, estimate

REPORT = contract.FORGETTING_JSON


@dataclass
class EarlierSource:
    """One earlier job's prepared data and the field that named it."""

    field: str
    uri: str
    storage: Storage
    train: SampleReader | None = None
    val: SampleReader | None = None


def _perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


class ContinualRun:
    """The continual parts of one process's run (every rank builds one; see the module docstring)."""

    def __init__(self, spec: TrainingJobSpec, tokenizer: Tokenizer, *, rank: int, world_size: int) -> None:
        self.spec = spec
        self.rank = rank
        self.world_size = world_size
        self.digest = tokenizer_hash(tokenizer)
        settings = spec.continual
        self.max_forgetting: float | None = settings.max_forgetting if settings is not None else None
        self.ewc_settings = settings.ewc if settings is not None else None
        self.replay_fraction: float | None = spec.data.replay.fraction if spec.data.replay is not None else None
        need_train = self.replay_fraction is not None or self.ewc_settings is not None
        self.sources: list[EarlierSource] = []
        for index, (path, uri) in enumerate(spec.earlier_data):
            source = EarlierSource(path, uri, storage_for(uri, spec.s3))
            if need_train:
                source.train = self._reader(source, "train", seed=spec.training.seed + 1 + index, shuffle=True)
            source.val = self._reader(source, "val", seed=spec.training.seed, shuffle=False)
            self.sources.append(source)

    @classmethod
    def from_spec(
        cls, spec: TrainingJobSpec, tokenizer: Tokenizer, *, rank: int, world_size: int
    ) -> ContinualRun | None:
        """None unless ``stage: continual``; checks the earlier data before any weights are loaded."""
        if spec.stage != "continual":
            return None
        return cls(spec, tokenizer, rank=rank, world_size=world_size)

    def _reader(self, source: EarlierSource, split: str, *, seed: int, shuffle: bool) -> SampleReader:
        return open_prepared_split(
            source.field,
            source.uri,
            split,
            source.storage,
            tokenizer_digest=self.digest,
            context_length=self.spec.model.context_length,
            rank=self.rank,
            world_size=self.world_size,
            seed=seed,
            shuffle=shuffle,
            shuffle_window=self.spec.data.shuffle_window,
        )

    # --- replay ------------------------------------------------------------------------------

    def replay_sources(self) -> list[tuple[str, SampleReader, float]]:
        """``(field, train reader, fraction)`` of each replay source for the training mix (see the module
        docstring); empty without data.replay."""
        if self.replay_fraction is None:
            return []
        replay = [(s.field, s.train) for s in self.sources if s.train is not None]
        total = sum(reader.num_samples for _, reader in replay)
        return [(field, reader, self.replay_fraction * reader.num_samples / total) for field, reader in replay]

    # --- EWC ---------------------------------------------------------------------------------

    def ewc(self, model: torch.nn.Module, device: torch.device) -> EwcPenalty | None:
        """The EWC penalty around ``model``'s current (initial) weights, or None when not configured."""
        if self.ewc_settings is None:
            return None
        readers = [s.train for s in self.sources if s.train is not None]

        def sample(i: int) -> tuple[Any, Any]:  # sequences taken in turn from each earlier source
            reader = readers[i % len(readers)]
            return reader.sample(reader.sample_index(i // len(readers)))

        settings = self.ewc_settings
        return estimate(
            model, sample, settings.samples, settings.weight, rank=self.rank, world_size=self.world_size, device=device
        )

    # --- forgetting --------------------------------------------------------------------------

    def measure(self, evaluate: Callable[[SampleReader], float]) -> list[float]:
        """Held-out loss on each earlier validation split (``evaluate`` is the run's evaluation)."""
        return [evaluate(s.val) for s in self.sources if s.val is not None]

    def report(self, before: list[float], after: list[float], train_reader: Any, ewc: EwcPenalty | None) -> dict:
        """The forgetting report (identical on every rank: the losses are all-reduced means)."""
        rows = []
        for source, b, a in zip(self.sources, before, after, strict=True):
            rows.append(
                {
                    "field": source.field,
                    "uri": source.uri,
                    "loss_before": b,
                    "loss_after": a,
                    "perplexity_before": _perplexity(b),
                    "perplexity_after": _perplexity(a),
                    "perplexity_rise": _perplexity(a) / _perplexity(b) - 1.0,
                }
            )
        worst = max(row["perplexity_rise"] for row in rows) if rows else 0.0
        passed = None if self.max_forgetting is None else worst <= self.max_forgetting
        report: dict[str, Any] = {
            "earlier_data": rows,
            "max_perplexity_rise": worst,
            "max_forgetting": self.max_forgetting,
            "passed": passed,
            "replay": None,
            "ewc": ewc.summary() if ewc is not None else None,
        }
        if isinstance(train_reader, MixedReader) and self.replay_fraction is not None:
            mix = train_reader.counts()
            counts = dict(zip(mix["sources"], mix["global"], strict=True))
            fields = {s.field for s in self.sources}
            replayed = sum(count for name, count in counts.items() if name in fields)
            report["replay"] = {
                "fraction": self.replay_fraction,
                "realised_fraction": replayed / max(1, train_reader.position),
                "samples": counts,
            }
        return report

    @staticmethod
    def describe(report: dict) -> str:
        """One printed line per earlier set, and the gate's verdict."""
        lines = [
            f"forgetting: {row['field']} perplexity {row['perplexity_before']:.2f} -> {row['perplexity_after']:.2f} "
            f"({row['perplexity_rise']:+.1%})"
            for row in report["earlier_data"]
        ]
        if report["replay"] is not None:
            lines.append(
                f"forgetting: replayed {report['replay']['realised_fraction']:.1%} of the training samples "
                f"(target {report['replay']['fraction']:.1%})"
            )
        if report["passed"] is not None:
            verdict = "passed" if report["passed"] else "FAILED"
            lines.append(
                f"forgetting: gate continual.maxForgetting {report['max_forgetting']:.1%}: {verdict} "
                f"(worst rise {report['max_perplexity_rise']:+.1%})"
            )
        return "\n".join(lines)

    def write(self, report: dict, output_dir: Path, storage: Storage, output_uri: str) -> None:
        """Rank 0: forgetting.json to the output, and the summary printed."""
        (output_dir / REPORT).write_text(json.dumps(report, indent=2))
        publish(storage, output_dir, output_uri, [REPORT])
        print(self.describe(report), flush=True)


def gate_message(report: dict) -> str:
    """Why the gate failed and what to change (the launcher prints it and exits QUALITY_GATE)."""
    rise, allowed = report["max_perplexity_rise"], report["max_forgetting"]
    fix = "add or raise data.replay.fraction, add continual.ewc, lower the learning rate or train fewer steps"
    return (
        f"continual.maxForgetting: the earlier data's perplexity rose {rise:+.1%}, more than the allowed "
        f"{allowed:.1%} (the model and {REPORT} are written); to forget less: {fix}"
    )


def summary_entry(report: dict) -> dict[str, Any]:
    """The line of ``summary.json`` about forgetting."""
    return {
        "max_perplexity_rise": report["max_perplexity_rise"],
        "max_forgetting": report["max_forgetting"],
        "passed": report["passed"],
        "report": REPORT,
    }
