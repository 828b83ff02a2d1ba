"""The correspondence network's feature layers at inference as Triton kernels.

Each of Corr's 1x1 convolutions is followed by an instance norm and an activation, and on the fast path (under
torch.compile) by the pass that splits its float32 input into fp16 pieces for `split_product`: per layer one pass for
the statistics, one that normalises, activates and writes the pieces (three fp16 copies of the input), and the
product. Here one kernel does a layer:

- `normalized_convolution`: W act((x - mean) rstd + residual) + bias, where the input's normalisation, residual
  and activation are applied as each tile is loaded, and the result split into fp16 pieces in registers (hi hi +
  hi lo + lo hi on the tensor cores, accumulated in float32: `split_product`'s float32-class arithmetic, 1.4e-6
  relative). The same kernel sums its output's instance-norm statistics per tile (mean and centred sum of squares,
  combined by `_statistics_kernel` with Chan's formula), and may write its activated input (a residual block's
  output, needed again as the next block's residual).
- `normalized_rows`: act((x - mean) rstd + residual), optionally divided by each vertex's L2 norm over channels
  (`normalize_features`), for the activations no convolution reads next.

Inference only (no autograd): `Correspondence.forward_by_kernels` runs them, which inference on a GPU with a half
dtype takes (eager for every batch; with Corr's layers compiled, for batches of several pairs: `uses_kernels`). With
TRITON_INTERPRET=1 set before triton is imported the kernels run on CPU tensors (the tests).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import NamedTuple

import torch

from models.networks.layers import HALF_SIGNIFICAND_MASK, INSTANCE_NORM_EPS, half_pieces
from models.networks.triton_support import (block_shared_memory, on_device, tl, triton, triton_jit,
                                            unsupported_device_reason, validate_tile)

_HALF_SIGNIFICAND_MASK = None if tl is None else tl.constexpr(HALF_SIGNIFICAND_MASK)

# A convolution program's tile: (vertices, output channels, input channels a step, warps), and its pipeline stages
# where a block may take at least CONVOLUTION_STAGES_SHARED_MEMORY bytes of shared memory (3 stages ask 129 KiB with
# the input kept; else CONVOLUTION_FEW_STAGES, 81 KiB). One 256-channel layer at 16 x 6896 columns (docs/benchmarks.md):
# on an H200 through `normalized_convolution`, 0.394 ms with its input kept and 0.340 without, against 0.478 and 0.481
# for the compiled arithmetic it replaces (twenty-fifth session); on the H100 launched directly, 0.334 and 0.231 ms
# (twenty-fourth).
CONVOLUTION_TILE = (128, 128, 32, 8)
CONVOLUTION_STAGES = 3
CONVOLUTION_FEW_STAGES = 2
CONVOLUTION_STAGES_SHARED_MEMORY = 160 * 1024
# Vertices a `normalized_rows` program holds (each with all channels), and its warps.
ROWS_BLOCK = 32
ROWS_WARPS = 4
# The channels a statistics program combines, and the tiles it reads a step. With 128 channels and one tile a step, the
# 13 combinations of an inference at batch 8 took 0.366 ms on the H100 (28 us each, 32 programs of 108 dependent
# loads; docs/benchmarks.md, twenty-sixth session).
STATISTICS_BLOCK = 32
STATISTICS_TILES = 64


class Statistics(NamedTuple):
    """Instance-norm statistics of a (B, C, N') tensor over its first N columns: mean and 1 / sqrt(var + eps)
    (biased variance, F.instance_norm's epsilon), both float32 (B, C)."""
    mean: torch.Tensor
    rstd: torch.Tensor


class KernelsDoNotFit(RuntimeError):
    """A kernel asked for more of the GPU (shared memory, registers) than it has."""


class KernelWeight(NamedTuple):
    """A 1x1 convolution's weight W (C_out, C_in) as the convolution kernel reads it: split into fp16 pieces,
    W = hi + lo (layers.py's `half_pieces`), each (C_out, C_in), contiguous."""
    hi: torch.Tensor
    lo: torch.Tensor


def kernel_weight(weight: torch.Tensor) -> KernelWeight:
    """`KernelWeight` of weight (C_out, C_in): formed once per weight value by callers that run many layers."""
    return KernelWeight(*(piece.contiguous() for piece in half_pieces(weight.float())))


def unsupported_reason(x: torch.Tensor) -> str | None:
    """Why the kernels cannot take x, in one sentence, or None when they can."""
    return unsupported_device_reason(x, "the feature kernels")


@triton_jit
def _activated_input(x_ptr, offsets, in_tile, mean_ptr, rstd_ptr, residual_ptr, slope_ptr, statistic_offsets,
                     in_channels, NORMALIZE: tl.constexpr, RESIDUAL: tl.constexpr, ACTIVATE: tl.constexpr):
    """act((x - mean) rstd + residual) at `offsets` (0 outside in_tile), float32: each step optional. The channels'
    statistics are at `statistic_offsets` (a row or a column of channels), those inside the tensor where
    in_channels."""
    x = tl.load(x_ptr + offsets, mask=in_tile, other=0.0)
    if NORMALIZE:
        mean = tl.load(mean_ptr + statistic_offsets, mask=in_channels, other=0.0)
        rstd = tl.load(rstd_ptr + statistic_offsets, mask=in_channels, other=0.0)
        x = (x - mean) * rstd
    if RESIDUAL:
        x = x + tl.load(residual_ptr + offsets, mask=in_tile, other=0.0)
    if ACTIVATE:
        x = tl.where(x >= 0, x, x * tl.load(slope_ptr))
    return tl.where(in_tile, x, 0.0)


@triton_jit
def _convolution_kernel(x_ptr, mean_ptr, rstd_ptr, residual_ptr, slope_ptr, activated_ptr, weight_hi_ptr,
                        weight_lo_ptr, bias_ptr, out_ptr, partial_ptr, in_channels, out_channels, vertices,
                        padded_vertices, NORMALIZE: tl.constexpr, RESIDUAL: tl.constexpr, ACTIVATE: tl.constexpr,
                        KEEP_INPUT: tl.constexpr, BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                        BLOCK_K: tl.constexpr):
    """Output channels [c * BLOCK_C, ...) at vertices [n * BLOCK_N, ...) of batch element b for program (c, n, b);
    see `normalized_convolution`. W's pieces are the products' left operand and the activated input's, split in
    registers, the right one, which Triton stages in shared memory for the tensor cores. (With the input as the left
    operand, taken from registers, Triton waited for each product before loading the next tile: docs/benchmarks.md.)"""
    channel_block, vertex_block, batch = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    columns = vertex_block * BLOCK_N + tl.arange(0, BLOCK_N)
    outs = channel_block * BLOCK_C + tl.arange(0, BLOCK_C)
    depths = tl.arange(0, BLOCK_K)
    in_columns = columns < padded_vertices
    in_outs = outs < out_channels
    in_batch = batch.to(tl.int64) * in_channels * padded_vertices
    product = tl.zeros([BLOCK_C, BLOCK_N], dtype=tl.float32)
    for start in tl.range(0, in_channels, BLOCK_K):
        channels = start + depths
        in_depth = channels < in_channels
        offsets = in_batch + channels[:, None].to(tl.int64) * padded_vertices + columns[None, :]  # (BLOCK_K, BLOCK_N)
        in_tile = in_depth[:, None] & in_columns[None, :]
        x = _activated_input(x_ptr, offsets, in_tile, mean_ptr, rstd_ptr, residual_ptr, slope_ptr,
                             batch * in_channels + channels[:, None], in_depth[:, None], NORMALIZE, RESIDUAL,
                             ACTIVATE)
        if KEEP_INPUT:
            if channel_block == 0:
                tl.store(activated_ptr + offsets, x, mask=in_tile)
        x_hi = (x.to(tl.int32, bitcast=True) & _HALF_SIGNIFICAND_MASK).to(tl.float32, bitcast=True)
        x_lo = (x - x_hi).to(tl.float16)
        x_hi = x_hi.to(tl.float16)
        weight_offsets = outs[:, None] * in_channels + channels[None, :]  # (BLOCK_C, BLOCK_K) of W
        in_weights = in_outs[:, None] & in_depth[None, :]
        weight_hi = tl.load(weight_hi_ptr + weight_offsets, mask=in_weights, other=0.0)
        weight_lo = tl.load(weight_lo_ptr + weight_offsets, mask=in_weights, other=0.0)
        product = tl.dot(weight_hi, x_hi, product)
        product = tl.dot(weight_lo, x_hi, product)
        product = tl.dot(weight_hi, x_lo, product)
    if BIAS:
        product += tl.load(bias_ptr + outs, mask=in_outs, other=0.0)[:, None]
    out_offsets = (batch.to(tl.int64) * out_channels * padded_vertices + outs[:, None].to(tl.int64) * padded_vertices
                   + columns[None, :])
    tl.store(out_ptr + out_offsets, product, mask=in_outs[:, None] & in_columns[None, :])
    real = columns < vertices
    count = tl.maximum(tl.sum(real.to(tl.float32), axis=0), 1.0)
    tile_mean = tl.sum(tl.where(real[None, :], product, 0.0), axis=1) / count
    centred = tl.where(real[None, :], product - tile_mean[:, None], 0.0)
    partial = partial_ptr + ((batch * tl.num_programs(1) + vertex_block) * 2) * out_channels + outs
    tl.store(partial, tile_mean, mask=in_outs)
    tl.store(partial + out_channels, tl.sum(centred * centred, axis=1), mask=in_outs)


@triton_jit
def _tile_step(start, tiles, vertices, in_outs, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr):
    """Tiles [start, start + BLOCK_T) of a statistics program: their indices, their counts of real columns (below
    `vertices`) as float32 (BLOCK_T, 1), and the mask of those that exist at the program's channels."""
    tile = start + tl.arange(0, BLOCK_T)
    count = tl.minimum(tl.maximum(vertices - tile * BLOCK_N, 0), BLOCK_N).to(tl.float32)[:, None]
    return tile, count, (tile < tiles)[:, None] & in_outs[None, :]


@triton_jit
def _statistics_kernel(partial_ptr, mean_ptr, rstd_ptr, channels, tiles, vertices, eps, BLOCK_N: tl.constexpr,
                       BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr):
    """Channels [c * BLOCK_C, ...) of batch element b for program (c, b): the tiles' means and centred sums of
    squares (B, tiles, 2, C) combined over the first `vertices` columns (Chan et al.'s pairwise formula), BLOCK_T
    tiles a step, each weighted by its count of real columns."""
    channel_block, batch = tl.program_id(0), tl.program_id(1)
    outs = channel_block * BLOCK_C + tl.arange(0, BLOCK_C)
    in_outs = outs < channels
    first = partial_ptr + batch * tiles * 2 * channels + outs[None, :]
    total = tl.zeros([BLOCK_C], dtype=tl.float32)
    for start in range(0, tiles, BLOCK_T):
        tile, count, in_block = _tile_step(start, tiles, vertices, in_outs, BLOCK_N, BLOCK_T)
        total += tl.sum(count * tl.load(first + tile[:, None] * 2 * channels, mask=in_block, other=0.0), axis=0)
    mean = total / vertices
    squares = tl.zeros([BLOCK_C], dtype=tl.float32)
    for start in range(0, tiles, BLOCK_T):
        tile, count, in_block = _tile_step(start, tiles, vertices, in_outs, BLOCK_N, BLOCK_T)
        tile_first = first + tile[:, None] * 2 * channels
        deviation = tl.load(tile_first, mask=in_block, other=0.0) - mean[None, :]
        squares += tl.sum(tl.load(tile_first + channels, mask=in_block, other=0.0) + count * deviation * deviation,
                          axis=0)
    tl.store(mean_ptr + batch * channels + outs, mean, mask=in_outs)
    tl.store(rstd_ptr + batch * channels + outs, 1.0 / tl.sqrt_rn(squares / vertices + eps), mask=in_outs)


@triton_jit
def _rows_kernel(x_ptr, mean_ptr, rstd_ptr, residual_ptr, slope_ptr, out_ptr, channels, padded_vertices, unit_eps,
                 NORMALIZE: tl.constexpr, RESIDUAL: tl.constexpr, ACTIVATE: tl.constexpr, UNIT: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """Vertices [n * BLOCK_N, ...) of batch element b, all channels, for program (n, b); see `normalized_rows`."""
    vertex_block, batch = tl.program_id(0), tl.program_id(1)
    rows = vertex_block * BLOCK_N + tl.arange(0, BLOCK_N)
    all_channels = tl.arange(0, BLOCK_C)
    offsets = (batch.to(tl.int64) * channels * padded_vertices + all_channels[None, :].to(tl.int64) * padded_vertices
               + rows[:, None])
    in_channels = (all_channels < channels)[None, :]
    in_tile = (rows < padded_vertices)[:, None] & in_channels
    x = _activated_input(x_ptr, offsets, in_tile, mean_ptr, rstd_ptr, residual_ptr, slope_ptr,
                         batch * channels + all_channels[None, :], in_channels, NORMALIZE, RESIDUAL, ACTIVATE)
    if UNIT:
        x = x / (tl.sqrt_rn(tl.sum(x * x, axis=1)) + unit_eps)[:, None]
    tl.store(out_ptr + offsets, x, mask=in_tile)


def _activation_arguments(x: torch.Tensor, statistics: Statistics | None, residual: torch.Tensor | None,
                          slope: torch.Tensor | None) -> tuple:
    """The kernels' (mean, rstd, residual, slope) pointers, x where a step is off (never read then)."""
    for name, value, shape in (("residual", residual, x.shape), ("slope", slope, (1,)),
                               ("statistics mean", None if statistics is None else statistics.mean, x.shape[:2]),
                               ("statistics rstd", None if statistics is None else statistics.rstd, x.shape[:2])):
        if value is not None and (tuple(value.shape) != tuple(shape) or value.dtype != torch.float32
                                  or value.device != x.device or not value.is_contiguous()):
            raise ValueError(f"{name} must be a contiguous float32 tensor of shape {tuple(shape)} on {x.device}, "
                             f"got {value.dtype} {tuple(value.shape)} on {value.device}")
    mean, rstd = (x, x) if statistics is None else statistics
    return mean, rstd, x if residual is None else residual, x if slope is None else slope


def _stages(x: torch.Tensor) -> int:
    """The convolution's pipeline stages on x's device (CONVOLUTION_STAGES where its shared memory allows)."""
    available = block_shared_memory(x)
    return CONVOLUTION_STAGES if available is None or available >= CONVOLUTION_STAGES_SHARED_MEMORY else (
        CONVOLUTION_FEW_STAGES)


@contextlib.contextmanager
def _reported_as_not_fitting() -> Iterator[None]:
    """Triton's OutOfResources, raised where a kernel is compiled for a GPU too small for it, as KernelsDoNotFit."""
    try:
        yield
    except triton.runtime.OutOfResources as err:
        raise KernelsDoNotFit(f"the feature kernels do not fit this GPU: {err}") from None


def _validate_input(x: torch.Tensor, vertices: int) -> None:
    reason = unsupported_reason(x)
    if reason is not None:
        raise RuntimeError(reason)
    if x.dim() != 3 or x.dtype != torch.float32 or not x.is_contiguous():
        raise ValueError(f"the feature kernels take a contiguous float32 (B, C, N') tensor, got {x.dtype} "
                         f"{tuple(x.shape)}{'' if x.is_contiguous() else ' (not contiguous)'}")
    if not 1 <= vertices <= x.shape[2]:
        raise ValueError(f"vertices must lie in [1, {x.shape[2]}] (the columns), got {vertices}")


def normalized_convolution(x: torch.Tensor, weight: KernelWeight, bias: torch.Tensor | None, vertices: int, *,
                           statistics: Statistics | None = None, residual: torch.Tensor | None = None,
                           slope: torch.Tensor | None = None, keep_input: bool = False,
                           tile: tuple[int, int, int, int] = CONVOLUTION_TILE, stages: int | None = None
                           ) -> tuple[torch.Tensor, Statistics, torch.Tensor | None]:
    """out = weight @ act((x - mean) rstd + residual) + bias and out's instance-norm statistics, in one kernel.

    act is a leaky ReLU (PReLU with one slope) of `slope`; each of the normalisation, the residual and act is
    skipped when its argument is None. The product has float32 accuracy in practice (`split_product`'s
    pieces, formed in registers); the statistics are over the first `vertices` columns, as `instance_norm`
    takes them, and the columns past them (padding) are computed like the others.

    Args:
        x: float32 (B, C_in, N'), contiguous.
        weight: `kernel_weight` of the convolution's (C_out, C_in) weight; bias: (C_out,) or None.
        vertices: N <= N', the real columns.
        statistics: x's (mean, rstd), each float32 (B, C_in); residual: float32 (B, C_in, N'); slope: float32 (1,).
        keep_input: also return act(...) itself (the input as the product saw it).
        tile: (vertices, output channels, input channels, warps) of a program, powers of two, the first three at
            least 16.
        stages: the pipeline stages (for benchmarks; None: as the GPU's shared memory allows).
    Returns:
        out: float32 (B, C_out, N'); its Statistics; the activated input (B, C_in, N') or None.
    """
    _validate_input(x, vertices)
    batch, in_channels, padded_vertices = x.shape
    out_channels = weight.hi.shape[0]
    if any(piece.shape != (out_channels, in_channels) or piece.dtype != torch.float16 or not piece.is_contiguous()
           for piece in weight) or (bias is not None and bias.shape != (out_channels,)):
        raise ValueError(f"weight must be a KernelWeight of (C_out, {in_channels}) float16 pieces and bias (C_out,), "
                         f"got {tuple(weight.hi.shape)} and {None if bias is None else tuple(bias.shape)}")
    validate_tile(tile, ("vertices", "output channels", "input channels"))
    block_n, block_c, block_k, num_warps = tile
    mean, rstd, residual_arg, slope_arg = _activation_arguments(x, statistics, residual, slope)
    tiles = triton.cdiv(padded_vertices, block_n)
    out = x.new_empty(batch, out_channels, padded_vertices)
    partial = x.new_empty(batch, tiles, 2, out_channels)
    activated = torch.empty_like(x) if keep_input else x
    out_statistics = Statistics(x.new_empty(batch, out_channels), x.new_empty(batch, out_channels))
    with on_device(x), _reported_as_not_fitting():
        _convolution_kernel[(triton.cdiv(out_channels, block_c), tiles, batch)](
            x, mean, rstd, residual_arg, slope_arg, activated, weight.hi, weight.lo,
            x if bias is None else bias.float(), out, partial, in_channels, out_channels, vertices, padded_vertices,
            NORMALIZE=statistics is not None, RESIDUAL=residual is not None, ACTIVATE=slope is not None,
            KEEP_INPUT=keep_input, BIAS=bias is not None,
            BLOCK_N=block_n, BLOCK_C=block_c, BLOCK_K=block_k, num_warps=num_warps,
            num_stages=_stages(x) if stages is None else stages)
        _statistics_kernel[(triton.cdiv(out_channels, STATISTICS_BLOCK), batch)](
            partial, *out_statistics, out_channels, tiles, vertices, INSTANCE_NORM_EPS, BLOCK_N=block_n,
            BLOCK_C=STATISTICS_BLOCK, BLOCK_T=STATISTICS_TILES)
    return out, out_statistics, activated if keep_input else None


def normalized_rows(x: torch.Tensor, *, statistics: Statistics | None = None, residual: torch.Tensor | None = None,
                    slope: torch.Tensor | None = None, unit_eps: float | None = None) -> torch.Tensor:
    """act((x - mean) rstd + residual) for every column of x (each step skipped when its argument is None, as in
    `normalized_convolution`), then, with unit_eps, each column divided by its L2 norm over channels plus
    unit_eps (`normalize_features`).

    Args:
        x: float32 (B, C, N'), contiguous; statistics, residual, slope: as `normalized_convolution` takes them.
    Returns:
        float32 (B, C, N').
    """
    _validate_input(x, x.shape[2])
    mean, rstd, residual_arg, slope_arg = _activation_arguments(x, statistics, residual, slope)
    batch, channels, padded_vertices = x.shape
    out = torch.empty_like(x)
    with on_device(x), _reported_as_not_fitting():
        _rows_kernel[(triton.cdiv(padded_vertices, ROWS_BLOCK), batch)](
            x, mean, rstd, residual_arg, slope_arg, out, channels, padded_vertices,
            0.0 if unit_eps is None else unit_eps, NORMALIZE=statistics is not None, RESIDUAL=residual is not None,
            ACTIVATE=slope is not None, UNIT=unit_eps is not None, BLOCK_N=ROWS_BLOCK,
            BLOCK_C=triton.next_power_of_2(channels), num_warps=ROWS_WARPS)
    return out
