"""Manifold-constrained hyper-connections (mHC, architecture.md sec 3; report sec 2.2).

The residual is ``hc_mult`` (M) parallel streams. Before each sub-layer, ``hc_pre`` mixes the streams into one input
with weights ``pre`` and computes ``post`` (how the output is spread back) and ``comb`` (an M x M doubly stochastic
matrix, Sinkhorn-projected) that mixes the old streams; ``hc_post`` combines them. All mixing runs in fp32 and is
rounded once to the activation dtype, as the official code does. ``hc_head`` is the final collapse before the norm.

Parameters live on the Block / Transformer under their checkpoint names (``hc_attn_fn`` ...); these are functions.
Deliberately not here: any learned state, or the training-time optimiser split (AdamW for base/scale, Muon for fn).

Shape legend: N tokens, M = hc_mult streams, D = dim.
"""

from __future__ import annotations

import numpy as np
import torch


def _mixes(x: torch.Tensor, fn: torch.Tensor, norm_eps: float) -> torch.Tensor:
    """x [N, M, D] -> RMSNorm(flatten(x)) @ fn^T  [N, K] in fp32 (no norm weight)."""
    xf = x.flatten(-2).float()  # [N, M*D]
    r = torch.rsqrt(xf.square().mean(-1, keepdim=True) + norm_eps)
    return (xf @ fn.float().t()) * r


def hc_pre(x: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, sinkhorn_iters: int,
           hc_eps: float, norm_eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [N, M, D] -> (y [N, D] in x.dtype, post [N, M] fp32, comb [N, M, M] fp32)."""
    m = x.shape[-2]
    mixes = _mixes(x, fn, norm_eps)  # [N, (2+M)*M]
    base, scale = base.float(), scale.float()
    pre = torch.sigmoid(mixes[..., :m] * scale[0] + base[:m]) + hc_eps  # [N, M]
    post = 2 * torch.sigmoid(mixes[..., m:2 * m] * scale[1] + base[m:2 * m])  # [N, M]
    comb = (mixes[..., 2 * m:] * scale[2] + base[2 * m:]).unflatten(-1, (m, m))  # [N, M, M], C[j,k] row-major
    if comb.device.type == "cpu" and not (torch.is_grad_enabled() and comb.requires_grad):
        comb = _sinkhorn_numpy(comb, sinkhorn_iters, hc_eps)
    else:
        comb = sinkhorn(comb, sinkhorn_iters, hc_eps)
    y = (pre.unsqueeze(-1) * x.float()).sum(-2).to(x.dtype)  # [N, D]
    return y, post, comb


def sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Official order: row softmax (+eps), column normalise, then (iters-1) x (row, column); [.., M, M] fp32."""
    comb = torch.softmax(logits, dim=-1) + eps
    comb = comb / (comb.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(-1, keepdim=True) + eps)
        comb = comb / (comb.sum(-2, keepdim=True) + eps)
    return comb


def _sinkhorn_numpy(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """The same iteration in numpy (no autograd): on CPU a 4x4 problem is all per-op overhead, and numpy's is ~2x
    lower than torch's. Agrees with :func:`sinkhorn` to fp32 rounding (tested)."""
    if logits.dim() == 3 and logits.shape[0] <= 4:
        return _sinkhorn_numpy_small(logits, iters, eps)
    a = torch.softmax(logits, dim=-1).numpy() + np.float32(eps)
    e = np.float32(eps)
    a /= a.sum(-2, keepdims=True) + e
    for _ in range(iters - 1):
        a /= a.sum(-1, keepdims=True) + e
        a /= a.sum(-2, keepdims=True) + e
    return torch.from_numpy(a)


def _sinkhorn_numpy_small(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """:func:`_sinkhorn_numpy` for a few tokens (decode), bitwise equal to it, with 2 numpy calls per normalisation
    instead of 3: the [N, M, M] block lives in an [N, M+1, M+1] buffer whose last row and column hold eps, so one
    reduce gives ``sum + eps`` (the same sequential fp32 sum with eps added last). Slower for large N (strided)."""
    n, m = logits.shape[0], logits.shape[-1]
    e = np.float32(eps)
    buf = np.full((n, m + 1, m + 1), e, np.float32)
    a = buf[:, :m, :m]
    np.add(torch.softmax(logits, dim=-1).numpy(), e, out=a)
    row_src, col_src = buf[:, :m, :], buf[:, :, :m]
    rows, cols = np.empty((n, m, 1), np.float32), np.empty((n, 1, m), np.float32)
    red, div = np.add.reduce, np.divide
    red(col_src, axis=-2, keepdims=True, out=cols)
    div(a, cols, out=a)
    for _ in range(iters - 1):
        red(row_src, axis=-1, keepdims=True, out=rows)
        div(a, rows, out=a)
        red(col_src, axis=-2, keepdims=True, out=cols)
        div(a, cols, out=a)
    return torch.from_numpy(np.ascontiguousarray(a))


def hc_post(f: torch.Tensor, res: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """X_new[k] = post[k] * f + sum_j comb[j, k] * res[j]; f [N, D], res [N, M, D] -> [N, M, D] in res.dtype."""
    mixed = torch.bmm(comb.transpose(-1, -2), res.float())  # B = C^T: sum over the FIRST stream axis (= einsum)
    return (post.unsqueeze(-1) * f.float().unsqueeze(-2) + mixed).to(res.dtype)


def hc_head(x: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, hc_eps: float,
            norm_eps: float) -> torch.Tensor:
    """Final collapse: x [N, M, D] -> [N, D] in x.dtype (sigmoid weights, no Sinkhorn, no post)."""
    mixes = _mixes(x, fn, norm_eps)  # [N, M]
    pre = torch.sigmoid(mixes * scale.float() + base.float()) + hc_eps
    return (pre.unsqueeze(-1) * x.float()).sum(-2).to(x.dtype)
