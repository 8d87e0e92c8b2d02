"""Numerics options and the official quantisation-aware-training simulations (architecture.md sec 1, 7, 8).

DeepSeek-V4 was trained with FP8 storage of the 448 non-RoPE KV dims and FP4 (MXFP4) indexer q/k. The official
inference code reproduces that by rounding in place (quantise -> dequantise, tensor stays in its dtype):

* ``fp8_sim``: 1x64 blocks, power-of-two scale ``2^ceil(log2(amax/448))``, e4m3 rounding; applied to the non-RoPE
  dims of every raw KV vector and of every compressed KV entry.
* ``fp4_sim``: 1x32 blocks, scale ``2^ceil(log2(amax/6))``, e2m1 round-to-nearest-even; applied to the indexer
  query and the indexer's compressed keys, after a 128-point Hadamard rotation (Sylvester order, scaled by n^-1/2).

Modes (``Numerics``):

* ``qat_sim=False`` (default): no simulated rounding and no Hadamard rotation (the rotation is orthogonal and is
  applied to q and k alike, so without FP4 rounding it changes nothing but rounding noise). This is what
  transformers computes, what the parity tests check, and what training uses (the simulations have no useful
  gradient here).
* ``qat_sim=True``: the official rounding, for serving real checkpoints as close to the official implementation as
  the hardware allows.

Deliberately not here: weight formats (quant.py) and FP8/FP4 GEMMs (weights are dequantised at load time).

Shape legend: D = last (quantised) dim, K = number of 1 x block blocks along it (the last one zero-padded).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Numerics:
    qat_sim: bool = False


_FP8_MAX = 448.0
_FP4_MAX = 6.0
_FP4_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_FP4_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_FP4_TIES_UP = (0.75, 1.75, 3.5)  # ties whose upper neighbour has the even e2m1 code


def _blocks(x: torch.Tensor, block: int) -> tuple[torch.Tensor, int]:
    """[..., D] fp32 -> [..., K, block] (zero-padded; zeros do not change a block's amax)."""
    d = x.shape[-1]
    pad = (-d) % block
    xf = x.float()
    if pad:
        xf = torch.nn.functional.pad(xf, (0, pad))
    return xf.unflatten(-1, (-1, block)), d


def _pow2_scale(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    return torch.exp2(torch.ceil(torch.log2(amax / qmax)))


def fp8_sim(x: torch.Tensor, block: int = 64) -> torch.Tensor:
    """Round x [..., D] through e4m3 with per-1xblock power-of-two scales (``act_quant(..., inplace=True)``)."""
    xb, d = _blocks(x, block)
    s = _pow2_scale(xb.abs().amax(-1, keepdim=True).clamp_min(1e-4), _FP8_MAX)
    q = (xb / s).clamp(-_FP8_MAX, _FP8_MAX).to(torch.float8_e4m3fn).float() * s
    return q.flatten(-2)[..., :d].to(x.dtype)


def _round_e2m1(a: torch.Tensor) -> torch.Tensor:
    """|x| <= 6 -> nearest e2m1 magnitude, ties to the even code."""
    mids = torch.tensor(_FP4_MIDPOINTS, device=a.device)
    idx = torch.bucketize(a, mids)  # a tie lands in the lower bucket ...
    ties_up = torch.zeros_like(a, dtype=torch.bool)
    for t in _FP4_TIES_UP:
        ties_up |= a == t
    idx = idx + ties_up.long()  # ... unless the upper neighbour is the even code
    return torch.tensor(_FP4_GRID, device=a.device)[idx]


def fp4_sim(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """Round x [..., D] through e2m1 with per-1xblock power-of-two scales (``fp4_act_quant(..., inplace=True)``)."""
    xb, d = _blocks(x, block)
    s = _pow2_scale(xb.abs().amax(-1, keepdim=True).clamp_min(_FP4_MAX * 2.0**-126), _FP4_MAX)
    v = (xb / s).clamp(-_FP4_MAX, _FP4_MAX)
    q = torch.sign(v) * _round_e2m1(v.abs()) * s
    return q.flatten(-2)[..., :d].to(x.dtype)


@functools.lru_cache(maxsize=8)
def _hadamard_matrix(n: int, device: torch.device) -> torch.Tensor:
    if n & (n - 1):
        raise ValueError(f"the Hadamard rotation needs a power-of-two size; index_head_dim={n} is not")
    h = torch.ones(1, 1)
    while h.shape[0] < n:  # Sylvester construction: H_2n = [[H, H], [H, -H]]
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h * n**-0.5).to(device)


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal Walsh-Hadamard transform over the last dim (fast_hadamard_transform with scale n^-1/2)."""
    h = _hadamard_matrix(x.shape[-1], x.device)
    return (x.float() @ h).to(x.dtype)  # H is symmetric, so x @ H == (H x^T)^T
