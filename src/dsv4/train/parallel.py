"""Data parallelism for training, applied from outside to the unchanged single-device model (torchtitan style).

Under `torchrun` (WORLD_SIZE > 1) the process group is created here (gloo on CPU, NCCL on CUDA) and the model is
wrapped with FSDP2 `fully_shard`: each transformer block (and MTP block) is its own unit, then the root, so
parameters, gradients and optimizer state are sharded over the ranks and gathered one block at a time.

The process group is passed around implicitly only through torch.distributed's default group; no module globals.

Expert parallelism (`--expert-parallel true`: experts sharded by index, tokens dispatched with all-to-all) is the
alternative in expert_parallel.py; the two are not combined.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: str = "cpu") -> None:
    """Start the default process group when launched by torchrun with more than one process (NCCL for CUDA)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    if device.startswith("cuda"):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")


def local_device(device: str) -> torch.device:
    """The device this process trains on: cuda:LOCAL_RANK under torchrun with device "cuda"."""
    if device == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(device)


def destroy_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def apply_data_parallel(model: nn.Module, world: int) -> nn.Module:
    """FSDP2 over all ranks, on the device the model already lives on."""
    if world <= 1:
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(next(model.parameters()).device.type, (world,))
    blocks = list(getattr(model, "layers", [])) + list(getattr(model, "mtp", []) or [])
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    # The trainer calls forward_batch / forward_mtp, not forward(): FSDP2 must gather the root's parameters (embed,
    # head, hc_head, norm) around those methods too.
    for method in ("forward_batch", "forward_mtp"):
        if hasattr(model, method):
            register_fsdp_forward_method(model, method)
    return model


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t)
    return t
