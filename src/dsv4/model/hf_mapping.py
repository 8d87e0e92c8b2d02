"""The one renaming table between transformers' ``DeepseekV4ForCausalLM`` state dict and the official checkpoint keys.

dsv4's module attributes equal the official (published) checkpoint keys, so a published checkpoint loads with no
renaming. A checkpoint written by transformers' ``save_pretrained`` uses other names (architecture.md sec 14): a
``model.`` prefix, ``self_attn``/``mlp``, the indexer nested inside the CSA compressor, and routed experts merged into
``experts.gate_up_proj [E, 2*inter, dim]`` (w1 rows then w3 rows) and ``experts.down_proj [E, dim, inter]``.

Use :func:`hf_to_official` per tensor while streaming (it returns views, no copies), or the dict helpers.
This module deliberately knows nothing about dtypes or quantisation (that is ``quant.py`` / ``loader.py``) and keeps
no MTP mapping: transformers ignores ``mtp.*`` tensors, so a transformers checkpoint has none.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch

# suffix inside one decoder layer: transformers name -> official name (order matters: longest first where prefixes
# overlap, e.g. the indexer's compressor before the main compressor)
LAYER_TABLE: tuple[tuple[str, str], ...] = (
    ("input_layernorm.weight", "attn_norm.weight"),
    ("post_attention_layernorm.weight", "ffn_norm.weight"),
    ("attn_hc.fn", "hc_attn_fn"),
    ("attn_hc.base", "hc_attn_base"),
    ("attn_hc.scale", "hc_attn_scale"),
    ("ffn_hc.fn", "hc_ffn_fn"),
    ("ffn_hc.base", "hc_ffn_base"),
    ("ffn_hc.scale", "hc_ffn_scale"),
    ("self_attn.q_a_proj.weight", "attn.wq_a.weight"),
    ("self_attn.q_a_norm.weight", "attn.q_norm.weight"),
    ("self_attn.q_b_proj.weight", "attn.wq_b.weight"),
    ("self_attn.kv_proj.weight", "attn.wkv.weight"),
    ("self_attn.kv_norm.weight", "attn.kv_norm.weight"),
    ("self_attn.o_a_proj.weight", "attn.wo_a.weight"),
    ("self_attn.o_b_proj.weight", "attn.wo_b.weight"),
    ("self_attn.sinks", "attn.attn_sink"),
    ("self_attn.compressor.indexer.kv_proj.weight", "attn.indexer.compressor.wkv.weight"),
    ("self_attn.compressor.indexer.gate_proj.weight", "attn.indexer.compressor.wgate.weight"),
    ("self_attn.compressor.indexer.position_bias", "attn.indexer.compressor.ape"),
    ("self_attn.compressor.indexer.kv_norm.weight", "attn.indexer.compressor.norm.weight"),
    ("self_attn.compressor.indexer.q_b_proj.weight", "attn.indexer.wq_b.weight"),
    ("self_attn.compressor.indexer.scorer.weights_proj.weight", "attn.indexer.weights_proj.weight"),
    ("self_attn.compressor.kv_proj.weight", "attn.compressor.wkv.weight"),
    ("self_attn.compressor.gate_proj.weight", "attn.compressor.wgate.weight"),
    ("self_attn.compressor.position_bias", "attn.compressor.ape"),
    ("self_attn.compressor.kv_norm.weight", "attn.compressor.norm.weight"),
    ("mlp.gate.weight", "ffn.gate.weight"),
    ("mlp.gate.e_score_correction_bias", "ffn.gate.bias"),
    ("mlp.gate.tid2eid", "ffn.gate.tid2eid"),
    ("mlp.shared_experts.gate_proj.weight", "ffn.shared_experts.w1.weight"),
    ("mlp.shared_experts.up_proj.weight", "ffn.shared_experts.w3.weight"),
    ("mlp.shared_experts.down_proj.weight", "ffn.shared_experts.w2.weight"),
)
TOP_TABLE: tuple[tuple[str, str], ...] = (
    ("model.embed_tokens.weight", "embed.weight"),
    ("model.norm.weight", "norm.weight"),
    ("model.hc_head.hc_fn", "hc_head_fn"),
    ("model.hc_head.hc_base", "hc_head_base"),
    ("model.hc_head.hc_scale", "hc_head_scale"),
    ("lm_head.weight", "head.weight"),
)
_LAYER_HF = dict(LAYER_TABLE)
_LAYER_OFF = {o: h for h, o in LAYER_TABLE}
_TOP_HF = dict(TOP_TABLE)
_TOP_OFF = {o: h for h, o in TOP_TABLE}
_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_OFF_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")
_OFF_EXPERT_RE = re.compile(r"^ffn\.experts\.(\d+)\.(w[123])\.weight$")


def hf_to_official(name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Map one transformers tensor to the official tensor(s) it holds (merged experts give 3*E views).

    Raises KeyError naming the tensor when it has no official counterpart.
    """
    if name in _TOP_HF:
        return [(_TOP_HF[name], tensor)]
    m = _HF_LAYER_RE.match(name)
    if m is None:
        raise KeyError(f"transformers tensor {name!r} has no DeepSeek-V4 official name (not a V4 checkpoint?)")
    layer, rest = m.group(1), m.group(2)
    prefix = f"layers.{layer}."
    if rest in _LAYER_HF:
        return [(prefix + _LAYER_HF[rest], tensor)]
    if rest == "mlp.experts.gate_up_proj":  # [E, 2*inter, dim]: rows [:inter] = w1 (gate), [inter:] = w3 (up)
        inter = tensor.shape[1] // 2
        out = []
        for e in range(tensor.shape[0]):
            out.append((f"{prefix}ffn.experts.{e}.w1.weight", tensor[e, :inter]))
            out.append((f"{prefix}ffn.experts.{e}.w3.weight", tensor[e, inter:]))
        return out
    if rest == "mlp.experts.down_proj":  # [E, dim, inter]
        return [(f"{prefix}ffn.experts.{e}.w2.weight", tensor[e]) for e in range(tensor.shape[0])]
    raise KeyError(f"transformers tensor {name!r} has no DeepSeek-V4 official name (not a V4 checkpoint?)")


def hf_state_dict_to_official(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        for k, v in hf_to_official(name, t):
            out[k] = v
    return out


def official_state_dict_to_hf(sd: Mapping[str, torch.Tensor], n_routed_experts: int) -> dict[str, torch.Tensor]:
    """Inverse of :func:`hf_state_dict_to_official`; experts are merged (copies). ``mtp.*`` tensors are dropped
    because transformers has no MTP module."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[tuple[int, str], torch.Tensor]] = {}
    for name, t in sd.items():
        if name.startswith("mtp."):
            continue
        if name in _TOP_OFF:
            out[_TOP_OFF[name]] = t
            continue
        m = _OFF_LAYER_RE.match(name)
        if m is None:
            raise KeyError(f"official tensor {name!r} has no transformers name")
        layer, rest = m.group(1), m.group(2)
        em = _OFF_EXPERT_RE.match(rest)
        if em is not None:
            experts.setdefault(layer, {})[(int(em.group(1)), em.group(2))] = t
        elif rest in _LAYER_OFF:
            out[f"model.layers.{layer}.{_LAYER_OFF[rest]}"] = t
        else:
            raise KeyError(f"official tensor {name!r} has no transformers name")
    for layer, ws in experts.items():
        missing = [(e, w) for e in range(n_routed_experts) for w in ("w1", "w2", "w3") if (e, w) not in ws]
        if missing:
            raise KeyError(f"layer {layer}: expert tensors missing for (expert, weight) {missing[:4]}...")
        out[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([ws[(e, "w1")], ws[(e, "w3")]], dim=0) for e in range(n_routed_experts)])
        out[f"model.layers.{layer}.mlp.experts.down_proj"] = torch.stack(
            [ws[(e, "w2")] for e in range(n_routed_experts)])
    return out


def is_hf_layout(names: Iterable[str]) -> bool:
    """True when the tensor names are transformers' (``model.`` prefix / ``lm_head``), False for the official layout."""
    return any(n.startswith("model.") or n == "lm_head.weight" for n in names)
