"""AsyncLLM: concurrent streams, deltas that add up, abort mid-stream, bad input rejected up front."""

from __future__ import annotations

import asyncio

import pytest

from dsv4.engine.async_llm import AsyncLLM
from dsv4.engine.llm import LLMEngine
from tests.engine.fakes import FakeModel, patch_fake_cache
from tests.engine.test_engine_fake import V, greedy, prompts

# An exception in the engine thread (which would stall every stream) must fail these tests, not just warn.
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")


def test_streams_abort_and_errors(monkeypatch):
    patch_fake_cache(monkeypatch)
    model = FakeModel(V)
    allm = AsyncLLM(LLMEngine(model, None, max_num_seqs=4, max_num_batched_tokens=64))
    ps = prompts(4, seed=20, lo=20, hi=120)

    async def consume(p, n, rid):
        toks, last = [], None
        async for out in allm.stream(p, greedy(n), request_id=rid):
            toks += out.outputs[0].delta_token_ids
            last = out
        assert toks == last.outputs[0].token_ids
        return last

    async def consume_and_stop(p, rid):
        got = 0
        async for out in allm.stream(p, greedy(200), request_id=rid):
            got += len(out.outputs[0].delta_token_ids)
            if got >= 3:
                break  # leaving the loop aborts the request
        return got

    async def main():
        with pytest.raises(ValueError, match="empty"):
            async for _ in allm.stream([], greedy(3)):
                pass
        res = await asyncio.gather(
            consume(ps[0], 12, "a"), consume(ps[1], 30, "b"), consume_and_stop(ps[2], "c"), consume(ps[3], 5, "d")
        )
        final = await allm.generate(ps[0], greedy(4))
        return res, final

    try:
        (a, b, c, d), final = asyncio.run(main())
    finally:
        allm.shutdown()
    for p, n, o in ((ps[0], 12, a), (ps[1], 30, b), (ps[3], 5, d)):
        assert o.finished and o.outputs[0].token_ids == model.reference_greedy(p, n)
    assert 3 <= c < 200
    assert final.outputs[0].token_ids == model.reference_greedy(ps[0], 4)
    eng = allm.engine
    assert not eng.has_unfinished() and not eng.requests
    eng.prefix_cache.clear()
    assert eng.block_manager.num_free_pages == eng.block_manager.num_pages


def test_stream_n2_deltas_per_choice_and_duplicate_id(monkeypatch):
    from dsv4.engine.sampling import SamplingParams

    patch_fake_cache(monkeypatch)
    allm = AsyncLLM(LLMEngine(FakeModel(V), None, max_num_seqs=4))
    p = prompts(1, seed=21)[0]

    async def main():
        got: dict[int, list[int]] = {0: [], 1: []}
        last = None
        params = SamplingParams(n=2, temperature=1.0, seed=5, max_tokens=7, ignore_eos=True, logprobs=1)
        async for out in allm.stream(p, params, request_id="x"):
            for co in out.outputs:
                got[co.index] += co.delta_token_ids
            last = out
        gen = allm.stream(p, greedy(50), request_id="y")
        await gen.__anext__()
        with pytest.raises(ValueError, match="already in use"):
            async for _ in allm.stream(p, greedy(2), request_id="y"):
                pass
        await gen.aclose()  # closing a stream early aborts its request
        return got, last

    try:
        got, last = asyncio.run(main())
    finally:
        allm.shutdown()
    assert [got[i] for i in (0, 1)] == [co.token_ids for co in last.outputs]
    assert all(len(co.logprobs) == 7 for co in last.outputs)
