"""The quality gate of a CompressionJob: a pure function of the baseline's and the final model's numbers.

The gate passes when the final perplexity is known, finite, and at most
``evaluation.maxPerplexityIncrease`` (a fraction: 0.1 = +10%) above the baseline's. The message
is the one line results.md, results.json and the job's status show; a failed gate's message
starts with :data:`GATE_REASON`. Writing the results and raising are the pipeline's
(:mod:`lmforge.compress.pipeline`); nothing here reads or writes anything.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

GATE_REASON = "QualityGate"
"""The failure reason: results.json's ``gate.reason`` and the prefix of a failed gate's message."""


@dataclass(frozen=True)
class GateVerdict:
    """What the gate decided, and the numbers it decided on."""

    passed: bool
    perplexity_change: float | None
    """final / baseline perplexity - 1; None when either is unknown (or zero)."""
    compression_ratio: float | None
    """baseline / final weight bytes; None when either is unknown (or zero)."""
    message: str


def quality_gate(
    base_perplexity: float | None,
    final_perplexity: float | None,
    base_size: int | None,
    final_size: int | None,
    max_increase: float,
) -> GateVerdict:
    """The verdict on a final model against the baseline, allowed ``max_increase`` relative perplexity."""
    change = (final_perplexity / base_perplexity - 1) if base_perplexity and final_perplexity else None
    ratio = base_size / final_size if base_size and final_size else None
    passed = change is not None and change <= max_increase and math.isfinite(final_perplexity or math.inf)
    change_text = f"{100 * change:+.2f}%" if change is not None else "unknown"
    message = (
        f"perplexity {base_perplexity:.3f} -> {final_perplexity:.3f} "
        f"({change_text}, allowed +{100 * max_increase:g}%); "
        f"size {ratio:.2f}x smaller"
        if ratio
        else f"perplexity change {change_text}"
    )
    if not passed:
        message = f"{GATE_REASON}: {message}: the compressed model got worse than allowed"
    return GateVerdict(passed, change, ratio, message)
