"""Sequence state and the results handed back to users (vLLM-shaped `RequestOutput` / `CompletionOutput`).

A *request* (one prompt, one `SamplingParams`) owns `n` *sequences*; each sequence is what the scheduler moves between
queues and what holds cache resources (one state slot + pages). Sequence state is plain Python on purpose: the scheduler
and block manager are unit-tested on these objects without a model.

This module does not decide anything (no scheduling, no sampling); it records and reports.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import torch

from dsv4.engine.sampling import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None  # the stop token id / stop string that ended it
    # One dict per generated token: token id -> logprob (raw model distribution), top-n plus the sampled token.
    logprobs: list[dict[int, float]] | None = None
    # Streaming convenience: what is new since the previous output of this stream.
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    # Set (with finish_reason "abort") when the engine failed while working on this sequence: an exception in its
    # step, its sampling or its stop logic. The engine itself carries on with every other request.
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache (summed over the n sequences)
    # SamplingParams.prompt_logprobs: per prompt token, token id -> logprob (None for the first token); filled in as
    # the prompt is computed, complete once the first token has been generated
    prompt_logprobs: list[dict[int, float] | None] | None = None

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def completion_tokens(self) -> int:
        return sum(len(o.token_ids) for o in self.outputs)

    @property
    def cached_tokens(self) -> int:
        return self.num_cached_tokens

    @property
    def error(self) -> str | None:
        """Why the engine failed this request (the first failed sequence's reason), or None."""
        return next((o.error for o in self.outputs if o.error is not None), None)


class Detokenizer:
    """Incremental detokenization. Uses the tokenizer's own byte-exact incremental detokenizer when it has one
    (`dsv4.chat.Tokenizer.detokenizer`); otherwise the usual prefix/read offset scheme over `decode` (decoding the
    whole output every step is quadratic, and decoding token by token breaks characters split across tokens)."""

    def __init__(self, tokenizer: Any, skip_special_tokens: bool) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.prefix_offset = 0
        self.read_offset = 0
        make = getattr(tokenizer, "detokenizer", None)
        self.native = make(skip_special_tokens=skip_special_tokens) if callable(make) else None
        self.fed = 0

    def _decode(self, ids: list[int]) -> str:
        try:
            return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)
        except TypeError:  # tokenizers without the keyword
            return self.tokenizer.decode(ids)

    def step(self, ids: list[int]) -> str:
        """New text contributed by the tokens appended since the last call (may be "" while a character is split)."""
        if self.native is not None:
            text = "".join(self.native.add(t) for t in ids[self.fed :])
            self.fed = len(ids)
            return text
        prefix = self._decode(ids[self.prefix_offset : self.read_offset])
        full = self._decode(ids[self.prefix_offset :])
        if full.endswith("\ufffd") or len(full) <= len(prefix):
            return ""  # an incomplete UTF-8 sequence: wait for the next token
        self.prefix_offset = self.read_offset
        self.read_offset = len(ids)
        return full[len(prefix) :]


class Sequence:
    """One generation stream. `tokens` = prompt + output; `num_computed` of them are in the cache."""

    def __init__(
        self,
        seq_id: int,
        request_id: str,
        index: int,
        prompt_token_ids: list[int],
        params: SamplingParams,
        arrival: int,
        generator: torch.Generator | None,
        tokenizer: Any = None,
        eos_token_id: int | None = None,
        max_model_len: int | None = None,
    ) -> None:
        self.seq_id = seq_id
        self.request_id = request_id
        self.index = index
        self.prompt_token_ids = list(prompt_token_ids)
        self.tokens = list(prompt_token_ids)
        self.params = params
        self.arrival = arrival
        self.generator = generator
        self.status = SeqStatus.WAITING
        self.num_computed = 0
        self.num_cached_tokens = 0  # prompt tokens reused from the prefix cache at (first) admission
        # n > 1: sequence 0 of the request; the scheduler lets its siblings wait for its prompt's prefix snapshot
        self.leader: Sequence | None = None
        self.slot: int | None = None
        self.pages: list[int] = []
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.logprobs: list[dict[int, float]] | None = [] if params.logprobs is not None else None
        self.prompt_logprobs: list[dict[int, float] | None] | None = \
            [None] if params.prompt_logprobs is not None else None
        self.num_preemptions = 0
        self.constraint_error: str | None = None  # why the constraint ended this sequence (finish_reason "abort")
        self.error: str | None = None  # an engine failure that ended this sequence (see CompletionOutput.error)
        self.eos_token_id = eos_token_id
        self.max_model_len = max_model_len
        # Speculative decoding: the token drafted by MTP for the next step (not yet part of `tokens`).
        self.draft_token: int | None = None
        # Text state
        self.tokenizer = tokenizer
        self.detok = Detokenizer(tokenizer, params.skip_special_tokens) if tokenizer is not None else None
        self.text = ""
        self.max_stop_len = max((len(s) for s in params.stop), default=0)
        self.sent_text_len = 0
        self.sent_token_len = 0

    # --- sizes -------------------------------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.tokens[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.tokens) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SeqStatus.FINISHED

    @property
    def in_prefill(self) -> bool:
        """True while more than the last sampled token is missing from the cache (prompt or recompute)."""
        return self.num_tokens - self.num_computed > 1

    # --- appending tokens and stop logic ---------------------------------------------------------------------
    def append_token(self, token_id: int, logprobs: dict[int, float] | None = None) -> None:
        """Append a sampled token and decide whether the sequence stops here."""
        self.tokens.append(token_id)
        if self.logprobs is not None and logprobs is not None:
            self.logprobs.append(logprobs)
        p = self.params
        n_out = self.num_output_tokens
        if self.params.constraint is not None:
            self.params.constraint.accept(token_id)
        prev_len = len(self.text)
        if self.detok is not None:
            self.text += self.detok.step(self.output_token_ids)
        if n_out >= p.min_tokens:
            if not p.ignore_eos and self.eos_token_id is not None and token_id == self.eos_token_id:
                self._finish("stop", token_id)
                return
            if token_id in p.stop_token_ids:
                self._finish("stop", token_id)
                return
            if p.stop and self._check_stop_strings(prev_len):
                return
        if p.max_tokens is not None and n_out >= p.max_tokens:
            self._finish("length")
        elif self.max_model_len is not None and self.num_tokens >= self.max_model_len:
            self._finish("length")

    def _check_stop_strings(self, prev_len: int) -> bool:
        # Only a match ending in the new text is new: the text before it was checked on earlier steps.
        start = max(0, prev_len - self.max_stop_len + 1)
        best: tuple[int, str] | None = None
        for s in self.params.stop:
            i = self.text.find(s, start)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return False
        i, s = best
        self.text = self.text[: i + len(s)] if self.params.include_stop_str_in_output else self.text[:i]
        self._finish("stop", s)
        return True

    def _finish(self, reason: str, stop_reason: int | str | None = None) -> None:
        self.finish_reason = reason
        self.stop_reason = stop_reason
        self.status = SeqStatus.FINISHED

    def abort(self) -> None:
        self._finish("abort")

    def fail(self, error: str) -> None:
        """End this sequence because the engine failed on it; `error` says what happened."""
        self.error = self.error or error
        self.draft_token = None
        self._finish("abort")

    # --- reporting ---------------------------------------------------------------------------------------------
    def visible_text(self) -> str:
        """Text safe to show now: while running, hold back a tail that could still become a stop string, so a
        stream never emits part of a stop string that is later removed."""
        if self.is_finished or self.max_stop_len == 0:
            return self.text
        return self.text[: max(self.sent_text_len, len(self.text) - (self.max_stop_len - 1))]

    def completion_output(self, delta: bool = False) -> CompletionOutput:
        text = self.visible_text()
        out_ids = self.output_token_ids
        co = CompletionOutput(
            index=self.index,
            text=text,
            token_ids=list(out_ids),
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
            logprobs=list(self.logprobs) if self.logprobs is not None else None,
            error=self.error,
        )
        if delta:
            co.delta_text = text[self.sent_text_len :]
            co.delta_token_ids = list(out_ids[self.sent_token_len :])
            self.sent_text_len = len(text)
            self.sent_token_len = len(out_ids)
        return co
