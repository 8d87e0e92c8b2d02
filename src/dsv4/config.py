"""ModelConfig: the frozen description of a DeepSeek-V4 model, built once from a checkpoint's ``config.json``.

Fields are the keys of the published Hugging Face ``config.json`` (architecture.md sec 0). Three key sets are
accepted and normalised to those fields by :meth:`ModelConfig.from_dict`:

* the published HF ``config.json`` (``hidden_size``, ``compress_ratios``, ``num_hash_layers``, ``rope_scaling``),
* the official ``inference/config.json`` (``dim``, ``n_layers``, ``window_size``, ``rope_factor``, ...),
* a config written by transformers' ``DeepseekV4Config.save_pretrained`` (``layer_types``, ``mlp_layer_types``,
  ``compress_rates``, ``rope_parameters``, ``partial_rotary_factor``).

Layer types come from ``compress_ratios`` (0 = sliding window "SWA", 4 = CSA with the Lightning Indexer, any other
positive ratio = HCA; official code: ``overlap = ratio == 4``). The list has ``n_layers + 1`` entries in the
published configs, the last one being the MTP block's; ``n_layers`` entries are accepted too (the MTP is then SWA).

This module deliberately holds no runtime options (dtype, device, cache sizes, QAT simulation): those are arguments
of the code that uses the config.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

LayerType = Literal["swa", "csa", "hca"]

# The CSA ratio is fixed by the official code (overlapping windows + indexer iff ratio == 4).
CSA_RATIO = 4

# official inference/config.json key -> HF config.json key (one table; architecture.md sec 0)
_OFFICIAL_TO_HF = {
    "dim": "hidden_size",
    "moe_inter_dim": "moe_intermediate_size",
    "n_layers": "num_hidden_layers",
    "n_hash_layers": "num_hash_layers",
    "n_heads": "num_attention_heads",
    "n_activated_experts": "num_experts_per_tok",
    "score_func": "scoring_func",
    "route_scale": "routed_scaling_factor",
    "rope_head_dim": "qk_rope_head_dim",
    "window_size": "sliding_window",
    "norm_eps": "rms_norm_eps",
    "n_mtp_layers": "num_nextn_predict_layers",
}
_OFFICIAL_YARN = {
    "rope_factor": "factor",
    "original_seq_len": "original_max_position_embeddings",
    "beta_fast": "beta_fast",
    "beta_slow": "beta_slow",
}
# official runtime-only keys (generate.py sizes) that say nothing about the weights
_OFFICIAL_IGNORED = {"max_batch_size", "max_seq_len", "mscale"}

# HF bookkeeping keys that do not change the model's math (PreTrainedConfig defaults, generation, training knobs).
_HF_IGNORED = {
    "architectures", "model_type", "transformers_version", "_name_or_path", "_from_model_config", "auto_map",
    "torch_dtype", "dtype", "use_cache", "attention_bias", "attention_dropout", "mlp_bias", "topk_method",
    "output_router_logits", "router_aux_loss_coef", "router_jitter_noise", "pad_token_id", "output_hidden_states",
    "output_attentions", "return_dict", "chunk_size_feed_forward", "is_encoder_decoder", "id2label", "label2id",
    "problem_type", "_attn_implementation", "_experts_implementation", "tokenizer_class", "task_specific_params",
}

_HF_LAYER_TYPES = {"sliding_attention": "swa", "compressed_sparse_attention": "csa",
                   "heavily_compressed_attention": "hca"}


@dataclass(frozen=True)
class ModelConfig:
    """One DeepSeek-V4 architecture. Field names are the published HF ``config.json`` keys."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    head_dim: int
    qk_rope_head_dim: int
    q_lora_rank: int
    o_groups: int
    o_lora_rank: int
    sliding_window: int
    compress_ratios: tuple[int, ...]
    index_n_heads: int
    index_head_dim: int
    index_topk: int
    moe_intermediate_size: int
    n_routed_experts: int
    num_experts_per_tok: int
    n_shared_experts: int = 1
    num_hash_layers: int = 0
    scoring_func: str = "sqrtsoftplus"
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    swiglu_limit: float = 10.0
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    rope_scaling: dict[str, Any] | None = None
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    rms_norm_eps: float = 1e-6
    num_nextn_predict_layers: int = 1
    max_position_embeddings: int = 1048576
    num_key_value_heads: int = 1
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int = 0
    eos_token_id: int | tuple[int, ...] = 1
    expert_dtype: str | None = None
    quantization_config: dict[str, Any] | None = field(default=None, compare=False)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        """Read a ``config.json`` (a file, or a checkpoint directory holding one)."""
        p = Path(path)
        if p.is_dir():
            p = p / "config.json"
        if not p.is_file():
            raise FileNotFoundError(f"config file {p} does not exist; pass a checkpoint directory with config.json")
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{p} is not valid JSON ({e}); fix or re-download the config") from e
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Normalise any of the three accepted key sets (module docstring) and validate."""
        d = dict(data)
        if "dim" in d or "n_layers" in d:
            d = _from_official(d)
        else:
            d = _from_transformers_saved(d)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in d if k not in names and k not in _HF_IGNORED)
        if unknown:
            raise ValueError(
                f"unknown config key(s) {unknown}: this is not a DeepSeek-V4 config.json, or a newer variant "
                f"dsv4 does not support (known keys: {sorted(names)})"
            )
        missing = sorted(
            f.name for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in d
        )
        if missing:
            raise ValueError(f"config is missing required key(s) {missing}")
        kwargs = {k: v for k, v in d.items() if k in names}
        kwargs["compress_ratios"] = tuple(int(r) for r in kwargs["compress_ratios"])
        if isinstance(kwargs.get("eos_token_id"), list):
            kwargs["eos_token_id"] = tuple(kwargs["eos_token_id"])
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """The published HF ``config.json`` form (what the checkpoint writer saves)."""
        out = dataclasses.asdict(self)
        out["compress_ratios"] = list(self.compress_ratios)
        if isinstance(self.eos_token_id, tuple):
            out["eos_token_id"] = list(self.eos_token_id)
        out["architectures"] = ["DeepseekV4ForCausalLM"]
        out["model_type"] = "deepseek_v4"
        return {k: v for k, v in out.items() if v is not None}

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ validation
    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> ValueError:
            return ValueError(f"config key {key!r}: {why} (got {getattr(self, key)!r})")

        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim",
                    "qk_rope_head_dim", "q_lora_rank", "o_groups", "o_lora_rank", "sliding_window",
                    "index_n_heads", "index_head_dim", "index_topk", "moe_intermediate_size", "n_routed_experts",
                    "num_experts_per_tok", "hc_mult", "hc_sinkhorn_iters"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise bad(key, "must be a positive integer")
        if self.num_key_value_heads != 1:
            raise bad("num_key_value_heads", "DeepSeek-V4 uses one shared KV head")
        if self.hidden_act != "silu":
            raise bad("hidden_act", "DeepSeek-V4 experts are SwiGLU ('silu')")
        if self.tie_word_embeddings:
            raise bad("tie_word_embeddings", "DeepSeek-V4 has separate embed and head weights")
        if self.qk_rope_head_dim % 2 or self.qk_rope_head_dim > self.head_dim:
            raise bad("qk_rope_head_dim", f"must be even and <= head_dim={self.head_dim}")
        if self.qk_rope_head_dim > self.index_head_dim:
            raise bad("qk_rope_head_dim", f"must be <= index_head_dim={self.index_head_dim} (indexer q/k get RoPE)")
        if (self.num_attention_heads * self.head_dim) % self.o_groups:
            raise bad("o_groups", "must divide num_attention_heads * head_dim (grouped output projection)")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise bad("num_experts_per_tok", f"must be <= n_routed_experts={self.n_routed_experts}")
        if not 0 <= self.num_hash_layers <= self.num_hidden_layers:
            raise bad("num_hash_layers", f"must be in [0, num_hidden_layers={self.num_hidden_layers}]")
        if self.n_shared_experts < 0:
            raise bad("n_shared_experts", "must be >= 0")
        if self.scoring_func not in ("sqrtsoftplus", "softmax", "sigmoid"):
            raise bad("scoring_func", "must be one of 'sqrtsoftplus', 'softmax', 'sigmoid'")
        n = self.num_hidden_layers
        if len(self.compress_ratios) not in (n, n + 1):
            raise bad("compress_ratios", f"needs num_hidden_layers={n} entries (+1 for the MTP block)")
        for r in self.compress_ratios:
            if r < 0:
                raise bad("compress_ratios", "entries must be 0 (sliding window), 4 (CSA) or a positive HCA ratio")
        if self.mtp_ratio != 0:
            raise bad("compress_ratios", "the MTP block (last entry) must be a sliding-window layer (0)")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            if kind != "yarn":
                raise bad("rope_scaling", "only YaRN ('type': 'yarn') is used by DeepSeek-V4")
            for k in ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow"):
                if k not in self.rope_scaling:
                    raise bad("rope_scaling", f"YaRN needs the key {k!r}")
        if self.hc_eps <= 0 or self.rms_norm_eps <= 0:
            raise ValueError(f"config keys 'hc_eps' / 'rms_norm_eps' must be > 0 "
                             f"(got {self.hc_eps}, {self.rms_norm_eps})")
        if self.num_nextn_predict_layers < 0:
            raise bad("num_nextn_predict_layers", "must be >= 0")

    # ------------------------------------------------------------------ derived values (official names)
    @property
    def dim(self) -> int:
        return self.hidden_size

    @property
    def n_layers(self) -> int:
        return self.num_hidden_layers

    @property
    def n_heads(self) -> int:
        return self.num_attention_heads

    @property
    def rope_head_dim(self) -> int:
        return self.qk_rope_head_dim

    @property
    def nope_head_dim(self) -> int:
        return self.head_dim - self.qk_rope_head_dim

    @property
    def window_size(self) -> int:
        return self.sliding_window

    @property
    def n_mtp_layers(self) -> int:
        return self.num_nextn_predict_layers

    @property
    def layer_ratios(self) -> tuple[int, ...]:
        """Compress ratio of each backbone layer (the MTP entry dropped)."""
        return self.compress_ratios[: self.num_hidden_layers]

    @property
    def mtp_ratio(self) -> int:
        return self.compress_ratios[self.num_hidden_layers] if len(self.compress_ratios) > self.n_layers else 0

    @property
    def layer_types(self) -> tuple[LayerType, ...]:
        return tuple(ratio_to_type(r) for r in self.layer_ratios)

    @property
    def compressed_ratios(self) -> tuple[int, ...]:
        """Distinct non-zero ratios used by the backbone (the paged cache's page size must be a multiple of each)."""
        return tuple(sorted({r for r in self.layer_ratios if r > 0}))

    def is_hash_layer(self, layer_id: int) -> bool:
        return layer_id < self.num_hash_layers

    @property
    def softmax_scale(self) -> float:
        return self.head_dim ** -0.5

    @property
    def yarn(self) -> tuple[float, int, float, float] | None:
        """(factor, original_seq_len, beta_fast, beta_slow) for the compressed layers' RoPE, or None."""
        if self.rope_scaling is None:
            return None
        s = self.rope_scaling
        return (float(s["factor"]), int(s["original_max_position_embeddings"]), float(s["beta_fast"]),
                float(s["beta_slow"]))

    @property
    def shared_inter_dim(self) -> int:
        return self.n_shared_experts * self.moe_intermediate_size


def ratio_to_type(ratio: int) -> LayerType:
    if ratio == 0:
        return "swa"
    return "csa" if ratio == CSA_RATIO else "hca"


def _from_official(d: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    yarn: dict[str, Any] = {}
    for k, v in d.items():
        if k in _OFFICIAL_IGNORED:
            continue
        if k in _OFFICIAL_YARN:
            yarn[_OFFICIAL_YARN[k]] = v
        elif k == "dtype":
            # official "fp8" = FP8 e4m3 weights with 128x128 block scales (architecture.md sec 1)
            if v == "fp8":
                out["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128],
                                              "activation_scheme": "dynamic"}
            elif v not in ("bf16", "bfloat16"):
                raise ValueError(f"config key 'dtype': expected 'fp8' or 'bf16' (got {v!r})")
        elif k == "scale_fmt":
            if v is not None:
                out.setdefault("quantization_config", {})["scale_fmt"] = v
        elif k == "scale_dtype":
            continue
        else:
            out[_OFFICIAL_TO_HF.get(k, k)] = v
    if "quantization_config" in out and "scale_fmt" not in out["quantization_config"]:
        out["quantization_config"]["scale_fmt"] = None
    if yarn:
        missing = {"factor", "original_max_position_embeddings", "beta_fast", "beta_slow"} - set(yarn)
        if missing:
            raise ValueError(f"official config has partial YaRN keys; missing {sorted(missing)}")
        out["rope_scaling"] = {"type": "yarn", **yarn}
    # the official inference code assumes these V4 constants unless the config overrides them
    out.setdefault("num_key_value_heads", 1)
    return out


def _from_transformers_saved(d: dict[str, Any]) -> dict[str, Any]:
    """Fold transformers 5.x's normalised keys back into the published key set."""
    out = dict(d)
    layer_types = out.pop("layer_types", None)
    rates = out.pop("compress_rates", None) or {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128}
    if "compress_ratios" not in out and layer_types is not None:
        ratios = []
        for t in layer_types:
            if t not in _HF_LAYER_TYPES:
                raise ValueError(f"config key 'layer_types': unknown layer type {t!r}")
            ratios.append(0 if t == "sliding_attention" else int(rates[t]))
        if rates.get("compressed_sparse_attention", 4) != CSA_RATIO:
            raise ValueError("config key 'compress_rates': the CSA ratio must be 4 (official code)")
        out["compress_ratios"] = ratios
    mlp_types = out.pop("mlp_layer_types", None)
    if "num_hash_layers" not in out and mlp_types is not None:
        n_hash = sum(1 for t in mlp_types if t == "hash_moe")
        if list(mlp_types[:n_hash]) != ["hash_moe"] * n_hash:
            raise ValueError("config key 'mlp_layer_types': hash_moe layers must come first (V4 routing)")
        out["num_hash_layers"] = n_hash
    rope_parameters = out.pop("rope_parameters", None)
    prf = out.pop("partial_rotary_factor", None)
    if isinstance(rope_parameters, dict) and "compress" in rope_parameters:
        comp = rope_parameters["compress"]
        out.setdefault("rope_theta", rope_parameters.get("main", {}).get("rope_theta", 10000.0))
        out.setdefault("compress_rope_theta", comp.get("rope_theta", 160000.0))
        if comp.get("rope_type", comp.get("type")) == "yarn" and "rope_scaling" not in out:
            out["rope_scaling"] = {"type": "yarn", **{k: comp[k] for k in (
                "factor", "original_max_position_embeddings", "beta_fast", "beta_slow") if k in comp}}
        prf = prf if prf is not None else comp.get("partial_rotary_factor")
    if "qk_rope_head_dim" not in out and prf is not None and "head_dim" in out:
        out["qk_rope_head_dim"] = int(round(out["head_dim"] * prf))
    if out.get("rope_scaling") is not None:
        rs = {k: v for k, v in out["rope_scaling"].items() if k not in ("rope_theta", "attention_factor",
                                                                         "partial_rotary_factor")}
        rs.setdefault("type", rs.pop("rope_type", "yarn"))
        rs.pop("rope_type", None)
        out["rope_scaling"] = rs
    return out

