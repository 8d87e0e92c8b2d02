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
import torch.nn.functional as F
from torch import nn

from dsv4.config import CSA_RATIO
from dsv4.model.batch import Group, pad_rows
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
        kv = F.linear(xf, self.wkv.weight.float())
        z = F.linear(xf, self.wgate.weight.float()) + self.ape.float()[positions % self.ratio]
        return kv, z

    def group_entries(self, kv: torch.Tensor, z: torch.Tensor, grp: Group, rotary: Rotary, out_dtype: torch.dtype,
                      post: Callable[[torch.Tensor], torch.Tensor] | None, state: torch.Tensor | None,
                      pages: torch.Tensor | None, page_size: int) -> torch.Tensor:
        """All compressed entries each sequence of the group can see after this chunk: [Bg, E, c].

        Entry ``i`` of sequence ``b`` is meaningful for ``i < end_b // r``; rows past that are padding (queries never
        see them: visibility is ``i < (t + 1) // r <= end_b // r``).
        """
        r, c = self.ratio, self.head_dim
        bg = grp.size
        dev = kv.device
        start, end = grp.start, grp.end
        s0 = (start // r) * r  # first row of the extended chunk: the start of the block holding `start`
        n_blocks = end // r - start // r  # blocks this chunk completes, per sequence
        k_max = max(e // r - s // r for s, e in zip(grp.start_list, grp.end_list))
        length = max(e - (s // r) * r for s, e in zip(grp.start_list, grp.end_list))
        length = -(-length // r) * r
        p = s0[:, None] + torch.arange(length, device=dev)  # [Bg, L] absolute position of each extended row
        from_new = (p >= start[:, None]) & (p < end[:, None])
        j = (p - start[:, None]).clamp(0, grp.width - 1)
        tok = torch.where(from_new, grp.tok_idx.gather(1, j), kv.shape[0])  # [Bg, L] flat row (N = zero row)
        ext_kv = pad_rows(kv, tok)  # [Bg, L, C]
        ext_z = torch.where(from_new[..., None], pad_rows(z, tok), _NEG_INF)
        cur = r if self.overlap else 0  # state rows of the unfinished block
        if state is not None:
            from_state = (p < start[:, None])[..., None]
            rows = cur + p % r
            slots = grp.slots[:, None]
            ext_kv = torch.where(from_state, state[slots, 0, rows], ext_kv)
            ext_z = torch.where(from_state, state[slots, 1, rows], ext_z)

        entries = None
        if k_max > 0:
            blk_kv = ext_kv[:, : k_max * r].unflatten(1, (k_max, r))  # [Bg, K, r, C]
            blk_z = ext_z[:, : k_max * r].unflatten(1, (k_max, r))
            if self.overlap:
                # previous block's [:c] half; block 0's comes from the state (or is empty at position 0)
                first_kv = kv.new_zeros(bg, 1, r, c)
                first_z = kv.new_full((bg, 1, r, c), _NEG_INF)
                if state is not None:
                    has_prev = (start // r > 0)[:, None, None, None]
                    first_kv = torch.where(has_prev, state[grp.slots, 0, :r, :c][:, None], first_kv)
                    first_z = torch.where(has_prev, state[grp.slots, 1, :r, :c][:, None], first_z)
                prev_kv = torch.cat([first_kv, blk_kv[:, :-1, :, :c]], dim=1)  # [Bg, K, r, c]
                prev_z = torch.cat([first_z, blk_z[:, :-1, :, :c]], dim=1)
                pool_kv = torch.cat([prev_kv, blk_kv[..., c:]], dim=2)  # [Bg, K, 2r, c]
                pool_z = torch.cat([prev_z, blk_z[..., c:]], dim=2)
            else:
                pool_kv, pool_z = blk_kv, blk_z
            done = (torch.arange(k_max, device=dev)[None] < n_blocks[:, None])  # [Bg, K]
            # blocks a sequence did not complete hold -inf rows; zero them so no NaN reaches softmax (or autograd)
            pool_z = torch.where(done[..., None, None], pool_z, 0.0)
            pooled = (pool_z.softmax(dim=2) * pool_kv).sum(dim=2)  # [Bg, K, c] fp32
            e = self.norm(pooled.to(out_dtype))
            ent_pos = (start // r)[:, None] + torch.arange(k_max, device=dev)  # [Bg, K] entry index
            cos, sin = rotary.cos_sin(ent_pos * r)
            e = apply_rope(e, cos, sin)
            if post is not None:
                e = post(e)
            entries = torch.where(done[..., None], e, 0.0)

        if state is None:
            # pure path: every sequence starts at 0, so the new entries are all of them
            return entries if entries is not None else kv.new_zeros(bg, 0, c).to(out_dtype)

        with torch.no_grad():
            self._write(grp, state, pages, page_size, entries, ext_kv, ext_z, p, from_new, n_blocks, k_max)
        return _read_entries(pages, grp, r, page_size)

    def _write(self, grp: Group, state: torch.Tensor, pages: torch.Tensor, page_size: int,
               entries: torch.Tensor | None, ext_kv: torch.Tensor, ext_z: torch.Tensor, p: torch.Tensor,
               from_new: torch.Tensor, n_blocks: torch.Tensor, k_max: int) -> None:
        r = self.ratio
        slots = grp.slots[:, None].expand_as(p)
        cur = r if self.overlap else 0
        if entries is not None:
            done = torch.arange(k_max, device=p.device)[None] < n_blocks[:, None]  # [Bg, K]
            i = (grp.start // r)[:, None] + torch.arange(k_max, device=p.device)
            page, row = _page_row(grp.block_tables, i, r, page_size)
            pages[page[done], row[done]] = entries[done].to(pages.dtype)
            if self.overlap:
                # remember the last complete block for the next chunk's first entry
                has = n_blocks > 0
                last = (n_blocks - 1).clamp(min=0)
                blk = (last[:, None] * r + torch.arange(r, device=p.device)[None])  # [Bg, r] rows of that block
                kv_last = ext_kv.gather(1, blk[..., None].expand(-1, -1, ext_kv.shape[-1]))
                z_last = ext_z.gather(1, blk[..., None].expand(-1, -1, ext_z.shape[-1]))
                state[grp.slots[has], 0, :r] = kv_last[has]
                state[grp.slots[has], 1, :r] = z_last[has]
        # the unfinished tail: new tokens past the last complete block
        tail = from_new & (p >= (grp.end // r * r)[:, None])
        rows = cur + p % r
        state[slots[tail], 0, rows[tail]] = ext_kv[tail]
        state[slots[tail], 1, rows[tail]] = ext_z[tail]


def _page_row(block_tables: torch.Tensor, i: torch.Tensor, r: int, page_size: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Entry index i [Bg, K] -> (page id, row in page), per docs/contracts.md."""
    col = (i * r // page_size).clamp(max=block_tables.shape[1] - 1)
    page = block_tables.gather(1, col).clamp(min=0)
    row = (i * r % page_size) // r
    return page, row


def _read_entries(pages: torch.Tensor, grp: Group, r: int, page_size: int) -> torch.Tensor:
    """Entries 0 .. max(end // r) - 1 of every sequence of the group, gathered through the block tables."""
    e_max = max(e // r for e in grp.end_list)
    i = torch.arange(e_max, device=pages.device)[None].expand(grp.size, -1)
    page, row = _page_row(grp.block_tables, i, r, page_size)
    return pages[page, row]  # [Bg, E, c]
