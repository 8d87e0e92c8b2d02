"""The native CPU kernels (dsv4/kernels) called directly, against the op references they implement (dsv4/ops/
reference.py), and the model on the native backend against the model on the reference ops. They run wherever the
kernels build (a C compiler and AVX-512 or AVX2), every test once per ISA build this CPU executes (the test id says
which: [avx512] / [avx2]; the others are skipped with the reason; the session summary counts both,
tests/model/conftest.py). Per-op tests at V4-Flash shapes: tests/ops."""

from __future__ import annotations

import copy
import gc
import os
import subprocess
import sys
import weakref

import pytest
import torch
import torch.nn.functional as F

from dsv4 import kernels, ops
from dsv4.kernels import build
from dsv4.model.batch import ForwardBatch
from dsv4.model.cache import KVCache
from dsv4.model.moe import MoE
from dsv4.model.norm import RMSNorm
from dsv4.ops import reference as ref
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
    many = torch.randn(100, k, generator=g).to(act)  # 64+ rows: torch's BLAS (bf16 widened in chunks) or micro-kernels
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
    x = (torch.randn(tokens, cfg.dim) * 3).to(act)  # large enough that the SwiGLU clamp bites
    with torch.no_grad():
        w, ids = moe.gate(x.float(), None)
    stacks = [torch.stack([getattr(e, n).weight.detach() for e in moe.experts]) for n in ("w1", "w3", "w2")]
    sh = moe.shared_experts
    shared = [sh.w1.weight, sh.w3.weight, sh.w2.weight]
    out = kernels.moe(x, ids, w, *stacks, shared, cfg.swiglu_limit)
    want = ref.routed_experts(x.float(), ids, w, *[t.float() for t in stacks], [],
                              [t.float() for t in shared], [], cfg.swiglu_limit)
    assert out.dtype == torch.float32
    close(out, want)
    with pytest.raises(ValueError, match="expert ids"):
        kernels.moe(x, torch.full_like(ids, cfg.n_routed_experts), w, *stacks, shared, cfg.swiglu_limit)


def test_moe_reads_replaced_weights():
    """Weights swapped in the module (load_state_dict(assign=True)) are the ones the native kernel reads, although
    it caches the experts' pointer arrays (kernels._moe_arrays): the old weights are still alive here (``keep``), so
    only a key on the current tensors' addresses can tell the sets apart."""
    cfg = make_tiny_config(num_hash_layers=0)
    model = random_model(cfg)
    other = random_model(cfg, seed=5)
    keep = dict(model.state_dict(keep_vars=True))  # the old Parameter objects themselves
    ids = torch.randint(0, cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(ids)  # the native path has run (and cached pointers) on the old weights
        model.load_state_dict(copy.deepcopy(other.state_dict()), assign=True)
        got = model(ids)
        with ops.use_backend("cpu", "reference"):
            close(got, other(ids), rel=1e-4)
    assert keep["layers.0.ffn.experts.0.w1.weight"].data_ptr() != model.layers[0].ffn.experts[0].w1.weight.data_ptr()


def test_moe_pointer_cache_follows_swapped_tensors_and_keeps_no_old_weights():
    """kernels.moe after the expert blocks changed under it: a new block, a ``block.data = ...`` swap (same tensor
    object, new storage) and an in-place copy all compute with the current values, and the cache holds no reference
    to replaced weights (they are freed)."""
    cfg = make_tiny_config(num_hash_layers=0)
    g = torch.Generator().manual_seed(3)
    e, f, d = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.dim
    blocks = [torch.randn(e, f, d, generator=g) * 0.3, torch.randn(e, f, d, generator=g) * 0.3,
              torch.randn(e, d, f, generator=g) * 0.3]
    shared = [torch.randn(f, d, generator=g) * 0.3, torch.randn(f, d, generator=g) * 0.3,
              torch.randn(d, f, generator=g) * 0.3]
    x = torch.randn(5, d, generator=g)
    ids = torch.stack([torch.randperm(e, generator=g)[:cfg.num_experts_per_tok] for _ in range(5)])
    w = torch.rand(5, cfg.num_experts_per_tok, generator=g)

    def both():
        return (kernels.moe(x, ids, w, *blocks, shared, cfg.swiglu_limit),
                ref.routed_experts(x, ids, w, *blocks, [], shared, [], cfg.swiglu_limit))

    close(*both())
    old_w2 = blocks[2]  # kept alive (and unchanged): stale pointers would read it
    blocks[2] = torch.randn_like(old_w2)
    close(*both())
    old = weakref.ref(old_w2)
    del old_w2
    gc.collect()
    assert old() is None  # the cache kept no reference to the replaced block
    old_data = blocks[0].data  # noqa: F841 (kept alive, as above)
    blocks[0].data = torch.randn_like(blocks[0])  # same object, new storage: new address, new key
    close(*both())
    with torch.no_grad():
        shared[1].mul_(-2)  # in place: same pointers, new values (read at every call)
        blocks[1][2].mul_(-2)
    close(*both())


def test_moe_module_follows_replaced_expert_weights():
    """The MoE passes its experts' stacked block to the op while every expert's tensor views it, and notices when
    they stop doing so: a new Parameter on one expert (what assign=True does), ``.data`` swaps of the first and the
    last expert, ``.to()``; in-place updates need no notice. Each time the output equals the experts computed one
    by one from their current weights."""
    cfg = make_tiny_config(num_hash_layers=0)
    moe = MoE(cfg, 1, torch.float32)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(7, cfg.dim)

    def check():
        with torch.no_grad():
            w, ids = moe.gate(x, None)
            want = torch.zeros(7, cfg.dim)
            for t in range(7):
                for j in range(ids.shape[1]):
                    want[t] += moe.experts[int(ids[t, j])](x[t:t + 1], w[t, j:j + 1])[0]
            want += moe.shared_experts(x)
            close(moe(x, None), want)

    moe.stack_experts()
    with torch.no_grad():
        block = moe.expert_weights()[0]
    assert moe.experts[3].w1.weight.data_ptr() == block[3].data_ptr()  # a view of the block
    assert moe.expert_weights()[0].data_ptr() != block.data_ptr()  # gradients wanted: stacked copies
    check()
    moe.experts[3].w2.weight = torch.nn.Parameter(torch.randn_like(moe.experts[3].w2.weight))
    check()
    assert moe._stacks is None  # no longer one block: stacked per call
    moe.stack_experts()
    check()
    for i in (0, -1):
        moe.experts[i].w3.weight.data = torch.randn_like(moe.experts[i].w3.weight)
        check()
        moe.stack_experts()
    with torch.no_grad():
        moe.experts[2].w1.weight.mul_(-1)
    check()
    moe.to(torch.float64).to(torch.float32)
    check()


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
        y, post, comb = ref.hc_pre(x, fn, base, scale, norm.weight, cfg.hc_sinkhorn_iters, cfg.hc_eps,
                                   cfg.rms_norm_eps, norm.eps)
        ny, npost, ncomb = kernels.hc_pre(x.to(act), fn, base, scale, cfg.hc_sinkhorn_iters, cfg.hc_eps,
                                          cfg.rms_norm_eps, norm.weight, norm.eps)
        close(ny, y)
    close(npost, post)
    close(ncomb, comb)
    f = torch.randn(tokens, d, generator=g).to(act).float()
    close(kernels.hc_post(f.to(act), x.to(act), post, comb), ref.hc_post(f, x, post, comb))
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


def _cached_logits(model, cfg, seq: list[int], cache_dtype: torch.dtype, backend: str = "native") -> torch.Tensor:
    """Prefill 20 tokens, then decode one at a time through a KVCache of ``cache_dtype`` -> logits [len(seq), V]."""
    cache = KVCache(cfg, num_slots=1, num_pages=4, page_size=16, dtype=cache_dtype)
    rows = []
    with torch.no_grad(), ops.use_backend("cpu", backend):
        for a, b in [(0, 20)] + [(i, i + 1) for i in range(20, len(seq))]:
            batch = ForwardBatch(input_ids=torch.tensor(seq[a:b]), positions=torch.arange(a, b), start_pos=[a],
                                 seq_lens=[b - a], slots=[0], block_tables=torch.arange(4)[None],
                                 logits_indices=torch.arange(b - a))
            rows.append(model.forward_batch(batch, cache).logits)
    return torch.cat(rows)


def test_native_incremental_decode_equals_full_forward():
    """Prefill 20 tokens then decode one at a time through the cache == the cache-free forward (native backend)."""
    cfg = make_tiny_config()
    model = random_model(cfg)
    seq = torch.randint(0, cfg.vocab_size, (36,), generator=torch.Generator().manual_seed(2)).tolist()
    with torch.no_grad():
        full = model(torch.tensor([seq]))[0]
    close(_cached_logits(model, cfg, seq, torch.float32), full, rel=1e-4)


def test_native_decode_with_a_bf16_cache_matches_the_reference(monkeypatch):
    """A bf16 KV cache reaches the native kernels (ring, entries and indexer keys read in place as bf16: the kernels
    are called, no fallback) and gives the reference backend's logits with the same bf16 cache; it differs from the
    fp32 cache's (so the cache was bf16 indeed)."""
    cfg = make_tiny_config()
    model = random_model(cfg)
    seq = torch.randint(0, cfg.vocab_size, (36,), generator=torch.Generator().manual_seed(5)).tolist()
    seen: list[tuple[str, torch.dtype]] = []
    cache_arg = {"chunk_attention": lambda keys, rest: rest[1], "indexer_topk": lambda keys, rest: keys,
                 "compress_decode": lambda keys, rest: rest[10]}  # the ring / the indexer keys / the entry pages
    for name, arg in cache_arg.items():
        fn = getattr(kernels, name)

        def spy(q, w, keys, *rest, _fn=fn, _name=name, _arg=arg):
            seen.append((_name, _arg(keys, rest).dtype))
            return _fn(q, w, keys, *rest)

        monkeypatch.setattr(kernels, name, spy)
    got = _cached_logits(model, cfg, seq, torch.bfloat16)
    assert {(name, torch.bfloat16) for name in cache_arg} <= set(seen)
    close(got, _cached_logits(model, cfg, seq, torch.bfloat16, backend="reference"), rel=1e-3)
    assert (got - _cached_logits(model, cfg, seq, torch.float32)).abs().max() > 0


def test_engine_runs_the_native_backend_on_a_bf16_kv_cache():
    """LLM(kv_cache_dtype="bfloat16") on the native backend: a bf16 cache (half the fp32 bytes), and the greedy
    tokens of the reference backend on the same bf16 cache."""
    from dsv4.engine.llm import LLM
    from dsv4.engine.sampling import SamplingParams

    cfg = make_tiny_config()
    model = random_model(cfg)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=torch.Generator().manual_seed(n)).tolist()
               for n in (5, 23)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    opts = dict(page_size=16, max_num_seqs=2, cache_memory_gb=0.02, kv_cache_dtype="bfloat16")
    got = LLM(model, backend="native", **opts)
    assert got.engine.cache.window[0].dtype == torch.bfloat16 and got.engine.cache.entries[1].dtype == torch.bfloat16
    want = LLM(model, backend="reference", **opts)
    assert ([o.outputs[0].token_ids for o in got.generate(prompts, params)]
            == [o.outputs[0].token_ids for o in want.generate(prompts, params)])


def test_chunk_attention_refuses_an_fp16_cache_clearly():
    q, kv = torch.randn(1, 1, 2, 16), torch.randn(1, 1, 16)
    with pytest.raises(ValueError, match="fp32 or bf16"):
        kernels.chunk_attention(q, kv, torch.tensor([4]), torch.tensor([1]), torch.zeros(1, 8, 16, dtype=torch.half),
                                torch.tensor([0]), None, None, torch.zeros(2), 0.25)


@pytest.mark.parametrize("act", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
def test_attention_in_and_out_match_the_reference(wdtype, act):
    """kernels.attention_in / attention_out == the ops' references (fp32 computation of the same stored weights and
    bf16-valued activations), 7 tokens."""
    cfg = make_tiny_config()
    attn = random_model(cfg, dtype=wdtype).layers[1].attn
    g = torch.Generator().manual_seed(8)
    x = torch.randn(7, cfg.dim, generator=g).to(act).float()
    cos, sin = attn.rotary.cos_sin(torch.arange(100, 107))
    h, c = attn.n_heads, attn.head_dim
    fl = {n: getattr(attn, n).weight.float() for n in ("wq_a", "wq_b", "wkv", "wo_a", "wo_b")}
    with torch.no_grad():
        want = ref.attention_in(x, fl["wq_a"], None, attn.q_norm.weight.float(), fl["wq_b"], None, fl["wkv"], None,
                                attn.kv_norm.weight.float(), cos, sin, h, attn.eps)
        got = kernels.attention_in(x.to(act), attn.wq_a.weight, attn.q_norm.weight, attn.wq_b.weight, h,
                                   attn.wkv.weight, attn.kv_norm.weight, cos, sin, attn.eps)
        for a, b in zip(got, want):
            close(a, b)
        o = torch.randn(7, h, c, generator=g).to(act).float()
        want = ref.attention_out(o, cos, sin, fl["wo_a"], None, attn.n_groups, fl["wo_b"], None)
        close(kernels.attention_out(o.to(act), cos, sin, attn.wo_a.weight, attn.n_groups, attn.wo_b.weight), want)


@pytest.mark.parametrize("isa", [None], indirect=True)  # a subprocess without kernels: no ISA build involved
def test_unavailable_kernels_say_why_and_the_ops_fall_back_to_the_reference(isa):
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_indexer_topk_matches_select_reading_keys_from_pages(dtype):
    """kernels.indexer_topk (keys read in place through the block table, fp32 or bf16) picks what the op's
    reference picks."""
    cfg = make_tiny_config(index_topk=5)
    g = torch.Generator().manual_seed(3)
    b, h, i, r, page = 3, cfg.index_n_heads, cfg.index_head_dim, 4, 16
    pages = torch.randn(10, page // r, i, generator=g).to(dtype)  # the cache's idx_entries of one layer
    tables = torch.stack([torch.randperm(10, generator=g)[:4] for _ in range(b)])  # [B, 4 pages]
    q, w = torch.randn(b, h, i, generator=g), torch.randn(b, h, generator=g)
    vis = torch.tensor([3, 11, 16])  # fewer than k, more than k, all entries of the 4 pages
    want = ref.indexer_topk(q[:, None], w[:, None], pages, tables, r, vis[:, None], 16, 5)[:, 0]
    got = kernels.indexer_topk(q[:, None], w[:, None], pages, tables, r, vis[:, None], want.shape[1])[:, 0]
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
