"""Incremental decoding through ForwardBatch + KVCache equals the pure full forward.

Covers: prefill then token-by-token decode at every position; chunked prefill with odd chunk sizes; a varlen batch
mixing sequences of different lengths (prefill chunks and decode tokens together) equals each sequence alone;
snapshot/restore of a slot at a page boundary reproduces the continuation (prefix caching); the decode step is
sparse (the CSA attention gathers only top-k entries).
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import make_tiny_config, random_model
from dsv4.model.batch import ForwardBatch
from dsv4.model.cache import KVCache

PAGE = 16  # multiple of the tiny config's ratios 4 and 16
ATOL = 1e-4


@pytest.fixture(scope="module")
def setup():
    cfg = make_tiny_config()
    model = random_model(cfg, seed=11)
    return cfg, model


def full_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens[None])[0]


def pages_for(seq_idx: int, max_len: int) -> list[int]:
    per = -(-max_len // PAGE)
    return list(range(seq_idx * per, (seq_idx + 1) * per))


def run_chunks(model, cache, slot: int, pages: list[int], tokens: torch.Tensor, chunks: list[int]) -> torch.Tensor:
    out, pos = [], 0
    for n in chunks:
        batch = ForwardBatch.from_sequences([tokens[pos:pos + n]], start_pos=[pos], slots=[slot],
                                            block_tables=torch.tensor([pages]))
        with torch.no_grad():
            out.append(model.forward_batch(batch, cache).logits)
        pos += n
    return torch.cat(out)


def test_prefill_then_decode_every_position(setup) -> None:
    cfg, model = setup
    s = 70
    tokens = torch.randint(0, cfg.vocab_size, (s,), generator=torch.Generator().manual_seed(0))
    want = full_logits(model, tokens)
    cache = KVCache(cfg, num_slots=2, num_pages=8, page_size=PAGE, dtype=torch.float32)
    got = run_chunks(model, cache, 1, pages_for(0, s), tokens, [9] + [1] * (s - 9))
    torch.testing.assert_close(got, want, atol=ATOL, rtol=ATOL)


def test_decode_from_first_token(setup) -> None:
    cfg, model = setup
    s = 40
    tokens = torch.randint(0, cfg.vocab_size, (s,), generator=torch.Generator().manual_seed(1))
    cache = KVCache(cfg, num_slots=1, num_pages=4, page_size=PAGE, dtype=torch.float32)
    got = run_chunks(model, cache, 0, pages_for(0, s), tokens, [1] * s)
    torch.testing.assert_close(got, full_logits(model, tokens), atol=ATOL, rtol=ATOL)


def test_chunked_prefill_odd_chunks(setup) -> None:
    cfg, model = setup
    chunks = [5, 3, 11, 1, 7, 2, 13, 1, 1, 9]
    s = sum(chunks)
    tokens = torch.randint(0, cfg.vocab_size, (s,), generator=torch.Generator().manual_seed(2))
    cache = KVCache(cfg, num_slots=1, num_pages=4, page_size=PAGE, dtype=torch.float32)
    got = run_chunks(model, cache, 0, pages_for(0, s), tokens, chunks)
    torch.testing.assert_close(got, full_logits(model, tokens), atol=ATOL, rtol=ATOL)


def test_varlen_batch_equals_each_alone(setup) -> None:
    cfg, model = setup
    lens = [37, 5, 21, 1, 50]
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, cfg.vocab_size, (n,), generator=g) for n in lens]
    with torch.no_grad():
        out = model.forward_batch(ForwardBatch.from_sequences(seqs), None)
    got = out.logits.split(lens)
    assert out.hidden.shape == (sum(lens), cfg.hc_mult, cfg.dim)
    for s, lg in zip(seqs, got):
        torch.testing.assert_close(lg, full_logits(model, s), atol=ATOL, rtol=ATOL)


def test_mixed_batch_with_cache(setup) -> None:
    """Steps where some sequences prefill a chunk while others decode, all in one varlen batch."""
    cfg, model = setup
    total = [30, 45, 20]
    g = torch.Generator().manual_seed(4)
    seqs = [torch.randint(0, cfg.vocab_size, (n,), generator=g) for n in total]
    # per-step chunk sizes of each sequence (0 = idle this step)
    plan = [[12, 1, 20], [1, 17, 0], [5, 1, 0], [1, 9, 0], [11, 1, 0], [0, 16, 0]]
    cache = KVCache(cfg, num_slots=3, num_pages=12, page_size=PAGE, dtype=torch.float32)
    bt = torch.tensor([pages_for(i, 48) for i in range(3)])
    pos = [0, 0, 0]
    got: list[list[torch.Tensor]] = [[], [], []]
    for step in plan:
        ids = [i for i in range(3) if step[i] > 0]
        batch = ForwardBatch.from_sequences([seqs[i][pos[i]:pos[i] + step[i]] for i in ids],
                                            start_pos=[pos[i] for i in ids], slots=ids, block_tables=bt[ids])
        with torch.no_grad():
            lg = model.forward_batch(batch, cache).logits.split([step[i] for i in ids])
        for i, x in zip(ids, lg):
            got[i].append(x)
            pos[i] += step[i]
    assert pos == total
    for i in range(3):
        torch.testing.assert_close(torch.cat(got[i]), full_logits(model, seqs[i]), atol=ATOL, rtol=ATOL)


def test_logits_indices(setup) -> None:
    cfg, model = setup
    seqs = [torch.arange(10) % cfg.vocab_size, torch.arange(7) + 3]
    idx = torch.tensor([9, 16])
    with torch.no_grad():
        full = model.forward_batch(ForwardBatch.from_sequences(seqs), None).logits
        part = model.forward_batch(ForwardBatch.from_sequences(seqs, logits_indices=idx), None).logits
    torch.testing.assert_close(part, full[idx])


def test_snapshot_restore_prefix(setup) -> None:
    """Prefix caching: a second sequence reuses the first page and the slot snapshot taken at the page boundary."""
    cfg, model = setup
    g = torch.Generator().manual_seed(5)
    prefix = torch.randint(0, cfg.vocab_size, (2 * PAGE,), generator=g)
    tail_a = torch.randint(0, cfg.vocab_size, (9,), generator=g)
    tail_b = torch.randint(0, cfg.vocab_size, (13,), generator=g)
    cache = KVCache(cfg, num_slots=2, num_pages=8, page_size=PAGE, dtype=torch.float32)
    pages_a, pages_b = [0, 1, 2], [0, 1, 3]  # b shares the two prefix pages
    run_chunks(model, cache, 0, pages_a, prefix, [2 * PAGE])
    snap = cache.snapshot_state(0)
    a = _continue(model, cache, 0, pages_a, prefix, tail_a)
    cache.restore_state(1, snap)
    b = _continue(model, cache, 1, pages_b, prefix, tail_b)
    torch.testing.assert_close(a, full_logits(model, torch.cat([prefix, tail_a]))[2 * PAGE:], atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(b, full_logits(model, torch.cat([prefix, tail_b]))[2 * PAGE:], atol=ATOL, rtol=ATOL)
    # copy_state forks a slot too
    cache.copy_state(1, 0)
    for t0, t1 in zip(cache.snapshot_state(0), cache.snapshot_state(1)):
        assert torch.equal(t0, t1)


def _continue(model, cache, slot, pages, prefix, tail) -> torch.Tensor:
    out = []
    pos = prefix.shape[0]
    for i in range(tail.shape[0]):
        batch = ForwardBatch.from_sequences([tail[i:i + 1]], start_pos=[pos + i], slots=[slot],
                                            block_tables=torch.tensor([pages]))
        with torch.no_grad():
            out.append(model.forward_batch(batch, cache).logits)
    return torch.cat(out)


def test_decode_is_sparse(setup, monkeypatch) -> None:
    """A decode step's CSA attention reads the indexer's top-k entries from the pages, never all of them."""
    from dsv4 import ops
    from dsv4.ops import reference as ref

    cfg, model = setup
    s = 60
    tokens = torch.randint(0, cfg.vocab_size, (s,), generator=torch.Generator().manual_seed(6))
    cache = KVCache(cfg, num_slots=1, num_pages=4, page_size=PAGE, dtype=torch.float32)
    run_chunks(model, cache, 0, pages_for(0, s + 1), tokens, [s])
    seen = []
    real = ref.sparse_attention

    def spy(q, kv, start, lens, ring, slots, entries, block_tables, ratio, n_entries, topk, sink, scale):
        seen.append((ratio, entries is None or entries.data_ptr() == cache.entries[len(seen)].data_ptr(),
                     None if topk is None else tuple(topk.shape)))
        return real(q, kv, start, lens, ring, slots, entries, block_tables, ratio, n_entries, topk, sink, scale)

    monkeypatch.setattr(ref, "sparse_attention", spy)
    batch = ForwardBatch.from_sequences([tokens[:1]], start_pos=[s], slots=[0],
                                        block_tables=torch.tensor([pages_for(0, s + 1)]))
    with torch.no_grad(), ops.use_backend("cpu", "reference"):
        model.forward_batch(batch, cache)
    assert len(seen) == cfg.n_layers
    assert all(in_place for _, in_place, _ in seen)  # the cache's own pages, no gathered copy of the history
    csa = [top for r, _, top in seen if r == 4]
    assert csa and all(top == (1, 1, cfg.index_topk) for top in csa), csa


def test_cache_bytes(setup) -> None:
    cfg, _ = setup
    cache = KVCache(cfg, num_slots=3, num_pages=5, page_size=PAGE, dtype=torch.float32)
    assert cache.nbytes == KVCache.bytes_needed(cfg, 3, 5, PAGE, torch.float32)
    with pytest.raises(ValueError, match="page_size"):
        KVCache(cfg, num_slots=1, num_pages=1, page_size=24)


def test_bad_cache_arguments_raise(setup) -> None:
    cfg, model = setup
    cache = KVCache(cfg, num_slots=2, num_pages=4, page_size=PAGE, dtype=torch.float32)
    toks = torch.arange(20)
    with pytest.raises(ValueError, match="slots"):
        model.forward_batch(ForwardBatch.from_sequences([toks], [0], [5], torch.tensor([[0, 1]])), cache)
    with pytest.raises(ValueError, match="-1"):
        model.forward_batch(ForwardBatch.from_sequences([toks], [0], [0], torch.tensor([[0, -1]])), cache)
    with pytest.raises(ValueError, match="columns"):
        model.forward_batch(ForwardBatch.from_sequences([toks], [0], [0], torch.tensor([[0]])), cache)
    with pytest.raises(ValueError, match="start at position 0"):
        model.forward_batch(ForwardBatch.from_sequences([toks], [3]), None)
    with pytest.raises(ValueError, match="block_tables"):
        model.forward_batch(ForwardBatch.from_sequences([toks], [0], [0]), cache)


def test_query_blocking_is_exact(setup, monkeypatch) -> None:
    """Long chunks run their queries in blocks; tiny blocks must give the same logits (pure and cached)."""
    from dsv4 import ops
    from dsv4.ops import reference as ref

    cfg, model = setup
    monkeypatch.setattr(ops, "BACKENDS", {"cpu": "reference"})
    g = torch.Generator().manual_seed(7)
    seqs = [torch.randint(0, cfg.vocab_size, (n,), generator=g) for n in (45, 20)]
    with torch.no_grad():
        want = model.forward_batch(ForwardBatch.from_sequences(seqs), None).logits
    monkeypatch.setattr(ref, "BLOCK_ELEMS", 7 * cfg.n_heads * 40)  # about 7 queries per block
    with torch.no_grad():
        got = model.forward_batch(ForwardBatch.from_sequences(seqs), None).logits
    torch.testing.assert_close(got, want, atol=ATOL, rtol=ATOL)
    cache = KVCache(cfg, num_slots=1, num_pages=4, page_size=PAGE, dtype=torch.float32)
    inc = run_chunks(model, cache, 0, pages_for(0, 45), seqs[0], [13, 17, 15])
    torch.testing.assert_close(inc, want[:45], atol=ATOL, rtol=ATOL)


def test_bf16_cache_tracks_bf16_forward(setup) -> None:
    """bf16 model + bf16 cache: decoding follows the bf16 full forward up to bf16 rounding (different GEMM shapes
    round differently, so this is a tolerance check, not bitwise)."""
    from dsv4.model.transformer import Transformer

    cfg, ref = setup
    m = Transformer(cfg, dtype=torch.bfloat16).eval()
    m.load_state_dict(ref.state_dict())
    tokens = torch.randint(0, cfg.vocab_size, (40,), generator=torch.Generator().manual_seed(8))
    cache = KVCache(cfg, num_slots=1, num_pages=3, page_size=PAGE, dtype=torch.bfloat16)
    got = run_chunks(m, cache, 0, pages_for(0, 40), tokens, [9] + [1] * 31)
    want = full_logits(m, tokens)
    assert (got - want).abs().mean() < 0.05
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9


@pytest.mark.parametrize("start", [PAGE - 2, 2 * PAGE + 5])
def test_snapshot_rows_undoes_a_two_token_forward(setup, start) -> None:
    """Speculative rollback: snapshot_rows before a forward over two more positions, restore_rows after it, and the
    slot state is back exactly (PAGE - 2 .. PAGE - 1 completes a CSA and an HCA block, moving CSA state rows)."""
    cfg, model = setup
    g = torch.Generator().manual_seed(9)
    tokens = torch.randint(0, cfg.vocab_size, (start + 2,), generator=g)
    cache = KVCache(cfg, num_slots=2, num_pages=8, page_size=PAGE, dtype=torch.float32)
    pages = [3, 4, 5]
    run_chunks(model, cache, 1, pages, tokens[:start], [start])
    before = cache.snapshot_state(1)
    saved = cache.snapshot_rows(1, [start, start + 1])
    batch = ForwardBatch.from_sequences([tokens[start:]], start_pos=[start], slots=[1],
                                        block_tables=torch.tensor([pages]))
    with torch.no_grad():
        model.forward_batch(batch, cache)
    assert any(not torch.equal(a, b) for a, b in zip(before, cache.snapshot_state(1)))  # the forward wrote state
    cache.restore_rows(saved)
    for a, b in zip(before, cache.snapshot_state(1)):
        assert torch.equal(a, b)
