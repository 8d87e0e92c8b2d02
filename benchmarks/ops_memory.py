"""Peak temporary bytes of one V4-Flash layer's attention on the reference ops (docs/architecture.md sec 6).

For a CSA layer (indexer top-512 of ctx/4 entries + attention) and an HCA layer (attention over ctx/128 entries) at
V4-Flash width (64 heads x 512, 64 indexer heads x 128, window 128), one prefill chunk of ``--chunk`` queries at the
end of a ``--ctx``-token context, bf16 activations and cache: the largest single tensor an op allocates (a
TorchDispatchMode over every aten op) and the peak of the bytes all live temporaries hold at once (allocations
tracked by storage until freed). The context's own entries (the KV cache) are inputs, not temporaries. Last stdout
line: JSON.

    python benchmarks/ops_memory.py --ctx 131072 --chunk 64
"""

from __future__ import annotations

import argparse
import json
import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dsv4.ops import reference as ref

H, C, HI, I, TOPK, W, PAGE = 64, 512, 64, 128, 512, 128, 128


class Temporaries(TorchDispatchMode):
    """Largest allocation and peak live bytes of the tensors ops create while active (views share storage)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.now = self.peak = self.largest = 0
        self.largest_op = ""

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and not t._is_view():
                st = t.untyped_storage()
                key, n = st.data_ptr(), st.nbytes()
                if key in self.live or n == 0:
                    continue
                self.live[key] = n
                self.now += n
                weakref.finalize(st, self._free, key)  # NOTE: the storage object lives as long as any view of it
                self.peak = max(self.peak, self.now)
                if n > self.largest:
                    self.largest, self.largest_op = n, str(func)
        return out


def layer(ratio: int, ctx: int, s: int, dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(0)
    n = ctx // ratio
    rows = PAGE // ratio
    n_pages = -(-n // rows)
    entries = torch.randn(n_pages, rows, C, generator=g).to(dtype)
    tables = torch.arange(n_pages)[None]
    start, lens = torch.tensor([ctx - s]), torch.tensor([s])
    q, kv = torch.randn(1, s, H, C, generator=g).to(dtype), torch.randn(1, s, C, generator=g).to(dtype)
    ring, slots, sink = torch.randn(1, W, C, generator=g).to(dtype), torch.tensor([0]), torch.randn(H, generator=g)
    keys = iq = iw = None
    if ratio == 4:
        keys = torch.randn(n_pages, rows, I, generator=g).to(dtype)
        iq, iw = torch.randn(1, s, HI, I, generator=g).to(dtype), torch.randn(1, s, HI, generator=g).to(dtype)
    t0 = time.perf_counter()
    # the reference functions themselves: a mode does not see inside an op it dispatches
    with torch.no_grad(), Temporaries() as rec:
        topk = None
        if ratio == 4:
            vis = (start[:, None] + torch.arange(s) + 1) // ratio
            topk = ref.indexer_topk(iq, iw, keys, tables, ratio, vis, n, TOPK)
        ref.sparse_attention(q, kv, start, lens, ring, slots, entries, tables, ratio, n, topk, sink, C ** -0.5)
    dense = s * HI * n * 4 if ratio == 4 else s * H * n * 4  # one [S, H, E] fp32 score tensor, as before
    return {"kind": "CSA" if ratio == 4 else "HCA", "ctx": ctx, "chunk": s, "entries": n,
            "largest_mib": round(rec.largest / 2**20, 1), "largest_op": rec.largest_op,
            "peak_live_mib": round(rec.peak / 2**20, 1), "dense_score_mib": round(dense / 2**20, 1),
            "cache_inputs_mib": round((entries.nbytes + (keys.nbytes if keys is not None else 0)) / 2**20, 1),
            "seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ctx", type=int, nargs="+", default=[131072, 1048576])
    ap.add_argument("--chunk", type=int, default=64, help="queries of the prefill chunk (one query block or more)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    res = []
    for ctx in args.ctx:
        for ratio in (4, 128):
            r = layer(ratio, ctx, args.chunk, getattr(torch, args.dtype))
            print(r, flush=True)
            res.append(r)
    print(json.dumps({"block_elems": ref.BLOCK_ELEMS, "dtype": args.dtype, "layers": res}))


if __name__ == "__main__":
    main()
