"""Training state that a file can damage or forge: no code runs on resume, damage is refused with the file named,
resume falls back to the newest intact checkpoint, and pruning keeps what `latest` names."""

from __future__ import annotations

import json
import pickle
import random

import numpy as np
import pytest
import torch

from dsv4.train.checkpoint import (
    CheckpointError,
    load_training_state,
    prune_checkpoints,
    resume_point,
    save_training_state,
)
from dsv4.train.data import load_documents
from dsv4.train.safe_state import MANIFEST, TENSORS, TREE, read_state, write_state
from dsv4.train.trainer import Trainer, main, parse_args
from tests.train.conftest import base_args
from tests.train.test_trainer import read_losses


class _Payload:
    """Pickles to a call that writes `marker`: what a crafted state.pt would run if it were unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def _run_with_checkpoints(train_assets, out, saves=(2, 4), steps=6):
    t = Trainer(parse_args(base_args(train_assets, out, steps=steps)))
    for _ in range(max(saves)):
        t.log(t.train_step())
        if t.step in saves:
            t.save()
    return out / "checkpoints"


def test_state_tree_round_trips_exactly(tmp_path):
    t = torch.randn(3, 4)
    tree = {
        "step": 7, "model": {"w": t, "tied": t, "bf": torch.randn(5).bfloat16(), "scalar": torch.tensor(3.0)},
        "groups": [{"betas": (0.9, 0.95), "eps": 1e-20, "max": float("inf"), "fused": None, "flag": True}],
        "by_index": {0: {"buf": torch.ones(2)}, 1: {}}, "__dunder": "kept",
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
    }
    write_state(tmp_path, tree)
    back = read_state(tmp_path)
    assert back["groups"] == tree["groups"] and isinstance(back["groups"][0]["betas"], tuple)
    assert back["step"] == 7 and back["__dunder"] == "kept" and set(back["by_index"]) == {0, 1}
    for k in ("w", "tied", "bf", "scalar"):
        assert back["model"][k].dtype == tree["model"][k].dtype and torch.equal(back["model"][k], tree["model"][k])
    assert torch.equal(back["rng"]["torch"], tree["rng"]["torch"])
    np.random.set_state(back["rng"]["numpy"])
    random.setstate(back["rng"]["python"])  # needs the tuples back
    a = (np.random.rand(), random.random())
    np.random.set_state(tree["rng"]["numpy"])
    random.setstate(tree["rng"]["python"])
    assert a == (np.random.rand(), random.random())


def test_crafted_pickle_never_runs(train_assets, tmp_path, capsys):
    out, marker = tmp_path / "run", tmp_path / "pwned"
    root = out / "checkpoints"
    step = root / "step_00000003"
    step.mkdir(parents=True)
    # the old format's file name, and a pickle inside a safetensors-named file too
    torch.save({"model": _Payload(marker), "step": 3}, step / "state.pt")
    (root / "latest").write_text(step.name)
    with pytest.raises(CheckpointError, match="state.pt"):
        load_training_state(step)
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        Trainer(parse_args(base_args(train_assets, out, steps=4)))
    assert not marker.exists()
    assert "step_00000003" in capsys.readouterr().err
    # a genuine old-format state.pt still loads, through the same restricted unpickler
    legit = {"model": {"w": torch.ones(2)}, "step": 3, "rng": {"numpy": np.random.get_state()}}
    torch.save(legit, step / "state.pt")
    assert load_training_state(step)["rng"]["numpy"][1].tolist() == legit["rng"]["numpy"][1].tolist()
    (step / "state.pt").unlink()
    (step / TENSORS).write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(CheckpointError):
        load_training_state(step)
    assert not marker.exists()


def test_damaged_checkpoint_falls_back_and_resume_stays_exact(train_assets, tmp_path, capsys):
    full, part = tmp_path / "full", tmp_path / "part"
    main(base_args(train_assets, full, steps=6))
    root = _run_with_checkpoints(train_assets, part)
    f = root / "step_00000004" / TENSORS
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x40  # one flipped bit in the middle of the tensor data
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{f}.*SHA-256"):
        load_training_state(f.parent)
    capsys.readouterr()
    main(base_args(train_assets, part, steps=6))
    err = capsys.readouterr().err
    assert "refusing checkpoint step_00000004" in err and str(f) in err
    assert "resuming from the newest intact checkpoint" in err and "step_00000002" in err
    a, _ = read_losses(full)
    b, _ = read_losses(part)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 3, 4, 5, 6]
    assert [r["loss"] for r in b[4:]] == [r["loss"] for r in a[2:]]  # bit-identical continuation from step 2


def test_truncated_or_partial_checkpoint_is_refused_by_name(train_assets, tmp_path):
    root = _run_with_checkpoints(train_assets, tmp_path / "run", saves=(2,), steps=4)
    d = root / "step_00000002"
    f = d / TENSORS
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=f"{f} has 1000 bytes"):
        load_training_state(d)
    # the only checkpoint is damaged: resume refuses instead of starting over at step 0
    with pytest.raises(CheckpointError, match="no intact checkpoint.*has 1000 bytes"):
        Trainer(parse_args(base_args(train_assets, tmp_path / "run", steps=4)))
    (d / MANIFEST).write_text("{not json")
    with pytest.raises(CheckpointError, match=f"{d / MANIFEST} is damaged"):
        load_training_state(d)
    (d / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_training_state(d)
    (d / TREE).write_text("[]")
    with pytest.raises(CheckpointError):
        load_training_state(d)


@pytest.mark.parametrize("latest", ["missing", "garbage", "../../etc", "step_00000099", b"\xff\xfe"])
def test_broken_latest_resumes_from_newest_verified_and_says_so(train_assets, tmp_path, latest):
    root = _run_with_checkpoints(train_assets, tmp_path / "run", saves=(2, 4), steps=4)
    marker = root / "latest"
    if latest == "missing":
        marker.unlink()
    else:
        marker.write_bytes(latest if isinstance(latest, bytes) else latest.encode())
    warnings: list[str] = []
    path, state = resume_point(tmp_path / "run", warnings.append)
    assert path.name == "step_00000004" and state["step"] == 4
    assert len(warnings) == 1 and "latest" in warnings[0] and "step_00000004" in warnings[0]


def test_latest_naming_nothing_is_refused_not_step_zero(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    root.mkdir(parents=True)
    assert resume_point(tmp_path / "run", print) is None  # an empty run dir is a fresh start
    (root / "latest").write_text("step_00000007")
    with pytest.raises(CheckpointError, match="names step_00000007, which does not exist"):
        resume_point(tmp_path / "run", print)


def test_pruning_keeps_latest_and_the_new_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    for s in (1, 2, 3, 4, 5):
        (root / f"step_{s:08d}").mkdir(parents=True)
    (root / "latest").write_text("step_00000001")
    prune_checkpoints(root, keep=2, protect={"step_00000003"})
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == [
        "step_00000001", "step_00000003", "step_00000004", "step_00000005"]


def test_fresh_run_in_old_out_keeps_its_own_checkpoint(tmp_path):
    # an old run left steps 10 and 12; a new run (resume off) saves step 2: it must survive its own pruning
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    for s in (10, 12):
        save_training_state(tmp_path, s, model, [opt], {"data": {}})
    final = save_training_state(tmp_path, 2, model, [opt], {"data": {}})
    assert final.is_dir() and (tmp_path / "checkpoints" / "latest").read_text() == final.name
    assert load_training_state(final)["step"] == 2
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == [
        "step_00000002", "step_00000010", "step_00000012"]


def test_jsonl_with_bad_utf8_names_file_and_line(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_bytes(json.dumps({"text": "fine"}).encode() + b"\n" + b'{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=f"{f}:2 is not valid UTF-8"):
        load_documents([f])
    # a U+2028 inside a JSON string is one record, not two broken lines
    f.write_text(json.dumps({"text": "a\u2028b"}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert load_documents([f]) == ["a\u2028b"]
