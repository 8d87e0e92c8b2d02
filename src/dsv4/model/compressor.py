"""KV compression (architecture.md sec 7; report eqs. 9-12 for CSA, 20-23 for HCA).

Every ``ratio`` consecutive tokens of a sequence are pooled into one compressed entry: per channel, a softmax over
the block's gate logits ``z = x W_gate + ape[pos % r]`` weights the block's values ``x W_kv``. HCA (ratio 128 in the
releases) pools one block (``coff = 1``). CSA (ratio 4) pools *overlapping* windows (``coff = 2``): each token
projects to two series, ``[:c]`` feeds the *next* block's entry and ``[c:]`` its own, so entry ``i`` pools 2r
slots: the ``[:c]`` half of block ``i-1`` and the ``[c:]`` half of block ``i`` (block -1 = zero value, -inf gate).
Projections and pooling run in fp32 (official precision); the entry is then RMS-normed in the model dtype and its
last ``rope_head_dim`` dims are rotated at position ``i * r``. Only complete blocks produce entries.

Varlen chunks: a chunk of a sequence may start inside a block. The unfinished block's rows (and for CSA the last
complete block) live in the cache's per-slot ``comp_state``; this module reads them, pools every block the chunk
completes, writes the entries to the sequence's pages and the new tail back to the state. Without a cache every
sequence starts at 0 and nothing is written (pure, differentiable).

Deliberately not here: what the entries are used for (attention.py, indexer.py) and the QAT rounding (passed in as
``post``).

Shape legend: N flat tokens, Bg sequences of a group, L rows of a group's extended chunk (state tail + new tokens),
K = blocks completed in the chunk, r ratio, C = coff * c projected width, c entry dim, E entries per sequence.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from dsv4 import ops
from dsv4.config import CSA_RATIO
from dsv4.model.batch import Group, group_rows, pad_rows
from dsv4.model.norm import RMSNorm
from dsv4.model.rope import Rotary, apply_rope

_NEG_INF = float("-inf")


class Compressor(nn.Module):
    def __init__(self, dim: int, head_dim: int, ratio: int, norm_eps: float) -> None:
        super().__init__()
        self.ratio = ratio
        self.head_dim = head_dim
        self.overlap = ratio == CSA_RATIO
        coff = 2 if self.overlap else 1
        # official dtypes: wkv/wgate/ape fp32 (the pooling is an fp32 computation)
        self.wkv = nn.Linear(dim, coff * head_dim, bias=False, dtype=torch.float32)
        self.wgate = nn.Linear(dim, coff * head_dim, bias=False, dtype=torch.float32)
        self.ape = nn.Parameter(torch.zeros(ratio, coff * head_dim, dtype=torch.float32))
        self.norm = RMSNorm(head_dim, norm_eps)

    def project(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, D] -> (kv, z) [N, C] fp32, z already including the positional bias ape[pos % r]."""
        xf = x.float()
        kv = ops.linear(xf, self.wkv.weight, None)
        z = ops.linear(xf, self.wgate.weight, None) + self.ape.float()[positions % self.ratio]
        return kv, z

    def group_entries(self, kv: torch.Tensor, z: torch.Tensor, grp: Group, rotary: Rotary, out_dtype: torch.dtype,
                      post: Callable[[torch.Tensor], torch.Tensor] | None, state: torch.Tensor | None,
                      pages: torch.Tensor | None, page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Pool the blocks this chunk completes; return where every entry the sequences can see after it lives, as
        the ops read them: (entry pages [R, P, c], block tables [Bg, pages]) with entry i of sequence b at row
        (i * r % (P * r)) // r of page block_tables[b, i * r // (P * r)] (docs/contracts.md).

        With a cache the new entries and tails are written to the cache's pages and state and those pages are
        returned (nothing is gathered). Without one every sequence starts at 0 and the new entries are all of them:
        [Bg, E, c] returned as Bg pages of E rows (pure, differentiable). Entry ``i`` of sequence ``b`` is
        meaningful for ``i < end_b // r`` (queries never see later rows: visibility is ``i < (t + 1) // r``).
        """
        r, c = self.ratio, self.head_dim
        cached = state is not None
        lay = grp.memoize(("compress", r, cached, page_size),
                          lambda: _Layout(grp, r, self.overlap, cached, page_size, kv.shape[0], rotary))
        entries = None
        if lay.k_max > 0:
            ext_kv = pad_rows(kv, lay.tok)  # [Bs, L, C]
            ext_z = torch.where(lay.from_new[..., None], pad_rows(z, lay.tok), _NEG_INF)
            if cached:
                ext_kv = torch.where(lay.from_state, state[lay.slots2, 0, lay.state_rows], ext_kv)
                ext_z = torch.where(lay.from_state, state[lay.slots2, 1, lay.state_rows], ext_z)
            bs, k = ext_kv.shape[0], lay.k_max
            blk_kv = ext_kv[:, : k * r].unflatten(1, (k, r))  # [Bs, K, r, C]
            blk_z = ext_z[:, : k * r].unflatten(1, (k, r))
            if self.overlap:
                # previous block's [:c] half; block 0's comes from the state (or is empty at position 0)
                first_kv = kv.new_zeros(bs, 1, r, c)
                first_z = kv.new_full((bs, 1, r, c), _NEG_INF)
                if cached:
                    first_kv = torch.where(lay.has_prev, state[lay.slots, 0, :r, :c][:, None], first_kv)
                    first_z = torch.where(lay.has_prev, state[lay.slots, 1, :r, :c][:, None], first_z)
                pool_kv = torch.cat([torch.cat([first_kv, blk_kv[:, :-1, :, :c]], dim=1), blk_kv[..., c:]], dim=2)
                pool_z = torch.cat([torch.cat([first_z, blk_z[:, :-1, :, :c]], dim=1), blk_z[..., c:]], dim=2)
            else:
                pool_kv, pool_z = blk_kv, blk_z  # [Bs, K, r, c]
            # blocks a sequence did not complete hold -inf rows; zero them so no NaN reaches softmax (or autograd)
            pool_z = torch.where(lay.done[..., None, None], pool_z, 0.0)
            pooled = (pool_z.softmax(dim=2) * pool_kv).sum(dim=2)  # [Bs, K, c] fp32
            e = apply_rope(self.norm(pooled.to(out_dtype)), lay.cos, lay.sin)
            if post is not None:
                e = post(e)
            entries = torch.where(lay.done[..., None], e, 0.0)

        if not cached:
            # pure path: every sequence starts at 0, so the new entries are all of them; sequence b's page is b
            if entries is None:
                entries = kv.new_zeros(grp.size, 0, c).to(out_dtype)
            return entries, grp.memoize(("own_pages",), lambda: torch.arange(grp.size, device=kv.device)[:, None])
        with torch.no_grad():
            if entries is not None:
                pages[lay.w_page, lay.w_row] = entries[lay.done_idx].to(pages.dtype)
                if self.overlap:  # remember the last complete block for the next chunk's first entry
                    last = lay.last_rows[..., None]
                    state[lay.slots, 0, :r] = ext_kv.gather(1, last.expand(-1, -1, ext_kv.shape[-1]))
                    state[lay.slots, 1, :r] = ext_z.gather(1, last.expand(-1, -1, ext_z.shape[-1]))
            # the unfinished tail: new tokens past the last complete block
            state[lay.tail_slots, 0, lay.tail_rows] = kv[lay.tail_tok]
            state[lay.tail_slots, 1, lay.tail_rows] = z[lay.tail_tok]
        return pages, grp.block_tables

    def decode(self, x: torch.Tensor, grp: Group, rotary: Rotary, state: torch.Tensor, pages: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """``project`` + ``group_entries`` (with a cache, no QAT rounding) for a decode group, one token per
        sequence: the op ``dsv4::compressor_decode``. Returns (pages, block tables) like ``group_entries``."""
        pos, r = grp.pos[:, 0], self.ratio
        # the RoPE of the entry a token may complete: the same for every layer (and indexer) of this ratio
        cos, sin = grp.memoize(("entry_rope", r), lambda: rotary.cos_sin(pos // r * r))
        ops.compressor_decode(group_rows(x, grp)[:, 0], self.wkv.weight, self.wgate.weight, self.ape,
                              self.norm.weight, self.norm.eps, cos, sin, pos, grp.slots, grp.block_tables, state,
                              pages, r, self.overlap)
        return pages, grp.block_tables


class _Layout:
    """Index tensors of one group for one compress ratio, shared by every layer with that ratio in a forward.

    With a cache only the sequences that complete a block in this chunk (Bs of them) are pooled; the others just
    append to their tails. Without a cache all Bg sequences are pooled (they all start at 0).
    """

    def __init__(self, grp: Group, r: int, overlap: bool, cached: bool, page_size: int, n: int,
                 rotary: Rotary) -> None:
        dev = grp.tok_idx.device
        starts, ends = grp.start_list, grp.end_list
        nb = [e // r - s // r for s, e in zip(starts, ends)]
        self.k_max = max(nb)
        sel = [b for b in range(grp.size) if nb[b] > 0] if cached else list(range(grp.size))
        if self.k_max > 0:
            sel_t = torch.tensor(sel, dtype=torch.long, device=dev)
            start, end = grp.start[sel_t], grp.end[sel_t]
            length = max(ends[b] - starts[b] // r * r for b in sel)
            length = -(-length // r) * r
            p = (start // r * r)[:, None] + torch.arange(length, device=dev)  # [Bs, L] position of each row
            self.from_new = (p >= start[:, None]) & (p < end[:, None])
            j = (p - start[:, None]).clamp(0, grp.width - 1)
            self.tok = torch.where(self.from_new, grp.tok_idx[sel_t].gather(1, j), n)  # flat row, N = zero row
            n_blocks = torch.tensor([nb[b] for b in sel], dtype=torch.long, device=dev)
            self.done = torch.arange(self.k_max, device=dev)[None] < n_blocks[:, None]  # [Bs, K]
            ent = (start // r)[:, None] + torch.arange(self.k_max, device=dev)  # [Bs, K] entry index
            self.cos, self.sin = rotary.cos_sin(ent * r)  # entry i sits at position i * r
            if cached:
                self.slots = grp.slots[sel_t]
                self.slots2 = self.slots[:, None]
                self.from_state = (p < start[:, None])[..., None]
                self.state_rows = (r if overlap else 0) + p % r
                self.has_prev = (start // r > 0)[:, None, None, None]
                page, row = _page_row(grp.block_tables[sel_t], ent, r, page_size)
                # the completed (sequence, block) pairs, from the host lists (no nonzero: no sync, fixed shape)
                self.done_idx = (torch.tensor([i for i, b in enumerate(sel) for _ in range(nb[b])], dtype=torch.long,
                                              device=dev),
                                 torch.tensor([k for b in sel for k in range(nb[b])], dtype=torch.long, device=dev))
                self.w_page, self.w_row = page[self.done_idx], row[self.done_idx]
                self.last_rows = (n_blocks - 1)[:, None] * r + torch.arange(r, device=dev)  # [Bs, r]
        if cached:  # the unfinished tail: positions [max(start, end // r * r), end) of each sequence (host lists)
            tail = [(b, p) for b, (st, e) in enumerate(zip(starts, ends)) for p in range(max(st, e // r * r), e)]
            tb = torch.tensor([b for b, _ in tail], dtype=torch.long, device=dev)
            tp = torch.tensor([p for _, p in tail], dtype=torch.long, device=dev)
            self.tail_tok = grp.tok_idx[tb, tp - grp.start[tb]]
            self.tail_slots = grp.slots[tb]
            self.tail_rows = (r if overlap else 0) + tp % r


def _page_row(block_tables: torch.Tensor, i: torch.Tensor, r: int, page_size: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Entry index i [Bg, K] -> (page id, row in page), per docs/contracts.md."""
    col = (i * r // page_size).clamp(max=block_tables.shape[1] - 1)
    page = block_tables.gather(1, col).clamp(min=0)
    row = (i * r % page_size) // r
    return page, row

