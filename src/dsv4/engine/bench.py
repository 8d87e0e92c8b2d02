"""`dsv4 bench` / benchmarks/bench_engine.py: the engine against transformers' `generate`, same weights, same run.

Workload (fixed, seeded): a random V4 checkpoint in bf16 with the real V4 vocabulary (129280) and every V4 feature
(SWA/CSA/HCA layers, hash routing, mHC, MTP), small enough for a laptop CPU: dim 512, 8 layers, 32 routed experts.
Measured:
* single-stream decode tok/s (128-token prompt, 128 new tokens; median step time), both engines;
* batched throughput: 32 requests x 128 prompt / 128 output through the engine, against transformers generating the
  same requests one at a time (its per-request time comes from its measured prefill and decode step times), in
  alternating rounds;
* prefill tok/s (one 1024-token prompt), both engines;
* memory-bandwidth utilisation: weight bytes read by one decode step / step time / bandwidth measured here with a big
  torch copy;
* decode step time at 1K and 32K context (engine only), peak RSS.
Medians throughout: the machine may be shared. The last stdout line is JSON; `--report DIR` also writes a dated
Markdown report with the configuration.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import platform
import resource
import statistics
import time
from pathlib import Path
from typing import Any

import torch

# The stated benchmark checkpoint (HF config.json keys).
BENCH_CONFIG: dict[str, Any] = dict(
    vocab_size=129280, hidden_size=512, num_hidden_layers=8, num_attention_heads=8, head_dim=128,
    qk_rope_head_dim=64, q_lora_rank=256, o_groups=4, o_lora_rank=128, sliding_window=128,
    compress_ratios=[0, 0, 4, 128, 4, 128, 4, 128, 0], index_n_heads=8, index_head_dim=64, index_topk=512,
    moe_intermediate_size=256, n_routed_experts=32, num_experts_per_tok=6, n_shared_experts=1, num_hash_layers=3,
    scoring_func="sqrtsoftplus", routed_scaling_factor=1.5, swiglu_limit=10.0, hc_mult=4, hc_sinkhorn_iters=20,
    num_nextn_predict_layers=1, max_position_embeddings=65536, rope_theta=10000.0, compress_rope_theta=160000.0,
    rope_scaling={"type": "yarn", "factor": 16, "original_max_position_embeddings": 4096, "beta_fast": 32,
                  "beta_slow": 1},
    bos_token_id=0, eos_token_id=1,
)


def log(msg: str) -> None:
    print(msg, flush=True)


def build_model(seed: int, dtype: torch.dtype, cache_file: Path | None = None) -> Any:
    """The random checkpoint: `init_weights(seed)` (slow for 260M parameters on a small CPU), or the same weights
    from `cache_file` when a previous run saved them there."""
    from dsv4.config import ModelConfig
    from dsv4.model.transformer import Transformer

    cfg = ModelConfig.from_dict(BENCH_CONFIG)
    with torch.device("meta"):
        model = Transformer(cfg, dtype=dtype)
    if cache_file is not None and cache_file.exists():
        model.load_state_dict(torch.load(cache_file, mmap=True), assign=True)
        return model.eval()
    model.init_weights(seed)
    if cache_file is not None:
        torch.save(model.state_dict(), cache_file)
    return model.eval()


def build_hf(model: Any, dtype: torch.dtype) -> Any:
    import transformers

    from dsv4.model import hf_mapping

    # NOTE: a deep copy, transformers normalises (mutates) the nested rope_scaling dict it is given
    hf_cfg = transformers.DeepseekV4Config(**copy.deepcopy(BENCH_CONFIG), attn_implementation="eager")
    hf_cfg.compress_ratios = BENCH_CONFIG["compress_ratios"]
    with torch.device("meta"):
        hf = transformers.DeepseekV4ForCausalLM(hf_cfg)
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("mtp.")}
    hf_sd = hf_mapping.official_state_dict_to_hf(sd, BENCH_CONFIG["n_routed_experts"])
    hf.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in hf_sd.items()}, strict=False,
                       assign=True)
    missing = [n for n, p in hf.named_parameters() if p.device.type == "meta"]
    if missing:
        raise RuntimeError(f"transformers model has parameters the mapping did not fill: {missing[:5]}")
    # Non-persistent buffers (the rotary tables) were built on meta: rebuild those modules on the CPU.
    for name, mod in list(hf.named_modules()):
        if any(b.device.type == "meta" for b in mod.buffers(recurse=False)):
            parent, _, leaf = name.rpartition(".")
            with torch.device("cpu"):
                setattr(hf.get_submodule(parent) if parent else hf, leaf, type(mod)(mod.config))
    left = [n for n, b in hf.named_buffers() if b.device.type == "meta"]
    if left:
        raise RuntimeError(f"transformers buffers {left[:3]} left on meta; cannot benchmark it")
    return hf.eval()


def measure_bandwidth(mib: int = 512, reps: int = 7) -> float:
    """Bytes moved per second by a large copy (read + write), best of `reps`: the machine's attainable bandwidth, which
    other processes on a shared machine can only lower (the benchmark measures it more than once and keeps the max)."""
    a = torch.empty(mib << 20, dtype=torch.uint8).fill_(1)
    b = torch.empty_like(a)
    b.copy_(a)
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        b.copy_(a)
        ts.append(time.perf_counter() - t)
    return 2 * a.numel() / min(ts)


def decode_weight_bytes(model: Any) -> int:
    """Weight bytes one single-token decode step reads: everything except the routed experts a token does not use and
    all but one embedding row (the MTP block is not run without speculation)."""
    cfg = model.config
    total = 0
    for name, p in model.named_parameters():
        nbytes = p.numel() * p.element_size()
        if name.startswith("mtp."):
            continue
        if name == "embed.weight":
            nbytes = p.shape[1] * p.element_size()
        elif ".ffn.experts." in name:
            nbytes = nbytes * cfg.num_experts_per_tok / cfg.n_routed_experts
        total += nbytes
    return int(total)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, BENCH_CONFIG["vocab_size"], (n,), generator=g).tolist()


def engine_decode_steps(llm: Any, prompt: list[int], new: int) -> tuple[float, float]:
    """(prefill seconds, median decode step seconds) for one request, timing each engine step."""
    from dsv4.engine.sampling import SamplingParams

    eng = llm.engine
    eng.add_request(prompt, SamplingParams(temperature=0, max_tokens=new, ignore_eos=True))
    prefill, steps = 0.0, []
    while eng.has_unfinished():
        decoding = all(not s.in_prefill for s in eng.scheduler.running) and not eng.scheduler.waiting
        t = time.perf_counter()
        eng.step()
        dt = time.perf_counter() - t
        (steps if decoding else []).append(dt)
        if not decoding:
            prefill += dt
    return prefill, statistics.median(steps)


def engine_batched(llm: Any, n_req: int, prompt_len: int, new: int) -> float:
    """Output tokens per second for n_req concurrent requests (wall clock, prefill included)."""
    from dsv4.engine.sampling import SamplingParams

    prompts = [_prompt(prompt_len, 1000 + i) for i in range(n_req)]
    t = time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=new, ignore_eos=True))
    dt = time.perf_counter() - t
    return sum(len(o.outputs[0].token_ids) for o in outs) / dt


@torch.inference_mode()
def hf_times(hf: Any, prompt: list[int], new: int, reps: int = 3) -> tuple[float, float]:
    """(prefill seconds, decode seconds per token) of transformers' generate (greedy, its own cache)."""
    ids = torch.tensor([prompt])

    def gen(n: int) -> float:
        t = time.perf_counter()
        hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        return time.perf_counter() - t

    gen(2)  # warm-up
    t1 = statistics.median(gen(1) for _ in range(reps))
    tn = statistics.median(gen(new) for _ in range(max(1, reps - 1)))
    return t1, (tn - t1) / (new - 1)


def engine_context_step(model: Any, ctx: int, threads: int) -> float:
    """Median decode step seconds with `ctx` tokens already in the cache."""
    from dsv4.engine.llm import LLM

    llm = LLM(model, max_num_seqs=1, max_num_batched_tokens=2048, cache_memory_gb=1.0, enable_prefix_caching=False,
              num_threads=threads)
    _, step = engine_decode_steps(llm, _prompt(ctx, 7), 16)
    return step


def run(args: argparse.Namespace) -> dict[str, Any]:
    from dsv4.engine.llm import LLM
    from dsv4.engine.sampling import SamplingParams

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = torch.bfloat16  # the checkpoint's dtype
    from dsv4 import kernels, ops

    native = kernels.available() if args.native == "auto" else args.native == "on"
    # the engine's ops run on the native CPU kernels or on their plain-PyTorch reference
    ops.BACKENDS["cpu"] = "native" if native else "reference"
    res: dict[str, Any] = {"threads": args.threads, "torch": torch.__version__, "cpu": platform.processor() or
                           platform.machine(), "engine_path": "native kernels" if native else "pytorch",
                           "engine_dtype": "float32" if native else args.dtype, "hf_dtype": args.hf_dtype}
    if args.native == "auto" and not native:
        log(f"native kernels unavailable ({kernels.why_unavailable()}): benchmarking the PyTorch path")
    t = time.perf_counter()
    model = build_model(0, dtype, args.weights_cache)
    bf16_model = model
    if native:
        # fp32 activations; experts and attention projections stay bf16 (read as bf16), the head fp32 (official)
        model = build_model(0, dtype, args.weights_cache).set_activation_dtype(torch.float32)
    elif args.dtype != "bfloat16":
        # NOTE: bf16 weights upcast losslessly; activations are then computed in this dtype (see the report: on
        # CPUs without AMX, torch's bf16 matmuls are 2-5x slower than fp32 at decode sizes).
        model = build_model(0, dtype, args.weights_cache).to(getattr(torch, args.dtype))
    res["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 1)
    log(f"built bench model ({res['params_m']} M params incl. MTP) in {time.perf_counter() - t:.1f}s")
    bw = measure_bandwidth()
    res["bandwidth_gbs"] = round(bw / 1e9, 2)
    wbytes = decode_weight_bytes(model)
    res["decode_weight_mb"] = round(wbytes / 1e6, 1)
    log(f"measured copy bandwidth {bw / 1e9:.2f} GB/s; one decode step reads {wbytes / 1e6:.0f} MB of weights")

    if args.only_long_ctx:
        long_context(model, args, res)
        res["peak_rss_mib"] = round(peak_rss_mib(), 1)
        return res
    llm = LLM(model, max_num_seqs=args.batch, max_num_batched_tokens=args.budget, cache_memory_gb=2.0,
              enable_prefix_caching=False, num_threads=args.threads)
    hf = None if args.skip_hf else build_hf(bf16_model, dtype).to(getattr(torch, args.hf_dtype))
    prompt = _prompt(args.prompt_len, 1)
    long_prompt = _prompt(args.prefill_len, 3)
    engine_decode_steps(llm, _prompt(32, 2), 4)  # warm-up
    # NOTE: on a shared machine the load changes minute to minute, so engine and transformers are measured in
    # alternating rounds and each figure is the median over rounds; ratios come from the same rounds.
    e_step, e_pre, h_step, h_prefill = [], [], [], []
    for r in range(args.rounds):
        e_step.append(engine_decode_steps(llm, prompt, args.new)[1])
        e_pre.append(engine_decode_steps(llm, long_prompt, 2)[0])
        if hf is not None:
            h_step.append(hf_times(hf, prompt, args.hf_new, reps=2)[1])
            t = time.perf_counter()
            with torch.inference_mode():
                hf(torch.tensor([long_prompt]))
            h_prefill.append(time.perf_counter() - t)
        log(f"round {r}: engine step {e_step[-1] * 1e3:.0f} ms, prefill {e_pre[-1]:.1f} s"
            + (f"; transformers step {h_step[-1] * 1e3:.0f} ms, prefill {h_prefill[-1]:.1f} s" if hf else ""))
    res["rounds_engine_step_ms"] = [round(x * 1e3, 1) for x in e_step]
    res["rounds_hf_step_ms"] = [round(x * 1e3, 1) for x in h_step]
    step = statistics.median(e_step)
    res["engine_decode_tok_s"] = round(1 / step, 2)
    res["engine_decode_step_ms"] = round(step * 1e3, 2)
    bw = max(bw, measure_bandwidth())
    res["bandwidth_gbs"] = round(bw / 1e9, 2)
    res["bandwidth_util"] = round(wbytes / step / bw, 3)
    log(f"engine single-stream decode: {1 / step:.1f} tok/s ({step * 1e3:.1f} ms/step), "
        f"bandwidth utilisation {res['bandwidth_util']:.0%} of {bw / 1e9:.2f} GB/s")
    if args.bf16_head_rounds:
        # The official head is fp32 (265 MB here, read every token); transformers holds it in bf16. The same engine
        # with the head rounded to bf16 shows what that costs (different logits: reported, never the headline).
        fp32_head = model.head.weight.data
        model.head.weight.data = fp32_head.bfloat16()
        steps = [engine_decode_steps(llm, prompt, args.new)[1] for _ in range(args.bf16_head_rounds)]
        model.head.weight.data = fp32_head
        res["engine_decode_tok_s_bf16_head"] = round(1 / statistics.median(steps), 2)
        log(f"engine single-stream decode with a bf16 head: {res['engine_decode_tok_s_bf16_head']} tok/s")
    res["engine_prefill_tok_s"] = round(args.prefill_len / statistics.median(e_pre), 1)
    log(f"engine prefill ({args.prefill_len} tokens): {res['engine_prefill_tok_s']} tok/s")
    if args.spec_new:
        # MTP speculation on the same weights. NOTE: a random MTP block almost never agrees with the random main
        # model, so the acceptance rate here measures the mechanism's overhead, not the speed-up of a real checkpoint.
        spec_llm = LLM(model, max_num_seqs=1, max_num_batched_tokens=args.budget, cache_memory_gb=0.5,
                       enable_prefix_caching=False, speculative=True, num_threads=args.threads)
        t = time.perf_counter()
        spec_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=args.spec_new, ignore_eos=True))
        res["spec_tok_s"] = round(args.spec_new / (time.perf_counter() - t), 2)
        res["spec_acceptance_rate"] = round(spec_llm.engine.acceptance_rate or 0.0, 3)
        log(f"MTP speculative single stream: {res['spec_tok_s']} tok/s (prefill included), acceptance rate "
            f"{res['spec_acceptance_rate']}")
        del spec_llm
    # Batched throughput against transformers serving the same requests one at a time, in alternating rounds too:
    # each round, one engine run of all the requests, then transformers generating one of them (its prefill +
    # (new - 1) decode steps, timed from a shorter generation); medians over the rounds.
    e_batched, h_one = [], []
    for r in range(max(1, args.batched_rounds)):
        e_batched.append(engine_batched(llm, args.batch, args.prompt_len, args.new))
        if hf is not None:
            p1, st = hf_times(hf, _prompt(args.prompt_len, 1000 + r), args.hf_new, reps=1)
            h_one.append(args.new / (p1 + (args.new - 1) * st))
        log(f"batched round {r}: engine {e_batched[-1]:.1f} tok/s"
            + (f"; transformers one at a time {h_one[-1]:.2f} tok/s" if h_one else ""))
    res["rounds_engine_batched_tok_s"] = [round(x, 1) for x in e_batched]
    res["rounds_hf_one_at_a_time_tok_s"] = [round(x, 2) for x in h_one]
    res["engine_batched_tok_s"] = round(statistics.median(e_batched), 2)
    log(f"engine batched ({args.batch} x {args.prompt_len}/{args.new}): {res['engine_batched_tok_s']} tok/s")
    del llm

    if hf is not None:
        hf_step = statistics.median(h_step)
        res["hf_decode_tok_s"] = round(1 / hf_step, 2)
        res["hf_decode_step_ms"] = round(hf_step * 1e3, 2)
        res["hf_one_at_a_time_tok_s"] = round(statistics.median(h_one), 2)
        res["hf_prefill_tok_s"] = round(args.prefill_len / statistics.median(h_prefill), 1)
        res["decode_speedup"] = round(res["engine_decode_tok_s"] / res["hf_decode_tok_s"], 2)
        if "engine_decode_tok_s_bf16_head" in res:
            res["decode_speedup_bf16_head"] = round(res["engine_decode_tok_s_bf16_head"] / res["hf_decode_tok_s"], 2)
        res["batched_speedup"] = round(res["engine_batched_tok_s"] / res["hf_one_at_a_time_tok_s"], 2)
        res["prefill_speedup"] = round(res["engine_prefill_tok_s"] / res["hf_prefill_tok_s"], 2)
        log(f"transformers: decode {res['hf_decode_tok_s']} tok/s, one-at-a-time {res['hf_one_at_a_time_tok_s']} "
            f"tok/s, prefill {res['hf_prefill_tok_s']} tok/s")
        log(f"speedups: decode {res['decode_speedup']}x (target 5x), batched {res['batched_speedup']}x (target 20x), "
            f"prefill {res['prefill_speedup']}x")
        del hf

    long_context(model, args, res)
    res["peak_rss_mib"] = round(peak_rss_mib(), 1)
    return res


def long_context(model: Any, args: argparse.Namespace, res: dict[str, Any]) -> None:
    if not args.long_ctx:
        return
    s1k = engine_context_step(model, 1024, args.threads)
    slong = engine_context_step(model, args.long_ctx, args.threads)
    res["step_ms_1k"] = round(s1k * 1e3, 2)
    res[f"step_ms_{args.long_ctx // 1024}k"] = round(slong * 1e3, 2)
    res["long_ctx_step_ratio"] = round(slong / s1k, 3)
    log(f"decode step at 1K: {s1k * 1e3:.1f} ms, at {args.long_ctx}: {slong * 1e3:.1f} ms "
        f"(ratio {slong / s1k:.2f}, target <= 1.5)")


def write_report(res: dict[str, Any], args: argparse.Namespace, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y-%m-%d_%H%M")
    path = out_dir / f"engine_{stamp}.md"
    lines = [
        f"# dsv4 engine benchmark, {stamp}",
        "",
        f"Command: `python benchmarks/bench_engine.py {' '.join(args.argv)}`",
        "",
        "## Checkpoint (random weights, bf16; fp32 head, norms, mHC and compressor as in the official model)",
        "",
        "```json",
        json.dumps(BENCH_CONFIG),
        "```",
        "",
        "## Results",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in res.items()]
    lines += ["", "Targets: decode_speedup >= 5, batched_speedup >= 20, long_ctx_step_ratio <= 1.5.", ""]
    path.write_text("\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="dsv4 bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=max(1, torch.get_num_threads()))
    ap.add_argument("--weights-cache", type=Path, default=None,
                    help="save the random weights here on the first run and reuse them afterwards")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new", type=int, default=128, help="output tokens per request")
    ap.add_argument("--hf-new", type=int, default=32, help="tokens transformers generates to time its decode step")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--budget", type=int, default=1024, help="engine token budget per step")
    ap.add_argument("--prefill-len", type=int, default=1024)
    ap.add_argument("--long-ctx", type=int, default=32768, help="0 skips the 1K/32K step comparison")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--rounds", type=int, default=3, help="alternating engine/transformers measurement rounds")
    ap.add_argument("--batched-rounds", type=int, default=3,
                    help="alternating rounds of the engine's batched run and one transformers request")
    ap.add_argument("--only-long-ctx", action="store_true", help="measure only the 1K vs long-context decode step")
    ap.add_argument("--spec-new", type=int, default=32, help="tokens for the MTP speculative run (0 skips it)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="engine compute dtype on the PyTorch path (weights are the bf16 checkpoint's, upcast losslessly "
                         "for float32); the native path always computes in float32")
    ap.add_argument("--hf-dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--bf16-head-rounds", type=int, default=1,
                    help="extra single-stream rounds with the head rounded to bf16, as transformers holds it (0 skips)")
    ap.add_argument("--native", default="auto", choices=["auto", "on", "off"],
                    help="engine on the native CPU kernels (auto: when they build here) or the PyTorch path")
    ap.add_argument("--report", type=Path, default=None, help="directory for a dated Markdown report")
    args = ap.parse_args(argv)
    args.argv = list(argv) if argv is not None else []
    res = run(args)
    if args.report is not None:
        log(f"report: {write_report(res, args, args.report)}")
    print(json.dumps(res), flush=True)
    return 0
