"""Training checkpoints (exact resume) and export in the published DeepSeek-V4 layout.

A training checkpoint is one directory `step_{N}/` holding `state.pt`: model + optimizer state dicts (full, unsharded,
so a run can resume on a different number of ranks), the data loader position, every RNG state and the step. It is
written to a temporary directory and renamed into place, and `latest` is replaced atomically afterwards, so a crash
mid-save never leaves a checkpoint that looks complete but is not.

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
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

LATEST = "latest"


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
    state = {"step": step, "model": model_sd, **optim_fields, "rng": rng_state(), **extra}
    torch.save(state, tmp / "state.pt")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    link_tmp = root / f".{LATEST}.tmp"
    link_tmp.write_text(final.name)
    os.replace(link_tmp, root / LATEST)
    # keep the newest `keep` checkpoints
    for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    marker = Path(out_dir) / "checkpoints" / LATEST
    if not marker.is_file():
        return None
    path = marker.parent / marker.read_text().strip()
    return path if (path / "state.pt").is_file() else None


def load_training_state(path: str | Path) -> dict:
    path = Path(path)
    f = path / "state.pt" if path.is_dir() else path
    if not f.is_file():
        raise FileNotFoundError(f"no training checkpoint at {f}; pass a checkpoints/step_N directory")
    # weights_only=False: the state holds numpy / python RNG states, written by this trainer.
    return torch.load(f, map_location="cpu", weights_only=False)


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
