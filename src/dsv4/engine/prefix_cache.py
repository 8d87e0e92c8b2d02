"""PrefixCache: reuse the cache of an already computed token prefix (multi-turn chat, agent loops, shared system
prompts).

V4's cache is not only pages: the window ring and the compressors' unfinished-block tails live in a per-sequence
slot. So an entry is (the full pages of a prefix of `k*P` tokens, a snapshot of the slot state taken exactly at
position `k*P`). A hit increments the page reference counts (pages of complete blocks are never written again, so
sharing needs no copy-on-write), restores the snapshot into the new sequence's slot and starts the prefill at `k*P`.

Keys are a hash chain over full pages (blake2b of the previous key and the page's token ids), so a key names the
whole prefix, not one page. Snapshots cost memory (spec sec. 11: window + tails per layer), so their number is bounded
(`max_entries`, LRU) and the engine subtracts `max_entries * snapshot_bytes` from the cache budget.

The scheduler decides where snapshots are taken (chunk ends on page boundaries); this module only stores and finds.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from dsv4.engine.block_manager import BlockManager


def chain_keys(tokens: list[int], page_size: int, num_pages: int) -> list[bytes]:
    """Key of the prefix `tokens[: (j+1)*P]` for j < num_pages."""
    keys: list[bytes] = []
    prev = b""
    for j in range(num_pages):
        page = torch.tensor(tokens[j * page_size : (j + 1) * page_size], dtype=torch.int64).numpy().tobytes()
        prev = hashlib.blake2b(prev + page, digest_size=16).digest()
        keys.append(prev)
    return keys


@dataclass
class PrefixEntry:
    key: bytes
    num_tokens: int  # k * P
    pages: list[int]  # k pages, one reference held by the cache
    snapshot: Any  # whatever KVCache.snapshot_state returned
    hits: int = 0


class PrefixCache:
    def __init__(self, block_manager: BlockManager, max_entries: int) -> None:
        self.bm = block_manager
        self.page_size = block_manager.page_size
        self.max_entries = max_entries
        self.entries: OrderedDict[bytes, PrefixEntry] = OrderedDict()  # LRU order: oldest first
        self.num_queries = 0
        self.num_hit_tokens = 0
        block_manager.reclaim = self.reclaim

    def lookup(self, tokens: list[int]) -> PrefixEntry | None:
        """Longest cached prefix of `tokens` that leaves at least one token to compute (its logits are needed)."""
        self.num_queries += 1
        k_max = (len(tokens) - 1) // self.page_size
        if k_max <= 0 or not self.entries:
            return None
        keys = chain_keys(tokens, self.page_size, k_max)
        for k in range(k_max, 0, -1):
            e = self.entries.get(keys[k - 1])
            if e is not None:
                self.entries.move_to_end(e.key)
                e.hits += 1
                self.num_hit_tokens += e.num_tokens
                return e
        return None

    def contains(self, tokens: list[int], num_tokens: int) -> bool:
        k = num_tokens // self.page_size
        return chain_keys(tokens, self.page_size, k)[-1] in self.entries if k > 0 else False

    def insert(self, tokens: list[int], pages: list[int], num_tokens: int, snapshot: Any) -> None:
        assert num_tokens % self.page_size == 0 and num_tokens > 0
        k = num_tokens // self.page_size
        key = chain_keys(tokens, self.page_size, k)[-1]
        if key in self.entries:
            self.entries.move_to_end(key)
            return
        while len(self.entries) >= self.max_entries:
            self._evict_one()
        self.bm.incref(pages[:k])
        self.entries[key] = PrefixEntry(key, num_tokens, list(pages[:k]), snapshot)

    def _evict_one(self) -> None:
        _, e = self.entries.popitem(last=False)
        self.bm.decref(e.pages)

    def reclaim(self, num_pages: int) -> None:
        """Evict LRU entries until `num_pages` more pages are free or nothing is left (pages shared with running
        sequences stay allocated after an eviction; that is fine, they are freed with the sequence)."""
        target = self.bm.num_free_pages + num_pages
        while self.entries and self.bm.num_free_pages < target:
            self._evict_one()

    def clear(self) -> None:
        while self.entries:
            self._evict_one()

    def held_pages(self) -> list[list[int]]:
        return [e.pages for e in self.entries.values()]
