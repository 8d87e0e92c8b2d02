"""The DeepSeek-V4 model: embedding, mHC blocks, hc head, final norm and fp32 head (architecture.md sec 2-3).

``Transformer`` module attributes equal the official checkpoint keys (``embed``, ``layers.{L}``, ``norm``, ``head``,
``hc_head_fn/base/scale``, ``mtp.{i}``), so a published checkpoint loads without renaming. Build it on ``meta`` and
load, or call :meth:`Transformer.init_weights`. Parameters get the official dtypes: the ones the official code
keeps in fp32 (norm weights, mHC parameters, attention sinks, compressor projections and ``ape``, router bias, the
output head) stay fp32 whatever ``dtype`` is; all others use ``dtype``. Do not ``.to(dtype)`` a built model: that
would round the fp32 parameters.

Entry points:

* ``model(input_ids [B, S]) -> fp32 logits [B, S, vocab]``: no cache, every position;
* ``model.forward_batch(ForwardBatch, KVCache | None) -> ForwardOutput(logits [M, vocab], hidden [N, M, D])``:
  varlen batches of prefill chunks and decode tokens (docs/contracts.md);
* ``model.forward_mtp(ForwardBatch of the *next* tokens, hidden, cache)``: the MTP block (mtp.py);
* ``model.pack_experts()``: inference fast path (stacked expert weights, batched expert matmuls; same memory).
* ``model.use_native_kernels()``: the CPU inference fast path (dsv4/kernels; fp32 activations, the weights the
  kernels read kept in their stored dtype). ``dsv4.LLM`` applies it to checkpoints it loads onto a CPU.

CPU note: on the PyTorch path, this torch build's bf16 GEMV/GEMM kernels run 2-5x slower than fp32 on CPU, so a bf16
checkpoint decodes faster there when loaded with ``dtype=torch.float32`` (bf16 weights are exact in fp32).

Deliberately not here: sampling, scheduling, cache allocation policy, parallelism.

Shape legend: B sequences, S tokens each, N flat tokens, M = hc_mult streams, D = dim, V = vocab.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv4 import kernels, ops
from dsv4.config import ModelConfig
from dsv4.model.attention import Attention
from dsv4.model.batch import BatchPlan, ForwardBatch, ForwardOutput
from dsv4.model.cache import KVCache
from dsv4.model.hyper import hc_head, hc_post, hc_pre
from dsv4.model.moe import MoE
from dsv4.model.norm import RMSNorm
from dsv4.model.qat import Numerics


class Block(nn.Module):
    """One layer: attention and MoE, each inside an mHC site (pre-norm inside the HC branch)."""

    def __init__(self, layer_id: int, config: ModelConfig, ratio: int, numerics: Numerics, dtype: torch.dtype
                 ) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.config = config
        d, m = config.dim, config.hc_mult
        mix = (2 + m) * m
        self.attn = Attention(config, layer_id, ratio, numerics, dtype)
        self.ffn = MoE(config, layer_id, dtype)
        self.attn_norm = RMSNorm(d, config.rms_norm_eps)
        self.ffn_norm = RMSNorm(d, config.rms_norm_eps)
        for site in ("attn", "ffn"):
            self.register_parameter(f"hc_{site}_fn", nn.Parameter(torch.zeros(mix, m * d, dtype=torch.float32)))
            self.register_parameter(f"hc_{site}_base", nn.Parameter(torch.zeros(mix, dtype=torch.float32)))
            self.register_parameter(f"hc_{site}_scale", nn.Parameter(torch.ones(3, dtype=torch.float32)))

    def _pre(self, x: torch.Tensor, site: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c = self.config
        return hc_pre(x, getattr(self, f"hc_{site}_fn"), getattr(self, f"hc_{site}_base"),
                      getattr(self, f"hc_{site}_scale"), c.hc_sinkhorn_iters, c.hc_eps, c.rms_norm_eps)

    def _pre_norm(self, x: torch.Tensor, site: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """hc_pre then the site's RMSNorm on its output: one fused native call on the inference fast path."""
        norm = self.attn_norm if site == "attn" else self.ffn_norm
        if self.native and not torch.is_grad_enabled():
            c = self.config
            return kernels.hc_pre(x, getattr(self, f"hc_{site}_fn"), getattr(self, f"hc_{site}_base"),
                                  getattr(self, f"hc_{site}_scale"), c.hc_sinkhorn_iters, c.hc_eps, c.rms_norm_eps,
                                  norm.weight, norm.eps)
        y, post, comb = self._pre(x, site)
        return norm(y), post, comb

    native = False  # set by Transformer.use_native_kernels

    def forward(self, x: torch.Tensor, plan: BatchPlan, cache: KVCache | None, input_ids: torch.Tensor
                ) -> torch.Tensor:
        """x [N, M, D] -> [N, M, D]."""
        post_fn = kernels.hc_post if self.native and not torch.is_grad_enabled() else hc_post
        y, post, comb = self._pre_norm(x, "attn")
        x = post_fn(self.attn(y, plan, cache), x, post, comb)
        y, post, comb = self._pre_norm(x, "ffn")
        return post_fn(self.ffn(y, input_ids), x, post, comb)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig, numerics: Numerics | None = None, dtype: torch.dtype | None = None,
                 qat_sim: bool | None = None) -> None:
        super().__init__()
        if numerics is None:
            numerics = Numerics(qat_sim=bool(qat_sim))
        elif qat_sim is not None:
            raise ValueError("pass either numerics=Numerics(...) or qat_sim=..., not both")
        dtype = dtype or torch.get_default_dtype()
        self.config, self.numerics, self.compute_dtype = config, numerics, dtype
        d, m = config.dim, config.hc_mult
        self.embed = nn.Embedding(config.vocab_size, d, dtype=dtype)
        self.layers = nn.ModuleList(Block(i, config, r, numerics, dtype) for i, r in enumerate(config.layer_ratios))
        self.norm = RMSNorm(d, config.rms_norm_eps)
        self.head = nn.Linear(d, config.vocab_size, bias=False, dtype=torch.float32)  # fp32 logits (official)
        self.hc_head_fn = nn.Parameter(torch.zeros(m, m * d, dtype=torch.float32))
        self.hc_head_base = nn.Parameter(torch.zeros(m, dtype=torch.float32))
        self.hc_head_scale = nn.Parameter(torch.ones(1, dtype=torch.float32))
        from dsv4.model.mtp import MTPBlock  # mtp.py subclasses Block

        self.mtp = nn.ModuleList(MTPBlock(config.n_layers + i, config, numerics, dtype)
                                 for i in range(config.n_mtp_layers))

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, S] -> fp32 logits [B, S, V] at every position; no cache."""
        if input_ids.dim() != 2:
            raise ValueError(f"Transformer.forward expects input_ids [B, S], got shape {tuple(input_ids.shape)}")
        b, s = input_ids.shape
        batch = ForwardBatch.from_sequences(list(input_ids.to(self.device)))
        return self.forward_batch(batch, None).logits.view(b, s, -1)

    def forward_batch(self, batch: ForwardBatch, cache: KVCache | None = None) -> ForwardOutput:
        """One varlen step (docs/contracts.md). With ``cache=None`` the forward is pure and differentiable."""
        if self.native and torch.is_grad_enabled():
            raise RuntimeError("this model runs on the native kernels (use_native_kernels), which are inference-only: "
                               "call it under torch.no_grad() / torch.inference_mode()")
        if cache is not None:
            _check_cache(self.config, cache, batch)
        plan = BatchPlan(batch, self.device, cache is not None)
        x = self.embed(plan.input_ids)  # [N, D]
        x = x.unsqueeze(1).expand(-1, self.config.hc_mult, -1)  # [N, M, D] identical streams
        for layer in self.layers:
            x = layer(x, plan, cache, plan.input_ids)
        return ForwardOutput(self.logits(x, batch.logits_indices), x)

    def logits(self, hidden: torch.Tensor, indices: torch.Tensor | None = None,
               hc: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
               norm: RMSNorm | None = None) -> torch.Tensor:
        """mHC streams [N, M, D] -> fp32 logits [M', V] for the selected rows (hc head, final norm, fp32 head)."""
        if indices is not None:
            hidden = hidden[indices.to(hidden.device)]
        fn, base, scale = hc if hc is not None else (self.hc_head_fn, self.hc_head_base, self.hc_head_scale)
        c = self.config
        y = (norm or self.norm)(hc_head(hidden, fn, base, scale, c.hc_eps, c.rms_norm_eps))  # [M', D]
        if self.native and not torch.is_grad_enabled():
            return kernels.linear(y, self.head.weight)
        # fp32 logits; a bf16 head (load_model(head_dtype=...)) is widened chunk by chunk, never copied whole
        return ops.linear(y.float(), self.head.weight, None)

    def forward_mtp(self, batch: ForwardBatch, hidden: torch.Tensor, cache: KVCache | None = None, depth: int = 0
                    ) -> ForwardOutput:
        """MTP block ``depth``: ``batch`` holds, at each position t, the *next* token t+1 (same positions, slots and
        block tables as the main step); ``hidden`` [N, M, D] is the main model's output streams. Returns the draft
        logits for token t+2 and the MTP block's streams."""
        if not self.mtp:
            raise ValueError("this model has no MTP block (num_nextn_predict_layers = 0)")
        if self.native and torch.is_grad_enabled():
            raise RuntimeError("this model runs on the native kernels (use_native_kernels), which are inference-only: "
                               "call it under torch.no_grad() / torch.inference_mode()")
        if cache is not None:
            _check_cache(self.config, cache, batch)
            if len(cache.window) <= self.config.n_layers + depth:
                raise ValueError("this KVCache has no MTP window; build it with KVCache(..., mtp=True)")
        plan = BatchPlan(batch, self.device, cache is not None)
        return self.mtp[depth](hidden, plan, cache, self, batch.logits_indices)

    native = False

    @torch.no_grad()
    def use_native_kernels(self) -> Transformer:
        """CPU inference fast path (dsv4/kernels), in place: the output head, the experts, mHC + norm, the attention
        projections and attention, the Lightning Indexer's top-k and the compressors' decode update run as native
        kernels, and every activation is fp32. The weights the kernels read (experts, head, attention projections)
        stay in their stored dtype (a bf16 checkpoint's are read as bf16 and widened exactly); every other floating
        parameter becomes fp32 (exact). Results are the fp32 path's up to summation order.

        Inference only: a forward with autograd enabled raises (the kernels have no backward). Raises RuntimeError
        when the kernels cannot be built here and ValueError for what they do not cover (another device, QAT
        simulation); the message says which."""
        if self.device.type != "cpu":
            raise ValueError(f"the native kernels are CPU kernels; this model is on {self.device}")
        if self.numerics.qat_sim:
            raise ValueError("the native kernels do not simulate the QAT roundings; load without qat_sim=True or "
                             "use the PyTorch path (native_kernels=False)")
        if not kernels.available():
            raise RuntimeError(f"dsv4 native CPU kernels are unavailable: {kernels.why_unavailable()}; "
                               "use the PyTorch path (native_kernels=False)")
        if self.has_packed_weights():
            raise ValueError("use_native_kernels takes bf16/fp32 weights; this model holds packed FP8/FP4 weights, "
                             "which run on dsv4.ops (native when available) without it. Load with "
                             "weights='dequantized' for this path")
        kept = {id(self.head.weight)}
        moes = [mod for mod in self.modules() if isinstance(mod, MoE)]
        for moe in moes:
            for ex in [*moe.experts, *([moe.shared_experts] if moe.shared_experts is not None else [])]:
                kept.update(id(lin.weight) for lin in (ex.w1, ex.w2, ex.w3))
        for att in (mod for mod in self.modules() if isinstance(mod, Attention)):
            kept.update(id(lin.weight) for lin in (att.wq_a, att.wq_b, att.wkv, att.wo_a, att.wo_b))
        for p in self.parameters():
            if p.is_floating_point() and p.dtype != torch.float32 and id(p) not in kept:
                p.data = p.data.float()
        for moe in moes:
            moe.use_native_kernels()
        for mod in self.modules():
            if isinstance(mod, (Block, Attention)):
                mod.native = True
        self.native = True
        return self

    def has_packed_weights(self) -> bool:
        """True when some projection holds a packed FP8/FP4 weight (load_model's ``weights``)."""
        return any(name.endswith(".scale") for name, _ in self.named_parameters())

    def pack_experts(self) -> Transformer:
        """Inference fast path: stack each MoE's routed experts (see ``MoE.pack``; same memory, same names)."""
        for mod in self.modules():
            if isinstance(mod, MoE):
                mod.pack()
        return self

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> Transformer:
        """Random init for tests, benchmarks and training from scratch (materialises a meta-built model)."""
        if self.device.type == "meta":
            self.to_empty(device="cpu")
        g = torch.Generator(device="cpu").manual_seed(seed)
        std = self.config.initializer_range

        def normal_(t: torch.Tensor, s: float) -> None:
            t.copy_(torch.randn(t.shape, generator=g, dtype=torch.float32) * s)

        for name, p in self.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif leaf.endswith("_scale"):  # hc_*_scale: gating factors start at 1 (transformers' init)
                p.fill_(1.0)
            elif leaf.endswith("_base") or leaf in ("attn_sink", "ape", "bias"):
                p.zero_()
            else:  # projections, embedding, head, hc_*_fn
                normal_(p, std)
        for name, buf in self.named_buffers():
            if name.endswith("tid2eid"):
                # a random valid assignment: k distinct experts per token id
                e = self.config.n_routed_experts
                buf.copy_(torch.rand(buf.shape[0], e, generator=g).argsort(dim=-1)[:, : buf.shape[1]])
        return self


def _check_cache(config: ModelConfig, cache: KVCache, batch: ForwardBatch) -> None:
    """Cheap host-side checks that turn silent cache corruption into errors."""
    if cache.config is not config and cache.config != config:
        raise ValueError("KVCache was built for a different ModelConfig than this model")
    batch.validate(with_cache=True)
    bad = [s for s in batch.slots if not 0 <= s < cache.num_slots]
    if bad:
        raise ValueError(f"ForwardBatch slots {bad} are outside the KVCache's {cache.num_slots} slots")
    if not config.compressed_ratios:
        return  # sliding-window-only model: no paged entries
    # every page that will hold an entry of this step must be assigned (a -1 would alias page 0)
    bt = batch.block_tables
    ends = torch.tensor([s + n for s, n in zip(batch.start_pos, batch.seq_lens)], device=bt.device)
    need = (ends + cache.page_size - 1) // cache.page_size  # [B] pages covering positions < end
    if int(need.max()) > bt.shape[1]:
        raise ValueError(f"block_tables has {bt.shape[1]} columns but a sequence reaches position "
                         f"{int(ends.max()) - 1}, which needs {int(need.max())} pages of {cache.page_size} tokens")
    cols = torch.arange(bt.shape[1], device=bt.device)
    missing = (cols[None] < need[:, None]) & ((bt < 0) | (bt >= cache.num_pages))
    if bool(missing.any()):
        b = int(missing.any(dim=1).nonzero()[0])
        raise ValueError(f"sequence {b} of the batch needs pages 0..{int(need[b]) - 1} in its block table row, but "
                         f"some are -1 or >= num_pages={cache.num_pages}: {bt[b, : int(need[b])].tolist()}")
