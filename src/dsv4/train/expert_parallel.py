"""Expert parallelism: each rank holds E / world routed experts of every MoE layer and tokens travel to them.

Applied from outside to the unchanged model (`apply_expert_parallel`): every `MoE` module is swapped for an
`ExpertParallelMoE` holding the same gate and shared expert and only this rank's experts, under the same checkpoint
names (`ffn.experts.{e}.w1.weight`, ...). A forward step (DeepSeek-V3/V4 style all-to-all dispatch):

    gate -> sort (token, expert) pairs by expert -> all-to-all the token rows (and routing weights) to the experts'
    owners -> each owner runs its experts -> all-to-all the results back -> sum into the tokens (fp32) + shared expert

Both all-to-alls are autograd functions, so gradients flow back to the sending ranks' activations and gate. The other
parameters are replicated and their gradients averaged (`sync_gradients`), which, together with the trainer scaling
each rank's loss by the world size, yields the single-process gradient; expert gradients already hold every rank's
contribution and are only divided by the world size.

Deliberately not here: combining EP with FSDP2 sharding of the non-expert parameters (use one or the other), and
capacity limits / token dropping (every token reaches its experts, as in the official code).

Shape legend: N tokens on this rank, D dim, k experts per token, R rows received from all ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn


class ExpertParallelMoE(nn.Module):
    def __init__(self, moe: nn.Module, rank: int, world: int, group=None) -> None:
        super().__init__()
        n = moe.n_experts
        if n % world:
            raise ValueError(f"expert parallelism needs n_routed_experts ({n}) divisible by the world size ({world})")
        self.n_experts, self.per_rank, self.rank, self.world, self.group = n, n // world, rank, world, group
        self.first = rank * self.per_rank
        self.gate = moe.gate
        # ModuleDict keyed by the global expert index keeps the official state-dict names (experts.{e}.w1.weight).
        self.experts = nn.ModuleDict({str(e): moe.experts[e] for e in range(self.first, self.first + self.per_rank)})
        self.shared_experts = moe.shared_experts

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """x [N, D] -> [N, D]; collective: every rank must call it (possibly with N = 0)."""
        n, k = x.shape[0], self.gate.topk
        weights, ids = self.gate(x, input_ids)  # [N, k]
        flat = ids.flatten()  # [N*k]
        order = torch.argsort(flat, stable=True)  # pairs grouped by expert, hence by owner rank
        send_counts = torch.bincount(flat // self.per_rank, minlength=self.world)  # [W]
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        send, recv = send_counts.tolist(), recv_counts.tolist()
        rows = sum(recv)
        x_send = x[order // k]  # [N*k, D]
        w_send = weights.flatten()[order].unsqueeze(1)  # [N*k, 1] fp32
        x_recv = dist_fn.all_to_all_single(x.new_empty(rows, x.shape[1]), x_send, recv, send, group=self.group)
        w_recv = dist_fn.all_to_all_single(w_send.new_empty(rows, 1), w_send, recv, send, group=self.group)
        e_recv = flat.new_empty(rows)
        dist.all_to_all_single(e_recv, flat[order].contiguous(), recv, send, group=self.group)
        y_recv = torch.zeros(rows, x.shape[1], dtype=torch.float32, device=x.device)  # [R, D]
        for e in range(self.first, self.first + self.per_rank):
            sel = (e_recv == e).nonzero().squeeze(1)
            if sel.numel():
                y_recv = y_recv.index_add(0, sel, self.experts[str(e)](x_recv[sel], w_recv[sel, 0]).float())
        y_back = dist_fn.all_to_all_single(y_recv.new_empty(n * k, x.shape[1]), y_recv, send, recv, group=self.group)
        y = torch.zeros(n, x.shape[1], dtype=torch.float32, device=x.device).index_add(0, order // k, y_back)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x).float()
        return y.to(x.dtype)


def apply_expert_parallel(model: nn.Module, rank: int, world: int, group=None) -> nn.Module:
    """Swap every MoE (a module with `gate`, `experts`, `n_experts`) for its expert-parallel twin, in place."""
    targets = [(name, m) for name, m in model.named_modules()
               if hasattr(m, "gate") and isinstance(getattr(m, "experts", None), nn.ModuleList)]
    for name, m in targets:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, ExpertParallelMoE(m, rank, world, group))
    return model


def is_expert_param(name: str) -> bool:
    return ".ffn.experts." in name


def sync_gradients(model: nn.Module, world: int, group=None) -> None:
    """Average replicated parameters' gradients over ranks; expert gradients only need the 1/world of the mean."""
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        if not is_expert_param(name):
            dist.all_reduce(p.grad, group=group)
        p.grad.div_(world)


def clip_grad_norm(model: nn.Module, max_norm: float, group=None) -> float:
    """Global gradient norm over replicated params (counted once) and every rank's own experts, then clip."""
    local_sq = torch.zeros((), dtype=torch.float64)
    shared_sq = torch.zeros((), dtype=torch.float64)
    grads = []
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        grads.append(p.grad)
        sq = p.grad.double().pow(2).sum()
        if is_expert_param(name):
            local_sq += sq
        else:
            shared_sq += sq
    dist.all_reduce(local_sq, group=group)
    norm = float((local_sq + shared_sq).sqrt())
    if max_norm > 0 and norm > max_norm:
        for g in grads:
            g.mul_(max_norm / (norm + 1e-6))
    return norm


def gather_full_state(model: nn.Module, group=None) -> dict[str, torch.Tensor] | None:
    """Full model state on rank 0 (replicated tensors from rank 0, experts from their owners); None elsewhere."""
    local = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    experts = {k: v for k, v in local.items() if is_expert_param(k)}
    parts: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, experts, group=group)
    if dist.get_rank(group) != 0:
        return None
    full = {k: v for k, v in local.items() if not is_expert_param(k)}
    for part in parts:
        full.update(part)
    return full


def load_local_state(model: nn.Module, full: dict[str, torch.Tensor]) -> None:
    """Load this rank's slice of a full state dict (its experts + every replicated tensor)."""
    own = model.state_dict()
    missing = [k for k in own if k not in full]
    if missing:
        raise KeyError(f"checkpoint lacks {len(missing)} tensors of this model, e.g. {missing[:3]}")
    model.load_state_dict({k: full[k] for k in own})
