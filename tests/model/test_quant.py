"""FP8 / FP4 block formats: dequantisation against hand-computed values, quantisation rules, exact round trips."""

from __future__ import annotations

import pytest
import torch

from dsv4.model import quant


def e4m3(bytes_: list[list[int]]) -> torch.Tensor:
    return torch.tensor(bytes_, dtype=torch.uint8).view(torch.float8_e4m3fn)


def e8m0(bytes_: list[list[int]]) -> torch.Tensor:
    return torch.tensor(bytes_, dtype=torch.uint8).view(torch.float8_e8m0fnu)


def test_e8m0_bytes_are_biased_exponents():
    s = e8m0([[0, 1, 120, 127, 130, 254]])
    expected = torch.tensor([[2.0**-127, 2.0**-126, 2.0**-7, 1.0, 8.0, 2.0**127]])
    assert torch.equal(quant.e8m0_to_float(s), expected)
    assert torch.equal(quant.e8m0_to_float(s.view(torch.uint8)), expected)


def test_e8m0_nan_byte_is_rejected():
    with pytest.raises(quant.QuantFormatError, match="corrupt"):
        quant.e8m0_to_float(e8m0([[127, 255]]))


def test_fp8_dequant_hand_values_on_partial_blocks():
    # [130, 200]: 2x2 scale blocks, the last block row holds 2 rows and the last block column 72 columns.
    w = torch.zeros(130, 200, dtype=torch.uint8)
    w[0, 0] = 0x3C  # 0 0111 100 = +1.5
    w[0, 127] = 0xB8  # 1 0111 000 = -1.0
    w[0, 128] = 0x40  # 0 1000 000 = +2.0
    w[127, 199] = 0x7E  # 0 1111 110 = 448 (largest finite)
    w[128, 0] = 0x01  # 0 0000 001 = 2^-9 (smallest subnormal)
    w[129, 199] = 0x35  # 0 0110 101 = 1.625 * 2^-1 = 0.8125
    w = w.view(torch.float8_e4m3fn)
    s = e8m0([[130, 125], [127 + 9, 120]])  # 8, 1/4, 512, 2^-7
    out = quant.dequantize_fp8(w, s, torch.float32)
    assert out.shape == (130, 200)
    assert out[0, 0] == 1.5 * 8 and out[0, 127] == -1.0 * 8
    assert out[0, 128] == 2.0 * 0.25 and out[127, 199] == 448 * 0.25
    assert out[128, 0] == 2.0**-9 * 512 and out[129, 199] == 0.8125 * 2.0**-7
    assert int((out != 0).sum()) == 6
    # bf16 holds every e4m3 value times a power of two: the bf16 result is the same numbers.
    assert torch.equal(quant.dequantize_fp8(w, s, torch.bfloat16).float(), out)


def test_fp8_dequant_rejects_wrong_scale_shape():
    w = torch.zeros(130, 200, dtype=torch.float8_e4m3fn)
    with pytest.raises(quant.QuantFormatError, match=r"\(2, 2\)"):
        quant.dequantize_fp8(w, e8m0([[127, 127]]))


def test_fp4_dequant_hand_values():
    # Row 0: bytes 0x21 -> cols (0.5, 1.0); 0xF7 -> (6.0, -6.0); 0x9A -> (-1.0, -0.5). 40 columns = 2 scale blocks.
    packed = torch.zeros(2, 20, dtype=torch.uint8)
    packed[0, 0], packed[0, 1], packed[0, 2] = 0x21, 0xF7, 0x9A
    packed[0, 16] = 0x53  # col 32: 1.5, col 33: 3.0 (second scale block)
    packed[1, 19] = 0xC8  # col 38: -0.0, col 39: -2.0
    scale = e8m0([[128, 125], [127, 127 + 3]])  # row0: 2, 1/4; row1: 1, 8
    out = quant.dequantize_fp4(packed.view(torch.int8), scale, torch.float32)
    assert out.shape == (2, 40)
    assert out[0, :6].tolist() == [1.0, 2.0, 12.0, -12.0, -2.0, -1.0]
    assert out[0, 32:34].tolist() == [1.5 * 0.25, 3.0 * 0.25]
    assert out[1, 38] == 0 and out[1, 39] == -16.0
    assert int((out != 0).sum()) == 9
    # The torch float4 dtype and raw uint8 bytes are accepted and mean the same thing.
    as_fp4 = packed.view(torch.float4_e2m1fn_x2)
    assert torch.equal(quant.dequantize_fp4(as_fp4, scale, torch.float32), out)
    assert torch.equal(quant.dequantize_fp4(packed, scale, torch.float32), out)


def test_fp4_all_sixteen_codes():
    codes = torch.arange(16, dtype=torch.uint8).view(1, 16)
    values = quant.unpack_fp4(quant.pack_fp4_codes(codes))
    assert values[0].tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6, 0, -0.5, -1, -1.5, -2, -3, -4, -6]


def test_fp4_dequant_rejects_wrong_scale_shape():
    with pytest.raises(quant.QuantFormatError, match="1x32"):
        quant.dequantize_fp4(torch.zeros(4, 32, dtype=torch.int8), e8m0([[127]] * 4))


def test_fp8_quantize_hand_case():
    w = torch.zeros(2, 130)
    w[0, 0], w[1, 3] = 3.0, -0.5  # block (0,0): amax 3 -> s = 2^ceil(log2(3/448)) = 2^-7
    w[0, 129] = 448.0  # block (0,1): amax exactly 448 -> s = 1
    q, s = quant.quantize_fp8(w)
    assert s.view(torch.uint8).tolist() == [[120, 127]]
    assert q.dtype == torch.float8_e4m3fn and q.shape == (2, 130)
    assert q.float()[0, 0] == 384 and q.float()[1, 3] == -64 and q.float()[0, 129] == 448
    assert torch.equal(quant.dequantize_fp8(q, s, torch.float32), w)


def test_fp8_quantize_rounds_to_nearest():
    w = torch.zeros(1, 4)
    w[0] = torch.tensor([448.0, 1.0 + 2**-4, 1.0 + 3 * 2**-4, 0.0])  # e4m3 spacing at 1 is 1/8: ties
    q, s = quant.quantize_fp8(w)
    assert s.view(torch.uint8).tolist() == [[127]]
    assert q.float()[0].tolist() == [448.0, 1.0, 1.25, 0.0]  # ties to even mantissa


def test_fp4_quantize_hand_case_with_ties():
    w = torch.zeros(1, 32)
    w[0, :7] = torch.tensor([0.3, -0.75, 1.25, 2.5, 5.0, 7.0, -12.0])
    # amax 12 -> s = 2^ceil(log2(12/6)) = 2; w/s = 0.15, -0.375, 0.625, 1.25, 2.5, 3.5, -6
    packed, s = quant.quantize_fp4(w)
    assert s.view(torch.uint8).tolist() == [[128]]
    values = quant.unpack_fp4(packed)[0, :7].tolist()
    # 0.15 -> 0; -0.375 -> -0.5; 0.625 -> 0.5; ties 1.25 -> 1, 2.5 -> 2, 3.5 -> 4 (even codes); -6 exact
    assert values == [0.0, -0.5, 0.5, 1.0, 2.0, 4.0, -6.0]


def test_all_zero_blocks_get_a_valid_scale():
    q, s = quant.quantize_fp8(torch.zeros(3, 5))
    assert torch.equal(quant.dequantize_fp8(q, s, torch.float32), torch.zeros(3, 5))
    p, s4 = quant.quantize_fp4(torch.zeros(3, 8))
    assert torch.equal(quant.dequantize_fp4(p, s4, torch.float32), torch.zeros(3, 8))


def _random_fp8_weight(gen: torch.Generator, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    raw = torch.randint(0, 256, (rows, cols), generator=gen, dtype=torch.int32).to(torch.uint8)
    raw[(raw & 0x7F) == 0x7F] = 0x38  # 0x7F / 0xFF are NaN in e4m3fn
    scale = torch.randint(100, 150, quant.fp8_scale_shape((rows, cols)), generator=gen, dtype=torch.int32)
    return raw.view(torch.float8_e4m3fn), scale.to(torch.uint8).view(torch.float8_e8m0fnu)


@pytest.mark.parametrize("shape", [(128, 128), (130, 200), (1, 7), (300, 129)])
def test_fp8_round_trip_is_exact_on_representable_values(shape):
    gen = torch.Generator().manual_seed(sum(shape))
    w, s = _random_fp8_weight(gen, *shape)
    values = quant.dequantize_fp8(w, s, torch.float32)
    q2, s2 = quant.quantize_fp8(values)
    assert torch.equal(quant.dequantize_fp8(q2, s2, torch.float32), values)
    assert torch.equal(quant.dequantize_fp8(q2, s2, torch.bfloat16).float(), values)


@pytest.mark.parametrize("shape", [(4, 64), (3, 40), (5, 2)])
def test_fp4_round_trip_is_exact_on_representable_values(shape):
    rows, cols = shape
    gen = torch.Generator().manual_seed(rows * cols)
    packed = torch.randint(-128, 128, (rows, cols // 2), generator=gen, dtype=torch.int32).to(torch.int8)
    scale = torch.randint(110, 140, quant.fp4_scale_shape(packed.shape), generator=gen, dtype=torch.int32)
    scale = scale.to(torch.uint8).view(torch.float8_e8m0fnu)
    values = quant.dequantize_fp4(packed, scale, torch.float32)
    p2, s2 = quant.quantize_fp4(values)
    assert torch.equal(quant.dequantize_fp4(p2, s2, torch.float32), values)
    assert torch.equal(quant.dequantize_fp4(p2, s2, torch.bfloat16).float(), values)


def test_quantisation_error_is_bounded_for_random_weights():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(256, 192, generator=gen) * 0.02
    q, s = quant.quantize_fp8(w)
    err8 = (quant.dequantize_fp8(q, s, torch.float32) - w).abs()
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 of the value, plus the subnormal step of the block scale.
    assert bool((err8 <= w.abs() * 2**-4 + quant.e8m0_to_float(s).max() * 2**-9).all())
    p, s4 = quant.quantize_fp4(w)
    err4 = (quant.dequantize_fp4(p, s4, torch.float32) - w).abs()
    block_scale = quant.e8m0_to_float(s4).repeat_interleave(32, dim=1)
    assert bool((err4 <= block_scale).all())  # the largest e2m1 spacing (4 -> 6) is 2 units: half of it is 1


def test_chunked_dequant_matches_unchunked(monkeypatch):
    gen = torch.Generator().manual_seed(1)
    w, s = _random_fp8_weight(gen, 700, 130)
    full = quant.dequantize_fp8(w, s, torch.float32)
    monkeypatch.setattr(quant, "_ROW_CHUNK", 128)
    assert torch.equal(quant.dequantize_fp8(w, s, torch.float32), full)
    expected = w.float() * quant.e8m0_to_float(s).repeat_interleave(128, 0)[:700].repeat_interleave(128, 1)[:, :130]
    assert torch.equal(full, expected)
