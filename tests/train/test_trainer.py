from __future__ import annotations

import json

import pytest
import torch

from tests.train.conftest import base_args
from dsv4.train.trainer import Trainer, main, parse_args


def read_losses(out):
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if "loss" in r], [r for r in recs if "eval_loss" in r]


def test_loss_falls_on_synthetic_corpus(train_assets, tmp_path):
    out = tmp_path / "run"
    assert main(base_args(train_assets, out, steps=30, lr=1e-2, **{"eval-every": 0})) == 0
    train, evals = read_losses(out)
    first, last = train[0], train[-1]
    assert last["step"] == 30
    assert last["ce"] < first["ce"] - 3.0, (first["ce"], last["ce"])  # from ~ln(vocab)=7.4 to well under 4.4
    assert last["mtp"] < first["mtp"] - 2.0
    assert evals[-1]["eval_loss"] < first["ce"] - 3.0
    # every routed layer (not the hash layer 0) reports its expert load, and the MTP block's gate too
    assert set(last["expert_load"]) == {"layers.1.ffn.gate", "layers.2.ffn.gate", "mtp.0.ffn.gate"}
    assert sum(last["expert_load"]["layers.1.ffn.gate"]) == last["tokens"] * 2  # top-2


def test_resume_is_exact(train_assets, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    main(base_args(train_assets, full, steps=6, **{"grad-accum": 2}))
    cfg = parse_args(base_args(train_assets, part, steps=6, **{"grad-accum": 2}))
    t = Trainer(cfg)
    for _ in range(3):
        t.log(t.train_step())
    t.save()
    del t
    main(base_args(train_assets, part, steps=6, **{"grad-accum": 2}))  # picks up checkpoints/latest at step 3
    a, _ = read_losses(full)
    b, _ = read_losses(part)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]  # bit-identical
    assert [r["expert_load"] for r in a] == [r["expert_load"] for r in b]


def _topk_lowest_index(self, k, dim=-1, largest=True, sorted=True):
    """Tensor.topk with dsv4's tie rule (exact ties to the lowest index; torch leaves the order unspecified)."""
    assert largest and dim in (-1, self.dim() - 1)
    v, i = torch.sort(self, dim=-1, descending=True, stable=True)
    return torch.return_types.topk((v[..., :k], i[..., :k]))


def test_export_loads_in_dsv4_and_transformers(train_assets, tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = parse_args(base_args(train_assets, out, steps=8, lr=1e-2, export="true", **{"export-dtype": "float32"}))
    t = Trainer(cfg)
    t.run()
    export = out / "export"
    assert (export / "config.json").is_file() and (export / "tokenizer.json").is_file()
    ids = torch.randint(3, 1600, (2, 40), generator=torch.Generator().manual_seed(0))
    t.model.eval()
    with torch.no_grad():
        want = t.model(ids)
    import dsv4

    ours = dsv4.load_model(export, dtype=torch.float32, progress=False)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), want, atol=1e-5, rtol=1e-5)
    # the trained gate biases (aux-loss-free balancing) travel with the export
    torch.testing.assert_close(ours.layers[1].ffn.gate.bias, t.model.layers[1].ffn.gate.bias)
    assert t.model.layers[1].ffn.gate.bias.abs().sum() > 0
    transformers = pytest.importorskip("transformers")
    hf, info = transformers.DeepseekV4ForCausalLM.from_pretrained(
        export, torch_dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    # the trained 2-head indexer scores many entries exactly 0 (ReLU): transformers must break those ties as dsv4
    # does (lowest entry id) for the same picks
    monkeypatch.setattr(torch.Tensor, "topk", _topk_lowest_index)
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, want, atol=1e-4, rtol=1e-4)
    monkeypatch.undo()
    # fine-tuning starts from the exported weights: its first loss continues the trained run, not a fresh init
    ft = tmp_path / "ft"
    main(base_args(train_assets, ft, steps=1, **{"init-from": export, "model-config": ""}))
    first_scratch = read_losses(out)[0][0]["ce"]
    first_ft = read_losses(ft)[0][0]["ce"]
    assert first_ft < first_scratch - 1.0, (first_scratch, first_ft)


def test_cli_errors_are_actionable(train_assets, tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--data", str(train_assets["data"])])
    assert "--model-config" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(base_args(train_assets, tmp_path, bogus=1))
    with pytest.raises(SystemExit):
        parse_args(base_args(train_assets, tmp_path, steps="many"))


def test_toml_config_with_overrides(train_assets, tmp_path):
    toml = tmp_path / "t.toml"
    toml.write_text(f'model_config = "{train_assets["config"]}"\ndata = ["{train_assets["data"]}"]\nsteps = 7\n'
                    '[optim]\nlr = 1e-3\nschedule = "constant"\n[loss]\nmtp_weight = 0.1\n')
    cfg = parse_args(["--config", str(toml), "--steps", "9", "--lr", "2e-3"])
    assert cfg.steps == 9 and cfg.optim.lr == 2e-3 and cfg.optim.schedule == "constant" and cfg.loss.mtp_weight == 0.1


def test_bf16_autocast_tracks_fp32(train_assets, tmp_path):
    for dtype in ("float32", "bfloat16"):
        main(base_args(train_assets, tmp_path / dtype, steps=2, dtype=dtype))
    a, _ = read_losses(tmp_path / "float32")
    b, _ = read_losses(tmp_path / "bfloat16")
    assert a[0]["ce"] != b[0]["ce"]  # autocast really ran the matmuls in bf16
    assert abs(a[0]["ce"] - b[0]["ce"]) < 0.05 and abs(a[1]["ce"] - b[1]["ce"]) < 0.1


def test_yaml_and_json_configs(train_assets, tmp_path):
    y = tmp_path / "t.yaml"
    y.write_text(f"model_config: {train_assets['config']}\ndata: [{train_assets['data']}]\noptim:\n  lr: 0.002\n")
    assert parse_args(["--config", str(y)]).optim.lr == 0.002
    j = tmp_path / "t.json"
    j.write_text(json.dumps({"model_config": str(train_assets["config"]), "data": str(train_assets["data"]),
                             "loss": {"balance_weight": 0.0}}))
    cfg = parse_args(["--config", str(j)])
    assert cfg.loss.balance_weight == 0.0 and cfg.data == [str(train_assets["data"])]


def test_mtp_weight_drops_when_lr_decay_starts(train_assets, tmp_path):
    out = tmp_path / "run"
    args = {"schedule": "wsd", "decay-fraction": 0.5, "mtp-weight-in-decay": 0.1, "warmup-steps": 1}
    main(base_args(train_assets, out, steps=4, **args))
    recs, _ = read_losses(out)
    assert [r["mtp_weight"] for r in recs] == [0.3, 0.3, 0.1, 0.1]
    assert all(abs(r["loss"] - (r["ce"] + r["mtp_weight"] * r["mtp"] + 1e-4 * r["balance"])) < 1e-9 for r in recs)


def test_loss_masked_segments_train(train_assets, tmp_path):
    """Segment records (dsv4.train.chat_data's format): only the trained pieces are targets, and they are learned."""
    from tests.train.conftest import synthetic_corpus

    data = tmp_path / "segments.jsonl"
    with data.open("w") as f:
        for doc in synthetic_corpus(120, seed=1):
            head, _, tail = doc.partition(". ")
            segs = [{"text": "<｜begin▁of▁sentence｜>" + head + ". ", "train": False},
                    {"text": (tail or head) + "<｜end▁of▁sentence｜>", "train": True}]
            f.write(json.dumps({"segments": segs}) + "\n")
    out = tmp_path / "run"
    assert main(base_args({**train_assets, "data": data}, out, steps=20, lr=1e-2, **{"eval-every": 0})) == 0
    train, evals = read_losses(out)
    assert train[-1]["ce"] < train[0]["ce"] - 2.0, (train[0]["ce"], train[-1]["ce"])
    assert all(torch.isfinite(torch.tensor([r["loss"], r["mtp"]])).all() for r in train)
    assert evals[-1]["eval_loss"] < train[0]["ce"] - 2.0
