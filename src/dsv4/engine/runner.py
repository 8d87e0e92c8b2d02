"""ModelRunner: turns a `SchedulerOutput` into one `ForwardBatch`, runs `model.forward_batch` and returns the logits
rows that the sampler needs, in item order.

Shapes: N tokens in the step (all sequences' chunks concatenated), B sequences, M logits rows.

It does not sample, schedule or own memory policy: it only translates the scheduler's decision into the model's
explicit forward metadata (positions, slots, block tables), so the model never reads engine globals.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from dsv4.engine.scheduler import SchedulerOutput


@dataclass
class StepResult:
    logits: torch.Tensor  # [M, V] fp32: rows for items that sample (1 row, or 2 when carrying a draft)
    hidden: torch.Tensor | None  # [N, hc, D] streams after the last block (MTP needs them)
    rows: list[list[int]]  # per item: its rows in `logits` (empty when the chunk does not reach the end)
    token_index: list[list[int]]  # per item: the matching indices into the N tokens (for `hidden`)
    offsets: list[int]  # per item: index of its first token in the N tokens
    # per item wanting prompt logprobs: (item index, first row in `logits`, first position, count); row r + j holds
    # the distribution after position p + j, i.e. over prompt token p + j + 1
    prompt_rows: list[tuple[int, int, int, int]] = field(default_factory=list)


def make_forward_batch(device: torch.device, ids: list[int], start_pos: list[int], seq_lens: list[int],
                       slots: list[int], pages: list[list[int]], logits_indices: list[int]) -> Any:
    """The model's ForwardBatch from per-sequence Python lists (chunk i covers positions start_pos[i] + range(n))."""
    from dsv4.model.batch import ForwardBatch  # model/ never imports engine/; the reverse is fine

    positions = [p for s, n in zip(start_pos, seq_lens) for p in range(s, s + n)]
    tables = torch.full((len(pages), max(len(t) for t in pages)), -1, dtype=torch.int64)  # [B, max_pages]
    for b, t in enumerate(pages):
        tables[b, : len(t)] = torch.tensor(t, dtype=torch.int64)
    return ForwardBatch(
        input_ids=torch.tensor(ids, dtype=torch.int64, device=device),
        positions=torch.tensor(positions, dtype=torch.int64, device=device),
        start_pos=start_pos,
        seq_lens=seq_lens,
        slots=slots,
        block_tables=tables.to(device),
        logits_indices=torch.tensor(logits_indices, dtype=torch.int64, device=device),
    )


class ModelRunner:
    def __init__(self, model: Any, cache: Any, device: torch.device) -> None:
        # each MoE's experts in one block per weight kind (a no-op for a loaded model; a copy once for one built
        # or assigned otherwise): the experts op then takes three tensors, not 3E
        if hasattr(model, "stack_experts"):
            model.stack_experts()
        self.model = model
        self.cache = cache
        self.device = device

    def build_batch(self, out: SchedulerOutput) -> tuple[Any, list[list[int]], list[list[int]], list[int],
                                                         list[tuple[int, int, int, int]]]:
        ids: list[int] = []
        start_pos: list[int] = []
        seq_lens: list[int] = []
        slots: list[int] = []
        logits_indices: list[int] = []
        rows: list[list[int]] = []
        token_index: list[list[int]] = []
        offsets: list[int] = []
        for it in out.items:
            toks = it.token_ids
            offset = len(ids)
            offsets.append(offset)
            ids += toks
            start_pos.append(it.start)
            seq_lens.append(len(toks))
            assert it.seq.slot is not None, "scheduled sequence without a state slot"
            slots.append(it.seq.slot)
            if it.samples:
                # The last prompt/decoded token predicts the next one; a draft's own logits check the token after it.
                idx = [offset + it.num_new - 1] + ([offset + it.num_new] if it.draft is not None else [])
                rows.append(list(range(len(logits_indices), len(logits_indices) + len(idx))))
                token_index.append(idx)
                logits_indices += idx
            else:
                rows.append([])
                token_index.append([])
        # prompt logprobs: the rows of this chunk's prompt positions whose next prompt token has no logprob yet (a
        # recompute after preemption skips those already recorded)
        prompt_rows: list[tuple[int, int, int, int]] = []
        for k, it in enumerate(out.items):
            seq = it.seq
            if seq.prompt_logprobs is None:
                continue
            first = max(it.start, len(seq.prompt_logprobs) - 1)
            last = min(it.start + it.num_new, seq.num_prompt_tokens - 1)
            if last > first:
                prompt_rows.append((k, len(logits_indices), first, last - first))
                logits_indices += range(offsets[k] + first - it.start, offsets[k] + last - it.start)
        batch = make_forward_batch(self.device, ids, start_pos, seq_lens, slots, [it.seq.pages for it in out.items],
                                   logits_indices)
        return batch, rows, token_index, offsets, prompt_rows

    @torch.inference_mode()
    def run(self, out: SchedulerOutput) -> StepResult:
        batch, rows, token_index, offsets, prompt_rows = self.build_batch(out)
        res = self.model.forward_batch(batch, self.cache)
        return StepResult(res.logits.float(), getattr(res, "hidden", None), rows, token_index, offsets, prompt_rows)
