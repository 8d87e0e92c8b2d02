"""Manifold-constrained hyper-connections (mHC, architecture.md sec 3; report sec 2.2).

The residual is ``hc_mult`` (M) parallel streams. Before each sub-layer, ``hc_pre`` mixes the streams into one input
with weights ``pre`` and computes ``post`` (how the output is spread back) and ``comb`` (an M x M doubly stochastic
matrix, Sinkhorn-projected) that mixes the old streams; ``hc_post`` combines them. All mixing runs in fp32 and is
rounded once to the activation dtype, as the official code does. ``hc_pre`` (fused with the sub-layer's RMSNorm)
and ``hc_post`` are ops (dsv4/ops: ``ops.hc_pre``, ``ops.hc_post``; the math in ops/reference.py); ``hc_head``, the
final collapse before the norm, runs once per forward and is plain PyTorch here.

Parameters live on the Block / Transformer under their checkpoint names (``hc_attn_fn`` ...); these are functions.
Deliberately not here: any learned state, or the training-time optimiser split (AdamW for base/scale, Muon for fn).

Shape legend: N tokens, M = hc_mult streams, D = dim.
"""

from __future__ import annotations

import torch

from dsv4.ops.reference import hc_mixes


def hc_head(x: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, hc_eps: float,
            norm_eps: float) -> torch.Tensor:
    """Final collapse: x [N, M, D] -> [N, D] in x.dtype (sigmoid weights, no Sinkhorn, no post)."""
    mixes = hc_mixes(x, fn, norm_eps)  # [N, M]
    pre = torch.sigmoid(mixes * scale.float() + base.float()) + hc_eps
    return (pre.unsqueeze(-1) * x.float()).sum(-2).to(x.dtype)
