"""LLMEngine (the step loop) and LLM (the vLLM-shaped offline API).

One engine step = schedule -> restore prefix snapshots -> one `forward_batch` -> prefix snapshots -> sample ->
(speculative: accept/reject drafts, draft next tokens with MTP) -> free finished sequences. Everything is synchronous
and single-threaded; `AsyncLLM` (async_llm.py) drives the same engine from a background thread for the server.

Requests are validated completely in `add_request` before anything is queued, so a bad request raises `ValueError`
and leaves every other request untouched. What still fails inside a step (a model error, a constraint or tokenizer
that raises) ends only the requests it concerns, with `RequestOutput.error` set; the engine carries on.
"""

from __future__ import annotations

import itertools
import logging
import random
import threading
import time
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dsv4 import ops
from dsv4.engine.block_manager import BlockManager
from dsv4.engine.config import EngineConfig
from dsv4.engine.prefix_cache import PrefixCache
from dsv4.engine.request import RequestOutput, Sequence, SeqStatus
from dsv4.engine.runner import ModelRunner
from dsv4.engine.sampler import Sampler
from dsv4.engine.sampling import SamplingParams
from dsv4.engine.scheduler import Scheduler, SchedulerOutput
from dsv4.engine.step_cost import StepCost
from dsv4.ops.cpu import native_status

PromptType = str | list[int]
_log = logging.getLogger("dsv4.engine")


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)

    def output(self, delta: bool = False) -> RequestOutput:
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            outputs=[s.completion_output(delta) for s in self.seqs],
            finished=self.finished,
            num_cached_tokens=sum(s.num_cached_tokens for s in self.seqs),
            prompt_logprobs=list(self.seqs[0].prompt_logprobs) if self.seqs[0].prompt_logprobs is not None else None,
        )


def _model_config(model: Any) -> Any:
    cfg = getattr(model, "config", None) or getattr(model, "args", None)
    if cfg is None:
        raise TypeError(f"{type(model).__name__} has no .config; pass a dsv4 Transformer")
    return cfg


class LLMEngine:
    def __init__(self, model: Any, tokenizer: Any = None, config: EngineConfig | None = None, **options: Any) -> None:
        self.config = config or EngineConfig.from_kwargs(**options)
        if self.config.num_threads is not None:
            torch.set_num_threads(self.config.num_threads)
        self.model = model
        self.tokenizer = tokenizer
        self.tokenizer_error: str | None = None
        self.model_config = _model_config(model)
        self.vocab_size = int(self.model_config.vocab_size)
        eos = getattr(self.model_config, "eos_token_id", None)
        eos = eos[0] if isinstance(eos, (tuple, list)) else eos
        self.eos_token_id = getattr(tokenizer, "eos_id", None) if tokenizer is not None else eos
        if self.eos_token_id is None:
            self.eos_token_id = eos
        param = next(model.parameters())
        self.device = param.device
        c = self.config

        from dsv4.engine.cache_budget import build_cache  # sizing lives next to the cache maths

        self.cache, num_pages, self.cache_bytes = build_cache(model, c, self.device)
        self.block_manager = BlockManager(num_pages, c.max_num_seqs, c.page_size)
        self.prefix_cache = PrefixCache(self.block_manager, c.max_prefix_snapshots) if c.enable_prefix_caching else None
        self.step_cost = StepCost(c.max_step_ms) if c.max_step_ms is not None else None
        self.scheduler = Scheduler(
            self.block_manager, c.max_num_batched_tokens, self.prefix_cache, c.prefix_snapshot_interval,
            c.admission_reserve, self.step_cost,
        )
        self.runner = ModelRunner(model, self.cache, self.device)
        self.sampler = Sampler()
        max_len = int(getattr(self.model_config, "max_position_embeddings", 1 << 20))
        self.max_model_len = min(c.max_model_len or max_len, max_len, num_pages * c.page_size)
        self.speculator = None
        if c.speculative:
            from dsv4.engine.speculative import MTPSpeculator

            self.speculator = MTPSpeculator(model, self.cache, self.device)
        self.requests: dict[str, _Request] = {}
        self._seq_ids = itertools.count()
        self._arrival = itertools.count()
        self._req_counter = itertools.count()
        self._seed_rng = random.Random(c.seed)
        self.lock = threading.RLock()  # AsyncLLM adds/aborts from another thread
        # Counters since start (read by the server's /metrics without the lock; plain ints).
        self.stats = {"steps": 0, "failed_steps": 0, "drafted": 0, "accepted": 0, "prompt_tokens": 0,
                      "cached_tokens": 0, "preemptions": 0}

    # --- requests ----------------------------------------------------------------------------------------------
    def _tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                why = f" ({self.tokenizer_error})" if self.tokenizer_error else ""
                raise ValueError(
                    f"a string prompt needs a tokenizer and this engine has none{why}: pass tokenizer=... (a "
                    "dsv4.chat.Tokenizer or a tokenizer.json path), or give the prompt as a list of token ids"
                )
            return prompt, list(self.tokenizer.encode(prompt))
        if isinstance(prompt, torch.Tensor):
            prompt = prompt.tolist()
        if not isinstance(prompt, SequenceABC) or not all(isinstance(t, int) for t in prompt):
            raise ValueError(f"a prompt must be a string or a list of int token ids, got {type(prompt).__name__}")
        return None, list(prompt)

    def validate(self, prompt: PromptType, params: SamplingParams) -> tuple[str | None, list[int]]:
        """Everything that can be wrong with a request, checked before it is queued."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be a dsv4.SamplingParams, got {type(params).__name__}")
        params.validate()  # again: fields may have been changed since construction
        text, ids = self._tokenize(prompt)
        n = len(ids)
        if n == 0:
            raise ValueError("the prompt is empty: give at least one token")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token id(s) {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        if n >= self.max_model_len:
            raise ValueError(
                f"the prompt has {n} tokens but the context length is {self.max_model_len} (including at least one "
                f"generated token); shorten the prompt or raise max_model_len / cache_memory_gb"
            )
        if params.max_tokens is not None and n + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"prompt ({n} tokens) + max_tokens ({params.max_tokens}) = {n + params.max_tokens} exceeds the "
                f"context length {self.max_model_len}; lower max_tokens to at most {self.max_model_len - n}"
            )
        if params.constraint is not None and params.n > 1:
            raise ValueError("a constraint object tracks one sequence; use n=1 with a constraint")
        bad_stop = [t for t in params.stop_token_ids if t >= self.vocab_size]
        if bad_stop:
            raise ValueError(f"stop_token_ids {bad_stop} are outside the vocabulary [0, {self.vocab_size})")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer to detokenize the output; use stop_token_ids instead")
        return text, ids

    def add_request(self, prompt: PromptType, params: SamplingParams, request_id: str | None = None) -> str:
        with self.lock:
            text, ids = self.validate(prompt, params)
            request_id = str(next(self._req_counter)) if request_id is None else str(request_id)
            if request_id in self.requests:
                raise ValueError(f"request_id {request_id!r} is already in use; request ids must be unique")
            seqs = []
            for i in range(params.n):
                gen = None
                if not params.greedy:
                    seed = params.seed + i if params.seed is not None else self._seed_rng.getrandbits(63)
                    gen = torch.Generator(device=self.device).manual_seed(seed)
                seqs.append(
                    Sequence(
                        next(self._seq_ids), request_id, i, ids, params, next(self._arrival), gen,
                        self.tokenizer, self.eos_token_id, self.max_model_len,
                    )
                )
            for s in seqs[1:]:
                s.leader = seqs[0]  # siblings reuse the leader's prompt through the prefix cache (scheduler)
            self.requests[request_id] = _Request(request_id, text, ids, params, seqs)
            self.stats["prompt_tokens"] += len(ids) * params.n
            for s in seqs:
                self.scheduler.add(s)
            return request_id

    def abort(self, request_id: str) -> RequestOutput | None:
        with self.lock:
            req = self.requests.pop(request_id, None)
            if req is None:
                return None
            for s in req.seqs:
                if not s.is_finished:
                    self.scheduler.abort(s)
            return req.output()

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # --- the step ----------------------------------------------------------------------------------------------
    def step(self, delta: bool = False) -> list[RequestOutput]:
        """Run one forward; return an output for every request that made progress (finished ones are dropped).

        An exception inside the step (the forward, the drafter, one sequence's sampling or stop logic) fails only the
        requests it concerns, with `error` set on their outputs; the engine stays usable for everything else."""
        with self.lock:
            out = self.scheduler.schedule()
            if out.empty:
                if self.scheduler.waiting and not self.scheduler.running and not out.preempted:
                    raise RuntimeError(
                        "the engine cannot admit any waiting request: the KV cache is too small for its first "
                        "chunk; raise cache_memory_gb / num_pages or lower max_num_batched_tokens"
                    )
                return []
            with ops.use_backend("cpu", self.config.backend):  # the ops' CPU kernels for this engine's steps
                try:
                    t0 = time.perf_counter()
                    touched = self._execute(out)
                    if self.step_cost is not None:
                        self.step_cost.observe([(it.num_tokens, it.start) for it in out.items],
                                               time.perf_counter() - t0)
                except Exception as err:  # noqa: BLE001 - whatever broke, it must not outlive this step's requests
                    touched = self._fail_step(out, err)
            self._fail_siblings(touched)
            self.scheduler.finish_step(out)
            self.stats["steps"] += 1
            self.stats["cached_tokens"] = self.scheduler.num_cached_tokens
            self.stats["preemptions"] = self.scheduler.num_preemptions
            results = []
            for rid in dict.fromkeys(s.request_id for s in touched):
                req = self.requests.get(rid)
                if req is None:
                    continue
                results.append(req.output(delta))
                if req.finished:
                    del self.requests[rid]
            return results

    def _fail_step(self, out: SchedulerOutput, err: Exception) -> list[Sequence]:
        """The step died part-way, so nothing it computed can be trusted: end every sequence it scheduled. Their
        pages and slots are freed by `finish_step`; prefix-cache entries are only ever inserted from completed
        forwards, and a freed page is rewritten before anyone reads it, so no other request sees this step's state."""
        self.stats["failed_steps"] += 1
        _log.error("engine step failed; aborting its %d sequence(s)", len(out.items), exc_info=err)
        msg = f"the engine step failed ({type(err).__name__}: {err}); this request was aborted"
        for it in out.items:
            it.seq.fail(msg)
        return [it.seq for it in out.items]

    def _fail_seq(self, seq: Sequence, what: str, err: Exception) -> None:
        _log.warning("request %s failed while %s", seq.request_id, what, exc_info=err)
        seq.fail(f"{what} failed ({type(err).__name__}: {err}); this request was aborted")

    def _fail_siblings(self, touched: list[Sequence]) -> None:
        """A request fails as a whole: end the unfinished siblings of a failed sequence (n > 1)."""
        for rid in dict.fromkeys(s.request_id for s in touched if s.error is not None):
            req = self.requests.get(rid)
            for s in req.seqs if req is not None else []:
                if not s.is_finished:
                    self.scheduler.abort(s)
                    s.fail(f"sequence {next(x.index for x in req.seqs if x.error)} of this request failed")

    def _take_token(self, seq: Sequence, draft: int | None, start: int, tok: int, lp: Any, rollback: dict) -> bool:
        """Append a sampled token (accepting or rejecting a draft); True when an accepted draft earns a second one."""
        if tok < 0:  # the sampler could not give this sequence a token: end it, alone
            seq.draft_token = None
            if seq.error is not None:
                seq.fail(seq.error)
            else:
                seq.finish_reason, seq.stop_reason = "abort", seq.constraint_error
                seq.status = SeqStatus.FINISHED
            return False
        more = False
        if draft is not None:
            self.stats["drafted"] += 1
            if tok == draft:
                self.stats["accepted"] += 1
                seq.append_token(tok, lp)
                seq.num_computed += 1  # the draft's KV is valid: it is the token we sampled
                more = not seq.is_finished
            else:
                # Rejected: restore the pre-verify state and recompute [last, corrected] next step. The window
                # ring and the compressor tails were written for the draft, so they cannot simply be kept.
                self.cache.restore_rows(rollback[seq.seq_id])
                seq.num_computed = start
                seq.append_token(tok, lp)
        else:
            seq.append_token(tok, lp)
        seq.draft_token = None
        return more

    def _execute(self, out: SchedulerOutput) -> list[Sequence]:
        for slot, snap in out.restores:
            self.cache.restore_state(slot, snap)
        spec = self.speculator
        # Verify steps write state for the draft too; keep a copy of the rows they overwrite to roll back a rejection.
        rollback = {it.seq.seq_id: self.cache.snapshot_rows(it.seq.slot, [it.start + j for j in range(it.num_tokens)])
                    for it in out.items if it.draft is not None}
        res = self.runner.run(out)
        touched: list[Sequence] = []
        # 1. cache bookkeeping
        for it in out.items:
            it.seq.num_computed += it.num_new
        # 2. prompt logprobs (SamplingParams.prompt_logprobs), from the raw model distribution like `logprobs`
        for k, row, first, count in res.prompt_rows:
            seq = out.items[k].seq
            lp = torch.log_softmax(res.logits[row:row + count], dim=-1)  # [count, V]
            targets = seq.tokens[first + 1:first + 1 + count]
            own = lp.gather(1, torch.tensor(targets, device=lp.device)[:, None])[:, 0].tolist()
            top_n = seq.params.prompt_logprobs
            top = lp.topk(top_n, dim=-1) if top_n else None
            for j, (tok, val) in enumerate(zip(targets, own)):
                d = dict(zip(top.indices[j].tolist(), top.values[j].tolist())) if top is not None else {}
                d[tok] = val
                seq.prompt_logprobs.append(d)
        # 3. first token of every sampling item
        sampling = [(k, it) for k, it in enumerate(out.items) if it.samples]
        first_rows = [res.rows[k][0] for k, _ in sampling]
        seqs = [it.seq for _, it in sampling]
        # Plain decode steps use every logits row in order: skip the [M, V] gather copy then.
        rows_t = res.logits if first_rows == list(range(res.logits.shape[0])) else res.logits[first_rows]
        firsts = self.sampler(rows_t, seqs) if sampling else []
        second: list[tuple[int, Any]] = []
        for (k, it), (tok, lp) in zip(sampling, firsts):
            try:
                if self._take_token(it.seq, it.draft, it.start, tok, lp, rollback):
                    second.append((k, it))
            except Exception as err:  # noqa: BLE001 - e.g. a constraint's accept() or the detokenizer raised
                self._fail_seq(it.seq, "taking the sampled token", err)
            touched.append(it.seq)
        # 4. accepted drafts: their own logits give one more token
        if second:
            rows = [res.rows[k][1] for k, _ in second]
            for (k, it), (tok, lp) in zip(second, self.sampler(res.logits[rows], [it.seq for _, it in second])):
                try:
                    self._take_token(it.seq, None, it.start, tok, lp, rollback)
                except Exception as err:  # noqa: BLE001
                    self._fail_seq(it.seq, "taking the sampled token", err)
        # 5. MTP over every position computed this step (keeps its window complete); drafts for the next decodes
        if spec is not None:
            spec.draft(out, res, self.stats)
        # 6. prefix snapshots: chunks that end on a page boundary (mid-prompt, so nothing above changed their state)
        if self.prefix_cache is not None:
            for it in out.items:
                s = it.seq
                if it.snapshot and not self.prefix_cache.contains(s.tokens, s.num_computed):
                    snap = self.cache.snapshot_state(s.slot)
                    self.prefix_cache.insert(s.tokens, s.pages, s.num_computed, snap)
        return touched

    # --- offline API -------------------------------------------------------------------------------------------
    def run_to_completion(self, request_ids: list[str]) -> dict[str, RequestOutput]:
        pending = set(request_ids)
        final: dict[str, RequestOutput] = {}
        while pending:
            if not self.has_unfinished():
                raise RuntimeError(f"requests {sorted(pending)} vanished without finishing (aborted?)")
            for o in self.step():
                if o.finished and o.request_id in pending:
                    final[o.request_id] = o
                    pending.discard(o.request_id)
        return final

    @property
    def acceptance_rate(self) -> float | None:
        d = self.stats["drafted"]
        return self.stats["accepted"] / d if d else None


class LLM:
    """`dsv4.LLM(model_path_or_model, dtype=..., device=..., **engine options)` with vLLM's `generate`."""

    def __init__(
        self,
        model: str | Path | torch.nn.Module,
        *,
        tokenizer: Any = None,
        dtype: torch.dtype | str = torch.bfloat16,
        device: str | torch.device = "cpu",
        weights: str = "stored",
        head_dtype: torch.dtype = torch.float32,
        **engine_options: Any,
    ) -> None:
        config = EngineConfig.from_kwargs(**engine_options)
        tokenizer_error = None
        if isinstance(model, (str, Path)):
            import dsv4

            if isinstance(dtype, str):
                dtype = getattr(torch, dtype)
            path = Path(model)
            # weights / head_dtype: how the projection weights and the head are held (dsv4.load_model)
            model = dsv4.load_model(path, dtype=dtype, device=device, weights=weights, head_dtype=head_dtype)
            if model.device.type == "cpu" and dtype != torch.float32:
                with ops.use_backend("cpu", config.backend):
                    native = native_status()[0]
                if native:  # the native kernels compute in fp32: fp32 activations (and KV cache) save conversions
                    model.set_activation_dtype(torch.float32)
            if tokenizer is None:
                from dsv4.chat import load_tokenizer

                try:
                    tokenizer = load_tokenizer(path)
                except (FileNotFoundError, ValueError) as err:
                    # Token-id prompts still work; a string prompt then raises with this reason.
                    tokenizer_error = str(err)
        elif not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a checkpoint path or a dsv4 Transformer, got {type(model).__name__}")
        if isinstance(tokenizer, (str, Path)):
            from dsv4.chat import load_tokenizer

            tokenizer = load_tokenizer(tokenizer)
        self.engine = LLMEngine(model.eval(), tokenizer, config)
        self.engine.tokenizer_error = tokenizer_error

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: PromptType | list[PromptType],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        # A single prompt: a string, or a flat list of ints.
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(params)} sampling_params; give one or one each")
        for p, sp in zip(prompts, params):  # all-or-nothing: reject the batch before queueing any of it
            self.engine.validate(p, sp)
        ids = [self.engine.add_request(p, sp) for p, sp in zip(prompts, params)]
        final = self.engine.run_to_completion(ids)
        return [final[i] for i in ids]
