"""MixedReader: realised fractions, per-source order, exact resume, world-size changes, one source."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.data.mixing import MixedReader
from lmforge.data.reader import SampleReader
from lmforge.data.shards import ShardWriter
from lmforge.data.storage import LocalStorage

T = 8
SOURCE_TOKENS = 10_000  # source k holds tokens k*10000 + 0..n, so a sample names its source and index


def _source(tmp_path: Path, k: int, samples: int) -> str:
    uri = f"file://{tmp_path}/source-{k}/train"
    ids = k * SOURCE_TOKENS + np.arange(samples * T + 1)
    with ShardWriter(uri, LocalStorage(), "h", vocab_size=60_000, shard_tokens=97) as writer:
        writer.add(ids)
    return uri


@pytest.fixture
def sources(tmp_path: Path) -> list[str]:
    return [_source(tmp_path, 0, 400), _source(tmp_path, 1, 60), _source(tmp_path, 2, 25)]


def _readers(uris: list[str], seed: int = 3) -> list[SampleReader]:
    return [SampleReader(uri, LocalStorage(), T, seed=seed + i) for i, uri in enumerate(uris)]


def _mix(uris: list[str], weights: list[float], rank: int = 0, world: int = 1) -> MixedReader:
    return MixedReader(_readers(uris), weights, rank=rank, world_size=world, seed=11)


def _ids(x: torch.Tensor) -> list[tuple[int, int]]:
    """(source, sample index) of each row."""
    return [(int(row[0]) // SOURCE_TOKENS, int(row[0]) % SOURCE_TOKENS // T) for row in x]


def _stream(mixer: MixedReader, steps: int, batch: int) -> list[tuple[int, int]]:
    return [pair for _ in range(steps) for pair in _ids(mixer.next_batch(batch)[0])]


def test_realised_fractions_follow_the_weights_at_every_length(sources: list[str]) -> None:
    weights = [0.75, 0.2, 0.05]
    mixer = _mix(sources, weights)
    stream = _stream(mixer, 250, 8)  # 2000 samples
    counts = np.zeros(3)
    for n, (source, _) in enumerate(stream, start=1):
        counts[source] += 1
        # Low discrepancy: never more than a few samples off the target, however short the run.
        assert np.all(np.abs(counts - n * np.array(weights)) <= 4), (n, counts)
    assert mixer.counts()["global"] == counts.astype(int).tolist()
    assert mixer.counts()["fractions"] == pytest.approx(weights, abs=0.002)
    assert mixer.samples_read == 2000 and mixer.state_dict()["position"] == 2000


def test_each_source_keeps_its_own_no_repeat_epoch_order(sources: list[str]) -> None:
    mixer = _mix(sources, [0.5, 0.3, 0.2])
    stream = _stream(mixer, 40, 10)
    reference = _readers(sources)
    for k, reader in enumerate(reference):
        drawn = [index for source, index in stream if source == k]
        assert drawn == [reader.sample_index(q) for q in range(len(drawn))]  # the source's own order
        epoch = drawn[: reader.num_samples]
        assert len(set(epoch)) == len(epoch)  # no repeat within an epoch
    # Source 2 (25 samples) wrapped into its second epoch and is still a permutation there.
    second = [index for source, index in stream if source == 2][25:50]
    assert len(second) == 25 and sorted(second) == list(range(25))


def test_ranks_take_disjoint_slices_of_one_global_stream_and_agree_on_state(sources: list[str]) -> None:
    single = _stream(_mix(sources, [0.6, 0.3, 0.1]), 6, 8)
    ranks = [_mix(sources, [0.6, 0.3, 0.1], rank=r, world=2) for r in range(2)]
    combined: list[tuple[int, int]] = []
    for _ in range(6):
        batches = [_ids(mixer.next_batch(4)[0]) for mixer in ranks]
        combined += batches[0] + batches[1]
        assert ranks[0].state_dict() == ranks[1].state_dict()
    assert combined == single


def test_resume_is_exact(sources: list[str]) -> None:
    straight = _stream(_mix(sources, [0.7, 0.2, 0.1]), 20, 6)
    first = _mix(sources, [0.7, 0.2, 0.1])
    head = _stream(first, 8, 6)
    state = first.state_dict()
    resumed = _mix(sources, [0.7, 0.2, 0.1])
    resumed.load_state_dict(state)
    assert head + _stream(resumed, 12, 6) == straight
    assert resumed.state_dict()["source_positions"] == [sum(1 for s, _ in straight if s == k) for k in range(3)]


def test_resume_with_a_different_world_size_neither_repeats_nor_skips(sources: list[str]) -> None:
    straight = _stream(_mix(sources, [0.7, 0.2, 0.1]), 12, 12)  # world 1, 12 per step: 144 positions
    ranks = [_mix(sources, [0.7, 0.2, 0.1], rank=r, world=3) for r in range(3)]
    combined: list[tuple[int, int]] = []
    for _ in range(4):  # world 3 x 4 per step: 48 positions
        for batch in [_ids(mixer.next_batch(4)[0]) for mixer in ranks]:
            combined += batch
    state = ranks[2].state_dict()
    two = [_mix(sources, [0.7, 0.2, 0.1], rank=r, world=2) for r in range(2)]
    for mixer in two:
        mixer.load_state_dict(state)
    for _ in range(8):  # world 2 x 6 per step: 96 positions
        for batch in [_ids(mixer.next_batch(6)[0]) for mixer in two]:
            combined += batch
    assert combined == straight


def test_one_source_is_the_plain_reader(sources: list[str]) -> None:
    for rank in range(2):
        plain = SampleReader(sources[0], LocalStorage(), T, rank=rank, world_size=2, seed=3)
        mixer = MixedReader([SampleReader(sources[0], LocalStorage(), T, seed=3)], [1.0], rank=rank, world_size=2)
        for _ in range(30):  # past the end of the first epoch
            a, b = plain.next_batch(7), mixer.next_batch(7)
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert mixer.state_dict()["position"] == plain.state_dict()["position"]


def test_a_plain_reader_state_continues_the_first_source(sources: list[str]) -> None:
    plain = SampleReader(sources[0], LocalStorage(), T, seed=3)
    plain.next_batch(10)
    mixer = MixedReader(_readers(sources[:2]), [0.5, 0.5], seed=11)
    mixer.load_state_dict(plain.state_dict())
    assert mixer.state_dict()["source_positions"] == [10, 0]
    first = [index for source, index in _stream(mixer, 4, 5) if source == 0]
    assert first == [plain.sample_index(10 + i) for i in range(len(first))]


def test_saved_mix_with_other_sources_is_a_clear_error(sources: list[str]) -> None:
    state = _mix(sources, [0.7, 0.2, 0.1]).state_dict()
    two = MixedReader(_readers(sources[:2]), [0.9, 0.1], seed=11)
    with pytest.raises(ValueError, match="keep data.mix and data.replay.sources as they were"):
        two.load_state_dict(state)


@pytest.mark.parametrize(
    ("weights", "message"),
    [([1.0], "3 sources but 1 weights"), ([1.0, 0.0, 1.0], "weight 1 is 0.0"), ([1.0, -1.0, 1.0], "weight > 0")],
)
def test_bad_weights_are_clear_errors(sources: list[str], weights: list[float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MixedReader(_readers(sources), weights)


def test_chunked_batches_are_exactly_the_sample_by_sample_mix(sources: list[str]) -> None:
    """The vectorized read ahead (one read per source per chunk) hands out what per-sample reads would,
    with the state after every step, also across a chunk boundary and a change of batch size."""
    mixer = _mix(sources, [0.6, 0.3, 0.1], rank=1, world=3)
    reference = _readers(sources)
    positions = np.array([0, 1, 2, 2**31 + 5, 2**40 + 7, 2**52 + 11], dtype=np.int64)
    assert mixer.sources_of(positions).tolist() == [mixer.source_of(int(p)) for p in positions]
    expected_state = [0, 0, 0]
    for step, batch in enumerate([4] * 1100 + [3] * 5):  # crosses chunk boundaries
        start = mixer.position
        x, _ = mixer.next_batch(batch)
        wanted = []
        for k in range(3 * batch):
            source = mixer.source_of(start + k)
            if batch <= k < 2 * batch:
                wanted.append(reference[source].sample(reference[source].sample_index(expected_state[source]))[0])
            expected_state[source] += 1
        assert np.array_equal(x.numpy(), np.stack(wanted)), step
        assert mixer.state_dict()["source_positions"] == expected_state
