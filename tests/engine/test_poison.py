"""No request can poison the engine: every bad SamplingParams is a clean ValueError before it is queued, and whatever
still fails inside a step (the forward, a constraint, sampling) ends only the requests concerned. The property test
checks the engine afterwards against a fresh one: the same valid requests give the same tokens (fake model of
fakes.py, whose logits depend on the whole cached history, so stale or leaked cache state would show)."""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsv4.engine.async_llm import AsyncLLM, RequestFailed
from dsv4.engine.llm import LLMEngine
from dsv4.engine.sampling import SamplingParams
from tests.engine.fakes import FakeModel, patch_fake_cache
from tests.engine.test_engine_fake import V, EvenThenStop, greedy, prompts, run

NAN, INF = float("nan"), float("inf")
# field -> values of the wrong type or out of range; each must be a ValueError naming the field
BAD = {
    "n": [0, -1, True, 1.0, 2.5, "2", None],
    "temperature": [-0.1, NAN, INF, -INF, True, "0.5", None, 1j],
    "top_p": [0.0, 1.01, -1, NAN, INF, True, "1", None],
    "top_k": [True, False, -2, 1.5, "4", NAN, None],
    "min_p": [-0.01, 1.5, NAN, INF, True, "0"],
    "repetition_penalty": [0.0, -1.0, NAN, INF, True, None],
    "presence_penalty": [2.5, -2.01, NAN, INF, True, "0"],
    "frequency_penalty": [3, -3, NAN, -INF, False, "1"],
    "seed": [True, 1.5, "7", 1 << 64, -(1 << 63) - 1],
    "max_tokens": [0, -5, True, 2.0, "16"],
    "min_tokens": [-1, True, 1.5, "0", None],
    "stop": [5, [""], [1], ["ok", None], {"a": 1}, b"x"],
    "stop_token_ids": [[-1], [True], [1.5], ["3"], 3, "3", [None]],
    "ignore_eos": [1, 0, "yes", None],
    "include_stop_str_in_output": [1, "true", None],
    "skip_special_tokens": [0, "false", None],
    "logprobs": [-1, 21, True, 1.5, "3"],
    "constraint": [object(), "grammar", 3],
}
VALID = st.fixed_dictionaries({}, optional={
    "temperature": st.sampled_from([0.0, 0.7, 1, 1.5]),
    "top_p": st.sampled_from([0.5, 0.9, 1.0]),
    "top_k": st.sampled_from([-1, 0, 1, 5, np.int64(3)]),
    "min_p": st.sampled_from([0.0, 0.05]),
    "repetition_penalty": st.sampled_from([1.0, 1.3]),
    "presence_penalty": st.sampled_from([0.0, 0.5, -1]),
    "seed": st.integers(0, 1 << 40),
    "max_tokens": st.integers(1, 12),
})


def test_every_bad_field_is_a_clean_value_error():
    for name, values in BAD.items():
        for v in values:
            with pytest.raises(ValueError, match=f"SamplingParams.{name}"):
                SamplingParams(**{name: v})
    # numbers of other Integral / Real types are fine, and stored as plain Python numbers
    p = SamplingParams(temperature=1, top_k=np.int64(3), top_p=np.float32(0.5), seed=np.uint32(5), stop="x")
    assert type(p.temperature) is float and type(p.top_k) is int and type(p.seed) is int and p.stop == ["x"]
    assert math.isclose(p.top_p, 0.5)


@pytest.fixture
def fake_engines(monkeypatch):
    patch_fake_cache(monkeypatch)

    def make(model=None, **opts):
        return LLMEngine(model or FakeModel(V), None, max_num_seqs=4, max_num_batched_tokens=64, **opts)

    return make


REFERENCE = [
    (prompts(1, seed=30, lo=5, hi=90)[0], greedy(9)),
    (prompts(1, seed=31, lo=5, hi=90)[0], SamplingParams(temperature=0.8, top_k=7, seed=11, max_tokens=8)),
    (prompts(1, seed=32, lo=5, hi=90)[0], SamplingParams(temperature=1.2, top_p=0.9, seed=12, max_tokens=7,
                                                         presence_penalty=0.5, repetition_penalty=1.2)),
    (prompts(1, seed=30, lo=5, hi=90)[0][:40], SamplingParams(n=2, temperature=1.0, seed=13, max_tokens=5)),
]


def reference_tokens(engine) -> list[list[list[int]]]:
    outs = run(engine, [p for p, _ in REFERENCE], [sp.clone() for _, sp in REFERENCE])
    assert all(o.error is None for o in outs)
    return [[c.token_ids for c in o.outputs] for o in outs]


class RaisingAccept(EvenThenStop):
    def accept(self, token_id: int) -> bool:
        raise RuntimeError("grammar state machine crashed")


class FlakyModel(FakeModel):
    """Raises from `forward_batch` while `fail` > 0 (after writing part of the cache, like a real mid-forward error)."""

    fail = 0

    def forward_batch(self, batch, cache):
        if self.fail:
            self.fail -= 1
            # half-written garbage wherever this step would have written: nothing may trust what a failed step wrote
            P = cache.page_size
            for b, (start, n) in enumerate(zip(batch.start_pos, batch.seq_lens)):
                table = batch.block_tables[b].tolist()
                for pos in range(start, start + (n + 1) // 2):
                    cache.pages[table[pos // P], pos % P] = 12345
                cache.state[batch.slots[b]] = torch.tensor([start + n, 12345])
            raise RuntimeError("device fell over")
        return super().forward_batch(batch, cache)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    bad=st.lists(st.sampled_from([(k, i) for k, vs in BAD.items() for i in range(len(vs))]), min_size=1, max_size=4),
    valid=VALID,
    mutate=st.booleans(),
    poison=st.sampled_from(["none", "accept", "sampling", "forward"]),
)
def test_invalid_requests_never_change_valid_outputs(fake_engines, bad, valid, mutate, poison):
    model = FlakyModel(V)
    eng = fake_engines(model)
    p = prompts(1, seed=33, lo=5, hi=60)[0]
    for name, i in bad:
        value = BAD[name][i]
        with pytest.raises(ValueError, match=f"SamplingParams.{name}"):
            if mutate:  # a valid object changed after construction is caught again at submission
                sp = SamplingParams(**valid)
                setattr(sp, name, value)
                eng.add_request(p, sp)
            else:
                SamplingParams(**{**valid, name: value})
    # poison that passes validation and fails inside a step, next to a valid request
    bystander = eng.add_request(p, greedy(6))
    if poison == "accept":
        victim = eng.add_request(p[:20], SamplingParams(temperature=0, max_tokens=4, constraint=RaisingAccept(9)))
    elif poison == "sampling":
        sp = SamplingParams(temperature=0.5, seed=1, max_tokens=4)
        victim = eng.add_request(p[:20], sp)
        object.__setattr__(sp, "top_k", "x")  # bypasses validation: only the sampler can fail on it now
    elif poison == "forward":
        model.fail = 1
        victim = None
    if poison != "none":
        final = eng.run_to_completion([bystander] + ([victim] if victim else []))
        if victim is not None:
            assert final[victim].error is not None and final[victim].outputs[0].finish_reason == "abort"
            assert final[bystander].error is None  # the failure was this request's alone
            assert final[bystander].outputs[0].token_ids == model.reference_greedy(p, 6)
        else:  # the whole step failed: its requests fail, with the reason, and the engine lives on
            assert "device fell over" in final[bystander].error
            assert eng.stats["failed_steps"] == 1
    else:
        eng.run_to_completion([bystander])
    assert reference_tokens(eng) == reference_tokens(fake_engines())
    assert not eng.has_unfinished() and not eng.requests
    eng.block_manager.check_invariants([], eng.prefix_cache.held_pages())


def test_failed_step_fails_only_its_requests(fake_engines):
    model = FlakyModel(V)
    eng = fake_engines(model)
    eng.scheduler.max_tokens = 200
    ps = prompts(6, seed=34, lo=10, hi=40)
    ids = [eng.add_request(p, greedy(5)) for p in ps]  # 4 slots: two of them wait
    eng.step()
    model.fail = 1
    outs = {o.request_id: o for o in eng.step()}
    assert sorted(outs) == ids[:4] and all("device fell over" in o.error for o in outs.values())
    final = eng.run_to_completion(ids[4:])
    for rid, p in zip(ids[4:], ps[4:]):
        assert final[rid].error is None and final[rid].outputs[0].token_ids == model.reference_greedy(p, 5)


def test_async_stream_raises_for_the_failed_request_only(monkeypatch):
    patch_fake_cache(monkeypatch)
    model = FakeModel(V)
    allm = AsyncLLM(LLMEngine(model, None, max_num_seqs=4))
    ps = prompts(2, seed=35, lo=10, hi=40)

    async def main():
        bad = allm.generate(ps[0], SamplingParams(temperature=0, max_tokens=6, constraint=RaisingAccept(9)))
        good = allm.generate(ps[1], greedy(8))
        return await asyncio.gather(bad, good, return_exceptions=True)

    try:
        bad, good = asyncio.run(main())
        again = asyncio.run(allm.generate(ps[0], greedy(3)))
    finally:
        allm.shutdown()
    assert isinstance(bad, RequestFailed) and "grammar state machine crashed" in str(bad)
    assert good.outputs[0].token_ids == model.reference_greedy(ps[1], 8)
    assert again.outputs[0].token_ids == model.reference_greedy(ps[0], 3)


def test_failed_forward_on_the_real_model_leaves_the_cache_sound():
    """The tiny real V4 (hybrid cache: window ring, compressor tails, paged CSA/HCA entries, prefix snapshots) raising
    half-way through a forward: the requests of that step fail, later ones decode exactly as plain decoding."""
    from tests.engine.test_engine_model import TINY, engine, plain_greedy
    from tests.engine.test_engine_model import greedy as tiny_greedy
    from tests.engine.test_engine_model import prompts as tiny_prompts

    from dsv4.config import ModelConfig
    from dsv4.model.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_dict(TINY), dtype=torch.float32).init_weights(0).eval()
    llm = engine(model)
    ps = tiny_prompts(3, 20, 40, seed=36)
    layer = model.layers[2]
    real = layer.forward
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("layer 2 exploded")
        return real(*a, **k)

    layer.forward = flaky
    try:
        eng = llm.engine
        rid = eng.add_request(ps[0], tiny_greedy(4))
        eng.step()  # the prompt's forward (call 1) fine; the next decode fails after layers 0-1 wrote their state
        (out,) = eng.step()
        assert out.request_id == rid and "layer 2 exploded" in out.error
    finally:
        del layer.forward
    outs = llm.generate(ps, [tiny_greedy(6)] * 3)
    assert [o.outputs[0].token_ids for o in outs] == plain_greedy(model, ps, [6] * 3)
