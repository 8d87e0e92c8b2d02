"""V4's optimiser: Muon for the matrices, AdamW for the rest, and the learning-rate schedules.

Report sec. 2.4 (Alg. 1): Muon with Nesterov momentum 0.95, a *hybrid* Newton-Schulz orthogonalisation (8 steps with
the fast-converging coefficients (3.4445, -4.7750, 2.0315), then 2 steps with (2, -1.5, 0.5) that pull every singular
value onto 1), the update rescaled to RMS 0.18 through `sqrt(max(n, m)) * 0.18` so that it reuses AdamW's learning rate,
and decoupled weight decay 0.1. AdamW (b1 0.9, b2 0.95, eps 1e-20, wd 0.1) trains the embedding, the prediction head,
the RMSNorm weights and the mHC static biases / gating factors (`hc_*_base`, `hc_*_scale`).

Which optimiser a parameter gets is decided from its official checkpoint name alone (`param_groups`), so the same rule
works for the single-device model and for a sharded one.

Deliberately not here: ZeRO-sharded Muon (the report's "hybrid ZeRO"). Under FSDP2 a Muon parameter is a DTensor shard;
`Muon.step` gathers the full matrix for the orthogonalisation (it is a whole-matrix operation) and keeps the momentum
sharded.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

# Hybrid Newton-Schulz coefficients (report Alg. 1): 8 fast steps, then 2 stabilising steps.
NS_FAST = (3.4445, -4.7750, 2.0315)
NS_FINAL = (2.0, -1.5, 0.5)
NS_FAST_STEPS = 8
NS_FINAL_STEPS = 2


def hybrid_newton_schulz(g: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Approximate the orthogonal polar factor U V^T of `g` ([..., n, m]; leading dims are independent matrices).

    Works in fp32: these matrices are small next to the forward/backward, and bf16 NS shifts the singular values by
    a few percent, which the exactness test of this module would not tolerate.
    """
    x = g.float()
    # X0 = M / ||M||_F puts every singular value in (0, 1], where the iteration converges.
    x = x / (torch.linalg.matrix_norm(x, ord="fro", keepdim=True) + eps)
    transposed = x.size(-2) > x.size(-1)
    if transposed:  # iterate on the wide orientation so that A = X X^T is the smaller Gram matrix
        x = x.mT
    for a, b, c in [NS_FAST] * NS_FAST_STEPS + [NS_FINAL] * NS_FINAL_STEPS:
        gram = x @ x.mT  # [..., n, n]
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if transposed else x


def _full(t: torch.Tensor) -> torch.Tensor:
    # FSDP2 shards parameters as DTensors; orthogonalisation needs the whole matrix.
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _like(full: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Take this rank's shard of `full` when `ref` is a DTensor (every rank computed the same full update)."""
    if hasattr(ref, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full, ref.device_mesh, ref.placements)
    return full


class Muon(torch.optim.Optimizer):
    """Muon as in V4 (report Alg. 1). A 3-D parameter [E, out, in] is E independent matrices (one per expert).

    Per step, for each matrix W with gradient G:  M = mu*M + G;  O = HybridNS(mu*M + G) (Nesterov);
    W = W*(1 - lr*wd) - lr * sqrt(max(n, m)) * rms * O.
    """

    def __init__(
        self,
        params: Iterable[nn.Parameter] | Iterable[dict],
        lr: float = 2e-4,
        momentum: float = 0.95,
        weight_decay: float = 0.1,
        update_rms: float = 0.18,
        nesterov: bool = True,
    ):
        if lr < 0 or not 0 <= momentum < 1:
            raise ValueError(f"Muon needs lr >= 0 and 0 <= momentum < 1, got lr={lr}, momentum={momentum}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, update_rms=update_rms, nesterov=nesterov)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            # Matrices of one shape are orthogonalised together as one batched NS (each matrix still separately:
            # the iteration is per matrix); on small models this removes most of the per-matmul overhead.
            by_shape: dict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.ndim < 2:
                    raise ValueError(f"Muon only takes matrices; got a {p.ndim}-D parameter (route it to AdamW)")
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p, dtype=torch.float32)
                buf = state["momentum_buffer"]
                buf.mul_(mu).add_(p.grad.float())
                upd = p.grad.float().add(buf, alpha=mu) if group["nesterov"] else buf
                full = _full(upd)
                by_shape.setdefault(tuple(full.shape), []).append((p, full))
            for shape, items in by_shape.items():
                n, m = shape[-2:]
                stacked = torch.stack([u for _, u in items])  # [G, ..., n, m]
                ortho = hybrid_newton_schulz(stacked) * (math.sqrt(max(n, m)) * group["update_rms"])
                for (p, _), o in zip(items, ortho.unbind(0)):
                    p.mul_(1 - lr * wd)
                    p.add_(_like(o, p).to(p.dtype), alpha=-lr)
        return loss


# Substrings of official checkpoint names that go to AdamW (report sec. 2.4). Everything else that is a matrix goes to
# Muon, including `hc_*_fn` (the report trains the mHC dynamic projections with Muon).
_ADAMW_EXACT = {"embed.weight", "head.weight"}


def uses_adamw(name: str, p: torch.Tensor) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    if name in _ADAMW_EXACT or p.ndim < 2:
        return True  # embedding, head, every norm weight, attn_sink, hc_*_base / hc_*_scale (all 1-D)
    # The compressor's learned positional bias `ape` [ratio, dim] is a bias table, not a linear map.
    return leaf == "ape"


def is_trainable(name: str, p: torch.Tensor) -> bool:
    # gate.bias is the aux-loss-free balancing bias: moved by expert load (loss.update_gate_bias), never by gradients.
    # tid2eid is the hash-routing table (integers).
    return p.dtype.is_floating_point and not name.endswith("gate.bias") and not name.endswith("tid2eid")


@dataclass
class OptimConfig:
    lr: float = 3e-4
    optimizer: str = "muon"  # "muon" (V4: Muon + AdamW) or "adamw" (AdamW for every parameter)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-20
    weight_decay: float = 0.1
    muon_momentum: float = 0.95
    muon_update_rms: float = 0.18
    # After a linear warmup: "cosine" (decay over all remaining steps), "constant", or "wsd" (warmup-stable-decay, the
    # report's sec. 4.2.2 shape: constant, then a cosine decay over the last `decay_fraction` of the steps).
    schedule: str = "cosine"
    decay_fraction: float = 0.2
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio (report: 2.7e-4 -> 2.7e-5)


def param_groups(model: nn.Module) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """Split trainable parameters into (muon, adamw) by official name."""
    packed = [name for name, _ in model.named_parameters() if name.endswith(".scale")]
    if packed:
        raise ValueError(f"this model holds packed FP8/FP4 weights ({packed[0][: -len('scale')]}weight and "
                         f"{len(packed) - 1} more), which cannot be trained; load it with "
                         f"dsv4.load_model(..., weights='dequantized')")
    muon, adamw = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad or not is_trainable(name, p):
            continue
        (adamw if uses_adamw(name, p) else muon).append((name, p))
    return muon, adamw


def build_optimizers(model: nn.Module, cfg: OptimConfig) -> list[torch.optim.Optimizer]:
    if cfg.optimizer not in {"muon", "adamw"}:
        raise ValueError(f"optimizer must be 'muon' or 'adamw', got {cfg.optimizer!r}")
    muon, adamw = param_groups(model)
    if cfg.optimizer == "adamw":
        adamw, muon = muon + adamw, []
    # No weight decay on 1-D parameters (norm gains, mHC biases/scales, sinks): decaying them pulls gains towards 0.
    decay = [p for n, p in adamw if p.ndim >= 2]
    no_decay = [p for n, p in adamw if p.ndim < 2]
    opts: list[torch.optim.Optimizer] = []
    groups = [g for g in ({"params": decay}, {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    if groups:
        # foreach=False: the fused multi-tensor path rounds differently from the single-tensor one on CPU, and the
        # 2-process test compares a sharded run against an unsharded one.
        opts.append(
            torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                              weight_decay=cfg.weight_decay, foreach=False)
        )
    if muon:
        opts.append(
            Muon([p for _, p in muon], lr=cfg.lr, momentum=cfg.muon_momentum, weight_decay=cfg.weight_decay,
                 update_rms=cfg.muon_update_rms)
        )
    return opts


def decay_start(total_steps: int, cfg: OptimConfig) -> int | None:
    """First step of the LR decay (None for a constant schedule)."""
    if cfg.schedule not in {"cosine", "constant", "wsd"}:
        raise ValueError(f"schedule must be 'cosine', 'constant' or 'wsd', got {cfg.schedule!r}")
    if cfg.schedule == "constant":
        return None
    if cfg.schedule == "wsd":
        return max(cfg.warmup_steps, total_steps - int(round(cfg.decay_fraction * total_steps)))
    return cfg.warmup_steps


def lr_at(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then constant / cosine / wsd to min_lr_ratio."""
    start = decay_start(total_steps, cfg)
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if start is None or step < start:
        return cfg.lr
    span = max(1, total_steps - start)
    frac = min(1.0, (step - start) / span)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def set_lr(opts: list[torch.optim.Optimizer], lr: float) -> None:
    for opt in opts:
        for g in opt.param_groups:
            g["lr"] = lr
