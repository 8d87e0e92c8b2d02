"""A/B of built native-kernel libraries (``.so`` files, e.g. the previous commit's build against this one's) in one
process, calls interleaved on the same tensors so a shared machine's load hits every library alike: the routed +
shared experts (``dsv4_moe``) for 1, 4 and 16 tokens and decode attention (``dsv4_chunk_attn``, fp32 cache; a library
without ``dsv4_isa`` is called with the older ABI, before the cache dtype codes). Medians of this thread's CPU time,
one thread; the first library is the baseline of the printed ratios; the last stdout line is JSON.

    PYTHONPATH=src python3 benchmarks/bench_kernel_builds.py OLD.so NEW.so [MORE.so ...] [--reps 60]

To build the previous commit's library: ``git show HEAD~1:src/dsv4/kernels/cpu_kernels.c > /tmp/old.c`` (plus its
headers) and ``cc -O3 -fopenmp -shared -fPIC <ISA flags> -o /tmp/old.so /tmp/old.c -lm``; this commit's libraries
lie in ``$DSV4_KERNEL_CACHE`` (default ``~/.cache/dsv4/kernels``). Workload: bench_kernels.py's.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import time

import torch

from dsv4.kernels import build

_P, _I, _F, _C = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
_OLD_CHUNK_ATTN = [_P, _P, _I, _I, _I, _I, _P, _P, _P, _I, _P, _P, _P, _I, _P, _F, _P, _C]


def load(path: str) -> tuple[ctypes.CDLL, bool]:
    lib = ctypes.CDLL(path)
    new_abi = hasattr(lib, "dsv4_isa")
    for name, args in build.SIGNATURES.items():
        if hasattr(lib, name):
            getattr(lib, name).argtypes = args
    if not new_abi:
        lib.dsv4_chunk_attn.argtypes = _OLD_CHUNK_ATTN
    lib.dsv4_moe.restype = ctypes.c_int
    lib.dsv4_set_sgemm(build._torch_sgemm())
    return lib, new_abi


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("libs", nargs="+")
    ap.add_argument("--reps", type=int, default=60)
    args = ap.parse_args()
    torch.set_num_threads(1)
    libs = {path: load(path) for path in args.libs}
    g = torch.Generator().manual_seed(0)
    e, d, f, k = 16, 2048, 1024, 6

    def lin(n: int, m: int) -> torch.Tensor:
        return (torch.randn(n, m, generator=g) * 0.02).to(torch.bfloat16)

    routed = [(lin(f, d), lin(f, d), lin(d, f)) for _ in range(e)]
    shared = [lin(f, d), lin(f, d), lin(d, f)]
    w1, w3, w2 = ((ctypes.c_void_p * e)(*[r[i].data_ptr() for r in routed]) for i in range(3))

    def experts(t: int):
        x, w, y = torch.randn(t, d, generator=g), torch.rand(t, k, generator=g), torch.empty(t, d)
        ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
        return lambda lib, _: lib.dsv4_moe(x.data_ptr(), t, d, f, f, ids.data_ptr(), w.data_ptr(), k, e, w1, w3, w2,
                                           *[s.data_ptr() for s in shared], 1, 10.0, y.data_ptr(), 1)

    b, h, c, win, ent = 4, 64, 512, 128, 512
    q, kv = torch.randn(b, 1, h, c, generator=g), torch.randn(b, 1, c, generator=g)
    ring, entries = torch.randn(b, win, c, generator=g), torch.randn(b * ent, c, generator=g)
    rows = torch.stack([torch.randperm(b * ent, generator=g)[:ent] for _ in range(b)])[:, None].contiguous()
    start, lens = torch.full((b,), 1000), torch.ones(b, dtype=torch.int64)
    slots, sink, out = torch.arange(b), torch.zeros(h), torch.empty(b, 1, h, c)
    p = [t.data_ptr() for t in (q, kv, start, lens, ring, slots, entries, rows, sink, out)]

    def attention(lib, new_abi: bool) -> None:
        if new_abi:
            lib.dsv4_chunk_attn(p[0], p[1], b, 1, h, c, p[2], p[3], p[4], 0, win, p[5], p[6], 0, p[7], ent, p[8],
                                c ** -0.5, p[9], 1)
        else:
            lib.dsv4_chunk_attn(p[0], p[1], b, 1, h, c, p[2], p[3], p[4], win, p[5], p[6], p[7], ent, p[8],
                                c ** -0.5, p[9], 1)

    cases = {"experts_t1": experts(1), "experts_t4": experts(4), "experts_t16": experts(16),
             "decode_attn_float32": attention}
    results = {}
    base = args.libs[0]
    for case, fn in cases.items():
        times = {path: [] for path in libs}
        for lib, new_abi in libs.values():
            fn(lib, new_abi)  # warm-up
        for _ in range(args.reps):
            for path, (lib, new_abi) in libs.items():
                t0 = time.thread_time()
                fn(lib, new_abi)
                times[path].append((time.thread_time() - t0) * 1e3)
        med = {path: statistics.median(v) for path, v in times.items()}
        print(f"{case:20s} " + "  ".join(f"{path}: {m:.3f} ms ({m / med[base]:.3f}x)" for path, m in med.items()))
        results[case] = med
    print(json.dumps({"reps": args.reps, "baseline": base, "median_cpu_ms": results}))


if __name__ == "__main__":
    main()
