"""Training configuration: one dataclass tree, read from TOML/YAML/JSON and overridable on the command line.

Every key of `TrainConfig`, `OptimConfig` ([optim]) and `LossConfig` ([loss]) is also an option: `--steps 100`,
`--lr 3e-4`, `--mtp-weight 0.1`. A config file may use the sections or flat keys; unknown keys are errors.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsv4.train.loss import LossConfig
from dsv4.train.optim import OptimConfig


@dataclass
class TrainConfig:
    # model
    model_config: str = ""  # path to a config.json (or a checkpoint dir holding one)
    init_from: str = ""  # checkpoint dir to fine-tune from (weights loaded with dsv4.load_model); "" = random init
    # data
    data: list[str] = field(default_factory=list)
    tokenizer: str = ""  # dir with tokenizer.json; "" = official V4 tokenizer if vocab 129280, else train a BPE here
    data_split: str = "file"  # "file" or "blank_line" (how a text file is cut into documents)
    seq_len: int = 256
    tokens_per_batch: int = 2048  # input tokens per micro-batch (several packed sequences)
    grad_accum: int = 1
    heldout_fraction: float = 0.02
    # run
    out: str = "runs/dsv4"
    steps: int = 100
    seed: int = 0
    dtype: str = "float32"  # "float32" or "bfloat16" (autocast; weights and optimizer state stay fp32)
    grad_clip: float = 1.0
    log_every: int = 10
    eval_every: int = 0  # 0 = only at the end
    eval_batches: int = 8
    save_every: int = 0  # 0 = only at the end
    resume: bool = True  # continue from out/checkpoints/latest if it exists
    export: bool = True
    export_dtype: str = "bfloat16"
    progress: bool = True
    threads: int = 0  # torch intra-op threads; 0 = torch default
    device: str = "cpu"  # "cpu" or "cuda" (under torchrun each rank takes cuda:LOCAL_RANK)
    expert_parallel: bool = False  # under torchrun: experts sharded over ranks (all-to-all), else FSDP2 sharding
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)


# ----------------------------------------------------------------------------------------------- config handling
def _sections() -> dict[str, type]:
    return {"optim": OptimConfig, "loss": LossConfig}


def config_from_dict(d: dict[str, Any]) -> TrainConfig:
    """Accept nested sections ([optim], [loss], [data], [run]) or flat keys; unknown keys are errors."""
    flat: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(v)
        else:
            flat[k] = v
    top = {f.name for f in dataclasses.fields(TrainConfig)} - set(_sections())
    kw: dict[str, Any] = {}
    sub: dict[str, dict[str, Any]] = {s: {} for s in _sections()}
    for k, v in flat.items():
        if k in top:
            kw[k] = v
            continue
        for s, cls in _sections().items():
            if k in {f.name for f in dataclasses.fields(cls)}:
                sub[s][k] = v
                break
        else:
            raise ValueError(f"unknown training config key {k!r}; known keys: {sorted(all_keys())}")
    if isinstance(kw.get("data"), str):
        kw["data"] = [kw["data"]]
    if "betas" in sub["optim"]:
        sub["optim"]["betas"] = tuple(sub["optim"]["betas"])
    return TrainConfig(**kw, **{s: cls(**sub[s]) for s, cls in _sections().items()})


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def all_keys() -> dict[str, dataclasses.Field]:
    keys = {f.name: f for f in dataclasses.fields(TrainConfig) if f.name not in _sections()}
    for cls in _sections().values():
        keys.update({f.name: f for f in dataclasses.fields(cls)})
    return keys


def _parse_value(raw: str, default: Any) -> Any:
    if isinstance(default, bool):
        if raw.lower() in {"1", "true", "yes", "on"}:
            return True
        if raw.lower() in {"0", "false", "no", "off"}:
            return False
        raise ValueError(f"expected true/false, got {raw!r}")
    if isinstance(default, int):
        return int(raw)
    if isinstance(default, float):
        return float(raw)
    if isinstance(default, tuple):
        return tuple(float(x) for x in raw.split(","))
    return raw


def read_config_file(path: Path) -> dict[str, Any]:
    """TOML (.toml), YAML (.yaml / .yml) or JSON (anything else)."""
    text = path.read_text()
    if path.suffix == ".toml":
        return tomllib.loads(text)
    if path.suffix in {".yaml", ".yml"}:
        try:
            import yaml
        except ImportError as e:
            raise ImportError("YAML training configs need PyYAML: pip install 'dsv4[train]'") from e
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(str(e)) from e
        if not isinstance(data, dict):
            raise ValueError("the YAML config must be a mapping of keys to values")
        return data
    return json.loads(text)


def parse_args(argv: list[str]) -> TrainConfig:
    p = argparse.ArgumentParser(
        prog="dsv4 train",
        description="Pre-train or fine-tune a DeepSeek-V4-architecture model. Every config key is also an option.",
    )
    p.add_argument("--config", type=Path, default=None, help="TOML or JSON training config")
    defaults = TrainConfig()
    flat_defaults = {**{k: getattr(defaults, k) for k in all_keys() if hasattr(defaults, k)},
                     **dataclasses.asdict(defaults.optim), **dataclasses.asdict(defaults.loss)}
    for key in all_keys():
        opt = "--" + key.replace("_", "-")
        if key == "data":
            p.add_argument(opt, nargs="+", default=None, help="text/JSONL files or directories")
        else:
            p.add_argument(opt, default=None, metavar=type(flat_defaults[key]).__name__.upper(),
                           help=f"(default {flat_defaults[key]!r})")
    args = p.parse_args(argv)
    base: dict[str, Any] = {}
    if args.config is not None:
        if not args.config.is_file():
            p.error(f"config file {args.config} does not exist")
        try:
            base = read_config_file(args.config)
        except ImportError as e:
            p.error(str(e))
        except ValueError as e:  # TOML, JSON and YAML parse errors all derive from ValueError
            p.error(f"cannot parse {args.config}: {e}")
    flat: dict[str, Any] = {}
    for k, v in base.items():
        flat.update(v if isinstance(v, dict) else {k: v})
    for key in all_keys():
        v = getattr(args, key)
        if v is None:
            continue
        try:
            flat[key] = v if key == "data" else _parse_value(v, flat_defaults[key])
        except ValueError as e:
            p.error(f"--{key.replace('_', '-')}: {e}")
    try:
        cfg = config_from_dict(flat)
    except (TypeError, ValueError) as e:
        p.error(str(e))
    if not cfg.model_config and not cfg.init_from:
        p.error("give the model: --model-config PATH/config.json (random init) or --init-from CHECKPOINT_DIR")
    if not cfg.data:
        p.error("give the training data: --data FILE_OR_DIR [...]")
    return cfg
