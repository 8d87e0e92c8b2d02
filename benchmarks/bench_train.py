"""Training throughput: dsv4's trainer step vs a transformers DeepseekV4ForCausalLM + torch AdamW loop, same config.

    python3 benchmarks/bench_train.py [--config recipes/default_model_config.json]
                                      [--seqs 8 --seq-len 256 --steps 5 --threads 1]

Workload: `--seqs` sequences of `--seq-len` random tokens per step (fixed seed), fp32 on CPU, `--warmup` untimed
steps first. dsv4 runs its full V4 objective (next-token CE + MTP + balance loss, Muon + AdamW, gate-bias update);
the peer runs transformers' model (no MTP: it does not implement one) with its next-token loss and torch AdamW.
Both count the same input tokens. A third run, dsv4 with AdamW and next-token CE only, does exactly the peer's work
(like-for-like). Muon's 10 Newton-Schulz iterations per matrix cost a fixed amount per optimizer step, so it weighs
heavily at these tiny batches and vanishes at real batch sizes. The last stdout line is JSON.

Peak: the CPU's fp32 FLOP/s is not measured here; `model_tflops` reports 6 * active-params * tokens/s so runs on
different machines can be compared.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def active_params(raw: dict) -> int:
    """Per-token matmul parameters (embedding excluded): attention + shared + top-k experts + head."""
    from dsv4.config import ModelConfig

    c = ModelConfig.from_dict(raw)
    d, inter = c.hidden_size, c.moe_intermediate_size
    per_layer = (
        d * c.q_lora_rank + c.q_lora_rank * c.num_attention_heads * c.head_dim + d * c.head_dim
        + c.o_groups * c.o_lora_rank * (c.num_attention_heads * c.head_dim // c.o_groups)
        + d * c.o_groups * c.o_lora_rank
        + 3 * d * inter * (c.num_experts_per_tok + c.n_shared_experts)
    )
    return c.num_hidden_layers * per_layer + d * c.vocab_size


def bench_dsv4(raw: dict, ids: torch.Tensor, steps: int, warmup: int, v4_objective: bool = True) -> float:
    """v4_objective: Muon + AdamW, MTP loss, balance loss and bias update (what `dsv4 train` runs). False: AdamW and
    next-token CE only, the same work as the transformers peer."""
    from dsv4.config import ModelConfig
    from dsv4.model.transformer import Transformer
    from dsv4.train.data import make_batch
    from dsv4.train.loss import ExpertLoad, LossConfig, sequence_balance_loss, token_ce_sum, update_gate_biases
    from dsv4.train.optim import OptimConfig, build_optimizers
    from dsv4.train.trainer import forward_losses, gate_biases

    cfg = ModelConfig.from_dict(raw)
    model = Transformer(cfg)
    model.init_weights(0)
    model.float().train()
    opts = build_optimizers(model, OptimConfig(lr=3e-4, optimizer="muon" if v4_objective else "adamw"))
    biases, lc = gate_biases(model), LossConfig()
    batch = make_batch([row.numpy() for row in ids])
    n_tgt = int(batch.targets.numel())

    def step() -> None:
        with_mtp = v4_objective and cfg.num_nextn_predict_layers > 0
        logits, mtp_logits, stats = forward_losses(model, batch, with_mtp, record_router=v4_objective)
        loss = token_ce_sum(logits, batch.targets) / n_tgt
        if mtp_logits is not None:
            loss = loss + lc.mtp_weight * token_ce_sum(mtp_logits, batch.mtp_targets) / n_tgt
        load = ExpertLoad()
        for key, scores, idx in stats:
            load.add(key, idx, scores.size(-1))
            loss = loss + lc.balance_weight * sequence_balance_loss(scores, idx, batch.seq_lens, scores.size(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for o in opts:
            o.step()
            o.zero_grad(set_to_none=True)
        update_gate_biases(biases, load, lc.bias_update_speed)

    return _time(step, batch.num_tokens, steps, warmup)


def bench_transformers(raw: dict, ids: torch.Tensor, steps: int, warmup: int) -> float:
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    torch.manual_seed(0)
    model = DeepseekV4ForCausalLM(DeepseekV4Config(**raw)).float().train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    inputs, labels = ids[:, :-1], ids[:, 1:]

    def step() -> None:
        logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return _time(step, inputs.numel(), steps, warmup)


def _time(step, tokens: int, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return tokens * steps / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=ROOT / "recipes" / "default_model_config.json")
    p.add_argument("--seqs", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    raw = json.loads(args.config.read_text())
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, raw["vocab_size"], (args.seqs, args.seq_len + 1), generator=g)
    ours = bench_dsv4(raw, ids, args.steps, args.warmup)
    print(f"dsv4 trainer (V4 objective, Muon): {ours:9.1f} tok/s")
    plain = bench_dsv4(raw, ids, args.steps, args.warmup, v4_objective=False)
    print(f"dsv4 (CE only, AdamW):             {plain:9.1f} tok/s")
    peer = bench_transformers(raw, ids, args.steps, args.warmup)
    print(f"transformers + AdamW (CE only):    {peer:9.1f} tok/s")
    act = active_params(raw)
    print(json.dumps({
        "bench": "train", "config": str(args.config.name), "tokens_per_step": args.seqs * args.seq_len,
        "dsv4_tok_s": round(ours, 1), "dsv4_ce_adamw_tok_s": round(plain, 1), "transformers_tok_s": round(peer, 1),
        "speedup_like_for_like": round(plain / peer, 3), "speedup_v4_objective": round(ours / peer, 3),
        "active_params": act, "dsv4_model_tflops": round(6 * act * ours / 1e12, 4),
        "threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
