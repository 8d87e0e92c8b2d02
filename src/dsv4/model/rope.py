"""Partial, interleaved rotary position embedding (architecture.md sec 5).

Only the last ``rope_head_dim`` dims of a head are rotated (layout ``[nope | rope]``), and the rotated pairs are
*interleaved* ``(x[2i], x[2i+1])`` (the official ``view_as_complex`` layout, not GPT-NeoX's rotate-half split).
Sliding-window layers use ``rope_theta`` without scaling; compressed layers (CSA/HCA) use ``compress_rope_theta``
with YaRN, computed exactly as the official ``precompute_freqs_cis``. The rotation runs in fp32 and is written back
in the input dtype. The inverse rotation (negative angle) is applied to the attention output (sec 4).

Deliberately not here: YaRN's attention temperature (mscale) — V4 does not apply it. The frequencies are a plain
tensor cached per device rather than a module buffer, so a model built on ``meta`` needs no buffer re-initialisation.

Shape legend: N tokens, H heads, D head dim, R = rope dim, R/2 rotated pairs.
"""

from __future__ import annotations

import math

import torch

from dsv4.config import ModelConfig


def inv_freq(rope_dim: int, base: float, yarn: tuple[float, int, float, float] | None) -> torch.Tensor:
    """Per-pair inverse frequencies [R/2] in fp32, with the official YaRN ramp (sec 5)."""
    # NOTE: explicit CPU device: the loader builds the model under `torch.device("meta")`, which would otherwise turn
    # these plain (non-buffer) tables into meta tensors that nothing ever fills.
    freqs = 1.0 / (base ** (torch.arange(0, rope_dim, 2, dtype=torch.float32, device="cpu") / rope_dim))
    if yarn is None:
        return freqs
    factor, original_seq_len, beta_fast, beta_slow = yarn

    def correction_dim(num_rotations: float) -> float:
        return rope_dim * math.log(original_seq_len / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), rope_dim - 1)
    if low == high:
        high += 0.001  # official: avoid a zero-width ramp
    ramp = ((torch.arange(rope_dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    smooth = 1 - ramp
    return freqs / factor * (1 - smooth) + freqs * smooth


class Rotary:
    """cos/sin for one RoPE flavour ("main" for sliding-window layers, "compress" for CSA/HCA layers)."""

    def __init__(self, rope_dim: int, base: float, yarn: tuple[float, int, float, float] | None) -> None:
        self.rope_dim = rope_dim
        self._inv_freq = inv_freq(rope_dim, base, yarn)
        self._by_device: dict[torch.device, torch.Tensor] = {}

    @classmethod
    def for_ratio(cls, config: ModelConfig, ratio: int) -> Rotary:
        if ratio == 0:
            return cls(config.rope_head_dim, config.rope_theta, None)
        return cls(config.rope_head_dim, config.compress_rope_theta, config.yarn)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [...] int -> cos, sin [..., R/2] fp32."""
        dev = positions.device
        f = self._by_device.get(dev)
        if f is None:
            f = self._by_device[dev] = self._inv_freq.to(dev)
        angles = positions.to(torch.float32).unsqueeze(-1) * f  # [..., R/2]
        return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Rotate the last R dims of x [..., D] (out of place). cos/sin [..., R/2] broadcast over x's head axes:
    pass them already unsqueezed where x has a head axis."""
    half = cos.shape[-1]
    rd = 2 * half
    nope, rope = x[..., :-rd], x[..., -rd:].float()
    r = rope.unflatten(-1, (half, 2))  # [..., R/2, 2]
    x0, x1 = r[..., 0], r[..., 1]
    if inverse:
        sin = -sin
    y = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)  # [..., R]
    return torch.cat([nope, y.to(x.dtype)], dim=-1)
