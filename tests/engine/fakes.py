"""A fake model whose next-token logits are a pseudo-random function of the *whole* token history, computed from what
the engine put in the cache (page contents via the block table + per-slot state). Any engine bug that loses, shares
or misplaces cache contents (wrong block table, bad prefix restore, stale state after preemption or a rejected draft)
changes the history the model sees, so outputs differ from plain decoding, or the model's own consistency check fires.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from dsv4.model.batch import ForwardBatch, ForwardOutput

MOD = (1 << 61) - 1


def roll(h: int, tok: int) -> int:
    return (h * 1000003 + tok + 1) % MOD


def logits_for(h: int, vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(h)
    return torch.randn(vocab, generator=g) * 3


def history_hash(tokens: list[int]) -> int:
    h = 0
    for t in tokens:
        h = roll(h, t)
    return h


class FakeCache:
    def __init__(self, num_slots: int, num_pages: int, page_size: int) -> None:
        self.page_size = page_size
        self.pages = torch.full((num_pages, page_size), -1, dtype=torch.int64)
        self.state = torch.zeros(num_slots, 2, dtype=torch.int64)  # (tokens seen, rolling hash)
        self.nbytes = self.pages.numel() * 8 + self.state.numel() * 8

    def snapshot_state(self, slot: int) -> torch.Tensor:
        return self.state[slot].clone()

    def restore_state(self, slot: int, snap: torch.Tensor) -> None:
        self.state[slot].copy_(snap)


class FakeModel(torch.nn.Module):
    def __init__(self, vocab: int = 40, max_len: int = 2048, eos: int | None = None) -> None:
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab, max_position_embeddings=max_len, eos_token_id=eos)
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.forward_calls = 0

    def reference_greedy(self, prompt: list[int], max_tokens: int) -> list[int]:
        seq = list(prompt)
        for _ in range(max_tokens):
            seq.append(int(torch.argmax(logits_for(history_hash(seq), self.config.vocab_size))))
        return seq[len(prompt):]

    def forward_batch(self, batch: ForwardBatch, cache: FakeCache) -> ForwardOutput:
        self.forward_calls += 1
        batch.validate(with_cache=True)
        P = cache.page_size
        rows = []
        off = 0
        ids = batch.input_ids.tolist()
        for b, (start, n) in enumerate(zip(batch.start_pos, batch.seq_lens)):
            slot = batch.slots[b]
            table = batch.block_tables[b].tolist()
            hist = [int(cache.pages[table[p // P], p % P]) for p in range(start)]
            assert -1 not in hist, f"sequence {b} reads an unwritten cache position"
            # like the real cache, a sequence starting at 0 never reads its slot's (stale) state
            seen, h = cache.state[slot].tolist() if start > 0 else (0, 0)
            assert seen == start and h == history_hash(hist), f"slot {slot} state does not match its pages"
            for i, tok in enumerate(ids[off : off + n]):
                p = start + i
                assert table[p // P] >= 0, f"position {p} has no page"
                cache.pages[table[p // P], p % P] = tok
                h = roll(h, tok)
                rows.append(logits_for(h, self.config.vocab_size))
            cache.state[slot] = torch.tensor([start + n, h])
            off += n
        logits = torch.stack(rows)
        if batch.logits_indices is not None:
            logits = logits[batch.logits_indices]
        return ForwardOutput(logits, torch.zeros(len(ids), 1, 1))


def patch_fake_cache(monkeypatch) -> None:
    """Make the engine allocate a FakeCache for a FakeModel."""
    import dsv4.engine.cache_budget as cb

    def build(model, c, device):
        n = c.num_pages or 64
        cache = FakeCache(c.max_num_seqs, n, c.page_size)
        return cache, n, cache.nbytes

    monkeypatch.setattr(cb, "build_cache", build)
