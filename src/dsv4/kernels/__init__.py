"""Optional native CPU kernels: the hot spots of the model's inference path fused in C (``cpu_kernels.c``) and
called through ctypes: linear layers (the output head, attention projections), the routed + shared experts, mHC
(``hc_pre`` + the following RMSNorm, ``hc_post``), attention over the window ring and the compressed pages (decode
tokens and prefill chunks), the Lightning Indexer's top-k, the compressors' decode update, and the greedy argmax.
The op layer (dsv4/ops/cpu.py) registers them as the CPU kernels of its ops; docs/architecture.md sec 6.

``build.py`` compiles them once per machine with the system C compiler (an AVX-512 and an AVX2 build from one
source, picked from the CPU flags; ``DSV4_KERNEL_ISA=avx512|avx2`` forces one) into ``$DSV4_KERNEL_CACHE`` (default
``~/.cache/dsv4/kernels``), under a file lock, a failed build cached with its reason (``DSV4_KERNEL_REBUILD=1``
retries). When that is not possible (no compiler, neither ISA, or ``DSV4_NATIVE_KERNELS=0``) :func:`available` is
False, :func:`why_unavailable` says why, and the model keeps its plain-PyTorch path: the kernels are a speed-up,
never a requirement. :func:`isa` names the build in use.

Numerics: activations fp32 or bf16 (widened), every sum fp32, results fp32; weights are read in place (bf16 or fp32,
row-major), a bf16 weight widened exactly; the KV cache (window ring, compressed entries, indexer keys) is read in
place in fp32 or bf16, and the compressor writes its entries rounded once to the pages' dtype, as the reference
does. Results equal the PyTorch fp32 computation of the same stored values up to summation order
(tests/model/test_kernels.py, once per ISA build). Products with 64 or more rows go to the BLAS ``sgemm`` in torch's
own library when it exports one (``DSV4_KERNEL_BLAS=0``: never). Not here: the build and the ctypes signatures
(``build.py``), any choice of when the model uses the kernels (ops/cpu.py).
Shape legend: M rows (tokens), K in-features, N out-features, D dim, F expert dim.
"""

from __future__ import annotations

import ctypes

import torch

from dsv4.kernels import build
from dsv4.kernels.build import available, isa, loaded, why_unavailable  # noqa: F401 (the public API)

_lib_or_raise = build.lib_or_raise
# dtype codes of the C ABI (simd.h)
_DT = {torch.float32: 0, torch.bfloat16: 1}


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def _cache_dt(t: torch.Tensor, what: str) -> int:
    """The dtype code of a cache tensor the kernels read (or write) in place: fp32 or bf16, contiguous, on the CPU."""
    if t.dtype not in _DT or not t.is_contiguous() or t.device.type != "cpu":
        raise ValueError(f"the native kernels read the {what} in place as a contiguous fp32 or bf16 CPU tensor, "
                         f"got {t.dtype} (contiguous={t.is_contiguous()}) on {t.device}; build the KVCache with "
                         f"dtype=torch.bfloat16 or torch.float32")
    return _DT[t.dtype]


def _check_weight(w: torch.Tensor) -> None:
    if w.dtype not in (torch.bfloat16, torch.float32) or w.dim() != 2 or not w.is_contiguous() or w.is_cuda:
        raise ValueError(f"native kernels take contiguous 2-D bf16/fp32 CPU weights, got {w.dtype} "
                         f"{tuple(w.shape)} (contiguous={w.is_contiguous()}) on {w.device}")


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., K] -> fp32 [..., N]: ``F.linear(x.float(), weight.float())`` with weight [N, K] bf16 or fp32."""
    lib = _lib_or_raise()
    _check_weight(weight)
    n, k = weight.shape
    xf = x.reshape(-1, k).float().contiguous()
    y = torch.empty(xf.shape[0], n, dtype=torch.float32)
    lib.dsv4_linear(_ptr(xf), xf.shape[0], k, _ptr(weight), int(weight.dtype == torch.bfloat16), n, _ptr(y),
                    torch.get_num_threads())
    return y.view(*x.shape[:-1], n)


# pointer arrays of the expert blocks seen, keyed by the blocks' addresses, shapes and dtype (never a stale one: the
# key is the tensors' current layout, read at every call)
_moe_arrays: dict[tuple, tuple] = {}


def moe(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor,
        w2: torch.Tensor, shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | list[torch.Tensor] | None,
        swiglu_limit: float) -> torch.Tensor:
    """Routed experts (per token in ascending expert id, fp32 sums from zero) plus the shared expert, as the
    ``dsv4::routed_experts`` op: x [T, D], ids [T, k], routing weights [T, k]; the routed experts' stacked
    ``w1, w3 [E, F, D]``, ``w2 [E, D, F]`` and the shared expert's (or None), all of one dtype -> fp32 [T, D].
    TypeError: weights the kernel cannot read (layout, dtype); ValueError: expert ids out of range."""
    lib = _lib_or_raise()
    blocks = (w1, w3, w2)
    for w in blocks:  # each expert's matrix row-major; the experts at any stride (the test aliases them)
        if (w.dim() != 3 or w.stride(2) != 1 or w.stride(1) != w.shape[2] or w.dtype not in _DT
                or w.device.type != "cpu"):
            raise TypeError(f"the native MoE kernel takes [E, rows, cols] bf16/fp32 CPU expert blocks with row-major "
                            f"experts, got {w.dtype} {tuple(w.shape)} strides {w.stride()} on {w.device}")
    tensors = [*blocks, *(shared or ())]
    if len({w.dtype for w in tensors}) != 1:
        raise TypeError("all expert weights must share one dtype (bf16 or fp32) for the native MoE kernel")
    if shared:
        for w in shared:
            _check_weight(w)
    n_exp, inter, dim = w1.shape
    key = tuple((w.data_ptr(), w.shape, w.stride(0)) for w in blocks) + (w1.dtype,)
    arrays = _moe_arrays.get(key)
    if arrays is None:  # the C kernel takes one pointer per expert matrix
        if len(_moe_arrays) > 4096:
            _moe_arrays.clear()
        arrays = _moe_arrays[key] = tuple(
            (ctypes.c_void_p * n_exp)(*(w.data_ptr() + e * w.stride(0) * w.element_size() for e in range(n_exp)))
            for w in blocks)
    xf = x.float().contiguous()
    t, d = xf.shape
    if d != dim:
        raise ValueError(f"moe: x has dim {d}, the experts {dim}")
    ids = ids.to(torch.int64).contiguous()
    weights = weights.float().contiguous()
    y = torch.empty(t, d, dtype=torch.float32)
    sh = tuple(w.data_ptr() for w in shared) if shared else (None, None, None)
    rc = lib.dsv4_moe(_ptr(xf), t, d, inter, shared[0].shape[0] if shared else inter, _ptr(ids), _ptr(weights),
                      ids.shape[1], n_exp, *arrays, *sh, int(w1.dtype == torch.bfloat16),
                      float(swiglu_limit), _ptr(y), torch.get_num_threads())
    if rc != 0:
        raise ValueError(f"moe: expert ids must lie in [0, {n_exp})")
    return y


def hc_pre(x: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, sinkhorn_iters: int,
           hc_eps: float, norm_eps: float, norm_weight: torch.Tensor, norm_eps2: float
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``hyper.hc_pre`` followed by the sub-layer's RMSNorm on its output (``norm_weight``, ``norm_eps2``), as
    ``Block._pre_norm`` uses them: fp32 x [N, M, D] -> normed y [N, D], post [N, M], comb [N, M, M]."""
    lib = _lib_or_raise()
    n, m, d = x.shape
    if m > 8:
        raise ValueError(f"the native hc_pre supports hc_mult <= 8, got {m}")
    xf = x.float().contiguous()
    y = torch.empty(n, d, dtype=torch.float32)
    post = torch.empty(n, m, dtype=torch.float32)
    comb = torch.empty(n, m, m, dtype=torch.float32)
    fn, base, scale, norm_weight = (t.float().contiguous() for t in (fn, base, scale, norm_weight))
    lib.dsv4_hc_pre(_ptr(xf), n, m, d, _ptr(fn), _ptr(base), _ptr(scale), sinkhorn_iters, hc_eps, norm_eps,
                    _ptr(norm_weight), norm_eps2, _ptr(y), _ptr(post),
                    _ptr(comb), torch.get_num_threads())
    return y, post, comb


def chunk_attention(q: torch.Tensor, kv: torch.Tensor, start: torch.Tensor, lens: torch.Tensor, ring: torch.Tensor,
                    slots: torch.Tensor, entries: torch.Tensor | None, entry_rows: torch.Tensor | None,
                    sink: torch.Tensor, scale: float) -> torch.Tensor:
    """``attention.sparse_attention`` for a group's chunks, keys read in place: q [B, S, H, c], the chunks' own keys
    kv [B, S, c]; query s of sequence b sits at ``start[b] + s`` (s < lens[b]); its window comes from the chunk and,
    before ``start[b]``, from ``ring`` [slots, w, c] (call before writing the chunk to the ring); its compressed keys
    are rows ``entry_rows`` [B, S, E] (-1 = none) of ``entries`` viewed [rows, c]. q/kv in any float dtype; ring and
    entries fp32 or bf16 (read as stored, widened exactly); all sums fp32. -> fp32 [B, S, H, c]."""
    lib = _lib_or_raise()
    b, s, h, c = q.shape
    ring_dt = _cache_dt(ring, "window ring")
    ent_dt = _cache_dt(entries, "compressed entries") if entries is not None else 0
    qf, kvf = q.float().contiguous(), kv.float().contiguous()
    start, lens = start.to(torch.int64).contiguous(), lens.to(torch.int64).contiguous()
    slots = slots.to(torch.int64).contiguous()
    e = 0
    if entries is not None and entry_rows is not None:
        entry_rows = entry_rows.to(torch.int64).contiguous()
        e = entry_rows.shape[-1]
    out = torch.empty(b, s, h, c, dtype=torch.float32)
    lib.dsv4_chunk_attn(_ptr(qf), _ptr(kvf), b, s, h, c, _ptr(start), _ptr(lens), _ptr(ring), ring_dt, ring.shape[1],
                        _ptr(slots), _ptr(entries) if e else None, ent_dt, _ptr(entry_rows) if e else None, e,
                        _ptr(sink.float().contiguous()), scale, _ptr(out), torch.get_num_threads())
    return out


def _same_dtype(*ws: torch.Tensor) -> int:
    for w in ws:
        _check_weight(w)
    if len({w.dtype for w in ws}) != 1:
        raise ValueError(f"the native kernels take the weights of one call in one dtype (bf16 or fp32), got "
                         f"{sorted(str(w.dtype) for w in ws)}")
    return int(ws[0].dtype == torch.bfloat16)


def attention_in(x: torch.Tensor, wq_a: torch.Tensor, q_norm: torch.Tensor, wq_b: torch.Tensor, n_heads: int,
                 wkv: torch.Tensor, kv_norm: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``Attention.forward``'s inputs in one call: x [B, D] -> qr = q_norm(x wq_a^T) [B, Q], q = RoPE(RMS(qr wq_b^T)
    per head) [B, H, c], kv = RoPE(kv_norm(x wkv^T)) [B, c]; cos/sin [B, R/2]; all fp32."""
    lib = _lib_or_raise()
    bf = _same_dtype(wq_a, wq_b, wkv)
    xf = x.float().contiguous()
    b, d = xf.shape
    qd, c = wq_a.shape[0], wkv.shape[0]
    qr = torch.empty(b, qd, dtype=torch.float32)
    q = torch.empty(b, n_heads, c, dtype=torch.float32)
    kv = torch.empty(b, c, dtype=torch.float32)
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    lib.dsv4_attn_in(_ptr(xf), b, d, _ptr(wq_a), qd, _ptr(q_norm.float().contiguous()), _ptr(wq_b), n_heads, c,
                     _ptr(wkv), _ptr(kv_norm.float().contiguous()), _ptr(cos), _ptr(sin), cos.shape[-1], eps, bf,
                     _ptr(qr), _ptr(q), _ptr(kv), torch.get_num_threads())
    return qr, q, kv


def attention_out(o: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, wo_a: torch.Tensor, groups: int,
                  wo_b: torch.Tensor) -> torch.Tensor:
    """``Attention.forward``'s output in one call: inverse RoPE on o [B, H, c], grouped wo_a, wo_b -> fp32 [B, D]."""
    lib = _lib_or_raise()
    bf = _same_dtype(wo_a, wo_b)
    of = o.float().contiguous().clone()  # rotated in place
    b, h, c = of.shape
    y = torch.empty(b, wo_b.shape[0], dtype=torch.float32)
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    lib.dsv4_attn_out(_ptr(of), b, h, c, _ptr(cos), _ptr(sin), cos.shape[-1], _ptr(wo_a), groups,
                      wo_a.shape[0] // groups, _ptr(wo_b), wo_b.shape[0], bf, _ptr(y), torch.get_num_threads())
    return y


def hc_post(f: torch.Tensor, res: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """``hyper.hc_post`` in fp32: f [N, D], res [N, M, D], post [N, M], comb [N, M, M] -> [N, M, D]."""
    lib = _lib_or_raise()
    n, m, d = res.shape
    ff, rf = f.float().contiguous(), res.float().contiguous()
    pf, cf = post.float().contiguous(), comb.float().contiguous()
    out = torch.empty(n, m, d, dtype=torch.float32)
    lib.dsv4_hc_post(_ptr(ff), _ptr(rf), _ptr(pf), _ptr(cf), n, m, d, _ptr(out), torch.get_num_threads())
    return out


def indexer_topk(q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, block_tables: torch.Tensor, ratio: int,
                 visible: torch.Tensor, k: int) -> torch.Tensor:
    """``Indexer.select`` reading the indexer keys in place from their pages: q [B, S, H, I] (S queries of each
    sequence: 1 when decoding, a prefill chunk's otherwise), w [B, S, H], keys = the cache's
    [pages, page_size // ratio, I] fp32 or bf16, block_tables [B, P], visible [B, S] -> [B, S, k] entry ids, best
    first, -1 where fewer than k are visible. The queries of a sequence share its block-table row (no copy)."""
    lib = _lib_or_raise()
    keys_dt = _cache_dt(keys, "indexer keys")
    b, s, h, i = q.shape
    qf, wf = q.float().reshape(b * s, h, i).contiguous(), w.float().reshape(b * s, h).contiguous()
    tables = block_tables.to(torch.int64).contiguous()
    vis = visible.to(torch.int64).reshape(b * s).contiguous()
    top = torch.empty(b, s, k, dtype=torch.int64)
    lib.dsv4_indexer_topk(_ptr(qf), _ptr(wf), b * s, h, i, _ptr(keys), keys_dt, _ptr(tables), tables.shape[1], s,
                          ratio, keys.shape[1] * ratio, _ptr(vis), k, _ptr(top), torch.get_num_threads())
    return top


def compress_decode(x: torch.Tensor, wkv: torch.Tensor, wgate: torch.Tensor, ape: torch.Tensor, ratio: int,
                    overlap: bool, positions: torch.Tensor, slots: torch.Tensor, state: torch.Tensor,
                    norm_weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor, pages: torch.Tensor,
                    block_tables: torch.Tensor) -> None:
    """``Compressor.project`` + ``group_entries`` (with a cache) for one new token per sequence, in place: x [B, D]
    at ``positions`` [B]; the tail state [slots, 2, rows, C] and, for tokens that complete a block, the entry pages
    [pages, page_size // ratio, c] are updated. cos/sin [B, R/2] at the entry position (pos // ratio) * ratio.
    wkv/wgate fp32 or bf16 (one dtype), state fp32, pages fp32 or bf16 (the fp32 entry rounded once)."""
    lib = _lib_or_raise()
    w_dt = _same_dtype(wkv, wgate)
    if state.dtype != torch.float32 or not state.is_contiguous():
        raise ValueError(f"the native compressor updates a contiguous fp32 tail state in place, got {state.dtype}")
    pages_dt = _cache_dt(pages, "compressed entry pages")
    ape = ape.float().contiguous()
    xf = x.float().contiguous()
    b, d = xf.shape
    c = pages.shape[-1]
    pos, slots = positions.to(torch.int64).contiguous(), slots.to(torch.int64).contiguous()
    tables = block_tables.to(torch.int64).contiguous()
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    norm_w = norm_weight.float().contiguous()
    lib.dsv4_compress_decode(_ptr(xf), b, d, _ptr(wkv), _ptr(wgate), w_dt, _ptr(ape), wkv.shape[0], c, ratio,
                             int(overlap), _ptr(pos), _ptr(slots), _ptr(state), state.shape[2], _ptr(norm_w), eps,
                             _ptr(cos), _ptr(sin), cos.shape[-1], _ptr(pages), pages_dt, _ptr(tables),
                             tables.shape[1], pages.shape[1] * ratio, torch.get_num_threads())


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """``x.max(dim=-1).indices`` for fp32 [M, V] rows (first maximum; a NaN wins), rows split over the threads."""
    lib = _lib_or_raise()
    xf = x.float().contiguous()
    m, v = xf.shape
    out = torch.empty(m, dtype=torch.int64)
    lib.dsv4_argmax_rows(_ptr(xf), m, v, _ptr(out), torch.get_num_threads())
    return out
