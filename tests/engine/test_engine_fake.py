"""Engine logic against a fake model with exact, history-dependent logits (see fakes.py): batching, chunked prefill,
preemption, prefix caching, abort, validation, sampling semantics. Fast, no real model."""

from __future__ import annotations

import random

import pytest
import torch

from dsv4.engine.llm import LLMEngine
from dsv4.engine.sampling import SamplingParams
from tests.engine.fakes import FakeModel, history_hash, logits_for, patch_fake_cache

V = 40


@pytest.fixture
def make_engine(monkeypatch):
    patch_fake_cache(monkeypatch)

    def make(model=None, tokenizer=None, **opts):
        opts.setdefault("max_num_seqs", 8)
        return LLMEngine(model or FakeModel(V), tokenizer, **opts)

    return make


def prompts(n: int, seed: int = 0, lo: int = 1, hi: int = 300) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(V) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kw)


def run(engine: LLMEngine, ps: list[list[int]], params) -> list:
    params = params if isinstance(params, list) else [params] * len(ps)
    ids = [engine.add_request(p, sp) for p, sp in zip(ps, params)]
    final = engine.run_to_completion(ids)
    return [final[i] for i in ids]


def test_single_request_matches_plain_decoding(make_engine):
    model = FakeModel(V)
    eng = make_engine(model)
    (p,) = prompts(1, hi=200)
    (out,) = run(eng, [p], greedy(20))
    assert out.outputs[0].token_ids == model.reference_greedy(p, 20)
    assert out.outputs[0].finish_reason == "length"
    assert out.prompt_tokens == len(p) and out.completion_tokens == 20


def test_concurrent_chunked_prefill_matches_plain_decoding(make_engine):
    model = FakeModel(V)
    eng = make_engine(model, max_num_batched_tokens=48, enable_prefix_caching=False)
    ps = prompts(10, seed=1)
    lens = [3 + i * 2 for i in range(10)]
    outs = run(eng, ps, [greedy(n) for n in lens])
    for p, n, o in zip(ps, lens, outs):
        assert o.outputs[0].token_ids == model.reference_greedy(p, n)
    assert eng.block_manager.num_free_pages == eng.block_manager.num_pages


def test_preemption_with_tiny_page_budget_matches(make_engine):
    model = FakeModel(V)
    # 5 pages of 128 tokens; each sequence grows to ~250-330 tokens (2-3 pages): at most 2 run at once.
    eng = make_engine(model, num_pages=5, max_num_batched_tokens=512, enable_prefix_caching=False)
    ps = prompts(6, seed=2, lo=200, hi=250)
    outs = run(eng, ps, greedy(80))
    assert eng.scheduler.num_preemptions > 0
    for p, o in zip(ps, outs):
        assert o.outputs[0].token_ids == model.reference_greedy(p, 80)
    assert eng.block_manager.num_free_pages == 5


def test_prefix_cache_hits_give_identical_output(make_engine):
    model = FakeModel(V)
    eng = make_engine(model, max_num_batched_tokens=200)
    base = prompts(1, seed=3, lo=300, hi=300)[0]
    (a,) = run(eng, [base], greedy(5))
    assert a.num_cached_tokens == 0
    # second turn: the first request's prompt + more; the last boundary snapshot (256) is reused
    turn2 = base + a.outputs[0].token_ids + [1, 2, 3]
    (b,) = run(eng, [turn2], greedy(7))
    assert b.num_cached_tokens == 256
    assert b.outputs[0].token_ids == model.reference_greedy(turn2, 7)
    # several requests sharing a system prompt of 2 pages + different tails, concurrently
    sys_prompt = base[:256]
    ps = [sys_prompt + t for t in prompts(4, seed=4, lo=5, hi=40)]
    outs = run(eng, ps, greedy(6))
    for p, o in zip(ps, outs):
        assert o.outputs[0].token_ids == model.reference_greedy(p, 6)
    assert sum(o.num_cached_tokens for o in outs) >= 3 * 256
    assert eng.stats["cached_tokens"] == 256 + sum(o.num_cached_tokens for o in outs)
    assert eng.stats["prompt_tokens"] == len(base) + len(turn2) + sum(len(p) for p in ps)
    eng.prefix_cache.clear()
    assert eng.block_manager.num_free_pages == eng.block_manager.num_pages


def test_prefix_cache_and_preemption_together(make_engine):
    model = FakeModel(V)
    eng = make_engine(model, num_pages=7, max_num_batched_tokens=100, max_prefix_snapshots=2)
    shared = prompts(1, seed=5, lo=260, hi=260)[0]
    ps = [shared + t for t in prompts(5, seed=6, lo=1, hi=30)]
    outs = run(eng, ps, greedy(40))
    for p, o in zip(ps, outs):
        assert o.outputs[0].token_ids == model.reference_greedy(p, 40)


def test_abort_frees_memory_and_others_continue(make_engine):
    model = FakeModel(V)
    eng = make_engine(model, max_num_batched_tokens=64)
    ps = prompts(3, seed=7, lo=100, hi=150)
    ids = [eng.add_request(p, greedy(30), request_id=f"q{i}") for i, p in enumerate(ps)]
    for _ in range(4):
        eng.step()
    aborted = eng.abort("q1")
    assert aborted.outputs[0].finish_reason == "abort"
    final = eng.run_to_completion(["q0", "q2"])
    for i in (0, 2):
        assert final[f"q{i}"].outputs[0].token_ids == model.reference_greedy(ps[i], 30)
    eng.prefix_cache.clear()
    assert eng.block_manager.num_free_pages == eng.block_manager.num_pages
    assert eng.abort("nope") is None and ids


@pytest.mark.parametrize(
    "prompt, params, match",
    [
        ([], greedy(5), "empty"),
        ([1] * 3000, greedy(5), "context length"),
        ([1, 2], greedy(5000), "max_tokens"),
        ([1, V + 5], greedy(5), "outside the vocabulary"),
        ("text", greedy(5), "tokenizer"),
        ([1, 2], SamplingParams(max_tokens=2, stop=["x"]), "stop strings need a tokenizer"),
    ],
)
def test_bad_requests_raise_and_do_not_disturb_others(make_engine, prompt, params, match):
    model = FakeModel(V, max_len=2048)
    eng = make_engine(model, num_pages=20)
    good = prompts(1, seed=8)[0]
    rid = eng.add_request(good, greedy(10))
    eng.step()
    with pytest.raises(ValueError, match=match):
        eng.add_request(prompt, params)
    final = eng.run_to_completion([rid])
    assert final[rid].outputs[0].token_ids == model.reference_greedy(good, 10)


@pytest.mark.parametrize(
    "kw",
    [
        dict(temperature=-1),
        dict(top_p=0),
        dict(top_p=1.5),
        dict(top_k=-3),
        dict(min_p=2),
        dict(repetition_penalty=0),
        dict(presence_penalty=3),
        dict(max_tokens=0),
        dict(n=0),
        dict(logprobs=-1),
        dict(stop=[""]),
    ],
)
def test_invalid_sampling_params(kw):
    with pytest.raises(ValueError, match="SamplingParams"):
        SamplingParams(**kw)


def test_seeded_sampling_reproducible_regardless_of_batch(make_engine):
    sp = SamplingParams(temperature=0.9, top_p=0.9, top_k=20, seed=123, max_tokens=25, ignore_eos=True)
    p = prompts(1, seed=9)[0]
    (alone,) = run(make_engine(), [p], sp)
    others = prompts(5, seed=10)
    mixed = run(make_engine(max_num_batched_tokens=40), others[:2] + [p] + others[2:],
                [SamplingParams(temperature=1.0, max_tokens=30)] * 2 + [sp] + [greedy(9)] * 3)
    assert mixed[2].outputs[0].token_ids == alone.outputs[0].token_ids
    unseeded = run(make_engine(), [p, p], SamplingParams(temperature=1.0, max_tokens=25, ignore_eos=True))
    assert unseeded[0].outputs[0].token_ids != unseeded[1].outputs[0].token_ids


def test_n_greater_than_one_and_logprobs(make_engine):
    model = FakeModel(V)
    p = prompts(1, seed=11)[0]
    (out,) = run(make_engine(model), [p], SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=6, logprobs=3,
                                                          ignore_eos=True))
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    seq = list(p)
    for tok, lp in zip(out.outputs[0].token_ids, out.outputs[0].logprobs):
        ref = torch.log_softmax(logits_for(history_hash(seq), V), -1)
        assert tok in lp and len(lp) in (3, 4)
        assert lp[tok] == pytest.approx(float(ref[tok]), abs=1e-5)
        top = torch.topk(ref, 3).indices.tolist()
        assert set(top) <= set(lp)
        seq.append(tok)


def test_stop_token_ids_eos_and_ignore_eos(make_engine):
    model = FakeModel(V)
    p = prompts(1, seed=12)[0]
    ref = model.reference_greedy(p, 30)
    stop_tok = ref[5]
    first = ref.index(stop_tok)
    (o,) = run(make_engine(model), [p], greedy(30, stop_token_ids=[stop_tok]))
    assert o.outputs[0].token_ids == ref[: first + 1]
    assert o.outputs[0].finish_reason == "stop" and o.outputs[0].stop_reason == stop_tok
    eos_model = FakeModel(V, eos=stop_tok)
    (o,) = run(make_engine(eos_model), [p], SamplingParams(temperature=0, max_tokens=30))
    assert o.outputs[0].token_ids == ref[: first + 1] and o.outputs[0].finish_reason == "stop"
    (o,) = run(make_engine(eos_model), [p], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    assert o.outputs[0].token_ids == ref and o.outputs[0].finish_reason == "length"
    (o,) = run(make_engine(eos_model), [p], SamplingParams(temperature=0, max_tokens=30, min_tokens=first + 2))
    assert len(o.outputs[0].token_ids) >= first + 2


class CharTokenizer:
    """Token i <-> one character, enough to test stop strings and detokenization."""

    eos_id = None

    def encode(self, text: str) -> list[int]:
        return [ord(c) - ord("a") for c in text]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(chr(ord("a") + i) for i in ids)


def test_stop_strings_truncate_and_never_stream_partial(make_engine):
    model = FakeModel(V)
    tok = CharTokenizer()
    p = prompts(1, seed=13, hi=50)[0]
    ref_text = tok.decode(model.reference_greedy(p, 40))
    stop = ref_text[10:13]
    cut = ref_text.find(stop)
    eng = make_engine(model, tokenizer=tok)
    rid = eng.add_request(p, SamplingParams(temperature=0, max_tokens=40, stop=[stop, "zzzzzz"]))
    streamed = ""
    final = None
    while eng.has_unfinished():
        for out in eng.step(delta=True):
            streamed += out.outputs[0].delta_text
            # a stream never shows text that a stop string later removes
            assert ref_text[:cut].startswith(streamed)
            final = out
    assert final.request_id == rid and final.outputs[0].finish_reason == "stop"
    assert final.outputs[0].text == streamed == ref_text[:cut]
    assert final.outputs[0].stop_reason == stop
    # include_stop_str_in_output keeps it
    (o,) = run(make_engine(model, tokenizer=tok), [p],
               SamplingParams(temperature=0, max_tokens=40, stop=[stop], include_stop_str_in_output=True))
    assert o.outputs[0].text == ref_text[: cut + len(stop)]
    # string prompts go through the tokenizer
    (o,) = run(make_engine(model, tokenizer=tok), [tok.decode(p)], greedy(4))
    assert o.prompt_token_ids == p and o.prompt == tok.decode(p)


def test_penalties_change_distribution_as_specified(make_engine):
    from dsv4.engine.request import Sequence
    from dsv4.engine.sampler import apply_penalties

    sp = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    s = Sequence(0, "r", 0, [1, 2], sp, 0, None)
    s.tokens += [3, 3, 2]
    row = torch.tensor([1.0, 2.0, -2.0, 4.0, 1.0])
    apply_penalties(row, s)
    # token 1: prompt only -> repetition only; 2: prompt+output once; 3: output twice; 0/4 untouched
    assert row.tolist() == pytest.approx([1.0, 1.0, -4.0 - 0.5 - 0.25, 2.0 - 0.5 - 0.5, 1.0])


def test_top_k_top_p_min_p_restrict_support():
    from dsv4.engine.request import Sequence
    from dsv4.engine.sampler import sample_row

    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    for kw, allowed in [(dict(top_k=2), {0, 1}), (dict(top_p=0.7), {0, 1}), (dict(min_p=0.4), {0, 1}),
                        (dict(top_p=0.5), {0})]:
        sp = SamplingParams(temperature=1.0, seed=0, **kw)
        g = torch.Generator().manual_seed(0)
        s = Sequence(0, "r", 0, [0], sp, 0, g)
        seen = {sample_row(logits.clone(), s) for _ in range(200)}
        assert seen == allowed, (kw, seen)


def test_real_tokenizer_detokenizes_multibyte_and_stops():
    from dsv4.chat import load_tokenizer
    from dsv4.engine.request import Sequence

    tok = load_tokenizer(None)
    text = "Hello, 世界! こんにちは 🌍 STOP tail"
    s = Sequence(0, "r", 0, [1], SamplingParams(max_tokens=100, stop=[" STOP"]), 0, None, tok, tok.eos_id)
    for t in tok.encode(text):
        s.append_token(t)
        assert "\ufffd" not in s.visible_text()
        if s.is_finished:
            break
    assert s.text == "Hello, 世界! こんにちは 🌍" and s.finish_reason == "stop" and s.stop_reason == " STOP"


class EvenThenStop:
    """A toy grammar: even token ids only, then exactly token 3 after `n` tokens."""

    def __init__(self, n: int) -> None:
        self.n, self.seen = n, []

    def allowed_mask(self, vocab: int) -> torch.Tensor:
        mask = torch.zeros(vocab, dtype=torch.bool)
        if len(self.seen) < self.n:
            mask[0::2] = True
        else:
            mask[3] = True
        return mask

    def accept(self, token_id: int) -> bool:
        self.seen.append(token_id)
        return True


def test_constraint_mask_is_applied_before_sampling(make_engine):
    p = prompts(1, seed=14)[0]
    c = EvenThenStop(5)
    (o,) = run(make_engine(), [p], SamplingParams(temperature=1.0, seed=3, max_tokens=10, stop_token_ids=[3],
                                                  constraint=c))
    ids = o.outputs[0].token_ids
    assert ids[:5] == c.seen[:5] and all(t % 2 == 0 for t in ids[:5])
    assert ids[5] == 3 and o.outputs[0].finish_reason == "stop"
    with pytest.raises(ValueError, match="constraint"):
        make_engine().add_request(p, SamplingParams(n=2, constraint=EvenThenStop(1)))


class Dead(EvenThenStop):
    def allowed_mask(self, vocab: int) -> torch.Tensor:
        return torch.zeros(vocab, dtype=torch.bool)


def test_unsatisfiable_constraint_ends_only_its_request(make_engine):
    model = FakeModel(V)
    ps = prompts(2, seed=15)
    outs = run(make_engine(model), ps, [SamplingParams(temperature=0, max_tokens=5, constraint=Dead(0)), greedy(6)])
    assert outs[0].outputs[0].finish_reason == "abort" and outs[0].outputs[0].token_ids == []
    assert "constraint allows no token" in outs[0].outputs[0].stop_reason
    assert outs[1].outputs[0].token_ids == model.reference_greedy(ps[1], 6)
