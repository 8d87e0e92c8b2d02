"""BlockManager: which cache pages and state slots each sequence holds (the policy; `KVCache` is the storage).

V4's cache has two kinds of memory (spec sec. 11, report sec. 3.5.1):
* a fixed *state slot* per running sequence: the 128-token sliding-window ring and the compressors' unfinished-block
  tails, the same size whatever the context length;
* *pages* of compressed entries: page `j` of a sequence holds the entries of positions `[j*P, (j+1)*P)`
  (P = 128 = lcm of the ratios: 32 CSA + 32 indexer + 1 HCA entry per layer). Pages are reference counted because
  the prefix cache shares full pages between sequences.

Plain Python and deterministic (free lists are FIFO), so scheduling is reproducible and testable without a model.
This module does not decide *who* gets memory (the scheduler does) nor what is cached (the prefix cache does).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dsv4.engine.request import Sequence


class BlockManager:
    def __init__(self, num_pages: int, num_slots: int, page_size: int) -> None:
        if num_pages < 1 or num_slots < 1:
            raise ValueError(f"the cache needs at least one page and one slot, got {num_pages=} {num_slots=}")
        self.num_pages = num_pages
        self.num_slots = num_slots
        self.page_size = page_size
        self.ref = [0] * num_pages
        self.free_pages: deque[int] = deque(range(num_pages))
        self.free_slots: deque[int] = deque(range(num_slots))
        # Called with the number of pages wanted when the free list is short; frees what it can (prefix cache LRU).
        self.reclaim: Callable[[int], None] | None = None

    # --- pages -------------------------------------------------------------------------------------------------
    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    @property
    def num_free_pages(self) -> int:
        return len(self.free_pages)

    def _ensure_free(self, n: int) -> bool:
        if len(self.free_pages) < n and self.reclaim is not None:
            self.reclaim(n - len(self.free_pages))
        return len(self.free_pages) >= n

    def incref(self, pages: list[int]) -> None:
        for p in pages:
            assert self.ref[p] > 0, f"incref of free page {p}"
            self.ref[p] += 1

    def decref(self, pages: list[int]) -> None:
        for p in pages:
            assert self.ref[p] > 0, f"double free of page {p}"
            self.ref[p] -= 1
            if self.ref[p] == 0:
                self.free_pages.append(p)

    def grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Give `seq` pages covering its first `num_tokens` positions. False (and nothing allocated) if memory is
        short even after reclaiming prefix-cache pages."""
        need = self.pages_for(num_tokens) - len(seq.pages)
        if need <= 0:
            return True
        if not self._ensure_free(need):
            return False
        for _ in range(need):
            p = self.free_pages.popleft()
            self.ref[p] = 1
            seq.pages.append(p)
        return True

    # --- slots -------------------------------------------------------------------------------------------------
    @property
    def num_free_slots(self) -> int:
        return len(self.free_slots)

    def take_slot(self, seq: Sequence) -> bool:
        if seq.slot is not None:
            return True
        if not self.free_slots:
            return False
        seq.slot = self.free_slots.popleft()
        return True

    # --- release -----------------------------------------------------------------------------------------------
    def free(self, seq: Sequence) -> None:
        """Release everything `seq` holds (finish, abort or preemption)."""
        self.decref(seq.pages)
        seq.pages = []
        if seq.slot is not None:
            self.free_slots.append(seq.slot)
            seq.slot = None

    def check_invariants(self, live: list[Sequence], cached_pages: list[list[int]] = ()) -> None:
        """Reference counts equal the number of holders; free list = pages with count 0 (tests call this)."""
        expect = [0] * self.num_pages
        for s in live:
            for p in s.pages:
                expect[p] += 1
        for pages in cached_pages:
            for p in pages:
                expect[p] += 1
        assert expect == self.ref, "page reference counts disagree with holders"
        assert sorted(self.free_pages) == [p for p in range(self.num_pages) if expect[p] == 0], "free list is wrong"
        slots = [s.slot for s in live if s.slot is not None]
        assert len(set(slots)) == len(slots), "a slot is held twice"
        assert sorted(slots + list(self.free_slots)) == list(range(self.num_slots)), "slots leaked"
