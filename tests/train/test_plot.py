from __future__ import annotations

import json

import pytest

from dsv4.train.plot import main, read_metrics


def test_plot_writes_pngs(tmp_path):
    recs = [{"step": s, "loss": 8 - s * 0.1, "ce": 7 - s * 0.1, "mtp": 7.5 - s * 0.1,
             "expert_load": {"layers.1.ffn.gate": [10 + s, 20, 30, 40], "layers.2.ffn.gate": [25, 25, 25, 25]}}
            for s in range(1, 11)]
    recs.append({"step": 10, "eval_loss": 6.2})
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    assert main([str(tmp_path)]) == 0
    for name in ("loss.png", "expert_load.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert len(read_metrics(tmp_path)) == 11


def test_plot_missing_log_is_explained(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([str(tmp_path)])
    assert "metrics.jsonl" in capsys.readouterr().err
