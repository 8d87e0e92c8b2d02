"""The V4 training objective and the aux-loss-free balancing update.

Shapes: N = tokens of a varlen micro-batch, V = vocab, E = routed experts, K = experts per token, B = sequences.

    loss = CE(next token) + mtp_weight * CE(token after next, MTP block) + balance_weight * sequence-wise balance loss

(report sec. 4.2.2: MTP weight 0.3, balance weight 1e-4). Token losses are *sums* divided by the number of target
tokens of the whole optimizer step (all micro-batches, all ranks), so gradient accumulation and data parallelism give
exactly the gradient of one big batch.

Sequence-wise balance loss (DeepSeek-V3 eqs. 17-20, kept by V4): for each sequence of T tokens and each routed expert i,
    f_i = E / (K T) * #{t : i in topk(t)}       (no gradient)
    P_i = 1/T * sum_t s_{i,t} / sum_j s_{j,t}    (s = the gate's sqrt-softplus affinities)
    L   = sum_i f_i P_i ,  averaged over the sequences of the step.
Hash-routed layers are skipped: their routing is a fixed table, so there is nothing to balance.

Aux-loss-free balancing (V3 sec. 2.1.2): after each optimizer step every gate bias moves by `speed` towards balance,
    b_i += speed * sign(mean_load - load_i),
using the expert loads of the whole step (summed over ranks when distributed).

Router statistics come from `RouterRecorder`: explicit forward hooks the trainer registers on the routed (non-hash)
gates of its own model instance for the duration of one forward. The hook reads the gate's input and its chosen
indices and recomputes the affinities differentiably (one [N, d] x [d, E] product), so the model code needs no
training-only branch and no global state.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from torch import nn

from dsv4.train.data import IGNORE


@dataclass
class LossConfig:
    mtp_weight: float = 0.3
    # MTP weight once the LR decay has started (report sec. 4.2.2: 0.3, then 0.1); < 0 keeps mtp_weight throughout.
    mtp_weight_in_decay: float = -1.0
    balance_weight: float = 1e-4
    bias_update_speed: float = 1e-3


def token_ce_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy over the non-ignored targets (fp32)."""
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE, reduction="sum")


def sequence_balance_loss(
    scores: torch.Tensor, indices: torch.Tensor, seq_lens: list[int], n_experts: int
) -> torch.Tensor:
    """Sum over sequences of sum_i f_i P_i (the caller divides by the step's sequence count).

    scores [N, E] affinities, indices [N, K] chosen experts, seq_lens splits N into sequences."""
    k = indices.size(-1)
    norm = scores.float() / scores.float().sum(-1, keepdim=True)  # [N, E] s'_{i,t}
    hits = torch.zeros_like(norm).scatter_(1, indices.long(), 1.0)  # [N, E] 1 if expert i is in token t's top-k
    total = scores.new_zeros((), dtype=torch.float32)
    for p, h in zip(norm.split(seq_lens), hits.split(seq_lens)):
        t = p.size(0)
        f = h.sum(0) * (n_experts / (k * t))  # [E]
        total = total + (f.detach() * p.mean(0)).sum()
    return total


@dataclass
class ExpertLoad:
    """Tokens routed to each expert over an optimizer step, per routed (non-hash) layer key."""

    counts: dict[str, torch.Tensor] = field(default_factory=dict)

    def add(self, key: str, indices: torch.Tensor, n_experts: int) -> None:
        c = torch.bincount(indices.reshape(-1).long(), minlength=n_experts).to(torch.float64)
        self.counts[key] = self.counts[key] + c if key in self.counts else c

    def all_reduce(self, group=None) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            for key in sorted(self.counts):  # same order on every rank
                dist.all_reduce(self.counts[key], group=group)

    def imbalance(self) -> dict[str, float]:
        """max load / mean load per layer (1.0 = perfectly balanced)."""
        return {k: float(c.max() / c.mean().clamp_min(1e-9)) for k, c in self.counts.items()}


@torch.no_grad()
def update_gate_biases(gate_biases: dict[str, torch.Tensor], load: ExpertLoad, speed: float) -> None:
    """b_i += speed * sign(mean_load - load_i) for every routed layer's gate bias (in place)."""
    for key, bias in gate_biases.items():
        if key not in load.counts:
            continue
        c = load.counts[key].to(bias.device)
        delta = speed * torch.sign(c.mean() - c)
        local = bias.to_local() if hasattr(bias, "to_local") else bias
        if hasattr(bias, "device_mesh"):  # FSDP2 shard: take the matching slice of the full-size update
            from torch.distributed.tensor import distribute_tensor

            delta = distribute_tensor(delta.to(bias.dtype), bias.device_mesh, bias.placements).to_local()
        local.add_(delta.to(local.dtype))


def routed_gates(model: nn.Module) -> dict[str, nn.Module]:
    """`...ffn.gate` modules that select experts by score (not hash-routed layers: those carry `tid2eid`)."""
    return {
        name: m for name, m in model.named_modules()
        if name.endswith("ffn.gate") and getattr(m, "tid2eid", None) is None and getattr(m, "bias", None) is not None
    }


def gate_scores(gate: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The V4 affinities s = sqrt(softplus(x W^T)) in fp32 (sec. 9), differentiable w.r.t. x and W."""
    w = gate.weight
    w = w.full_tensor() if hasattr(w, "full_tensor") else w
    return F.softplus(F.linear(x.float().reshape(-1, x.size(-1)), w.float())).sqrt()


class RouterRecorder:
    """Context manager: `with RouterRecorder(model) as rec: model(...)`; then `rec.stats` is a list of
    `(gate_name, scores [N, E], indices [N, K])`, one per routed gate call, in forward order."""

    def __init__(self, model: nn.Module):
        self.gates = routed_gates(model)
        self.stats: list[tuple[str, torch.Tensor, torch.Tensor]] = []
        self._handles: list = []

    def _hook(self, name: str):
        def hook(module, args, output):
            indices = output[1] if isinstance(output, (tuple, list)) else output.indices
            self.stats.append((name, gate_scores(module, args[0]), indices.reshape(-1, indices.size(-1))))

        return hook

    def __enter__(self) -> RouterRecorder:
        self._handles = [g.register_forward_hook(self._hook(n)) for n, g in self.gates.items()]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
