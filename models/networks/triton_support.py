"""What the Triton kernels of models/networks share (ot/fused.py, feature_kernels.py): triton where it is installed,
whether its interpreter runs them on CPU tensors, the device a launch goes to and the check of a product's tile.

triton is imported only if it is installed (CPU-only installs have none): `triton` and `tl` are then None and
`triton_jit` leaves the kernels plain functions, so the modules that define them import anyway.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the kernels' modules then say they are unsupported
    triton = tl = None

# Triton's interpreter is chosen when triton is imported (its library functions are compiled then), so whether it
# runs CPU tensors is known from then on. Older triton releases have no `knobs` and read the variable themselves.
INTERPRETED = triton is not None and bool(
    triton.knobs.runtime.interpret if hasattr(triton, "knobs") else os.environ.get("TRITON_INTERPRET", "0") == "1")


def triton_jit(function: Callable) -> Callable:
    """triton.jit(function) where triton is installed (it compiles at the first launch), else function as it is,
    so that a module of kernels imports without triton."""
    return function if triton is None else triton.jit(function)


def on_device(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """Launches on tensor's GPU (Triton launches on the current device)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def unsupported_device_reason(x: torch.Tensor, kernels: str) -> str | None:
    """Why `kernels` (their name for the sentence, plural) cannot run on x's device, in one sentence, or None when
    they can: triton is installed and x is a CUDA tensor on a GPU with fp16 tensor cores (compute capability 8.0 or
    later), or a CPU tensor under Triton's interpreter."""
    if triton is None:
        return f"{kernels} need triton, which is not installed"
    if not (x.is_cuda or (x.device.type == "cpu" and INTERPRETED)):
        return (f"{kernels} run on CUDA tensors (on CPU ones only if TRITON_INTERPRET=1 was set before triton was "
                f"imported), got one on {x.device}")
    if x.is_cuda and torch.cuda.get_device_capability(x.device) < (8, 0):
        return f"{kernels} need a GPU with fp16 tensor cores of compute capability 8.0 or later"
    return None


def block_shared_memory(tensor: torch.Tensor) -> int | None:
    """The shared memory one block may take on tensor's GPU, in bytes; None on the CPU (the interpreter has no
    limit)."""
    if not tensor.is_cuda:
        return None
    return getattr(torch.cuda.get_device_properties(tensor.device), "shared_memory_per_block_optin", 0)


def validate_tile(tile: tuple[int, ...], sides: tuple[str, ...]) -> None:
    """ValueError unless `tile` is its sides, each at least the 16 a product on the tensor cores needs, then a warp
    count, all powers of two."""
    names = (*sides, "warps")
    if len(tile) != len(names) or any(isinstance(size, bool) or not isinstance(size, int) or size < 1
                                      or size & (size - 1) for size in tile) or min(tile[:-1]) < 16:
        raise ValueError(f"tile must be {('three', 'four')[len(names) - 3]} powers of two ({', '.join(names)}), all "
                         f"but the warps at least 16, got {tile!r}")
