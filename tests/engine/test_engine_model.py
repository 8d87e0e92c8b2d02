"""The engine on a tiny random fp32 V4 model (SWA + CSA + HCA layers, hash layer, mHC, MTP) against plain decoding:
a full, cache-free forward of the whole sequence at every step (issue 4, item 7). Every test runs on the PyTorch
path and on the ops' native CPU kernels (dsv4/ops, backend 'native') where the kernels build."""

from __future__ import annotations

import pytest
import torch

from dsv4.config import ModelConfig
from dsv4.engine.llm import LLM
from dsv4.engine.sampling import SamplingParams
from dsv4.model.batch import ForwardBatch
from dsv4.model.transformer import Transformer

# ratios 4 and 8 with a window of 8: compression, CSA top-k and HCA all kick in within a few dozen tokens. 16 indexer
# heads avoid exact ties in the indexer's top-k (architecture.md sec 8, testing note). Pages of 16 tokens hold
# 4 CSA and 2 HCA entries, so sequences span several pages.
TINY = dict(
    vocab_size=128, hidden_size=64, num_hidden_layers=4, num_attention_heads=2, head_dim=32, qk_rope_head_dim=16,
    q_lora_rank=32, o_groups=2, o_lora_rank=16, sliding_window=8, compress_ratios=[0, 4, 8, 4, 0], index_n_heads=16,
    index_head_dim=32, index_topk=4, moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2,
    num_hash_layers=1, hc_mult=2, routed_scaling_factor=1.5, num_nextn_predict_layers=1, max_position_embeddings=512,
    initializer_range=0.1,
    rope_scaling={"type": "yarn", "factor": 4, "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1},
)
PAGE = 16


@pytest.fixture(scope="module", params=["reference", "native"])
def model(request):
    """The model, with the ops' CPU backend set for the module's tests (the engine and the reference decoding)."""
    from dsv4 import kernels, ops

    if request.param == "native" and not kernels.available():
        pytest.skip(f"native kernels: {kernels.why_unavailable()}")
    torch.manual_seed(0)
    m = Transformer(ModelConfig.from_dict(TINY), dtype=torch.float32).init_weights(0).eval()
    saved = dict(ops.BACKENDS)
    ops.BACKENDS["cpu"] = request.param
    yield m
    ops.BACKENDS.clear()
    ops.BACKENDS.update(saved)


@torch.inference_mode()
def plain_greedy(model, prompts: list[list[int]], max_tokens: list[int]) -> list[list[int]]:
    """Reference: every step recomputes every sequence from scratch (no cache), one varlen forward for all."""
    seqs = [list(p) for p in prompts]
    outs: list[list[int]] = [[] for _ in prompts]
    for step in range(max(max_tokens)):
        live = [i for i in range(len(seqs)) if step < max_tokens[i]]
        lens = [len(seqs[i]) for i in live]
        last = torch.tensor([sum(lens[: j + 1]) - 1 for j in range(len(live))])
        batch = ForwardBatch.from_sequences([seqs[i] for i in live], logits_indices=last)
        nxt = model.forward_batch(batch, None).logits.argmax(-1).tolist()
        for i, t in zip(live, nxt):
            seqs[i].append(t)
            outs[i].append(t)
    return outs


def prompts(n: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (int(torch.randint(lo, hi + 1, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def engine(model, **opts) -> LLM:
    opts.setdefault("page_size", PAGE)
    opts.setdefault("max_num_seqs", 10)
    opts.setdefault("cache_memory_gb", 0.05)
    return LLM(model, **opts)


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


def check(llm: LLM, model, ps: list[list[int]], ns: list[int]) -> list:
    outs = llm.generate(ps, [greedy(n) for n in ns])
    ref = plain_greedy(model, ps, ns)
    assert [o.outputs[0].token_ids for o in outs] == ref
    return outs


def test_single_request(model):
    (p,) = prompts(1, 30, 30, seed=1)
    check(engine(model), model, [p], [12])


def test_concurrent_requests_with_chunked_prefill(model):
    ps = prompts(9, 3, 70, seed=2)
    ns = [4 + (i % 5) for i in range(9)]
    # a budget of 24 tokens splits the longer prompts into several chunks, interleaved with other decodes
    llm = engine(model, max_num_batched_tokens=24, enable_prefix_caching=False)
    check(llm, model, ps, ns)
    bm = llm.engine.block_manager
    assert bm.num_free_pages == bm.num_pages and bm.num_free_slots == bm.num_slots


def test_requests_arriving_mid_prefill_share_its_steps(model):
    """A long prompt prefilling under a small budget; short requests arrive during it and are admitted through the
    admission reserve, decoding between its chunks (scheduler.py): every output still equals plain decoding."""
    (long,) = prompts(1, 200, 200, seed=7)
    shorts = prompts(3, 3, 9, seed=8)
    llm = engine(model, max_num_batched_tokens=24, admission_reserve=8)
    eng = llm.engine
    ids = [eng.add_request(long, greedy(5))]
    final = {}
    for s in shorts:
        for _ in range(2):
            final.update({o.request_id: o for o in eng.step() if o.finished})
        ids.append(eng.add_request(s, greedy(4)))
    # the short ones joined while the long prompt was still being prefilled, and the first one is already done
    assert eng.requests[ids[0]].seqs[0].num_computed < len(long) and ids[1] in final
    final.update(eng.run_to_completion([i for i in ids if i not in final]))
    assert [final[i].outputs[0].token_ids for i in ids] == plain_greedy(model, [long, *shorts], [5, 4, 4, 4])


def test_preemption_with_tiny_page_budget(model):
    ps = prompts(5, 30, 45, seed=3)
    llm = engine(model, num_pages=9, max_num_batched_tokens=64, enable_prefix_caching=False)
    check(llm, model, ps, [10] * 5)
    assert llm.engine.scheduler.num_preemptions > 0


def test_prefix_cache_hits(model):
    llm = engine(model, max_num_batched_tokens=40)
    shared = prompts(1, 40, 40, seed=4)[0]
    tails = prompts(3, 2, 9, seed=5)
    (first,) = check(llm, model, [shared + tails[0]], [6])
    assert first.num_cached_tokens == 0
    outs = check(llm, model, [shared + t for t in tails[1:]], [6, 6])
    # the first request snapshotted its last page boundary (32 of 40 shared tokens); both later ones reuse it
    assert [o.num_cached_tokens for o in outs] == [32, 32]
    # multi-turn: prompt + answer + new message reuses the first turn's prefix too
    turn2 = shared + tails[0] + first.outputs[0].token_ids + [5, 6, 7]
    (o,) = check(llm, model, [turn2], [5])
    assert o.num_cached_tokens >= 32


def test_n_siblings_share_the_prompt_prefill(model):
    """n > 1: the siblings wait for the first sequence's prompt snapshot and compute only the tail; same output."""
    (p,) = prompts(1, 45, 45, seed=12)
    llm = engine(model, max_num_batched_tokens=64)
    (out,) = llm.generate([p], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, n=3))
    ref = plain_greedy(model, [p], [5])[0]
    assert [o.token_ids for o in out.outputs] == [ref] * 3
    assert out.num_cached_tokens == 2 * 32  # two siblings x the last page boundary (32) of the 45-token prompt
    off = engine(model, max_num_batched_tokens=64, enable_prefix_caching=False)
    (plain,) = off.generate([p], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, n=3))
    assert plain.num_cached_tokens == 0 and [o.token_ids for o in plain.outputs] == [ref] * 3


def force_half_the_drafts(llm, ps, ref, pick) -> None:
    """Wrap the MTP drafter so that drafts chosen by ``pick(seq, call_number)`` become the true next token (from the
    reference output ``ref``): a random MTP block is almost never right, and both accept and reject paths must run."""
    spec = llm.engine.speculator
    real_draft = spec.draft
    full = {tuple(p): list(p) + r for p, r in zip(ps, ref)}
    calls = [0]

    def oracle_draft(out, res, stats):
        real_draft(out, res, stats)
        for it in out.items:
            s = it.seq
            calls[0] += 1
            if s.draft_token is not None and pick(s, calls[0]):
                f = full[tuple(s.prompt_token_ids)]
                if s.num_tokens < len(f):
                    s.draft_token = f[s.num_tokens]

    spec.draft = oracle_draft


def test_mtp_speculative_greedy_identical(model):
    ps = prompts(4, 10, 40, seed=6)
    ns = [12, 9, 15, 6]
    llm = engine(model, speculative=True, max_num_batched_tokens=32)
    check(llm, model, ps, ns)
    eng = llm.engine
    assert eng.stats["drafted"] > 0 and eng.acceptance_rate is not None


def test_mtp_accept_and_reject_paths(model):
    """A random MTP block is almost always wrong, so replace every other draft by the true next token: both the
    accept path (two tokens per step) and the reject path (state rollback) run, and output stays exact."""
    ps = prompts(3, 10, 30, seed=8)
    ns = [14, 10, 12]
    ref = plain_greedy(model, ps, ns)
    llm = engine(model, speculative=True)
    force_half_the_drafts(llm, ps, ref, lambda seq, call: call % 2 == 1)
    outs = llm.generate(ps, [greedy(n) for n in ns])
    assert [o.outputs[0].token_ids for o in outs] == ref
    st = llm.engine.stats
    assert 0 < st["accepted"] < st["drafted"]
    assert st["steps"] < sum(ns) + len(ps)  # accepted drafts saved steps


def test_bad_input_leaves_other_requests_alone(model):
    llm = engine(model)
    eng = llm.engine
    good = prompts(2, 10, 20, seed=7)
    rid = eng.add_request(good[0], greedy(6))
    eng.step()
    for bad, params, match in [
        ([], greedy(3), "empty"),
        ([1] * 600, greedy(3), "context length"),
        ([1, 2, 3], greedy(600), "max_tokens"),
        ([1, 500], greedy(3), "vocabulary"),
    ]:
        with pytest.raises(ValueError, match=match):
            eng.add_request(bad, params)
    with pytest.raises(ValueError, match="SamplingParams"):
        llm.generate([good[1]], SamplingParams(top_p=0))
    with pytest.raises(ValueError, match="empty"):  # a batch with one bad prompt is rejected before queueing any
        llm.generate([good[1], []], greedy(3))
    final = eng.run_to_completion([rid])
    assert final[rid].outputs[0].token_ids == plain_greedy(model, [good[0]], [6])[0]
    assert not eng.has_unfinished()


def test_llm_from_checkpoint_directory(model, tmp_path):
    """LLM(path): load_model + engine; token-id prompts work without a tokenizer, string prompts say why not."""
    from dsv4.model import checkpoint_io as cio

    cio.save_checkpoint(tmp_path, model.state_dict(), ModelConfig.from_dict(TINY), quantize=False,
                        dtype=torch.float32)
    llm = LLM(str(tmp_path), dtype=torch.float32, page_size=PAGE, max_num_seqs=2, cache_memory_gb=0.01)
    p = prompts(1, 12, 12, seed=9)[0]
    (out,) = llm.generate([p], greedy(5))
    assert out.outputs[0].token_ids == plain_greedy(model, [p], [5])[0]
    with pytest.raises(ValueError, match="tokenizer"):
        llm.generate("hello", greedy(2))
    with pytest.raises(TypeError, match="unknown engine option"):
        LLM(model, max_batch=3)


def test_everything_at_once(model):
    """Prefix hits, chunked prefill, preemption and MTP drafts (half of them forced correct) in one run."""
    shared = prompts(1, 34, 34, seed=10)[0]
    ps = [shared + t for t in prompts(6, 1, 12, seed=11)]
    ns = [8, 11, 6, 9, 12, 7]
    ref = plain_greedy(model, ps, ns)
    llm = engine(model, speculative=True, num_pages=5, max_num_batched_tokens=40, max_prefix_snapshots=2)
    force_half_the_drafts(llm, ps, ref, lambda seq, call: seq.num_tokens % 2 == 0)
    outs = llm.generate(ps, [greedy(n) for n in ns])
    assert [o.outputs[0].token_ids for o in outs] == ref
    st = llm.engine.stats
    assert st["accepted"] > 0 and st["drafted"] > st["accepted"] and st["cached_tokens"] > 0
    assert st["preemptions"] > 0, st


def test_prompt_logprobs_equal_a_full_forward(model):
    """prompt_logprobs over chunked prefill (a budget of 24 tokens) equal log_softmax of one cache-free forward of
    the whole prompt, also when a prefix-cache entry exists for the prompt (it is not read) and next to a plain
    request; the first prompt token has none."""
    shared = prompts(1, 50, 50, seed=21)[0]
    llm = engine(model, max_num_batched_tokens=24)
    llm.generate([shared + [1, 2]], greedy(3))  # leaves prefix-cache snapshots of `shared`
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True, prompt_logprobs=3)
    p = shared + [3, 4, 5]
    out, other = llm.generate([p, prompts(1, 30, 30, seed=22)[0]], [params, greedy(4)])
    assert out.num_cached_tokens == 0 and other.prompt_logprobs is None
    with torch.inference_mode():
        ref = torch.log_softmax(model.forward_batch(ForwardBatch.from_sequences([p]), None).logits.float(), -1)
    plp = out.prompt_logprobs
    assert len(plp) == len(p) and plp[0] is None
    for j in range(1, len(p)):
        want = ref[j - 1]
        top = set(torch.topk(want, 3).indices.tolist())
        assert set(plp[j]) == top | {p[j]}
        for tok, val in plp[j].items():
            assert val == pytest.approx(want[tok].item(), abs=1e-4)
    # the generated tokens are unchanged by asking for prompt logprobs
    assert out.outputs[0].token_ids == plain_greedy(model, [p], [2])[0]
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=21)


def test_prompt_logprobs_survive_preemption(model):
    ps = prompts(5, 30, 45, seed=3)
    llm = engine(model, num_pages=9, max_num_batched_tokens=64, enable_prefix_caching=False)
    outs = llm.generate(ps, [SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, prompt_logprobs=0)] * 5)
    assert llm.engine.scheduler.num_preemptions > 0
    for p, out in zip(ps, outs):
        with torch.inference_mode():
            ref = torch.log_softmax(model.forward_batch(ForwardBatch.from_sequences([p]), None).logits.float(), -1)
        assert len(out.prompt_logprobs) == len(p)
        assert [d[p[j]] for j, d in enumerate(out.prompt_logprobs) if j] == pytest.approx(
            [ref[j - 1, p[j]].item() for j in range(1, len(p))], abs=1e-4)
