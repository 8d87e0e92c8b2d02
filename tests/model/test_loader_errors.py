"""Every broken-checkpoint case fails with a CheckpointError that names the file / tensor and says what to do."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dsv4.config import ModelConfig
from dsv4.model import checkpoint_io as cio
from dsv4.model.checkpoint_io import CheckpointError
from dsv4.model.loader import load_model

SMALL = dict(
    vocab_size=64, hidden_size=64, num_hidden_layers=3, num_attention_heads=2, head_dim=32, qk_rope_head_dim=16,
    q_lora_rank=32, o_groups=2, o_lora_rank=16, sliding_window=8, compress_ratios=[0, 4, 128, 0], index_n_heads=2,
    index_head_dim=32, index_topk=2, moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2,
    num_hash_layers=1, hc_mult=2, num_nextn_predict_layers=1,
)


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    from dsv4.model.transformer import Transformer

    config = ModelConfig.from_dict(SMALL)
    model = Transformer(config, dtype=torch.float32).init_weights(seed=0)
    root = tmp_path_factory.mktemp("good")
    cio.save_checkpoint(root, model.state_dict(), config, quantize=True, max_shard_bytes=60_000)
    load_model(root, dtype=torch.float32, progress=False)  # the untouched checkpoint loads
    return root


@pytest.fixture
def ckpt(good, tmp_path) -> Path:
    shutil.copytree(good, tmp_path / "ckpt")
    return tmp_path / "ckpt"


def weight_map(root: Path) -> dict[str, str]:
    return json.loads((root / cio.INDEX_NAME).read_text())["weight_map"]


def rewrite_shard(root: Path, holding: str, edit) -> Path:
    """Rewrite the shard holding tensor `holding` with `edit(dict)` applied; keeps the index consistent."""
    shard = root / weight_map(root)[holding]
    with cio.SafetensorsFile(shard) as f:
        tensors = {k: f.tensor(k).clone() for k in f.keys()}
    edit(tensors)
    save_file(tensors, str(shard))
    index = json.loads((root / cio.INDEX_NAME).read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard.name or k in tensors}
    index["weight_map"].update({k: shard.name for k in tensors})
    (root / cio.INDEX_NAME).write_text(json.dumps(index))
    return shard


def edit_config(root: Path, **changes) -> None:
    config = json.loads((root / "config.json").read_text())
    config.update(changes)
    (root / "config.json").write_text(json.dumps(config))


def load(root: Path):
    return load_model(root, dtype=torch.float32, progress=False)


def test_path_without_config_json(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"has no config\.json"):
        load(ckpt)


def test_path_that_is_not_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        load(tmp_path / "nowhere")


def test_directory_without_weights(ckpt):
    for f in ckpt.glob("*.safetensors"):
        f.unlink()
    (ckpt / cio.INDEX_NAME).unlink()
    with pytest.raises(CheckpointError, match="no weights in"):
        load(ckpt)


def test_missing_shard(ckpt):
    shard = weight_map(ckpt)["layers.1.attn.wq_b.weight"]
    (ckpt / shard).unlink()
    with pytest.raises(CheckpointError, match=rf"shard file .*{shard}.* is missing.*Download"):
        load(ckpt)


def test_truncated_shard(ckpt):
    shard = ckpt / weight_map(ckpt)["layers.2.attn.wkv.weight"]
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match=rf"{shard.name} is truncated or corrupt: tensor '.*' ends at byte"):
        load(ckpt)


def test_corrupt_header(ckpt):
    shard = ckpt / weight_map(ckpt)["embed.weight"]
    data = bytearray(shard.read_bytes())
    data[8:16] = b"\x00garbage"
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{shard.name} is truncated or corrupt: the header is not valid JSON"):
        load(ckpt)


def test_file_shorter_than_its_header(ckpt):
    shard = ckpt / weight_map(ckpt)["norm.weight"]
    shard.write_bytes(shard.read_bytes()[:50])
    with pytest.raises(CheckpointError, match=rf"{shard.name} is truncated or corrupt: the header claims"):
        load(ckpt)


def test_missing_key(ckpt):
    rewrite_shard(ckpt, "layers.1.attn.attn_sink", lambda t: t.pop("layers.1.attn.attn_sink"))
    with pytest.raises(CheckpointError, match=r"missing tensors 'layers\.1\.attn\.attn_sink'"):
        load(ckpt)


def test_unexpected_key(ckpt):
    rewrite_shard(ckpt, "norm.weight", lambda t: t.update({"layers.0.attn.bogus": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensors 'layers\.0\.attn\.bogus' \(model-\d+-of-\d+"):
        load(ckpt)


def test_wrong_shape(ckpt):
    shard = rewrite_shard(ckpt, "layers.0.attn.attn_sink",
                          lambda t: t.update({"layers.0.attn.attn_sink": torch.zeros(5)}))
    with pytest.raises(CheckpointError, match=rf"'layers\.0\.attn\.attn_sink' in .*{shard.name} has shape \[5\], the "
                                              r"model expects \[2\]"):
        load(ckpt)


def test_wrong_scale_shape(ckpt):
    name = "layers.1.attn.wq_b.scale"
    rewrite_shard(ckpt, name, lambda t: t.update({name: torch.full((3, 3), 127, dtype=torch.uint8)
                                                  .view(torch.float8_e8m0fnu)}))
    with pytest.raises(CheckpointError, match=r"scale 'layers\.1\.attn\.wq_b\.scale' in .* has shape \[3, 3\], the "
                                              r"weight \[64, 32\] needs \[1, 1\]"):
        load(ckpt)


def test_quantised_weight_without_its_scale(ckpt):
    rewrite_shard(ckpt, "layers.0.attn.wkv.scale", lambda t: t.pop("layers.0.attn.wkv.scale"))
    with pytest.raises(CheckpointError, match=r"'layers\.0\.attn\.wkv\.weight' in .* is torch\.float8_e4m3fn, which "
                                              r"cannot be converted .*\.scale tensor is missing"):
        load(ckpt)


def test_unconvertible_dtype(ckpt):
    name = "layers.0.ffn.gate.tid2eid"
    rewrite_shard(ckpt, name, lambda t: t.update({name: t[name].float()}))
    with pytest.raises(CheckpointError, match=r"'layers\.0\.ffn\.gate\.tid2eid' in .* is torch\.float32, which "
                                              r"cannot be converted to the model's torch\.int64"):
        load(ckpt)


def test_nan_scale_is_reported_with_its_tensor(ckpt):
    name = "layers.2.ffn.experts.1.w2.scale"
    rewrite_shard(ckpt, name, lambda t: t.update({name: torch.full_like(t[name].view(torch.uint8), 255)
                                                  .view(torch.float8_e8m0fnu)}))
    with pytest.raises(CheckpointError, match=r"'layers\.2\.ffn\.experts\.1\.w2\.weight' in .*NaN byte.*corrupt"):
        load(ckpt)


def test_config_with_fewer_layers_than_the_weights(ckpt):
    edit_config(ckpt, num_hidden_layers=2, compress_ratios=[0, 4, 0])
    with pytest.raises(CheckpointError, match=r"unexpected tensors 'layers\.2\..*holds layers up to 2 but config\.json "
                                              r"says num_hidden_layers=2"):
        load(ckpt)


def test_config_with_more_layers_than_the_weights(ckpt):
    edit_config(ckpt, num_hidden_layers=4, compress_ratios=[0, 4, 128, 4, 0])
    with pytest.raises(CheckpointError, match=r"missing tensors 'layers\.3\..*holds layers 0\.\.2 only but "
                                              r"config\.json says num_hidden_layers=4"):
        load(ckpt)


def test_config_with_another_dim(ckpt):
    edit_config(ckpt, hidden_size=96)
    with pytest.raises(CheckpointError, match=r"'embed\.weight' in .* has shape \[64, 64\], the model expects "
                                              r"\[64, 96\].*config\.json probably does not match the weights"):
        load(ckpt)


def test_config_with_more_experts(ckpt):
    edit_config(ckpt, n_routed_experts=6)
    with pytest.raises(CheckpointError, match=r"missing tensors 'layers\.0\.ffn\.experts\.4.*fewer experts than "
                                              r"config\.json's n_routed_experts=6"):
        load(ckpt)


def test_invalid_config_value_names_the_file(ckpt):
    edit_config(ckpt, num_attention_heads=0)
    with pytest.raises(CheckpointError, match=r"config\.json: config key 'num_attention_heads'"):
        load(ckpt)


def test_shard_that_does_not_hold_what_the_index_says(ckpt):
    index = json.loads((ckpt / cio.INDEX_NAME).read_text())
    other = next(v for v in index["weight_map"].values() if v != index["weight_map"]["norm.weight"])
    index["weight_map"]["norm.weight"] = other
    (ckpt / cio.INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"{other} does not hold tensor 'norm\.weight'"):
        load(ckpt)


def test_nothing_is_left_on_meta(good):
    model = load(good)
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    assert not model.training


def test_model_state_outside_the_checkpoint_left_on_meta_is_an_error(good, monkeypatch):
    """A plain tensor attribute (here the RoPE table) built under the meta device and never filled is caught."""
    from dsv4.model import rope

    monkeypatch.setattr(rope, "inv_freq", lambda rope_dim, base, yarn: torch.ones(rope_dim // 2))  # ambient device
    with pytest.raises(CheckpointError, match=r"left \d+ tensor\(s\) unmaterialised .*rotary\._inv_freq"):
        load(good)


def test_progress_bar_and_quiet_mode(good, capsys):
    load_model(good, dtype=torch.float32, progress=True)
    assert "loading weights" in capsys.readouterr().err
    load_model(good, dtype=torch.float32, progress=False)
    assert "loading weights" not in capsys.readouterr().err


def test_corrupt_index(ckpt):
    index = ckpt / cio.INDEX_NAME
    index.write_text(index.read_text()[:40])
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json is not a valid safetensors index"):
        load(ckpt)


def test_corrupt_config_json(ckpt):
    (ckpt / "config.json").write_text('{"hidden_size": 64,')
    with pytest.raises(CheckpointError, match=r"config\.json.*not valid JSON"):
        load(ckpt)


def test_mtp_copies_of_embedding_and_head_are_ignored_like_convert_py(ckpt):
    """Some releases also store the MTP block's (shared) embedding and head; convert.py drops them, so do we."""
    rewrite_shard(ckpt, "norm.weight", lambda t: t.update({"mtp.0.emb.tok_emb.weight": torch.zeros(64, 64),
                                                           "mtp.0.head.weight": torch.zeros(64, 64)}))
    model = load(ckpt)
    assert not any(n.startswith("mtp.0.emb") or n == "mtp.0.head.weight" for n in model.state_dict())


def test_non_float_compute_dtype_is_refused(good):
    with pytest.raises(ValueError, match="compute dtype"):
        load_model(good, dtype=torch.int8, progress=False)
