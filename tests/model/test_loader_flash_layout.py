"""The real V4-Flash checkpoint layout passes every loader check against the model built from the published config.

No weights are needed: the checkpoint files are sparse (a real safetensors header, then a hole of the right size),
so the loader's header validation, name mapping, dtype rules and shape / scale-shape checks all run on the real
names, dtypes and shapes, at full V4-Flash width (dim 4096, vocab 129280, 256 experts), with 4 layers
(SWA, SWA, CSA, HCA; 3 hash layers) + the MTP block to stay small. Only the data streaming is skipped.

The names, shapes and dtypes come from ``data/params_flash.txt``, a copy of the spec's listing generated from the
official ``model.py`` (architecture.md sec. 12), i.e. an independent source, not the model under test.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

from dsv4.model import checkpoint_io as cio
from dsv4.model import loader

PARAMS = Path(__file__).with_name("data") / "params_flash.txt"
RATIOS = [0, 0, 4, 128]  # backbone layers of the reduced model; the MTP block is SWA
N_HASH = 3
N_EXPERTS = 256

FLASH_CONFIG = {
    "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4", "expert_dtype": "fp4",
    "hc_eps": 1e-06, "hc_mult": 4, "hc_sinkhorn_iters": 20, "head_dim": 512, "hidden_act": "silu", "hidden_size": 4096,
    "index_head_dim": 128, "index_n_heads": 64, "index_topk": 512, "max_position_embeddings": 1048576,
    "moe_intermediate_size": 2048, "n_routed_experts": N_EXPERTS, "n_shared_experts": 1, "norm_topk_prob": True,
    "num_attention_heads": 64, "num_experts_per_tok": 6, "num_hidden_layers": len(RATIOS), "num_hash_layers": N_HASH,
    "num_key_value_heads": 1, "num_nextn_predict_layers": 1, "o_groups": 8, "o_lora_rank": 1024, "q_lora_rank": 1024,
    "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06, "rope_theta": 10000, "routed_scaling_factor": 1.5,
    "scoring_func": "sqrtsoftplus", "sliding_window": 128, "swiglu_limit": 10.0, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "vocab_size": 129280, "compress_rope_theta": 160000,
    "compress_ratios": RATIOS + [0],
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "scale_fmt": "ue8m0", "weight_block_size": [128, 128]},
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 16, "original_max_position_embeddings": 65536,
                     "type": "yarn"},
}

_ST = {"float32": "F32", "bfloat16": "BF16", "float8_e4m3fn": "F8_E4M3", "float8_e8m0fnu": "F8_E8M0",
       "float4_e2m1fn_x2": "F4", "int32": "I32", "int64": "I64", "int8": "I8"}
_BYTES = {"F32": 4, "BF16": 2, "F8_E4M3": 1, "F8_E8M0": 1, "F4": 0.5, "I32": 4, "I64": 8, "I8": 1}


def _listing() -> list[tuple[str, list[tuple[str, tuple[int, ...]]]]]:
    rows = []
    for line in PARAMS.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, spec = line.split(" ", 1)
        rows.append((name, ast.literal_eval(spec)))
    return rows


def convert_py_layout() -> dict[str, tuple[str, tuple[int, ...]]]:
    """Official names -> (safetensors dtype, safetensors shape) as params_flash.txt lists them (convert.py output)."""
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, options in _listing():
        layers = [(f"layers.{i}.", r, i < N_HASH) for i, r in enumerate(RATIOS)] if "{L}" in name else [("", 0, False)]
        for prefix, ratio, is_hash in layers:
            full = name.replace("layers.{L}.", prefix)
            if (".compressor." in full and ratio == 0) or (".indexer." in full and ratio != 4):
                continue
            if (full.endswith("tid2eid") and not is_hash) or (full.endswith("gate.bias") and is_hash):
                continue
            if len(options) == 1:
                dtype, shape = options[0]
            else:  # main compressor: CSA (ratio 4) overlaps two windows, so its kv/gate/ape width is 2 * 512
                (dtype, shape), = [(d, s) for d, s in options if (1024 in s) == (ratio == 4)]
            shape = tuple(shape)
            if dtype == "float4_e2m1fn_x2":  # listed in torch units (two per element); safetensors F4 counts values
                shape = shape[:-1] + (2 * shape[-1],)
            for e in range(N_EXPERTS) if "{E}" in full else [None]:
                out[full.replace("{E}", str(e))] = (_ST[dtype], shape)
    return out


def release_layout() -> dict[str, tuple[str, tuple[int, ...]]]:
    """The same tensors in the published HF checkpoint's dtypes (architecture.md sec. 12): wo_a FP8 instead of bf16,
    experts I8-packed, tid2eid I64, norms / compressor projections / head bf16."""
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, (_, shape) in convert_py_layout().items():
        if name.endswith(".scale"):
            continue
        kind = cio.tensor_kind(name)
        if kind == "fp8":
            out[name] = ("F8_E4M3", shape)
            out[name[: -len("weight")] + "scale"] = ("F8_E8M0", (-(-shape[0] // 128), -(-shape[1] // 128)))
        elif kind == "fp4":
            out[name] = ("I8", (shape[0], shape[1] // 2))
            out[name[: -len("weight")] + "scale"] = ("F8_E8M0", (shape[0], shape[1] // 32))
        else:
            out[name] = ({"int": "I64", "fp32": "F32", "bf16": "BF16"}[kind], shape)
    return out


def write_sparse_checkpoint(root: Path, layout: dict[str, tuple[str, tuple[int, ...]]], n_shards: int) -> None:
    root.mkdir()
    names = list(layout)
    shards = [names[i::n_shards] for i in range(n_shards)]
    weight_map = {}
    for k, shard_names in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{n_shards:05d}.safetensors"
        header, offset = {}, 0
        for name in shard_names:
            dtype, shape = layout[name]
            nbytes = int(_BYTES[dtype] * torch.Size(shape).numel())
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = file
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(root / file, "wb") as f:
            f.write(len(raw).to_bytes(8, "little") + raw)
            f.truncate(8 + len(raw) + offset)  # a hole: no disk space, reads as zeros
    (root / cio.INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (root / "config.json").write_text(json.dumps(FLASH_CONFIG))


@pytest.mark.parametrize("layout", ["release", "convert_py"])
def test_flash_layout_passes_every_check(tmp_path, monkeypatch, layout):
    files = release_layout() if layout == "release" else convert_py_layout()
    assert sum(n.startswith("layers.2.ffn.experts.") for n in files) == 6 * N_EXPERTS
    write_sparse_checkpoint(tmp_path / "ckpt", files, n_shards=5)
    streamed: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    packed: dict[str, str] = {}

    def record_plan(model, plan, expected, opened, device, progress, formats):  # all up to the data copy ran
        streamed.update({n: (expected[n].dtype, tuple(expected[n].shape)) for n in plan})
        packed.update(formats)

    monkeypatch.setattr(loader, "_stream", record_plan)
    monkeypatch.setattr(loader, "_check_materialised", lambda model, root: None)
    loader.load_model(tmp_path / "ckpt", dtype=torch.bfloat16, progress=False)
    weights = {n for n in files if not (n.endswith(".scale") and n[: -len("scale")] + "weight" in files)}
    assert set(streamed) == weights
    assert streamed["head.weight"] == (torch.float32, (129280, 4096))
    assert streamed["layers.3.ffn.experts.255.w2.weight"] == (torch.bfloat16, (4096, 2048))
    assert streamed["layers.2.attn.indexer.compressor.ape"] == (torch.float32, (4, 256))
    assert streamed["mtp.0.e_proj.weight"] == (torch.bfloat16, (4096, 4096))
    # the default keeps every quantised projection packed as stored (wo_a: FP8 in the release, bf16 after convert.py)
    stored_quantised = {n[: -len("scale")] + "weight" for n in files if n.endswith(".scale")}
    assert set(packed) == stored_quantised
    assert packed["layers.3.ffn.experts.255.w2.weight"] == "fp4" and packed["layers.2.attn.wq_b.weight"] == "fp8"
    assert ("layers.2.attn.wo_a.weight" in packed) == (layout == "release")


def test_a_wrong_scale_shape_in_the_flash_layout_is_caught(tmp_path):
    files = release_layout()
    files["layers.2.attn.wq_b.scale"] = ("F8_E8M0", (8, 256))  # transposed
    write_sparse_checkpoint(tmp_path / "ckpt", files, n_shards=3)
    with pytest.raises(cio.CheckpointError, match=r"scale 'layers\.2\.attn\.wq_b\.scale' .* has shape \[8, 256\], "
                                                  r"the weight \[32768, 1024\] needs \[256, 8\]"):
        loader.load_model(tmp_path / "ckpt", dtype=torch.bfloat16, progress=False)

