"""Anthropic's `thinking.budget_tokens` as a hard cap: after `budget` reasoning tokens the only token the sampler may
pick is `</think>`, so the answer starts there. It wraps the request's grammar constraint (if any) and speaks the
engine's constraint protocol (`allowed_mask(vocab)` / `accept(token_id)`).

V4 has no trained notion of a budget; cutting the reasoning at the budget is what the parameter promises a client
(max_tokens still bounds reasoning plus answer).
"""

from __future__ import annotations

from typing import Any

import torch


class ThinkingBudget:
    def __init__(self, budget: int, think_end_id: int, inner: Any = None) -> None:
        self.budget = budget
        self.think_end_id = think_end_id
        self.inner = inner
        self.reasoning_tokens = 0
        self.closed = False

    def allowed_mask(self, vocab_size: int) -> torch.Tensor:
        mask = self.inner.allowed_mask(vocab_size) if self.inner is not None else None  # [V] bool
        if self.closed or self.reasoning_tokens < self.budget:
            return mask if mask is not None else torch.ones(vocab_size, dtype=torch.bool)
        forced = torch.zeros(vocab_size, dtype=torch.bool)
        forced[self.think_end_id] = True
        # the grammars of dsv4.chat.constraint keep reasoning free text up to </think>, so forcing it stays legal
        return forced

    def accept(self, token_id: int) -> bool:
        if not self.closed:
            if token_id == self.think_end_id:
                self.closed = True
            else:
                self.reasoning_tokens += 1
        return self.inner.accept(token_id) if self.inner is not None else True
