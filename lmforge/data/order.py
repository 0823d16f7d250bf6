"""The order in which an epoch visits the samples: a shuffle that streams.

A global permutation of every sample is the textbook shuffle, but over object storage it does not
stream: the first batches already need samples from almost every shard, so a run must download
(and cache) nearly the whole data set before its first step, and a bounded cache thrashes. lmforge
shuffles like the streaming loaders built for object stores (MosaicML Streaming's ``py1e``):

1. the samples are cut into *spans* of ``span`` consecutive samples (about one shard each) and the
   spans are permuted, per epoch: ``c`` is a sample's index in that concatenation;
2. each sample gets the key ``c + jitter(c)``, with ``jitter`` uniform in ``[0, window)`` (a
   counter-based hash of seed, epoch and ``c``, so any part of the order can be computed on its own);
3. the epoch visits the samples in key order (ties by ``c``).

A sample therefore lands at most ``window`` positions from where its span put it, and neighbouring
samples of a shard are spread over ``window`` positions: a batch mixes about ``window / span``
shards, while the consumer only ever needs a sliding window of about ``window / span + 1`` shards,
which the prefetcher fetches ahead in order. With ``window >= num_samples`` (small data) the order
is a full permutation, ``numpy.random.default_rng(seed + epoch).permutation(num_samples)``.

The order is a pure function of ``(num_samples, span, window, seed, epoch)``: every rank, worker
and resumed run computes the same order, whatever the world size. It is computed lazily in
*segments* of keys ``[g*L, (g+1)*L)`` (``L = 4 * window``), so its memory and cost do not grow
with the data set.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np

from lmforge.api.data import Data

# Samples shuffled together (data.shuffleWindow): 8 default shards (2**24 tokens) at contextLength 1024.
DEFAULT_WINDOW: int = Data.model_fields["shuffle_window"].default

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _splitmix64(values: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer on uint64 ``values`` (arrays wrap mod 2**64)."""
    z = values + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


class _Epoch:
    """One epoch's span permutation and jitter salt."""

    def __init__(self, num_samples: int, span: int, seed: int, epoch: int) -> None:
        count = -(-num_samples // span)
        self.spans = np.random.default_rng([seed, epoch]).permutation(count).astype(np.int64)
        lengths = np.full(count, span, dtype=np.int64)
        lengths[count - 1] = num_samples - (count - 1) * span
        self.first = np.concatenate([[0], np.cumsum(lengths[self.spans])[:-1]])  # c of each permuted span
        self.salt = np.random.SeedSequence([seed, epoch, 0x5EED]).generate_state(1, dtype=np.uint64)[0]
        self.span = span

    def jitter(self, c: np.ndarray, window: int) -> np.ndarray:
        return (_splitmix64(c.astype(np.uint64) ^ self.salt) % np.uint64(window)).astype(np.int64)

    def sample_of(self, c: np.ndarray) -> np.ndarray:
        """Sample index of concatenation index ``c``."""
        j = np.searchsorted(self.first, c, side="right") - 1
        return self.spans[j] * self.span + (c - self.first[j])


class SampleOrder:
    """Sample index at each global position (see the module docstring); thread-safe."""

    def __init__(self, num_samples: int, *, span: int, window: int, seed: int, shuffle: bool = True) -> None:
        if window < 1 or span < 1:
            raise ValueError(f"shuffle window and span must be >= 1, got {window} and {span}")
        self.num_samples = int(num_samples)
        self.span = int(span)
        self.window = int(window)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.full = self.window >= self.num_samples  # small data: one full permutation per epoch
        self.segment = 4 * self.window
        self._lock = threading.Lock()
        self._epochs: OrderedDict[int, _Epoch | np.ndarray] = OrderedDict()
        self._segments: OrderedDict[tuple[int, int], tuple[int, np.ndarray]] = OrderedDict()

    def samples(self, positions: np.ndarray) -> np.ndarray:
        """Sample indices at global ``positions`` (int64, any epochs)."""
        positions = np.asarray(positions, dtype=np.int64)
        epochs, offsets = np.divmod(positions, self.num_samples)
        if not self.shuffle:
            return offsets
        out = np.empty_like(offsets)
        first, last = int(epochs.min(initial=0)), int(epochs.max(initial=0))
        for epoch in range(first, last + 1):
            chosen = epochs == epoch if first != last else slice(None)
            out[chosen] = self._in_epoch(epoch, offsets[chosen])
        return out

    def sample(self, position: int) -> int:
        return int(self.samples(np.array([position], dtype=np.int64))[0])

    def _state(self, epoch: int) -> _Epoch | np.ndarray:
        with self._lock:
            state = self._epochs.get(epoch)
            if state is None:
                if self.full:
                    state = np.random.default_rng(self.seed + epoch).permutation(self.num_samples)
                else:
                    state = _Epoch(self.num_samples, self.span, self.seed, epoch)
                self._epochs[epoch] = state
                while len(self._epochs) > 2:
                    self._epochs.popitem(last=False)
            return state

    def _in_epoch(self, epoch: int, offsets: np.ndarray) -> np.ndarray:
        state = self._state(epoch)
        if isinstance(state, np.ndarray):
            return state[offsets]
        # Offset p lies in key segment g with start(g) <= p < start(g + 1), and start(g) is within
        # (g*L - window, g*L], so g is (p + window - 1) // L or the one before.
        guess = (offsets + self.window - 1) // self.segment
        out = np.empty_like(offsets)
        for g in np.unique(guess).tolist():
            chosen = guess == g
            start, ordered = self._segment(epoch, state, g)
            here = offsets[chosen]
            before = here < start
            if before.any():
                prev_start, prev = self._segment(epoch, state, g - 1)
                picked = np.empty_like(here)
                picked[before] = prev[here[before] - prev_start]
                picked[~before] = ordered[here[~before] - start]
                out[chosen] = picked
            else:
                out[chosen] = ordered[here - start]
        return out

    def _segment(self, epoch: int, state: _Epoch, g: int) -> tuple[int, np.ndarray]:
        """(first offset, sample indices in order) of the samples whose keys are in segment ``g``."""
        key = (epoch, g)
        with self._lock:
            hit = self._segments.get(key)
            if hit is not None:
                self._segments.move_to_end(key)
                return hit
        low_key, high_key = g * self.segment, (g + 1) * self.segment
        lo = max(0, low_key - self.window + 1)
        hi = min(self.num_samples, high_key)
        c = np.arange(lo, hi, dtype=np.int64)
        keys = c + state.jitter(c, self.window)
        start = min(lo, self.num_samples) + int(np.count_nonzero(keys < low_key))  # every c < lo has a key < low_key
        inside = (keys >= low_key) & (keys < high_key)
        c, keys = c[inside], keys[inside]
        ordered = state.sample_of(c[np.argsort(keys, kind="stable")])
        with self._lock:
            self._segments[key] = (start, ordered)
            while len(self._segments) > 4:
                self._segments.popitem(last=False)
        return start, ordered
