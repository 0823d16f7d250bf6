"""Background prefetch: fetch the blocks that the upcoming sample positions need, ahead of the consumer.

The reader hands the :class:`Prefetcher` a *plan*: an iterator of ``(global position, block id)``
in the order the consumer will need them (:func:`plan_blocks`: the block of each upcoming sample's
first token, found in the split's :class:`BlockLayout`). The prefetcher fetches through a
:class:`BlockSource`, the split's block store (:class:`lmforge.data.blocks.BlockStore`). A
coordinator thread walks the plan and submits each block that is neither cached nor already on its
way to a small pool of fetch threads, keeping at most ``depth`` blocks fetched-or-in-flight and not
yet consumed (the *queue*: :attr:`Prefetcher.depth` is its current length, exported as a metric).
It stays at most ``horizon`` positions ahead of the consumer, so a fully cached data set costs no
busy walking, and it waits for room in a bounded cache instead of evicting what the consumer still
needs. Prefetched blocks stay pinned in the cache until the consumer takes them.

A fetch that fails (after :mod:`lmforge.data.retry`'s retries) is raised to the consumer when it
takes that block, never swallowed; a block that the consumer never asks for (the plan changed on
``load_state_dict``) is simply unpinned.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from lmforge.data.order import SampleOrder


@dataclass
class BlockLayout:
    """Where every sample's bytes live: per shard, its token and mask files' first block and block size.

    Plain arrays (no reference to the reader or its block store), so the prefetch plan can outlive
    nothing it should not.
    """

    starts: np.ndarray  # first token of each shard in the stream
    token_block: np.ndarray  # first block id of each shard's token file
    token_block_size: np.ndarray  # bytes per block of that file
    mask_block: np.ndarray  # first block id of each shard's mask file, -1 without a mask
    mask_block_size: np.ndarray
    itemsize: int
    context_length: int
    num_samples: int
    order: SampleOrder

    def blocks(self, samples: np.ndarray) -> list[np.ndarray]:
        """Block ids (one array per kind) holding the first token of each sample. The tail of a window
        that crosses into another shard is not planned: that shard's turn in the order may be far off,
        so the block store fetches just those bytes (:meth:`lmforge.data.blocks.BlockStore.file_bytes`)."""
        out = []
        token = samples * self.context_length
        shard = np.searchsorted(self.starts, token, side="right") - 1
        offset = token - self.starts[shard]
        out.append(self.token_block[shard] + (offset * self.itemsize) // self.token_block_size[shard])
        has_mask = self.mask_block[shard] >= 0
        if has_mask.any():
            mask = self.mask_block[shard] + offset // self.mask_block_size[shard]
            out.append(np.where(has_mask, mask, -1))
        return out


def plan_blocks(
    layout: BlockLayout, start: int, batch: int, rank: int, world: int, stride: int
) -> Iterator[tuple[int, int]]:
    """``(position, block id)`` in the order the consumer at ``start`` needs them, forever.

    The consumer's ``k``-th next batch covers positions ``start + k*stride*world*batch + rank*batch``
    plus ``[0, batch)``.
    """
    step = stride * world * batch
    chunk = max(1, 4096 // batch)
    k = 0
    while True:
        base = start + (k + np.arange(chunk, dtype=np.int64)) * step + rank * batch
        positions = (base[:, None] + np.arange(batch, dtype=np.int64)[None, :]).reshape(-1)
        k += chunk
        samples = layout.order.samples(positions)
        # Each block once per chunk, at the first position that needs it (so the walk costs per block,
        # not per sample). Every chunk yields at least one entry, even when it needs only blocks seen
        # before: a generator that stayed silent would spin forever on a split of one block.
        blocks = np.stack(layout.blocks(samples), axis=1).reshape(-1)
        owners = np.repeat(positions, blocks.shape[0] // positions.shape[0])
        unique, first = np.unique(blocks, return_index=True)
        keep = unique >= 0
        order = np.argsort(first[keep], kind="stable")
        yield from zip(owners[first[keep][order]].tolist(), unique[keep][order].tolist(), strict=True)


class BlockSource(Protocol):
    """What the prefetcher needs from the block store, per block id."""

    def fetch_block(self, block: int) -> None: ...

    def block_cached(self, block: int) -> bool: ...

    def wait_block_room(self, block: int, timeout: float) -> bool: ...

    def pin_block(self, block: int) -> None: ...

    def unpin_block(self, block: int) -> None: ...

    def cache_evictions(self) -> int: ...


class Prefetcher:
    """Fetch planned blocks ahead of the consumer on ``threads`` threads, ``depth`` blocks at most."""

    def __init__(self, source: BlockSource, *, depth: int, threads: int, horizon: int) -> None:
        if depth < 1 or threads < 1:
            raise ValueError(f"prefetch depth and threads must be >= 1, got {depth} and {threads}")
        self.source = source
        self.max_depth = depth
        self.horizon = horizon
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="lmforge-fetch")
        self._cond = threading.Condition()
        self._plan: Iterator[tuple[int, int]] | None = None
        self._generation = 0
        self._consumer = 0
        self._inflight: dict[int, Future[None]] = {}
        self._ready: set[int] = set()
        self._claimed: set[int] = set()  # blocks the consumer is fetching itself
        self._at_horizon = False  # the coordinator waits for the consumer to advance
        self._closed = False
        self.submitted = 0
        self._seen: set[int] = set()  # blocks of this plan already present or fetched
        self._seen_generation = -1
        self._seen_evictions = -1
        self.peak_depth = 0
        self._thread = threading.Thread(target=self._run, name="lmforge-prefetch", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        """Blocks fetched or being fetched ahead of the consumer and not yet taken."""
        with self._cond:
            return len(self._inflight) + len(self._ready)

    def start(self, plan: Iterator[tuple[int, int]], consumer_position: int) -> None:
        """Replace the plan (blocks prefetched for the old one are unpinned, not deleted)."""
        with self._cond:
            self._generation += 1
            self._plan = plan
            self._consumer = consumer_position
            for block in self._ready:
                self.source.unpin_block(block)
            self._ready.clear()
            self._cond.notify_all()

    def advance(self, consumer_position: int) -> None:
        """The consumer reached ``consumer_position``: the horizon moves with it."""
        self._consumer = consumer_position  # a plain store: this runs once per batch, keep it cheap
        if self._at_horizon:
            with self._cond:
                self._cond.notify_all()

    def take(self, block: int) -> bool:
        """Wait for ``block`` if it is planned (then it is the consumer's) and return True. Otherwise
        return False: the consumer fetches it itself, and the prefetcher leaves it alone until
        :meth:`release`, so it is never downloaded twice."""
        with self._cond:
            future = self._inflight.get(block)
            if future is None:
                if block in self._ready:
                    self._ready.discard(block)
                    self.source.unpin_block(block)
                    self._cond.notify_all()
                    return True
                self._claimed.add(block)
                return False
        future.result()  # a failed fetch surfaces here, with the URI in its message
        with self._cond:
            self._cond.wait_for(lambda: block not in self._inflight)
            if block in self._ready:
                self._ready.discard(block)
                self.source.unpin_block(block)
                self._cond.notify_all()
        return True

    def release(self, block: int) -> None:
        """The consumer is done fetching ``block`` itself (see :meth:`take`)."""
        with self._cond:
            self._claimed.discard(block)

    def stop(self) -> None:
        """Ask the threads to finish, without waiting (safe from a finalizer)."""
        with self._cond:
            self._closed = True
            self._plan = None
            self._cond.notify_all()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._plan = None
            self._cond.notify_all()
        self._thread.join(timeout=5)
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._cond:
            for block in self._ready:
                self.source.unpin_block(block)
            self._ready.clear()

    # --- the coordinator thread ------------------------------------------------------------------

    def _done(self, block: int, generation: int, future: Future[None]) -> None:
        try:
            self._settle(block, generation, future)
        except ReferenceError:
            pass

    def _settle(self, block: int, generation: int, future: Future[None]) -> None:
        with self._cond:
            self._inflight.pop(block, None)
            ok = not future.cancelled() and future.exception() is None  # cancelled: close() ran
            if ok and generation == self._generation and not self._closed:
                self._ready.add(block)
            else:  # stale, closed or failed (the consumer's take() re-raises from the future)
                self.source.unpin_block(block)
            self._cond.notify_all()

    def _next(self) -> tuple[int, int, int] | None:
        """The next planned block that may need fetching and its plan generation, or None when closed.

        The lock is taken per plan entry, never for a whole walk, so the consumer is never starved;
        the horizon is checked first, so a plan whose blocks are all present does not spin.
        """
        while True:
            with self._cond:
                if self._closed:
                    return None
                if self._plan is None or len(self._inflight) + len(self._ready) >= self.max_depth:
                    self._cond.wait(timeout=1.0)
                    continue
                generation = self._generation
                try:
                    position, block = next(self._plan)
                except StopIteration:
                    self._plan = None
                    continue
                while position > self._consumer + self.horizon and generation == self._generation:
                    if self._closed:
                        return None
                    self._at_horizon = True
                    self._cond.wait(timeout=1.0)
                self._at_horizon = False
                if generation != self._generation:
                    continue
                if generation != self._seen_generation or self.source.cache_evictions() != self._seen_evictions:
                    self._seen.clear()  # a new plan, or the cache dropped something: check again
                    self._seen_generation = generation
                    self._seen_evictions = self.source.cache_evictions()
                if block in self._seen or block in self._inflight or block in self._ready or block in self._claimed:
                    continue
                self._seen.add(block)
                return position, block, generation

    def _run(self) -> None:
        try:
            self._loop()
        except ReferenceError:  # the block store (its reader) was garbage-collected: nothing left to prefetch for
            self.stop()

    def _loop(self) -> None:
        while True:
            item = self._next()
            if item is None:
                return
            _, block, generation = item
            if self.source.block_cached(block):
                continue
            while not self.source.wait_block_room(block, timeout=0.5):
                with self._cond:
                    if self._closed or generation != self._generation:
                        break
            with self._cond:
                if self._closed or generation != self._generation:
                    continue
                if block in self._claimed or self.source.block_cached(block):
                    continue  # the consumer fetched it meanwhile
                self.source.pin_block(block)
                try:
                    future = self._pool.submit(self.source.fetch_block, block)
                except RuntimeError:  # stop() ran meanwhile (the reader's finalizer can run on this thread)
                    self.source.unpin_block(block)
                    return
                self._inflight[block] = future
                self.submitted += 1
                self.peak_depth = max(self.peak_depth, len(self._inflight) + len(self._ready))
            future.add_done_callback(lambda f, b=block, g=generation: self._done(b, g, f))
