"""The plain-PyTorch reference ops on packed weights (ops/packed.py) against weights dequantised by hand here, byte
by byte from the format's definition (architecture.md sec 1), not through model/quant.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dsv4.model import quant
from dsv4.ops import packed

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def hand_e8m0(scale: torch.Tensor) -> torch.Tensor:
    return torch.tensor([[2.0 ** (int(b) - 127) for b in row] for row in scale.view(torch.uint8).tolist()])


def _e4m3(b: int) -> float:
    sign = -1.0 if b & 0x80 else 1.0
    e, m = (b >> 3) & 0xF, b & 7
    return sign * ((m / 8) * 2.0 ** -6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7))  # bias 7, subnormals at e = 0


E4M3 = torch.tensor([_e4m3(b) for b in range(256)])


def hand_fp8(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """e4m3 bytes -> values (table from the definition above) times the 128x128 block scale."""
    s = hand_e8m0(scale)
    o, i = w.shape
    rows, cols = torch.arange(o)[:, None] // 128, torch.arange(i)[None] // 128
    return E4M3[w.view(torch.uint8).long()] * s[rows, cols]


def hand_fp4(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 [O, I/2]: low nibble = column 2j, high = 2j+1; bit 3 of a nibble is the sign; scale per 1x32."""
    s = hand_e8m0(scale)
    table = torch.tensor([(-1.0 if c & 8 else 1.0) * E2M1[c & 7] for c in range(16)])
    b = w.view(torch.uint8).long()
    codes = torch.stack([b & 0xF, b >> 4], dim=-1).flatten(1)  # [O, I]
    return table[codes] * s[:, torch.arange(codes.shape[1]) // 32]


def random_fp8(gen, o, i):
    return quant.quantize_fp8(torch.randn(o, i, generator=gen) * torch.rand(o, 1, generator=gen) * 3)


def random_fp4(gen, o, i):
    return quant.quantize_fp4(torch.randn(o, i, generator=gen) * torch.rand(o, 1, generator=gen) * 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", ["fp8", "fp4"])
def test_linear_reference_equals_hand_dequantised(fmt, dtype, monkeypatch):
    gen = torch.Generator().manual_seed(0)
    o, i = (300, 200) if fmt == "fp8" else (70, 96)  # partial FP8 blocks on both dims
    w, s = random_fp8(gen, o, i) if fmt == "fp8" else random_fp4(gen, o, i)
    x = torch.randn(2, 3, i, generator=gen).to(dtype)
    ref = F.linear(x.float(), (hand_fp8 if fmt == "fp8" else hand_fp4)(w, s))
    whole = packed.linear_reference(x, w, s)
    monkeypatch.setattr(packed, "_CHUNK_ELEMS", 40 * i)  # several row chunks (FP8: whole 128-row blocks)
    chunked = packed.linear_reference(x, w, s)
    assert whole.dtype == dtype and whole.shape == (2, 3, o)
    tol = 1e-5 if dtype == torch.float32 else 0.05 * ref.abs().max().item()
    torch.testing.assert_close(whole.float(), ref, atol=tol, rtol=0 if dtype == torch.float32 else 0.02)
    torch.testing.assert_close(chunked, whole, atol=tol, rtol=0)


def test_linear_reference_temporaries_are_bounded(monkeypatch):
    gen = torch.Generator().manual_seed(1)
    w, s = random_fp8(gen, 1024, 256)
    seen = []
    real = quant.dequantize_fp8

    def spy(weight, scale, dtype, out=None):
        seen.append(weight.shape[0])
        return real(weight, scale, dtype, out)

    monkeypatch.setattr(quant, "dequantize_fp8", spy)
    monkeypatch.setattr(packed, "_CHUNK_ELEMS", 256 * 256)
    packed.linear_reference(torch.randn(5, 256, generator=gen), w, s)
    assert seen == [256] * 4  # never the whole weight


def test_linear_reference_is_differentiable_in_x():
    gen = torch.Generator().manual_seed(2)
    w, s = random_fp8(gen, 260, 130)
    x = torch.randn(4, 130, generator=gen, requires_grad=True)
    g = torch.randn(4, 260, generator=gen)
    (packed.linear_reference(x, w, s) * g).sum().backward()
    torch.testing.assert_close(x.grad, g @ hand_fp8(w, s), atol=1e-5, rtol=0)


def test_routed_experts_reference_on_fp4_equals_per_token_hand_dequantised_experts():
    from dsv4.ops import reference as ref

    gen = torch.Generator().manual_seed(3)
    e, d, f, n, k, limit = 5, 64, 32, 7, 2, 1.5  # a small limit so the clamps act
    lists = [[], [], []]
    scales = [[], [], []]
    dense = []
    for _ in range(e):
        mats = []
        for j, (o, i) in enumerate(((f, d), (f, d), (d, f))):
            w, s = random_fp4(gen, o, i)
            lists[j].append(w)
            scales[j].append(s)
            mats.append(hand_fp4(w, s))
        dense.append(mats)
    x = torch.randn(n, d, generator=gen)
    ids = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(n)])
    weights = torch.rand(n, k, generator=gen)
    got = ref.routed_experts(x, ids, weights, *map(torch.stack, lists), list(map(torch.stack, scales)), [], [],
                             limit)
    want = torch.zeros(n, d)
    for t in range(n):
        for j in sorted(range(k), key=lambda j: int(ids[t, j])):
            w1, w3, w2 = dense[int(ids[t, j])]
            g, u = (x[t] @ w1.T).clamp(max=limit), (x[t] @ w3.T).clamp(-limit, limit)
            want[t] += (weights[t, j] * F.silu(g) * u) @ w2.T
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)  # fp32 sums in another order


def test_stacked_recognises_consecutive_slices_only():
    block = torch.zeros(4, 3, 2, dtype=torch.int8)
    views = [torch.nn.Parameter(block[i], requires_grad=False) for i in range(4)]
    whole = packed.stacked(views)
    assert whole is not None and whole.data_ptr() == block.data_ptr() and whole.shape == (4, 3, 2)
    assert packed.stacked([views[0], views[2], views[1], views[3]]) is None
    assert packed.stacked([*views[:3], block[3].clone()]) is None
