"""Whole-model parity against transformers' DeepseekV4ForCausalLM (eager) on tiny random fp32 configs.

The transformers model is randomly initialised with *every* parameter perturbed (sinks, ape, hc bases/scales, norm
weights, router bias; transformers' own init zeroes several of them), given a random valid ``tid2eid`` (its init maps
every token to expert 0), mapped through ``hf_mapping`` into dsv4, and both must give the same logits within 1e-4.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import make_tiny_config
from dsv4.config import ModelConfig
from dsv4.model.hf_mapping import hf_state_dict_to_official, official_state_dict_to_hf
from dsv4.model.transformer import Transformer

transformers = pytest.importorskip("transformers")

_HF_TYPES = {"swa": "sliding_attention", "csa": "compressed_sparse_attention", "hca": "heavily_compressed_attention"}


def hf_config(cfg: ModelConfig):
    hca = [r for r in cfg.layer_ratios if r not in (0, 4)]
    return transformers.DeepseekV4Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, moe_intermediate_size=cfg.moe_intermediate_size,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=1,
        head_dim=cfg.head_dim, qk_rope_head_dim=cfg.rope_head_dim, q_lora_rank=cfg.q_lora_rank,
        num_experts_per_tok=cfg.num_experts_per_tok, n_routed_experts=cfg.n_routed_experts,
        n_shared_experts=cfg.n_shared_experts, routed_scaling_factor=cfg.routed_scaling_factor,
        rope_theta=cfg.rope_theta, compress_rope_theta=cfg.compress_rope_theta, rope_scaling=cfg.rope_scaling,
        layer_types=[_HF_TYPES[t] for t in cfg.layer_types],
        compress_rates={"compressed_sparse_attention": 4,
                        "heavily_compressed_attention": hca[0] if hca else 128},
        mlp_layer_types=["hash_moe" if cfg.is_hash_layer(i) else "moe" for i in range(cfg.n_layers)],
        hc_mult=cfg.hc_mult, hc_sinkhorn_iters=cfg.hc_sinkhorn_iters, hc_eps=cfg.hc_eps,
        swiglu_limit=cfg.swiglu_limit, sliding_window=cfg.sliding_window, o_groups=cfg.o_groups,
        o_lora_rank=cfg.o_lora_rank, index_n_heads=cfg.index_n_heads, index_head_dim=cfg.index_head_dim,
        index_topk=cfg.index_topk, rms_norm_eps=cfg.rms_norm_eps, max_position_embeddings=cfg.max_position_embeddings,
        num_nextn_predict_layers=0, attn_implementation="eager",
    )


def random_hf_model(cfg: ModelConfig, seed: int):
    torch.manual_seed(seed)
    model = transformers.DeepseekV4ForCausalLM(hf_config(cfg)).eval().float()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.state_dict().items():
            r = torch.randn(p.shape, generator=g)
            if name.endswith("tid2eid"):
                p.copy_(torch.rand(p.shape[0], cfg.n_routed_experts, generator=g).argsort(-1)[:, : p.shape[1]])
            elif "norm" in name:
                p.copy_(1 + 0.1 * r)
            elif name.endswith(("sinks", "position_bias", "e_score_correction_bias")):
                p.copy_(0.5 * r)
            elif name.endswith(("hc.base", "hc_base")):
                p.copy_(0.3 * r)
            elif name.endswith(("hc.scale", "hc_scale")):
                p.copy_(1 + 0.2 * r)
            elif name.endswith("embed_tokens.weight"):
                p.copy_(r)
            else:
                fan_in = p.shape[-1]
                p.copy_(r * fan_in ** -0.5)
    return model


def dsv4_from_hf(cfg: ModelConfig, hf_model) -> Transformer:
    ours = Transformer(cfg, dtype=torch.float32).eval()
    missing, unexpected = ours.load_state_dict(hf_state_dict_to_official(hf_model.state_dict()), strict=False)
    assert not unexpected
    assert all(k.startswith("mtp.") for k in missing), missing
    return ours


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("seed,seq", [(0, 45), (1, 70)])
def test_logits_match_transformers(seed: int, seq: int, backend: str) -> None:
    """On the CPU backend's native kernels (the reference where they do not load) and on the reference ops."""
    from dsv4 import ops

    cfg = make_tiny_config(num_nextn_predict_layers=0)
    hf = random_hf_model(cfg, seed)
    ours = dsv4_from_hf(cfg, hf)
    ids = torch.randint(0, cfg.vocab_size, (2, seq), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad(), ops.use_backend("cpu", backend):
        want = hf(ids).logits.float()
        got = ours(ids)
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_hca_ratio_128_and_all_layer_types() -> None:
    """Release ratios (4 / 128) with a sequence crossing one HCA block; topk 8 of up to 40 CSA entries."""
    cfg = make_tiny_config(num_nextn_predict_layers=0, compress_ratios=[128, 4, 0, 128], num_hidden_layers=4,
                           index_topk=8, num_hash_layers=2)
    hf = random_hf_model(cfg, 3)
    ours = dsv4_from_hf(cfg, hf)
    ids = torch.randint(0, cfg.vocab_size, (1, 160), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits.float(), atol=1e-4, rtol=1e-4)


def test_mapping_round_trip() -> None:
    cfg = make_tiny_config(num_nextn_predict_layers=0)
    hf = random_hf_model(cfg, 5)
    sd = hf.state_dict()
    back = official_state_dict_to_hf(hf_state_dict_to_official(sd), cfg.n_routed_experts)
    assert set(back) == set(sd)
    for k, v in sd.items():
        assert torch.equal(back[k], v), k


def test_mapping_names_unknown_tensors() -> None:
    from dsv4.model.hf_mapping import hf_to_official, is_hf_layout

    with pytest.raises(KeyError, match="model.layers.0.mlp.foo"):
        hf_to_official("model.layers.0.mlp.foo", torch.zeros(1))
    with pytest.raises(KeyError, match="layers.0.ffn.bar"):
        official_state_dict_to_hf({"layers.0.ffn.bar": torch.zeros(1)}, 2)
    assert is_hf_layout(["model.embed_tokens.weight"]) and not is_hf_layout(["embed.weight"])
    # merged experts split into views (no copies) in (w1, w3) order
    gate_up = torch.arange(2 * 6 * 3, dtype=torch.float32).view(2, 6, 3)
    out = dict(hf_to_official("model.layers.4.mlp.experts.gate_up_proj", gate_up))
    assert torch.equal(out["layers.4.ffn.experts.1.w3.weight"], gate_up[1, 3:])
    assert out["layers.4.ffn.experts.0.w1.weight"].data_ptr() == gate_up.data_ptr()
