"""The quality gate as a pure function: numbers in, verdict and message out (no model, no files)."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from lmforge.compress.gate import GATE_REASON, GateVerdict, quality_gate


def test_a_model_within_the_allowance_passes_with_its_numbers() -> None:
    verdict = quality_gate(10.0, 10.5, 2_000, 1_000, 0.1)
    assert verdict == GateVerdict(
        passed=True,
        perplexity_change=pytest.approx(0.05),
        compression_ratio=2.0,
        message="perplexity 10.000 -> 10.500 (+5.00%, allowed +10%); size 2.00x smaller",
    )


def test_exactly_the_allowed_increase_passes() -> None:
    verdict = quality_gate(8.0, 10.0, 100, 100, 0.25)
    assert verdict.passed and verdict.perplexity_change == 0.25 and verdict.compression_ratio == 1.0


def test_a_model_that_got_worse_than_allowed_fails_with_the_reason_first() -> None:
    verdict = quality_gate(10.0, 12.0, 4_000, 1_000, 0.1)
    assert not verdict.passed
    assert verdict.perplexity_change == pytest.approx(0.2) and verdict.compression_ratio == 4.0
    assert verdict.message == (
        f"{GATE_REASON}: perplexity 10.000 -> 12.000 (+20.00%, allowed +10%); size 4.00x smaller: "
        "the compressed model got worse than allowed"
    )


def test_a_better_model_passes() -> None:
    verdict = quality_gate(10.0, 9.0, 1_000, 1_000, 0.0)
    assert verdict.passed and verdict.perplexity_change == pytest.approx(-0.1)
    assert "(-10.00%, allowed +0%)" in verdict.message


def test_an_infinite_final_perplexity_fails_even_with_no_limit() -> None:
    verdict = quality_gate(10.0, math.inf, 1_000, 500, math.inf)
    assert not verdict.passed and verdict.message.startswith(f"{GATE_REASON}: ")


def test_unknown_numbers_fail_and_say_so() -> None:
    verdict = quality_gate(None, None, None, None, 0.1)
    assert verdict == GateVerdict(
        passed=False,
        perplexity_change=None,
        compression_ratio=None,
        message=f"{GATE_REASON}: perplexity change unknown: the compressed model got worse than allowed",
    )
    # a known perplexity without sizes: no ratio, the change still decides
    sized = quality_gate(10.0, 10.2, None, 0, 0.1)
    assert sized.passed and sized.compression_ratio is None and sized.message == "perplexity change +2.00%"


def test_the_gate_module_is_light() -> None:
    """No torch, no storage: the gate can be read and tested without the compression stack."""
    code = (
        "import sys, lmforge.compress.gate; "
        "print(sorted(m for m in ('torch', 'numpy', 'lmforge.data.storage') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
