"""A checkpoint read back from object storage runs no code: the per-rank RNG files."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.trainer.checkpoint import load_rank_rng, write_rank_rng


class _Payload:
    """What an attacker with write access to the checkpoint prefix would plant."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def _draws() -> tuple[float, float, float]:
    return random.random(), float(np.random.random()), float(torch.rand(1))


def test_rng_states_round_trip_through_a_checkpoint(tmp_path: Path) -> None:
    write_rank_rng(tmp_path, 0)
    expected = _draws()
    _draws()  # move every generator on
    assert load_rank_rng(tmp_path, 0)
    assert _draws() == expected


def test_a_crafted_rng_file_is_refused_without_running(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    marker = tmp_path / "payload-ran"
    path = tmp_path / "rng" / "rank-00000.pt"
    path.parent.mkdir(parents=True)
    torch.save({"python": _Payload(marker)}, path)
    with caplog.at_level(logging.WARNING):
        assert load_rank_rng(tmp_path, 0) is False
    assert not marker.exists(), "the payload ran"
    assert "not restored" in caplog.text
    torch.load(path, weights_only=False)  # the check above can fail: unpickled, the payload runs
    assert marker.read_text() == "ran"
