"""The reference path's temporaries are bounded (issue 10 item 3): at a scaled-down shape with a long context, no
single allocation of one CSA or HCA layer's indexer + attention exceeds BLOCK_ELEMS fp32 elements, far below the
dense [S, E] temporaries the unbounded code built. The V4-Flash figures (128K / 1M tokens) come from
benchmarks/ops_memory.py and are in docs/architecture.md sec 6."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dsv4.ops import reference as ref


class LargestAllocation(TorchDispatchMode):
    """Records the bytes of the largest tensor any op creates (views excluded) while active."""

    def __init__(self) -> None:
        super().__init__()
        self.largest, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and not t._is_view():
                n = t.untyped_storage().nbytes()
                if n > self.largest:
                    self.largest, self.op = n, str(func)
        return out


@pytest.mark.parametrize("ratio", [4, 128])
def test_one_layer_temporaries_are_bounded(monkeypatch, ratio):
    budget = 1 << 18  # elements: 1 MiB of fp32 per temporary at this scale
    monkeypatch.setattr(ref, "BLOCK_ELEMS", budget)
    g = torch.Generator().manual_seed(0)
    b, s, h, c, hi, i, k, w, page = 1, 96, 8, 64, 8, 32, 64, 128, 128
    ctx = 128 * 1024 if ratio == 4 else 1 << 20  # 32K CSA entries / 8K HCA entries
    start, lens = torch.tensor([ctx - s]), torch.tensor([s])
    n = ctx // ratio
    rows = page // ratio
    n_pages = -(-n // rows)
    entries = torch.randn(n_pages, rows, c, generator=g)
    tables = torch.arange(n_pages)[None]
    q, kv = torch.randn(b, s, h, c, generator=g), torch.randn(b, s, c, generator=g)
    ring, slots, sink = torch.randn(1, w, c, generator=g), torch.tensor([0]), torch.randn(h, generator=g)
    topk = None
    with LargestAllocation() as rec:  # the reference functions: a mode does not see inside an op it dispatches
        if ratio == 4:
            keys = torch.randn(n_pages, rows, i, generator=g)
            iq, iw = torch.randn(b, s, hi, i, generator=g), torch.randn(b, s, hi, generator=g)
            vis = (start[:, None] + torch.arange(s) + 1) // ratio
            topk = ref.indexer_topk(iq, iw, keys, tables, ratio, vis, n, k)
        out = ref.sparse_attention(q, kv, start, lens, ring, slots, entries, tables, ratio, n, topk, sink, 0.1)
    inputs = max(entries.untyped_storage().nbytes(), out.untyped_storage().nbytes())
    # the largest temporary: within the budget (+ the sort's index tensor, int64, of the same elements) and far below
    # what one dense [S, E] fp32 score/mask tensor per head would take
    dense = b * s * hi * n * 4
    assert rec.largest <= max(2 * budget * 4, inputs), (rec.largest, rec.op)
    assert rec.largest * 8 < dense, (rec.largest, dense)
