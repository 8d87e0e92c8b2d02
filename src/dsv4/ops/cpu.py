"""The CPU backend of the op layer: each op's CPU kernel (``torch.library.impl(..., "cpu")``).

A kernel calls the native CPU kernels (dsv4/kernels, C through ctypes) when ``ops.backend("cpu") == "native"``,
the library loads here, and the inputs are in a layout the C code reads (bf16/fp32 contiguous weights, an fp32 or
bf16 cache for attention and the indexer, one query per sequence for the indexer); else the op's reference. So the CPU
backend is always correct, and fast where it can be. The first time the library is unavailable the reason is logged
once (``dsv4.ops`` logger); :func:`native_status` returns it.

Packed weights (FP8 / FP4 with ue8m0 scales: ``linear``, ``routed_experts`` on FP4 experts,
the projections inside ``attention_in`` / ``attention_out``) go to kernels/quant.py, the other ops' arguments to
dsv4/kernels; each falls back to the reference the same way.

Native results equal the reference up to summation order (fp32 accumulation; tests/ops). They come back in the
reference's output dtype.

Deliberately not here: building or loading the library (dsv4/kernels), any autograd (registered per op, above the
backend).
"""

from __future__ import annotations

import logging
import threading

import torch

from dsv4 import kernels
from dsv4.kernels import quant as quant_kernels
from dsv4.model.norm import rms_unweighted
from dsv4.model.quant import FP4_BLOCK
from dsv4.model.rope import apply_rope
from dsv4.ops import backend, packed
from dsv4.ops import reference as ref

log = logging.getLogger("dsv4.ops")
_logged = threading.Event()
_logged_packed = threading.Event()
_PLAIN = (torch.bfloat16, torch.float32)


def _kernel(name: str):
    """Register the decorated function as ``dsv4::<name>``'s CPU kernel (and return it). torch.library.impl rather
    than register_kernel: the latter wraps every call in a dynamo-disable frame (a few us per op, ~90 ops a decode
    step); the kernel is opaque to dynamo either way (it traces the op, not its kernel)."""
    def register(fn):
        torch.library.impl(f"dsv4::{name}", "cpu", fn)
        return fn
    return register


def native_status() -> tuple[bool, str | None]:
    """(native kernels in use for CPU ops in this context, reason when not)."""
    if backend("cpu") != "native":
        return False, "the reference backend was chosen (ops.use_backend / BACKENDS)"
    if not kernels.available():
        return False, f"native CPU kernels unavailable: {kernels.why_unavailable()}"
    return True, None


def _native() -> bool:
    if backend("cpu") != "native":
        return False
    if kernels.available():
        return True
    if not _logged.is_set():
        _logged.set()
        log.warning("dsv4 ops: CPU ops run their PyTorch reference (%s)", kernels.why_unavailable())
    return False


def _plain(*ws: torch.Tensor) -> bool:
    """Weights the C kernels read in place: 2-D contiguous, all bf16 or all fp32."""
    return all(w.dim() == 2 and w.is_contiguous() and w.dtype == ws[0].dtype for w in ws) and ws[0].dtype in _PLAIN


# ---- packed weights (FP8 / FP4 + ue8m0 scales): kernels/quant.py, its own library until the kernel build merges


def _native_packed() -> bool:
    if backend("cpu") != "native":
        return False
    if quant_kernels.available():
        return True
    if not _logged_packed.is_set():
        _logged_packed.set()
        log.warning("dsv4 ops: CPU ops on packed weights run their PyTorch reference (%s)",
                    quant_kernels.why_unavailable())
    return False


def _packed_ok(weight: torch.Tensor, scale: torch.Tensor) -> bool:
    return weight.is_contiguous() and scale.is_contiguous() and weight.dim() == 2 and packed.is_packed(weight)


def _linear_any(x, weight, scale):
    """``dsv4::linear``'s CPU kernel (also called for the projections inside the attention ops)."""
    if scale is None:
        if _plain(weight) and x.dtype in _PLAIN and _native():
            return kernels.linear(x, weight).to(x.dtype)
    elif x.dtype in _PLAIN and _packed_ok(weight, scale) and _native_packed():
        return quant_kernels.linear(x, weight, scale).to(x.dtype)
    return ref.linear(x, weight, scale)


@_kernel("linear")
def _linear(x, weight, scale):
    return _linear_any(x, weight, scale)


@_kernel("routed_experts")
def _routed_experts(x, ids, weights, w1, w3, w2, scales, shared, shared_scales, limit):
    fp4_blocks = w1.dtype == torch.int8 and w1.shape[1] % FP4_BLOCK == 0 and (2 * w1.shape[2]) % FP4_BLOCK == 0
    if x.dim() == 2 and x.dtype in _PLAIN:
        if not scales and not shared_scales and w1.dtype in _PLAIN and _native():
            try:
                return kernels.moe(x, ids, weights, w1, w3, w2, shared if shared else None, limit)
            except TypeError:
                pass  # mixed dtypes or non-row-major experts: the reference
        elif scales and fp4_blocks and _native_packed():  # FP4 experts in whole 1x32 scale blocks
            y = quant_kernels.experts(x, ids, weights, w1, scales[0], w3, scales[1], w2, scales[2], limit)
            if shared:  # the reference's shared expert on this backend's linear (same roundings)
                sc = tuple(shared_scales) if shared_scales else (None, None, None)
                y = y + ref.swiglu_expert(x, *shared, limit, None, sc, lin=_linear_any).float()
            return y
    return ref.routed_experts(x, ids, weights, w1, w3, w2, scales, shared, shared_scales, limit)


@_kernel("hc_pre")
def _hc_pre(x, fn, base, scale, norm_weight, sinkhorn_iters, hc_eps, norm_eps, out_eps):
    if x.shape[1] <= 8 and x.dtype in _PLAIN and _native():
        y, post, comb = kernels.hc_pre(x, fn, base, scale, sinkhorn_iters, hc_eps, norm_eps, norm_weight, out_eps)
        return y.to(x.dtype), post, comb
    return ref.hc_pre(x, fn, base, scale, norm_weight, sinkhorn_iters, hc_eps, norm_eps, out_eps)


@_kernel("hc_post")
def _hc_post(f, res, post, comb):
    if res.dtype in _PLAIN and _native():
        return kernels.hc_post(f, res, post, comb).to(res.dtype)
    return ref.hc_post(f, res, post, comb)


@_kernel("attention_in")
def _attention_in(x, wq_a, wq_a_scale, q_norm, wq_b, wq_b_scale, wkv, wkv_scale, kv_norm, cos, sin, n_heads, eps):
    if (wq_a_scale is None and wq_b_scale is None and wkv_scale is None and x.dtype in _PLAIN
            and _plain(wq_a, wq_b, wkv) and _native()):
        qr, q, kv = kernels.attention_in(x, wq_a, q_norm, wq_b, n_heads, wkv, kv_norm, cos, sin, eps)
        return qr.to(x.dtype), q.to(x.dtype), kv.to(x.dtype)
    if any(s is not None for s in (wq_a_scale, wq_b_scale, wkv_scale)) and _native_packed():
        # packed projections: the reference's steps with this backend's linear (native on the packed weights)
        qr = ref.rms_norm(_linear_any(x, wq_a, wq_a_scale), q_norm, eps)  # [T, Q]
        q = _linear_any(qr, wq_b, wq_b_scale).unflatten(-1, (n_heads, -1))  # [T, H, c]
        q = apply_rope(rms_unweighted(q, eps), cos[:, None], sin[:, None])
        kv = apply_rope(ref.rms_norm(_linear_any(x, wkv, wkv_scale), kv_norm, eps), cos, sin)  # [T, c]
        return qr, q, kv
    return ref.attention_in(x, wq_a, wq_a_scale, q_norm, wq_b, wq_b_scale, wkv, wkv_scale, kv_norm, cos, sin,
                            n_heads, eps)


@_kernel("attention_out")
def _attention_out(o, cos, sin, wo_a, wo_a_scale, groups, wo_b, wo_b_scale):
    if wo_a_scale is None and wo_b_scale is None and o.dtype in _PLAIN and _plain(wo_a, wo_b) and _native():
        return kernels.attention_out(o, cos, sin, wo_a, groups, wo_b).to(o.dtype)
    if (wo_a_scale is not None or wo_b_scale is not None) and _native_packed():
        n = o.shape[0]
        o = apply_rope(o, cos[:, None], sin[:, None], inverse=True).reshape(n, groups, -1)  # [T, G, H*c/G]
        return _linear_any(ref.grouped_linear(o, wo_a, wo_a_scale, _linear_any).flatten(1), wo_b, wo_b_scale)
    return ref.attention_out(o, cos, sin, wo_a, wo_a_scale, groups, wo_b, wo_b_scale)


def _entry_rows(b: int, s: int, start: torch.Tensor, lens: torch.Tensor, entries: torch.Tensor,
                block_tables: torch.Tensor, ratio: int, n_entries: int, topk: torch.Tensor | None) -> torch.Tensor:
    """The rows of ``entries`` viewed [R * P, c] each query reads, [B, S, K] (-1 = none), as dsv4_chunk_attn takes
    them: the indexer's picks (CSA) or every visible entry (HCA)."""
    dev = start.device
    if topk is not None:
        ids, ok = topk.clamp(min=0), topk >= 0
    else:
        pos = start[:, None] + torch.arange(s, device=dev)  # [B, S]
        ids = torch.arange(n_entries, device=dev)[None, None].expand(b, s, -1)  # [B, S, E]
        ok = ids < ((pos + 1) // ratio)[..., None]
    page, row = ref._page_rows(block_tables, ids, ratio, entries.shape[1])
    return torch.where(ok, page * entries.shape[1] + row, -1)


@_kernel("sparse_attention")
def _sparse_attention(q, kv, start, lens, ring, slots, entries, block_tables, ratio, n_entries, topk, sink, scale):
    comp = entries is not None and n_entries > 0
    if (ring.dtype in _PLAIN and ring.is_contiguous() and q.dtype in _PLAIN
            and (not comp or (entries.dtype in _PLAIN and entries.is_contiguous())) and _native()):
        b, s = q.shape[:2]
        rows = _entry_rows(b, s, start, lens, entries, block_tables, ratio, n_entries, topk) if comp else None
        out = kernels.chunk_attention(q, kv, start, lens, ring, slots, entries if comp else None, rows, sink, scale)
        return out.to(q.dtype)
    return ref.sparse_attention(q, kv, start, lens, ring, slots, entries, block_tables, ratio, n_entries, topk,
                                sink, scale)


@_kernel("indexer_topk")
def _indexer_topk(q, w, keys, block_tables, ratio, visible, n_entries, k):
    # the C kernel scores each query (decode, or each of a prefill chunk's) against the keys in place
    if keys.dtype in _PLAIN and keys.is_contiguous() and k > 0 and n_entries > 0 and _native():
        return kernels.indexer_topk(q, w, keys, block_tables, ratio, visible.clamp(max=n_entries), k)
    return ref.indexer_topk(q, w, keys, block_tables, ratio, visible, n_entries, k)


@_kernel("argmax")
def _argmax(x):
    if x.dim() == 2 and x.dtype == torch.float32 and _native():
        return kernels.argmax_rows(x)
    return ref.argmax(x)


@_kernel("compressor_decode")
def _compressor_decode(x, wkv, wgate, ape, norm_weight, eps, cos, sin, positions, slots, block_tables, state, pages,
                       ratio, overlap):
    # weights fp32 or bf16 (one dtype), the tail state fp32, the pages fp32 or bf16 (the entry rounded once)
    if (_plain(wkv, wgate) and state.dtype == torch.float32 and state.is_contiguous() and pages.dtype in _PLAIN
            and pages.is_contiguous() and x.dtype in _PLAIN and 2 * cos.shape[-1] <= pages.shape[-1] and _native()):
        kernels.compress_decode(x, wkv, wgate, ape, ratio, overlap, positions, slots, state, norm_weight, eps, cos,
                                sin, pages, block_tables)
        return
    ref.compressor_decode(x, wkv, wgate, ape, norm_weight, eps, cos, sin, positions, slots, block_tables, state,
                          pages, ratio, overlap)
