"""The binary token shard format.

A prepared data set has one directory per split (``<prepared>/train/``, ``<prepared>/val/``)::

    shard-00000.bin        tokens, little-endian uint16 (vocabulary <= 65535) or uint32
    shard-00000.mask.bin   optional: one uint8 per token, 1 = the token is learned (SFT responses)
    shard-00001.bin
    ...
    index.json             written LAST: a split with an index is complete

``index.json``::

    {"format": 1, "dtype": "uint16", "tokenizer_hash": "<16 hex>", "vocab_size": 8192,
     "total_tokens": N,
     "shards": [{"name": "shard-00000.bin", "tokens": n, "sha256": "<hex of the .bin bytes>",
                 "crc32": <int>, "etag": "<S3 ETag>" | null, "mask": "shard-00000.mask.bin" | null,
                 "mask_sha256": "<hex>" | null, "mask_crc32": <int> | null, "mask_etag": ... | null}, ...]}

``sha256`` names and fully verifies a file. The streaming reader checks each download cheaply: with
the ``etag`` the store gave when the shard was written, S3 itself refuses another version
(``If-Match``), at no CPU cost here; without one (local data, or data copied to another store, whose
ETags differ) it checks ``crc32``, a third of sha256's cost. Both are optional: older indexes lack them.

The token stream is the concatenation of all shards in index order; documents are concatenated,
each followed by the end-of-text token (which the writer's caller appends; for SFT its mask is 1).
A shard without a mask file has every token learned. Every shard except the last holds exactly
``shard_tokens`` tokens; documents may straddle shards. A writer deletes an existing
``index.json`` before writing any shard, so a crash mid-write never leaves a stale index pointing
at mismatched shards.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np

from lmforge.data.storage import Storage, join_uri

FORMAT = 1
INDEX = "index.json"


class ShardError(ValueError):
    """A split whose index or shards are missing, malformed or corrupt."""


def dtype_for(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 65535 else "uint32"


def shard_name(number: int) -> str:
    return f"shard-{number:05d}.bin"


def mask_name(number: int) -> str:
    return f"shard-{number:05d}.mask.bin"


def numpy_dtype(name: str) -> np.dtype:
    if name not in ("uint16", "uint32"):
        raise ShardError(f"unknown shard dtype {name!r}; expected uint16 or uint32")
    return np.dtype("<u2" if name == "uint16" else "<u4")


class ShardWriter:
    """Append documents' token ids (and optional loss masks) to a split directory.

    ``add`` writes ids verbatim; the caller appends the end-of-text token to each document.
    ``close`` flushes the last shard and writes ``index.json``, and returns the index.
    """

    def __init__(
        self,
        split_uri: str,
        storage: Storage,
        tokenizer_hash: str,
        vocab_size: int,
        shard_tokens: int = 2**24,
    ) -> None:
        if shard_tokens < 1:
            raise ValueError("shard_tokens must be >= 1")
        self.split_uri = split_uri
        self.storage = storage
        self.tokenizer_hash = tokenizer_hash
        self.vocab_size = int(vocab_size)
        self.shard_tokens = int(shard_tokens)
        self.dtype = dtype_for(self.vocab_size)
        self._np_dtype = numpy_dtype(self.dtype)
        self._ids: deque[np.ndarray] = deque()
        self._masks: deque[np.ndarray | None] = deque()
        self._buffered = 0
        self._shards: list[dict[str, Any]] = []
        self._total = 0
        self._closed = False
        storage.delete(join_uri(split_uri, INDEX))

    def add(self, ids: Sequence[int], mask: Sequence[int] | None = None) -> None:
        if self._closed:
            raise RuntimeError(f"ShardWriter for {self.split_uri} is closed")
        array = np.asarray(ids, dtype=np.int64).reshape(-1)
        if array.size == 0:
            return
        low, high = int(array.min()), int(array.max())
        if low < 0 or high >= self.vocab_size:
            raise ValueError(f"token id {low if low < 0 else high} is outside the vocabulary [0, {self.vocab_size})")
        mask_array = None
        if mask is not None:
            mask_array = np.asarray(mask, dtype=np.int64).reshape(-1)
            if mask_array.shape != array.shape:
                raise ValueError(f"mask has {mask_array.size} entries for {array.size} tokens")
            if mask_array.size and (int(mask_array.min()) < 0 or int(mask_array.max()) > 1):
                raise ValueError("mask values must be 0 or 1")
            mask_array = mask_array.astype(np.uint8)
        self._ids.append(array.astype(self._np_dtype))
        self._masks.append(mask_array)
        self._buffered += array.size
        while self._buffered >= self.shard_tokens:
            self._flush(self.shard_tokens)

    def _flush(self, count: int) -> None:
        """Write the first ``count`` buffered tokens as the next shard."""
        ids_parts: list[np.ndarray] = []
        mask_parts: list[np.ndarray | None] = []
        taken = 0
        while taken < count:
            ids, mask = self._ids[0], self._masks[0]
            need = count - taken
            if ids.size <= need:
                ids_parts.append(ids)
                mask_parts.append(mask)
                self._ids.popleft()
                self._masks.popleft()
                taken += ids.size
            else:
                ids_parts.append(ids[:need])
                mask_parts.append(None if mask is None else mask[:need])
                self._ids[0] = ids[need:]
                self._masks[0] = None if mask is None else mask[need:]
                taken += need
        self._buffered -= count
        number = len(self._shards)
        tokens = np.concatenate(ids_parts).astype(self._np_dtype, copy=False)
        data = tokens.tobytes()
        name = shard_name(number)
        etag = self.storage.write_bytes(join_uri(self.split_uri, name), data)
        entry: dict[str, Any] = {
            "name": name,
            "tokens": int(tokens.size),
            "sha256": hashlib.sha256(data).hexdigest(),
            "crc32": zlib.crc32(data),
            "etag": etag,
            "mask": None,
            "mask_sha256": None,
            "mask_crc32": None,
            "mask_etag": None,
        }
        if any(m is not None for m in mask_parts):
            pairs = zip(ids_parts, mask_parts, strict=True)
            mask = np.concatenate([np.ones(ids.size, dtype=np.uint8) if m is None else m for ids, m in pairs])
            mask_bytes = mask.tobytes()
            entry["mask"] = mask_name(number)
            entry["mask_sha256"] = hashlib.sha256(mask_bytes).hexdigest()
            entry["mask_crc32"] = zlib.crc32(mask_bytes)
            entry["mask_etag"] = self.storage.write_bytes(join_uri(self.split_uri, entry["mask"]), mask_bytes)
        self._shards.append(entry)
        self._total += entry["tokens"]

    @property
    def total_tokens(self) -> int:
        """Tokens added so far (written or buffered)."""
        return self._total + self._buffered

    def close(self) -> dict[str, Any]:
        """Flush the last shard, write ``index.json`` (last) and return the index."""
        if self._closed:
            raise RuntimeError(f"ShardWriter for {self.split_uri} is already closed")
        if self._buffered:
            self._flush(self._buffered)
        index = {
            "format": FORMAT,
            "dtype": self.dtype,
            "tokenizer_hash": self.tokenizer_hash,
            "vocab_size": self.vocab_size,
            "total_tokens": self._total,
            "shards": self._shards,
        }
        self.storage.write_bytes(join_uri(self.split_uri, INDEX), json.dumps(index, indent=1).encode())
        self._closed = True
        return index

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None and not self._closed:
            self.close()


def read_index(split_uri: str, storage: Storage) -> dict[str, Any]:
    """The split's ``index.json``; FileNotFoundError when the split was never completed."""
    uri = join_uri(split_uri, INDEX)
    try:
        raw = storage.read_bytes(uri)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{uri} does not exist: the split was never prepared or its preparation did not finish"
        ) from None
    try:
        index = json.loads(raw)
    except ValueError as exc:
        raise ShardError(f"{uri} is not valid JSON: {exc}") from None
    found = index.get("format") if isinstance(index, dict) else None
    if found != FORMAT:
        raise ShardError(f"{uri} has format {found!r}; this lmforge reads format {FORMAT}")
    for key in ("dtype", "total_tokens", "shards"):
        if key not in index:
            raise ShardError(f"{uri} lacks {key!r}")
    numpy_dtype(index["dtype"])
    if sum(int(s["tokens"]) for s in index["shards"]) != int(index["total_tokens"]):
        raise ShardError(f"{uri}: the shards' token counts do not add up to total_tokens={index['total_tokens']}")
    return index


def verify(split_uri: str, storage: Storage) -> dict[str, Any]:
    """Check every shard's (and mask's) size and sha256 against the index; returns the index.

    Raises :class:`ShardError` naming the first bad shard.
    """
    index = read_index(split_uri, storage)
    itemsize = numpy_dtype(index["dtype"]).itemsize
    for shard in index["shards"]:
        files = [(shard["name"], shard["sha256"], int(shard["tokens"]) * itemsize)]
        if shard.get("mask"):
            files.append((shard["mask"], shard.get("mask_sha256"), int(shard["tokens"])))
        for name, expected, size in files:
            uri = join_uri(split_uri, name)
            try:
                data = storage.read_bytes(uri)
            except FileNotFoundError:
                raise ShardError(f"shard {name} of {split_uri} is missing ({uri}); prepare the data again") from None
            if len(data) != size:
                raise ShardError(
                    f"shard {name} of {split_uri} has {len(data)} bytes, the index expects {size}; "
                    "it is truncated or corrupt: prepare the data again"
                )
            if expected is not None and hashlib.sha256(data).hexdigest() != expected:
                raise ShardError(
                    f"shard {name} of {split_uri} is corrupt: its sha256 does not match index.json; "
                    "prepare the data again"
                )
    return index
