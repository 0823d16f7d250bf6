"""The epoch order: a permutation that any rank, worker or resumed run computes alike, and that streams
(a sliding window of shards at a time) once the data outgrows ``data.shuffleWindow``."""

from __future__ import annotations

import numpy as np
import pytest

from lmforge.data.order import DEFAULT_WINDOW, SampleOrder

CASES = [(1_000, 37, 50), (100_003, 1_000, 5_000), (7, 3, 2), (50, 50, 10), (20_000, 64, 20_000)]


@pytest.mark.parametrize(("samples", "span", "window"), CASES)
def test_every_epoch_visits_every_sample_once_and_any_slice_agrees(samples: int, span: int, window: int) -> None:
    whole = SampleOrder(samples, span=span, window=window, seed=3).samples(np.arange(3 * samples))
    for epoch in range(3):
        assert np.array_equal(np.sort(whole[epoch * samples : (epoch + 1) * samples]), np.arange(samples))
    assert not np.array_equal(whole[:samples], np.arange(samples))  # shuffled
    assert not np.array_equal(whole[:samples], whole[samples : 2 * samples])  # another order each epoch
    # Another process (rank, worker, resumed run) asking for scattered positions gets the same samples.
    positions = np.random.default_rng(0).integers(0, 3 * samples, 500)
    fresh = SampleOrder(samples, span=span, window=window, seed=3)
    assert np.array_equal(fresh.samples(positions), whole[positions])
    assert fresh.sample(int(positions[0])) == whole[positions[0]]


def test_small_data_gets_a_full_permutation_per_epoch() -> None:
    order = SampleOrder(5_000, span=100, window=DEFAULT_WINDOW, seed=7)
    expected = np.random.default_rng(7 + 1).permutation(5_000)
    assert np.array_equal(order.samples(np.arange(5_000, 10_000)), expected)
    assert np.array_equal(
        SampleOrder(50, span=5, window=10, seed=0, shuffle=False).samples(np.arange(60)) % 50, np.arange(60) % 50
    )


def test_the_order_streams_through_a_sliding_window_of_shards_yet_mixes_them() -> None:
    span, window = 1_000, 8_000  # a "shard" is 1,000 samples; 8 shards shuffled together
    order = SampleOrder(1_000_000, span=span, window=window, seed=1)
    samples = order.samples(np.arange(1_000_000))
    shards = samples // span
    # The consumer needs few shards at a time: 4,096 positions draw on the shards of about window + 4,096
    # consecutive samples (13 of 1,000), and the first batch needs only a couple.
    needed = [np.unique(shards[p : p + 4_096]).shape[0] for p in range(0, 1_000_000, 50_000)]
    assert max(needed) <= (window + 4_096) // span + 2
    assert np.unique(shards[:64]).shape[0] <= 3
    # Yet a batch in the stream mixes several shards, and a shard's samples are spread apart.
    assert np.median([np.unique(shards[p : p + 64]).shape[0] for p in range(100_000, 900_000, 10_000)]) >= 5
    positions = np.argsort(samples)  # where each sample lands
    neighbours = np.abs(np.diff(positions[200_000:200_999]))  # consecutive samples of one shard
    assert np.median(neighbours) > window / 8


def test_seeds_and_bad_settings() -> None:
    a = SampleOrder(100_000, span=100, window=1_000, seed=1).samples(np.arange(1_000))
    b = SampleOrder(100_000, span=100, window=1_000, seed=2).samples(np.arange(1_000))
    assert not np.array_equal(a, b)
    with pytest.raises(ValueError, match="shuffle window"):
        SampleOrder(10, span=1, window=0, seed=0)
