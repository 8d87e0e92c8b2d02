"""ModelConfig on the published configs (HF + official key sets, transformers-saved form) and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsv4.config import ModelConfig

CONFIGS = Path(__file__).resolve().parents[3] / "shared" / "reference" / "configs"
if not CONFIGS.is_dir():
    CONFIGS = Path("/work/shared/reference/configs")


@pytest.mark.parametrize("name", ["v4-flash", "v4-pro"])
def test_published_hf_and_official_configs_agree(name: str) -> None:
    hf = ModelConfig.from_json(CONFIGS / name / "config.json")
    official = ModelConfig.from_json(CONFIGS / name / "inference_config.json")
    assert hf == official


def test_flash_derived_values() -> None:
    c = ModelConfig.from_json(CONFIGS / "v4-flash")
    assert (c.dim, c.n_layers, c.n_heads, c.head_dim, c.rope_head_dim, c.window_size) == (4096, 43, 64, 512, 64, 128)
    assert c.layer_types[:4] == ("swa", "swa", "csa", "hca")
    assert c.layer_types.count("csa") == 21 and c.layer_types.count("hca") == 20 and c.mtp_ratio == 0
    assert [c.is_hash_layer(i) for i in range(4)] == [True, True, True, False]
    assert c.yarn == (16.0, 65536, 32.0, 1.0)
    assert c.compressed_ratios == (4, 128)
    assert c.routed_scaling_factor == 1.5 and c.index_topk == 512


def test_pro_layer_types() -> None:
    c = ModelConfig.from_json(CONFIGS / "v4-pro")
    assert c.layer_types[:2] == ("hca", "hca")
    assert c.layer_types.count("csa") == 30 and c.layer_types.count("hca") == 31


def test_transformers_saved_config_round_trips(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    ref = ModelConfig.from_json(CONFIGS / "v4-flash")
    hf = transformers.DeepseekV4Config.from_json_file(str(CONFIGS / "v4-flash" / "config.json"))
    hf.save_pretrained(tmp_path)
    saved = ModelConfig.from_json(tmp_path)
    # transformers drops the MTP entry of compress_ratios; everything else must survive
    assert saved.replace(compress_ratios=ref.compress_ratios) == ref
    assert saved.layer_ratios == ref.layer_ratios


def test_to_dict_round_trip() -> None:
    c = ModelConfig.from_json(CONFIGS / "v4-pro")
    assert ModelConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c


def test_n_layers_entries_accepted() -> None:
    d = json.loads((CONFIGS / "v4-flash" / "config.json").read_text())
    d["compress_ratios"] = d["compress_ratios"][:-1]
    assert ModelConfig.from_dict(d).mtp_ratio == 0


@pytest.mark.parametrize("key,value,match", [
    ("compress_ratios", [0, 4], "compress_ratios"),
    ("num_key_value_heads", 8, "num_key_value_heads"),
    ("qk_rope_head_dim", 63, "qk_rope_head_dim"),
    ("o_groups", 7, "o_groups"),
    ("num_experts_per_tok", 300, "num_experts_per_tok"),
    ("num_hash_layers", 99, "num_hash_layers"),
    ("scoring_func", "relu", "scoring_func"),
    ("rope_scaling", {"type": "linear", "factor": 2}, "rope_scaling"),
    ("hidden_size", 0, "hidden_size"),
    ("some_new_key", 1, "some_new_key"),
])
def test_bad_values_name_the_key(key: str, value, match: str) -> None:
    d = json.loads((CONFIGS / "v4-flash" / "config.json").read_text())
    d[key] = value
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_dict(d)


def test_missing_key_is_named() -> None:
    d = json.loads((CONFIGS / "v4-flash" / "config.json").read_text())
    del d["index_topk"]
    with pytest.raises(ValueError, match="index_topk"):
        ModelConfig.from_dict(d)


def test_mtp_must_be_sliding() -> None:
    d = json.loads((CONFIGS / "v4-flash" / "config.json").read_text())
    d["compress_ratios"][-1] = 4
    with pytest.raises(ValueError, match="MTP"):
        ModelConfig.from_dict(d)


def test_missing_file_message(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="config.json"):
        ModelConfig.from_json(tmp_path)
