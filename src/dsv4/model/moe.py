"""Mixture of experts of DeepSeek-V4 (architecture.md sec 9; report sec 2.1 and 4.2.3).

* Router (``Gate``): affinity ``s = sqrt(softplus(x W^T))`` in fp32; the first ``num_hash_layers`` layers pick
  experts by a fixed token-id table ``tid2eid``, the others by ``topk(s + bias)`` (the bias only steers selection,
  aux-loss-free balancing). Weights ``s[picked]`` normalised to sum 1, times ``routed_scaling_factor``.
* Experts: SwiGLU with clamping (gate branch ``min(g, limit)``, linear branch ``clamp(u, -limit, limit)``), the
  routing weight applied to the activation *before* ``w2`` (official), routed outputs accumulated in fp32, plus
  one always-on shared expert (also clamped).

Everything after the gate is one op, ``dsv4::routed_experts`` (dsv4/ops; the reference runs each expert only on
the tokens routed to it, the CPU backend one native call), for training and inference alike. Router top-k ties go to
the lowest expert id (``ops.topk_lowest``, the rule of every top-k in dsv4).
Deliberately not here: expert parallelism, the kernels themselves, the training-time balance loss and the bias
update (train/).

Shape legend: N tokens, D dim, E experts, k experts per token, F expert inner dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv4 import ops
from dsv4.config import ModelConfig
from dsv4.model import quant
from dsv4.model.linear import Linear
from dsv4.ops import packed
from dsv4.ops.reference import swiglu_expert


class Gate(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.topk = config.num_experts_per_tok
        self.score_func = config.scoring_func
        self.route_scale = config.routed_scaling_factor
        self.hash = config.is_hash_layer(layer_id)
        self.weight = nn.Parameter(torch.zeros(config.n_routed_experts, config.dim, dtype=dtype))
        if self.hash:
            self.register_buffer("tid2eid", torch.zeros(config.vocab_size, self.topk, dtype=torch.long))
            self.bias = None
        else:
            self.bias = nn.Parameter(torch.zeros(config.n_routed_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, D], input_ids [N] -> (weights [N, k] fp32, expert ids [N, k])."""
        logits = F.linear(x.float(), self.weight.float())  # [N, E] fp32 router (official)
        if self.score_func == "sqrtsoftplus":
            scores = F.softplus(logits).sqrt()
        elif self.score_func == "softmax":
            scores = logits.softmax(dim=-1)
        else:
            scores = logits.sigmoid()
        if self.hash:
            ids = self.tid2eid[input_ids].long()
        else:
            ids = ops.topk_lowest(scores + self.bias.float(), self.topk)[1]
        weights = scores.gather(1, ids)
        if self.score_func != "softmax":
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * self.route_scale, ids


class Expert(nn.Module):
    def __init__(self, dim: int, inter_dim: int, swiglu_limit: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.w1 = Linear(dim, inter_dim, dtype)
        self.w2 = Linear(inter_dim, dim, dtype)
        self.w3 = Linear(dim, inter_dim, dtype)
        self.limit = swiglu_limit

    def forward(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """x [n, D] (routing weights [n] or None) -> [n, D]: the op's expert math (expert parallelism calls it)."""
        return swiglu_expert(x, self.w1.weight, self.w3.weight, self.w2.weight, self.limit, weights,
                             (self.w1.scale, self.w3.scale, self.w2.scale))


class MoE(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.n_experts = config.n_routed_experts
        self.gate = Gate(config, layer_id, dtype)
        self.experts = nn.ModuleList(
            Expert(config.dim, config.moe_intermediate_size, config.swiglu_limit, dtype)
            for _ in range(config.n_routed_experts))
        self.shared_experts = (Expert(config.dim, config.shared_inter_dim, config.swiglu_limit, dtype)
                               if config.n_shared_experts > 0 else None)

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """x [N, D] -> [N, D]."""
        weights, ids = self.gate(x, input_ids)  # [N, k]
        w1, w3, w2, scales = self.expert_weights()
        sh = self.shared_experts
        shared = [sh.w1.weight, sh.w3.weight, sh.w2.weight] if sh is not None else []
        # packed shared expert: one scale per weight (the loader may hold it FP8 while the routed experts are FP4)
        shared_scales = [lin.scale for lin in (sh.w1, sh.w3, sh.w2)] if sh is not None and sh.w1.scale is not None \
            else []
        y = ops.routed_experts(x, ids, weights, w1, w3, w2, scales, shared, shared_scales, self.experts[0].limit)
        return y.to(x.dtype)

    # ------------------------------------------------------------------ the experts' weights as [E, ...] blocks
    # The op takes each kind of expert weight as one [E, ...] tensor (w1, w3 [E, F, D], w2 [E, D, F]; packed:
    # the bytes and ue8m0 scales). The checkpoint's names stay: every ``experts.{e}.w{1,2,3}.weight`` / ``.scale``
    # is a view of its slice of the block (``stack_experts``; the loader allocates the blocks before it fills
    # them), so a forward passes three tensors, not 3E. Validity: any weight or scale set on a Linear
    # (``load_state_dict(..., assign=True)``, ``set_packed``) bumps ``Linear.revision`` and ``_apply`` (``.to()``,
    # ``.float()``) clears the blocks, after which the views are checked once more; weights that are no longer
    # views of one block are stacked per call (a copy: correct, slower; ``stack_experts()`` restores the block).
    # NOTE: a ``param.data = ...`` swap of one expert's tensor is seen only for the first and the last expert
    # (the check per call stays O(1)); replace weights with load_state_dict or by setting the Linear's weight.
    # A forward that needs weight gradients stacks them too (``torch.stack`` carries the gradient to each expert).
    _stacks: tuple[torch.Tensor, ...] | None = None  # (w1, w3, w2[, s1, s3, s2]) the parameters are views of
    _stacks_rev: int = -1
    _sentinels: tuple[tuple[torch.Tensor, int], ...] = ()

    def _expert_tensors(self) -> list[list[torch.Tensor | None]]:
        """[w1s, w3s, w2s, s1s, s3s, s2s]: each kind's E tensors as the expert modules hold them now."""
        lins = [(ex.w1, ex.w3, ex.w2) for ex in self.experts]
        return ([[ls[j]._parameters["weight"] for ls in lins] for j in range(3)]
                + [[ls[j]._parameters["scale"] for ls in lins] for j in range(3)])

    def expert_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """(w1, w3, w2 [E, ...], scales: [s1, s3, s2] [E, ...] for packed experts or []) for the op."""
        stacks = self._stacks
        grad = torch.is_grad_enabled() and self.experts[0].w1.weight.requires_grad
        if torch.compiler.is_compiling():  # no pointers under tracing: the block as it stands (guarded by dynamo)
            if grad or stacks is None or self._stacks_rev != Linear.revision:
                stacks = None
        elif stacks is None or self._stacks_rev != Linear.revision or grad or not self._sentinels_hold():
            stacks = None if grad else self._check_stacks()
        if stacks is None:
            # not views of one block (or gradients wanted): stacked copies
            kinds = self._expert_tensors()
            packed_ = kinds[3][0] is not None
            stacks = tuple(torch.stack(ts) for ts in (kinds[:6] if packed_ else kinds[:3]))
        return stacks[0], stacks[1], stacks[2], list(stacks[3:])

    def _check_stacks(self) -> tuple[torch.Tensor, ...] | None:
        """The blocks when every expert tensor is still a view of its slice (remembered until a Linear changes),
        else None."""
        kinds = self._expert_tensors()
        if kinds[3][0] is None:
            kinds = kinds[:3]
        if any(t is None or t.is_meta for ts in kinds for t in ts):
            return None
        stacks = tuple(packed.stacked(ts) for ts in kinds)
        if any(s is None for s in stacks):
            self._stacks, self._sentinels = None, ()  # no reference to replaced weights is kept
            return None
        self._stacks, self._stacks_rev = stacks, Linear.revision
        # the first and last expert's tensors of each kind: a `.data = ...` swap of all the parameters (a loop over
        # the model) moves them
        self._sentinels = tuple((ts[i], ts[i].data_ptr()) for ts in kinds for i in (0, -1))
        return stacks

    def _sentinels_hold(self) -> bool:
        return all(t.data_ptr() == ptr for t, ptr in self._sentinels)

    def _apply(self, fn, recurse: bool = True):  # .to() / .float() / ...: parameters get new data
        self._stacks = None
        return super()._apply(fn, recurse)

    @torch.no_grad()
    def stack_experts(self) -> None:
        """Hold the routed experts' weights (and scales) in one block per kind, each expert's tensor a view of its
        slice (one copy of the experts' bytes, layer by layer). A no-op when they already are."""
        if self._check_stacks() is not None:
            return
        kinds = self._expert_tensors()
        blocks = [torch.stack(ts) if ts[0] is not None else None for ts in kinds]
        self._hold(blocks)
        self._check_stacks()

    def _hold(self, blocks: list[torch.Tensor | None]) -> None:
        """Make every expert's weight / scale a view of ``blocks`` = [w1, w3, w2, s1, s3, s2] (scales may be None)."""
        for i, ex in enumerate(self.experts):
            for j, lin in enumerate((ex.w1, ex.w3, ex.w2)):
                w, s = blocks[j], blocks[3 + j]
                if s is None:
                    lin.weight = nn.Parameter(w[i], requires_grad=lin.weight.requires_grad)
                else:
                    lin.set_packed(w[i], s[i])

    def can_stack_fp4(self) -> bool:
        """Whole 1x32 scale blocks along both expert dims (every real config; tiny test configs may not have them,
        and then each expert keeps its own FP4 tensors)."""
        e0 = self.experts[0]
        return e0.w1.in_features % quant.FP4_BLOCK == 0 and e0.w1.out_features % quant.FP4_BLOCK == 0

    @torch.no_grad()
    def hold_stacked(self, device: torch.device | str, dtype: torch.dtype | None = None) -> None:
        """Allocate the routed experts' blocks for the loader to fill in place (the contents start uninitialised):
        ``dtype`` None = the published FP4 layout, ``w1, w3 [E, F, D/2]`` int8 with ue8m0 scales ``[E, F, D/32]``,
        ``w2 [E, D, F/2]`` with ``[E, D, F/32]``; else plain ``[E, F, D]`` / ``[E, D, F]`` blocks of ``dtype``."""
        if dtype is None and not self.can_stack_fp4():
            raise ValueError("stacked FP4 experts need dim and moe_intermediate_size to be multiples of 32")
        e0 = self.experts[0]
        f, d = e0.w1.out_features, e0.w1.in_features
        e = self.n_experts
        blocks: list[torch.Tensor | None] = []
        for rows, cols in ((f, d), (f, d), (d, f)):
            blocks.append(torch.empty(e, rows, cols // 2 if dtype is None else cols,
                                      dtype=torch.int8 if dtype is None else dtype, device=device))
        for rows, cols in ((f, d), (f, d), (d, f)):
            blocks.append(None if dtype is not None else
                          torch.empty(e, rows, cols // quant.FP4_BLOCK, dtype=torch.float8_e8m0fnu, device=device))
        self._hold(blocks)
        self._stacks = None

    def fp4_stacks(self) -> tuple[torch.Tensor, ...] | None:
        """The stacked FP4 expert blocks (w1, w3, w2, s1, s3, s2) while every expert tensor is a view of them, else
        None (e.g. after ``load_state_dict(..., assign=True)``: the experts then run from stacked copies)."""
        stacks = self._check_stacks()
        return stacks if stacks is not None and len(stacks) == 6 else None
