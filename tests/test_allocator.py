"""The reader's allocator tuning: freed shard blocks are reused from the heap, not page-faulted anew."""

from __future__ import annotations

import resource

import pytest

from lmforge.data.allocator import reuse_freed_buffers

BLOCK = 32 << 20  # a default shard: one whole-object GET


def _page_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def test_freed_blocks_are_reused_without_faulting_their_pages_in_again() -> None:
    if not reuse_freed_buffers(BLOCK):
        pytest.skip("the allocator is not glibc's: nothing to tune")
    block = bytearray(BLOCK)  # the first block maps its pages
    del block
    before = _page_faults()
    for _ in range(4):
        block = bytearray(BLOCK)  # as each GET's body: allocated, read, freed
        del block
    # A fresh mapping faults in all 8,192 pages of 4 KiB each time; a reused one (almost) none.
    assert (_page_faults() - before) / 4 < BLOCK // 4096 // 8


def test_a_users_own_malloc_settings_are_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert reuse_freed_buffers(BLOCK) is False
