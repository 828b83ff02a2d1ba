"""The generator's ElaIN maps at eager inference as one Triton kernel each.

With the linear layers folded (generator.py), each ElaIN of the generator is one half-precision product of the
identity features with the composed (2C x Cid) weight, which writes gamma_id and beta_id, (B, 2C, N'), to memory, then
the map leaky_relu(x_hat (1 + gamma) + beta): eager, a dozen elementwise operations, each a pass over (B, C, N')
tensors; compiled, one pass that Inductor fuses, which still reads gamma_id and beta_id back. `activated_elain_map`
computes them in a tile's registers instead and applies the map and the activation to the tile as it writes it: one
kernel that reads x and the features and writes the output.

Inference only (no autograd), eager: `ElaIN.activated` takes it where `applies` says. With TRITON_INTERPRET=1 set
before triton is imported the kernel runs on CPU tensors (the tests).
"""
from __future__ import annotations

import torch

from models.networks.layers import HALF_DTYPES
from models.networks.triton_support import (block_shared_memory, on_device, tl, triton, triton_jit,
                                            unsupported_device_reason, validate_tile)

# A program's tile: (vertices, output channels, feature channels a step, warps) and its pipeline stages, where a block
# may take ELAIN_SHARED_MEMORY bytes of shared memory (Triton 3.9 compiles it for sm_90a into 96 KiB with float32
# features); else ELAIN_SMALL_TILE (64 KiB at two stages). The map of 1024 channels at batch 8 took 0.384 ms on the
# H100 with the first, 0.421 with (128, 128, 32, 8) at three stages (docs/benchmarks.md, twenty-sixth session); with
# the first, 0.389 ms with the features in fp16 against 0.497 in float32 (twenty-eighth session), which is why
# `ElaINGenerator.forward` rounds them once for all nine maps.
ELAIN_TILE = (128, 128, 64, 8)
ELAIN_STAGES = 3
ELAIN_SHARED_MEMORY = 128 * 1024
ELAIN_SMALL_TILE = (128, 128, 32, 8)
ELAIN_FEW_STAGES = 2


def unsupported_reason(x: torch.Tensor) -> str | None:
    """Why the kernel cannot take x, in one sentence, or None when it can."""
    reason = unsupported_device_reason(x, "the ElaIN kernels")
    if reason is None and x.dtype not in HALF_DTYPES:
        return f"the ElaIN kernels take float16 or bfloat16 activations, got {x.dtype}"
    return reason


def default_tile(x: torch.Tensor) -> tuple[tuple[int, int, int, int], int]:
    """The tile and pipeline stages of the map on x's device (ELAIN_TILE where its shared memory allows)."""
    available = block_shared_memory(x)
    if available is None or available >= ELAIN_SHARED_MEMORY:
        return ELAIN_TILE, ELAIN_STAGES
    return ELAIN_SMALL_TILE, ELAIN_FEW_STAGES


def applies(x: torch.Tensor) -> bool:
    """Whether `ElaIN.activated` takes the kernel for x: at eager inference (no gradient, not traced by Dynamo) of
    half-precision activations on a GPU the kernel supports. Compiled, Inductor's code of the same map (a cuBLAS
    product, then one fused pass) was faster on the H100 (docs/benchmarks.md, twenty-sixth session); the answer comes
    before the device query, which Dynamo would not trace."""
    return (x.is_cuda and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and unsupported_reason(x) is None)


@triton_jit
def _elain_map_kernel(x_ptr, features_ptr, weight_ptr, bias_ptr, mean_ptr, std_ptr, blend_ptr, out_ptr, channels,
                      feature_channels, padded_vertices, slope, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                      BLOCK_K: tl.constexpr):
    """Channels [c * BLOCK_C, ...) at vertices [n * BLOCK_N, ...) of batch element b for program (c, n, b); see
    `activated_elain_map`. The gamma and beta rows of the weight for the same channels are two products sharing the
    features' tile."""
    channel_block, vertex_block, batch = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    columns = vertex_block * BLOCK_N + tl.arange(0, BLOCK_N)
    outs = channel_block * BLOCK_C + tl.arange(0, BLOCK_C)
    depths = tl.arange(0, BLOCK_K)
    in_columns = columns < padded_vertices
    in_outs = outs < channels
    features_batch = batch.to(tl.int64) * feature_channels * padded_vertices
    gamma = tl.zeros([BLOCK_C, BLOCK_N], dtype=tl.float32)
    beta = tl.zeros([BLOCK_C, BLOCK_N], dtype=tl.float32)
    for start in tl.range(0, feature_channels, BLOCK_K):
        rows = start + depths
        in_depth = rows < feature_channels
        features = tl.load(features_ptr + features_batch + rows[:, None].to(tl.int64) * padded_vertices
                           + columns[None, :], mask=in_depth[:, None] & in_columns[None, :], other=0.0)
        features = features.to(x_ptr.dtype.element_ty)
        weight_offsets = outs[:, None] * feature_channels + rows[None, :]  # (BLOCK_C, BLOCK_K) of the gamma rows
        in_weights = in_outs[:, None] & in_depth[None, :]
        gamma = tl.dot(tl.load(weight_ptr + weight_offsets, mask=in_weights, other=0.0), features, gamma)
        beta = tl.dot(tl.load(weight_ptr + channels * feature_channels + weight_offsets, mask=in_weights, other=0.0),
                      features, beta)
    gamma += tl.load(bias_ptr + outs, mask=in_outs, other=0.0)[:, None]
    beta += tl.load(bias_ptr + channels + outs, mask=in_outs, other=0.0)[:, None]
    statistic_offsets = batch * channels + outs
    mean = tl.load(mean_ptr + statistic_offsets, mask=in_outs, other=0.0)[:, None]
    std = tl.load(std_ptr + statistic_offsets, mask=in_outs, other=1.0)[:, None]
    blend = tl.load(blend_ptr + statistic_offsets, mask=in_outs, other=0.0)[:, None]
    offsets = (batch.to(tl.int64) * channels * padded_vertices + outs[:, None].to(tl.int64) * padded_vertices
               + columns[None, :])
    in_tile = in_outs[:, None] & in_columns[None, :]
    x = tl.load(x_ptr + offsets, mask=in_tile, other=0.0).to(tl.float32)
    mapped = ((x - mean) / std * (1 + gamma * blend + std * (1 - blend))
              + beta * blend + mean * (1 - blend))
    activated = tl.where(mapped > 0, mapped, mapped * slope)
    tl.store(out_ptr + offsets, activated.to(out_ptr.dtype.element_ty), mask=in_tile)


def activated_elain_map(x: torch.Tensor, identity_features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                        mean: torch.Tensor, std: torch.Tensor, blend: torch.Tensor, slope: float, *,
                        tile: tuple[int, int, int, int] | None = None, stages: int | None = None) -> torch.Tensor:
    """leaky_relu(x_hat (1 + gamma) + beta, slope), ElaIN's map and activation (generator.py `_ActivatedElaINMap`),
    with gamma_id and beta_id formed in registers from one product of the identity features.

    gamma = gamma_id w + std (1 - w), beta = beta_id w + mean (1 - w), x_hat = (x - mean) / std, where
    [gamma_id; beta_id] = weight @ identity_features + bias is accumulated in float32 from half-precision operands, as
    the products of the autograd path run under autocast, and the map is computed in float32.

    Args:
        x: float16 or bfloat16 (B, C, N'), contiguous.
        identity_features: (B, Cid, N') in x's dtype or float32 (rounded to x's dtype as a tile is loaded, as
            autocast rounds a product's operand), contiguous.
        weight: (2C, Cid) in x's dtype, the gamma rows first, contiguous; bias: (2C,).
        mean, std, blend: x's mean and std and ElaIN's blend weight w, each float32 (B, C) (or (B, C, 1)).
        slope: the leaky ReLU's negative slope.
        tile: (vertices, output channels, feature channels, warps), powers of two, the first three at least 16;
            stages: the pipeline stages (None: `default_tile`'s).
    Returns:
        (B, C, N') in x's dtype.
    """
    reason = unsupported_reason(x)
    if reason is not None:
        raise RuntimeError(reason)
    if x.dim() != 3 or identity_features.dim() != 3:
        raise ValueError(f"x and identity_features must be (B, C, N') tensors, got shapes {tuple(x.shape)} and "
                         f"{tuple(identity_features.shape)}")
    batch, channels, padded_vertices = x.shape
    feature_channels = identity_features.shape[1]
    for name, value, shape, dtypes in (
            ("x", x, x.shape, (x.dtype,)),
            ("identity_features", identity_features, (batch, feature_channels, padded_vertices),
             (x.dtype, torch.float32)),
            ("weight", weight, (2 * channels, feature_channels), (x.dtype,))):
        if (tuple(value.shape) != tuple(shape) or value.dtype not in dtypes or not value.is_contiguous()
                or value.device != x.device):
            raise ValueError(f"{name} must be a contiguous {' or '.join(map(str, dtypes))} tensor of shape "
                             f"{tuple(shape)} on {x.device}, got {value.dtype} {tuple(value.shape)} on {value.device}"
                             f"{'' if value.is_contiguous() else ' (not contiguous)'}")
    per_channel = "one per batch element and channel"
    for name, value, count, layout in (("mean", mean, batch * channels, per_channel),
                                       ("std", std, batch * channels, per_channel),
                                       ("blend", blend, batch * channels, per_channel),
                                       ("bias", bias, 2 * channels, "gamma's, then beta's")):
        if value.numel() != count or value.device != x.device:
            raise ValueError(f"{name} must have {count} values on {x.device} ({layout}), got {tuple(value.shape)} on "
                             f"{value.device}")
    statistics = [value.reshape(batch, channels).float().contiguous() for value in (mean, std, blend)]
    default_tile_of_x, default_stages = default_tile(x)
    tile = default_tile_of_x if tile is None else tile
    stages = default_stages if stages is None else stages
    validate_tile(tile, ("vertices", "output channels", "feature channels"))
    block_n, block_c, block_k, num_warps = tile
    out = torch.empty_like(x)
    with on_device(x):
        _elain_map_kernel[(triton.cdiv(channels, block_c), triton.cdiv(padded_vertices, block_n), batch)](
            x, identity_features, weight, bias.reshape(-1).float().contiguous(), *statistics, out, channels,
            feature_channels, padded_vertices, slope, BLOCK_N=block_n, BLOCK_C=block_c, BLOCK_K=block_k,
            num_warps=num_warps, num_stages=stages)
    return out
