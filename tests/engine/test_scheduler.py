"""Scheduler + block manager + prefix cache, without a model: chunking, budgets, preemption, abort, invariants."""

from __future__ import annotations

import random

import pytest

from dsv4.engine.block_manager import BlockManager
from dsv4.engine.prefix_cache import PrefixCache
from dsv4.engine.request import Sequence, SeqStatus
from dsv4.engine.sampling import SamplingParams
from dsv4.engine.scheduler import MIN_PREFILL, Scheduler
from dsv4.engine.step_cost import StepCost

P = 8  # small pages keep the tests readable


def make_seq(i: int, n_prompt: int, max_tokens: int = 4, first: int = 0) -> Sequence:
    prompt = [first + (i * 7 + j) % 50 for j in range(n_prompt)]
    return Sequence(i, f"r{i}", 0, prompt, SamplingParams(temperature=0, max_tokens=max_tokens), i, None)


def run_step(sched: Scheduler, next_token=lambda s: 1) -> list:
    """Simulate the engine: advance computed counts and append a token where a chunk reaches the end."""
    out = sched.schedule()
    for it in out.items:
        it.seq.num_computed += it.num_new
        if it.samples:
            it.seq.append_token(next_token(it.seq))
    sched.finish_step(out)
    return out


def live(sched: Scheduler) -> list[Sequence]:
    return list(sched.running) + [s for s in sched.waiting if s.pages or s.slot is not None]


def test_chunked_prefill_interleaves_with_decode():
    bm = BlockManager(num_pages=64, num_slots=4, page_size=P)
    sched = Scheduler(bm, max_num_batched_tokens=10)
    a, b = make_seq(0, 3, max_tokens=6), make_seq(1, 25)
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    assert [(it.seq.seq_id, it.start, it.num_new) for it in out.items] == [(0, 0, 3), (1, 0, 7)]
    for it in out.items:
        it.seq.num_computed += it.num_new
    a.append_token(5)
    out = sched.schedule()
    # a decodes one token, b gets the rest of the budget for its next chunk
    got = [(it.seq.seq_id, it.start, it.num_new, it.samples) for it in out.items]
    assert got == [(0, 3, 1, True), (1, 7, 9, False)]
    assert out.num_tokens == 10


def test_token_budget_and_slots_respected_and_all_finish():
    rng = random.Random(0)
    bm = BlockManager(num_pages=200, num_slots=3, page_size=P)
    sched = Scheduler(bm, max_num_batched_tokens=16)
    seqs = [make_seq(i, rng.randint(1, 40), max_tokens=rng.randint(1, 9)) for i in range(10)]
    for s in seqs:
        sched.add(s)
    steps = 0
    while sched.has_work():
        out = run_step(sched)
        assert out.num_tokens <= 16
        assert len(sched.running) <= 3
        bm.check_invariants(live(sched))
        steps += 1
        assert steps < 500
    assert all(s.is_finished and s.finish_reason == "length" for s in seqs)
    assert all(s.num_output_tokens == s.params.max_tokens for s in seqs)
    assert bm.num_free_pages == 200 and bm.num_free_slots == 3


def test_preemption_by_recompute_when_pages_run_out():
    # 6 pages of 8 tokens: two sequences of 20 prompt + 12 output need 4 pages each, so one must be preempted.
    bm = BlockManager(num_pages=6, num_slots=4, page_size=P)
    sched = Scheduler(bm, max_num_batched_tokens=64)
    a, b = make_seq(0, 20, max_tokens=12), make_seq(1, 20, max_tokens=12)
    sched.add(a)
    sched.add(b)
    preempted = []
    while sched.has_work():
        out = run_step(sched, next_token=lambda s: 2 + s.num_output_tokens)
        preempted += out.preempted
        bm.check_invariants(live(sched))
    assert preempted and preempted[0] is b  # the later arrival is the victim
    assert b.num_preemptions >= 1
    # recompute keeps the generated tokens: output is what it would have been without preemption
    assert a.output_token_ids == b.output_token_ids == [2 + i for i in range(12)]
    assert bm.num_free_pages == 6


def test_abort_frees_pages_anytime():
    bm = BlockManager(num_pages=20, num_slots=2, page_size=P)
    sched = Scheduler(bm, max_num_batched_tokens=8)
    a, b, c = make_seq(0, 30), make_seq(1, 5), make_seq(2, 5)
    for s in (a, b, c):
        sched.add(s)
    run_step(sched)  # a mid-prefill, b/c waiting
    sched.abort(a)  # running, mid-prefill
    sched.abort(c)  # waiting
    assert a.finish_reason == "abort" and c.finish_reason == "abort"
    bm.check_invariants(live(sched))
    while sched.has_work():
        run_step(sched)
    assert b.finish_reason == "length"
    assert bm.num_free_pages == 20 and bm.num_free_slots == 2


def test_prefix_cache_hit_reuses_pages_and_chunks_on_boundaries():
    bm = BlockManager(num_pages=30, num_slots=2, page_size=P)
    pc = PrefixCache(bm, max_entries=4)
    sched = Scheduler(bm, max_num_batched_tokens=13, prefix_cache=pc, snapshot_interval=2)
    shared = list(range(100, 120))  # 20 tokens: 2 full pages + 4
    a = Sequence(0, "a", 0, shared + [1, 2, 3], SamplingParams(temperature=0, max_tokens=2), 0, None)
    sched.add(a)
    snaps = []
    while sched.has_work():
        out = sched.schedule()
        assert all(it.start % P == 0 or not it.seq.in_prefill for it in out.items if it.start < 16)
        for it in out.items:
            it.seq.num_computed += it.num_new
            if it.snapshot:
                snaps.append(it.seq.num_computed)
                pc.insert(it.seq.tokens, it.seq.pages, it.seq.num_computed, snapshot=("snap", it.seq.num_computed))
            if it.samples:
                it.seq.append_token(7)
        sched.finish_step(out)
    # chunks end at 8 (budget 13 clipped to a page), 16 (the prompt's last boundary, also the interval)
    assert snaps == [16]
    b = Sequence(1, "b", 0, shared + [9, 9, 9, 9, 9], SamplingParams(temperature=0, max_tokens=1), 1, None)
    sched.add(b)
    out = sched.schedule()
    assert out.restores == [(b.slot, ("snap", 16))]
    assert out.items[0].start == 16 and b.num_cached_tokens == 16
    bm.check_invariants(live(sched), pc.held_pages())
    assert bm.ref[b.pages[0]] == 2  # shared with the cache entry


def test_prefix_cache_eviction_under_memory_pressure():
    bm = BlockManager(num_pages=4, num_slots=1, page_size=P)
    pc = PrefixCache(bm, max_entries=8)
    pc_seq = make_seq(0, 16)
    bm.grow(pc_seq, 16)
    pc.insert(pc_seq.tokens, pc_seq.pages, 16, snapshot=None)
    bm.free(pc_seq)
    assert bm.num_free_pages == 2  # 2 pages held by the cache only
    other = make_seq(1, 32)
    assert bm.grow(other, 32)  # needs all 4: the cache entry is evicted
    assert not pc.entries
    bm.check_invariants([other])


@pytest.mark.parametrize("seed", range(5))
def test_random_workload_invariants(seed):
    rng = random.Random(seed)
    bm = BlockManager(num_pages=rng.randint(8, 20), num_slots=rng.randint(1, 4), page_size=P)
    pc = PrefixCache(bm, max_entries=3) if seed % 2 else None
    sched = Scheduler(bm, max_num_batched_tokens=rng.randint(4, 24), prefix_cache=pc)
    seqs = []
    for step in range(300):
        if rng.random() < 0.3 and len(seqs) < 15:
            s = make_seq(len(seqs), rng.randint(1, 30), max_tokens=rng.randint(1, 20), first=rng.randint(0, 1))
            seqs.append(s)
            sched.add(s)
        if seqs and rng.random() < 0.05:
            sched.abort(rng.choice(seqs))
        out = sched.schedule()
        for it in out.items:
            it.seq.num_computed += it.num_new
            if it.snapshot and pc is not None:
                pc.insert(it.seq.tokens, it.seq.pages, it.seq.num_computed, None)
            if it.samples:
                it.seq.append_token(3)
        sched.finish_step(out)
        bm.check_invariants(live(sched), pc.held_pages() if pc else ())
    while sched.has_work():
        run_step(sched)
    assert all(s.status == SeqStatus.FINISHED for s in seqs)
    if pc:
        pc.clear()
    assert bm.num_free_pages == bm.num_pages


@pytest.mark.parametrize("cached", [True, False])
def test_sibling_waits_for_its_leaders_prompt_only_with_prefix_caching(cached):
    bm = BlockManager(num_pages=64, num_slots=4, page_size=P)
    sched = Scheduler(bm, max_num_batched_tokens=30, prefix_cache=PrefixCache(bm, 8) if cached else None)
    lead = make_seq(0, 20)  # its last page boundary: 16
    sib = Sequence(1, "r0", 1, list(lead.prompt_token_ids), lead.params, 1, None)
    sib.leader = lead
    other = make_seq(2, 3)
    for s in (lead, sib, other):
        sched.add(s)
    out = run_step(sched)
    # with prefix caching the sibling is passed over until the leader has computed up to 16 (then its prompt's
    # snapshot exists) and the later request goes first; without it the sibling is admitted in arrival order
    assert [it.seq.seq_id for it in out.items] == ([0, 2] if cached else [0, 1])
    if cached:
        assert lead.num_computed == 16 and sib in sched.waiting
        out = run_step(sched)
        assert 1 in [it.seq.seq_id for it in out.items]


# ---- fairness: a long prefill shares each step with decodes and with new short requests ------------------------
def test_decodes_go_before_an_earlier_prefill():
    """A long prompt that arrived first no longer takes the whole budget from a sequence decoding after it: the short
    request is admitted through the reserve, then decodes one token every step until it is done."""
    bm = BlockManager(num_pages=64, num_slots=4, page_size=P)
    sched = Scheduler(bm, max_num_batched_tokens=10, admission_reserve=2)
    long, short = make_seq(0, 200), make_seq(1, 2, max_tokens=5)
    sched.add(long)
    run_step(sched)  # long: 10 tokens of its prompt
    sched.add(short)
    steps = 0
    while not short.is_finished:
        out = run_step(sched)
        steps += 1
        assert out.num_tokens == 10  # the rest of every step still goes to the long prefill
    assert steps == 5 and long.num_computed < 200  # one step to prefill + first token, then 4 decodes


def test_prefill_leaves_the_reserve_to_a_request_that_arrives_mid_prefill():
    bm = BlockManager(num_pages=64, num_slots=4, page_size=P)
    sched = Scheduler(bm, max_num_batched_tokens=16, admission_reserve=4)
    long = make_seq(0, 300)
    sched.add(long)
    out = run_step(sched)
    assert [(it.seq.seq_id, it.num_new) for it in out.items] == [(0, 16)]  # nothing waits: the whole budget
    short = make_seq(1, 3, max_tokens=2)
    sched.add(short)
    out = run_step(sched)
    # the prefill yields 4 tokens: the short prompt is computed whole and samples its first token this very step
    assert [(it.seq.seq_id, it.num_new, it.samples) for it in out.items] == [(0, 12, False), (1, 3, True)]
    out = run_step(sched)
    assert [(it.seq.seq_id, it.num_new) for it in out.items] == [(1, 1), (0, 15)]  # decode first, no reserve
    assert short.is_finished


def test_short_requests_ttft_stays_bounded_while_a_30k_prompt_prefills():
    """The engine's default budget (512, reserve 128) with a 30K-token prompt: a short request arriving every few
    steps gets its first token in the step it is admitted, never after the long prefill; the long prompt still
    progresses at >= 3/4 of the budget."""
    bm = BlockManager(num_pages=400, num_slots=8, page_size=128)
    sched = Scheduler(bm, max_num_batched_tokens=512)
    long = make_seq(0, 30_000, max_tokens=1)
    sched.add(long)
    arrivals: dict[int, int] = {}
    first_token: dict[int, int] = {}
    shorts: list[Sequence] = []
    step = 0
    while not long.is_finished:
        if step % 5 == 1:
            shorts.append(make_seq(len(shorts) + 1, 40, max_tokens=3))
            arrivals[shorts[-1].seq_id] = step
            sched.add(shorts[-1])
        run_step(sched)
        for s in shorts:
            if s.num_output_tokens and s.seq_id not in first_token:
                first_token[s.seq_id] = step
        step += 1
        assert step < 200
    waits = [first_token[i] - arrivals[i] for i in first_token]
    assert len(waits) >= 10 and max(waits) == 0, waits  # first token in the step of arrival
    assert step <= -(-30_000 // 384) + 2  # 30K prompt at >= 384 tokens per step
    bm.check_invariants(live(sched))


def _cost(fixed_ms: float, per_token_ms: float, target_ms: float = 50.0) -> StepCost:
    """A StepCost that has measured `fixed_ms` a step and `per_token_ms` a token, whatever the context."""
    cost = StepCost(target_ms)
    cost.observe([(1, 0)], fixed_ms / 1e3)
    cost.observe([(100, 0)], (fixed_ms + 100 * per_token_ms) / 1e3)
    return cost


def test_step_cost_learns_fixed_cost_and_per_token_line():
    cost = StepCost(target_ms=50.0)
    assert not cost.measured and cost.tokens_within(50.0, 0) == 0
    for i in range(20):
        start = 1000 * i
        cost.observe([(1, start)], 0.010)  # a decode step: 10 ms
        # a 200-token chunk from `start`: 10 ms + (0.2 + 0.0001 * ctx) ms a token
        cost.observe([(200, start)], (10 + sum(0.2 + 1e-4 * (start + j) for j in range(200))) / 1e3)
    assert cost.fixed_ms == pytest.approx(10.0) and cost.a == pytest.approx(0.2) and cost.b == pytest.approx(1e-4)
    assert cost.cost_ms(200, 5000) == pytest.approx(sum(0.2 + 1e-4 * (5000 + j) for j in range(200)))
    n = cost.tokens_within(40.0, 30_000)  # deep in a prompt a token costs 3.2 ms: 12 fit in 40 ms
    assert n == 12 and cost.cost_ms(n, 30_000) <= 40.0 < cost.cost_ms(n + 1, 30_000)
    for _ in range(20):
        cost.observe([(1, 0)], 0.040)  # a slow model: a one-token step of 40 ms; the target becomes 4 x that
    assert cost.step_target_ms == pytest.approx(160.0, rel=1e-3)
    with pytest.raises(ValueError, match="target_ms"):
        StepCost(target_ms=0)


def test_shared_steps_are_sized_by_time_a_lone_prefill_by_tokens():
    bm = BlockManager(num_pages=400, num_slots=4, page_size=P)
    # 10 ms a step + 1 ms a token, 50 ms target: a shared step holds 40 tokens
    sched = Scheduler(bm, max_num_batched_tokens=64, admission_reserve=8, step_cost=_cost(10.0, 1.0))
    long = make_seq(0, 1000)
    sched.add(long)
    out = run_step(sched)
    assert [(it.seq.seq_id, it.num_new) for it in out.items] == [(0, 64)]  # alone: the whole token budget
    short = make_seq(1, 3, max_tokens=3)
    sched.add(short)
    out = run_step(sched)
    # shared: 40 tokens in all, of which the reserve (8) is left to the request that waits
    assert [(it.seq.seq_id, it.num_new) for it in out.items] == [(0, 32), (1, 3)]
    out = run_step(sched)
    assert [(it.seq.seq_id, it.num_new) for it in out.items] == [(1, 1), (0, 39)]  # the decode counts too
    sched.step_cost = _cost(10.0, 100.0)  # a step can afford no prefill by time: MIN_PREFILL tokens still go
    out = run_step(sched)
    assert [(it.seq.seq_id, it.num_new) for it in out.items] == [(1, 1), (0, MIN_PREFILL)]
    bm.check_invariants(live(sched))


def test_time_sized_steps_keep_ttft_short_deep_into_a_30k_prompt():
    """A simulated engine whose tokens cost more as the long prompt's history grows (as attention does): with a
    StepCost fed those costs, the steps that short requests share stay near the time target all the way, while without
    one they grow with the history."""

    def step_ms(out) -> float:
        return 5.0 + sum(0.05 + 2e-5 * (it.start + j) for it in out.items for j in range(it.num_tokens))

    def shared_steps(cost: StepCost | None) -> list[float]:
        bm = BlockManager(num_pages=400, num_slots=8, page_size=128)
        sched = Scheduler(bm, max_num_batched_tokens=512, step_cost=cost)
        long = make_seq(0, 30_000, max_tokens=1)
        sched.add(long)
        shared, step = [], 0
        while not long.is_finished:
            if step % 5 == 1:
                sched.add(make_seq(step + 1, 40, max_tokens=2))
            share = len(sched.running) + len(sched.waiting) > 1
            out = run_step(sched)
            ms = step_ms(out)
            if cost is not None:
                cost.observe([(it.num_tokens, it.start) for it in out.items], ms / 1e3)
            if share:
                shared.append(ms)
            step += 1
            assert step < 3000
        return shared[len(shared) // 2:]  # the second half of the prompt: deep history

    timed, untimed = shared_steps(StepCost(target_ms=50.0)), shared_steps(None)
    assert max(timed) <= 50.0 * 1.2, max(timed)  # the fixed cost is measured with a decode in it: a little over
    assert min(untimed) > 2 * 50.0, min(untimed)
