"""``Linear``: the model's projection layer, whose weight is held either in the compute dtype or as the published
checkpoint stores it (official ``inference/model.py`` ``Linear``): FP8 e4m3 ``weight`` [O, I] + ue8m0 ``scale``
[O/128, I/128], or FP4 e2m1 ``weight`` [O, I/2] (int8, two per byte) + ue8m0 ``scale`` [O, I/32]. The attribute
names are the checkpoint keys (``...wq_a.weight`` / ``...wq_a.scale``), so ``state_dict`` round-trips the stored
format. ``scale`` is None for a plain weight; the loader (model/loader.py) sets the packed form.

The computation is the op layer's (``dsv4.ops``): packed weights are dequantised on the fly (reference) or in
registers (native CPU kernels), never held dequantised. Packed weights are constants: they take no gradient, the
activations do.

Deliberately not here: bias (V4 has none), the formats themselves (quant.py), the kernels.
"""

from __future__ import annotations

import torch
from torch import nn

from dsv4 import ops


class Linear(nn.Linear):
    # Bumped whenever any Linear's weight or scale is set (not when it is updated in place): the MoE's stacked
    # expert blocks (moe.py) recheck that the experts still view them after it changes.
    revision = 0

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, bias=False, dtype=dtype)
        self.register_parameter("scale", None)

    def __setattr__(self, name: str, value) -> None:
        if name in ("weight", "scale"):
            Linear.revision += 1
        super().__setattr__(name, value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self.weight, self.scale)

    @property
    def packed(self) -> bool:
        return self.scale is not None

    def set_packed(self, weight: torch.Tensor, scale: torch.Tensor) -> None:
        """Hold ``weight`` (FP8 [O, I] or int8-packed FP4 [O, I/2]) with its ue8m0 ``scale`` as the parameters."""
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.scale = nn.Parameter(scale, requires_grad=False)

    def extra_repr(self) -> str:
        kind = "fp8" if self.weight.dtype == torch.float8_e4m3fn else "fp4" if self.packed else str(self.weight.dtype)
        return f"in_features={self.in_features}, out_features={self.out_features}, weight={kind}"
