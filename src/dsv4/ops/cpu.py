"""The CPU backend of the op layer: each op's ``register_kernel(..., "cpu")``.

A kernel calls the native CPU kernels (dsv4/kernels, C through ctypes) when ``ops.backend("cpu") == "native"``,
the library loads here, and the inputs are in a layout the C code reads (bf16/fp32 contiguous weights, an fp32
cache for attention, one query per sequence for the indexer); otherwise it runs the op's reference. So the CPU
backend is always correct, and fast where it can be. The first time the library is unavailable the reason is logged
once (``dsv4.ops`` logger); :func:`native_status` returns it.

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
from dsv4.ops import backend
from dsv4.ops import reference as ref

log = logging.getLogger("dsv4.ops")
_logged = threading.Event()
_PLAIN = (torch.bfloat16, torch.float32)


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


@torch.library.register_kernel("dsv4::linear", "cpu")
def _linear(x, weight, scale):
    if scale is None and _plain(weight) and x.dtype in _PLAIN and _native():
        return kernels.linear(x, weight).to(x.dtype)
    return ref.linear(x, weight, scale)


@torch.library.register_kernel("dsv4::routed_experts", "cpu")
def _routed_experts(x, ids, weights, w1, w3, w2, scales, shared, shared_scales, limit):
    if not scales and not shared_scales and x.dim() == 2 and x.dtype in _PLAIN and w1[0].dtype in _PLAIN and _native():
        try:  # the kernel checks every weight's layout once per weight set (3E tensors: not here, per call)
            return kernels.moe(x, ids, weights, w1, w3, w2, shared if shared else None, limit)
        except TypeError:
            pass  # mixed dtypes or non-contiguous weights: the reference
    return ref.routed_experts(x, ids, weights, w1, w3, w2, scales, shared, shared_scales, limit)


@torch.library.register_kernel("dsv4::hc_pre", "cpu")
def _hc_pre(x, fn, base, scale, norm_weight, sinkhorn_iters, hc_eps, norm_eps, out_eps):
    if x.shape[1] <= 8 and x.dtype in _PLAIN and _native():
        y, post, comb = kernels.hc_pre(x, fn, base, scale, sinkhorn_iters, hc_eps, norm_eps, norm_weight, out_eps)
        return y.to(x.dtype), post, comb
    return ref.hc_pre(x, fn, base, scale, norm_weight, sinkhorn_iters, hc_eps, norm_eps, out_eps)


@torch.library.register_kernel("dsv4::hc_post", "cpu")
def _hc_post(f, res, post, comb):
    if res.dtype in _PLAIN and _native():
        return kernels.hc_post(f, res, post, comb).to(res.dtype)
    return ref.hc_post(f, res, post, comb)


@torch.library.register_kernel("dsv4::attention_in", "cpu")
def _attention_in(x, wq_a, wq_a_scale, q_norm, wq_b, wq_b_scale, wkv, wkv_scale, kv_norm, cos, sin, n_heads, eps):
    if (wq_a_scale is None and wq_b_scale is None and wkv_scale is None and x.dtype in _PLAIN
            and _plain(wq_a, wq_b, wkv) and _native()):
        qr, q, kv = kernels.attention_in(x, wq_a, q_norm, wq_b, n_heads, wkv, kv_norm, cos, sin, eps)
        return qr.to(x.dtype), q.to(x.dtype), kv.to(x.dtype)
    return ref.attention_in(x, wq_a, wq_a_scale, q_norm, wq_b, wq_b_scale, wkv, wkv_scale, kv_norm, cos, sin,
                            n_heads, eps)


@torch.library.register_kernel("dsv4::attention_out", "cpu")
def _attention_out(o, cos, sin, wo_a, wo_a_scale, groups, wo_b, wo_b_scale):
    if wo_a_scale is None and wo_b_scale is None and o.dtype in _PLAIN and _plain(wo_a, wo_b) and _native():
        return kernels.attention_out(o, cos, sin, wo_a, groups, wo_b).to(o.dtype)
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


@torch.library.register_kernel("dsv4::sparse_attention", "cpu")
def _sparse_attention(q, kv, start, lens, ring, slots, entries, block_tables, ratio, n_entries, topk, sink, scale):
    comp = entries is not None and n_entries > 0
    if (ring.dtype == torch.float32 and ring.is_contiguous() and q.dtype in _PLAIN
            and (not comp or (entries.dtype == torch.float32 and entries.is_contiguous())) and _native()):
        b, s = q.shape[:2]
        rows = _entry_rows(b, s, start, lens, entries, block_tables, ratio, n_entries, topk) if comp else None
        out = kernels.chunk_attention(q, kv, start, lens, ring, slots, entries if comp else None, rows, sink, scale)
        return out.to(q.dtype)
    return ref.sparse_attention(q, kv, start, lens, ring, slots, entries, block_tables, ratio, n_entries, topk,
                                sink, scale)


@torch.library.register_kernel("dsv4::indexer_topk", "cpu")
def _indexer_topk(q, w, keys, block_tables, ratio, visible, n_entries, k):
    # the C kernel scores one query per sequence (decode); prefill chunks run the chunked reference
    if (q.shape[1] == 1 and keys.dtype == torch.float32 and keys.is_contiguous() and k > 0 and n_entries > 0
            and _native()):
        return kernels.indexer_topk(q[:, 0], w[:, 0], keys, block_tables, ratio, visible[:, 0], k)[:, None]
    return ref.indexer_topk(q, w, keys, block_tables, ratio, visible, n_entries, k)


@torch.library.register_kernel("dsv4::argmax", "cpu")
def _argmax(x):
    if x.dim() == 2 and x.dtype == torch.float32 and _native():
        return kernels.argmax_rows(x)
    return ref.argmax(x)


@torch.library.register_kernel("dsv4::compressor_decode", "cpu")
def _compressor_decode(x, wkv, wgate, ape, norm_weight, eps, cos, sin, positions, slots, block_tables, state, pages,
                       ratio, overlap):
    if (all(t.dtype == torch.float32 and t.is_contiguous() for t in (wkv, wgate, ape, state, pages))
            and x.dtype in _PLAIN and 2 * cos.shape[-1] <= pages.shape[-1] and _native()):
        kernels.compress_decode(x, wkv, wgate, ape, ratio, overlap, positions, slots, state, norm_weight, eps, cos,
                                sin, pages, block_tables)
        return
    ref.compressor_decode(x, wkv, wgate, ape, norm_weight, eps, cos, sin, positions, slots, block_tables, state,
                          pages, ratio, overlap)
