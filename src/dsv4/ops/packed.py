"""Plain-PyTorch reference ops on the published packed weight formats (model/quant.py): FP8 e4m3 with ue8m0 128x128
block scales, and FP4 e2m1 (two per byte) with ue8m0 per-32 scales along the input dim.

* :func:`linear_reference` ``(x, weight, scale)``: ``x @ W^T`` for a weight held as stored: FP8 + scale, packed FP4 +
  scale, or a plain float weight of another dtype than x (a bf16 head with fp32 activations);
* :func:`weight_rows`: rows of such a weight dequantised (the grouped ``wo_a`` of ``attention_out``);
* :func:`stacked`: per-expert weights recognised as one stacked block (what the native experts kernel reads).

``ops/reference.py`` calls these for the packed branches of ``dsv4::linear``, ``dsv4::routed_experts`` (expert by
expert, each dequantised once) and ``dsv4::attention_in/out``. They dequantise chunk by chunk (a few MB of weight
rows at a time), never the whole weight, and compute in the activation's dtype exactly as the same model with
dequantised weights does (dequantisation is exact in bf16 and fp32, model/quant.py). They are differentiable with
respect to the activations (autograd through the chunked ``F.linear``; packed weights are constants and cannot be
trained). The native CPU backend of the same branches is kernels/quant.py (registered in ops/cpu.py).

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


def grad_input(g: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """d(x W^T)/dx for a packed W: g [..., O] -> [..., K] = g @ W, W dequantised a chunk of rows at a time."""
    out_features, in_features = quant.dequantized_shape(weight)
    step = _row_step(weight, in_features)
    gx = None
    for r0 in range(0, out_features, step):
        r1 = min(out_features, r0 + step)
        part = g[..., r0:r1] @ weight_rows(weight, scale, r0, r1, g.dtype)
        gx = part if gx is None else gx + part
    return gx


def stacked(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """``tensors`` [E] as one zero-copy [E, ...] view when they are consecutive equal-shaped slices of one block of
    memory (the loader's stacked FP4 experts, ``MoE.hold_fp4``), else None. Checked on every call (one pointer per
    tensor), so replaced weights are never read through a stale stack."""
    first = tensors[0]
    if not first.is_contiguous():
        return None
    step = first.numel() * first.element_size()
    p0 = first.data_ptr()
    for e, t in enumerate(tensors):
        if t.data_ptr() != p0 + e * step or t.shape != first.shape or t.dtype != first.dtype:
            return None
    return first.as_strided((len(tensors), *first.shape), (first.numel(), *first.stride()))
