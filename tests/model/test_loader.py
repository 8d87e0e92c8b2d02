"""load_model on the three checkpoint layouts (published FP8/FP4 shards, transformers-native, transformers default
save) against transformers' own model, plus the writer's round trip."""

from __future__ import annotations

import json

import pytest
import torch

from dsv4.config import ModelConfig
from dsv4.model import checkpoint_io as cio
from dsv4.model import hf_mapping, quant
from dsv4.model.loader import load_model
from dsv4.model.moe import MoE

# hidden 160 = one full and one partial 128-block for FP8, five 1x32 FP4 blocks; moe inter 48 = a partial FP4 block.
TINY = dict(
    vocab_size=96, hidden_size=160, num_hidden_layers=3, num_attention_heads=4, head_dim=32, qk_rope_head_dim=16,
    q_lora_rank=48, o_groups=2, o_lora_rank=24, sliding_window=8, compress_ratios=[0, 4, 128, 0], index_n_heads=4,
    index_head_dim=32, index_topk=3, moe_intermediate_size=48, n_routed_experts=4, num_experts_per_tok=2,
    num_hash_layers=1, hc_mult=2, routed_scaling_factor=1.5, num_nextn_predict_layers=1,
    rope_scaling={"type": "yarn", "factor": 4, "original_max_position_embeddings": 32, "beta_fast": 32,
                  "beta_slow": 1},
)


def representable(official: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Round each tensor to what the release format stores, so every layout holds exactly the same numbers."""
    out = {}
    for name, t in official.items():
        kind = cio.tensor_kind(name)
        if kind == "fp8":
            t = quant.dequantize_fp8(*quant.quantize_fp8(t), torch.float32)
        elif kind == "fp4":
            t = quant.dequantize_fp4(*quant.quantize_fp4(t), torch.float32)
        elif kind == "bf16":
            t = t.to(torch.bfloat16).float()
        out[name] = t.clone()
    return out


@pytest.fixture(scope="module")
def hf_reference(tmp_path_factory):
    """A transformers DeepseekV4ForCausalLM with release-representable weights, saved in both transformers layouts
    and (through the dsv4 writer) as a quantised, sharded published checkpoint."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_config = transformers.DeepseekV4Config(**TINY, attn_implementation="eager")
    hf = transformers.DeepseekV4ForCausalLM(hf_config).eval()
    official = hf_mapping.hf_state_dict_to_official(hf.state_dict())
    gen = torch.Generator().manual_seed(1)
    # Every tensor gets distinct random values (transformers' init leaves many zeros / ones, and two equal tensors of
    # one shape, e.g. hc_attn_fn and hc_ffn_fn, would hide a swapped mapping); tid2eid: init routes all to expert 0.
    for name, t in official.items():
        if name.endswith("tid2eid"):
            official[name] = torch.randint(0, TINY["n_routed_experts"], t.shape, generator=gen)
        elif "norm" in name:
            official[name] = 1 + 0.1 * torch.randn(t.shape, generator=gen)
        else:
            official[name] = torch.randn(t.shape, generator=gen) * 0.05
    official = representable(official)
    hf.load_state_dict(hf_mapping.official_state_dict_to_hf(official, TINY["n_routed_experts"]), strict=True)
    root = tmp_path_factory.mktemp("ckpt")
    hf.save_pretrained(root / "hf_default")  # transformers' default: official names under `model.`, split experts
    hf.save_pretrained(root / "hf_native", save_original_format=False)  # `model.` names, merged experts
    config = ModelConfig.from_dict(TINY)
    cio.save_checkpoint(root / "published", official, config, quantize=True, max_shard_bytes=200_000)
    ids = torch.randint(0, TINY["vocab_size"], (2, 21), generator=gen)
    with torch.no_grad():
        logits = hf(ids).logits.float()
    return root, official, ids, logits


def test_published_checkpoint_is_sharded_and_quantised_like_the_release(hf_reference):
    root, official, _, _ = hf_reference
    index = json.loads((root / "published" / cio.INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    stored = cio.read_state_dict(root / "published")
    assert stored["layers.1.attn.wq_a.weight"].dtype == torch.float8_e4m3fn
    assert stored["layers.1.attn.wq_a.scale"].dtype == torch.float8_e8m0fnu
    assert stored["layers.1.attn.wq_a.scale"].shape == (1, 2)  # [ceil(48/128), ceil(160/128)]
    assert stored["layers.1.ffn.experts.3.w2.weight"].dtype == torch.int8
    assert stored["layers.1.ffn.experts.3.w2.weight"].shape == (160, 24)
    assert stored["layers.1.ffn.experts.3.w2.scale"].shape == (160, 2)  # ceil(48/32)
    assert stored["layers.0.ffn.gate.tid2eid"].dtype == torch.int64
    assert stored["layers.1.attn.compressor.wkv.weight"].dtype == torch.bfloat16
    assert stored["layers.1.attn.attn_sink"].dtype == torch.float32
    assert stored["embed.weight"].dtype == torch.bfloat16
    assert set(stored) == set(official) | {n[: -len("weight")] + "scale" for n in official
                                           if cio.tensor_kind(n) in ("fp8", "fp4")}
    config = json.loads((root / "published" / "config.json").read_text())
    assert config["quantization_config"]["scale_fmt"] == "ue8m0" and config["expert_dtype"] == "fp4"


@pytest.mark.parametrize("layout", ["published", "hf_default", "hf_native"])
def test_every_layout_loads_the_same_weights_and_matches_transformers(hf_reference, layout):
    root, official, ids, hf_logits = hf_reference
    model = load_model(root / layout, dtype=torch.float32, progress=False, weights="dequantized")
    loaded = model.state_dict()
    assert set(loaded) == set(official)
    # the routed experts were read straight into one block per weight kind, each expert's weight a view of it
    for moe in (m for m in model.modules() if isinstance(m, MoE)):
        with torch.no_grad():
            block = moe.expert_weights()[2]
        assert block.shape == (moe.n_experts, *moe.experts[0].w2.weight.shape)
        assert moe.experts[-1].w2.weight.data_ptr() == block[-1].data_ptr()
    for name, t in official.items():
        assert loaded[name].dtype == (torch.int64 if name.endswith("tid2eid") else loaded[name].dtype)
        assert torch.equal(loaded[name].to(t.dtype), t), name
    with torch.no_grad():
        logits = model(ids)
    assert logits.dtype == torch.float32 and logits.shape == hf_logits.shape
    torch.testing.assert_close(logits, hf_logits, atol=1e-4, rtol=0)


def test_bf16_load_is_the_exact_rounding_of_the_fp32_load(hf_reference):
    root = hf_reference[0]
    fp32 = load_model(root / "published", dtype=torch.float32, progress=False, weights="dequantized").state_dict()
    bf16 = load_model(root / "published", dtype=torch.bfloat16, progress=False, weights="dequantized").state_dict()
    assert any(t.dtype == torch.bfloat16 for t in bf16.values())
    for name, t in bf16.items():
        # every stored value is representable in bf16 (bf16/fp8/fp4 release kinds), fp32 kinds stay fp32
        assert torch.equal(t, fp32[name].to(t.dtype)), name


@pytest.mark.parametrize("quantize", [False, True])
def test_writer_round_trip_with_mtp(tmp_path, quantize):
    from dsv4.model.transformer import Transformer

    config = ModelConfig.from_dict(TINY)
    model = Transformer(config, dtype=torch.float32)
    model.init_weights(seed=3)
    sd = representable(model.state_dict()) if quantize else model.state_dict()
    assert any(n.startswith("mtp.0.") for n in sd)
    cio.save_checkpoint(tmp_path, sd, config, quantize=quantize, dtype=torch.float32)
    loaded = load_model(tmp_path, dtype=torch.float32, progress=False, weights="dequantized").state_dict()
    assert set(loaded) == set(sd)
    for name, t in sd.items():
        assert torch.equal(loaded[name], t.to(loaded[name].dtype)), name


def test_transformers_loads_the_unquantised_export(hf_reference, tmp_path):
    transformers = pytest.importorskip("transformers")
    root, official, ids, hf_logits = hf_reference
    cio.save_checkpoint(tmp_path, official, ModelConfig.from_dict(TINY), quantize=False, dtype=torch.float32)
    hf = transformers.DeepseekV4ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits.float(), hf_logits, atol=1e-5, rtol=0)


def test_single_file_with_float4_experts_like_convert_py(hf_reference, tmp_path):
    """DeepSeek's convert.py output: one file with a non-standard name, no index, experts as float4_e2m1fn_x2."""
    from safetensors.torch import save_file

    root, official, _, _ = hf_reference
    stored = cio.read_state_dict(root / "published")
    n_fp4 = 0
    for name, t in stored.items():
        if t.dtype == torch.int8:
            stored[name] = t.view(torch.float4_e2m1fn_x2)
            n_fp4 += 1
    assert n_fp4 > 0
    save_file(stored, str(tmp_path / "model0-mp1.safetensors"))
    (tmp_path / "config.json").write_text((root / "published" / "config.json").read_text())
    loaded = load_model(tmp_path, dtype=torch.float32, progress=False, weights="dequantized").state_dict()
    for name, t in official.items():
        assert torch.equal(loaded[name].to(t.dtype), t), name
