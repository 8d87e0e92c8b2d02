"""RMSNorm as the official code computes it (architecture.md sec 1): statistics and weight in fp32, one rounding
back to the input dtype. The weight is held in fp32 whatever the model dtype (the official ``RMSNorm`` keeps it fp32).

Deliberately not here: the unweighted per-head query norm and the mHC input norm, which are one-line functions
(:func:`rms_unweighted`) used where they occur.
"""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * y).to(x.dtype)


def rms_unweighted(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) over the last dim, statistics in fp32, result in x's dtype (per-head q norm)."""
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)
