"""Training checkpoints (exact resume) and export in the published DeepSeek-V4 layout.

A training checkpoint is one directory `step_{N}/`: model + optimizer state dicts (full, unsharded, so a run can
resume on a different number of ranks), the data loader position, every RNG state and the step, stored as
safetensors + JSON with a manifest of sizes and SHA-256s (safe_state.py; nothing in it is unpickled, so a crafted run
directory cannot run code). It is written to a temporary directory, fsynced and renamed into place, and `latest` is
replaced atomically afterwards, so a crash mid-save never leaves a checkpoint that looks complete but is not. Resume
verifies the checkpoint `latest` names and falls back, with a warning, to the newest intact one; pruning never
deletes the checkpoint `latest` names or the one just written.

Export writes what `dsv4.load_model` and transformers' `DeepseekV4ForCausalLM` read, through the loader's writer
(`model/checkpoint_io.save_checkpoint`): safetensors shards with the official tensor names, `config.json` (published HF
keys) and the tokenizer files. Weights are stored unquantised (BF16 by default; FP32 where the release keeps FP32: mHC
parameters, attention sinks, compressor `ape`, gate biases), and config.json carries no `quantization_config`, which
tells both loaders the linear weights are plain.

Deliberately not here: FP8/FP4 export (a tiny model does not need it; quantising would change its logits).
"""

from __future__ import annotations

import os
import random
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dsv4.train.safe_state import (
    MANIFEST,
    TENSORS,
    CheckpointError,
    fsync_dir,
    read_state,
    write_durable,
    write_state,
)

try:  # numpy >= 2
    from numpy._core.multiarray import _reconstruct as _np_reconstruct
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct as _np_reconstruct

LATEST = "latest"
LEGACY_STATE = "state.pt"
_STEP_DIR = re.compile(r"step_(\d+)")


def print_warning(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def _is_dist() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def full_model_state(model: nn.Module, expert_parallel: bool = False) -> dict[str, torch.Tensor] | None:
    """The whole model's state dict (on rank 0 under expert parallelism, where other ranks get None)."""
    if expert_parallel:
        from dsv4.train.expert_parallel import gather_full_state

        return gather_full_state(model)
    if _is_dist():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _param_names(model: nn.Module, opt: torch.optim.Optimizer) -> list[str]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in opt.param_groups for p in g["params"]]


def full_optim_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """Optimizer state keyed by parameter name (the torch.distributed.checkpoint layout), so a checkpoint saved by N
    FSDP ranks resumes in one process and vice versa."""
    if _is_dist():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    sd = opt.state_dict()
    names = _param_names(model, opt)
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in sd["param_groups"]]
    return {"state": {names[i]: st for i, st in sd["state"].items()}, "param_groups": groups}


def _load_optim_by_name(model: nn.Module, opt: torch.optim.Optimizer, sd: dict) -> None:
    index = {n: i for i, n in enumerate(_param_names(model, opt))}
    unknown = [n for g in sd["param_groups"] for n in g["params"] if n not in index]
    if unknown:
        raise ValueError(f"checkpoint optimizer state names parameters this model lacks, e.g. {unknown[:3]}")
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in sd["param_groups"]]
    opt.load_state_dict({"state": {index[n]: st for n, st in sd["state"].items()}, "param_groups": groups})


def load_full_state(
    model: nn.Module, opts: list[torch.optim.Optimizer], state: dict, expert_parallel: bool = False
) -> None:
    if expert_parallel:
        from dsv4.train.expert_parallel import load_local_state

        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        per_rank = state.get("optimizers_by_rank")
        if per_rank is None or len(per_rank) != world:
            raise ValueError(
                f"this checkpoint was not written by an expert-parallel run on {world} ranks; resume it with the "
                "world size and parallelism it was saved with"
            )
        load_local_state(model, state["model"])
        for opt, sd in zip(opts, per_rank[rank]):
            opt.load_state_dict(sd)
        return
    if state.get("optimizers") is None:
        raise ValueError("this checkpoint was written by an expert-parallel run; resume it with --expert-parallel")
    if _is_dist():
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        opt_ = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, state["model"], options=opt_)
        for opt, sd in zip(opts, state["optimizers"]):
            set_optimizer_state_dict(model, opt, sd, options=opt_)
    else:
        model.load_state_dict(state["model"])
        for opt, sd in zip(opts, state["optimizers"]):
            _load_optim_by_name(model, opt, sd)


def save_training_state(
    out_dir: str | Path, step: int, model: nn.Module, opts: list[torch.optim.Optimizer], extra: dict, keep: int = 2,
    expert_parallel: bool = False,
) -> Path | None:
    """Collective under torch.distributed (every rank calls it); rank 0 writes. Returns the checkpoint dir on rank 0.

    Under expert parallelism each rank's optimizer holds different experts, so the optimizer states are stored per
    rank (`optimizers_by_rank`) and such a checkpoint resumes on the same number of ranks only."""
    model_sd = full_model_state(model, expert_parallel)
    if expert_parallel:
        gathered: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, [o.state_dict() for o in opts])
        optim_fields = {"optimizers": None, "optimizers_by_rank": gathered}
    else:
        optim_fields = {"optimizers": [full_optim_state(model, o) for o in opts]}
    rank = torch.distributed.get_rank() if _is_dist() else 0
    if rank != 0:
        return None
    root = Path(out_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write_state(tmp, {"step": step, "model": model_sd, **optim_fields, "rng": rng_state(), **extra})
    if final.exists():  # a rename cannot replace a non-empty directory: move the old one aside first
        old = root / f".old_step_{step:08d}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(root)
    link_tmp = root / f".{LATEST}.tmp"
    write_durable(link_tmp, final.name.encode())
    os.replace(link_tmp, root / LATEST)
    fsync_dir(root)
    prune_checkpoints(root, keep, protect={final.name})
    return final


def _step_of(p: Path) -> int | None:
    m = _STEP_DIR.fullmatch(p.name)
    return int(m.group(1)) if m and p.is_dir() else None


def step_checkpoints(root: Path) -> list[Path]:
    """`step_N` directories under `root`, newest step first (temp and moved-aside directories excluded)."""
    found = [(s, p) for p in root.glob("step_*") if (s := _step_of(p)) is not None] if root.is_dir() else []
    return [p for _, p in sorted(found, reverse=True)]


def prune_checkpoints(root: Path, keep: int, protect: set[str] = frozenset()) -> None:
    """Keep the `keep` newest steps plus the one `latest` names and `protect`: after a run restarted at a lower step
    (e.g. with --resume false in an old --out), "newest by step" alone would delete the checkpoint just written."""
    named, _ = _read_latest(root)
    keep_names = set(protect) | ({named.name} if named is not None else set())
    for old in step_checkpoints(root)[max(1, keep):]:
        if old.name not in keep_names:
            shutil.rmtree(old, ignore_errors=True)


def _read_latest(root: Path) -> tuple[Path | None, str | None]:
    """(the checkpoint dir `latest` names, None) or (None, what is wrong with the marker); (None, None) if absent."""
    marker = root / LATEST
    if not marker.exists():
        return None, None
    try:
        name = marker.read_bytes().decode("utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        return None, f"{marker} is unreadable ({type(e).__name__})"
    # Only a sibling step_N directory: the marker is data from disk, never a path to follow anywhere else.
    if not _STEP_DIR.fullmatch(name):
        return None, f"{marker} does not name a step_N checkpoint (it holds {name[:60]!r})"
    if not (root / name).is_dir():
        return None, f"{marker} names {name}, which does not exist"
    return root / name, None


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The checkpoint directory `checkpoints/latest` names, if the marker is sound (not verified; see resume_point)."""
    return _read_latest(Path(out_dir) / "checkpoints")[0]


def resume_point(out_dir: str | Path, warn: Callable[[str], None] = print_warning) -> tuple[Path, dict] | None:
    """The verified checkpoint to resume from and its state, or None when `out_dir` holds no checkpoint at all.

    `latest` is tried first; if it is missing or broken, or its checkpoint fails verification, the newest intact
    checkpoint is used and `warn` says which and why. A directory that holds checkpoints but no intact one raises
    CheckpointError (listing each refusal) rather than quietly starting at step 0 over an old run."""
    root = Path(out_dir) / "checkpoints"
    named, problem = _read_latest(root)
    candidates = step_checkpoints(root)
    if named is not None:
        candidates = [named] + [p for p in candidates if p != named]
    elif problem is None and candidates:
        problem = f"{root / LATEST} is missing"
    if problem is None and not candidates:
        return None
    refused = []
    for path in candidates:
        try:
            state = load_training_state(path)
        except CheckpointError as e:
            refused.append(str(e))
            warn(f"refusing checkpoint {path.name}: {e}")
            continue
        if path != named:
            warn(f"{problem or f'{root / LATEST} names a damaged checkpoint'}; resuming from the newest intact "
                 f"checkpoint {path}")
        return path, state
    reasons = "; ".join(refused) if refused else problem
    raise CheckpointError(
        f"no intact checkpoint to resume from in {root} ({reasons}). Restore the damaged files, or start over in a "
        "new --out (or with --resume false)"
    )


def load_training_state(path: str | Path) -> dict:
    """A checkpoint's state, verified against its manifest; never unpickles anything that could run code."""
    path = Path(path)
    d = path if path.is_dir() else path.parent
    if (d / MANIFEST).exists() or (d / TENSORS).exists():
        return read_state(d)
    legacy = d / LEGACY_STATE
    if legacy.is_file():
        return _load_legacy(legacy)
    raise CheckpointError(f"no training checkpoint in {d} ({MANIFEST} is missing); pass a checkpoints/step_N "
                          "directory")


def _load_legacy(f: Path) -> dict:
    """`state.pt` from before the safetensors format: restricted unpickling, the allow-list being exactly the numpy
    types an RNG state holds, so a crafted file fails instead of running code. It has no checksums to verify."""
    allowed = [np.ndarray, np.dtype, np.dtypes.UInt32DType, _np_reconstruct]
    try:
        with torch.serialization.safe_globals(allowed):
            state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same thing here
        first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{f} is not a loadable training state ({type(e).__name__}: {first[:300]}); it is "
                              "either damaged or holds objects other than tensors and RNG states") from e
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{f} does not hold a training state")
    print_warning(f"{f} is in the old pickle format without checksums (loaded with weights_only); the next save "
                  "writes the verified format")
    return state


def export_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official-layout tensors: the MTP block's shared embed/head dropped (as the release's convert.py does)."""
    return {
        name: t for name, t in state.items()
        if not (name.startswith("mtp.") and (".emb" in name or name.endswith("head.weight")))
    }


def export_model(
    state: dict[str, torch.Tensor],
    config: dict,
    out_dir: str | Path,
    tokenizer_dir: str | Path | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> Path:
    """Published layout via the loader's writer (model/checkpoint_io.py), plus the tokenizer files."""
    from dsv4.model.checkpoint_io import save_checkpoint

    out = save_checkpoint(out_dir, export_state(state), config, quantize=False, dtype=dtype)
    if tokenizer_dir is not None:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            src = Path(tokenizer_dir) / name
            if src.is_file() and src.resolve() != (out / name).resolve():
                shutil.copyfile(src, out / name)
    return out
