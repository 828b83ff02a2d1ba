"""torch.distributed set-up for torchrun: one process per GPU (or per CPU process with gloo).

DDP is on only when torchrun's environment (WORLD_SIZE > 1) is present; a plain `python train.py` runs
one process with no process group.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def init_distributed(device: str, world_size: int) -> None:
    """Join torchrun's process group (NCCL on GPUs, gloo on the CPU) when world_size > 1."""
    if world_size <= 1:
        return
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def mean_over_processes(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """Average scalar tensors over all processes (one all-reduce) and return Python floats."""
    names = sorted(values)
    stacked = torch.stack([values[name].detach().float() for name in names])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(stacked)
        stacked /= dist.get_world_size()
    return dict(zip(names, stacked.tolist()))
