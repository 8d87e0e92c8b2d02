"""`dsv4 train`: pre-train or fine-tune a V4 model on text / JSONL data.

    dsv4 train --config recipes/tiny.toml [--steps 100 --lr 3e-4 ...]      any config key overridable
    dsv4 train --model-config PATH/config.json --data PATH [--tokenizer PATH] --steps N --out DIR
    torchrun --nproc-per-node 2 -m dsv4.cli train ...                       FSDP2 data parallel (parallel.py)

One optimizer step = `grad_accum * world_size` packed micro-batches of `tokens_per_batch` tokens; every rank builds
the same step (the data order is a pure function of the seed) and takes its share, so the token counts used to
normalise the loss are known everywhere without communication, and N ranks compute exactly the step a single process
with N-fold accumulation would.

Outputs in `--out`: `metrics.jsonl` (one JSON object per logged step / eval), `checkpoints/step_N/` (exact resume;
`--resume` picks up `checkpoints/latest` automatically), `tokenizer/` when the tokenizer was trained here, and
`export/` (published layout, loadable by `dsv4.load_model` and transformers) at the end.

Deliberately not here: FP8 mixed-precision training and FP4 QAT (report sec. 3/5.2.1), anticipatory routing,
sequence-length/batch-size ramps, context parallelism.
"""

from __future__ import annotations

import json
import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from dsv4.train import parallel
from dsv4.train.checkpoint import (
    export_model,
    full_model_state,
    load_full_state,
    print_warning,
    resume_point,
    save_training_state,
    set_rng_state,
    step_checkpoints,
)
from dsv4.train.config import TrainConfig, config_to_dict, parse_args
from dsv4.train.data import (
    IGNORE,
    Batch,
    Document,
    PackedLoader,
    chunk_documents,
    document_text,
    eval_batches,
    load_documents,
    split_heldout,
    tokenize_documents,
)
from dsv4.train.loss import (
    ExpertLoad,
    RouterRecorder,
    sequence_balance_loss,
    token_ce_sum,
    update_gate_biases,
)
from dsv4.train.optim import build_optimizers, decay_start, lr_at, set_lr

__all__ = ["Trainer", "TrainConfig", "main", "parse_args"]


# ----------------------------------------------------------------------------------------------- model adapter
def build_model(cfg: TrainConfig):
    """(model, ModelConfig, config.json dict). Random init from --model-config, or weights from --init-from."""
    from dsv4.config import ModelConfig

    src = cfg.init_from or cfg.model_config
    path = Path(src)
    cfg_file = path / "config.json" if path.is_dir() else path
    if not cfg_file.is_file():
        raise FileNotFoundError(f"model config {cfg_file} does not exist; pass a config.json or a checkpoint dir")
    raw = json.loads(cfg_file.read_text())
    mcfg = ModelConfig.from_dict(raw)
    if cfg.init_from:
        import dsv4

        # dequantised: packed FP8/FP4 weights are constants (no gradients)
        model = dsv4.load_model(cfg.init_from, dtype=torch.float32, device="cpu", weights="dequantized")
    else:
        from dsv4.model.transformer import Transformer

        model = Transformer(mcfg)
        model.init_weights(cfg.seed)
    model.float().train()
    return model.to(parallel.local_device(cfg.device)), mcfg, raw


def forward_losses(model, batch: Batch, with_mtp: bool, record_router: bool = True):
    """Run the pure varlen forward of one micro-batch; return (logits, mtp_logits | None, router stats)."""
    from dsv4.model.batch import ForwardBatch

    fb = ForwardBatch(
        input_ids=batch.input_ids,
        positions=batch.positions,
        start_pos=[0] * len(batch.seq_lens),
        seq_lens=list(batch.seq_lens),
    )
    with RouterRecorder(model) if record_router else nullcontext() as rec:
        out = model.forward_batch(fb, None)
        mtp_logits = None
        if with_mtp:
            # The MTP block sees the main model's mHC streams and the embedding of the *next* token (targets).
            nxt = ForwardBatch(batch.next_ids, batch.positions, fb.start_pos, fb.seq_lens)
            mtp_logits = model.forward_mtp(nxt, out.hidden).logits
    return out.logits, mtp_logits, (rec.stats if rec is not None else [])


def gate_biases(model) -> dict[str, torch.Tensor]:
    """Aux-loss-free balancing biases (`...ffn.gate.bias`), keyed by the same layer key the gates record."""
    named = dict(model.named_parameters())
    named.update(dict(model.named_buffers()))
    return {n.removesuffix(".bias"): t for n, t in named.items() if n.endswith("ffn.gate.bias")}


# ----------------------------------------------------------------------------------------------- tokenizer / data
def prepare_tokenizer(cfg: TrainConfig, mcfg, docs: list[Document], rank: int):
    from tokenizers import Tokenizer

    if cfg.tokenizer:
        f = Path(cfg.tokenizer)
        f = f / "tokenizer.json" if f.is_dir() else f
        if not f.is_file():
            raise FileNotFoundError(f"tokenizer {f} does not exist; pass a dir with tokenizer.json or omit --tokenizer")
        return Tokenizer.from_file(str(f)), f.parent
    if cfg.init_from and (Path(cfg.init_from) / "tokenizer.json").is_file():
        return Tokenizer.from_file(str(Path(cfg.init_from) / "tokenizer.json")), Path(cfg.init_from)
    if mcfg.vocab_size == 129280:
        from dsv4.train.tokenizer_train import official_tokenizer_dir

        d = official_tokenizer_dir()
        return Tokenizer.from_file(str(d / "tokenizer.json")), d
    # A small custom vocabulary: train a BPE on the training data once (rank 0), reuse it on resume.
    out = Path(cfg.out) / "tokenizer"
    if not (out / "tokenizer.json").is_file() and rank == 0:
        from dsv4.train.tokenizer_train import save_tokenizer, train_tokenizer

        save_tokenizer(train_tokenizer([document_text(d) for d in docs], vocab_size=mcfg.vocab_size), out)
    _barrier()
    return Tokenizer.from_file(str(out / "tokenizer.json")), out


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# ----------------------------------------------------------------------------------------------- training
class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.rank, self.world = parallel.rank_and_world()
        torch.manual_seed(cfg.seed)
        self.device = parallel.local_device(cfg.device)
        self.model, self.mcfg, self.raw_config = build_model(cfg)
        mtp_w = max(cfg.loss.mtp_weight, cfg.loss.mtp_weight_in_decay)
        self.with_mtp = self.mcfg.num_nextn_predict_layers > 0 and mtp_w > 0
        docs = load_documents(cfg.data, split=cfg.data_split)
        train_docs, held_docs = split_heldout(docs, cfg.heldout_fraction, cfg.seed)
        self.tokenizer, self.tokenizer_dir = prepare_tokenizer(cfg, self.mcfg, train_docs, self.rank)
        if self.tokenizer.get_vocab_size() > self.mcfg.vocab_size:
            raise ValueError(
                f"tokenizer has {self.tokenizer.get_vocab_size()} tokens but the model's vocab_size is "
                f"{self.mcfg.vocab_size}; use a matching tokenizer or raise vocab_size in config.json"
            )
        bos, eos = self.mcfg.bos_token_id, self.mcfg.eos_token_id
        eos = eos[0] if isinstance(eos, (list, tuple)) else eos
        tok = lambda ds: chunk_documents(tokenize_documents(self.tokenizer, ds, bos, eos), cfg.seq_len)  # noqa: E731
        self.train_chunks, self.held_chunks = tok(train_docs), tok(held_docs)
        self.loader = PackedLoader(self.train_chunks, cfg.tokens_per_batch, cfg.seed)
        self.ep = cfg.expert_parallel and self.world > 1
        if self.ep:
            from dsv4.train.expert_parallel import apply_expert_parallel

            self.model = apply_expert_parallel(self.model, self.rank, self.world)
        else:
            self.model = parallel.apply_data_parallel(self.model, self.world)
        self.opts = build_optimizers(self.model, cfg.optim)
        self.biases = gate_biases(self.model)
        self.step = 0
        self.out = Path(cfg.out)
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "train_config.json").write_text(json.dumps(config_to_dict(cfg), indent=2) + "\n")
        warn = print_warning if self.rank == 0 else (lambda msg: None)
        found = resume_point(self.out, warn) if cfg.resume else None
        old = step_checkpoints(self.out / "checkpoints")
        if not cfg.resume and old:
            warn(f"--resume false in {self.out}, which holds checkpoints up to {old[0].name} of an earlier run; this "
                 "run's saves replace those of the same step (use a new --out to keep them all)")
        if found is not None:
            self._resume(*found)

    def _resume(self, path: Path, state: dict) -> None:
        load_full_state(self.model, self.opts, state, self.ep)
        self.loader.load_state_dict(state["data"])
        set_rng_state(state["rng"])
        self.step = state["step"]
        if self.rank == 0:
            print(f"resumed from {path} at step {self.step}", file=sys.stderr)

    def autocast(self):
        if self.cfg.dtype == "bfloat16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        if self.cfg.dtype != "float32":
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {self.cfg.dtype!r}")
        return nullcontext()

    def train_step(self) -> dict[str, Any]:
        cfg, lc = self.cfg, self.cfg.loss
        lr = lr_at(self.step, cfg.steps, cfg.optim)
        set_lr(self.opts, lr)
        start = decay_start(cfg.steps, cfg.optim)
        in_decay = start is not None and self.step >= start and lc.mtp_weight_in_decay >= 0
        mtp_w = lc.mtp_weight_in_decay if in_decay else lc.mtp_weight
        micro = [self.loader.next_batch() for _ in range(cfg.grad_accum * self.world)]
        mine = micro[self.rank :: self.world]
        # max(1, ...): a step of context-only tokens (possible with loss-masked chat data) has nothing to learn
        n_tgt = max(1, sum(int((b.targets != IGNORE).sum()) for b in micro))
        n_mtp = max(1, sum(int((b.mtp_targets != IGNORE).sum()) for b in micro))
        n_seq = sum(len(b.seq_lens) for b in micro)
        load = ExpertLoad()
        sums = torch.zeros(3, dtype=torch.float64)  # ce, mtp, balance (already normalised by the step's counts)
        for b in mine:
            b = b.to(self.device)
            with self.autocast():
                logits, mtp_logits, stats = forward_losses(self.model, b, self.with_mtp)
            ce = token_ce_sum(logits, b.targets) / n_tgt
            mtp = token_ce_sum(mtp_logits, b.mtp_targets) / n_mtp if mtp_logits is not None else ce.new_zeros(())
            bal = ce.new_zeros(())
            for key, scores, idx in stats:
                load.add(key, idx, scores.size(-1))
                if lc.balance_weight > 0:
                    bal = bal + sequence_balance_loss(scores, idx, b.seq_lens, scores.size(-1)) / n_seq
            loss = ce + mtp_w * mtp + lc.balance_weight * bal
            # Each rank's loss is already a share of the global mean; FSDP (or sync_gradients under EP) averages
            # gradients over ranks, so scale by the world size to get the sum of the shares (= the single-process
            # gradient).
            (loss * self.world).backward()
            sums += torch.tensor([ce.item(), mtp.item(), bal.item()], dtype=torch.float64)
        grad_norm = self._clip()
        for opt in self.opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
        sums = parallel.all_reduce_sum(sums)
        load.all_reduce()
        update_gate_biases(self.biases, load, lc.bias_update_speed)
        self.step += 1
        ce, mtp, bal = sums.tolist()
        return {
            "step": self.step, "loss": ce + mtp_w * mtp + lc.balance_weight * bal, "ce": ce, "mtp": mtp,
            "balance": bal, "mtp_weight": mtp_w, "lr": lr, "grad_norm": grad_norm,
            "tokens": sum(b.num_tokens for b in micro), "epoch": self.loader.epoch,
            "expert_load": {k: v.tolist() for k, v in load.counts.items()},
        }

    def _clip(self) -> float:
        if self.ep:
            from dsv4.train.expert_parallel import clip_grad_norm, sync_gradients

            sync_gradients(self.model, self.world)
            return clip_grad_norm(self.model, self.cfg.grad_clip)
        params = [p for p in self.model.parameters() if p.grad is not None]
        if not params:
            return 0.0
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        return float(norm)

    @torch.no_grad()
    def evaluate(self) -> float | None:
        if not self.held_chunks:
            return None
        self.model.eval()
        total, count = 0.0, 0
        for b in eval_batches(self.held_chunks, self.cfg.tokens_per_batch, self.cfg.eval_batches):
            b = b.to(self.device)
            with self.autocast():
                logits, _, _ = forward_losses(self.model, b, False, record_router=False)
            total += float(token_ce_sum(logits, b.targets))
            count += int((b.targets != IGNORE).sum())
        self.model.train()
        return total / max(1, count)

    def save(self) -> None:
        save_training_state(self.out, self.step, self.model, self.opts, {"data": self.loader.state_dict()},
                            expert_parallel=self.ep)

    def log(self, rec: dict) -> None:
        if self.rank == 0:
            with (self.out / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(rec) + "\n")

    def export(self) -> Path | None:
        state = full_model_state(self.model, self.ep)
        if self.rank != 0:
            return None
        return export_model(state, self.raw_config, self.out / "export", self.tokenizer_dir,
                            dtype=getattr(torch, self.cfg.export_dtype))

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        show = cfg.progress and self.rank == 0
        bar = None
        if show:
            from tqdm import tqdm

            bar = tqdm(total=cfg.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        t0, tokens, last = time.perf_counter(), 0, {}
        while self.step < cfg.steps:
            rec = self.train_step()
            tokens += rec["tokens"]
            elapsed = time.perf_counter() - t0
            rec["tok_per_s"] = tokens / max(elapsed, 1e-9)
            rec["elapsed_s"] = elapsed
            if not math.isfinite(rec["loss"]):
                raise FloatingPointError(
                    f"loss became {rec['loss']} at step {self.step}; lower --lr or enable --grad-clip"
                )
            if self.step % max(1, cfg.log_every) == 0 or self.step == cfg.steps or self.step == 1:
                self.log(rec)
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                self.log({"step": self.step, "eval_loss": self.evaluate()})
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
                self.save()
            if bar is not None:
                bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tok_per_s']:.0f}", lr=f"{rec['lr']:.2e}")
                bar.update(1)
            last = rec
        if bar is not None:
            bar.close()
        ev = self.evaluate()
        self.log({"step": self.step, "eval_loss": ev, "final": True})
        self.save()
        if cfg.export:
            self.export()
        return {"step": self.step, "loss": last.get("loss"), "eval_loss": ev}


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(list(sys.argv[1:] if argv is None else argv))
    parallel.init_distributed(cfg.device)
    try:
        result = Trainer(cfg).run()
        if parallel.rank_and_world()[0] == 0:
            print(json.dumps(result))
    finally:
        parallel.destroy_distributed()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
