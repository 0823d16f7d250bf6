"""Streaming from S3 at scale: retries through a faulty store, workers, world-size changes, bounded
cache, prefetch, metrics. Everything against a real moto S3 server on 127.0.0.1."""

# ruff: noqa: F811  (pytest injects the imported s3_server fixture by parameter name)
from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.api.common import S3Settings
from lmforge.data.reader import SampleReader, StreamSettings
from lmforge.data.retry import RetryPolicy, StorageUnavailable
from lmforge.data.shards import ShardError, ShardWriter
from lmforge.data.storage import S3Storage
from lmforge.data.workers import WorkerReader, open_reader
from tests.s3fixture import FaultyS3Proxy, s3_client, s3_server  # noqa: F401

T = 8
SAMPLES = 512  # per epoch: divisible by every batch x world size used below
SPLIT = "s3://data/prep/train"
FAST_RETRIES = RetryPolicy(attempts=8, base=0.001, cap=0.01)


def _storage(endpoint: str) -> S3Storage:
    return S3Storage(S3Settings(endpoint=endpoint, addressingStyle="path"))


def _upload(endpoint: str, shard_tokens: int = 500, mask: bool = True) -> None:
    """Tokens 0, 1, 2, ...: a sample's first token tells which sample it is (``x[0] // T``)."""
    s3_client(endpoint).create_bucket(Bucket="data")
    ids = np.arange(SAMPLES * T + 1)
    with ShardWriter(SPLIT, _storage(endpoint), "h", vocab_size=60_000, shard_tokens=shard_tokens) as writer:
        writer.add(ids, (ids % 3 != 0).astype(int) if mask else None)


def _settings(**changes: object) -> StreamSettings:
    return StreamSettings(**{"retry": FAST_RETRIES, **changes})  # type: ignore[arg-type]


def _reader(endpoint: str, tmp_path: Path, name: str, **kwargs: object) -> SampleReader:
    settings = kwargs.pop("settings", None) or _settings()
    return SampleReader(SPLIT, _storage(endpoint), T, cache=tmp_path / name, settings=settings, **kwargs)  # type: ignore[arg-type]


def _samples(x: torch.Tensor) -> list[int]:
    return [int(v) // T for v in x[:, 0]]


def _epoch(reader: SampleReader, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [reader.next_batch(batch) for _ in range(SAMPLES // batch)]


def _check_windows(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """The independent oracle: sample ``s`` is tokens ``s*T ...`` and targets divisible by 3 are masked."""
    for x, y in batches:
        for row_x, row_y in zip(x, y, strict=True):
            start = int(row_x[0])
            assert start % T == 0 and row_x.tolist() == list(range(start, start + T))
            target = torch.arange(start + 1, start + T + 1)
            assert torch.equal(row_y, torch.where(target % 3 == 0, torch.full_like(target, -100), target))


def _same(a: list[tuple[torch.Tensor, torch.Tensor]], b: list[tuple[torch.Tensor, torch.Tensor]]) -> bool:
    return len(a) == len(b) and all(
        torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b, strict=True)
    )


@pytest.mark.parametrize("ranged", [False, True], ids=["whole-object", "ranged"])
def test_faulty_store_is_retried_and_loses_nothing(s3_server: str, tmp_path: Path, ranged: bool) -> None:
    _upload(s3_server)
    # 1000-byte token shards: whole GETs, or (threshold below that) ranged GETs of 256 bytes.
    layout = {"range_threshold": 600, "range_bytes": 256} if ranged else {}
    direct = _epoch(_reader(s3_server, tmp_path, "direct", seed=3, settings=_settings(prefetch_depth=0)), 16)
    with FaultyS3Proxy(s3_server, slowdown_every=4, drop_every=7) as proxy:
        reader = _reader(proxy.endpoint, tmp_path, "faulty", seed=3, settings=_settings(**layout))
        through_faults = _epoch(reader, 16)
        counters = reader.counters()
        reader.close()
    assert _same(through_faults, direct)
    _check_windows(through_faults)
    assert proxy.slowdowns > 0 and proxy.drops > 0
    assert counters["s3_errors"] == proxy.slowdowns + proxy.drops  # each failed GET counted once
    assert counters["s3_retries"] == counters["s3_errors"]  # and each retried (none gave up)
    assert counters["bytes_read"] >= (SAMPLES * T + 1) * 3  # tokens (2 bytes) + mask (1 byte), all fetched
    if ranged:
        assert any(".0-256" in p.name for p in (tmp_path / "faulty").iterdir())


def test_a_store_that_always_fails_is_a_clear_error_after_bounded_retries(s3_server: str, tmp_path: Path) -> None:
    _upload(s3_server)
    with FaultyS3Proxy(s3_server, fail_all=True) as proxy:
        settings = _settings(prefetch_depth=0, retry=RetryPolicy(attempts=3, base=0.001, cap=0.01))
        reader = _reader(proxy.endpoint, tmp_path, "cache", shuffle=False, settings=settings)
        with pytest.raises(StorageUnavailable, match=r"reading s3://data/prep/train/shard-00000.bin failed 3 times"):
            reader.next_batch(4)
    assert proxy.slowdowns == 3
    assert reader.counters()["s3_errors"] == 3 and reader.counters()["s3_retries"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_resume_with_another_world_size_reads_every_sample_once(
    s3_server: str, tmp_path: Path, before: int, after: int
) -> None:
    _upload(s3_server)
    global_batch = 8
    straight = [
        s for x, _ in _epoch(_reader(s3_server, tmp_path, "straight", seed=5), global_batch) for s in _samples(x)
    ]

    first = [_reader(s3_server, tmp_path, f"a{r}", seed=5, rank=r, world_size=before) for r in range(before)]
    seen: list[int] = []
    for _ in range(20):  # 160 positions with `before` ranks
        seen += [s for reader in first for s in _samples(reader.next_batch(global_batch // before)[0])]
    state = first[0].state_dict()
    assert all(reader.state_dict() == state for reader in first) and state["position"] == 160
    second = [_reader(s3_server, tmp_path, f"b{r}", seed=5, rank=r, world_size=after) for r in range(after)]
    for reader in second:
        reader.load_state_dict(state)
    for _ in range((SAMPLES - 160) // global_batch):
        seen += [s for reader in second for s in _samples(reader.next_batch(global_batch // after)[0])]
    assert sorted(seen) == list(range(SAMPLES))  # every sample of the epoch exactly once
    assert seen == straight  # and in the order of an uninterrupted run
    for reader in first + second:
        reader.close()


@pytest.mark.slow
def test_two_ranks_with_two_workers_each_match_the_plain_readers(s3_server: str, tmp_path: Path) -> None:
    _upload(s3_server)
    storage = _storage(s3_server)
    seen: list[int] = []
    for rank in range(2):
        plain = _reader(s3_server, tmp_path, f"plain{rank}", seed=9, rank=rank, world_size=2)
        expected = [plain.next_batch(4) for _ in range(SAMPLES // 8)]
        template = SampleReader(
            SPLIT, storage, T, rank=rank, world_size=2, seed=9, cache=tmp_path / f"w{rank}", settings=_settings()
        )
        workers = WorkerReader(template, num_workers=2)
        got = [workers.next_batch(4) for _ in range(SAMPLES // 8)]
        assert _same(got, expected)  # same batches, same order as without workers
        assert workers.state_dict()["position"] == SAMPLES
        assert workers.counters()["samples_read"] == SAMPLES // 2
        assert workers.counters()["bytes_read"] > 0  # counted in the worker processes, summed here
        seen += [s for x, _ in got for s in _samples(x)]
        workers.close()
    assert sorted(seen) == list(range(SAMPLES))  # 2 ranks x 2 workers: the epoch exactly once


@pytest.mark.slow
def test_workers_resume_exactly_and_with_or_without_workers(s3_server: str, tmp_path: Path) -> None:
    _upload(s3_server)
    storage = _storage(s3_server)
    straight = _epoch(_reader(s3_server, tmp_path, "straight", seed=1), 8)
    with_workers = open_reader(SPLIT, storage, T, workers=2, seed=1, cache=tmp_path / "w", settings=_settings())
    assert isinstance(with_workers, WorkerReader)
    got = [with_workers.next_batch(8) for _ in range(10)]
    state = with_workers.state_dict()
    with_workers.close()
    again = open_reader(SPLIT, storage, T, workers=1, seed=1, cache=tmp_path / "w", settings=_settings())
    again.load_state_dict(state)
    got += [again.next_batch(8) for _ in range(10)]
    plain = _reader(s3_server, tmp_path, "plain", seed=1)
    plain.load_state_dict(again.state_dict())
    got += [plain.next_batch(8) for _ in range(SAMPLES // 8 - 20)]
    again.close()
    assert _same(got, straight)


def _du(directory: Path) -> int:
    """Bytes of the files in ``directory`` now (files evicted meanwhile count as gone)."""
    total = 0
    for entry in os.scandir(directory):
        with contextlib.suppress(FileNotFoundError):
            total += entry.stat().st_size
    return total


@pytest.mark.parametrize("read_ahead", [8, 4096], ids=["batch-by-batch", "read-ahead"])
def test_bounded_cache_stays_within_its_limit_and_reads_right(s3_server: str, tmp_path: Path, read_ahead: int) -> None:
    _upload(s3_server, mask=False)  # 8 shards of 500 tokens: 1000 bytes each, ranged in 256-byte blocks
    limit = 1024
    settings = _settings(
        cache_bytes=limit, range_threshold=600, range_bytes=256, prefetch_depth=3, read_ahead_samples=read_ahead
    )
    reader = _reader(s3_server, tmp_path, "bounded", seed=4, settings=settings)
    reference = _reader(s3_server, tmp_path, "unbounded", seed=4, settings=_settings(prefetch_depth=0))
    cache = tmp_path / "bounded"
    largest = 0
    for _ in range(2 * SAMPLES // 8):  # two epochs, shuffled: blocks are needed again after eviction
        (x, y), (rx, ry) = reader.next_batch(8), reference.next_batch(8)
        assert torch.equal(x, rx) and torch.equal(y, ry)
        largest = max(largest, _du(cache))
    assert reader.cache is not None and reader.cache.evictions > 0
    assert largest <= limit + 256 and reader.cache.peak <= limit + 256  # limit + the block in use
    assert _du(tmp_path / "unbounded") > 4 * limit  # the data is bigger
    reader.close()


def _check_plain_windows(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Without a mask: each row is T consecutive tokens and its targets are the next ones."""
    for x, y in batches:
        starts = x[:, :1].long()
        assert torch.equal(x.long(), starts + torch.arange(T)) and torch.equal(y.long(), starts + 1 + torch.arange(T))


def test_a_shuffled_epoch_streams_through_a_memory_cache_far_smaller_than_the_data(
    s3_server: str, tmp_path: Path
) -> None:
    _upload(s3_server, shard_tokens=64, mask=False)  # 65 shards of 128 bytes; 8 samples each
    settings = _settings(read_ahead_samples=8)
    streaming = SampleReader(SPLIT, _storage(s3_server), T, seed=5, shuffle_window=32, settings=settings)
    assert streaming.cache is not None and streaming.cache.in_memory  # the default: fetched bytes, no files
    limit = streaming.cache.limit
    assert limit is not None and limit < 8320 // 2  # well under the 8,320 bytes of data
    batches = _epoch(streaming, 8)
    _check_plain_windows(batches)
    assert sorted(s for x, _ in batches for s in _samples(x)) == list(range(SAMPLES))  # each sample once
    # Every shard was downloaded exactly once (windows that cross into another shard read just their
    # tail), and the cache stayed within its bound.
    assert streaming.blocks_fetched == 65
    assert streaming.cache.peak <= limit + 128
    streaming.close()

    # The same cache under a full permutation (a window as large as the data) keeps re-downloading.
    full = SampleReader(
        SPLIT,
        _storage(s3_server),
        T,
        seed=5,
        shuffle_window=10**6,
        settings=_settings(read_ahead_samples=8, cache_bytes=limit),
    )
    _check_plain_windows(_epoch(full, 8))
    assert full.blocks_fetched > 3 * 65
    full.close()


def test_windows_that_cross_into_the_next_shard_cost_no_get_once_its_head_is_known(s3_server: str) -> None:
    _upload(s3_server, shard_tokens=64, mask=False)  # 65 shards of 8 samples; each shard's last window crosses
    storage = _storage(s3_server)
    gets: list[int | None] = []
    fetch = storage.fetch

    def counting(uri: str, start: int = 0, length: int | None = None, **kwargs: object) -> bytes:
        gets.append(length)
        return fetch(uri, start, length, **kwargs)  # type: ignore[arg-type]

    storage.fetch = counting  # type: ignore[method-assign]
    reader = SampleReader(SPLIT, storage, T, seed=5, shuffle_window=32, settings=_settings(read_ahead_samples=8))
    _check_plain_windows(_epoch(reader, 8))
    first_epoch = len(gets)
    second = _epoch(reader, 8)
    _check_plain_windows(second)
    assert sorted(s for x, _ in second for s in _samples(x)) == list(range(SAMPLES))
    # Epoch 2 downloads whole shards only: every window's tail in the next shard comes from that
    # shard's head, kept since its block was fetched in epoch 1.
    assert 0 < len(gets[first_epoch:]) <= 65 and all(length is None for length in gets[first_epoch:])
    reader.close()


def test_a_shard_changed_since_the_index_is_refused_and_copied_data_still_reads(s3_server: str, tmp_path: Path) -> None:
    _upload(s3_server, mask=False)
    client = s3_client(s3_server)
    index = json.loads(client.get_object(Bucket="data", Key="prep/train/index.json")["Body"].read())
    assert all(shard["etag"] for shard in index["shards"])  # S3 checks these (If-Match): no CPU spent here

    # Data copied to another store gets other ETags (multipart copies do): the reader falls back to
    # the index's crc32 and reads every sample right.
    for shard in index["shards"]:
        shard["etag"] = '"0123456789abcdef0123456789abcdef"'
    client.put_object(Bucket="data", Key="prep/train/index.json", Body=json.dumps(index).encode())
    copied = _reader(s3_server, tmp_path, "copied", seed=1)
    batches = _epoch(copied, 16)
    _check_plain_windows(batches)
    assert sorted(s for x, _ in batches for s in _samples(x)) == list(range(SAMPLES))
    copied.close()

    # A shard rewritten with other tokens of the same size (a new prepare run over an old index).
    _upload(s3_server, mask=False)
    client.put_object(Bucket="data", Key="prep/train/shard-00003.bin", Body=np.zeros(500, np.uint16).tobytes())
    stale = _reader(s3_server, tmp_path, "stale", shuffle=False, settings=_settings(prefetch_depth=0))
    with pytest.raises(ShardError, match="shard-00003.bin .*corrupt.*prepare the data again"):
        _epoch(stale, 16)
    stale.close()


def test_a_bounded_default_cache_is_private_to_the_split_rank_and_worker(
    s3_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _upload(s3_server)
    monkeypatch.setenv("LMFORGE_CACHE_DIR", str(tmp_path))
    settings = _settings(cache_bytes=1 << 20)
    reader = SampleReader(SPLIT, _storage(s3_server), T, rank=1, world_size=2, settings=settings)
    reader.next_batch(4)
    reader.close()
    (directory,) = (tmp_path / "lmforge-shards").iterdir()
    assert directory.name.endswith("-rank1-worker0") and any(directory.iterdir())


def test_prefetch_runs_ahead_of_the_consumer(s3_server: str, tmp_path: Path) -> None:
    _upload(s3_server, shard_tokens=64)  # 65 shards (+ masks): many blocks to fetch in order
    counts = {}
    for depth in (0, 4):
        settings = _settings(prefetch_depth=depth, read_ahead_samples=8)  # no batches assembled ahead
        reader = _reader(s3_server, tmp_path, f"depth{depth}", shuffle=False, settings=settings)
        observed_depth = 0
        for _ in range(SAMPLES // 8):
            reader.next_batch(8)
            observed_depth = max(observed_depth, int(reader.counters()["prefetch_depth"]))
            time.sleep(0.002)  # the "training step" the prefetcher overlaps with
        counts[depth] = (reader.inline_fetches, reader.blocks_fetched, observed_depth)
        reader.close()
    inline, fetched, _ = counts[0]
    assert inline == fetched > 100  # without prefetch the consumer fetches every block itself
    inline, fetched, observed = counts[4]
    assert observed > 0  # blocks were waiting for the consumer
    assert inline < fetched // 4  # the consumer rarely had to fetch for itself


def test_stream_settings_from_env_name_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMFORGE_CACHE_BYTES", "64G")
    monkeypatch.setenv("LMFORGE_PREFETCH_DEPTH", "2")
    settings = StreamSettings.from_env()
    assert settings.cache_bytes == 64 << 30 and settings.prefetch_depth == 2
    monkeypatch.setenv("LMFORGE_CACHE_BYTES", "lots")
    with pytest.raises(ValueError, match="LMFORGE_CACHE_BYTES='lots' is not a size.*64G"):
        StreamSettings.from_env()
    monkeypatch.setenv("LMFORGE_CACHE_BYTES", "1M")
    monkeypatch.setenv("LMFORGE_DATA_WORKERS", "two")
    with pytest.raises(ValueError, match="LMFORGE_DATA_WORKERS='two' is not an integer"):
        StreamSettings.from_env()


def test_trainer_metrics_export_the_data_counters(s3_server: str, tmp_path: Path) -> None:
    from lmforge.trainer.metrics import TrainerMetrics

    _upload(s3_server)
    reader = _reader(s3_server, tmp_path, "m", seed=2)
    metrics = TrainerMetrics(job="j", namespace="ns", rank=0, local_rank=0, port=0)
    try:
        for _ in range(3):
            reader.next_batch(8)
        fields = metrics.observe_data(reader)
        reader.next_batch(8)
        fields = metrics.observe_data(reader)
        assert fields["data_samples_read"] == 32 and fields["data_bytes_read"] > 0
        labels = {"job": "j", "namespace": "ns", "rank": "0"}
        value = metrics.registry.get_sample_value
        assert value("lmforge_data_samples_read_total", labels) == 32
        assert value("lmforge_data_bytes_read_total", labels) == fields["data_bytes_read"]
        assert value("lmforge_data_s3_errors_total", labels) == 0
        assert value("lmforge_data_s3_retries_total", labels) == 0
        assert value("lmforge_data_prefetch_queue_depth", labels) is not None
    finally:
        metrics.close()
        reader.close()


@pytest.mark.slow
def test_training_with_data_workers_matches_training_without(tmp_path: Path) -> None:
    """The real trainer (2 DeepSpeed processes): LMFORGE_DATA_WORKERS=2 gives the same data order,
    hence the same losses, and metrics.jsonl records the data counters."""
    from tests.trainer_helpers import CORPUS, lmforge, step_records, tiny_job, trainer_env, write_job

    corpus = tmp_path / "docs.txt"
    corpus.write_text(CORPUS.read_text()[:100_000])
    losses: dict[int, list[float]] = {}
    samples: dict[int, int] = {}
    for workers in (0, 2):
        out = tmp_path / f"out{workers}"
        job = write_job(tmp_path / f"job{workers}.yaml", tiny_job(out, tmp_path / "prepared", corpus, maxSteps=4))
        result = lmforge("run", str(job), env=trainer_env(LMFORGE_DATA_WORKERS=str(workers)))
        assert result.returncode == 0, result.stderr[-3000:]
        records = step_records(out)
        losses[workers] = [records[step]["loss"] for step in sorted(records)]
        samples[workers] = records[max(records)]["data_samples_read"]
        assert records[max(records)]["data_bytes_read"] > 0
    assert losses[2] == losses[0]
    assert samples[2] == samples[0] >= 4 * 4  # rank 0's samples, counted in its worker processes
