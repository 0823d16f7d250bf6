"""Learning-rate schedule: linear warm-up, then cosine, linear or constant decay to a floor.

A pure function of the step, so a resumed run needs no scheduler state to continue exactly.
"""

from __future__ import annotations

import math

from lmforge.api.training import Schedule


def learning_rate(step: int, *, peak: float, total_steps: int, schedule: Schedule) -> float:
    """LR for optimizer step ``step`` (0-based) of ``total_steps``.

    Warm-up rises linearly from peak/warmup to peak over ``warmupSteps``; the decay then goes
    from peak at the end of warm-up to ``minLrRatio x peak`` at the last step.
    """
    floor = peak * schedule.min_lr_ratio
    warmup = schedule.warmup_steps
    if step < warmup:
        return peak * (step + 1) / warmup
    if schedule.decay == "constant":
        return peak
    span = max(1, total_steps - 1 - warmup)
    progress = min(1.0, (step - warmup) / span)
    if schedule.decay == "linear":
        return peak - (peak - floor) * progress
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))
