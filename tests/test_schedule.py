"""The LR schedule has the documented shape; the range test suggests a sensible LR."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.api.training import Schedule
from lmforge.trainer.lr_finder import range_test
from lmforge.trainer.schedule import learning_rate


def lrs(decay: str, total: int = 100, warmup: int = 10, floor: float = 0.1) -> list[float]:
    schedule = Schedule(warmup_steps=warmup, decay=decay, min_lr_ratio=floor)
    return [learning_rate(s, peak=1.0, total_steps=total, schedule=schedule) for s in range(total)]


@pytest.mark.parametrize("decay", ["cosine", "linear", "constant"])
def test_warmup_rises_linearly_to_the_peak(decay: str) -> None:
    values = lrs(decay)
    assert values[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])
    assert max(values) == pytest.approx(1.0)


def test_cosine_and_linear_end_at_the_floor_and_never_rise_after_warmup() -> None:
    for decay in ("cosine", "linear"):
        values = lrs(decay)
        assert values[-1] == pytest.approx(0.1)
        tail = values[10:]
        assert all(a >= b for a, b in zip(tail, tail[1:], strict=False))
    cosine, linear = lrs("cosine"), lrs("linear")
    middle = 10 + (100 - 1 - 10) // 2
    assert cosine[middle] == pytest.approx(0.55, abs=0.02)  # cosine is symmetric around its midpoint
    assert cosine[30] > linear[30]  # and stays high longer early on


def test_constant_stays_at_the_peak() -> None:
    assert lrs("constant")[10:] == [1.0] * 90


def test_range_test_on_a_problem_with_a_known_good_range() -> None:
    """Least squares with gradient descent: stable exactly below 2 / lambda_max of the Hessian."""
    torch.manual_seed(0)
    x = torch.randn(256, 16)
    w_true = torch.randn(16, 1)
    y = x @ w_true
    weight = torch.zeros(16, 1, requires_grad=True)
    optimizer = torch.optim.SGD([weight], lr=1e-5)

    def step(lr: float) -> float:
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = ((x @ weight - y) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return float(loss.item())

    stability_limit = 2.0 / float(torch.linalg.eigvalsh(2 * x.T @ x / len(x)).max())
    result = range_test(step, min_lr=1e-5, max_lr=10.0, steps=120)
    assert result.diverged_at is not None and result.diverged_at > stability_limit
    assert stability_limit / 100 <= result.suggestion < stability_limit
    assert math.isclose(result.suggestion * 10, result.lrs[result.smoothed.index(min(result.smoothed))])
