"""Microbenchmark of the native CPU kernels' two decode hot spots, the ISA builds this CPU runs measured against each
other in the same run (calls interleaved, so a shared machine's load hits every build alike): the routed + shared
experts (``kernels.moe``) for 1, 4 and 16 tokens, and decode attention (``kernels.chunk_attention`` with S = 1) over a
window ring and gathered compressed entries in an fp32 and a bf16 cache. Medians; the last stdout line is JSON.

    PYTHONPATH=src python3 benchmarks/bench_kernels.py [--isa avx512,avx2] [--threads 1] [--reps 40] [--clock cpu]

Workload (bf16 weights, read in place): experts dim 2048, expert dim 1024, 16 routed experts top-6 + 1 shared;
attention: 4 sequences x 64 heads x head_dim 512, window 128 + 512 compressed entries (V4-Flash's attention shapes;
fewer experts so the weights fit a shared machine). Not measured here: prefill-sized products (those go to torch's
BLAS) and the PyTorch path (``dsv4 bench`` compares the engine on both paths).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from dsv4 import kernels


def experts_case(tokens: int, cache_dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    e, d, f, k = 16, 2048, 1024, 6

    def lin(n: int, m: int) -> torch.Tensor:
        return (torch.randn(n, m, generator=g) * 0.02).to(torch.bfloat16)

    w1, w3, w2 = ([lin(n, m) for _ in range(e)] for n, m in ((f, d), (f, d), (d, f)))
    shared = [lin(f, d), lin(f, d), lin(d, f)]
    x = torch.randn(tokens, d, generator=g)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(tokens)])
    w = torch.rand(tokens, k, generator=g)
    return lambda: kernels.moe(x, ids, w, w1, w3, w2, shared, 10.0)


def attention_case(cache_dtype: torch.dtype):
    g = torch.Generator().manual_seed(1)
    b, h, c, win, ent = 4, 64, 512, 128, 512
    q = torch.randn(b, 1, h, c, generator=g)
    kv = torch.randn(b, 1, c, generator=g)
    ring = torch.randn(b, win, c, generator=g).to(cache_dtype)
    entries = torch.randn(b * ent, c, generator=g).to(cache_dtype)
    rows = torch.stack([torch.randperm(b * ent, generator=g)[:ent] for _ in range(b)])[:, None]  # [B, 1, E]
    start = torch.full((b,), 1000)
    lens = torch.ones(b, dtype=torch.int64)
    slots = torch.arange(b)
    sink = torch.zeros(h)
    return lambda: kernels.chunk_attention(q, kv, start, lens, ring, slots, entries, rows, sink, c ** -0.5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--isa", default="", help="comma-separated ISA builds to run (default: every one this CPU runs)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--cache-dtypes", default="float32,bfloat16")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: this thread's CPU time (with --threads 1: robust to a loaded machine)")
    args = ap.parse_args()
    clock = time.perf_counter if args.clock == "wall" else time.thread_time
    torch.set_num_threads(args.threads)
    build = getattr(kernels, "build", None)
    isas = [i for i in args.isa.split(",") if i] or (build.supported_isas() if build else ["default"])
    dtypes = [getattr(torch, n) for n in args.cache_dtypes.split(",")]
    cases = {f"experts_t{t}": (lambda t=t: experts_case(t, torch.bfloat16)) for t in (1, 4, 16)}
    cases.update({f"decode_attn_{str(dt)[6:]}": (lambda dt=dt: attention_case(dt)) for dt in dtypes})
    results = {}
    for case, make in cases.items():
        fn = make()  # one set of tensors; the build called is the one active at call time
        for isa in isas:
            with build.use_isa(isa) if build else _null():
                for _ in range(3):
                    fn()  # warm-up
        times = {isa: [] for isa in isas}
        for _ in range(args.reps):  # interleaved: each rep runs every build once
            for isa in isas:
                with build.use_isa(isa) if build else _null():
                    t0 = clock()
                    fn()
                    times[isa].append((clock() - t0) * 1e3)
        for isa in isas:
            results[f"{isa}/{case}_ms"] = statistics.median(times[isa])
    for name, v in results.items():
        print(f"{name:40s} {v:9.3f} ms (median)")
    if len(isas) == 2:
        a, b = isas
        for name in [n.split("/", 1)[1] for n in results if n.startswith(a + "/")]:
            if f"{b}/{name}" in results:
                print(f"{b}/{a} {name:32s} {results[f'{b}/{name}'] / results[f'{a}/{name}']:6.2f}x")
    print(json.dumps({"threads": args.threads, "reps": args.reps, "clock": args.clock, **results}))


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


if __name__ == "__main__":
    main()
