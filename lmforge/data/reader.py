"""A deterministic, resumable stream of training samples over a split's token shards.

Samples: the split's token stream (all shards concatenated) is cut into non-overlapping windows of
``context_length + 1`` tokens with stride ``context_length``; sample ``i`` starts at token
``i * context_length``, so there are ``(total_tokens - 1) // context_length`` samples. A sample gives
``x = window[:-1]`` and ``y = window[1:]``, with ``y = -100`` (ignored by the loss) wherever the
target token's mask is 0 (SFT prompts).

Order: epoch ``e`` visits the samples in the order of ``numpy.random.default_rng(seed + e)
.permutation(num_samples)`` (identity with ``shuffle=False``). A *global position* ``p`` counts the
samples consumed by all ranks together since the start (all epochs); position ``p`` is sample
``order(p // num_samples)[p % num_samples]``. Each ``next_batch(B)`` call on every rank consumes
``world_size * B`` positions: rank ``r`` takes ``[p + r*B, p + (r+1)*B)``, then ``p += world_size*B``.
Every rank advances the same ``p``, so the state is one integer: resuming is exact, and a run may
resume with a different world size (it continues from the same global position, without
repeating or skipping samples).

``file://`` shards are memory-mapped in place; ``s3://`` shards are downloaded whole, once, into a
local cache (content-addressed by sha256, verified on download) and memory-mapped from there.
"""

from __future__ import annotations

import bisect
import hashlib
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.data.shards import ShardError, numpy_dtype, read_index
from lmforge.data.storage import Storage, cache_dir, join_uri, local_path

IGNORE_INDEX = -100


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class SampleReader:
    """Batches ``(x, y)`` of shape ``[B, context_length]`` for one rank (see the module docstring)."""

    def __init__(
        self,
        split_uri: str,
        storage: Storage,
        context_length: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        cache: Path | None = None,
    ) -> None:
        if context_length < 1:
            raise ValueError(f"context_length must be >= 1, got {context_length}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of size {world_size}")
        self.split_uri = split_uri
        self.storage = storage
        self.context_length = int(context_length)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self._cache = cache
        self.index = read_index(split_uri, storage)
        self.dtype = numpy_dtype(self.index["dtype"])
        self.shards: list[dict[str, Any]] = [s for s in self.index["shards"] if int(s["tokens"]) > 0]
        self.total_tokens = int(self.index["total_tokens"])
        self.num_samples = max(0, (self.total_tokens - 1) // self.context_length)
        self.has_mask = any(s.get("mask") for s in self.shards)
        self._starts: list[int] = []
        offset = 0
        for shard in self.shards:
            self._starts.append(offset)
            offset += int(shard["tokens"])
        self._tokens: list[np.ndarray | None] = [None] * len(self.shards)
        self._masks: list[np.ndarray | None] = [None] * len(self.shards)
        self._orders: dict[int, np.ndarray] = {}
        self.position = 0
        self.wait_seconds = 0.0
        self.samples_read = 0
        self.bytes_read = 0

    # --- order and state ----------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        return self.position // self.num_samples if self.num_samples else 0

    def _order(self, epoch: int) -> np.ndarray:
        order = self._orders.get(epoch)
        if order is None:
            order = np.random.default_rng(self.seed + epoch).permutation(self.num_samples)
            if len(self._orders) >= 2:
                self._orders.pop(min(self._orders))
            self._orders[epoch] = order
        return order

    def sample_index(self, position: int) -> int:
        """The sample at global ``position``."""
        epoch, offset = divmod(position, self.num_samples)
        return int(self._order(epoch)[offset]) if self.shuffle else offset

    def state_dict(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "epoch": self.epoch,
            "seed": self.seed,
            "world_size": self.world_size,
            "num_samples": self.num_samples,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state["position"]`` (a global position, valid for any world size)."""
        position = int(state["position"])
        if position < 0:
            raise ValueError(f"reader position must be >= 0, got {position}")
        seed = int(state.get("seed", self.seed))
        if seed != self.seed:
            self.seed = seed
            self._orders.clear()
        saved_samples = state.get("num_samples")
        if saved_samples is not None and int(saved_samples) != self.num_samples:
            warnings.warn(
                f"{self.split_uri}: the saved reader state is for {saved_samples} samples, the split has "
                f"{self.num_samples}; the data changed, so the resumed order differs from the original run",
                stacklevel=2,
            )
        self.position = position

    # --- reading ------------------------------------------------------------------------------

    def _local_file(self, name: str, sha256: str | None, expected_size: int) -> Path:
        uri = join_uri(self.split_uri, name)
        if uri.startswith("file://"):
            path = local_path(uri)
            if not path.is_file():
                raise ShardError(f"shard {name} of {self.split_uri} is missing ({path}); prepare the data again")
        else:
            key = sha256 or hashlib.sha256(uri.encode()).hexdigest()
            path = (self._cache or cache_dir("shards")) / f"{key}-{name}"
            if not (path.is_file() and path.stat().st_size == expected_size):
                self.storage.download_file(uri, path)
                if sha256 is not None and _sha256_file(path) != sha256:
                    path.unlink(missing_ok=True)
                    raise ShardError(
                        f"shard {name} of {self.split_uri} is corrupt: its sha256 does not match index.json; "
                        "prepare the data again"
                    )
        size = path.stat().st_size
        if size != expected_size:
            raise ShardError(
                f"shard {name} of {self.split_uri} has {size} bytes, the index expects {expected_size}; "
                "it is truncated or corrupt: prepare the data again"
            )
        return path

    def _shard(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        tokens = self._tokens[i]
        if tokens is None:
            shard = self.shards[i]
            count = int(shard["tokens"])
            path = self._local_file(shard["name"], shard.get("sha256"), count * self.dtype.itemsize)
            tokens = np.memmap(path, dtype=self.dtype, mode="r", shape=(count,))
            self._tokens[i] = tokens
            if shard.get("mask"):
                mask_path = self._local_file(shard["mask"], shard.get("mask_sha256"), count)
                self._masks[i] = np.memmap(mask_path, dtype=np.uint8, mode="r", shape=(count,))
        return tokens, self._masks[i]

    def _read(self, start: int, length: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Tokens ``[start, start + length)`` of the stream (int64) and their mask (or None)."""
        tokens = np.empty(length, dtype=np.int64)
        mask = np.ones(length, dtype=np.uint8) if self.has_mask else None
        i = bisect.bisect_right(self._starts, start) - 1
        done = 0
        while done < length:
            shard_tokens, shard_mask = self._shard(i)
            begin = start + done - self._starts[i]
            take = min(length - done, shard_tokens.shape[0] - begin)
            tokens[done : done + take] = shard_tokens[begin : begin + take]
            if mask is not None and shard_mask is not None:
                mask[done : done + take] = shard_mask[begin : begin + take]
            done += take
            i += 1
        self.bytes_read += length * self.dtype.itemsize + (length if self.has_mask else 0)
        return tokens, mask

    def sample(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Sample ``index`` as int64 arrays ``(x, y)`` of length ``context_length``."""
        length = self.context_length
        tokens, mask = self._read(index * length, length + 1)
        x = tokens[:-1]
        y = tokens[1:].copy()
        if mask is not None:
            y[mask[1:] == 0] = IGNORE_INDEX
        return x, y

    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's next ``batch_size`` samples as LongTensors ``x``, ``y`` of shape ``[B, T]``."""
        started = time.perf_counter()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if self.num_samples == 0:
            raise ValueError(
                f"{self.split_uri} has {self.total_tokens} tokens, too few for one sample of "
                f"context_length + 1 = {self.context_length + 1} tokens; add data (or, for the "
                "validation split, raise data.validationFraction) or lower model.contextLength"
            )
        x = np.empty((batch_size, self.context_length), dtype=np.int64)
        y = np.empty((batch_size, self.context_length), dtype=np.int64)
        first = self.position + self.rank * batch_size
        for j in range(batch_size):
            x[j], y[j] = self.sample(self.sample_index(first + j))
        self.position += self.world_size * batch_size
        self.samples_read += batch_size
        self.wait_seconds += time.perf_counter() - started
        return torch.from_numpy(x), torch.from_numpy(y)

    def close(self) -> None:
        """Drop the memory maps (they are reopened on the next read)."""
        self._tokens = [None] * len(self.shards)
        self._masks = [None] * len(self.shards)
