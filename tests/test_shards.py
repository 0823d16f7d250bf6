"""The token shard format: writer, index, checksums."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lmforge.data.shards import ShardError, ShardWriter, read_index, verify
from lmforge.data.storage import LocalStorage


def _docs(rng: np.random.Generator, count: int, vocab: int) -> list[list[int]]:
    return [list(rng.integers(1, vocab, size=int(rng.integers(1, 40)))) + [0] for _ in range(count)]


def test_round_trip_with_masks_across_shards(tmp_path: Path) -> None:
    storage = LocalStorage()
    split = f"file://{tmp_path}/train"
    rng = np.random.default_rng(0)
    docs = _docs(rng, 50, 500)
    masks = [[int(rng.integers(0, 2)) for _ in doc] for doc in docs]
    writer = ShardWriter(split, storage, "abc123", vocab_size=500, shard_tokens=64)
    for i, (doc, mask) in enumerate(zip(docs, masks, strict=True)):
        writer.add(doc, mask if i % 3 else None)  # unmasked documents count as all-learned
    index = writer.close()

    assert index == read_index(split, storage) == verify(split, storage)
    expected = np.concatenate([np.asarray(d) for d in docs])
    expected_mask = np.concatenate([np.asarray(m if i % 3 else [1] * len(m)) for i, m in enumerate(masks)])
    assert index["format"] == 1 and index["dtype"] == "uint16" and index["tokenizer_hash"] == "abc123"
    assert index["total_tokens"] == expected.size
    assert all(s["tokens"] == 64 for s in index["shards"][:-1]) and len(index["shards"]) > 3
    tokens = np.concatenate([np.fromfile(tmp_path / "train" / s["name"], dtype="<u2") for s in index["shards"]])
    mask = np.concatenate([np.fromfile(tmp_path / "train" / s["mask"], dtype=np.uint8) for s in index["shards"]])
    assert np.array_equal(tokens, expected) and np.array_equal(mask, expected_mask)


def test_unmasked_split_has_no_mask_files_and_big_vocab_uses_uint32(tmp_path: Path) -> None:
    storage = LocalStorage()
    split = f"file://{tmp_path}/val"
    with ShardWriter(split, storage, "h", vocab_size=70_000) as writer:
        writer.add([69_999, 5, 0])
    index = read_index(split, storage)
    assert index["dtype"] == "uint32" and index["shards"][0]["mask"] is None
    assert np.fromfile(tmp_path / "val" / "shard-00000.bin", dtype="<u4").tolist() == [69_999, 5, 0]
    assert sorted(p.name for p in (tmp_path / "val").iterdir()) == ["index.json", "shard-00000.bin"]


def test_empty_split_and_bad_input(tmp_path: Path) -> None:
    storage = LocalStorage()
    index = ShardWriter(f"file://{tmp_path}/val", storage, "h", vocab_size=300).close()
    assert index["total_tokens"] == 0 and index["shards"] == []
    writer = ShardWriter(f"file://{tmp_path}/x", storage, "h", vocab_size=300)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        writer.add([1, 300])
    with pytest.raises(ValueError, match="mask has 1 entries for 2 tokens"):
        writer.add([1, 2], [1])


def test_index_is_written_last_and_removed_first(tmp_path: Path) -> None:
    storage = LocalStorage()
    split = f"file://{tmp_path}/train"
    with ShardWriter(split, storage, "h", vocab_size=300) as writer:
        writer.add([1, 2, 0])
    assert (tmp_path / "train" / "index.json").exists()
    writer = ShardWriter(split, storage, "h", vocab_size=300, shard_tokens=2)
    assert not (tmp_path / "train" / "index.json").exists()  # a rewrite starts by invalidating the split
    writer.add([3, 4, 5, 0])
    assert not (tmp_path / "train" / "index.json").exists()
    writer.close()
    with pytest.raises(FileNotFoundError, match="never prepared or its preparation did not finish"):
        read_index(f"file://{tmp_path}/missing", storage)


def test_corruption_is_detected_naming_the_shard(tmp_path: Path) -> None:
    storage = LocalStorage()
    split = f"file://{tmp_path}/train"
    writer = ShardWriter(split, storage, "h", vocab_size=300, shard_tokens=8)
    writer.add(list(range(1, 30)), [0] * 10 + [1] * 19)
    writer.close()
    verify(split, storage)

    shard = tmp_path / "train" / "shard-00002.bin"
    data = bytearray(shard.read_bytes())
    data[3] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="shard-00002.bin .*corrupt"):
        verify(split, storage)
    shard.write_bytes(bytes(data[:-2]))
    with pytest.raises(ShardError, match="shard-00002.bin .*truncated"):
        verify(split, storage)

    shard.write_bytes(bytes(data))
    data[3] ^= 0xFF
    shard.write_bytes(bytes(data))
    mask = tmp_path / "train" / "shard-00001.mask.bin"
    mask.write_bytes(b"\x01" * 8)
    with pytest.raises(ShardError, match="shard-00001.mask.bin .*corrupt"):
        verify(split, storage)
    mask.unlink()
    with pytest.raises(ShardError, match="shard-00001.mask.bin .*missing"):
        verify(split, storage)

    index = json.loads((tmp_path / "train" / "index.json").read_text())
    index["total_tokens"] += 1
    (tmp_path / "train" / "index.json").write_text(json.dumps(index))
    with pytest.raises(ShardError, match="do not add up"):
        read_index(split, storage)
