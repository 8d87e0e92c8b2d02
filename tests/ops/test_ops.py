"""Each op x each CPU backend against the op's reference (dsv4/ops/reference.py), at V4-Flash shapes (64 heads x 512,
dim 4096, 256 experts top-6 of 2048, window 128, 64 indexer heads x 128 with top-512, thousands of compressed entries;
few tokens) and at edge shapes; the references against naive dense formulas; the tie rule with exact ties;
torch.library.opcheck. The `backend` fixture (conftest.py) skips "native", with the reason, where the kernels do not
load; pytest's header says which backends ran."""

from __future__ import annotations

import pytest
import torch

from dsv4 import ops
from dsv4.ops import reference as ref

# V4-Flash (shared/reference/configs/v4-flash/config.json)
D, H, C, R, QL, G, OL = 4096, 64, 512, 64, 1024, 8, 1024
HI, I, TOPK = 64, 128, 512
E, F, K, W, M = 256, 2048, 6, 128, 4
PAGE = 128  # tokens per page: 32 CSA rows, 1 HCA row


def run(backend: str, op, *args):
    with torch.no_grad(), ops.use_backend("cpu", backend):
        return op(*args)


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 2e-5) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    err = (a.float() - b.float()).abs().max().item() if a.numel() else 0.0
    assert err <= rel * max(1.0, b.float().abs().max().item()), f"max abs diff {err}"


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def cos_sin(t: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    ang = torch.rand(t, R // 2, generator=g) * 6.3
    return ang.cos(), ang.sin()


# ------------------------------------------------------------------------------------------------ linear
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
def test_linear(backend, wdtype):
    g = gen(1)
    w = (torch.randn(H * C, QL, generator=g) * QL ** -0.5).to(wdtype)  # wq_b [32768, 1024]
    for shape in [(3, QL), (1, QL), (2, 3, QL)]:
        x = torch.randn(*shape, generator=g)
        close(run(backend, ops.linear, x, w, None), ref.linear(x, w, None))


def test_linear_unhandled_dtypes_say_so(backend):
    x = torch.randn(2, 64)
    with pytest.raises(TypeError, match=r"dsv4::linear.*float8_e4m3fn"):
        run(backend, ops.linear, x, torch.randn(8, 64).to(torch.float8_e4m3fn), None)
    with pytest.raises(TypeError, match="with a scale"):
        run(backend, ops.linear, x, torch.randn(8, 64), torch.ones(1, 1))


# ------------------------------------------------------------------------------------------------ experts
def _aliased(g: torch.Generator, rows: int, cols: int, dtype) -> torch.Tensor:
    """[E, rows, cols] experts that are distinct, overlapping windows of one random buffer (expert e starts
    e * (cols + 1) elements in): the op takes one tensor per weight kind and does not care, and the test stays at
    tens of MB instead of 12 GB."""
    shift = cols + 1
    buf = (torch.randn(rows * cols + (E - 1) * shift, generator=g) * cols ** -0.5).to(dtype)
    return buf.as_strided((E, rows, cols), (shift, cols, 1))


def _experts(g: torch.Generator, dtype=torch.bfloat16):
    """256 experts at full width (w1, w3 [E, F, D], w2 [E, D, F]) and the shared expert's weights."""
    w1, w3, w2 = _aliased(g, F, D, dtype), _aliased(g, F, D, dtype), _aliased(g, D, F, dtype)
    shared = [(torch.randn(f, d, generator=g) * d ** -0.5).to(dtype) for f, d in ((F, D), (F, D), (D, F))]
    return w1, w3, w2, shared


def test_routed_experts(backend):
    g = gen(2)
    w1, w3, w2, shared = _experts(g)
    x = torch.randn(3, D, generator=g) * 3  # large enough that the SwiGLU clamp bites
    scores = torch.rand(3, E, generator=g)
    wts, ids = ref.topk_lowest(scores, K)
    wts = wts / wts.sum(-1, keepdim=True) * 1.5
    cases = [(x, ids, wts, shared), (x[:1], ids[:1], wts[:1], shared),  # one token (decode)
             (x, torch.full_like(ids, 17) + torch.arange(K), wts, []),  # every token on the same experts, no shared
             (x, ids, wts, shared)]
    for xx, ii, ww, sh in cases:
        want = ref.routed_experts(xx, ii, ww, w1, w3, w2, [], sh, [], 10.0)
        close(run(backend, ops.routed_experts, xx, ii, ww, w1, w3, w2, [], sh, [], 10.0), want)
    with pytest.raises(ValueError, match="expert ids"):
        run(backend, ops.routed_experts, x, torch.full_like(ids, E), wts, w1, w3, w2, [], shared, [], 10.0)


# ------------------------------------------------------------------------------------------------ mHC
@pytest.mark.parametrize("t", [1, 5])
def test_hc_pre_and_post(backend, t):
    g = gen(3 + t)
    x = torch.randn(t, M, D, generator=g)
    fn = torch.randn((2 + M) * M, M * D, generator=g) * 0.01
    base, scale = torch.randn((2 + M) * M, generator=g) * 0.3, 1 + 0.2 * torch.randn(3, generator=g)
    nw = 1 + 0.1 * torch.randn(D, generator=g)
    args = (x, fn, base, scale, nw, 20, 1e-6, 1e-6, 1e-6)
    got, want = run(backend, ops.hc_pre, *args), ref.hc_pre(*args)
    for a, b in zip(got, want):
        close(a, b, rel=1e-4)  # 20 Sinkhorn iterations amplify the summation-order differences a little
    f = torch.randn(t, D, generator=g)
    close(run(backend, ops.hc_post, f, x, want[1], want[2]), ref.hc_post(f, x, want[1], want[2]))


# ------------------------------------------------------------------------------------------------ attention in/out
def test_attention_in_and_out(backend):
    g = gen(4)
    t = 3
    x = torch.randn(t, D, generator=g)
    wq_a = (torch.randn(QL, D, generator=g) * D ** -0.5).bfloat16()
    wq_b = (torch.randn(H * C, QL, generator=g) * QL ** -0.5).bfloat16()
    wkv = (torch.randn(C, D, generator=g) * D ** -0.5).bfloat16()
    qn, kvn = 1 + 0.1 * torch.randn(QL, generator=g), 1 + 0.1 * torch.randn(C, generator=g)
    cos, sin = cos_sin(t, g)
    args = (x, wq_a, None, qn, wq_b, None, wkv, None, kvn, cos, sin, H, 1e-6)
    for a, b in zip(run(backend, ops.attention_in, *args), ref.attention_in(*args)):
        close(a, b, rel=1e-4)
    o = torch.randn(t, H, C, generator=g)
    wo_a = (torch.randn(G * OL, H * C // G, generator=g) * (H * C // G) ** -0.5).bfloat16()
    wo_b = (torch.randn(D, G * OL, generator=g) * (G * OL) ** -0.5).bfloat16()
    args = (o, cos, sin, wo_a, None, G, wo_b, None)
    close(run(backend, ops.attention_out, *args), ref.attention_out(*args), rel=1e-4)


# ------------------------------------------------------------------------------------------------ sparse attention
def _paged(g: torch.Generator, n_entries: int, ratio: int, b: int, dim: int):
    """Entries of b sequences in shuffled pages: (pages [R, PAGE // ratio, dim], block_tables [b, pages each])."""
    rows = PAGE // ratio
    per_seq = -(-n_entries // rows)
    pages = torch.randn(b * per_seq + 1, rows, dim, generator=g)
    tables = torch.randperm(b * per_seq + 1, generator=g)[: b * per_seq].view(b, per_seq)
    return pages, tables


def _attn_case(g: torch.Generator, kind: str, s: int = 3):
    """Two sequences deep in a long context: one chunk of s tokens and one decode token (padded to s)."""
    b = 2
    ratio = {"swa": 0, "csa": 4, "hca": 128}[kind]
    depth = {"swa": 1000, "csa": 4 * 4000, "hca": 128 * 2300}[kind]  # thousands of entries
    start = torch.tensor([depth, depth // 3])
    lens = torch.tensor([s, 1])
    q = torch.randn(b, s, H, C, generator=g)
    kv = torch.randn(b, s, C, generator=g)
    ring = torch.randn(3, W, C, generator=g)
    slots = torch.tensor([2, 0])
    sink = torch.randn(H, generator=g)
    entries = tables = topk = None
    n_entries = 0
    if ratio:
        n_entries = int(((start + lens) // ratio).max())
        entries, tables = _paged(g, n_entries, ratio, b, C)
    if kind == "csa":
        vis = (start[:, None] + torch.arange(s) + 1) // ratio  # [B, S]
        topk = (torch.rand(b, s, TOPK, generator=g) * vis[..., None]).long()
        topk[:, :, -7:] = -1  # some queries pick fewer
    return (q, kv, start, lens, ring, slots, entries, tables, ratio, n_entries, topk, sink, C ** -0.5)


@pytest.mark.parametrize("kind", ["swa", "csa", "hca"])
def test_sparse_attention(backend, kind):
    args = _attn_case(gen(5), kind)
    got, want = run(backend, ops.sparse_attention, *args), ref.sparse_attention(*args)
    close(got, want, rel=1e-4)
    assert want[1, 1:].abs().max() == 0  # padding rows are zeros


def _naive_attention(q, kv, start, lens, ring, slots, entries, tables, ratio, n_entries, topk, sink, scale):
    """Per query, by the definition: the window keys by position, then the compressed entries it may read."""
    b, s, h, c = q.shape
    w = ring.shape[1]
    out = torch.zeros_like(q)
    for bi in range(b):
        for si in range(int(lens[bi])):
            p = int(start[bi]) + si
            keys = []
            for kp in range(max(0, p - w + 1), p + 1):
                keys.append(kv[bi, kp - int(start[bi])] if kp >= start[bi] else ring[slots[bi], kp % w])
            if entries is not None and n_entries:
                ids = [i for i in topk[bi, si].tolist() if i >= 0] if topk is not None else range((p + 1) // ratio)
                rows = entries.shape[1]
                for i in ids:
                    keys.append(entries[tables[bi, i * ratio // (rows * ratio)], (i * ratio % (rows * ratio)) // ratio])
            kk = torch.stack(keys)  # [K, c]
            logits = torch.cat([q[bi, si] @ kk.t() * scale, sink[:, None]], dim=-1)  # [H, K+1]
            out[bi, si] = torch.softmax(logits, -1)[:, :-1] @ kk
    return out


@pytest.mark.parametrize("kind", ["swa", "csa", "hca"])
def test_sparse_attention_reference_is_the_definition(kind, monkeypatch):
    """The bounded reference (query blocks, paged gathers) equals the per-query definition, with blocks of 2."""
    g = gen(6)
    b, s, h, c, ratio = 2, 9, 2, 16, {"swa": 0, "csa": 4, "hca": 8}[kind]
    start, lens = torch.tensor([13, 0]), torch.tensor([9, 6])
    ring, slots = torch.randn(2, 8, c, generator=g), torch.tensor([1, 0])
    q, kv, sink = torch.randn(b, s, h, c, generator=g), torch.randn(b, s, c, generator=g), torch.randn(h, generator=g)
    entries = tables = topk = None
    n = 0
    if ratio:
        n = int(((start + lens) // ratio).max())
        rows = 16 // ratio
        entries = torch.randn(8, rows, c, generator=g)
        tables = torch.tensor([[5, 2, 7, 0], [1, 3, 4, 6]])[:, : -(-n // rows)]
    if kind == "csa":
        vis = ((start[:, None] + torch.arange(s) + 1) // ratio).clamp(min=1)
        topk = (torch.rand(b, s, 3, generator=g) * vis[..., None]).long()
        topk[0, 0, 2] = -1
    args = (q, kv, start, lens, ring, slots, entries, tables, ratio, n, topk, sink, 0.3)
    monkeypatch.setattr(ref, "BLOCK_ELEMS", 2 * h * (2 * 8 + 16))  # 2 queries per block
    close(ref.sparse_attention(*args), _naive_attention(*args), rel=1e-5)


# ------------------------------------------------------------------------------------------------ indexer
def _scores(q, w, keys, tables, ratio, n):
    """Dense fp64 index scores [B, S, n] by the definition (for checking picks, not for the op)."""
    rows = keys.shape[1]
    i = torch.arange(n)
    kk = keys[tables[:, i * ratio // (rows * ratio)], (i * ratio % (rows * ratio)) // ratio].double()  # [B, n, I]
    sc = torch.einsum("bshi,bni->bshn", q.double(), kk).relu()
    return (sc * w.double()[..., None]).sum(2)


@pytest.mark.parametrize("s", [1, 3, 16])  # decode queries, and prefill chunks (one kernel row per query)
def test_indexer_topk(backend, s):
    g = gen(7)
    b, n = 2, 4096
    keys, tables = _paged(g, n, 4, b, I)
    q, w = torch.randn(b, s, HI, I, generator=g), torch.randn(b, s, HI, generator=g)
    # all 4096 entries, or causally fewer for the earlier queries of a chunk / fewer than k visible
    vis = torch.stack([n - s + 1 + torch.arange(s), torch.full((s,), 300)])
    args = (q, w, keys, tables, 4, vis, n, TOPK)
    got, want = run(backend, ops.indexer_topk, *args), ref.indexer_topk(*args)
    assert got.shape == want.shape == (b, s, TOPK)
    assert (got[1, :, 300:] == -1).all() and (got[1, :, :300] >= 0).all()
    sc = _scores(q, w, keys, tables, 4, n)
    for bi in range(b):
        for si in range(s):
            a, z = got[bi, si], want[bi, si]
            a, z = a[a >= 0], z[z >= 0]
            # the same picks up to summation order: their exact scores agree (a near-tie may swap at the cut)
            close(sc[bi, si, a].sort().values, sc[bi, si, z].sort().values, rel=1e-5)


def test_indexer_topk_two_threads_pick_what_one_picks(backend):
    """Both thread splits of the native kernel (many queries: the threads take queries; few: they share each
    query's entries) score every entry on one thread, so the picks equal the one-thread picks exactly."""
    g = gen(9)
    b, n = 2, 2048
    keys, tables = _paged(g, n, 4, b, I)
    before = torch.get_num_threads()
    try:
        for s in (1, 16):  # 2 queries (< 2 x threads) and 32
            q, w = torch.randn(b, s, HI, I, generator=g), torch.randn(b, s, HI, generator=g)
            vis = torch.stack([n - s + 1 + torch.arange(s), torch.full((s,), 300)])
            picks = []
            for threads in (1, 2):
                torch.set_num_threads(threads)
                picks.append(run(backend, ops.indexer_topk, q, w, keys, tables, 4, vis, n, TOPK))
            assert torch.equal(picks[0], picks[1]), s
    finally:
        torch.set_num_threads(before)


def test_indexer_reference_chunks_equal_one_pass(monkeypatch):
    """Chunked scoring with a running top-k picks what one dense top-k picks (keys in 5 chunks)."""
    g = gen(8)
    b, s, n, k = 2, 3, 40, 6
    keys, tables = _paged(g, n, 4, b, 8)
    q, w = torch.randn(b, s, 2, 8, generator=g), torch.randn(b, s, 2, generator=g)
    vis = torch.tensor([[40, 40, 3], [20, 21, 22]])
    want = ref.indexer_topk(q, w, keys, tables, 4, vis, n, k)
    monkeypatch.setattr(ref, "BLOCK_ELEMS", 8 * 2 * 2)  # chunks of 8 keys, one query per block
    got = ref.indexer_topk(q, w, keys, tables, 4, vis, n, k)
    assert torch.equal(got, want)
    sc = _scores(q, w, keys, tables, 4, n).float()
    sc = sc.masked_fill(torch.arange(n) >= vis[..., None], float("-inf"))
    top = ref.topk_lowest(sc, k)[1]
    assert torch.equal(got, torch.where(top >= vis[..., None], -1, top))


# ------------------------------------------------------------------------------------------------ the tie rule
def test_exact_ties_go_to_the_lowest_index(backend):
    """Indexer: 64 entries score exactly the same (identical keys) -> ids 0..k-1 in order, in every backend; with
    one better entry it comes first, then the lowest ids. Router top-k and argmax: the same rule."""
    b, n, k = 2, 64, 4
    keys = torch.ones(n // 32 + 1, 32, I)
    tables = torch.tensor([[0, 1], [1, 0]])
    q, w = torch.ones(b, 1, 16, I), torch.ones(b, 1, 16)
    vis = torch.tensor([[n], [n]])
    got = run(backend, ops.indexer_topk, q, w, keys, tables, 4, vis, n, k)
    assert got[:, 0].tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]]
    keys2 = keys.clone()
    keys2[1, 9] = 2.0  # entry 41 of sequence 0 (page 1 row 9), entry 9 of sequence 1
    got = run(backend, ops.indexer_topk, q, w, keys2, tables, 4, vis, n, k)
    assert got[:, 0].tolist() == [[41, 0, 1, 2], [9, 0, 1, 2]]
    assert ref.topk_lowest(torch.tensor([[1.0, 3.0, 3.0, 1.0, 3.0]]), 3)[1].tolist() == [[1, 2, 4]]
    x = torch.zeros(3, 1000)
    x[1, 7] = x[1, 900] = 5.0
    x[2, 3] = float("nan")
    assert run(backend, ops.argmax, x).tolist() == [0, 7, 3]


# ------------------------------------------------------------------------------------------------ compressor
def _compressor_case(g: torch.Generator, ratio: int, d: int = D, c: int = C, b: int = 4):
    overlap = ratio == 4
    cc = (2 if overlap else 1) * c
    x = torch.randn(b, d, generator=g)
    wkv, wgate = torch.randn(cc, d, generator=g) * d ** -0.5, torch.randn(cc, d, generator=g) * d ** -0.5
    ape, nw = torch.randn(ratio, cc, generator=g), 1 + 0.1 * torch.randn(c, generator=g)
    # completes a block / mid-block / the first block (CSA: no previous block) / deep in the context
    positions = torch.tensor([ratio - 1, 5 * ratio + 1, 2 * ratio - 1, 4000 * ratio - 1])[:b]
    cos, sin = cos_sin(b, g)
    cos, sin = cos[:, : min(R, c // 2) // 2], sin[:, : min(R, c // 2) // 2]  # rope dims <= c
    slots = torch.tensor([3, 0, 2, 1])[:b]
    state = torch.randn(5, 2, (2 if overlap else 1) * ratio, cc, generator=g)
    n = int((positions // ratio).max()) + 1
    pages, tables = _paged(g, n, ratio, b, c)
    return (x, wkv, wgate, ape, nw, 1e-6, cos, sin, positions, slots, tables, state, pages, ratio, overlap)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # weights and entry pages
@pytest.mark.parametrize("ratio", [4, 128])
def test_compressor_decode(backend, ratio, dtype):
    args = list(_compressor_case(gen(11), ratio))
    args[1], args[2], args[12] = args[1].to(dtype), args[2].to(dtype), args[12].to(dtype)
    want = list(args)
    want[11], want[12] = args[11].clone(), args[12].clone()
    ref.compressor_decode(*want)
    got = list(args)
    got[11], got[12] = args[11].clone(), args[12].clone()
    run(backend, ops.compressor_decode, *got)
    # the state a later step reads: everything but the tail row of a token that completed its block (dead: the
    # next block's tokens overwrite it before any read; the native kernel skips that write)
    pos, slots, off = args[8], args[9], ratio if ratio == 4 else 0
    live = torch.ones_like(want[11], dtype=torch.bool)
    done = (pos + 1) % ratio == 0
    live[slots[done], :, off + pos[done] % ratio] = False
    close(got[11][live], want[11][live])
    # entry pages: bf16 ones rounded once from fp32 entries that differ in their last bits (one bf16 step apart)
    close(got[12], want[12], rel=1e-4 if dtype == torch.float32 else 2 ** -7)
    assert not torch.equal(want[12], args[12])  # entries were written


def test_reference_decode_steps_equal_the_full_forward():
    """Prefill then decode through the cache on the reference ops == the cache-free forward (the reference
    compressor_decode against the general compressor path)."""
    from dsv4.model.batch import ForwardBatch
    from dsv4.model.cache import KVCache
    from tests.conftest import make_tiny_config, random_model

    cfg = make_tiny_config()
    model = random_model(cfg)
    seq = torch.randint(0, cfg.vocab_size, (40,), generator=gen(12)).tolist()
    cache = KVCache(cfg, num_slots=1, num_pages=4, page_size=16, dtype=torch.float32)
    rows = []
    with torch.no_grad(), ops.use_backend("cpu", "reference"):
        full = model(torch.tensor([seq]))[0]
        for a, b in [(0, 9)] + [(i, i + 1) for i in range(9, len(seq))]:
            batch = ForwardBatch(input_ids=torch.tensor(seq[a:b]), positions=torch.arange(a, b), start_pos=[a],
                                 seq_lens=[b - a], slots=[0], block_tables=torch.arange(4)[None],
                                 logits_indices=torch.arange(b - a))
            rows.append(model.forward_batch(batch, cache).logits)
    torch.testing.assert_close(torch.cat(rows), full, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------ autograd
def test_gradients_through_the_ops_equal_plain_autograd():
    """The registered backward (recomputation; linear's formula) gives plain autograd's gradients."""
    g = gen(9)
    x = torch.randn(5, M, 32, generator=g, requires_grad=True)
    fn = (torch.randn(24, M * 32, generator=g) * 0.1).requires_grad_()
    base, scale = torch.randn(24, generator=g).requires_grad_(), torch.ones(3).requires_grad_()
    nw = torch.ones(32, requires_grad=True)
    w = torch.randn(16, 32, generator=g, requires_grad=True)
    leaves = [x, fn, base, scale, nw, w]

    def loss(f_hc, f_lin):
        y, post, comb = f_hc(x, fn, base, scale, nw, 4, 1e-6, 1e-6, 1e-6)
        return (f_lin(y, w, None).square().sum() + post.sum() + (comb * torch.arange(16.).view(4, 4)).sum())

    want = torch.autograd.grad(loss(ref.hc_pre, ref.linear), leaves)
    with ops.use_backend("cpu", "reference"):
        got = torch.autograd.grad(loss(ops.hc_pre, ops.linear), leaves)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    # experts: the gradient reaches x, the routing weights and every expert weight that got a token
    xs = torch.randn(4, 32, generator=g, requires_grad=True)
    ws = torch.randn(3, 8, 32, generator=g, requires_grad=True)  # [E, F, D]: w1 and w3
    w2 = torch.randn(3, 32, 8, generator=g, requires_grad=True)
    ids, rw = torch.tensor([[0, 2], [2, 1], [0, 1], [2, 0]]), torch.rand(4, 2, generator=g).requires_grad_()
    args = (xs, ids, rw, ws, ws, w2, [], [], [], 10.0)
    want = torch.autograd.grad(ref.routed_experts(*args).sum(), [xs, rw, ws, w2])
    got = torch.autograd.grad(ops.routed_experts(*args).sum(), [xs, rw, ws, w2])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------------------------ opcheck
def _small_args() -> dict:
    g = gen(10)
    b, s, h, c = 2, 3, 2, 16
    pages, tables = torch.randn(4, 4, c, generator=g), torch.tensor([[0, 2], [1, 3]])
    cos, sin = cos_sin(3, g)
    cos, sin = cos[:, :4], sin[:, :4]
    w1 = torch.randn(3, 8, 16, generator=g)  # [E, F, D]
    w2 = torch.randn(3, 16, 8, generator=g)
    return {
        "linear": (torch.randn(3, 16, generator=g), torch.randn(8, 16, generator=g), None),
        "routed_experts": (torch.randn(3, 16, generator=g), torch.tensor([[0, 2], [1, 2], [0, 0]]),
                           torch.rand(3, 2, generator=g), w1, w1, w2, [], [w1[0], w1[1], w2[0]], [], 10.0),
        "hc_pre": (torch.randn(3, 2, 16, generator=g), torch.randn(8, 32, generator=g), torch.randn(8, generator=g),
                   torch.ones(3), torch.ones(16), 3, 1e-6, 1e-6, 1e-6),
        "hc_post": (torch.randn(3, 16, generator=g), torch.randn(3, 2, 16, generator=g), torch.rand(3, 2),
                    torch.rand(3, 2, 2)),
        "attention_in": (torch.randn(3, 16, generator=g), torch.randn(8, 16, generator=g), None, torch.ones(8),
                         torch.randn(2 * c, 8, generator=g), None, torch.randn(c, 16, generator=g), None,
                         torch.ones(c), cos, sin, 2, 1e-6),
        "attention_out": (torch.randn(3, h, c, generator=g), cos, sin, torch.randn(8, c, generator=g), None, 2,
                          torch.randn(16, 8, generator=g), None),
        "sparse_attention": (torch.randn(b, s, h, c, generator=g), torch.randn(b, s, c, generator=g),
                             torch.tensor([9, 0]), torch.tensor([3, 2]), torch.randn(2, 4, c, generator=g),
                             torch.tensor([1, 0]), pages, tables, 4, 3, torch.tensor([[[0, -1]] * 3, [[0, -1]] * 3]),
                             torch.randn(h, generator=g), 0.25),
        "indexer_topk": (torch.randn(b, s, 2, c, generator=g), torch.randn(b, s, 2, generator=g), pages, tables, 4,
                         torch.tensor([[3, 3, 3], [1, 1, 2]]), 3, 2),
        "argmax": (torch.randn(3, 50, generator=g),),
        "compressor_decode": _compressor_case(g, 4, d=16, c=8),
    }


_DIFFERENTIABLE = {"linear", "routed_experts", "hc_pre", "hc_post", "attention_in", "attention_out",
                   "sparse_attention"}


@pytest.mark.parametrize("name", sorted(ops.OPS))
def test_opcheck(backend, name):
    args = _small_args()[name]
    if name in _DIFFERENTIABLE:  # float tensor inputs require grad: checks the autograd registration too
        def grad(a):
            if isinstance(a, torch.Tensor) and a.is_floating_point():
                return a.clone().requires_grad_()
            if isinstance(a, list):
                return [grad(t) for t in a]
            return a
        args = tuple(grad(a) for a in args)
    with ops.use_backend("cpu", backend):
        torch.library.opcheck(ops.OPS[name], args)
