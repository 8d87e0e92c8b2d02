from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

# A tiny V4: every layer type (SWA, CSA, HCA), a hash layer and routed layers, mHC, MTP.
TINY_TRAIN = dict(
    vocab_size=1664, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, head_dim=32, qk_rope_head_dim=16,
    q_lora_rank=16, o_groups=2, o_lora_rank=16, sliding_window=8, compress_ratios=[0, 4, 128, 0], index_n_heads=2,
    index_head_dim=32, index_topk=4, moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2,
    num_hash_layers=1, hc_mult=2, hc_sinkhorn_iters=4, routed_scaling_factor=1.5, num_nextn_predict_layers=1,
    rope_scaling={"type": "yarn", "factor": 4, "original_max_position_embeddings": 32, "beta_fast": 32, "beta_slow": 1},
    bos_token_id=0, eos_token_id=1,
)

WORDS = "the cat dog bird sat ran flew on over under a mat log tree and then slept".split()


def synthetic_corpus(n_docs: int, seed: int = 0) -> list[str]:
    """Documents from a tiny grammar: learnable within a few dozen steps."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        sents = []
        for _ in range(rng.randint(2, 6)):
            subj, verb, prep, obj = rng.choice(["cat", "dog", "bird"]), rng.choice(["sat", "ran", "flew"]), \
                rng.choice(["on", "over", "under"]), rng.choice(["mat", "log", "tree"])
            sents.append(f"the {subj} {verb} {prep} a {obj}.")
        docs.append(" ".join(sents))
    return docs


@pytest.fixture(scope="session")
def train_assets(tmp_path_factory) -> dict[str, Path]:
    """model config.json, a JSONL corpus and a trained tokenizer dir (all generated)."""
    from dsv4.train.tokenizer_train import save_tokenizer, train_tokenizer

    root = tmp_path_factory.mktemp("train_assets")
    (root / "config.json").write_text(json.dumps(TINY_TRAIN))
    docs = synthetic_corpus(120)
    with (root / "corpus.jsonl").open("w") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    save_tokenizer(train_tokenizer(docs, vocab_size=TINY_TRAIN["vocab_size"]), root / "tokenizer")
    return {"config": root / "config.json", "data": root / "corpus.jsonl", "tokenizer": root / "tokenizer"}


def base_args(assets: dict[str, Path], out: Path, **over) -> list[str]:
    args = {
        "model-config": assets["config"], "data": assets["data"], "tokenizer": assets["tokenizer"], "out": out,
        "seq-len": 32, "tokens-per-batch": 128, "steps": 4, "log-every": 1, "lr": 3e-3, "warmup-steps": 2,
        "progress": "false", "eval-batches": 2, "threads": 1, "export": "false", "heldout-fraction": 0.05,
    }
    args.update(over)
    return [x for k, v in args.items() for x in (f"--{k}", str(v))]
