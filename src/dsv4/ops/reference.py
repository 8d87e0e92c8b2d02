"""Plain-PyTorch reference of every dsv4 op (the semantics; ops/__init__.py registers them as ``dsv4::<name>``).

Each function here is the definition of its op: any backend must return the same values up to summation order
(tests/ops). They run on any device torch supports and are differentiable (plain torch ops; the op layer gives them
an autograd formula by recomputation, ops/__init__.py). Memory is bounded: attention and the indexer work in query
blocks sized so no temporary exceeds :data:`BLOCK_ELEMS` elements (docs/architecture.md sec 6 states the bytes), the
indexer scores its keys in chunks and keeps a running top-k, and compressed entries are read from their pages, never
gathered for the whole history or masked densely.

Deliberately not here: caches, cache writes, module state, the choice of backend.

Shape legend: T tokens, K in-features, N out-features, D dim, F expert dim, E experts (entries in attention), k
picks, B sequences, S chunk width, Q query block, H heads, c head dim, w window, M = hc_mult, I indexer head dim,
R pages, P page rows per page.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsv4.model.norm import rms_unweighted
from dsv4.model.rope import apply_rope
from dsv4.ops import packed

_NEG_INF = float("-inf")
# bound on the elements of one attention / indexer temporary (logits of a query block, gathered keys, a score chunk):
# 2^24 fp32 elements = 64 MiB
BLOCK_ELEMS = 1 << 24
_PLAIN = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _plain_weight(op: str, weight: torch.Tensor, scale: torch.Tensor | None) -> None:
    if scale is not None or weight.dtype not in _PLAIN:
        raise TypeError(f"dsv4::{op}: the reference computes on float weights (fp32/bf16/fp16) without a scale; "
                        f"got a {weight.dtype} weight{' with a scale' if scale is not None else ''}. Packed weights "
                        "need the packed-weight branch of this op (docs/architecture.md, 'add a dtype')")


# ---------------------------------------------------------------------------------------------------- linear
def linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] @ weight [N, K]^T -> [..., N] in x's dtype (the weight is read in its stored dtype, widened).
    Packed weights (FP8 e4m3 / FP4 e2m1 with a ue8m0 ``scale``) and float weights of another dtype than x are
    dequantised / widened a few MB of rows at a time (ops/packed.py), never whole."""
    if scale is not None and packed.is_packed(weight):
        return packed.linear_reference(x, weight, scale)
    _plain_weight("linear", weight, scale)
    if weight.dtype == x.dtype:
        return F.linear(x, weight)
    return packed.linear_reference(x, weight, None)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as model/norm.py: fp32 statistics and weight, one rounding to x's dtype."""
    xf = x.float()
    return (weight.float() * (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps))).to(x.dtype)


# ---------------------------------------------------------------------------------------------------- top-k
def topk_lowest(scores: torch.Tensor, k: int, best_first: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k over the last dim, exact ties to the LOWEST index (the one tie rule of every backend): best first (ties
    in index order), or in index order with ``best_first=False``. Values are returned in ``scores``' dtype.

    torch.topk gives the right values but leaves which of several equal scores it picks unspecified, so it runs on
    keys that hold no ties: the score's fp32 bits mapped to an order-preserving int32 (-0.0 folded into +0.0) in the
    high half of an int64, ``n - 1 - index`` in the low half. One topk, no sort of all n scores (a stable sort took
    2/3 of a prefill step at 30K tokens of context) and no host sync."""
    n = scores.shape[-1]
    k = min(k, n)
    bits = (scores.float() + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0: equal scores, equal keys
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # negative floats order backwards as ints: flip them
    rank = torch.arange(n - 1, -1, -1, device=scores.device)  # a lower index, a larger key
    key = (bits.to(torch.int64) << 32) | rank
    idx = torch.topk(key, k, dim=-1, sorted=best_first).indices
    if not best_first:
        idx = idx.sort(dim=-1).values
    return scores.gather(-1, idx), idx


def argmax(x: torch.Tensor) -> torch.Tensor:
    """x [M, V] -> [M] int64, the first maximum of each row (a NaN wins, as torch.max)."""
    return x.max(dim=-1).indices


# ---------------------------------------------------------------------------------------------------- experts
def swiglu_expert(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor, limit: float,
            weights: torch.Tensor | None,
            scales: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None] = (None, None, None),
            lin=None) -> torch.Tensor:
    """Clamped SwiGLU expert: x [n, D] -> [n, D] in x's dtype; the routing weight scales h before w2 (official).
    ``scales``: the (w1, w3, w2) scales of packed weights; ``lin``: the linear to use (a backend's; default the
    reference's)."""
    lin = lin or linear
    g = lin(x, w1, scales[0]).float()
    u = lin(x, w3, scales[1]).float()
    if limit > 0:
        g = g.clamp(max=limit)
        u = u.clamp(-limit, limit)
    h = F.silu(g) * u  # [n, F] fp32
    if weights is not None:
        h = weights[:, None] * h
    return lin(h.to(x.dtype), w2, scales[2])


def routed_experts(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor,
                   w2: torch.Tensor, scales: list[torch.Tensor], shared: list[torch.Tensor],
                   shared_scales: list[torch.Tensor | None], limit: float) -> torch.Tensor:
    """The MoE after its gate: x [T, D], ids [T, k] expert ids, routing weights [T, k] -> fp32 [T, D] = sum over the
    picks of weight * expert(x) in ascending expert id, from zeros, plus the shared expert (``shared`` = its
    [w1, w3, w2], or empty). The routed experts' weights come stacked: w1, w3 [E, F, D], w2 [E, D, F] (packed: the
    stored bytes); ``scales`` = their [s1, s3, s2] [E, ...] ue8m0 scales, or empty for float weights, and then each
    expert is dequantised on the fly, one at a time (ops/packed.py). ``shared_scales``: the shared expert's 3 or
    empty."""
    n, k = ids.shape
    n_exp = len(w1)
    flat = ids.flatten()  # [T*k]
    order = torch.argsort(flat, stable=True)  # pairs in expert order; per expert in token order
    # NOTE: the op's one host sync (the sizes of the per-expert slices); a device backend uses a grouped GEMM
    counts = torch.bincount(flat, minlength=n_exp).tolist()
    if len(counts) > n_exp:  # (a negative id already failed in bincount)
        raise ValueError(f"dsv4::routed_experts: expert ids must lie in [0, {n_exp})")
    tok = order // k
    w = weights.flatten()[order].float()
    xs = x[tok]  # [T*k, D]
    outs = []
    a = 0
    for e, cnt in enumerate(counts):
        if cnt:
            sc = (scales[0][e], scales[1][e], scales[2][e]) if scales else (None, None, None)
            outs.append(swiglu_expert(xs[a:a + cnt], w1[e], w3[e], w2[e], limit, w[a:a + cnt], sc))
            a += cnt
    y = torch.zeros(n, x.shape[1], dtype=torch.float32, device=x.device)
    if outs:
        y = y.index_add(0, tok, torch.cat(outs).float())
    if shared:
        sc = tuple(shared_scales) if shared_scales else (None, None, None)
        y = y + swiglu_expert(x, shared[0], shared[1], shared[2], limit, None, sc).float()
    return y


# ---------------------------------------------------------------------------------------------------- mHC
def sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Official order: row softmax (+eps), column normalise, then (iters-1) x (row, column); [.., M, M] fp32."""
    comb = torch.softmax(logits, dim=-1) + eps
    comb = comb / (comb.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(-1, keepdim=True) + eps)
        comb = comb / (comb.sum(-2, keepdim=True) + eps)
    return comb


def hc_mixes(x: torch.Tensor, fn: torch.Tensor, norm_eps: float) -> torch.Tensor:
    """x [N, M, D] -> RMSNorm(flatten(x)) @ fn^T  [N, K] in fp32 (no norm weight)."""
    xf = x.flatten(-2).float()  # [N, M*D]
    r = torch.rsqrt(xf.square().mean(-1, keepdim=True) + norm_eps)
    return (xf @ fn.float().t()) * r


def hc_pre(x: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, norm_weight: torch.Tensor,
           sinkhorn_iters: int, hc_eps: float, norm_eps: float, out_eps: float
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mHC pre-mix then the sub-layer's RMSNorm (``norm_weight``, ``out_eps``): x [N, M, D] -> (normed y [N, D] in
    x's dtype, post [N, M] fp32, comb [N, M, M] fp32, Sinkhorn-projected)."""
    m = x.shape[-2]
    mixes = hc_mixes(x, fn, norm_eps)  # [N, (2+M)*M]
    base, scale = base.float(), scale.float()
    pre = torch.sigmoid(mixes[..., :m] * scale[0] + base[:m]) + hc_eps  # [N, M]
    post = 2 * torch.sigmoid(mixes[..., m:2 * m] * scale[1] + base[m:2 * m])  # [N, M]
    comb = (mixes[..., 2 * m:] * scale[2] + base[2 * m:]).unflatten(-1, (m, m))  # [N, M, M], C[j,k] row-major
    comb = sinkhorn(comb, sinkhorn_iters, hc_eps)
    y = (pre.unsqueeze(-1) * x.float()).sum(-2).to(x.dtype)  # [N, D]
    return rms_norm(y, norm_weight, out_eps), post, comb


def hc_post(f: torch.Tensor, res: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """X_new[k] = post[k] * f + sum_j comb[j, k] * res[j]; f [N, D], res [N, M, D] -> [N, M, D] in res.dtype."""
    mixed = torch.bmm(comb.transpose(-1, -2), res.float())  # C^T: sum over the FIRST stream axis
    return (post.unsqueeze(-1) * f.float().unsqueeze(-2) + mixed).to(res.dtype)


# ---------------------------------------------------------------------------------------------------- attention
def attention_in(x: torch.Tensor, wq_a: torch.Tensor, wq_a_scale: torch.Tensor | None, q_norm: torch.Tensor,
                 wq_b: torch.Tensor, wq_b_scale: torch.Tensor | None, wkv: torch.Tensor,
                 wkv_scale: torch.Tensor | None, kv_norm: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 n_heads: int, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [T, D] -> qr = q_norm(x wq_a^T) [T, Q], q = RoPE(RMS(qr wq_b^T) per head) [T, H, c],
    kv = RoPE(kv_norm(x wkv^T)) [T, c]; cos/sin [T, R/2]; all in x's dtype."""
    qr = rms_norm(linear(x, wq_a, wq_a_scale), q_norm, eps)  # [T, Q]
    q = linear(qr, wq_b, wq_b_scale).unflatten(-1, (n_heads, -1))  # [T, H, c]
    q = apply_rope(rms_unweighted(q, eps), cos[:, None], sin[:, None])
    kv = apply_rope(rms_norm(linear(x, wkv, wkv_scale), kv_norm, eps), cos, sin)  # [T, c]
    return qr, q, kv


def attention_out(o: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, wo_a: torch.Tensor,
                  wo_a_scale: torch.Tensor | None, groups: int, wo_b: torch.Tensor, wo_b_scale: torch.Tensor | None
                  ) -> torch.Tensor:
    """Inverse RoPE on o [T, H, c], grouped low-rank wo_a (per group of heads), wo_b -> [T, D] in o's dtype."""
    n = o.shape[0]
    o = apply_rope(o, cos[:, None], sin[:, None], inverse=True)  # [T, H, c]
    o = o.reshape(n, groups, -1)  # [T, G, H*c/G]
    o = grouped_linear(o, wo_a, wo_a_scale, linear)  # [T, G, d_g]
    return linear(o.flatten(1), wo_b, wo_b_scale)


def grouped_linear(o: torch.Tensor, wo_a: torch.Tensor, wo_a_scale: torch.Tensor | None, lin) -> torch.Tensor:
    """o [T, G, K] -> [T, G, R]: group g through rows g*R..(g+1)*R of wo_a [G*R, K] (= einsum tgk,grk). A packed
    wo_a whose groups are whole scale blocks (every real config: R = 1024) runs as G packed linears through ``lin``
    (the caller's linear: this reference's or a backend's); otherwise it is dequantised (small: tiny configs)."""
    groups = o.shape[1]
    if wo_a_scale is not None and packed.is_packed(wo_a):
        r = wo_a.shape[0] // groups
        b = 128 if wo_a.dtype == torch.float8_e4m3fn else 1  # rows per scale row
        if r % b == 0:
            return torch.stack([lin(o[:, i], wo_a[i * r:(i + 1) * r], wo_a_scale[i * r // b:(i + 1) * r // b])
                                for i in range(groups)], dim=1)
        wo_a = packed.weight_rows(wo_a, wo_a_scale, 0, wo_a.shape[0], o.dtype)
    else:
        _plain_weight("attention_out", wo_a, wo_a_scale)
    w = wo_a if wo_a.dtype == o.dtype else wo_a.to(o.dtype)
    w = w.view(groups, -1, o.shape[-1])  # [G, R, K]
    return torch.bmm(o.transpose(0, 1), w.transpose(1, 2)).transpose(0, 1)  # [T, G, R]


def _page_rows(block_tables: torch.Tensor, i: torch.Tensor, ratio: int, rows_per_page: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Entry index i [B, ...] -> (page id, row in page) per docs/contracts.md (page size = rows_per_page * ratio)."""
    page_size = rows_per_page * ratio
    flat = i.flatten(1)
    col = (flat * ratio // page_size).clamp(0, block_tables.shape[1] - 1)
    page = block_tables.gather(1, col).clamp(min=0)
    row = (flat * ratio % page_size) // ratio
    return page.view_as(i), row.view_as(i)


def _query_block(b: int, s: int, per_query: int, per_query_sq: int = 0) -> int:
    """Queries per block Q so that b * (Q * per_query + Q^2 * per_query_sq) <= BLOCK_ELEMS (at least 1): shapes
    only, no sync. (Window logits grow with Q twice: Q queries x (Q + w - 1) keys.)"""
    q = max(1, min(s, BLOCK_ELEMS // max(1, b * (per_query + per_query_sq))))
    while q > 1 and b * (q * per_query + q * q * per_query_sq) > BLOCK_ELEMS:
        q = q * 7 // 8
    return q


def sparse_attention(q: torch.Tensor, kv: torch.Tensor, start: torch.Tensor, lens: torch.Tensor, ring: torch.Tensor,
                     slots: torch.Tensor, entries: torch.Tensor | None, block_tables: torch.Tensor | None,
                     ratio: int, n_entries: int, topk: torch.Tensor | None, sink: torch.Tensor, scale: float
                     ) -> torch.Tensor:
    """One softmax over a query's sliding window, its compressed entries and the per-head sink (K = V).

    q [B, S, H, c] and the chunk's own keys kv [B, S, c]: query s of sequence b sits at position start[b] + s
    (s < lens[b]; padding rows give zeros). Window: positions p - w + 1 .. p; those before start[b] come from
    ``ring`` [slots, w, c] row pos % w of slot ``slots[b]`` (the ring as it was before this chunk), the others from kv.
    Compressed entries ``entries`` [R, P, c] (None = sliding window only) are paged: entry i of sequence b is row
    (i * ratio % (P * ratio)) // ratio of page block_tables[b, i * ratio // (P * ratio)]. With ``topk`` [B, S, k]
    (CSA) a query reads the listed entries (-1 = none); without it (HCA) every entry i < (p + 1) // ratio.
    ``n_entries`` bounds the entry ids any query of the call may see (max over b of (start + lens) // ratio).
    Logits and softmax in fp32, probabilities rounded to q's dtype before P V. -> [B, S, H, c] in q's dtype.
    """
    b, s, h, c = q.shape
    w = ring.shape[1]
    dev = q.device
    qpos = start[:, None] + torch.arange(s, device=dev)  # [B, S]
    qpos = torch.where(torch.arange(s, device=dev) < lens[:, None], qpos, -1)  # padding sees nothing
    hist_pos = start[:, None] - (w - 1) + torch.arange(w - 1, device=dev)  # [B, w-1]
    hist = ring[slots[:, None], hist_pos.clamp(min=0) % w]  # [B, w-1, c]
    keys = torch.cat([hist.to(kv.dtype), kv], dim=1)  # [B, w-1+S, c]
    kpos = torch.cat([torch.where(hist_pos >= 0, hist_pos, -1), qpos], dim=1)  # [B, w-1+S], -1 = no key
    comp = entries is not None and n_entries > 0
    hca = comp and topk is None
    if hca:  # every entry the last query can see, read once from the pages: [B, E, c]
        e_ids = torch.arange(n_entries, device=dev)[None].expand(b, -1)
        page, row = _page_rows(block_tables, e_ids, ratio, entries.shape[1])
        hca_k = entries[page, row]
    n_comp = (n_entries if hca else topk.shape[-1]) if comp else 0
    # bounds: logits [B, Q, H, Q + w - 1 + E or k] and CSA's gathered keys [B, Q, k, c]
    qb = _query_block(b, s, h * (w - 1 + n_comp), h)
    if comp and not hca:
        qb = min(qb, _query_block(b, s, n_comp * c))
    sink_f = sink.float()
    parts = []
    for a in range(0, s, qb):
        e = min(s, a + qb)
        kk = keys[:, a:e + w - 1]  # [B, Q+w-1, c] the block's window keys
        qp, kp = qpos[:, a:e, None], kpos[:, None, a:e + w - 1]
        mask = (kp >= 0) & (kp <= qp) & (kp > qp - w)  # [B, Q, Q+w-1]
        qf = q[:, a:e].float()  # [B, Q, H, c]
        logits = [torch.einsum("bqhc,bkc->bqhk", qf, kk.float()).masked_fill(~mask[:, :, None], _NEG_INF)]
        ck = None
        if hca:
            vis = torch.arange(n_entries, device=dev) < ((qp + 1) // ratio)  # [B, Q, E]; qp = -1 -> none
            ck = hca_k
            logits.append(torch.einsum("bqhc,bkc->bqhk", qf, ck.float()).masked_fill(~vis[:, :, None], _NEG_INF))
        elif comp:
            ids = topk[:, a:e]  # [B, Q, k]
            page, row = _page_rows(block_tables, ids.clamp(min=0), ratio, entries.shape[1])
            ck = entries[page, row]  # [B, Q, k, c] only the picked entries
            ok = (ids >= 0) & (qp >= 0)
            logits.append(torch.einsum("bqhc,bqkc->bqhk", qf, ck.float()).masked_fill(~ok[:, :, None], _NEG_INF))
        logits = torch.cat(logits, dim=-1) * scale
        sink_col = sink_f.view(1, 1, h, 1).expand(b, e - a, h, 1)
        probs = torch.softmax(torch.cat([logits, sink_col], dim=-1), dim=-1)[..., :-1].to(q.dtype)  # [B, Q, H, K]
        nw = kk.shape[1]
        out = torch.einsum("bqhk,bkc->bqhc", probs[..., :nw], kk.to(q.dtype))
        if hca:
            out = out + torch.einsum("bqhk,bkc->bqhc", probs[..., nw:], ck.to(q.dtype))
        elif comp:
            out = out + torch.einsum("bqhk,bqkc->bqhc", probs[..., nw:], ck.to(q.dtype))
        parts.append(out)
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


# ---------------------------------------------------------------------------------------------------- indexer
def indexer_topk(q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, block_tables: torch.Tensor, ratio: int,
                 visible: torch.Tensor, n_entries: int, k: int) -> torch.Tensor:
    """Lightning Indexer top-k: score I[s, e] = sum_h w[s, h] * ReLU(q[s, h] . K[e]) (in q's dtype) of each query
    against the paged indexer keys ``keys`` [R, P, I] (paging as :func:`sparse_attention`), entries
    e < visible[b, s]; q [B, S, H, I], w [B, S, H] -> [B, S, k] entry ids, best first, ties to the lowest id, -1
    where fewer than k are visible. ``n_entries`` bounds the entry ids (max visible); k <= n_entries.

    Keys are scored in chunks with a running top-k, so no [S, E]-sized temporary exists."""
    b, s, h, _ = q.shape
    dev = q.device
    if k == 0 or n_entries == 0:
        return torch.full((b, s, k), -1, dtype=torch.long, device=dev)
    chunk = max(k, min(n_entries, BLOCK_ELEMS // max(1, b * min(s, 64) * h)))
    qb = _query_block(b, s, h * chunk)
    out = []
    for a in range(0, s, qb):
        e = min(s, a + qb)
        qq, ww, vis = q[:, a:e], w[:, a:e], visible[:, a:e, None]  # [B, Q, H, I], [B, Q, H], [B, Q, 1]
        best_v = best_i = None
        for e0 in range(0, n_entries, chunk):
            e1 = min(n_entries, e0 + chunk)
            ids = torch.arange(e0, e1, device=dev)
            page, row = _page_rows(block_tables, ids[None].expand(b, -1), ratio, keys.shape[1])
            kk = keys[page, row].to(q.dtype)  # [B, C, I]
            sc = torch.einsum("bqhi,bci->bqhc", qq, kk)  # [B, Q, H, C]
            sc = (F.relu(sc) * ww[..., None]).sum(dim=2).float()  # [B, Q, C]
            sc = sc.masked_fill(ids >= vis, _NEG_INF)
            cand_i = ids.expand_as(sc)
            if best_v is not None:  # the running best (in id order) ahead of the chunk: positions follow the ids
                sc, cand_i = torch.cat([best_v, sc], dim=-1), torch.cat([best_i, cand_i], dim=-1)
            # in id order while merging; the last chunk's pick comes out best first (ties by position = by id)
            best_v, pos = topk_lowest(sc, min(k, sc.shape[-1]), best_first=e1 == n_entries)
            best_i = cand_i.gather(-1, pos)
        out.append(torch.where(best_i >= vis, -1, best_i))
    return out[0] if len(out) == 1 else torch.cat(out, dim=1)


# ---------------------------------------------------------------------------------------------------- compressor
def compressor_decode(x: torch.Tensor, wkv: torch.Tensor, wgate: torch.Tensor, ape: torch.Tensor,
                      norm_weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor,
                      positions: torch.Tensor, slots: torch.Tensor, block_tables: torch.Tensor, state: torch.Tensor,
                      pages: torch.Tensor, ratio: int, overlap: bool) -> None:
    """One new token per sequence through a compressor, in place (what Compressor.project + group_entries do for a
    decode step): x [B, D] at ``positions`` [B] projects to (kv, z = gate + ape[pos % r]) [B, C] fp32, written to
    its tail row of ``state`` [slots, 2, coff * r, C]; a token that completes its block pools the block (CSA:
    overlapping with the previous block's first half) into an entry, RMS-normed (``norm_weight``, in x's dtype) and
    rotated by ``cos``/``sin`` [B, R/2] (at the entry position (pos // r) * r), written to its row of ``pages``
    [R, P, c] (paging as :func:`sparse_attention`). CSA then keeps the completed block as the previous one."""
    r = ratio
    c = pages.shape[-1]
    off = r if overlap else 0
    xf = x.float()
    kv = linear(xf, wkv, None)  # [B, C]
    z = linear(xf, wgate, None) + ape.float()[positions % r]
    row = off + positions % r
    state[slots, 0, row] = kv
    state[slots, 1, row] = z
    done = (positions + 1) % r == 0  # [B] the token completes its block
    blk = state[slots, :, off:off + r]  # [B, 2, r, C] the block, this token included
    if overlap:
        prev = state[slots, :, :r, :c]  # [B, 2, r, c] the previous block's first half
        first = (positions // r == 0)[:, None, None]
        prev_kv = torch.where(first, 0.0, prev[:, 0])
        prev_z = torch.where(first, _NEG_INF, prev[:, 1])
        pool_kv = torch.cat([prev_kv, blk[:, 0, :, c:]], dim=1)  # [B, 2r, c]
        pool_z = torch.cat([prev_z, blk[:, 1, :, c:]], dim=1)
    else:
        pool_kv, pool_z = blk[:, 0], blk[:, 1]  # [B, r, c]
    pooled = (pool_z.softmax(dim=1) * pool_kv).sum(dim=1)  # [B, c] fp32
    entry = apply_rope(rms_norm(pooled.to(x.dtype), norm_weight, eps), cos, sin)
    # NOTE: rows of blocks still open are rewritten with their own value (no data-dependent indexing): a sequence's
    # open entry lives in its own last page, never shared
    page, prow = _page_rows(block_tables, (positions // r)[:, None], r, pages.shape[1])
    page, prow = page[:, 0], prow[:, 0]
    pages[page, prow] = torch.where(done[:, None], entry.to(pages.dtype), pages[page, prow])
    if overlap:  # the completed block becomes the previous one for the next entry
        state[slots, :, :r] = torch.where(done[:, None, None, None], blk, state[slots, :, :r])
