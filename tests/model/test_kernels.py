"""The native CPU kernels (dsv4/kernels) called directly, against the op references they implement (dsv4/ops/
reference.py), and the model on the native backend against the model on the reference ops. They run wherever the
kernels build (a C compiler and AVX-512, as on the CI machines). Per-op tests at V4-Flash shapes: tests/ops."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from dsv4 import kernels, ops
from dsv4.model.batch import ForwardBatch
from dsv4.model.cache import KVCache
from dsv4.model.moe import MoE
from dsv4.model.norm import RMSNorm
from dsv4.ops import reference as ref
from tests.conftest import make_tiny_config, random_model

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"native kernels: {kernels.why_unavailable()}")


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> None:
    err = (a - b).abs().max().item()
    assert err <= rel * max(1.0, b.abs().max().item()), f"max abs diff {err}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k", [(129, 64), (7, 37), (256, 512), (3, 16)])
def test_linear_matches_torch_and_is_row_invariant(dtype, n, k):
    g = torch.Generator().manual_seed(n * k)
    w = torch.randn(n, k, generator=g).to(dtype)
    x = torch.randn(13, k, generator=g)
    y = kernels.linear(x, w)
    assert y.dtype == torch.float32 and y.shape == (13, n)
    close(y, F.linear(x, w.float()))
    # below 64 rows a row's result does not depend on the other rows of the call (decode agrees with short chunks)
    for m in (1, 5, 6, 7):
        assert torch.equal(kernels.linear(x[:m], w), y[:m])
    assert torch.equal(kernels.linear(x[-1], w), y[-1])
    many = torch.randn(100, k, generator=g)  # 64+ rows: torch's BLAS (bf16 widened in chunks) or the micro-kernels
    close(kernels.linear(many, w), F.linear(many, w.float()))


def test_linear_rejects_bad_weights():
    with pytest.raises(ValueError, match="contiguous 2-D"):
        kernels.linear(torch.randn(2, 8), torch.randn(8, 4).t())
    with pytest.raises(ValueError, match="contiguous 2-D"):
        kernels.linear(torch.randn(2, 8), torch.randn(4, 8, dtype=torch.float16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 3, 40, 400])  # 400 x top-2 of 8: 64+ rows per expert (the BLAS path)
def test_moe_matches_the_pytorch_experts(dtype, tokens):
    cfg = make_tiny_config(num_hash_layers=0)
    torch.manual_seed(tokens)
    moe = MoE(cfg, 1, dtype)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(tokens, cfg.dim) * 3  # large enough that the SwiGLU clamp bites
    with torch.no_grad():
        w, ids = moe.gate(x, None)
    lists = [[getattr(e, n).weight for e in moe.experts] for n in ("w1", "w3", "w2")]
    sh = moe.shared_experts
    shared = [sh.w1.weight, sh.w3.weight, sh.w2.weight]
    out = kernels.moe(x, ids, w, *lists, shared, cfg.swiglu_limit)
    want = ref.routed_experts(x, ids, w, *[[t.float() for t in ws] for ws in lists], [], [t.float() for t in shared],
                              [], cfg.swiglu_limit)
    assert out.dtype == torch.float32
    close(out, want)
    with pytest.raises(ValueError, match="expert ids"):
        kernels.moe(x, torch.full_like(ids, cfg.n_routed_experts), w, *lists, shared, cfg.swiglu_limit)


def test_moe_reads_replaced_weights():
    """Weights swapped in the module (load_state_dict(assign=True)) are the ones the native kernel reads: the op
    takes the tensors per call, no cached pointers."""
    cfg = make_tiny_config(num_hash_layers=0)
    model = random_model(cfg)
    other = random_model(cfg, seed=5)
    ids = torch.randint(0, cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(ids)  # the native path has run on the old weights
        model.load_state_dict(other.state_dict(), assign=True)
        close(model(ids), other(ids), rel=1e-6)


@pytest.mark.parametrize("tokens", [1, 9])
def test_hc_pre_with_norm_and_hc_post_match_pytorch(tokens):
    cfg = make_tiny_config()
    m, d = cfg.hc_mult, cfg.dim
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, m, d, generator=g)
    fn = torch.randn((2 + m) * m, m * d, generator=g) * 0.05
    base, scale = torch.randn((2 + m) * m, generator=g), 1 + 0.2 * torch.randn(3, generator=g)
    norm = RMSNorm(d, cfg.rms_norm_eps)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(d, generator=g))
        y, post, comb = ref.hc_pre(x, fn, base, scale, norm.weight, cfg.hc_sinkhorn_iters, cfg.hc_eps,
                                   cfg.rms_norm_eps, norm.eps)
        ny, npost, ncomb = kernels.hc_pre(x, fn, base, scale, cfg.hc_sinkhorn_iters, cfg.hc_eps, cfg.rms_norm_eps,
                                          norm.weight, norm.eps)
        close(ny, y)
    close(npost, post)
    close(ncomb, comb)
    f = torch.randn(tokens, d, generator=g)
    close(kernels.hc_post(f, x, post, comb), ref.hc_post(f, x, post, comb))
    close(ncomb.sum(-2), torch.ones(tokens, m), rel=1e-3)  # doubly stochastic (columns exactly, up to eps)


def test_native_model_matches_reference_model():
    cfg = make_tiny_config()
    model = random_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with ops.use_backend("cpu", "reference"):
            want = model(ids)
        with ops.use_backend("cpu", "native"):
            close(model(ids), want, rel=1e-4)


def test_fp32_activations_over_bf16_weights_keep_the_dtypes_the_kernels_read():
    """set_activation_dtype(fp32) on a bf16 model: experts and attention projections stay bf16 (read as bf16),
    everything else becomes fp32 (the head is fp32 already); logits = the fp32 model's, on both backends."""
    cfg = make_tiny_config()
    model = random_model(cfg, dtype=torch.bfloat16)
    fp32 = copy.deepcopy(model).float()
    model.set_activation_dtype(torch.float32)
    read_as_stored = (".experts.", "shared_experts.", ".attn.wq_a.", ".attn.wq_b.", ".attn.wkv.", ".attn.wo_a.",
                      ".attn.wo_b.")
    for name, p in model.named_parameters():
        want = torch.bfloat16 if any(k in name for k in read_as_stored) else torch.float32
        assert p.dtype == want, name
    ids = torch.randint(0, cfg.vocab_size, (1, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = fp32(ids)
        for backend in ("native", "reference"):
            with ops.use_backend("cpu", backend):
                close(model(ids), want, rel=1e-4)


def test_native_incremental_decode_equals_full_forward():
    """Prefill 20 tokens then decode one at a time through the cache == the cache-free forward (native backend)."""
    cfg = make_tiny_config()
    model = random_model(cfg)
    seq = torch.randint(0, cfg.vocab_size, (36,), generator=torch.Generator().manual_seed(2)).tolist()
    cache = KVCache(cfg, num_slots=1, num_pages=4, page_size=16, dtype=torch.float32)
    rows = []
    with torch.no_grad():
        full = model(torch.tensor([seq]))[0]
        chunks = [(0, 20)] + [(i, i + 1) for i in range(20, len(seq))]
        for a, b in chunks:
            batch = ForwardBatch(input_ids=torch.tensor(seq[a:b]), positions=torch.arange(a, b), start_pos=[a],
                                 seq_lens=[b - a], slots=[0], block_tables=torch.arange(4)[None],
                                 logits_indices=torch.arange(b - a))
            rows.append(model.forward_batch(batch, cache).logits)
    close(torch.cat(rows), full, rel=1e-4)


def test_unavailable_kernels_say_why_and_the_ops_fall_back_to_the_reference():
    code = ("import logging; logging.basicConfig()\n"
            "import torch; from dsv4 import kernels, ops; from dsv4.ops.cpu import native_status\n"
            "from tests.conftest import make_tiny_config, random_model\n"
            "print(kernels.available(), kernels.why_unavailable()); print(native_status())\n"
            "m = random_model(make_tiny_config())\n"
            "with torch.no_grad():\n"
            "    m(torch.zeros(1, 5, dtype=torch.long)); m(torch.zeros(1, 5, dtype=torch.long))\n"
            "print('ran')\n")
    env = dict(os.environ, DSV4_NATIVE_KERNELS="0")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert "False disabled by DSV4_NATIVE_KERNELS=0" in res.stdout and "ran" in res.stdout
    assert "(False, 'native CPU kernels unavailable: disabled by DSV4_NATIVE_KERNELS=0')" in res.stdout
    assert res.stderr.count("run their PyTorch reference (disabled by DSV4_NATIVE_KERNELS=0)") == 1  # logged once


def test_indexer_topk_matches_select_reading_keys_from_pages():
    """kernels.indexer_topk (keys read in place through the block table) picks what the op's reference picks."""
    cfg = make_tiny_config(index_topk=5)
    g = torch.Generator().manual_seed(3)
    b, h, i, r, page = 3, cfg.index_n_heads, cfg.index_head_dim, 4, 16
    pages = torch.randn(10, page // r, i, generator=g)  # the cache's idx_entries of one layer
    tables = torch.stack([torch.randperm(10, generator=g)[:4] for _ in range(b)])  # [B, 4 pages]
    q, w = torch.randn(b, h, i, generator=g), torch.randn(b, h, generator=g)
    vis = torch.tensor([3, 11, 16])  # fewer than k, more than k, all entries of the 4 pages
    want = ref.indexer_topk(q[:, None], w[:, None], pages, tables, r, vis[:, None], 16, 5)[:, 0]
    got = kernels.indexer_topk(q, w, pages, tables, r, vis, want.shape[1])
    assert got.shape == want.shape
    for row_got, row_want in zip(got.tolist(), want.tolist()):
        assert sorted(row_got) == sorted(row_want)  # same picks (the order only changes a summation order)
    assert got[0, 3:].tolist() == [-1, -1]


def test_argmax_rows_is_torch_max_indices():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 1000, generator=g)
    x[1, 7] = x[1, 900] = 50.0  # ties: the first one
    x[2, 3] = float("nan")  # a NaN wins, like torch.max
    x[3] = 0.0
    assert kernels.argmax_rows(x).tolist() == x.max(dim=-1).indices.tolist()
