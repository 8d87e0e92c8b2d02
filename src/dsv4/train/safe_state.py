"""Training state on disk without pickle, written durably and verified before it is parsed.

A state is a tree of dicts, lists, tuples, str / int / float / bool / None, torch tensors and numpy arrays (model and
optimizer state dicts, RNG states, the data position). One directory holds it as three files:

    state.safetensors   every tensor of the tree, by a generated key
    state.json          the tree itself; tensors appear as {"__tensor__": key}, tuples / non-str-keyed dicts / numpy
                        arrays as tagged objects, so the tree comes back with the same types (exact resume needs
                        `random.setstate` to get tuples back and the optimizer its integer-keyed state)
    manifest.json       the format tag and each file's size and SHA-256, written last

Neither format can execute code when read (safetensors is a JSON header plus raw buffers), so a crafted run
directory can at worst fail to load. `read_state` checks every size and checksum against the manifest before it
parses a byte of the state, so a flipped or truncated file is refused with an error that names it instead of
loading as silently wrong weights.

Deliberately not here: authenticity. The checksums catch damage (disk, copy, a kill mid-write); someone who can
write the directory can also rewrite the manifest, which is harmless because nothing in it is executable.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

TENSORS, TREE, MANIFEST = "state.safetensors", "state.json", "manifest.json"
FORMAT = "dsv4-train-state/1"
_TAGS = ("__tensor__", "__tuple__", "__items__", "__ndarray__", "__float__")


class CheckpointError(ValueError):
    """A checkpoint file that is missing, damaged or not a dsv4 training state; the message names the file."""


# ----------------------------------------------------------------------------------------------- tree codec
def _encode(obj: Any, tensors: dict[str, torch.Tensor], seen: set[int]) -> Any:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        # safetensors refuses tensors that share storage (e.g. tied weights); a copy keeps each entry standalone.
        if t.numel() and t.untyped_storage().data_ptr() in seen:
            t = t.clone()
        if t.numel():
            seen.add(t.untyped_storage().data_ptr())
        key = f"t{len(tensors)}"
        tensors[key] = t
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": obj.dtype.str, "shape": list(obj.shape)}
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        # JSON has no inf / nan; tagged so that a state holding them (e.g. `max_norm=inf`) still round-trips.
        return obj if math.isfinite(obj) else {"__float__": repr(obj)}
    if isinstance(obj, np.generic):
        return _encode(obj.item(), tensors, seen)
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, seen) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors, seen) for v in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors, seen) for k, v in obj.items()}
        return {"__items__": [[_encode(k, tensors, seen), _encode(v, tensors, seen)] for k, v in obj.items()]}
    raise TypeError(f"cannot store a {type(obj).__name__} in a training state (only tensors, arrays and JSON types)")


def _decode(obj: Any, tensors: dict[str, torch.Tensor], where: Path) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors, where) for v in obj]
    if not isinstance(obj, dict):
        return obj
    tag = next((t for t in _TAGS if t in obj), None)
    if tag == "__tensor__":
        if obj["__tensor__"] not in tensors:
            raise CheckpointError(f"{where / TREE} refers to tensor {obj['__tensor__']!r}, which {TENSORS} lacks")
        return tensors[obj["__tensor__"]]
    if tag == "__ndarray__":
        return np.asarray(obj["__ndarray__"], dtype=np.dtype(obj["dtype"])).reshape(obj["shape"])
    if tag == "__float__":
        return float(obj["__float__"])
    if tag == "__tuple__":
        return tuple(_decode(v, tensors, where) for v in obj["__tuple__"])
    if tag == "__items__":
        return {_decode(k, tensors, where): _decode(v, tensors, where) for k, v in obj["__items__"]}
    return {k: _decode(v, tensors, where) for k, v in obj.items()}


# ----------------------------------------------------------------------------------------------- durable files
def fsync_dir(path: Path) -> None:
    """Make a rename / create inside `path` durable (POSIX: the directory entry lives in the directory)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_state(directory: str | Path, tree: dict) -> None:
    """Write `tree` into the (new, empty) `directory`; every file is fsynced, the manifest last."""
    from safetensors.torch import save_file

    d = Path(directory)
    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(tree, tensors, set())
    save_file(tensors, str(d / TENSORS))
    with open(d / TENSORS, "rb+") as f:
        os.fsync(f.fileno())
    write_durable(d / TREE, json.dumps(encoded, allow_nan=False).encode())
    files = {name: {"bytes": (d / name).stat().st_size, "sha256": _digest(d / name)} for name in (TENSORS, TREE)}
    write_durable(d / MANIFEST, json.dumps({"format": FORMAT, "files": files}, indent=1).encode())
    fsync_dir(d)


def verify_state(directory: str | Path) -> None:
    """Raise CheckpointError naming the first file that is missing or differs from the manifest."""
    d = Path(directory)
    mf = d / MANIFEST
    if not mf.is_file():
        raise CheckpointError(f"{mf} is missing: the checkpoint is incomplete (a save was interrupted?)")
    try:
        manifest = json.loads(mf.read_bytes())
        files = manifest["files"]
        ok = manifest.get("format") == FORMAT and set(files) == {TENSORS, TREE}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{mf} is damaged ({type(e).__name__}: {e})") from e
    if not ok:
        raise CheckpointError(f"{mf} is not a {FORMAT} manifest; this directory was not written by this trainer")
    for name in (TENSORS, TREE):
        f, want = d / name, files[name]
        if not f.is_file():
            raise CheckpointError(f"{f} is missing; the checkpoint is incomplete")
        size = f.stat().st_size
        if size != want.get("bytes"):
            raise CheckpointError(f"{f} has {size} bytes but the manifest records {want.get('bytes')}: truncated or "
                                  "overwritten")
        if _digest(f) != want.get("sha256"):
            raise CheckpointError(f"{f} fails its SHA-256 check against {mf}: the file is damaged")


def read_state(directory: str | Path) -> dict:
    """Verify, then load. Only safetensors and JSON are parsed, so no file content is ever executed."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = Path(directory)
    verify_state(d)
    try:
        tensors = load_file(str(d / TENSORS), device="cpu")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{d / TENSORS} cannot be read as safetensors ({e})") from e
    try:
        tree = json.loads((d / TREE).read_bytes())
    except ValueError as e:
        raise CheckpointError(f"{d / TREE} is not valid JSON ({e})") from e
    try:
        state = _decode(tree, tensors, d)
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{d / TREE} does not describe a training state ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{d / TREE} does not describe a training state (top level is not an object)")
    return state
