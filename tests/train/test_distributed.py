"""2 gloo processes (torchrun, FSDP2) compute the same losses as one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from dsv4.train.trainer import main
from tests.train.conftest import base_args


def _losses(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


def test_two_process_fsdp_matches_single_process(train_assets, tmp_path):
    single, dist = tmp_path / "single", tmp_path / "dist"
    common = dict(steps=3, **{"save-every": 0})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    # one process, 2 accumulated micro-batches == 2 ranks x 1 micro-batch: the same global batch
    assert main(base_args(train_assets, single, **common, **{"grad-accum": 2})) == 0
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "dsv4.cli", "train", *base_args(train_assets, dist, **common, **{"grad-accum": 1})],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = _losses(single), _losses(dist)
    assert [x["step"] for x in a] == [x["step"] for x in b] == [1, 2, 3]
    for x, y in zip(a, b):
        assert abs(x["ce"] - y["ce"]) < 1e-4 * max(1.0, abs(x["ce"])), (x["ce"], y["ce"])
        assert abs(x["mtp"] - y["mtp"]) < 1e-4 * max(1.0, abs(x["mtp"]))
        assert x["tokens"] == y["tokens"]
        assert x["expert_load"] == y["expert_load"]
    # the sharded run checkpoints a full (unsharded) state that a single process can resume from
    assert (dist / "checkpoints" / "latest").is_file()
