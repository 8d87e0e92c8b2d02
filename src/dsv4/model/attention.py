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

Prefill chunks attend densely within the chunk (a [S, window + S] mask) and to compressed entries through a
[S, E] selection mask; a decode token reads its window from the cache ring and *gathers* only the top-k CSA
entries (no dense mask over the history). On the native fast path (``native``, set by
``Transformer.use_native_kernels``) the projections, the attention of cached chunks, the decode indexer top-k and the
decode compressor update call dsv4/kernels instead (``_native_chunk``); the code below stays the reference.
Deliberately not here: the kernels themselves and any cache policy.

Shape legend: N flat tokens, Bg sequences, S chunk width, H heads, c head dim, W window keys, E entries, k picks,
G = o_groups.
"""

from __future__ import annotations

import torch
from torch import nn

from dsv4 import kernels, ops
from dsv4.config import CSA_RATIO, ModelConfig
from dsv4.model import quant
from dsv4.model.batch import BatchPlan, Group, group_rows, unpad_rows
from dsv4.model.cache import KVCache
from dsv4.model.compressor import Compressor, _page_row
from dsv4.model.indexer import Indexer
from dsv4.model.linear import Linear
from dsv4.model.norm import RMSNorm, rms_unweighted
from dsv4.model.qat import Numerics, fp8_sim
from dsv4.model.rope import Rotary, apply_rope
from dsv4.ops import packed as packed_ops

_NEG_INF = float("-inf")
# query block of long prefill chunks (bounds the logits of one block; any value gives the same result)
_Q_BLOCK = 256


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
        native = self.native and not qat and not torch.is_grad_enabled()
        if native:  # the same four lines as one native call
            qr, q, kv = kernels.attention_in(x, self.wq_a.weight, self.q_norm.weight, self.wq_b.weight, self.n_heads,
                                             self.wkv.weight, self.kv_norm.weight, cos, sin, self.eps)
        else:
            qr = self.q_norm(self.wq_a(x))  # [N, q_lora]
            q = self.wq_b(qr).unflatten(-1, (self.n_heads, self.head_dim))  # [N, H, c]
            q = apply_rope(rms_unweighted(q, self.eps), cos[:, None], sin[:, None])
            kv = apply_rope(self.kv_norm(self.wkv(x)), cos, sin)  # [N, c]
        if qat:
            kv = self._kv_post(kv)
        # decode-only steps on the fast path: the compressors project inside their native update (_native_chunk)
        fused = native and cache is not None and len(plan.groups) == 1 and plan.groups[0].is_decode
        ckv = cz = ikv = iz = None
        if self.compressor is not None and not fused:
            ckv, cz = self.compressor.project(x, plan.positions)
        if self.indexer is not None:
            iq, iw = self.indexer.queries(x, qr, cos, sin, qat)
            if not fused:
                ikv, iz = self.indexer.compressor.project(x, plan.positions)
        lid = self.layer_id
        page_size = cache.page_size if cache is not None else 0

        out = None
        for grp in plan.groups:
            if native and cache is not None:
                o = self._native_chunk(q, kv, x, grp, cache, ckv, cz,
                                       (iq, iw, ikv, iz) if self.indexer is not None else None)
                out = unpad_rows(o, grp, n, out)
                continue
            qg = group_rows(q, grp)  # [Bg, S, H, c]
            raw_k, raw_mask = self._window_keys(kv, grp, cache)  # [Bg, W', c], [Bg, S, W']
            hist = raw_k.shape[1] - grp.width  # ring rows in front of the chunk's own keys
            comp_k = keys = None
            sparse_decode = self.indexer is not None and grp.is_decode and cache is not None
            if self.compressor is not None:
                comp_k = self.compressor.group_entries(
                    ckv, cz, grp, self.rotary, x.dtype, self._kv_post if qat else None,
                    cache.comp_state[lid] if cache is not None else None,
                    cache.entries[lid] if cache is not None else None, page_size,
                    read=not sparse_decode)  # [Bg, E, c]
                vis = grp.memoize(("visible", self.ratio), lambda: (grp.pos + 1) // self.ratio)  # [Bg, S]
            if self.indexer is not None:
                keys = self.indexer.compressor.group_entries(
                    ikv, iz, grp, self.rotary, x.dtype, Indexer.key_post(qat),
                    cache.idx_state[lid] if cache is not None else None,
                    cache.idx_entries[lid] if cache is not None else None, page_size)  # [Bg, E, I]
                iqg, iwg = group_rows(iq, grp), group_rows(iw, grp)
            # long chunks: queries in blocks, so logits stay [Bg, Q, H, window + Q + E] instead of quadratic in S
            parts = []
            for a in range(0, grp.width, _Q_BLOCK):
                b = min(grp.width, a + _Q_BLOCK)
                k0, k1 = max(0, a + hist - (self.window - 1)), b + hist
                comp_mask, gathered, ck = None, False, comp_k
                if self.compressor is not None and self.indexer is None:  # HCA: every visible entry
                    comp_mask = torch.arange(comp_k.shape[1], device=x.device) < vis[:, a:b, None]
                elif self.indexer is not None:  # CSA: the indexer's picks
                    top = self.indexer.select(iqg[:, a:b], iwg[:, a:b], keys, vis[:, a:b])  # [Bg, Q, k]
                    e = keys.shape[1]
                    if sparse_decode:
                        # sparse decode: read only the picked entries from the pages
                        page, row = _page_row(grp.block_tables, top.clamp(min=0).flatten(1), self.ratio, page_size)
                        ck = cache.entries[lid][page, row].view(grp.size, b - a, -1, self.head_dim)
                        comp_mask, gathered = top >= 0, True  # [Bg, 1, k]
                    else:
                        sel = torch.where(top >= 0, top, e)
                        comp_mask = torch.zeros(grp.size, b - a, e + 1, dtype=torch.bool, device=x.device)
                        comp_mask = comp_mask.scatter(-1, sel, True)[..., :e]  # [Bg, Q, E]
                parts.append(sparse_attention(qg[:, a:b], raw_k[:, k0:k1], raw_mask[:, a:b, k0:k1], ck, comp_mask,
                                              gathered, self.attn_sink, self.softmax_scale))  # [Bg, Q, H, c]
            o = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)  # [Bg, S, H, c]
            out = unpad_rows(o, grp, n, out)
        if native:
            return kernels.attention_out(out, cos, sin, self.wo_a.weight, self.n_groups, self.wo_b.weight)
        o = apply_rope(out, cos[:, None], sin[:, None], inverse=True)  # [N, H, c]
        o = o.reshape(n, self.n_groups, -1)  # [N, G, H*c/G]
        return self.wo_b(self._wo_a(o).flatten(1))

    def _wo_a(self, o: torch.Tensor) -> torch.Tensor:
        """Grouped low-rank output projection: o [N, G, H*c/G] -> [N, G, d_g] (= einsum ngd,grd)."""
        w, s, r, g = self.wo_a.weight, self.wo_a.scale, self.o_lora_rank, self.n_groups
        if s is not None and (quant.is_packed_fp4(w) or r % quant.FP8_BLOCK == 0):
            # packed: each group's rows are whole scale blocks, so each group is a packed linear of its own
            b = quant.FP8_BLOCK if quant.is_fp8(w) else 1
            return torch.stack([ops.linear(o[:, i], w[i * r:(i + 1) * r], s[i * r // b:(i + 1) * r // b])
                                for i in range(g)], dim=1)
        if s is not None:  # groups that split a 128-row scale block (tiny configs only): dequantise the small weight
            w = packed_ops.weight_rows(w, s, 0, w.shape[0], o.dtype)
        wo_a = w.view(g, r, -1)  # [G, d_g, H*c/G]
        return torch.bmm(o.transpose(0, 1), wo_a.transpose(1, 2)).transpose(0, 1)  # [N, G, d_g]

    native = False  # set by Transformer.use_native_kernels

    def _native_chunk(self, q: torch.Tensor, kv: torch.Tensor, x: torch.Tensor, grp: Group, cache: KVCache,
                      ckv: torch.Tensor | None, cz: torch.Tensor | None,
                      idx: tuple[torch.Tensor, ...] | None) -> torch.Tensor:
        """A group's chunks (decode or prefill) through kernels.chunk_attention: the keys the general path below
        builds (window, HCA's visible entries, the indexer's CSA picks) read in place. -> [Bg, S, H, c]."""
        lid, r, page_size = self.layer_id, self.ratio, cache.page_size
        qg, kvg = group_rows(q, grp), group_rows(kv, grp)  # [Bg, S, H, c], [Bg, S, c]
        entries = rows = None
        if self.compressor is not None:
            entries = cache.entries[lid]  # [pages, page_size // r, c]
            if ckv is None:  # decode-only step: projection and update in one native call
                self.compressor.decode_native(x, grp, self.rotary, cache.comp_state[lid], entries)
            else:
                self.compressor.group_entries(ckv, cz, grp, self.rotary, x.dtype, None, cache.comp_state[lid],
                                              entries, page_size, read=False)
            vis = grp.memoize(("visible", r), lambda: (grp.pos + 1) // r)  # [Bg, S] entries each query may see
            if idx is None:  # HCA: every visible entry
                ids = torch.arange(max(grp.end_list) // r, device=x.device)[None].expand(grp.size, -1)  # [Bg, E]
                ok = ids[:, None, :] < vis[..., None]  # [Bg, S, E]
                ids = ids[:, None, :].expand_as(ok)
            else:  # CSA: the indexer's top-k of the visible entries
                iq, iw, ikv, iz = idx
                keys = cache.idx_entries[lid]
                if grp.is_decode:  # one query per sequence: score the indexer keys in place
                    if ikv is None:
                        self.indexer.compressor.decode_native(x, grp, self.rotary, cache.idx_state[lid], keys)
                    else:
                        self.indexer.compressor.group_entries(ikv, iz, grp, self.rotary, x.dtype, None,
                                                              cache.idx_state[lid], keys, page_size, read=False)
                    k = min(self.indexer.topk, max(grp.end_list) // r)
                    top = kernels.indexer_topk(group_rows(iq, grp)[:, 0], group_rows(iw, grp)[:, 0], keys,
                                               grp.block_tables, r, vis[:, 0], k)[:, None]  # [Bg, 1, k]
                else:
                    gathered = self.indexer.compressor.group_entries(ikv, iz, grp, self.rotary, x.dtype, None,
                                                                     cache.idx_state[lid], keys, page_size)
                    top = self.indexer.select(group_rows(iq, grp), group_rows(iw, grp), gathered, vis)  # [Bg, S, k]
                ids, ok = top.clamp(min=0), top >= 0
            page, row = _page_row(grp.block_tables, ids.flatten(1), r, page_size)
            rows = torch.where(ok, (page * entries.shape[1] + row).view_as(ids), -1)
        lens = grp.memoize(("lens",), lambda: grp.end - grp.start)
        o = kernels.chunk_attention(qg, kvg, grp.start, lens, cache.window[lid], grp.slots, entries, rows,
                                    self.attn_sink, self.softmax_scale)
        self._write_ring(kv, grp, cache)  # now the chunk's last `window` keys become the ring
        return o.to(q.dtype)

    def _kv_post(self, kv: torch.Tensor) -> torch.Tensor:
        """QAT: FP8-round the non-RoPE dims, keep the RoPE dims (official act_quant on kv[..., :-rd])."""
        return torch.cat([fp8_sim(kv[..., : self.nope_dim], 64), kv[..., self.nope_dim:]], dim=-1)

    def _window_keys(self, kv: torch.Tensor, grp: Group, cache: KVCache | None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw keys [Bg, W', c] (ring history + new chunk) and the sliding-window mask [Bg, S, W']; with a cache the
        chunk's keys are then written to the ring."""
        lay = grp.memoize(("window", self.window, cache is not None),
                          lambda: _WindowLayout(grp, self.window, cache is not None))
        kvg = group_rows(kv, grp)  # [Bg, S, c]
        if lay.hist_rows is not None:
            ring = cache.window[self.layer_id]  # [slots, w, c]; index_select on the flat rows: a cheaper gather
            hist = ring.flatten(0, 1).index_select(0, lay.hist_flat).view(*lay.hist_rows.shape, ring.shape[-1])
            keys = torch.cat([hist.to(kvg.dtype), kvg], dim=1)
        else:
            keys = kvg
        if cache is not None:
            self._write_ring(kv, grp, cache)  # after reading: the chunk's last `w` tokens become the ring
        return keys, lay.mask

    @torch.no_grad()
    def _write_ring(self, kv: torch.Tensor, grp: Group, cache: KVCache) -> None:
        """The last ``window`` keys of each sequence's chunk go to its ring rows ``p % window``."""
        w = self.window

        def rows() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            keep = grp.valid & (grp.pos >= grp.end[:, None] - w)  # rows p % w are unique among these
            return grp.slots[:, None].expand_as(grp.pos)[keep], grp.pos[keep] % w, grp.tok_idx[keep]

        slots, ring_rows, tok = grp.memoize(("ring_rows", w), rows)
        ring = cache.window[self.layer_id]
        ring[slots, ring_rows] = kv[tok].to(ring.dtype)


class _WindowLayout:
    """Sliding-window index tensors of one group, shared by all layers in a forward."""

    def __init__(self, grp: Group, w: int, cached: bool) -> None:
        dev = grp.pos.device
        self.hist_rows = None
        key_pos = grp.pos
        if cached and w > 1:
            hist_pos = grp.start[:, None] - (w - 1) + torch.arange(w - 1, device=dev)  # [Bg, W-1]
            self.hist_slots = grp.slots[:, None]
            self.hist_rows = hist_pos.clamp(min=0) % w
            self.hist_flat = (self.hist_slots * w + self.hist_rows).flatten()  # rows of the ring viewed [slots*w, c]
            key_pos = torch.cat([torch.where(hist_pos >= 0, hist_pos, -1), grp.pos], dim=1)
        qp, kp = grp.pos[:, :, None], key_pos[:, None, :]
        self.mask = (kp >= 0) & (kp <= qp) & (kp > qp - w)  # [Bg, S, W']


def sparse_attention(q: torch.Tensor, raw_k: torch.Tensor, raw_mask: torch.Tensor, comp_k: torch.Tensor | None,
                     comp_mask: torch.Tensor | None, gathered: bool, sink: torch.Tensor, scale: float
                     ) -> torch.Tensor:
    """softmax([q.k_raw, q.k_comp, sink]) without the sink column, times the same keys (K = V).

    q [Bg, S, H, c]; raw_k [Bg, W', c] with raw_mask [Bg, S, W']; comp_k [Bg, E, c] with comp_mask [Bg, S, E], or,
    when ``gathered``, per-query keys [Bg, S, k, c] with mask [Bg, S, k]. Returns [Bg, S, H, c] in q's dtype.
    """
    bg, s, h, _ = q.shape
    qf = q.float()
    # bmm calls with the layouts einsum uses (same kernels, same results) without einsum's parsing overhead
    logits = [_qk(qf, raw_k.float()).masked_fill(~raw_mask[:, :, None, :], _NEG_INF)]
    if comp_k is not None:
        logits.append(_qk(qf, comp_k.float(), gathered).masked_fill(~comp_mask[:, :, None, :], _NEG_INF))
    logits = torch.cat(logits, dim=-1) * scale
    sink_col = sink.float().view(1, 1, h, 1).expand(bg, s, h, 1)
    probs = torch.softmax(torch.cat([logits, sink_col], dim=-1), dim=-1)[..., :-1].to(q.dtype)  # [Bg, S, H, K]
    w = raw_k.shape[1]
    out = _pv(probs[..., :w], raw_k.to(q.dtype))
    if comp_k is not None:
        out = out + _pv(probs[..., w:], comp_k.to(q.dtype), gathered)
    return out


def _qk(q: torch.Tensor, k: torch.Tensor, gathered: bool = False) -> torch.Tensor:
    """einsum("bshc,bkc->bshk") or, gathered, einsum("bshc,bskc->bshk"): q [Bg, S, H, c] -> [Bg, S, H, K]."""
    bg, s, h, c = q.shape
    if gathered:
        kk = k.shape[2]
        return torch.bmm(q.reshape(bg * s, h, c), k.reshape(bg * s, kk, c).transpose(1, 2)).view(bg, s, h, kk)
    return torch.bmm(q.reshape(bg, s * h, c), k.transpose(1, 2)).view(bg, s, h, k.shape[1])


def _pv(p: torch.Tensor, v: torch.Tensor, gathered: bool = False) -> torch.Tensor:
    """einsum("bshk,bkc->bshc") or, gathered, einsum("bshk,bskc->bshc"): p [Bg, S, H, K] -> [Bg, S, H, c]."""
    bg, s, h, kk = p.shape
    c = v.shape[-1]
    if gathered:
        return torch.bmm(p.reshape(bg * s, h, kk), v.reshape(bg * s, kk, c)).view(bg, s, h, c)
    return torch.bmm(p.reshape(bg, s * h, kk), v).view(bg, s, h, c)
