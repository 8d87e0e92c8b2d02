"""Decode (one token) throughput of the packed-weight kernels against this machine's measured memory bandwidth.

Workload, at V4-Flash shapes: the FP8 dense projections of one layer (wq_a 1024x4096, wq_b 32768x1024, wkv 512x4096,
wo_b 4096x8192, shared expert 2048x4096 x3) and the routed experts of one token (6 of 256 FP4 experts of 2048x4096,
from a pool of 24 experts so each step reads weights that are not in the caches). Each step reads the packed bytes
once; bytes/s = packed bytes read / median step time. The peer is the machine itself: the read bandwidth of
``torch.sum`` over a 1 GiB buffer (the roofline a bandwidth-bound decode can reach), measured in the same run, in
alternating rounds. The reference (ops/packed.py, dequantise-then-matmul) is timed once for scale.

Usage: python benchmarks/bench_quant_kernels.py [--threads 2] [--rounds 5]. Last stdout line: JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from dsv4.kernels import quant as native
from dsv4.model import quant
from dsv4.ops import packed


def fp8_weight(gen: torch.Generator, o: int, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    codes = torch.randint(0, 126, (o, i), generator=gen, dtype=torch.uint8)  # finite e4m3 values
    scale = torch.randint(118, 122, quant.fp8_scale_shape((o, i)), generator=gen, dtype=torch.uint8)
    return codes.view(torch.float8_e4m3fn), scale.view(torch.float8_e8m0fnu)


def fp4_stack(gen: torch.Generator, e: int, o: int, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.randint(-128, 128, (e, o, i // 2), generator=gen, dtype=torch.int8)
    s = torch.randint(118, 122, (e, o, i // 32), generator=gen, dtype=torch.uint8).view(torch.float8_e8m0fnu)
    return w, s


def timed(fn, reps: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not native.available():
        raise SystemExit(f"native kernels unavailable: {native.why_unavailable()}")
    gen = torch.Generator().manual_seed(0)
    dense = [fp8_weight(gen, o, i) for o, i in ((1024, 4096), (32768, 1024), (512, 4096), (4096, 8192),
                                                 (2048, 4096), (2048, 4096), (4096, 2048))]
    dense_bytes = sum(w.numel() + s.numel() for w, s in dense)
    pool = 24
    (w1, s1), (w3, s3), (w2, s2) = fp4_stack(gen, pool, 2048, 4096), fp4_stack(gen, pool, 2048, 4096), \
        fp4_stack(gen, pool, 4096, 2048)
    per_expert = (w1[0].numel() + s1[0].numel()) * 2 + w2[0].numel() + s2[0].numel()
    buf = torch.ones(1 << 28)  # 1 GiB fp32
    x_d = {i: torch.randn(1, i, generator=gen) for i in (4096, 1024, 8192, 2048)}
    x = torch.randn(1, 4096, generator=gen)
    weights = torch.rand(1, 6, generator=gen)
    step = [0]

    def dense_step() -> None:
        for w, s in dense:
            native.linear(x_d[w.shape[1]], w, s)

    def experts_step() -> None:
        step[0] += 1
        ids = (torch.arange(6) * 4 + step[0]) % pool  # a rotating pick: 6 of the pool, not the last step's
        native.experts(x, ids[None], weights, w1, s1, w3, s3, w2, s2, 10.0)

    results: dict[str, list[float]] = {"bandwidth": [], "dense": [], "experts": []}
    for _ in range(args.rounds):  # alternating rounds: the machine's load hits all three alike
        results["bandwidth"].append(buf.numel() * 4 / timed(lambda: buf.sum(), 3))
        results["dense"].append(dense_bytes / timed(dense_step, 5))
        results["experts"].append(6 * per_expert / timed(experts_step, 8))
    med = {k: statistics.median(v) for k, v in results.items()}
    ref_t = timed(lambda: packed.linear_reference(x_d[1024], *dense[1]), 2)
    nat_t = timed(lambda: native.linear(x_d[1024], *dense[1]), 5)
    gb = 1e9
    print(f"isa {native.library().dsv4_quant_isa()}-bit, {args.threads} threads, {args.rounds} rounds (medians)")
    print(f"measured read bandwidth (torch.sum, 1 GiB): {med['bandwidth'] / gb:6.1f} GB/s")
    print(f"FP8 dense projections, 1 token ({dense_bytes / 2**20:.0f} MiB): {med['dense'] / gb:6.1f} GB/s "
          f"= {med['dense'] / med['bandwidth']:.0%} of the measured bandwidth")
    print(f"FP4 routed experts, 1 token x 6 ({6 * per_expert / 2**20:.0f} MiB): {med['experts'] / gb:6.1f} GB/s "
          f"= {med['experts'] / med['bandwidth']:.0%}")
    print(f"wq_b 32768x1024 FP8, 1 token: native {nat_t * 1e3:.2f} ms, reference (dequantise + matmul) "
          f"{ref_t * 1e3:.1f} ms ({ref_t / nat_t:.0f}x)")
    print(json.dumps({"threads": args.threads, "bandwidth_gbs": med["bandwidth"] / gb,
                      "fp8_dense_gbs": med["dense"] / gb, "fp4_experts_gbs": med["experts"] / gb,
                      "fp8_dense_util": med["dense"] / med["bandwidth"],
                      "fp4_experts_util": med["experts"] / med["bandwidth"],
                      "wq_b_native_ms": nat_t * 1e3, "wq_b_reference_ms": ref_t * 1e3}))


if __name__ == "__main__":
    main()
