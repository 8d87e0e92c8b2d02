"""Attention of DeepSeek-V4, shared by the three layer types (architecture.md sec 4 and 6; report sec 2.3).

* low-rank query ``qr = q_norm(wq_a x)``, ``q = wq_b qr`` split in H heads, per-head RMS norm without weight;
* one shared KV head ``kv = kv_norm(wkv x)`` used as key *and* value by all heads (MQA);
* partial interleaved RoPE on the last ``rope_head_dim`` dims of q and kv, inverse RoPE on the output (values carry
  the key's rotation, so un-rotating by the query position leaves a relative-position signal);
* keys = the raw sliding window (positions ``t - win + 1 .. t``) plus compressed entries: none (SWA), all visible
  (HCA), or the Lightning Indexer's top-k (CSA); one softmax over them plus a per-head sink logit;
* grouped low-rank output projection ``wo_a`` (per group of heads) then ``wo_b``.

Numerics follow the official kernel: logits and softmax in fp32, probabilities rounded to the activation dtype
before ``P V``. With ``Numerics.qat_sim`` the non-RoPE KV dims are FP8-rounded.

The attention itself is the op ``dsv4::sparse_attention`` (dsv4/ops): per query block it reads the window (the ring
as it was before the chunk plus the chunk's own keys) and only the compressed entries a query uses, from their pages
(HCA: the visible prefix; CSA: the indexer's picks), so no [S, E] mask or gathered history exists; the projections
around it are ``dsv4::attention_in`` / ``dsv4::attention_out``. This module decides what each query may see and
writes the cache (ring, compressor pages); the ops compute.
Deliberately not here: the kernels themselves and any cache policy.

Shape legend: N flat tokens, Bg sequences, S chunk width, H heads, c head dim, W window keys, E entries, k picks,
G = o_groups.
"""

from __future__ import annotations

import torch
from torch import nn

from dsv4 import ops
from dsv4.config import CSA_RATIO, ModelConfig
from dsv4.model.batch import BatchPlan, Group, group_rows, unpad_rows
from dsv4.model.cache import KVCache
from dsv4.model.compressor import Compressor
from dsv4.model.indexer import Indexer
from dsv4.model.linear import Linear
from dsv4.model.norm import RMSNorm
from dsv4.model.qat import Numerics, fp8_sim
from dsv4.model.rope import Rotary


def _ws(lin: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, scale or None) of a projection, as the ops take them (a packed weight carries its scale)."""
    return lin.weight, getattr(lin, "scale", None)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int, ratio: int, numerics: Numerics, dtype: torch.dtype
                 ) -> None:
        super().__init__()
        self.layer_id = layer_id  # also the cache index of this layer
        self.ratio = ratio
        self.numerics = numerics
        self.n_heads, self.head_dim = config.n_heads, config.head_dim
        self.nope_dim = config.nope_head_dim
        self.window = config.window_size
        self.eps = config.rms_norm_eps
        self.n_groups, self.o_lora_rank = config.o_groups, config.o_lora_rank
        self.softmax_scale = config.softmax_scale
        d, h, c = config.dim, config.n_heads, config.head_dim
        self.wq_a = Linear(d, config.q_lora_rank, dtype)
        self.q_norm = RMSNorm(config.q_lora_rank, config.rms_norm_eps)
        self.wq_b = Linear(config.q_lora_rank, h * c, dtype)
        self.wkv = Linear(d, c, dtype)
        self.kv_norm = RMSNorm(c, config.rms_norm_eps)
        self.wo_a = Linear(h * c // self.n_groups, self.n_groups * self.o_lora_rank, dtype)
        self.wo_b = Linear(self.n_groups * self.o_lora_rank, d, dtype)
        self.attn_sink = nn.Parameter(torch.zeros(h, dtype=torch.float32))
        self.compressor = Compressor(d, c, ratio, config.rms_norm_eps) if ratio > 0 else None
        self.indexer = Indexer(config, dtype) if ratio == CSA_RATIO else None
        self.rotary = Rotary.for_ratio(config, ratio)

    def forward(self, x: torch.Tensor, plan: BatchPlan, cache: KVCache | None) -> torch.Tensor:
        """x [N, D] (already attn_norm-ed) -> [N, D]."""
        n = x.shape[0]
        qat = self.numerics.qat_sim
        cos, sin = plan.memoize(("rope", self.ratio > 0), lambda: self.rotary.cos_sin(plan.positions))  # [N, R/2]
        qr, q, kv = ops.attention_in(x, *_ws(self.wq_a), self.q_norm.weight, *_ws(self.wq_b), *_ws(self.wkv),
                                     self.kv_norm.weight, cos, sin, self.n_heads, self.eps)  # [N,Q], [N,H,c], [N,c]
        if qat:
            kv = self._kv_post(kv)
        # a decode-only step updates the compressors with one op per compressor (projection included)
        decode = cache is not None and not qat and len(plan.groups) == 1 and plan.groups[0].is_decode
        if self.compressor is not None and not decode:
            ckv, cz = self.compressor.project(x, plan.positions)  # [N, C] fp32
        if self.indexer is not None:
            iq, iw = self.indexer.queries(x, qr, cos, sin, qat)  # [N, H_I, I], [N, H_I]
            if not decode:
                ikv, iz = self.indexer.compressor.project(x, plan.positions)
        lid, r = self.layer_id, self.ratio
        page_size = cache.page_size if cache is not None else 0

        out = None
        for grp in plan.groups:
            if cache is not None:
                ring, slots = cache.window[lid], grp.slots
            else:  # no history: an empty ring (never read: every sequence starts at 0)
                ring = plan.memoize(("empty_ring", kv.dtype), lambda: kv.new_zeros(1, self.window, self.head_dim))
                slots = grp.memoize(("no_slots",), lambda: torch.zeros_like(grp.start))
            entries = tables = topk = None
            n_entries = 0
            if self.compressor is not None:
                if decode:
                    entries, tables = self.compressor.decode(x, grp, self.rotary, cache.comp_state[lid],
                                                             cache.entries[lid])
                else:
                    entries, tables = self.compressor.group_entries(
                        ckv, cz, grp, self.rotary, x.dtype, self._kv_post if qat else None,
                        cache.comp_state[lid] if cache is not None else None,
                        cache.entries[lid] if cache is not None else None, page_size)  # [R, P, c], [Bg, pages]
                n_entries = max(grp.end_list) // r  # the most entries any query of the group sees
            if self.indexer is not None:
                if decode:
                    keys, key_tables = self.indexer.compressor.decode(x, grp, self.rotary, cache.idx_state[lid],
                                                                      cache.idx_entries[lid])
                else:
                    keys, key_tables = self.indexer.compressor.group_entries(
                        ikv, iz, grp, self.rotary, x.dtype, Indexer.key_post(qat),
                        cache.idx_state[lid] if cache is not None else None,
                        cache.idx_entries[lid] if cache is not None else None, page_size)  # [R, P, I]
                vis = grp.memoize(("visible", r), lambda: (grp.pos + 1) // r)  # [Bg, S]; padding (-1) sees 0
                topk = self.indexer.select(group_rows(iq, grp), group_rows(iw, grp), keys, key_tables, vis,
                                           n_entries)  # [Bg, S, k]
            lens = grp.memoize(("lens",), lambda: grp.end - grp.start)
            o = ops.sparse_attention(group_rows(q, grp), group_rows(kv, grp), grp.start, lens, ring, slots, entries,
                                     tables, r, n_entries, topk, self.attn_sink, self.softmax_scale)  # [Bg,S,H,c]
            if cache is not None:
                self._write_ring(kv, grp, cache)  # after reading: the chunk's last `w` keys become the ring
            out = unpad_rows(o, grp, n, out)
        return ops.attention_out(out, cos, sin, *_ws(self.wo_a), self.n_groups, *_ws(self.wo_b))  # [N, D]

    def _kv_post(self, kv: torch.Tensor) -> torch.Tensor:
        """QAT: FP8-round the non-RoPE dims, keep the RoPE dims (official act_quant on kv[..., :-rd])."""
        return torch.cat([fp8_sim(kv[..., : self.nope_dim], 64), kv[..., self.nope_dim:]], dim=-1)

    @torch.no_grad()
    def _write_ring(self, kv: torch.Tensor, grp: Group, cache: KVCache) -> None:
        """The last ``window`` keys of each sequence's chunk go to its ring rows ``p % window``."""
        w = self.window

        def rows() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            # positions [max(start, end - w), end) of each sequence (rows p % w are unique among them), from the
            # host lists: no boolean indexing (a host sync), a fixed shape
            ends = zip(grp.start_list, grp.end_list)
            keep = [(b, p) for b, (st, e) in enumerate(ends) for p in range(max(st, e - w), e)]
            kb = torch.tensor([b for b, _ in keep], dtype=torch.long, device=kv.device)
            kp = torch.tensor([p for _, p in keep], dtype=torch.long, device=kv.device)
            return grp.slots[kb], kp % w, grp.tok_idx[kb, kp - grp.start[kb]]

        slots, ring_rows, tok = grp.memoize(("ring_rows", w), rows)
        ring = cache.window[self.layer_id]
        ring[slots, ring_rows] = kv[tok].to(ring.dtype)
