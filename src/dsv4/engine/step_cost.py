"""StepCost: what one engine step costs in wall time, learned from the steps the engine runs, so that the scheduler can
size prefill chunks by time and not only by tokens.

Why: a step's token budget alone does not bound its time. A 512-token chunk of a 30K-token prompt costs several times a
512-token chunk at the prompt's start (attention over the history), and the short requests that share those steps wait
for them. With a time target for shared steps, a small request's first token comes after the step in flight plus one
step of about that target, however long the prompt being prefilled (engine/scheduler.py: the chunks of prompts
already started are cut to fit; a prefill running alone, and a prompt's first chunk, keep the token budget).

The model: a step costs `fixed` ms plus, for each token it computes, `a + b * ctx` ms, where `ctx` is the number of
tokens before it in its sequence. `fixed` follows the steps of a few tokens (decodes, short prompts), an exponential
moving average. For the steps of many tokens, the cost above `fixed` divided by the tokens is exactly `a + b * mean_ctx`
under the model, so `a` and `b` are a least-squares line through the last `WINDOW` such points: no state to wind up,
and it follows the model's real costs as the history grows. The target a shared step is sized to is
`max(target_ms, headroom * fixed)`: on a model whose one-token step alone takes longer than the target (a large model on
a CPU), prefill chunks still cost a few decode steps each instead of shrinking to a handful of tokens.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable

SMALL_STEP = 32  # steps of at most this many tokens measure the fixed cost (their tokens add little to it)
LARGE_STEP = 64  # steps of at least this many tokens measure the per-token cost
WINDOW = 16  # large steps the per-token line is fitted to


class StepCost:
    def __init__(self, target_ms: float, headroom: float = 4.0, smoothing: float = 0.3) -> None:
        if not target_ms > 0:
            raise ValueError(f"target_ms must be > 0, got {target_ms}")
        self.target_ms = target_ms
        self.headroom = headroom
        self.smoothing = smoothing
        self.fixed_ms: float | None = None
        self._points: deque[tuple[float, float]] = deque(maxlen=WINDOW)  # (mean ctx, ms per token above fixed)
        self.a = self.b = 0.0  # ms per token, and per token per token of context before it

    @property
    def measured(self) -> bool:
        return bool(self._points)

    @property
    def step_target_ms(self) -> float:
        return max(self.target_ms, self.headroom * (self.fixed_ms or 0.0))

    def observe(self, items: Iterable[tuple[int, int]], seconds: float) -> None:
        """One step took `seconds`; `items` are its (tokens, first position) pairs, one per sequence."""
        items = list(items)
        n = sum(k for k, _ in items)
        ms = seconds * 1e3
        if n <= SMALL_STEP:
            self.fixed_ms = ms if self.fixed_ms is None else self.fixed_ms + self.smoothing * (ms - self.fixed_ms)
        elif n >= LARGE_STEP:
            # until a small step was seen, half the time at most counts as fixed: chunks err small, not large
            above = ms - min(self.fixed_ms or 0.0, ms / 2)
            ctx = sum(k * (start + (k - 1) / 2) for k, start in items) / n
            self._points.append((ctx, above / n))
            self._fit()

    def _fit(self) -> None:
        xs, ys = zip(*self._points)
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        sxx = sum((x - mx) ** 2 for x in xs)
        # the slope only where the contexts differ enough to tell it (a spread of 32 tokens or more)
        b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx > 32.0 ** 2 * len(xs) else 0.0
        self.b = max(b, 0.0)
        self.a = max(my - self.b * mx, 0.05 * my)  # costs never fall to zero at the left end of the fit

    def cost_ms(self, tokens: int, start: int) -> float:
        """Predicted ms (above the fixed cost) of computing `tokens` tokens of a sequence from position `start`."""
        return tokens * (self.a + self.b * (start + (tokens - 1) / 2))

    def tokens_within(self, ms: float, start: int) -> int:
        """The most tokens from position `start` whose predicted cost fits in `ms`."""
        if ms <= 0 or not self.measured:
            return 0
        lin, quad = self.a + self.b * start, self.b / 2  # cost(n) ~ quad * n^2 + lin * n
        if quad <= 0:
            return int(ms / lin)
        return int((-lin + math.sqrt(lin * lin + 4 * quad * ms)) / (2 * quad))
