"""ThinkingBudget: the Anthropic budget_tokens cap forces </think> after exactly `budget` reasoning tokens."""

from __future__ import annotations

import torch

from dsv4.serve.budget import ThinkingBudget

END = 5


class EvenOnly:
    """A stand-in grammar: only even token ids (and </think>), recording what it was told."""

    def __init__(self) -> None:
        self.accepted: list[int] = []

    def allowed_mask(self, vocab_size: int) -> torch.Tensor:
        mask = torch.arange(vocab_size) % 2 == 0
        mask[END] = True
        return mask

    def accept(self, token_id: int) -> bool:
        self.accepted.append(token_id)
        return True


def test_budget_forces_think_end_then_releases() -> None:
    c = ThinkingBudget(2, END)
    assert c.allowed_mask(8).all()
    c.accept(3)
    assert c.allowed_mask(8).all()
    c.accept(4)
    forced = c.allowed_mask(8)
    assert forced.tolist() == [i == END for i in range(8)]
    c.accept(END)
    assert c.allowed_mask(8).all() and c.reasoning_tokens == 2


def test_budget_closed_early_never_forces() -> None:
    c = ThinkingBudget(1, END)
    c.accept(END)
    for t in (1, 2, 3):
        c.accept(t)
        assert c.allowed_mask(8).all()


def test_budget_wraps_inner_grammar() -> None:
    inner = EvenOnly()
    c = ThinkingBudget(1, END, inner)
    assert torch.equal(c.allowed_mask(8), inner.allowed_mask(8))
    c.accept(2)
    assert c.allowed_mask(8).tolist() == [i == END for i in range(8)]
    c.accept(END)
    c.accept(4)
    assert torch.equal(c.allowed_mask(8), inner.allowed_mask(8)) and inner.accepted == [2, END, 4]
