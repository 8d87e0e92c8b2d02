"""The native CPU kernels (dsv4/kernels) against the PyTorch code they replace, and the model's fast path against its
PyTorch path. They run wherever the kernels build (a C compiler and AVX-512 or AVX2), every test once per ISA build
this CPU executes (the test id says which: [avx512] / [avx2]; the others are skipped with the reason; the
session summary counts both, tests/model/conftest.py)."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from dsv4 import kernels
from dsv4.kernels import build
from dsv4.model import hyper
from dsv4.model.attention import sparse_attention
from dsv4.model.batch import ForwardBatch
from dsv4.model.cache import KVCache
from dsv4.model.moe import MoE
from dsv4.model.norm import RMSNorm
from tests.conftest import make_tiny_config, random_model

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"native kernels: {kernels.why_unavailable()}")

_BITS = {"avx512": 512, "avx2": 256}


@pytest.fixture(params=[i.name for i in build.ISAS], autouse=True)
def isa(request):
    """Every test of this file once per ISA build: the wrappers call that build inside (a test that builds nothing
    opts out with ``@pytest.mark.parametrize("isa", [None], indirect=True)``)."""
    if request.param is None:
        yield None
        return
    if request.param not in build.supported_isas():
        pytest.skip(f"this CPU cannot execute the {request.param} build")
    with build.use_isa(request.param) as lib:  # a build failure of a CPU-supported ISA fails the test
        assert lib.dsv4_isa() == _BITS[request.param] and kernels.isa() == request.param
        yield request.param


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> None:
    err = (a - b).abs().max().item()
    assert err <= rel * max(1.0, b.abs().max().item()), f"max abs diff {err}"


@pytest.mark.parametrize("act", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k", [(129, 64), (7, 37), (256, 512), (3, 16)])
def test_linear_matches_torch_and_is_row_invariant(dtype, n, k, act):
    g = torch.Generator().manual_seed(n * k)
    w = torch.randn(n, k, generator=g).to(dtype)
    x = torch.randn(13, k, generator=g).to(act)  # bf16 activations: widened, summed in fp32
    y = kernels.linear(x, w)
    assert y.dtype == torch.float32 and y.shape == (13, n)
    close(y, F.linear(x.float(), w.float()))
    # below 64 rows a row's result does not depend on the other rows of the call (decode agrees with short chunks)
    for m in (1, 5, 6, 7):
        assert torch.equal(kernels.linear(x[:m], w), y[:m])
    assert torch.equal(kernels.linear(x[-1], w), y[-1])
    # 64+ rows: torch's BLAS (bf16 widened in chunks) or the micro-kernels
    many = torch.randn(100, k, generator=g).to(act)
    close(kernels.linear(many, w), F.linear(many.float(), w.float()))


def test_linear_rejects_bad_weights():
    with pytest.raises(ValueError, match="contiguous 2-D"):
        kernels.linear(torch.randn(2, 8), torch.randn(8, 4).t())
    with pytest.raises(ValueError, match="contiguous 2-D"):
        kernels.linear(torch.randn(2, 8), torch.randn(4, 8, dtype=torch.float16))


@pytest.mark.parametrize("act", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 3, 40, 400])  # 400 x top-2 of 8: 64+ rows per expert (the BLAS path)
def test_moe_matches_the_pytorch_experts(dtype, tokens, act):
    cfg = make_tiny_config(num_hash_layers=0)
    torch.manual_seed(tokens)
    moe = MoE(cfg, 1, dtype)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.3)
    ref_moe = copy.deepcopy(moe).float()
    moe.use_native_kernels()
    x = (torch.randn(tokens, cfg.dim) * 3).to(act)  # large enough that the SwiGLU clamp bites
    with torch.no_grad():
        ref = ref_moe(x.float(), None)  # the fp32 computation of the same (bf16-valued) activations
        w, ids = ref_moe.gate(x.float(), None)
        out = kernels.moe(x, ids, w, moe._native)
        assert out.dtype == torch.float32
        close(out, ref)
        close(moe(x.float(), None), ref)
    with pytest.raises(ValueError, match="expert ids"):
        kernels.moe(x, torch.full_like(ids, cfg.n_routed_experts), w, moe._native)


@pytest.mark.parametrize("act", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 9])
def test_hc_pre_with_norm_and_hc_post_match_pytorch(tokens, act):
    cfg = make_tiny_config()
    m, d = cfg.hc_mult, cfg.dim
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, m, d, generator=g).to(act).float()  # bf16-valued activations, as fp32 for the reference
    fn = torch.randn((2 + m) * m, m * d, generator=g) * 0.05
    base, scale = torch.randn((2 + m) * m, generator=g), 1 + 0.2 * torch.randn(3, generator=g)
    norm = RMSNorm(d, cfg.rms_norm_eps)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(d, generator=g))
        y, post, comb = hyper.hc_pre(x, fn, base, scale, cfg.hc_sinkhorn_iters, cfg.hc_eps, cfg.rms_norm_eps)
        ny, npost, ncomb = kernels.hc_pre(x.to(act), fn, base, scale, cfg.hc_sinkhorn_iters, cfg.hc_eps,
                                          cfg.rms_norm_eps, norm.weight, norm.eps)
        close(ny, norm(y))
    close(npost, post)
    close(ncomb, comb)
    f = torch.randn(tokens, d, generator=g).to(act).float()
    close(kernels.hc_post(f.to(act), x.to(act), post, comb), hyper.hc_post(f, x, post, comb))
    close(ncomb.sum(-2), torch.ones(tokens, m), rel=1e-3)  # doubly stochastic (columns exactly, up to eps)


def test_native_model_matches_pytorch_model():
    cfg = make_tiny_config()
    model = random_model(cfg)
    native = copy.deepcopy(model).use_native_kernels()
    ids = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        close(native(ids), model(ids), rel=1e-4)


def test_native_bf16_model_keeps_the_dtypes_the_kernels_read():
    """A bf16 model: experts and attention projections stay bf16 (read as bf16), everything else becomes fp32 (the
    head is fp32 already); logits = the fp32 model's."""
    cfg = make_tiny_config()
    model = random_model(cfg, dtype=torch.bfloat16)
    ref = copy.deepcopy(model).float()
    model.use_native_kernels()
    read_as_stored = (".experts.", "shared_experts.", ".attn.wq_a.", ".attn.wq_b.", ".attn.wkv.", ".attn.wo_a.",
                      ".attn.wo_b.")
    for name, p in model.named_parameters():
        want = torch.bfloat16 if any(k in name for k in read_as_stored) else torch.float32
        assert p.dtype == want, name
    ids = torch.randint(0, cfg.vocab_size, (1, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        close(model(ids), ref(ids), rel=1e-4)


def _cached_logits(model, cfg, seq: list[int], cache_dtype: torch.dtype) -> torch.Tensor:
    """Prefill 20 tokens, then decode one at a time through a KVCache of ``cache_dtype`` -> logits [len(seq)-0, V]."""
    cache = KVCache(cfg, num_slots=1, num_pages=4, page_size=16, dtype=cache_dtype)
    rows = []
    with torch.no_grad():
        for a, b in [(0, 20)] + [(i, i + 1) for i in range(20, len(seq))]:
            batch = ForwardBatch(input_ids=torch.tensor(seq[a:b]), positions=torch.arange(a, b), start_pos=[a],
                                 seq_lens=[b - a], slots=[0], block_tables=torch.arange(4)[None],
                                 logits_indices=torch.arange(b - a))
            rows.append(model.forward_batch(batch, cache).logits)
    return torch.cat(rows)


def test_native_incremental_decode_equals_full_forward():
    """Prefill 20 tokens then decode one at a time through the cache == the cache-free forward (native path)."""
    cfg = make_tiny_config()
    model = random_model(cfg).use_native_kernels()
    seq = torch.randint(0, cfg.vocab_size, (36,), generator=torch.Generator().manual_seed(2)).tolist()
    with torch.no_grad():
        full = model(torch.tensor([seq]))[0]
    close(_cached_logits(model, cfg, seq, torch.float32), full, rel=1e-4)


def test_native_decode_with_a_bf16_cache_matches_the_pytorch_path():
    """A bf16 KV cache on the native path (ring, entries and indexer keys read as bf16, entries written rounded once)
    gives the PyTorch path's logits with the same bf16 cache, and stays near the fp32 cache's."""
    cfg = make_tiny_config()
    ref = random_model(cfg)
    model = copy.deepcopy(ref).use_native_kernels()
    seq = torch.randint(0, cfg.vocab_size, (36,), generator=torch.Generator().manual_seed(5)).tolist()
    got = _cached_logits(model, cfg, seq, torch.bfloat16)
    close(got, _cached_logits(ref, cfg, seq, torch.bfloat16), rel=1e-3)
    assert (got - _cached_logits(model, cfg, seq, torch.float32)).abs().max() > 0  # the cache was bf16 indeed


def test_native_experts_follow_a_load_state_dict_with_assign():
    """load_state_dict(..., assign=True) replaces the expert tensors: the native experts read the new ones."""
    cfg = make_tiny_config()
    model = random_model(cfg).use_native_kernels()
    other = random_model(cfg, seed=7)
    ids = torch.randint(0, cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        want = other(ids)
        model.load_state_dict(copy.deepcopy(other.state_dict()), assign=True)
        close(model(ids), want, rel=1e-4)


@pytest.mark.parametrize("act", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("h,c", [(8, 64), (6, 36)])  # c a multiple of the vector width (4-head pass) or not
def test_chunk_attention_matches_sparse_attention(cache_dtype, act, h, c):
    """kernels.chunk_attention over the window ring + the chunk's own keys + gathered entries == the model's
    sparse_attention on the same keys (fp32 computation of the stored values), per query, padding rows zero."""
    g = torch.Generator().manual_seed(h * c)
    b, s, w, n_ent, e = 3, 5, 8, 40, 6
    q = torch.randn(b, s, h, c, generator=g).to(act)
    kv = torch.randn(b, s, c, generator=g).to(act)
    ring = torch.randn(4, w, c, generator=g).to(cache_dtype)
    entries = torch.randn(n_ent, c, generator=g).to(cache_dtype)
    rows = torch.randint(0, n_ent, (b, s, e), generator=g)
    rows[0, 1, 2:] = -1  # fewer picks than E
    rows[2, :, :] = -1  # no compressed keys at all
    start, lens = torch.tensor([0, 3, 20]), torch.tensor([5, 2, 4])  # window partly, or wholly, from the ring
    slots, sink = torch.tensor([2, 0, 3]), torch.randn(h, generator=g)
    out = kernels.chunk_attention(q, kv, start, lens, ring, slots, entries, rows, sink, c ** -0.5)
    assert out.shape == (b, s, h, c) and out.dtype == torch.float32
    for i in range(b):
        for j in range(s):
            if j >= lens[i]:
                assert out[i, j].abs().max() == 0
                continue
            t = int(start[i]) + j
            win = [kv[i, p - start[i]].float() if p >= start[i] else ring[slots[i], p % w].float()
                   for p in range(max(0, t - w + 1), t + 1)]
            comp = [entries[r].float() for r in rows[i, j].tolist() if r >= 0]
            raw = torch.stack(win)[None]  # [1, W', c]
            ck = torch.stack(comp)[None] if comp else None  # [1, E', c]
            want = sparse_attention(q[i, j].float()[None, None], raw, torch.ones(1, 1, raw.shape[1], dtype=torch.bool),
                                    ck, torch.ones(1, 1, len(comp), dtype=torch.bool) if comp else None, False,
                                    sink, c ** -0.5)[0, 0]
            close(out[i, j], want)


def test_chunk_attention_refuses_an_fp16_cache_clearly():
    q, kv = torch.randn(1, 1, 2, 16), torch.randn(1, 1, 16)
    with pytest.raises(ValueError, match="fp32 or bf16"):
        kernels.chunk_attention(q, kv, torch.tensor([4]), torch.tensor([1]), torch.zeros(1, 8, 16, dtype=torch.half),
                                torch.tensor([0]), None, None, torch.zeros(2), 0.25)


@pytest.mark.parametrize("isa", [None], indirect=True)  # a subprocess without kernels: no ISA build involved
def test_unavailable_kernels_say_why_and_the_model_refuses_clearly(isa):
    code = ("from dsv4 import kernels; from tests.conftest import make_tiny_config, random_model\n"
            "print(kernels.available(), kernels.why_unavailable())\n"
            "try:\n    random_model(make_tiny_config()).use_native_kernels()\n"
            "except RuntimeError as e:\n    print('refused:', e)\n")
    env = dict(os.environ, DSV4_NATIVE_KERNELS="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__)))).stdout
    assert "False disabled by DSV4_NATIVE_KERNELS=0" in out
    assert "refused: dsv4 native CPU kernels are unavailable" in out and "native_kernels=False" in out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_indexer_topk_matches_select_reading_keys_from_pages(dtype):
    """kernels.indexer_topk (keys read in place through the block table, fp32 or bf16) picks what Indexer.select
    picks."""
    from dsv4.model.indexer import Indexer

    cfg = make_tiny_config(index_topk=5)
    ind = Indexer(cfg, torch.float32)
    g = torch.Generator().manual_seed(3)
    b, h, i, r, page = 3, cfg.index_n_heads, cfg.index_head_dim, 4, 16
    pages = torch.randn(10, page // r, i, generator=g).to(dtype)  # the cache's idx_entries of one layer
    tables = torch.stack([torch.randperm(10, generator=g)[:4] for _ in range(b)])  # [B, 4 pages]
    q, w = torch.randn(b, h, i, generator=g), torch.randn(b, h, generator=g)
    vis = torch.tensor([3, 11, 16])  # fewer than k, more than k, all entries of the 4 pages
    e = torch.arange(16)
    keys = pages[tables.gather(1, (e * r // page)[None].expand(b, -1)), (e * r % page) // r]  # [B, 16, I]
    want = ind.select(q[:, None], w[:, None], keys.float(), vis[:, None])[:, 0]
    got = kernels.indexer_topk(q, w, pages, tables, r, vis, want.shape[1])
    assert got.shape == want.shape
    for row_got, row_want in zip(got.tolist(), want.tolist()):
        assert sorted(row_got) == sorted(row_want)  # same picks (the order only changes a summation order)
    assert got[0, 3:].tolist() == [-1, -1]


def test_native_model_refuses_autograd_and_qat_clearly():
    cfg = make_tiny_config()
    model = random_model(cfg).use_native_kernels()
    with pytest.raises(RuntimeError, match="inference-only"):
        model(torch.zeros(1, 4, dtype=torch.long))
    from dsv4.model.transformer import Transformer

    qat = Transformer(cfg, dtype=torch.float32, qat_sim=True).init_weights(0)
    with pytest.raises(ValueError, match="QAT"):
        qat.use_native_kernels()


def test_argmax_rows_is_torch_max_indices():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 1000, generator=g)
    x[1, 7] = x[1, 900] = 50.0  # ties: the first one
    x[2, 3] = float("nan")  # a NaN wins, like torch.max
    x[3] = 0.0
    assert kernels.argmax_rows(x).tolist() == x.max(dim=-1).indices.tolist()


def test_engine_runs_the_native_path_on_a_bf16_kv_cache():
    """LLM(kv_cache_dtype="bfloat16") on the native path: a bf16 cache (half the fp32 bytes), and the greedy tokens
    of the PyTorch path on the same bf16 cache."""
    from dsv4.engine.llm import LLM
    from dsv4.engine.sampling import SamplingParams

    cfg = make_tiny_config()
    ref = random_model(cfg)
    native = copy.deepcopy(ref).use_native_kernels()
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=torch.Generator().manual_seed(n)).tolist()
               for n in (5, 23)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    opts = dict(page_size=16, max_num_seqs=2, cache_memory_gb=0.02, kv_cache_dtype="bfloat16")
    got = LLM(native, native_kernels=True, **opts)
    assert got.engine.cache.window[0].dtype == torch.bfloat16 and got.engine.cache.entries[1].dtype == torch.bfloat16
    want = LLM(ref, native_kernels=False, **opts)
    assert ([o.outputs[0].token_ids for o in got.generate(prompts, params)]
            == [o.outputs[0].token_ids for o in want.generate(prompts, params)])


@pytest.mark.parametrize("act", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
def test_attention_in_and_out_match_the_pytorch_lines(wdtype, act):
    """kernels.attention_in / attention_out == Attention.forward's projection lines (fp32 computation of the same
    stored weights and bf16-valued activations), 7 tokens."""
    from dsv4.model.attention import Attention
    from dsv4.model.norm import rms_unweighted
    from dsv4.model.rope import apply_rope

    cfg = make_tiny_config()
    attn = random_model(cfg, dtype=wdtype).layers[1].attn
    assert isinstance(attn, Attention)
    ref = copy.deepcopy(attn).float()
    g = torch.Generator().manual_seed(8)
    x = torch.randn(7, cfg.dim, generator=g).to(act).float()
    cos, sin = attn.rotary.cos_sin(torch.arange(100, 107))
    h, c = attn.n_heads, attn.head_dim
    with torch.no_grad():
        qr = ref.q_norm(ref.wq_a(x))
        q = apply_rope(rms_unweighted(ref.wq_b(qr).unflatten(-1, (h, c)), ref.eps), cos[:, None], sin[:, None])
        kv = apply_rope(ref.kv_norm(ref.wkv(x)), cos, sin)
        got = kernels.attention_in(x.to(act), attn.wq_a.weight, attn.q_norm.weight, attn.wq_b.weight, h,
                                   attn.wkv.weight, attn.kv_norm.weight, cos, sin, attn.eps)
        for a, b in zip(got, (qr, q, kv)):
            close(a, b)
        o = torch.randn(7, h, c, generator=g).to(act).float()
        oo = apply_rope(o, cos[:, None], sin[:, None], inverse=True).reshape(7, attn.n_groups, -1)
        wo_a = ref.wo_a.weight.view(attn.n_groups, attn.o_lora_rank, -1)
        want = ref.wo_b(torch.einsum("ngd,grd->ngr", oo, wo_a).flatten(1))
        close(kernels.attention_out(o.to(act), cos, sin, attn.wo_a.weight, attn.n_groups, attn.wo_b.weight), want)


@pytest.mark.parametrize("pages_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ratio", [4, 16])  # CSA (overlapping blocks) and HCA
def test_compress_decode_matches_the_pytorch_compressor(ratio, pages_dtype):
    """kernels.compress_decode (Compressor.decode_native) == Compressor.project + group_entries for decode steps:
    the same tail state (fp32) and the same entry pages (fp32, or bf16 rounded once: at most one bf16 step apart)."""
    from dsv4.model.batch import BatchPlan
    from dsv4.model.compressor import Compressor
    from dsv4.model.rope import Rotary

    cfg = make_tiny_config()
    comp = Compressor(cfg.dim, cfg.head_dim, ratio, cfg.rms_norm_eps)
    g = torch.Generator().manual_seed(ratio)
    with torch.no_grad():
        for p in comp.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
    rotary = Rotary.for_ratio(cfg, ratio)
    page, n_pages, b = 16, 8, 2
    tables = torch.tensor([[5, 1, 6, 2], [0, 7, 3, 4]])  # [B, 4 pages]
    coff = 2 if comp.overlap else 1  # the cache's tail state: [slots, (kv, z), coff * r rows, coff * c]
    state = torch.zeros(3, 2, coff * ratio, coff * cfg.head_dim)
    pages = torch.zeros(n_pages, page // ratio, cfg.head_dim, dtype=pages_dtype)
    ref_state, ref_pages = state.clone(), pages.clone()
    for pos in range(2 * ratio + 3):  # several blocks complete (and, for CSA, overlap the previous one)
        batch = ForwardBatch.from_sequences([[1], [2]], start_pos=[pos, pos], slots=[2, 0], block_tables=tables)
        grp = BatchPlan(batch, torch.device("cpu"), True).groups[0]
        x = torch.randn(b, cfg.dim, generator=g)
        with torch.no_grad():
            comp.decode_native(x, grp, rotary, state, pages)
            kv, z = comp.project(x, batch.positions)
            comp.group_entries(kv, z, grp, rotary, x.dtype, None, ref_state, ref_pages, page, read=False)
        close(state, ref_state)
        if pages_dtype == torch.float32:
            close(pages, ref_pages)
        else:  # the fp32 entries differ in their last bits; rounded to bf16 they agree up to one step
            diff = (pages.float() - ref_pages.float()).abs()
            assert (diff <= ref_pages.float().abs() * 2 ** -7 + 1e-30).all()
            assert (diff == 0).float().mean() > 0.95  # rounded to nearest like .to(bfloat16), not truncated
    assert pages.float().abs().sum() > 0  # entries were written
