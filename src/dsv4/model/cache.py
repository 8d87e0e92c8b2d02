"""KVCache: the preallocated decode state of the model (docs/contracts.md "KVCache"), storage only, no policy.

Two kinds of storage (report sec 3.5.1):

* per-slot *state*, a fixed size per sequence: the raw-KV ring of the sliding window (every layer, MTP included)
  and the compressors' unfinished-block tails (``comp_state``; the indexer's own ``idx_state`` for CSA layers);
* *paged* compressed entries: ``entries[L]`` (and ``idx_entries[L]`` for CSA) hold ``page_size // ratio`` entries per
  page; entry ``i`` of a sequence lives in page ``block_tables[b, i*r // P]`` at row ``(i*r % P) // r``.

The compressor state layout is the official one: ``[2 (kv, score), coff*r, coff*c]`` fp32 per slot, with
``coff = 2`` for CSA (rows ``[0, r)`` = last complete block, rows ``[r, 2r)`` = the unfinished block at ``pos % r``)
and ``coff = 1`` for HCA (rows = the unfinished block). Rows are addressed by position, never appended to.

Layer index ``L`` runs over the backbone layers, then the MTP blocks (``n_layers + i``, sliding window only).
Deliberately not here: which slot/pages a sequence owns (the engine's block manager), eviction, prefix hashing.

Shape legend: S slots, G pages, W window, P page size, C head dim, I indexer head dim, r compress ratio.
"""

from __future__ import annotations

import torch

from dsv4.config import CSA_RATIO, ModelConfig

_FP32 = 4


class KVCache:
    def __init__(self, config: ModelConfig, num_slots: int, num_pages: int, page_size: int = 128,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu", mtp: bool = True) -> None:
        self.config = config
        check_page_size(config, page_size)
        if num_slots <= 0 or num_pages < 0:
            raise ValueError(f"KVCache needs num_slots >= 1 and num_pages >= 0 (got {num_slots}, {num_pages})")
        self.num_slots, self.num_pages, self.page_size = num_slots, num_pages, page_size
        self.dtype, self.device = dtype, torch.device(device)
        c, w, ci = config.head_dim, config.window_size, config.index_head_dim
        n_mtp = config.n_mtp_layers if mtp else 0
        self.ratios: list[int] = list(config.layer_ratios) + [0] * n_mtp
        self.window: list[torch.Tensor] = []
        self.comp_state: list[torch.Tensor | None] = []
        self.entries: list[torch.Tensor | None] = []
        self.idx_state: list[torch.Tensor | None] = []
        self.idx_entries: list[torch.Tensor | None] = []
        for r in self.ratios:
            self.window.append(torch.zeros(num_slots, w, c, dtype=dtype, device=self.device))
            if r == 0:
                self.comp_state.append(None)
                self.entries.append(None)
            else:
                coff = 2 if r == CSA_RATIO else 1
                self.comp_state.append(_new_state(num_slots, coff * r, coff * c, self.device))
                self.entries.append(torch.zeros(num_pages, page_size // r, c, dtype=dtype, device=self.device))
            if r == CSA_RATIO:
                self.idx_state.append(_new_state(num_slots, 2 * r, 2 * ci, self.device))
                self.idx_entries.append(torch.zeros(num_pages, page_size // r, ci, dtype=dtype, device=self.device))
            else:
                self.idx_state.append(None)
                self.idx_entries.append(None)

    # ------------------------------------------------------------------ sizing (the engine sizes from a budget)
    @staticmethod
    def slot_bytes(config: ModelConfig, dtype: torch.dtype = torch.bfloat16, mtp: bool = True) -> int:
        """Bytes of one slot's state (window rings + compressor tails, all layers)."""
        c, w, ci = config.head_dim, config.window_size, config.index_head_dim
        es = torch.empty(0, dtype=dtype).element_size()
        ratios = list(config.layer_ratios) + [0] * (config.n_mtp_layers if mtp else 0)
        total = 0
        for r in ratios:
            total += w * c * es
            if r > 0:
                coff = 2 if r == CSA_RATIO else 1
                total += 2 * coff * r * coff * c * _FP32
            if r == CSA_RATIO:
                total += 2 * 2 * r * 2 * ci * _FP32
        return total

    @staticmethod
    def page_bytes(config: ModelConfig, page_size: int = 128, dtype: torch.dtype = torch.bfloat16) -> int:
        """Bytes of one page of compressed entries (all compressed layers)."""
        check_page_size(config, page_size)
        es = torch.empty(0, dtype=dtype).element_size()
        total = 0
        for r in config.layer_ratios:
            if r > 0:
                total += (page_size // r) * config.head_dim * es
            if r == CSA_RATIO:
                total += (page_size // r) * config.index_head_dim * es
        return total

    @classmethod
    def bytes_needed(cls, config: ModelConfig, num_slots: int, num_pages: int, page_size: int = 128,
                     dtype: torch.dtype = torch.bfloat16, mtp: bool = True) -> int:
        return num_slots * cls.slot_bytes(config, dtype, mtp) + num_pages * cls.page_bytes(config, page_size, dtype)

    @property
    def nbytes(self) -> int:
        ts = [t for group in (self.window, self.comp_state, self.entries, self.idx_state, self.idx_entries)
              for t in group if t is not None]
        return sum(t.numel() * t.element_size() for t in ts)

    # ------------------------------------------------------------------ per-slot state (prefix caching, forking)
    def _state_tensors(self) -> list[torch.Tensor]:
        return [t for group in (self.window, self.comp_state, self.idx_state) for t in group if t is not None]

    @torch.no_grad()
    def reset_slot(self, slot: int) -> None:
        """Not needed for correctness (state rows are only read at positions written for the same sequence);
        provided for hygiene and debugging."""
        for t in self._state_tensors():
            t[slot].zero_()

    @torch.no_grad()
    def copy_state(self, src_slot: int, dst_slot: int) -> None:
        for t in self._state_tensors():
            t[dst_slot].copy_(t[src_slot])

    @torch.no_grad()
    def snapshot_state(self, slot: int) -> list[torch.Tensor]:
        """A copy of the slot's window rings and compressor tails (taken at a page boundary for prefix caching)."""
        return [t[slot].clone() for t in self._state_tensors()]

    @torch.no_grad()
    def snapshot_rows(self, slot: int, positions: list[int]) -> list[tuple[torch.Tensor, tuple, torch.Tensor]]:
        """A copy of the slot state a forward over ``positions`` (the next tokens) can overwrite, for a cheap rollback
        (speculative decoding): their window-ring rows, the tail rows of the non-overlapping (HCA) compressors, and
        the whole, small state of the overlapping (CSA, indexer) compressors, which also move a completed block into
        their first rows. Entry pages need no copy: recomputing a position rewrites its entry. Undo with
        :meth:`restore_rows`."""
        saved = []
        for ring in self.window:
            rows = sorted({p % ring.shape[1] for p in positions})
            saved.append((ring, (slot, rows), ring[slot, rows].clone()))
        for states in (self.comp_state, self.idx_state):
            for r, st in zip(self.ratios, states):
                if st is None:
                    continue
                if r == CSA_RATIO:
                    saved.append((st, (slot,), st[slot].clone()))
                else:
                    rows = sorted({p % r for p in positions})
                    saved.append((st, (slot, slice(None), rows), st[slot, :, rows].clone()))
        return saved

    @staticmethod
    @torch.no_grad()
    def restore_rows(saved: list[tuple[torch.Tensor, tuple, torch.Tensor]]) -> None:
        for t, index, rows in saved:
            t[index] = rows

    @torch.no_grad()
    def restore_state(self, slot: int, snap: list[torch.Tensor]) -> None:
        ts = self._state_tensors()
        if len(snap) != len(ts):
            raise ValueError(f"snapshot has {len(snap)} tensors, this cache has {len(ts)}: it was taken from a "
                             "cache of another model/config")
        for t, s in zip(ts, snap):
            t[slot].copy_(s)


def _new_state(num_slots: int, rows: int, cols: int, device: torch.device) -> torch.Tensor:
    return torch.zeros(num_slots, 2, rows, cols, dtype=torch.float32, device=device)


def check_page_size(config: ModelConfig, page_size: int) -> None:
    bad = [r for r in config.compressed_ratios if page_size % r]
    if page_size <= 0 or bad:
        raise ValueError(f"KVCache page_size={page_size} must be a positive multiple of every compress ratio "
                         f"{list(config.compressed_ratios)} (a page must hold whole compressed entries)")
