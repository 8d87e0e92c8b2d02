"""Plain-PyTorch reference ops on the published packed weight formats (model/quant.py): FP8 e4m3 with ue8m0 128x128
block scales, and FP4 e2m1 (two per byte) with ue8m0 per-32 scales along the input dim.

* :func:`linear_reference` ``(x, weight, scale)``: ``x @ W^T`` for a weight held as stored: FP8 + scale, packed FP4 +
  scale, or a plain float weight (``scale`` None, then it is ``F.linear``);
* :func:`experts_reference` ``(x, ids, weights, w1, s1, w3, s3, w2, s2, limit)``: the routed experts of ``MoE`` on
  stacked FP4 expert weights (``MoE.fp4_stacks``), after the gate, as ``MoE.forward`` computes them.

Both dequantise chunk by chunk (a few MB of weight rows, or one expert, at a time), never the whole weight set, and
compute in the activation's dtype exactly as the same model with dequantised weights does (dequantisation is exact
in bf16 and fp32, model/quant.py). They are differentiable with respect to the activations (autograd through the
chunked ``F.linear``; the weights are constants, packed weights cannot be trained). The native CPU backend is
kernels/quant.py; this file is its reference and the path every other device runs.

Deliberately not here: FP8 activation quantisation (the official GEMMs quantise activations to FP8; dsv4 keeps them
in the compute dtype, which is what ``qat_sim`` documents), and quantising weights (model/quant.py).

Shape legend: N tokens (rows of x), K in-features, O out-features, E experts, k experts per token, D dim, F expert
inner dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsv4.model import quant

# Weight elements dequantised per step: bounds the temporary of one linear to ~16 MB in fp32 whatever its size.
_CHUNK_ELEMS = 1 << 22


def is_packed(weight: torch.Tensor) -> bool:
    """True for a weight held in a packed release format (FP8 e4m3, or FP4 packed two per byte)."""
    return quant.is_fp8(weight) or quant.is_packed_fp4(weight)


def weight_rows(weight: torch.Tensor, scale: torch.Tensor | None, r0: int, r1: int, dtype: torch.dtype
                ) -> torch.Tensor:
    """Rows ``[r0, r1)`` of a weight as ``dtype`` [r1-r0, K]: dequantised when packed (r0 a multiple of 128 for FP8)."""
    if scale is None:
        return weight[r0:r1].to(dtype)
    if quant.is_fp8(weight):
        b = quant.FP8_BLOCK
        if r0 % b:
            raise ValueError(f"FP8 weight rows must start on a {b}-row block boundary, got row {r0}")
        return quant.dequantize_fp8(weight[r0:r1], scale[r0 // b: -(-r1 // b)], dtype)
    return quant.dequantize_fp4(weight[r0:r1], scale[r0:r1], dtype)


def _row_step(weight: torch.Tensor, in_features: int) -> int:
    step = max(1, _CHUNK_ELEMS // max(1, in_features))
    if quant.is_fp8(weight):  # whole 128-row scale blocks per chunk
        step = max(quant.FP8_BLOCK, step // quant.FP8_BLOCK * quant.FP8_BLOCK)
    return step


def linear_reference(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] @ W[O, K]^T -> [..., O] in x's dtype; W as stored (see the module docstring). A plain weight of
    another dtype (a bf16 head with fp32 activations) is converted chunk by chunk like a packed one."""
    if scale is None and weight.dtype == x.dtype:
        return F.linear(x, weight)
    out_features, in_features = quant.dequantized_shape(weight)
    if x.shape[-1] != in_features:
        raise ValueError(f"linear: x has {x.shape[-1]} features, the weight [{out_features}, {in_features}] "
                         f"expects {in_features}")
    step = _row_step(weight, in_features)
    if step >= out_features:
        return F.linear(x, weight_rows(weight, scale, 0, out_features, x.dtype))
    if torch.is_grad_enabled() and x.requires_grad:  # autograd: one output piece per chunk, joined once
        return torch.cat([F.linear(x, weight_rows(weight, scale, r0, min(out_features, r0 + step), x.dtype))
                          for r0 in range(0, out_features, step)], dim=-1)
    out = x.new_empty(*x.shape[:-1], out_features)
    for r0 in range(0, out_features, step):
        r1 = min(out_features, r0 + step)
        out[..., r0:r1] = F.linear(x, weight_rows(weight, scale, r0, r1, x.dtype))
    return out


def swiglu(g: torch.Tensor, u: torch.Tensor, limit: float) -> torch.Tensor:
    """silu(min(g, L)) * clamp(u, -L, L) in fp32 (L <= 0: no clamp), as model/moe.py's Expert."""
    g, u = g.float(), u.float()
    if limit > 0:
        g = g.clamp(max=limit)
        u = u.clamp(-limit, limit)
    return F.silu(g) * u


def experts_reference(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                      w1: torch.Tensor, s1: torch.Tensor, w3: torch.Tensor, s3: torch.Tensor,
                      w2: torch.Tensor, s2: torch.Tensor, limit: float) -> torch.Tensor:
    """Routed experts on stacked packed weights: x [N, D], ids [N, k], routing weights [N, k] -> fp32 [N, D].

    w1, w3 [E, F, D/2] int8 with scales [E, F, D/32]; w2 [E, D, F/2] with [E, D, F/32] (FP4), or the FP8 layout
    [E, F, D] / [E, F/128, D/128] with float8 weights. Pairs run expert by expert in ascending id (each expert
    dequantised once, then freed), each token's outputs summed in that order from fp32 zeros: ``MoE.forward``'s
    order, so results equal the dequantised model's.
    """
    n, k = ids.shape
    flat = ids.flatten()  # [N*k]
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=w1.shape[0]).tolist()  # one host sync (MoE.forward has it too)
    tok = order // k
    w = weights.flatten()[order].float()
    y = torch.zeros(n, x.shape[1], dtype=torch.float32, device=x.device)
    a = 0
    for e, cnt in enumerate(counts):
        if cnt == 0:
            continue
        t = tok[a:a + cnt]
        xe = x[t]  # [cnt, D]
        h = w[a:a + cnt, None] * swiglu(linear_reference(xe, w1[e], s1[e]), linear_reference(xe, w3[e], s3[e]),
                                        limit)  # [cnt, F] routing weight before w2 (official)
        y.index_add_(0, t, linear_reference(h.to(x.dtype), w2[e], s2[e]).float())  # in place: fine for autograd
        a += cnt
    return y


# ---------------------------------------------------------------------------------------------------------------
# Dispatch (until these become branches of the op layer's dsv4::linear / dsv4::experts): the native CPU kernels
# (kernels/quant.py) for CPU tensors without autograd when they build, the reference otherwise.


def _native(x: torch.Tensor):
    if x.device.type != "cpu" or (torch.is_grad_enabled() and x.requires_grad):
        return None
    from dsv4.kernels import quant as native

    return native if native.available() else None


def linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] @ W^T in x's dtype, W plain or packed (see :func:`linear_reference`)."""
    if scale is None and weight.dtype == x.dtype:
        return F.linear(x, weight)
    native = _native(x) if scale is not None else None
    if native is not None:
        return native.linear(x, weight, scale).to(x.dtype)
    return linear_reference(x, weight, scale)


def experts(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, w1: torch.Tensor, s1: torch.Tensor,
            w3: torch.Tensor, s3: torch.Tensor, w2: torch.Tensor, s2: torch.Tensor, limit: float) -> torch.Tensor:
    """Routed experts on stacked packed weights -> fp32 [N, D] (see :func:`experts_reference`)."""
    native = _native(x) if quant.is_packed_fp4(w1) else None
    if native is not None:
        return native.experts(x, ids, weights, w1, s1, w3, s3, w2, s2, limit)
    return experts_reference(x, ids, weights, w1, s1, w3, s3, w2, s2, limit)
