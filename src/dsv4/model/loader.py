"""``load_model``: build a DeepSeek-V4 ``Transformer`` on the meta device, then stream its weights in from safetensors.

Accepted checkpoints (the layout is detected from the tensor names):

* the published layout (architecture.md sec. 12): official names, FP8 e4m3 + ``.scale`` / packed FP4 + ``.scale``
  / bf16 / fp32 / int tensors, one file or shards with ``model.safetensors.index.json`` (also what
  ``checkpoint_io.save_checkpoint`` writes);
* checkpoints written by transformers' ``DeepseekV4ForCausalLM.save_pretrained``: with ``save_original_format=False``
  the transformers names (``model.`` prefix, merged ``experts.gate_up_proj`` / ``down_proj``), mapped through
  ``hf_mapping``'s one table; with the default ``save_original_format=True`` transformers writes a mix (official
  names under ``model.``, a few transformers names left over, ``attn.kv_norm`` written as ``attn.norm``), which
  ``_hf_saved_name`` folds back. transformers has no MTP, so such a checkpoint holds none and the model is built
  without it (a warning says so).

Loading order: headers of every shard are validated first (missing shard, truncation, unknown dtype), then the
name/shape/dtype plan is checked against the meta model in full (missing, unexpected, wrong shape, unconvertible
dtype, config mismatch) before a single byte of weight data is read. Then each stored tensor is read through a
private mmap, copied as stored (packed FP8 / FP4 weights and their scales, the default ``weights="stored"``; the routed
experts into one stacked block per layer, ``MoE.hold_stacked``), quantised (``weights="fp8"/"fp4"/"packed"`` on a plain
checkpoint) or dequantised / converted (``"dequantized"``) straight into a freshly allocated parameter on the target
device, and its file pages are dropped, so peak memory stays near the size of the loaded model
(tests/model/test_loader_memory.py, tests/model/test_packed_memory.py).
Every parameter and buffer is checked to be materialised at the end: never a half-loaded model.

Deliberately not here: the file formats (checkpoint_io.py, quant.py) and the model (transformer.py).
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dsv4.config import ModelConfig
from dsv4.model import hf_mapping, quant
from dsv4.model.checkpoint_io import CONFIG_NAME, CheckpointError, SafetensorsFile, find_weight_files, tensor_kind

if TYPE_CHECKING:
    from dsv4.model.transformer import Transformer

log = logging.getLogger(__name__)

_LAYER_RE = re.compile(r"^(?:layers|mtp)\.(\d+)\.")
_EXPERT_RE = re.compile(r"\.ffn\.experts\.(\d+)\.")
# convert.py drops these: the MTP block shares the main model's embedding and head (architecture.md sec. 10).
_SHARED_MTP_RE = re.compile(r"^mtp\.\d+\.(.*emb.*|(.*\.)?head\.weight)$")
_MAX_LISTED = 6
_CHUNK_BYTES = 8 * 2**20  # file bytes copied per step while streaming one tensor
# How load_model holds the projection weights (its docstring).
WEIGHT_MODES = ("stored", "dequantized", "fp8", "fp4", "packed")
HEAD_DTYPES = (torch.float32, torch.bfloat16, torch.float8_e4m3fn)  # fp32 as published; the others: the docstring


@dataclass(frozen=True)
class _Source:
    """Where one official tensor comes from: a stored tensor (+ its ue8m0 scale), or a strided view of one."""

    file: Path
    key: str
    scale_key: str | None = None
    scale_file: Path | None = None
    view: tuple[tuple[int, ...], tuple[int, ...], int] | None = None  # (shape, stride, offset) into the stored tensor


def _hf_saved_name(name: str) -> str:
    """Official name of a tensor from transformers' default ``save_pretrained`` (``save_original_format=True``).

    transformers reverses its own rename table on save, which restores official names under the ``model.`` prefix
    except for the anchored ones (``embed_tokens`` / ``hc_head`` / ``norm``, which ``hf_mapping`` knows) and turns
    the attention's ``kv_norm`` into ``norm`` (its forward rule ``.norm. -> .kv_norm.`` also covers compressors).
    """
    stripped = name[len("model."):] if name.startswith("model.") else name
    if re.fullmatch(r"layers\.\d+\.attn\.norm\.weight", stripped):
        return stripped.replace(".attn.norm.", ".attn.kv_norm.")
    return stripped


def _view_geometry(view: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    return tuple(view.shape), tuple(view.stride()), view.storage_offset()


def _plan_sources(files: dict[str, Path], opened: dict[Path, SafetensorsFile]) -> tuple[dict[str, _Source], bool]:
    """Map every official tensor name to its stored source; returns (plan, is_transformers_layout)."""
    # `<w>.scale` is a quantisation scale only next to a `<w>.weight` (transformers' `attn_hc.scale` is a parameter)
    names = [n for n in files if not (n.endswith(".scale") and n[: -len("scale")] + "weight" in files)]
    hf = hf_mapping.is_hf_layout(names)
    plan: dict[str, _Source] = {}

    def add(official: str, src: _Source, stored: str) -> None:
        if official in plan:
            raise CheckpointError(
                f"tensors {plan[official].key!r} ({plan[official].file}) and {stored!r} ({src.file}) both map to "
                f"{official!r}: the checkpoint mixes two layouts; re-export it from one source"
            )
        plan[official] = src

    for stored in names:
        file = files[stored]
        entry = opened[file].entries.get(stored)
        if entry is None:
            raise CheckpointError(
                f"{file} does not hold tensor {stored!r} although the index lists it there: the shard and the index "
                f"come from different exports; re-download the checkpoint"
            )
        scale_key = stored[: -len("weight")] + "scale" if stored.endswith(".weight") else None
        if scale_key is not None and scale_key not in files:
            scale_key = None
        if not hf:
            if _SHARED_MTP_RE.match(stored):
                continue
            add(stored, _Source(file, stored, scale_key, files.get(scale_key) if scale_key else None), stored)
            continue
        if scale_key is not None:
            raise CheckpointError(
                f"tensor {stored!r} in {file} is quantised in a transformers-layout checkpoint; dsv4 reads quantised "
                f"weights only in the published layout. Save the transformers model unquantised."
            )
        meta = torch.empty(entry.shape, dtype=entry.dtype, device="meta")
        try:
            mapped = hf_mapping.hf_to_official(stored, meta)
        except KeyError:
            mapped = [(_hf_saved_name(stored), meta)]
        for official, view in mapped:
            geometry = None if view is meta else _view_geometry(view)
            add(official, _Source(file, stored, view=geometry), stored)
    return plan, hf


def _stored_shape(src: _Source, opened: dict[Path, SafetensorsFile]) -> tuple[tuple[int, ...], torch.dtype]:
    entry = opened[src.file].entries[src.key]
    if src.view is not None:
        return src.view[0], entry.dtype
    if src.scale_key is not None and quant.is_packed_fp4(entry.dtype):
        return (entry.shape[0], 2 * entry.shape[1]), entry.dtype
    return entry.shape, entry.dtype


def _describe(names: Iterable[str], plan: dict[str, _Source] | None = None) -> str:
    names = sorted(names)
    shown = [f"{n!r}" + (f" ({plan[n].file.name})" if plan and n in plan else "") for n in names[:_MAX_LISTED]]
    more = f" and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else ""
    return ", ".join(shown) + more


def _max_index(names: Iterable[str], pattern: re.Pattern[str]) -> int:
    found = [int(m.group(1)) for n in names if (m := pattern.search(n))]
    return max(found) if found else -1


def _config_hint(
    config: ModelConfig, held: set[str], missing: set[str], unexpected: set[str], config_path: Path
) -> str:
    """Name the config.json key that most likely disagrees with the weights."""
    hints = []
    extra_layer = _max_index((n for n in unexpected if n.startswith("layers.")), _LAYER_RE)
    if extra_layer >= config.num_hidden_layers:
        hints.append(f"the checkpoint holds layers up to {extra_layer} but {config_path.name} says "
                     f"num_hidden_layers={config.num_hidden_layers}")
    held_layers = {int(m.group(1)) for n in held if n.startswith("layers.") and (m := _LAYER_RE.search(n))}
    if held_layers and max(held_layers) < config.num_hidden_layers - 1:
        hints.append(f"the checkpoint holds layers 0..{max(held_layers)} only but {config_path.name} says "
                     f"num_hidden_layers={config.num_hidden_layers}")
    extra_expert = _max_index(unexpected, _EXPERT_RE)
    if extra_expert >= config.n_routed_experts:
        hints.append(f"the checkpoint holds experts up to {extra_expert} but {config_path.name} says "
                     f"n_routed_experts={config.n_routed_experts}")
    if _max_index(missing, _EXPERT_RE) == config.n_routed_experts - 1:
        hints.append(f"the checkpoint holds fewer experts than {config_path.name}'s "
                     f"n_routed_experts={config.n_routed_experts}")
    if hints:
        return " Likely cause: " + "; ".join(hints) + f". Fix {config_path} to match the weights."
    return ""


def _check_plan(
    plan: dict[str, _Source], expected: dict[str, torch.Tensor], opened: dict[Path, SafetensorsFile],
    config: ModelConfig, config_path: Path,
) -> None:
    """Every problem of the checkpoint against the meta model, raised together before any data is read."""
    missing = set(expected) - set(plan)
    unexpected = set(plan) - set(expected)
    problems: list[str] = []
    if missing:
        problems.append(f"missing tensors {_describe(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors {_describe(unexpected, plan)}")
    shape_errors = []
    for name in sorted(set(plan) & set(expected)):
        problem = _tensor_problem(name, plan[name], expected[name], opened)
        if problem is not None:
            is_shape, message = problem
            (shape_errors if is_shape else problems).append(message)
    if len(problems) > 2 * _MAX_LISTED:
        problems[2 * _MAX_LISTED :] = [f"... and {len(problems) - 2 * _MAX_LISTED} more problems"]
    if shape_errors:
        problems.extend(shape_errors[:_MAX_LISTED])
        if len(shape_errors) > _MAX_LISTED:
            problems.append(f"... and {len(shape_errors) - _MAX_LISTED} more wrong shapes")
    if problems:
        hint = _config_hint(config, set(plan), missing, unexpected, config_path)
        if shape_errors and not hint:
            hint = (f" {config_path} probably does not match the weights (e.g. hidden_size, head_dim, vocab_size, "
                    f"moe_intermediate_size): fix it, or use the config.json that came with these weights.")
        raise CheckpointError(
            f"checkpoint {config_path.parent} does not fit the model built from {config_path}: "
            + "; ".join(problems) + "." + hint
        )


def _convertible(stored: torch.dtype, param: torch.dtype) -> bool:
    """Plain (unscaled) conversions the loader does: float -> float (1-byte floats need a scale), int -> int."""
    if param.is_floating_point:
        return stored.is_floating_point and stored.itemsize >= 2
    if param == torch.bool:
        return stored == torch.bool
    return not stored.is_floating_point and not stored.is_complex and stored != torch.bool


def _tensor_problem(
    name: str, src: _Source, param: torch.Tensor, opened: dict[Path, SafetensorsFile]
) -> tuple[bool, str] | None:
    """(is_a_wrong_weight_shape, message) for what is wrong with one stored tensor (+ scale) as the source of the
    model's ``name``, or None. Wrong weight shapes are told apart because they usually mean a wrong config.json."""
    shape, dtype = _stored_shape(src, opened)
    where = f"tensor {src.key!r} in {src.file}"
    if src.scale_key is not None:
        scale = opened[src.scale_file]
        s_entry = scale.entries.get(src.scale_key)
        if s_entry is None:
            return False, f"{scale.path} does not hold {src.scale_key!r} although the index lists it there"
        if not (quant.is_fp8(dtype) or quant.is_packed_fp4(dtype)):
            return False, f"{where} has a .scale but dtype {dtype} (expected float8_e4m3fn or int8-packed FP4)"
        if s_entry.dtype not in (torch.float8_e8m0fnu, torch.uint8):
            return False, f"scale {src.scale_key!r} in {scale.path} is {s_entry.dtype}, expected float8_e8m0fnu"
        entry = opened[src.file].entries[src.key]
        want = quant.fp8_scale_shape(entry.shape) if quant.is_fp8(dtype) else quant.fp4_scale_shape(entry.shape)
        if tuple(s_entry.shape) != want:
            return False, (f"scale {src.scale_key!r} in {scale.path} has shape {list(s_entry.shape)}, the weight "
                    f"{list(entry.shape)} needs {list(want)}")
        if not param.is_floating_point():
            return False, f"{where} is a quantised float weight but the model's {name!r} is {param.dtype}"
    elif not _convertible(dtype, param.dtype):
        needs_scale = quant.is_packed_fp4(dtype) or (dtype.is_floating_point and dtype.itemsize == 1)
        hint = " (a quantised weight whose .scale tensor is missing?)" if needs_scale else ""
        return False, f"{where} is {dtype}, which cannot be converted to the model's {param.dtype}{hint}"
    if tuple(shape) != tuple(param.shape):
        return True, f"{where} has shape {list(shape)}, the model expects {list(param.shape)} for {name!r}"
    return None


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if leaf in module._parameters:
        old = module._parameters[leaf]
        # setattr, not _parameters: a Linear notes that its weight changed (moe.py's stacked experts)
        setattr(module, leaf, nn.Parameter(value, requires_grad=old.requires_grad if old is not None else False))
    else:
        module._buffers[leaf] = value


def _build_model(config: ModelConfig, dtype: torch.dtype, options: dict[str, Any]) -> Transformer:
    from dsv4.model.transformer import Transformer

    with torch.device("meta"):
        return Transformer(config, dtype=dtype, **options)


def load_model(
    path: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    *,
    progress: bool = True,
    weights: str = "stored",
    head_dtype: torch.dtype = torch.float32,
    **model_options: Any,
) -> Transformer:
    """Load a DeepSeek-V4 checkpoint directory into a ``Transformer`` in eval mode (see the module docstring).

    ``dtype`` is the compute dtype (bf16 or fp32); parameters the model keeps in fp32 by design stay fp32.
    ``weights`` says how the projection weights are held (``WEIGHT_MODES``): ``"stored"`` (default) keeps FP8 / FP4
    weights packed as the checkpoint stores them, ``"dequantized"`` dequantises them into ``dtype`` at load (the
    behaviour before packed weights; needed to train them), ``"fp8"`` / ``"fp4"`` / ``"packed"`` additionally
    quantise a bf16/fp32 checkpoint at load with the release's rules (FP8 for the dense projections the release
    stores in FP8, FP4 for the routed experts, or both). ``head_dtype=torch.bfloat16`` stores the fp32 output head
    in bf16 (half its memory and read bandwidth; the logits change by the head's rounding);
    ``head_dtype=torch.float8_e4m3fn`` quantises it to FP8 e4m3 with ue8m0 128x128 block scales, the format of the
    release's dense projections (a quarter of its memory and bandwidth, about what llama.cpp's Q8_0 head costs; the
    logits change by the FP8 rounding, a relative error up to 2^-4 per weight).
    ``progress=False`` hides the progress bar. ``model_options`` go to ``Transformer(config, ...)``.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype.itemsize < 2:
        raise ValueError(f"load_model: dtype must be a compute dtype such as torch.bfloat16 or torch.float32, "
                         f"got {dtype!r}")
    if weights not in WEIGHT_MODES:
        raise ValueError(f"load_model: weights must be one of {', '.join(map(repr, WEIGHT_MODES))}, got {weights!r}")
    if head_dtype not in HEAD_DTYPES:
        raise ValueError(f"load_model: head_dtype must be torch.float32 (as published), torch.bfloat16 or "
                         f"torch.float8_e4m3fn (FP8 with 128x128 block scales), got {head_dtype!r}")
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(
            f"{root} is not a directory; pass the checkpoint directory (with config.json and weights)"
        )
    config_path = root / CONFIG_NAME
    if not config_path.is_file():
        raise CheckpointError(f"{root} has no {CONFIG_NAME}; a dsv4 checkpoint directory needs the model's config.json "
                              f"next to its .safetensors files")
    try:
        config = ModelConfig.from_json(config_path)
    except ValueError as e:
        raise CheckpointError(f"{config_path}: {e}") from e
    device = torch.device(device)

    files = find_weight_files(root)
    opened: dict[Path, SafetensorsFile] = {}
    try:
        for file in dict.fromkeys(files.values()):
            opened[file] = SafetensorsFile(file)  # validates the header against the file size
        plan, hf = _plan_sources(files, opened)
        if config.num_nextn_predict_layers > 0 and not any(n.startswith("mtp.") for n in plan):
            log.warning("%s holds no MTP (mtp.*) weights%s; building the model without the MTP block", root,
                        " (transformers does not save it)" if hf else "")
            config = config.replace(num_nextn_predict_layers=0)
        model = _build_model(config, dtype, model_options)
        if head_dtype == torch.bfloat16:
            model.head.weight = nn.Parameter(torch.empty_like(model.head.weight, dtype=head_dtype),
                                             requires_grad=model.head.weight.requires_grad)
        expected = dict(model.state_dict(keep_vars=True))
        _check_plan(plan, expected, opened, config, config_path)
        formats = _packed_formats(model, plan, opened, weights)
        _stream(model, plan, expected, opened, device, progress, formats)
    finally:
        for f in opened.values():
            f.close()
    _check_materialised(model, root)
    if head_dtype == torch.float8_e4m3fn:
        _quantize_head(model.head)
    return model.eval()


def _quantize_head(head: nn.Linear, rows: int = 64 * quant.FP8_BLOCK) -> None:
    """The loaded head in FP8 (``quant.quantize_fp8``, the release's rules), a band of ``rows`` rows at a time so that
    the quantiser's fp32 temporaries stay one band's size (134 MB at V4-Flash's width), not the vocabulary's;
    ``ops.linear`` reads weight + ``scale``."""
    w = head.weight.data
    q = torch.empty(w.shape, dtype=torch.float8_e4m3fn, device=w.device)
    scale = torch.empty(quant.fp8_scale_shape(w.shape), dtype=torch.float8_e8m0fnu, device=w.device)
    for r0 in range(0, w.shape[0], rows):
        q[r0:r0 + rows], scale[r0 // quant.FP8_BLOCK:(r0 + rows) // quant.FP8_BLOCK] = quant.quantize_fp8(
            w[r0:r0 + rows])
    head.weight = nn.Parameter(q, requires_grad=False)
    head.register_buffer("scale", scale)


def _stream(
    model: nn.Module, plan: dict[str, _Source], expected: dict[str, torch.Tensor],
    opened: dict[Path, SafetensorsFile], device: torch.device, progress: bool, formats: dict[str, str],
) -> None:
    """Read each stored tensor once, in file order, into every parameter it feeds (packed as ``formats`` says);
    then drop its pages."""
    from tqdm.auto import tqdm

    _hold_stacked_experts(model, formats, device)
    by_stored: dict[tuple[Path, str], list[str]] = defaultdict(list)
    for name, src in plan.items():
        by_stored[(src.file, src.key)].append(name)
    order = sorted(by_stored, key=lambda k: (str(k[0]), opened[k[0]].entries[k[1]].begin))
    total = sum(opened[f].entries[k].end - opened[f].entries[k].begin for f, k in order)
    with tqdm(total=total, unit="B", unit_scale=True, desc="loading weights", disable=not progress) as bar:
        for file, key in order:
            f = opened[file]
            stored = f.tensor(key)
            for name in by_stored[(file, key)]:
                src, param = plan[name], expected[name]
                if name in formats:
                    _fill_packed(model, name, formats[name], src, stored, opened, device)
                    continue
                held = _held_slice(model, name, param)
                out = held if held is not None else torch.empty(param.shape, dtype=param.dtype, device=device)
                if src.view is not None:
                    out.copy_(stored.as_strided(*src.view))
                elif src.scale_key is None:
                    _fill_chunked(out, stored, None, f, key)
                else:
                    scale_f = opened[src.scale_file]
                    try:
                        _fill_chunked(out, stored, scale_f.tensor(src.scale_key), f, key)
                    except quant.QuantFormatError as e:
                        raise CheckpointError(f"tensor {key!r} in {file}: {e}") from None
                    scale_f.release(src.scale_key)
                if held is None:
                    _set_tensor(model, name, out)
            del stored
            f.release(key)
            bar.update(f.entries[key].end - f.entries[key].begin)


def _packed_formats(model: nn.Module, plan: dict[str, _Source], opened: dict[Path, SafetensorsFile], mode: str
                    ) -> dict[str, str]:
    """Official weight name -> "fp8" / "fp4" for every projection weight held packed under ``mode``: stored
    quantised weights keep their format (unless "dequantized"); plain ones are quantised where the mode asks for the
    format the release uses for that name (checkpoint_io.tensor_kind). Only ``Linear`` modules hold packed weights;
    anything else quantised in a checkpoint is dequantised as before."""
    from dsv4.model.linear import Linear

    if mode == "dequantized":
        return {}
    wanted = {"stored": (), "fp8": ("fp8",), "fp4": ("fp4",), "packed": ("fp8", "fp4")}[mode]
    formats = {}
    for name, src in plan.items():
        module_name, _, leaf = name.rpartition(".")
        if leaf != "weight" or not isinstance(model.get_submodule(module_name), Linear):
            continue
        if src.scale_key is not None:
            dtype = opened[src.file].entries[src.key].dtype
            formats[name] = "fp8" if quant.is_fp8(dtype) else "fp4"
        elif tensor_kind(name) in wanted:
            formats[name] = tensor_kind(name)
    return formats


def _hold_stacked_experts(model: nn.Module, formats: dict[str, str], device: torch.device) -> None:
    """Stacked storage (MoE.hold_stacked) for every MoE whose routed experts are all held in FP4 or all plain,
    allocated before loading so the experts are read straight into their slices (no second copy)."""
    from dsv4.model.moe import MoE

    for prefix, module in model.named_modules():
        if isinstance(module, MoE):
            names = [f"{prefix}.experts.{e}.{w}.weight" for e in range(module.n_experts) for w in ("w1", "w2", "w3")]
            kinds = {formats.get(n) for n in names}
            if kinds == {"fp4"} and module.can_stack_fp4():
                module.hold_stacked(device)
            elif kinds == {None}:
                module.hold_stacked(device, module.experts[0].w1.weight.dtype)


def _held_slice(model: nn.Module, name: str, param: torch.Tensor) -> torch.Tensor | None:
    """The tensor already allocated for ``name`` (a slice of a stacked expert block) when it matches ``param``."""
    module_name, _, leaf = name.rpartition(".")
    held = (model.get_submodule(module_name) if module_name else model)._parameters.get(leaf)
    if held is None or held.is_meta or held.shape != param.shape or held.dtype != param.dtype:
        return None
    return held.data


def _fill_packed(model: nn.Module, name: str, fmt: str, src: _Source, stored: torch.Tensor,
                 opened: dict[Path, SafetensorsFile], device: torch.device) -> None:
    """Hold ``name`` packed: the stored bytes and scale copied as they are, or a plain stored weight quantised
    with the release's rules (quant.quantize_fp8 / quantize_fp4: one weight's fp32 copy as temporary)."""
    module = model.get_submodule(name.rpartition(".")[0])
    if src.scale_key is not None:
        weight = stored.view(torch.int8) if fmt == "fp4" else stored
        scale_f = opened[src.scale_file]
        scale = scale_f.tensor(src.scale_key).view(torch.float8_e8m0fnu)
        try:  # the format's own check (no NaN scale byte) before the bytes are kept
            quant.e8m0_to_float(scale)
        except quant.QuantFormatError as e:
            raise CheckpointError(f"tensor {src.key!r} in {src.file}: {e}") from None
    else:
        value = stored.as_strided(*src.view) if src.view is not None else stored
        try:
            weight, scale = quant.quantize_fp8(value) if fmt == "fp8" else quant.quantize_fp4(value)
        except quant.QuantFormatError as e:
            raise CheckpointError(f"cannot quantise {name!r} to {fmt} at load: {e}; load with "
                                  f"weights='stored' or 'dequantized'") from None
        scale_f = None
    held = _held_slice(model, name, weight)
    if held is not None:
        held.copy_(weight)  # a slice of the MoE's stacked FP4 storage
        module.scale.data.copy_(scale)
    else:
        module.set_packed(weight.to(device, copy=True), scale.to(device, copy=True))
    if scale_f is not None:
        scale_f.release(src.scale_key)


def _fill_chunked(out: torch.Tensor, stored: torch.Tensor, scale: torch.Tensor | None, f: SafetensorsFile,
                  key: str) -> None:
    """Copy / dequantise ``stored`` into ``out`` a few MB of rows at a time, dropping each chunk's file pages after
    use, so a tensor that is a large part of the model (the head, the embedding) never sits in memory twice."""
    entry = f.entries[key]
    if stored.dim() == 0 or stored.numel() == 0:
        out.copy_(stored if scale is None else quant.dequantize(stored, scale, out.dtype))
        return
    rows = stored.shape[0]
    row_bytes = (entry.end - entry.begin) // rows
    step = max(1, _CHUNK_BYTES // row_bytes)
    fp8 = scale is not None and quant.is_fp8(stored)
    if fp8:  # FP8 scales cover 128-row blocks: chunks must start on a block boundary
        step = -(-step // quant.FP8_BLOCK) * quant.FP8_BLOCK
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        if scale is None:
            out[r0:r1].copy_(stored[r0:r1])
        else:
            # Dequantise on the target device (a no-op move on CPU): the raw bytes are 2-4x smaller than the result.
            rows_scale = scale[r0 // quant.FP8_BLOCK : -(-r1 // quant.FP8_BLOCK)] if fp8 else scale[r0:r1]
            quant.dequantize(stored[r0:r1].to(out.device), rows_scale.to(out.device), out.dtype, out=out[r0:r1])
        f.release_bytes(entry.begin + r0 * row_bytes, entry.begin + r1 * row_bytes)


def _meta_attributes(model: nn.Module) -> list[str]:
    """Plain tensors held as module attributes (or one object deep, e.g. a RoPE table holder) left on meta."""
    left = []
    for mod_name, module in model.named_modules():
        for attr, value in vars(module).items():
            if attr.startswith("_") and attr in ("_parameters", "_buffers", "_modules"):
                continue
            holders = [(attr, value)]
            if not isinstance(value, (torch.Tensor, nn.Module)) and hasattr(value, "__dict__"):
                holders += [(f"{attr}.{k}", v) for k, v in vars(value).items()]
            left += [f"{mod_name}.{k}".lstrip(".") for k, v in holders if isinstance(v, torch.Tensor) and v.is_meta]
    return left


def _check_materialised(model: nn.Module, root: Path) -> None:
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    left += _meta_attributes(model)
    if left:
        raise CheckpointError(
            f"loading {root} left {len(left)} tensor(s) unmaterialised ({_describe(left)}); the model defines state "
            f"the loader cannot fill. This is a dsv4 bug: report it with the checkpoint's config.json."
        )
