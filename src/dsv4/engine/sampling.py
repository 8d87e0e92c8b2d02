"""SamplingParams: what a request asks of the sampler and the stop logic, validated once at submission.

Shaped like vLLM's `SamplingParams` so client code ports over. Validation raises `ValueError` naming the field and the
allowed range, so that a bad request is rejected before it touches the engine (and therefore no other request).
This module deliberately knows nothing about the vocabulary or the model's context length; those checks happen in
`LLMEngine.add_request`, where both are known.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


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
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = [int(t) for t in (self.stop_token_ids or [])]
        if self.top_k == 0:
            self.top_k = -1
        self._validate()

    def _validate(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"SamplingParams.{name}={getattr(self, name)!r} is invalid: {why}")

        if not isinstance(self.n, int) or self.n < 1:
            raise bad("n", "it must be an integer >= 1")
        if not (self.temperature >= 0.0) or self.temperature != self.temperature:
            raise bad("temperature", "it must be >= 0 (0 means greedy decoding)")
        if not (0.0 < self.top_p <= 1.0):
            raise bad("top_p", "it must be in (0, 1]; use 1 to disable nucleus sampling")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise bad("top_k", "it must be an integer >= 1, or -1/0 to disable top-k")
        if not (0.0 <= self.min_p <= 1.0):
            raise bad("min_p", "it must be in [0, 1]; use 0 to disable")
        if not (self.repetition_penalty > 0.0):
            raise bad("repetition_penalty", "it must be > 0; use 1 to disable")
        for name in ("presence_penalty", "frequency_penalty"):
            if not (-2.0 <= getattr(self, name) <= 2.0):
                raise bad(name, "it must be in [-2, 2]; use 0 to disable")
        if self.seed is not None and not isinstance(self.seed, int):
            raise bad("seed", "it must be an integer or None")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise bad("max_tokens", "it must be an integer >= 1, or None for 'up to the context length'")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise bad("min_tokens", "it must be an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"it must not exceed max_tokens={self.max_tokens}")
        if any(not isinstance(s, str) or s == "" for s in self.stop):
            raise bad("stop", "every stop string must be a non-empty string")
        if any(t < 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "token ids must be >= 0")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= 20):
            raise bad("logprobs", "it must be an integer in [0, 20], or None")
        if self.prompt_logprobs is not None and (not isinstance(self.prompt_logprobs, int)
                                                 or not 0 <= self.prompt_logprobs <= 20):
            raise bad("prompt_logprobs", "it must be an integer in [0, 20], or None")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def needs_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def clone(self, **changes: Any) -> SamplingParams:
        return dataclasses.replace(self, **changes)
