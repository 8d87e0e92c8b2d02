"""The native CPU kernels on packed weights (kernels/quant.py) against the plain-PyTorch reference (ops/packed.py),
in every ISA build this CPU runs (AVX-512 and AVX2 on an AVX-512 machine), at edge shapes (partial scale blocks, 1
to many rows: row kernel and dequantised-tile paths) and at V4-Flash widths."""

from __future__ import annotations

import pytest
import torch

from dsv4.kernels import quant as native
from dsv4.model import quant
from dsv4.ops import packed

ISAS = native.supported_isas()
pytestmark = pytest.mark.skipif(not native.available(), reason=f"native kernels: {native.why_unavailable()}")


def _weight(gen, fmt, o, i):
    """Random packed bytes (every code, NaN excluded) and scales 2^-4..2^3: the layout, without quantising."""
    if fmt == "fp8":
        codes = torch.randint(0, 256, (o, i), generator=gen, dtype=torch.uint8)
        codes[(codes & 0x7F) == 0x7F] = 0  # e4m3fn NaN
        shape = quant.fp8_scale_shape((o, i))
        w = codes.view(torch.float8_e4m3fn)
    else:
        w = torch.randint(-128, 128, (o, i // 2), generator=gen, dtype=torch.int8)
        shape = quant.fp4_scale_shape(w.shape)
    scale = torch.randint(123, 131, shape, generator=gen, dtype=torch.uint8).view(torch.float8_e8m0fnu)
    return w, scale


def assert_sum_close(got, want, x, w, s):
    """|got - want| within fp32 rounding of sums in another order: 1e-5 of sum |x| |w| per output."""
    bound = x.abs().reshape(-1, x.shape[-1]) @ packed.weight_rows(w, s, 0, w.shape[0], torch.float32).abs().T
    err = (got - want).abs().reshape(bound.shape)
    assert bool((err <= 1e-5 * bound + 1e-6).all()), f"max excess {(err - 1e-5 * bound).max().item()}"


def test_both_isa_builds_are_exercised():
    print(f"packed-weight kernels: ISA builds run here: {ISAS}")
    assert ISAS, "no ISA build runs on this CPU"
    for isa in ISAS:
        with native.use_isa(isa) as lib:
            assert lib.dsv4_quant_isa() == (512 if isa == "avx512" else 256)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt,o,i", [("fp8", 300, 200), ("fp8", 64, 128), ("fp8", 129, 17), ("fp4", 70, 96),
                                     ("fp4", 33, 48), ("fp4", 8, 2)])
@pytest.mark.parametrize("m", [1, 3, 4, 5, 70])
def test_linear_matches_reference(isa, fmt, o, i, m):
    gen = torch.Generator().manual_seed(o * 1000 + i + m)
    w, s = _weight(gen, fmt, o, i)
    x = torch.randn(m, i, generator=gen)
    want = packed.linear_reference(x, w, s)
    with native.use_isa(isa):
        got = native.linear(x, w, s)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert_sum_close(got, want, x, w, s)


@pytest.mark.parametrize("isa", ISAS)
def test_linear_at_flash_width(isa):
    gen = torch.Generator().manual_seed(7)
    w, s = _weight(gen, "fp8", 1024, 4096)  # wq_a
    x = torch.randn(2, 4096, generator=gen)
    with native.use_isa(isa):
        got = native.linear(x, w, s)
    assert_sum_close(got, packed.linear_reference(x, w, s), x, w, s)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("tokens,d,f,e,k", [(1, 64, 32, 8, 2), (3, 96, 64, 5, 2), (40, 64, 32, 4, 3),
                                            (1, 4096, 2048, 6, 6)])
def test_experts_match_reference(isa, tokens, d, f, e, k):
    from dsv4.ops import reference as ref

    gen = torch.Generator().manual_seed(tokens + d + e)
    stacks = [[] for _ in range(6)]
    for _ in range(e):
        for j, (o, i) in enumerate(((f, d), (f, d), (d, f))):
            w, s = _weight(gen, "fp4", o, i)
            stacks[2 * j].append(w)
            stacks[2 * j + 1].append(s)
    stacks = [torch.stack(t) for t in stacks]
    x = torch.randn(tokens, d, generator=gen) * 0.3
    ids = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(tokens)])
    weights = torch.rand(tokens, k, generator=gen)
    want = ref.routed_experts(x, ids, weights, stacks[0], stacks[2], stacks[4], stacks[1::2], [], [], 10.0)
    with native.use_isa(isa):
        got = native.experts(x, ids, weights, *stacks, 10.0)
    torch.testing.assert_close(got, want, atol=1e-3 * want.abs().max().item(), rtol=1e-4)
    with native.use_isa(isa), pytest.raises(ValueError, match="expert ids must lie"):
        native.experts(x, ids + e, weights, *stacks, 10.0)


def test_cpu_backend_runs_packed_ops_natively_without_autograd_only(monkeypatch):
    from dsv4 import ops

    gen = torch.Generator().manual_seed(3)
    w, s = _weight(gen, "fp8", 256, 128)
    calls = []
    real = native.linear
    monkeypatch.setattr(native, "linear", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(2, 128, generator=gen)
    with torch.no_grad():
        y = ops.linear(x.bfloat16(), w, s)
    assert calls and y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), packed.linear_reference(x.bfloat16(), w, s).float(), atol=0.5, rtol=0.02)
    with ops.use_backend("cpu", "reference"), torch.no_grad():
        ops.linear(x, w, s)
    assert len(calls) == 1
    xg = x.clone().requires_grad_()
    ops.linear(xg, w, s).sum().backward()  # the op's autograd: d/dx through the dequantised weight
    torch.testing.assert_close(xg.grad, packed.weight_rows(w, s, 0, 256, torch.float32).sum(0).expand(2, -1))


def test_two_threads_give_the_one_thread_results():
    """The row split over threads changes no sum (each output row is one thread's)."""
    gen = torch.Generator().manual_seed(11)
    w, s = _weight(gen, "fp8", 1024, 2048)
    w4, s4 = _weight(gen, "fp4", 1024, 2048)
    x = torch.randn(3, 2048, generator=gen)
    stacks = []
    for o, i in ((512, 1024), (512, 1024), (1024, 512)):
        ws, ss = zip(*(_weight(gen, "fp4", o, i) for _ in range(4)))
        stacks += [torch.stack(ws), torch.stack(ss)]
    xe = torch.randn(5, 1024, generator=gen)
    ids = torch.stack([torch.randperm(4, generator=gen)[:2] for _ in range(5)])
    rw = torch.rand(5, 2, generator=gen)
    before = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append((native.linear(x, w, s), native.linear(x[:1], w4, s4), native.experts(xe, ids, rw, *stacks, 10.0)))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*outs):
        assert torch.equal(a, b)
