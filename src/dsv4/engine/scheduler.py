"""Scheduler: continuous batching over a per-step token budget, with chunked prefill, preemption and abort.

One call to `schedule()` decides the next forward, fairly: first every decoding sequence gets its next token (2 when
it carries an MTP draft), then prefilling sequences get chunks of what is left, in arrival order, but while new work
waits they leave `admission_reserve` tokens of the budget to it; then waiting sequences are admitted while the budget,
the state slots and the pages last. A long prompt is therefore split across steps and never holds back the decodes
of others nor the first chunk of a request that arrives during its prefill: a short request's first token comes
within about two steps, however long the prompt being prefilled. With a `StepCost` (engine/step_cost.py), prefill
chunks are also sized by time: in a step shared with other sequences, the chunks of prompts already started stay
within what the measured cost allows for the step's time target, so those two steps are short ones even deep into a
long prompt, where each token costs more.

When a running sequence needs a page and none is free, the most recently admitted sequence not yet given a chunk
this step is preempted *by recompute*: it drops its pages and slot and goes back to the front of the waiting queue
with its generated tokens, to be prefilled again later (the prefix cache may shorten that).

Plain deterministic Python over `Sequence` objects; it never touches tensors. It does not run the model, sample or
detokenize (`LLMEngine` does), and it does not know about speculative decoding beyond "this decode carries a draft".
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from dsv4.engine.block_manager import BlockManager
from dsv4.engine.prefix_cache import PrefixCache
from dsv4.engine.request import Sequence, SeqStatus
from dsv4.engine.step_cost import StepCost

MIN_PREFILL = 16  # prefill tokens a step always allows, however slow its decodes, so that prompts progress


@dataclass
class ScheduledSeq:
    seq: Sequence
    start: int  # first position computed this step (= tokens already in the cache)
    num_new: int  # tokens of `seq.tokens` computed this step
    draft: int | None = None  # an MTP draft token appended after them (speculative decoding)
    snapshot: bool = False  # take a prefix-cache snapshot after this step (chunk ends on a page boundary)
    # True when this chunk reaches the end of the known tokens, so its last logits give the next token. Fixed at
    # scheduling time (the sequence grows once the token is appended).
    samples: bool = field(init=False)

    def __post_init__(self) -> None:
        self.samples = self.start + self.num_new == self.seq.num_tokens

    @property
    def token_ids(self) -> list[int]:
        ids = self.seq.tokens[self.start : self.start + self.num_new]
        return ids + [self.draft] if self.draft is not None else ids

    @property
    def num_tokens(self) -> int:
        return self.num_new + (self.draft is not None)


@dataclass
class SchedulerOutput:
    items: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    restores: list[tuple[int, Any]] = field(default_factory=list)  # (slot, snapshot) to restore before the forward

    @property
    def num_tokens(self) -> int:
        return sum(i.num_tokens for i in self.items)

    @property
    def empty(self) -> bool:
        return not self.items


@dataclass
class _StepClock:
    """The time left in one shared step: decodes spend it first, running prefills get what fits of the rest, the
    first of them at least MIN_PREFILL tokens so that prompts always progress."""

    cost: StepCost
    left_ms: float
    prefilled: bool = False

    def cap(self, start: int) -> int:
        fits = self.cost.tokens_within(self.left_ms, start)
        return fits if self.prefilled else max(fits, MIN_PREFILL)

    def spend(self, tokens: int, start: int, prefill: bool) -> None:
        self.left_ms -= self.cost.cost_ms(tokens, start)
        self.prefilled |= prefill and tokens > 0


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_batched_tokens: int,
        prefix_cache: PrefixCache | None = None,
        snapshot_interval: int = 4,
        admission_reserve: int | None = None,
        step_cost: StepCost | None = None,
    ) -> None:
        if max_num_batched_tokens < 2:
            raise ValueError(f"max_num_batched_tokens must be >= 2, got {max_num_batched_tokens}")
        # Tokens of each step that running prefills leave to waiting requests (None: a quarter of the budget). The
        # cost is small: only while something waits, and a long prefill still gets the other three quarters.
        reserve = max_num_batched_tokens // 4 if admission_reserve is None else admission_reserve
        if not 0 <= reserve < max_num_batched_tokens:
            raise ValueError(f"admission_reserve must be in [0, {max_num_batched_tokens}), got {reserve}")
        self.admission_reserve = reserve
        self.bm = block_manager
        self.P = block_manager.page_size
        self.max_tokens = max_num_batched_tokens
        self.prefix_cache = prefix_cache
        self.snapshot_interval = snapshot_interval  # in pages, besides the prompt's last page boundary
        self.step_cost = step_cost
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache at first admission (all requests)

    # --- queue management --------------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, seq: Sequence) -> None:
        """Remove `seq` wherever it is and free its memory; safe between any two steps."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.bm.free(seq)
        seq.draft_token = None
        if not seq.is_finished:
            seq.abort()

    def _preempt(self, seq: Sequence) -> None:
        self.bm.free(seq)
        seq.num_computed = 0
        seq.draft_token = None
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    # --- chunking ----------------------------------------------------------------------------------------------
    def _snapshot_points(self, seq: Sequence) -> tuple[int, int]:
        """(interval in tokens, last boundary) of the page boundaries where a prefix snapshot is worth taking: every
        `snapshot_interval` pages, and the last boundary that leaves a prompt token to compute."""
        return self.snapshot_interval * self.P, (seq.num_prompt_tokens - 1) // self.P * self.P

    def _chunk(self, seq: Sequence, budget: int) -> tuple[int, bool]:
        """Tokens to compute for `seq` this step and whether its end is a snapshot point."""
        start = seq.num_computed
        remaining = seq.num_tokens - start
        n = min(remaining, budget)
        if self.prefix_cache is None or remaining == 1:
            return n, False
        # Chunk ends on page boundaries so that the slot state there can be snapshotted; never past the prompt's
        # last boundary in one go, so that boundary always gets a snapshot.
        interval, last = self._snapshot_points(seq)
        end = start + n
        if start < last < end:
            end = last
        elif end < seq.num_tokens and end // self.P * self.P > start:
            end = end // self.P * self.P
        snap = end % self.P == 0 and 0 < end <= last and (end % interval == 0 or end == last)
        return end - start, snap

    # --- the step ----------------------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_tokens
        # Decodes first, then prefills (stable sort: arrival order within each).
        order = sorted(self.running, key=lambda s: s.num_tokens - s.num_computed > 1)
        clock = self._step_clock()  # the step's time target, when it is shared and the cost is measured
        reserve = self.admission_reserve if self._can_admit() else 0
        scheduled: set[int] = set()  # seq ids given a chunk this step: never preempted to make room for another
        for seq in order:
            if budget <= 0:
                break
            if seq.status is not SeqStatus.RUNNING:  # preempted above to make room
                continue
            decoding = seq.num_tokens - seq.num_computed == 1
            if decoding:
                cap = budget
            else:
                cap = budget if clock is None else min(budget, clock.cap(seq.num_computed))
                cap -= min(reserve, cap)
            if cap <= 0:
                continue  # this prefill yields the rest of the step to waiting work
            n, snap = self._chunk(seq, cap)
            draft = seq.draft_token if (decoding and n == 1 and budget >= 2) else None
            total = n + (draft is not None)
            preempted_self = False
            while not self.bm.grow(seq, seq.num_computed + total):
                # the most recently admitted sequence without a chunk yet (seq itself at the latest)
                victim = next(s for s in reversed(self.running) if s.seq_id not in scheduled)
                self.running.remove(victim)
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    preempted_self = True
                    break
            if preempted_self:
                break
            out.items.append(ScheduledSeq(seq, seq.num_computed, n, draft, snap))
            scheduled.add(seq.seq_id)
            budget -= total
            if clock is not None:
                clock.spend(total, seq.num_computed, prefill=not decoding)
        # Admit new work only when nothing had to be preempted: memory is the bottleneck right now. In arrival order;
        # the first sequence that does not fit stops admission (no overtaking), a sibling waiting for its leader's
        # prompt is passed over.
        if not out.preempted:
            for seq in list(self.waiting):
                if budget <= 0 or self.bm.num_free_slots == 0:
                    break
                if self._awaits_leader(seq):
                    continue
                if not self._admit(seq, budget, out):
                    break
                budget -= out.items[-1].num_tokens
        return out

    def _step_clock(self) -> _StepClock | None:
        """The time left for the chunks of running prefills (prompts already started: the deep, dear tokens), when
        the step is shared by several sequences and the step cost has been measured. A prefill alone keeps the whole
        token budget (nobody waits on it, and fewer, larger chunks are faster), and so does each prompt's first chunk
        at admission (the cheapest tokens of a prompt; a batch of new requests is admitted at full speed)."""
        cost = self.step_cost
        if cost is None or not cost.measured or len(self.running) + len(self.waiting) <= 1:
            return None
        return _StepClock(cost, cost.step_target_ms - (cost.fixed_ms or 0.0))

    def _can_admit(self) -> bool:
        return self.bm.num_free_slots > 0 and any(not self._awaits_leader(s) for s in self.waiting)

    def _awaits_leader(self, seq: Sequence) -> bool:
        """A sibling of an n > 1 request waits until its leader has computed the prompt up to its last page
        boundary: that chunk leaves a prefix-cache snapshot, so the sibling computes only the prompt's tail instead of
        the whole prompt again. Without prefix caching, or once the leader is done, nothing waits."""
        lead = seq.leader
        if lead is None or self.prefix_cache is None or seq.num_computed or lead.is_finished:
            return False
        _, last = self._snapshot_points(lead)
        return lead.num_computed < last

    def _admit(self, seq: Sequence, budget: int, out: SchedulerOutput) -> bool:
        entry = None
        # prompt_logprobs need the logits of every prompt position, so such a prompt is computed in full
        if self.prefix_cache is not None and seq.num_computed == 0 and seq.prompt_logprobs is None:
            entry = self.prefix_cache.lookup(seq.tokens)
            if entry is not None:
                # Hold the shared pages before growing: growing may evict the entry itself.
                self.bm.incref(entry.pages)
                seq.pages = list(entry.pages)
                seq.num_computed = entry.num_tokens
        n, snap = self._chunk(seq, budget)
        if not self.bm.grow(seq, seq.num_computed + n):
            self.bm.free(seq)
            seq.num_computed = 0
            return False
        self.bm.take_slot(seq)
        if entry is not None:
            out.restores.append((seq.slot, entry.snapshot))
            if seq.num_preemptions == 0:
                seq.num_cached_tokens = entry.num_tokens
                self.num_cached_tokens += entry.num_tokens
        self.waiting.remove(seq)
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)
        out.items.append(ScheduledSeq(seq, seq.num_computed, n, None, snap))
        return True

    # --- after the forward -------------------------------------------------------------------------------------
    def finish_step(self, out: SchedulerOutput) -> list[Sequence]:
        """Drop finished sequences (their tokens were appended by the engine) and free their memory."""
        done = [s for s in self.running if s.is_finished]
        if done:
            self.running = [s for s in self.running if not s.is_finished]
            for s in done:
                self.bm.free(s)
        return done
