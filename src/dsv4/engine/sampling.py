"""SamplingParams: what a request asks of the sampler and the stop logic, validated once at submission.

Shaped like vLLM's `SamplingParams` so client code ports over. Validation raises `ValueError` naming the field and the
allowed range, so that a bad request is rejected before it touches the engine (and therefore no other request).
This module deliberately knows nothing about the vocabulary or the model's context length; those checks happen in
`LLMEngine.add_request`, where both are known.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

_BOOL_FIELDS = ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens")


def _is_int(v: Any) -> bool:
    # bool is an int subclass: `top_k=True` must not mean top-1
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 (or 0) = whole vocabulary
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # CTRL-style, over prompt + output tokens; 1 = off
    presence_penalty: float = 0.0  # OpenAI-style, over output tokens only
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16  # None = up to the model's context length
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # top-n logprobs per generated token (the sampled token is always included)
    # top-n logprobs per prompt token, as vLLM's prompt_logprobs (the prompt token itself is always included; the
    # first token has none). The prompt is then computed in full: the prefix cache is not read for this request.
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    # Per-request logits constraint (e.g. a JSON-schema / tool-call grammar from `dsv4.chat.constraint`): an object
    # with `.allowed_mask(vocab) -> bool tensor [vocab]` and `.accept(token_id)`. Not compared or copied.
    constraint: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        # Type checks come before the normalisation below: `list(5)` or `int("x")` would otherwise escape as a
        # TypeError, and `int(True)` / `int(2.7)` would silently become a different request.
        if self.stop is not None and not isinstance(self.stop, (str, list, tuple)):
            raise self._bad("stop", "it must be a string, a list of strings, or None")
        if self.stop_token_ids is not None and not isinstance(self.stop_token_ids, (list, tuple)):
            raise self._bad("stop_token_ids", "it must be a list of token ids, or None")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if _is_int(self.top_k) and self.top_k == 0:
            self.top_k = -1
        self.validate()
        # numpy scalars and other Integral / Real types pass validation; store plain Python numbers from here on
        for name in ("n", "top_k", "min_tokens", "seed", "max_tokens", "logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                setattr(self, name, int(getattr(self, name)))
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            setattr(self, name, float(getattr(self, name)))
        self.stop_token_ids = [int(t) for t in self.stop_token_ids]

    def _bad(self, name: str, why: str) -> ValueError:
        return ValueError(f"SamplingParams.{name}={getattr(self, name)!r} is invalid: {why}")

    def validate(self) -> None:
        """Raise ValueError for any field of the wrong type or out of range. Run at construction and again by the
        engine at submission (a dataclass can be mutated in between), so nothing invalid reaches a step, where it
        would fail every request batched with it."""
        bad = self._bad
        for name in _BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "it must be true or false")
        ints = {"n": (1, "an integer >= 1"), "top_k": (-1, "an integer >= 1, or -1/0 to disable top-k"),
                "min_tokens": (0, "an integer >= 0")}
        for name, (lo, what) in ints.items():
            v = getattr(self, name)
            if not _is_int(v) or v < lo:
                raise bad(name, f"it must be {what}")
        reals = {
            "temperature": (0.0, math.inf, False, "a finite number >= 0 (0 means greedy decoding)"),
            "top_p": (0.0, 1.0, True, "a number in (0, 1]; use 1 to disable nucleus sampling"),
            "min_p": (0.0, 1.0, False, "a number in [0, 1]; use 0 to disable"),
            "repetition_penalty": (0.0, math.inf, True, "a finite number > 0; use 1 to disable"),
            "presence_penalty": (-2.0, 2.0, False, "a number in [-2, 2]; use 0 to disable"),
            "frequency_penalty": (-2.0, 2.0, False, "a number in [-2, 2]; use 0 to disable"),
        }
        for name, (lo, hi, open_lo, what) in reals.items():
            v = getattr(self, name)
            if not _is_real(v) or not math.isfinite(v) or v < lo or v > hi or (open_lo and v == lo):
                raise bad(name, f"it must be {what}")
        if self.seed is not None and (not _is_int(self.seed) or not -(1 << 63) <= self.seed <= (1 << 64) - self.n):
            raise bad("seed", "it must be a 64-bit integer or None")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise bad("max_tokens", "it must be an integer >= 1, or None for 'up to the context length'")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"it must not exceed max_tokens={self.max_tokens}")
        if not isinstance(self.stop, list) or any(not isinstance(s, str) or s == "" for s in self.stop):
            raise bad("stop", "every stop string must be a non-empty string")
        if not isinstance(self.stop_token_ids, list) or any(not _is_int(t) or t < 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "token ids must be integers >= 0")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= 20):
            raise bad("logprobs", "it must be an integer in [0, 20], or None")
        if self.prompt_logprobs is not None and (not _is_int(self.prompt_logprobs)
                                                 or not 0 <= self.prompt_logprobs <= 20):
            raise bad("prompt_logprobs", "it must be an integer in [0, 20], or None")
        c = self.constraint
        if c is not None and not (callable(getattr(c, "allowed_mask", None)) and callable(getattr(c, "accept", None))):
            raise ValueError(f"SamplingParams.constraint must have .allowed_mask(vocab) and .accept(token_id); got a "
                             f"{type(c).__name__}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def needs_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def clone(self, **changes: Any) -> SamplingParams:
        return dataclasses.replace(self, **changes)
