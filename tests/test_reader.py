"""SampleReader: content, masks, determinism, resumption, ranks, s3 caching."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.api.common import S3Settings
from lmforge.data.reader import SampleReader
from lmforge.data.shards import ShardError, ShardWriter
from lmforge.data.storage import LocalStorage, Storage, storage_for
from tests.s3fixture import s3_client, s3_server  # noqa: F401

# ruff: noqa: F811  (pytest injects the imported s3_server fixture by parameter name)

T = 8


def _write(split: str, storage: Storage, tokens: int = 1000, shard_tokens: int = 100, mask: bool = False) -> None:
    ids = np.arange(tokens) % 60_000
    with ShardWriter(split, storage, "h", vocab_size=60_000, shard_tokens=shard_tokens) as writer:
        writer.add(ids, (ids % 3 != 0).astype(int) if mask else None)


@pytest.fixture
def split(tmp_path: Path) -> str:
    uri = f"file://{tmp_path}/train"
    _write(uri, LocalStorage())
    return uri


def _batches(reader: SampleReader, count: int, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [reader.next_batch(size) for _ in range(count)]


def _starts(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[int]:
    return [int(x[0]) // T for xs, _ in batches for x in xs]


def test_samples_are_windows_of_the_stream_across_shards(split: str) -> None:
    reader = SampleReader(split, LocalStorage(), T, shuffle=False)
    assert reader.num_samples == (1000 - 1) // T
    x, y = reader.next_batch(20)
    assert x.dtype == y.dtype == torch.int32 and x.shape == y.shape == (20, T)  # widened on the device
    for i in range(20):
        assert x[i].tolist() == list(range(i * T, i * T + T))  # samples 12 and 13 straddle shards
        assert y[i].tolist() == list(range(i * T + 1, i * T + T + 1))
    assert reader.samples_read == 20 and reader.bytes_read == 20 * (T + 1) * 2 and reader.wait_seconds > 0


def test_mask_zero_targets_are_ignored(tmp_path: Path) -> None:
    uri = f"file://{tmp_path}/sft"
    _write(uri, LocalStorage(), mask=True)
    x, y = SampleReader(uri, LocalStorage(), T, shuffle=False).next_batch(5)
    target = x + 1
    expected = torch.where(target % 3 == 0, torch.full_like(target, -100), target)
    assert torch.equal(y, expected)


def test_same_seed_same_order_other_seed_differs(split: str) -> None:
    a = _batches(SampleReader(split, LocalStorage(), T, seed=3), 5, 4)
    b = _batches(SampleReader(split, LocalStorage(), T, seed=3), 5, 4)
    c = _batches(SampleReader(split, LocalStorage(), T, seed=4), 5, 4)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b, strict=True))
    assert _starts(a) != _starts(c)
    assert _starts(a) != sorted(_starts(a))  # shuffled


def test_resume_is_exact_across_epochs(split: str) -> None:
    reader = SampleReader(split, LocalStorage(), T, seed=7)
    steps = 2 * (reader.num_samples // 16) + 6  # crosses at least one epoch boundary
    straight = _batches(reader, steps, 16)

    first = SampleReader(split, LocalStorage(), T, seed=7)
    resumed = _batches(first, steps // 2, 16)
    state = first.state_dict()
    assert state["position"] == steps // 2 * 16 and state["seed"] == 7 and state["world_size"] == 1
    second = SampleReader(split, LocalStorage(), T, seed=999)  # the state's seed wins
    second.load_state_dict(state)
    resumed += _batches(second, steps - steps // 2, 16)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(straight, resumed, strict=True))
    assert second.state_dict()["epoch"] >= 1


def test_two_ranks_cover_what_one_rank_with_twice_the_batch_covers(split: str) -> None:
    one = SampleReader(split, LocalStorage(), T, seed=1)
    ranks = [SampleReader(split, LocalStorage(), T, rank=r, world_size=2, seed=1) for r in range(2)]
    per_epoch = one.num_samples // 8
    seen: list[int] = []
    for _ in range(per_epoch):
        x1, _ = one.next_batch(8)
        x2 = torch.cat([reader.next_batch(4)[0] for reader in ranks])
        assert torch.equal(x1, x2)
        seen += [int(v) // T for v in x2[:, 0]]
    assert len(seen) == len(set(seen)) == per_epoch * 8  # no duplicates within an epoch
    assert ranks[0].state_dict()["position"] == ranks[1].state_dict()["position"] == one.state_dict()["position"]


def test_world_size_can_change_on_resume(split: str) -> None:
    single = _starts(_batches(SampleReader(split, LocalStorage(), T, seed=5), 6, 4))
    ranks = [SampleReader(split, LocalStorage(), T, rank=r, world_size=2, seed=5) for r in range(2)]
    combined: list[int] = []
    for _ in range(2):
        for reader in ranks:
            combined += _starts([reader.next_batch(2)])
    rest = SampleReader(split, LocalStorage(), T, seed=5)
    rest.load_state_dict(ranks[0].state_dict())
    combined += _starts(_batches(rest, 4, 4))
    assert combined == single


def test_too_little_data_is_a_clear_error(tmp_path: Path) -> None:
    uri = f"file://{tmp_path}/val"
    _write(uri, LocalStorage(), tokens=T)
    reader = SampleReader(uri, LocalStorage(), T)
    assert reader.num_samples == 0
    with pytest.raises(ValueError, match="too few for one sample"):
        reader.next_batch(1)


def test_s3_shards_are_cached_and_verified(
    s3_server: str, split: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LMFORGE_S3_BACKOFF", "0.001")  # the corrupt shard is retried before it is reported
    s3_client(s3_server).create_bucket(Bucket="shards")
    storage = storage_for("s3://shards", S3Settings(endpoint=s3_server))
    _write("s3://shards/prep/train", storage, mask=True)
    local = f"file://{tmp_path}/masked"
    _write(local, LocalStorage(), mask=True)
    cache = tmp_path / "cache"
    remote = SampleReader("s3://shards/prep/train", storage, T, seed=2, cache=cache)
    here = SampleReader(local, LocalStorage(), T, seed=2)
    for _ in range(5):
        (rx, ry), (lx, ly) = remote.next_batch(8), here.next_batch(8)
        assert torch.equal(rx, lx) and torch.equal(ry, ly)
    assert len(list(cache.iterdir())) > 2

    s3_client(s3_server).put_object(Bucket="shards", Key="prep/train/shard-00004.bin", Body=b"\0" * 200)
    fresh = SampleReader("s3://shards/prep/train", storage, T, shuffle=False, cache=tmp_path / "cache2")
    with pytest.raises(ShardError, match="shard-00004.bin .*corrupt"):
        for _ in range(10):
            fresh.next_batch(10)


def test_a_shard_name_that_leaves_the_split_is_refused(split: str, tmp_path: Path) -> None:
    """index.json is data someone else wrote: a shard named ../x would be read from outside the split."""
    import json

    from lmforge.data.safe_paths import UnsafeName

    index_path = tmp_path / "train" / "index.json"
    index = json.loads(index_path.read_text())
    (tmp_path / "secret.bin").write_bytes((tmp_path / "train" / index["shards"][0]["name"]).read_bytes())
    index["shards"][0]["name"] = "../secret.bin"
    index_path.write_text(json.dumps(index))
    with pytest.raises(UnsafeName, match="shard file in .*index.json"):
        SampleReader(split, LocalStorage(), T, shuffle=False)
