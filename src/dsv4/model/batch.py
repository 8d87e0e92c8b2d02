"""Explicit forward metadata (docs/contracts.md "Incremental / batched forward").

``ForwardBatch`` is what a caller (the engine, the trainer, ``Transformer.forward``) hands to
``Transformer.forward_batch``: a *varlen* batch of B sequences, each contributing a chunk of new tokens, concatenated
along one token axis N. ``BatchPlan`` is derived from it once per forward and passed explicitly to every layer (no
global forward context): it splits the sequences into a decode group (one new token each) and a prefill group
(chunks), and holds, per group, the padded [Bg, S] views of the flat token axis that attention and the compressors
work on.

Deliberately not here: which slots/pages a sequence owns (the engine's block manager decides; the cache stores).

Shape legend: N new tokens in the batch, B sequences, Bg sequences in a group, S = longest chunk in the group,
P = pages per sequence in the block table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [N] int64
    positions: torch.Tensor  # [N] int64, absolute position of each token in its sequence
    start_pos: list[int]  # [B] tokens already in the cache for each sequence
    seq_lens: list[int]  # [B] new tokens of each sequence
    slots: list[int] | None = None  # [B] state slot of each sequence in the KVCache
    block_tables: torch.Tensor | None = None  # [B, P] int64 page ids, -1 padding
    logits_indices: torch.Tensor | None = None  # [M] int64 rows of N that need logits (None = all)

    @classmethod
    def from_sequences(cls, chunks: list[list[int]] | list[torch.Tensor], start_pos: list[int] | None = None,
                       slots: list[int] | None = None, block_tables: torch.Tensor | None = None,
                       logits_indices: torch.Tensor | None = None, device: torch.device | str | None = None,
                       ) -> ForwardBatch:
        """Build a batch from per-sequence new tokens (positions follow from ``start_pos``, default all 0)."""
        start = list(start_pos) if start_pos is not None else [0] * len(chunks)
        lens = [len(c) for c in chunks]
        ids = torch.cat([torch.as_tensor(c, dtype=torch.long).reshape(-1) for c in chunks]) if chunks else \
            torch.zeros(0, dtype=torch.long)
        pos = torch.cat([torch.arange(s, s + n, dtype=torch.long) for s, n in zip(start, lens)]) if chunks else \
            torch.zeros(0, dtype=torch.long)
        if device is not None:
            ids, pos = ids.to(device), pos.to(device)
        return cls(ids, pos, start, lens, slots, block_tables, logits_indices)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    def validate(self, with_cache: bool) -> None:
        b = len(self.seq_lens)
        if b == 0:
            raise ValueError("ForwardBatch is empty: pass at least one sequence with at least one new token")
        if len(self.start_pos) != b:
            raise ValueError(f"ForwardBatch: start_pos has {len(self.start_pos)} entries for {b} sequences")
        if any(n <= 0 for n in self.seq_lens):
            raise ValueError(f"ForwardBatch: every sequence needs >= 1 new token (seq_lens={self.seq_lens})")
        if sum(self.seq_lens) != self.input_ids.shape[0] or self.positions.shape != self.input_ids.shape:
            raise ValueError(f"ForwardBatch: input_ids/positions hold {self.input_ids.shape[0]} tokens but "
                             f"seq_lens sum to {sum(self.seq_lens)}")
        if not with_cache and any(s != 0 for s in self.start_pos):
            raise ValueError("ForwardBatch: without a KVCache every sequence must start at position 0 "
                             f"(start_pos={self.start_pos}); pass the cache that holds the earlier tokens")
        if with_cache:
            if self.slots is None or len(self.slots) != b:
                raise ValueError("ForwardBatch: a forward with a KVCache needs one state slot per sequence")
            if self.block_tables is None or self.block_tables.shape[0] != b:
                raise ValueError("ForwardBatch: a forward with a KVCache needs block_tables [B, max_pages]")


class ForwardOutput(NamedTuple):
    logits: torch.Tensor  # [M, vocab] fp32
    hidden: torch.Tensor  # [N, hc_mult, dim] mHC streams after the last block (before hc_head)


@dataclass
class Group:
    """Sequences of one kind (decode or prefill) laid out as a padded [Bg, S] block of the flat token axis."""

    seq_ids: torch.Tensor  # [Bg] indices into the batch's sequences
    tok_idx: torch.Tensor  # [Bg, S] row of the flat token axis, N for padding (points at an appended zero row)
    valid: torch.Tensor  # [Bg, S] bool
    pos: torch.Tensor  # [Bg, S] absolute positions, -1 for padding (sees nothing)
    start: torch.Tensor  # [Bg]
    end: torch.Tensor  # [Bg] start + number of new tokens
    start_list: list[int]
    end_list: list[int]
    slots: torch.Tensor | None  # [Bg]
    block_tables: torch.Tensor | None  # [Bg, P]
    is_decode: bool
    dense: tuple[int, int] | None = None  # (a, b) when tok_idx == arange(a, b).view(Bg, S): pad/unpad are views
    memo: dict = field(default_factory=dict)  # per-forward index tensors shared by all layers of a kind

    def memoize(self, key: tuple, build):
        if key not in self.memo:
            self.memo[key] = build()
        return self.memo[key]

    @property
    def size(self) -> int:
        return int(self.seq_ids.shape[0])

    @property
    def width(self) -> int:
        return int(self.tok_idx.shape[1])


def pad_rows(x: torch.Tensor, tok_idx: torch.Tensor) -> torch.Tensor:
    """Flat [N, ...] -> padded [Bg, S, ...] (padding rows are zeros)."""
    xp = torch.cat([x, x.new_zeros((1,) + x.shape[1:])], dim=0)  # row N = zero padding
    return xp[tok_idx]


def group_rows(x: torch.Tensor, grp: Group) -> torch.Tensor:
    """Flat [N, ...] -> the group's padded [Bg, S, ...]; a view when the group is a dense slice of the batch."""
    if grp.dense is not None:
        a, b = grp.dense
        return x[a:b].view((grp.size, grp.width) + x.shape[1:])
    return pad_rows(x, grp.tok_idx)


def unpad_rows(y: torch.Tensor, grp: Group, n: int, out: torch.Tensor | None) -> torch.Tensor:
    """Padded [Bg, S, ...] -> contributes the valid rows into a flat [N, ...] tensor (out of place)."""
    if grp.dense == (0, n) and out is None:
        return y.reshape((n,) + y.shape[2:])
    if out is None:
        out = y.new_zeros((n,) + y.shape[2:])
    # the valid rows' indices once per forward (boolean indexing is a host sync; this runs in every layer)
    rows, tok = grp.memoize(("valid_rows",), lambda: (grp.valid.nonzero(as_tuple=True), grp.tok_idx[grp.valid]))
    return out.index_put((tok,), y[rows])


class BatchPlan:
    """Per-forward derived index tensors, built once and passed explicitly to the layers."""

    def __init__(self, batch: ForwardBatch, device: torch.device, with_cache: bool) -> None:
        batch.validate(with_cache)
        self.n = batch.num_tokens
        self.device = device
        self.input_ids = batch.input_ids.to(device)
        self.positions = batch.positions.to(device)
        lens = batch.seq_lens
        offs = [0]
        for n_ in lens[:-1]:
            offs.append(offs[-1] + n_)
        decode = [i for i, n_ in enumerate(lens) if n_ == 1]
        prefill = [i for i, n_ in enumerate(lens) if n_ > 1]
        self.groups: list[Group] = []
        self.memo: dict = {}  # per-forward values shared by all layers (e.g. cos/sin per RoPE flavour)
        for ids, is_decode in ((decode, True), (prefill, False)):
            if not ids:
                continue
            width = max(lens[i] for i in ids)
            # sequences of equal length laid out back to back: the padded view is a plain reshape
            contiguous = all(lens[i] == width for i in ids) and all(
                offs[i] == offs[ids[0]] + r * width for r, i in enumerate(ids))
            j = torch.arange(width)
            lens_t = torch.tensor([lens[i] for i in ids])
            offs_t = torch.tensor([offs[i] for i in ids])
            idx = torch.where(j[None] < lens_t[:, None], offs_t[:, None] + j[None], self.n)  # [Bg, S]
            idx = idx.to(device)
            valid = idx < self.n
            # positions come from the batch (the caller's truth); padding gets -1 so it attends to nothing
            pos = torch.where(valid, pad_rows(self.positions, idx), -1)
            start = [batch.start_pos[i] for i in ids]
            end = [batch.start_pos[i] + lens[i] for i in ids]
            seq_ids = torch.tensor(ids, dtype=torch.long, device=device)
            self.groups.append(Group(
                seq_ids=seq_ids,
                tok_idx=idx,
                valid=valid,
                pos=pos,
                start=torch.tensor(start, dtype=torch.long, device=device),
                end=torch.tensor(end, dtype=torch.long, device=device),
                start_list=start,
                end_list=end,
                slots=torch.tensor([batch.slots[i] for i in ids], dtype=torch.long, device=device)
                if with_cache else None,
                block_tables=batch.block_tables.to(device)[seq_ids].long() if with_cache else None,
                is_decode=is_decode,
                dense=(offs[ids[0]], offs[ids[0]] + len(ids) * width) if contiguous else None,
            ))

    def memoize(self, key: tuple, build):
        if key not in self.memo:
            self.memo[key] = build()
        return self.memo[key]
