"""Block-scaled FP8 / FP4 weight formats of the DeepSeek-V4 release: exact dequantisation and the inverse.

The published checkpoint (architecture.md sec. 1 and 12) stores

* most linear weights as FP8 e4m3 ``[out, in]`` with one ue8m0 scale per 128x128 block in ``<name>.scale``,
  shape ``[ceil(out/128), ceil(in/128)]`` (the last block row/column may be partial);
* routed-expert weights as FP4 e2m1, two values per byte (int8 ``[out, in/2]``, low nibble = even column, sign in
  bit 3), with one ue8m0 scale per 1x32 block along the input dim, shape ``[out, ceil(in/32)]``.

ue8m0 (``torch.float8_e8m0fnu``) is a bare biased exponent: byte ``b`` means ``2^(b-127)`` (255 = NaN). Every scale
is a power of two, so ``value * scale`` is exact in fp32 and, because e4m3 / e2m1 mantissas are narrower than bf16's,
the product is exact in bf16 too: dequantisation to bf16 or fp32 loses nothing.

The quantisers mirror DeepSeek's block quantisation (``kernel.py`` ``act_quant`` / ``fp4_act_quant`` with
``scale_fmt="ue8m0"``): ``s = 2^ceil(log2(amax / qmax))``, ``q = round_nearest_even(clamp(w / s, +-qmax))``. They are
used to write release-layout checkpoints (tests, the trainer's export). Values that are already representable
(the output of a dequantisation) survive ``quantize -> dequantize`` unchanged.

Deliberately not here: the ops that compute on packed weights (ops/packed.py, kernels/quant.py) and the activation
QAT simulations (model/qat.py).

Shape legend: O = out features, I = in features, Ob/Ib = number of scale blocks along O/I.
"""

from __future__ import annotations

import torch

FP8_BLOCK = 128  # 128x128 weight blocks share one scale (quantization_config.weight_block_size)
FP4_BLOCK = 32  # 1x32 blocks along the input dim for routed experts
FP8_MAX = 448.0  # largest finite e4m3fn value
FP4_MAX = 6.0  # largest e2m1 value
E8M0_BIAS = 127
# Rows dequantised per step: bounds the fp32 temporaries of one big tensor (a few MB) while streaming a checkpoint.
_ROW_CHUNK = 1024

# e2m1 code -> value; bit 3 is the sign, bits 2..1 the exponent, bit 0 the mantissa (0.5 = subnormal).
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)

FP4_PACKED_DTYPES = (torch.int8, torch.uint8) + (
    (torch.float4_e2m1fn_x2,) if hasattr(torch, "float4_e2m1fn_x2") else ()
)


class QuantFormatError(ValueError):
    """A quantised tensor or its scale has a shape/dtype/value the release format does not allow."""


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def e8m0_to_float(scale: torch.Tensor) -> torch.Tensor:
    """ue8m0 scale (``float8_e8m0fnu`` or its raw uint8 bytes) -> fp32 ``2^(b-127)``."""
    if scale.dtype == torch.float8_e8m0fnu:
        scale = scale.view(torch.uint8)
    if scale.dtype != torch.uint8:
        raise QuantFormatError(f"a ue8m0 scale must be float8_e8m0fnu or uint8, got {scale.dtype}")
    if bool((scale == 255).any()):
        raise QuantFormatError("a ue8m0 scale holds the NaN byte 0xFF; the checkpoint file is corrupt, re-download it")
    # ldexp(1, e) is exact for every e in [-127, 127] (2^-127 is an fp32 subnormal).
    exponent = scale.to(torch.int32) - E8M0_BIAS
    return torch.ldexp(torch.ones_like(exponent, dtype=torch.float32), exponent)


def exponent_to_e8m0(exponent: torch.Tensor) -> torch.Tensor:
    """Integer power-of-two exponents in [-127, 127] -> ``float8_e8m0fnu`` scales."""
    if bool(((exponent < -E8M0_BIAS) | (exponent > E8M0_BIAS)).any()):
        raise QuantFormatError("a ue8m0 exponent is outside [-127, 127]")
    return (exponent.to(torch.int32) + E8M0_BIAS).to(torch.uint8).view(torch.float8_e8m0fnu)


def _pow2_exponent(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    """``ceil(log2(amax / qmax))`` computed exactly from frexp (no log2 rounding), clamped to the e8m0 range."""
    ratio = (amax.float() / qmax).clamp_min(2.0**-126)  # all-zero blocks get the smallest normal scale
    mantissa, exp = torch.frexp(ratio)  # ratio = mantissa * 2^exp, mantissa in [0.5, 1)
    # ratio is an exact power of two iff mantissa == 0.5, and then ceil(log2(ratio)) = exp - 1.
    ceil_log2 = torch.where(mantissa == 0.5, exp - 1, exp)
    return ceil_log2.clamp(-E8M0_BIAS, E8M0_BIAS)


# ----------------------------------------------------------------------------------------------------------------
# FP8 e4m3, 128x128 blocks


def fp8_scale_shape(shape: tuple[int, ...] | torch.Size) -> tuple[int, int]:
    out_features, in_features = shape
    return _ceil_div(out_features, FP8_BLOCK), _ceil_div(in_features, FP8_BLOCK)


def dequantize_fp8(
    weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16, out: torch.Tensor | None = None
) -> torch.Tensor:
    """FP8 e4m3 ``[O, I]`` + ue8m0 ``[ceil(O/128), ceil(I/128)]`` -> ``[O, I]`` in ``dtype`` (exact)."""
    if weight.dtype != torch.float8_e4m3fn or weight.dim() != 2:
        raise QuantFormatError(
            f"an FP8 weight must be a 2-D float8_e4m3fn tensor, got {weight.dtype} {tuple(weight.shape)}"
        )
    expected = fp8_scale_shape(weight.shape)
    if tuple(scale.shape) != expected:
        raise QuantFormatError(
            f"the FP8 weight {tuple(weight.shape)} needs a scale of shape {expected} (one per 128x128 block), "
            f"got {tuple(scale.shape)}"
        )
    scale_f = e8m0_to_float(scale)  # [Ob, Ib]
    out_features, in_features = weight.shape
    if out is None:
        out = torch.empty(out_features, in_features, dtype=dtype, device=weight.device)
    # Column scales for all rows of one row block: [Ob, I]
    col_scale = scale_f.repeat_interleave(FP8_BLOCK, dim=1)[:, :in_features]
    # Row chunks are whole 128-row blocks so each chunk uses one slice of col_scale rows.
    step = max(FP8_BLOCK, _ROW_CHUNK // FP8_BLOCK * FP8_BLOCK)
    for r0 in range(0, out_features, step):
        r1 = min(r0 + step, out_features)
        rows_scale = col_scale[r0 // FP8_BLOCK : _ceil_div(r1, FP8_BLOCK)].repeat_interleave(FP8_BLOCK, dim=0)
        rows_scale = rows_scale[: r1 - r0]  # [r1-r0, I]
        out[r0:r1] = (weight[r0:r1].float() * rows_scale).to(out.dtype)
    return out


def quantize_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float ``[O, I]`` -> (float8_e4m3fn ``[O, I]``, float8_e8m0fnu ``[ceil(O/128), ceil(I/128)]``)."""
    if weight.dim() != 2 or not weight.is_floating_point():
        raise QuantFormatError(f"FP8 quantisation takes a 2-D float weight, got {weight.dtype} {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    ob, ib = fp8_scale_shape(weight.shape)
    padded = torch.zeros(ob * FP8_BLOCK, ib * FP8_BLOCK, dtype=torch.float32, device=weight.device)
    padded[:out_features, :in_features] = weight.float()
    blocks = padded.view(ob, FP8_BLOCK, ib, FP8_BLOCK)  # [Ob, 128, Ib, 128]
    exponent = _pow2_exponent(blocks.abs().amax(dim=(1, 3)), FP8_MAX)  # [Ob, Ib]
    scale = torch.ldexp(torch.ones_like(exponent, dtype=torch.float32), exponent)  # [Ob, Ib] exact powers of two
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX)  # [Ob, 128, Ib, 128]
    q = q.view(ob * FP8_BLOCK, ib * FP8_BLOCK)[:out_features, :in_features].to(torch.float8_e4m3fn)  # RNE cast
    return q.contiguous(), exponent_to_e8m0(exponent)


# ----------------------------------------------------------------------------------------------------------------
# FP4 e2m1, two per byte, 1x32 blocks


def fp4_scale_shape(packed_shape: tuple[int, ...] | torch.Size) -> tuple[int, int]:
    out_features, half_in = packed_shape
    return out_features, _ceil_div(2 * half_in, FP4_BLOCK)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """Packed e2m1 ``[O, I/2]`` (int8 / uint8 / float4_e2m1fn_x2) -> fp32 values ``[O, I]`` (no scale)."""
    if packed.dtype not in FP4_PACKED_DTYPES or packed.dim() != 2:
        raise QuantFormatError(
            f"a packed FP4 weight must be a 2-D int8/uint8/float4_e2m1fn_x2 tensor, got {packed.dtype} "
            f"{tuple(packed.shape)}"
        )
    byte = packed.view(torch.uint8)
    # Column 2j is the low nibble of byte j, column 2j+1 the high nibble: [O, I/2, 2] -> [O, I]
    codes = torch.stack((byte & 0x0F, byte >> 4), dim=-1).view(packed.shape[0], 2 * packed.shape[1])
    table = torch.tensor(FP4_VALUES, dtype=torch.float32, device=packed.device)
    return table[codes.long()]


def dequantize_fp4(
    packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Packed e2m1 ``[O, I/2]`` + ue8m0 ``[O, ceil(I/32)]`` -> ``[O, I]`` in ``dtype`` (exact)."""
    if packed.dim() != 2:
        raise QuantFormatError(f"a packed FP4 weight must be 2-D, got shape {tuple(packed.shape)}")
    expected = fp4_scale_shape(packed.shape)
    if tuple(scale.shape) != expected:
        raise QuantFormatError(
            f"the packed FP4 weight {tuple(packed.shape)} ({2 * packed.shape[1]} input columns) needs a scale of "
            f"shape {expected} (one per 1x32 block), got {tuple(scale.shape)}"
        )
    scale_f = e8m0_to_float(scale)  # [O, Ib]
    out_features, in_features = packed.shape[0], 2 * packed.shape[1]
    if out is None:
        out = torch.empty(out_features, in_features, dtype=dtype, device=packed.device)
    for r0 in range(0, out_features, _ROW_CHUNK):
        r1 = min(r0 + _ROW_CHUNK, out_features)
        rows_scale = scale_f[r0:r1].repeat_interleave(FP4_BLOCK, dim=1)[:, :in_features]  # [rows, I]
        out[r0:r1] = (unpack_fp4(packed[r0:r1]) * rows_scale).to(out.dtype)
    return out


def _round_to_fp4_codes(x: torch.Tensor) -> torch.Tensor:
    """fp32 values already clamped to [-6, 6] -> e2m1 codes (uint8), round to nearest, ties to even code.

    Within binade e (m in [2^e, 2^(e+1)), e = 0, 1, 2; e = 0 also covers the subnormals [0, 1)) the e2m1 grid has
    spacing 2^(e-1) and the codes are ``2e + m / 2^(e-1)``, so ``2e + round_half_even(m / 2^(e-1))`` is the
    nearest code; adding the even ``2e`` keeps ties on the even code, and a round-up carries into the next binade.
    """
    magnitude = x.abs()
    _, exp = torch.frexp(magnitude)  # magnitude = mant * 2^exp, mant in [0.5, 1): floor(log2) = exp - 1
    binade = (exp - 1).clamp(0, 2)
    step = torch.ldexp(torch.ones_like(magnitude), binade - 1)  # exact power of two
    code = 2 * binade + torch.round(magnitude / step).to(torch.int32)  # torch.round is half-to-even
    return (code | (torch.signbit(x).to(torch.int32) << 3)).to(torch.uint8)


def pack_fp4_codes(codes: torch.Tensor) -> torch.Tensor:
    """e2m1 codes ``[O, I]`` (uint8, 0..15, I even) -> int8 ``[O, I/2]`` (low nibble = even column)."""
    if codes.dim() != 2 or codes.shape[1] % 2:
        raise QuantFormatError(
            f"FP4 packing needs a 2-D code tensor with an even column count, got {tuple(codes.shape)}"
        )
    codes = codes.to(torch.uint8)
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).view(torch.int8)


def quantize_fp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float ``[O, I]`` (I even) -> (int8 packed ``[O, I/2]``, float8_e8m0fnu ``[O, ceil(I/32)]``)."""
    if weight.dim() != 2 or not weight.is_floating_point() or weight.shape[1] % 2:
        raise QuantFormatError(
            f"FP4 quantisation takes a 2-D float weight with an even number of columns, got {weight.dtype} "
            f"{tuple(weight.shape)}"
        )
    out_features, in_features = weight.shape
    ib = _ceil_div(in_features, FP4_BLOCK)
    padded = torch.zeros(out_features, ib * FP4_BLOCK, dtype=torch.float32, device=weight.device)
    padded[:, :in_features] = weight.float()
    blocks = padded.view(out_features, ib, FP4_BLOCK)  # [O, Ib, 32]
    exponent = _pow2_exponent(blocks.abs().amax(dim=2), FP4_MAX)  # [O, Ib]
    scale = torch.ldexp(torch.ones_like(exponent, dtype=torch.float32), exponent)
    q = (blocks / scale[:, :, None]).clamp(-FP4_MAX, FP4_MAX).view(out_features, ib * FP4_BLOCK)
    codes = _round_to_fp4_codes(q[:, :in_features])  # [O, I]
    return pack_fp4_codes(codes), exponent_to_e8m0(exponent)


# ----------------------------------------------------------------------------------------------------------------
# Dispatch on the stored dtype


def is_fp8(weight: torch.Tensor | torch.dtype) -> bool:
    dtype = weight if isinstance(weight, torch.dtype) else weight.dtype
    return dtype == torch.float8_e4m3fn


def is_packed_fp4(weight: torch.Tensor | torch.dtype) -> bool:
    dtype = weight if isinstance(weight, torch.dtype) else weight.dtype
    return dtype in FP4_PACKED_DTYPES


def dequantize(
    weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Dequantise a release-format weight given its ``.scale``: FP8 e4m3 (128x128) or packed FP4 (1x32)."""
    if is_fp8(weight):
        return dequantize_fp8(weight, scale, dtype, out)
    if is_packed_fp4(weight):
        return dequantize_fp4(weight, scale, dtype, out)
    raise QuantFormatError(f"a tensor with a .scale must be float8_e4m3fn or packed FP4 (int8), got {weight.dtype}")


def dequantized_shape(weight: torch.Tensor) -> tuple[int, ...]:
    """Logical ``[O, I]`` of a stored quantised weight (packed FP4 holds I/2 columns)."""
    if is_packed_fp4(weight):
        return (weight.shape[0], 2 * weight.shape[1])
    return tuple(weight.shape)
