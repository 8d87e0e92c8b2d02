"""MTP speculative decoding: draft one token with the checkpoint's `mtp.0` block, verify it with the main model.

Step k (a decode carrying draft d for position t+1) feeds `[x_t, d]`; the logits at t give y0 (sampled exactly as
without speculation, from the request's own generator); if y0 == d the draft's own logits give y1 as well, so the
sequence advances by two tokens in one forward. The acceptance test "sample from the target, accept iff equal" keeps
the output distribution exactly the target's (the draft is a point mass) and makes greedy output identical to
non-speculative greedy. On rejection the engine restores the slot-state rows it copied before the verify
(`KVCache.snapshot_rows`: the forward wrote window rows and compressor tails for d, and a block completed by d cannot
be "un-compressed") and recomputes `[x_t, y0]` in the next step; see `LLMEngine._execute`.

MTP inputs (architecture.md sec 10, `Transformer.forward_mtp`): at position p, the main model's streams h_p and the
token at p+1; it predicts the token at p+2. This module runs the MTP block over *every* position the main model
computed this step (prefill chunks included), so the MTP's own sliding window in the cache stays complete; only the
rows at the end of a sequence become drafts. It does not decide acceptance (the engine does) nor schedule.
"""

from __future__ import annotations

from typing import Any

import torch

from dsv4.engine.runner import StepResult, make_forward_batch
from dsv4.engine.scheduler import SchedulerOutput


class MTPSpeculator:
    def __init__(self, model: Any, cache: Any, device: torch.device) -> None:
        if not getattr(model, "mtp", None):
            raise ValueError(
                "speculative=True needs the checkpoint's MTP block (num_nextn_predict_layers >= 1); this model has none"
            )
        self.model = model
        self.cache = cache
        self.device = device

    @torch.inference_mode()
    def draft(self, out: SchedulerOutput, res: StepResult, stats: dict[str, int]) -> None:
        ids: list[int] = []
        start_pos: list[int] = []
        seq_lens: list[int] = []
        slots: list[int] = []
        rows: list[int] = []  # rows of `res.hidden` fed to the MTP
        tables: list[list[int]] = []
        drafting: list[tuple[Any, int]] = []  # (sequence, MTP row index that gives its draft)
        for k, it in enumerate(out.items):
            seq = it.seq
            end = seq.num_computed  # after accept/reject: positions [it.start, end) hold valid KV
            if end <= it.start or seq.is_finished:
                continue  # rejected draft (state rolled back), or done: its state no longer matters
            n = end - it.start
            # the MTP at position p needs token p+1, known for every computed position (tokens run one ahead)
            ids += seq.tokens[it.start + 1 : end + 1]
            start_pos.append(it.start)
            seq_lens.append(n)
            slots.append(seq.slot)
            tables.append(seq.pages)
            rows += range(res.offsets[k], res.offsets[k] + n)
            if it.samples and seq.num_tokens - end == 1:
                drafting.append((seq, len(ids) - 1))
        if not ids:
            return
        batch = make_forward_batch(self.device, ids, start_pos, seq_lens, slots, tables, [r for _, r in drafting])
        hidden = res.hidden[torch.tensor(rows, dtype=torch.int64, device=res.hidden.device)]  # [N', M, D]
        mtp_out = self.model.forward_mtp(batch, hidden, self.cache)
        if drafting:
            drafts = torch.argmax(mtp_out.logits, dim=-1).tolist()
            for (seq, _), d in zip(drafting, drafts):
                seq.draft_token = int(d)
