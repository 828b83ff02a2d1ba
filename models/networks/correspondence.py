"""Correspondence network ("Corr") of 3D-CoreNet (Song et al., NeurIPS 2021, Sec. 3.1).

Point features of the identity and pose meshes are matched by cosine similarity, and an optimal-transport
plan (Sinkhorn, `ot/`) carries the pose mesh onto the identity's vertex order: the coarse `warp_out`.
The identity features also condition the refinement generator. Module and attribute names follow the
published state_dict (`adaptive_feature`, `layer`, `phi`, `theta`) so released checkpoints load unchanged.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from models.networks import feature_kernels
from models.networks.feature_kernels import KernelWeight, kernel_weight, normalized_convolution, normalized_rows
from models.networks.layers import INSTANCE_NORM_EPS, PointwiseConv1d, mixed_product, product
from models.networks.ot import (similarity_warp_stored, sinkhorn_warp_chunked, sinkhorn_warp_dense,
                                sinkhorn_warp_stored)

# numpy.finfo(float).eps, the published normaliser's epsilon (kept for parity).
FEATURE_NORM_EPS = 2.220446049250313e-16
# The slope of PointFeature's leaky ReLUs.
LEAKY_SLOPE = 0.2


class _InstanceNormOfRealColumns(torch.autograd.Function):
    """y = (x - mean) / sqrt(var + eps) on every column of x (B, C, N'), mean and biased var over the first N.

    Its own backward, F.instance_norm's formula extended to columns outside the statistics: with g = dL/dy and
    sums over all N' columns, dL/dx = rstd (g - [column < N] (sum g + y sum g y) / N). Through autograd, the
    var_mean form's backward differentiates the slice, the mean and the variance one by one, and runs more
    reductions (docs/benchmarks.md, thirteenth session).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, vertices: int) -> torch.Tensor:
        variance, mean = torch.var_mean(x[..., :vertices], dim=2, keepdim=True, unbiased=False)  # (B, C, 1)
        rstd = torch.rsqrt(variance + INSTANCE_NORM_EPS)
        normalized = (x - mean) * rstd
        ctx.save_for_backward(normalized, rstd)
        ctx.vertices = vertices
        return normalized

    @staticmethod
    @once_differentiable  # the saved y and rstd carry no graph: a second derivative would be wrong
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        normalized, rstd = ctx.saved_tensors
        total = grad.sum(dim=2, keepdim=True)  # (B, C, 1)
        moment = (grad * normalized).sum(dim=2, keepdim=True)  # (B, C, 1)
        real = torch.arange(grad.shape[2], device=grad.device) < ctx.vertices  # (N',)
        return rstd * (grad - real * (total + normalized * moment) / ctx.vertices), None


def instance_norm(x: torch.Tensor, vertices: int | None = None) -> torch.Tensor:
    """F.instance_norm (no affine, biased variance) with its statistics over the first `vertices` columns.

    On the padded vertex axis (`PoseTransferModel.transfer`) the columns past `vertices` are padding: they are
    normalised with the real vertices' statistics and never enter them (`_InstanceNormOfRealColumns`).
    Normalising only the real columns with F.instance_norm and zero-padding its output kept 0.6 GiB more for
    backward and was no faster on the H100 (docs/benchmarks.md, thirteenth session).

    Args:
        x: float (B, C, N'); vertices: the real vertex count N <= N' (None: all N').
    Returns:
        float (B, C, N').
    """
    if vertices is None or vertices == x.shape[2]:
        return F.instance_norm(x)
    return _InstanceNormOfRealColumns.apply(x, vertices)


def normalize_features(features: torch.Tensor) -> torch.Tensor:
    """Divide each vertex feature by its L2 norm over channels (plus FEATURE_NORM_EPS).

    Args:
        features: float (B, C, N).
    Returns:
        float (B, C, N), unit length per vertex.
    """
    return features / (features.norm(dim=1, keepdim=True) + FEATURE_NORM_EPS)


class PointFeature(nn.Module):
    """Shared per-vertex feature extractor: three 1x1 convs 3 -> ngf -> 2ngf -> 4ngf with instance norm."""

    def __init__(self, ngf: int = 64, half_dtype: torch.dtype | None = None):
        super().__init__()
        self.layer1 = PointwiseConv1d(3, ngf)  # raw coordinates: float32 throughout (any range, 3 channels)
        self.layer2 = PointwiseConv1d(ngf, 2 * ngf, half_dtype=half_dtype)
        self.layer3 = PointwiseConv1d(2 * ngf, 4 * ngf, half_dtype=half_dtype)

    def forward(self, points: torch.Tensor, vertices: int | None = None) -> torch.Tensor:
        """points: (B, 3, N') -> features (B, 4ngf, N'), normalised over the first `vertices` (`instance_norm`)."""
        x = F.leaky_relu(instance_norm(self.layer1(points), vertices), LEAKY_SLOPE)
        x = F.leaky_relu(instance_norm(self.layer2(x), vertices), LEAKY_SLOPE)
        return instance_norm(self.layer3(x), vertices)


class ResidualBlock(nn.Module):
    """conv -> IN -> PReLU -> conv -> IN -> + input -> PReLU; one PReLU slope shared by both places."""

    def __init__(self, channels: int, half_dtype: torch.dtype | None = None):
        super().__init__()
        self.conv1 = PointwiseConv1d(channels, channels, half_dtype=half_dtype)
        self.prelu = nn.PReLU()
        self.conv2 = PointwiseConv1d(channels, channels, half_dtype=half_dtype)

    def forward(self, x: torch.Tensor, vertices: int | None = None) -> torch.Tensor:
        """x: (B, C, N') -> (B, C, N'), normalised over the first `vertices` (`instance_norm`)."""
        out = self.prelu(instance_norm(self.conv1(x), vertices))
        out = instance_norm(self.conv2(out), vertices)
        return self.prelu(out + x)


WarpFunction = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.dtype | None], torch.Tensor]


def dense_warp(identity_theta: torch.Tensor, pose_phi: torch.Tensor, pose_points: torch.Tensor,
               half_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The published computation: materialise C = theta^T phi, then the dense Sinkhorn warp.

    Args:
        identity_theta: float (B, C, N), unit length per vertex.
        pose_phi: float (B, C, M), unit length per vertex.
        pose_points: float (B, M, 3).
        half_dtype: fp16/bf16 for C's backward products (`mixed_product`), None for plain float32.
    Returns:
        warp_out: float (B, N, 3).
    """
    similarity = mixed_product(identity_theta.transpose(1, 2), pose_phi, half_dtype)  # (B, N, M)
    return sinkhorn_warp_dense(similarity, pose_points)


def stored_warp(identity_theta: torch.Tensor, pose_phi: torch.Tensor, pose_points: torch.Tensor,
                half_dtype: torch.dtype | None = None) -> torch.Tensor:
    """C materialised once in float32; Sinkhorn as compiled log-sum-exp passes over it that keep nothing
    else N x M for backward (same arguments). C is a cosine similarity, so its bound 1 spares every pass
    its maximum. With half_dtype, C is kept as 16-bit fixed point once formed, and dL/dC is written in half_dtype
    directly (`similarity_warp_stored`)."""
    if half_dtype is not None:
        return similarity_warp_stored(identity_theta.float(), pose_phi.float(), pose_points, half_dtype,
                                      compiled=True, similarity_bound=1.0, fixed_point=True)
    similarity = product(identity_theta.float().transpose(1, 2), pose_phi.float())  # (B, N, M)
    return sinkhorn_warp_stored(similarity, pose_points, compiled=True, similarity_bound=1.0)


def chunked_warp(identity_theta: torch.Tensor, pose_phi: torch.Tensor, pose_points: torch.Tensor,
                 half_dtype: torch.dtype | None = None) -> torch.Tensor:
    """`sinkhorn_warp_chunked`: C recomputed block by block and never held whole, memory linear in N (same
    arguments). With half_dtype, C's blocks come from split fp16 products on a GPU (float32 accuracy in practice,
    as in the stored warp); without, from float32's."""
    return sinkhorn_warp_chunked(identity_theta, pose_phi, pose_points, split_products=half_dtype is not None)


# "auto" stores C (and, when training, its gradient) while they fit in this many bytes, else recomputes
# C in blocks.
STORED_WARP_MAX_BYTES = 8 * 2**30


def _stored_bytes_per_element(needs_gradient: bool, half_dtype: torch.dtype | None) -> int:
    """The most bytes per element of C that stored_warp holds at once in C-sized tensors: in float32, C (4) and in
    training dL/dC (4); with half_dtype, the float32 C beside its int16 copy while the forward forms it (6), and
    in backward the int16 C and the half dL/dC (4)."""
    if half_dtype is not None:
        return 6
    return 8 if needs_gradient else 4


def _needs_gradient(identity_theta: torch.Tensor, pose_phi: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and (identity_theta.requires_grad or pose_phi.requires_grad)


def stored_or_chunked_warp(identity_theta: torch.Tensor, pose_phi: torch.Tensor, pose_points: torch.Tensor,
                           half_dtype: torch.dtype | None = None) -> torch.Tensor:
    """stored_warp while C fits in STORED_WARP_MAX_BYTES (fastest), else chunked_warp (same arguments): --ot auto
    on a GPU."""
    batch, _, num_identity = identity_theta.shape
    stored_bytes = (_stored_bytes_per_element(_needs_gradient(identity_theta, pose_phi), half_dtype) * batch
                    * num_identity * pose_phi.shape[2])
    warp = stored_warp if stored_bytes <= STORED_WARP_MAX_BYTES else chunked_warp
    return warp(identity_theta, pose_phi, pose_points, half_dtype)


# Bytes dense_warp holds at its peak in C-sized tensors on the CPU, per element of C: C, K and the plan as it is formed
# and normalised (16.8 measured at N = M = 3000, no gradient), and with a gradient what autograd keeps besides (33.0).
DENSE_WARP_BYTES_PER_ELEMENT = {False: 17, True: 33}


def available_memory(meminfo_path: str = "/proc/meminfo") -> int | None:
    """Bytes of memory the system can still give without swapping (Linux's MemAvailable), or None where it does not
    say."""
    try:
        with open(meminfo_path) as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def dense_or_chunked_warp(identity_theta: torch.Tensor, pose_phi: torch.Tensor, pose_points: torch.Tensor,
                          half_dtype: torch.dtype | None = None) -> torch.Tensor:
    """dense_warp, the published computation, while its N x M tensors fit in the memory available, else chunked_warp,
    the same values summed block by block with memory linear in N, and a warning (same arguments): --ot auto on the
    CPU, where dense_warp would otherwise stop with an allocation error, or be killed, on a large mesh."""
    batch, _, num_identity = identity_theta.shape
    num_pose = pose_phi.shape[2]
    dense_bytes = (DENSE_WARP_BYTES_PER_ELEMENT[_needs_gradient(identity_theta, pose_phi)] * batch * num_identity
                   * num_pose)
    available = available_memory()
    if available is None or dense_bytes <= available:
        return dense_warp(identity_theta, pose_phi, pose_points, half_dtype)
    warnings.warn(f"the dense optimal transport of {batch} pair(s) of {num_identity} and {num_pose} vertices would "
                  f"take {dense_bytes / 2**30:.1f} GiB, more than the {available / 2**30:.1f} GiB of memory available: "
                  f"it runs block by block instead (--ot chunked: the same values, memory linear in the vertex count)",
                  stacklevel=2)
    return chunked_warp(identity_theta, pose_phi, pose_points, half_dtype)


def auto_warp(identity_theta: torch.Tensor, pose_phi: torch.Tensor, pose_points: torch.Tensor,
              half_dtype: torch.dtype | None = None) -> torch.Tensor:
    """--ot auto (same arguments): `stored_or_chunked_warp` on a GPU, `dense_or_chunked_warp` on the CPU."""
    warp = stored_or_chunked_warp if identity_theta.is_cuda else dense_or_chunked_warp
    return warp(identity_theta, pose_phi, pose_points, half_dtype)


# The smallest batch of pairs for which `forward` takes the layer kernels once its layers are compiled
# (`Correspondence.compile_layers`). Against Inductor's code of the same layers, compiled inference with CUDA graphs on
# an H200 (docs/benchmarks.md, twenty-fifth session, calls 1 and 3): one pair 2.07 ms against 1.92, 2 pairs 646.3
# pairs/s against 689.5, 4 pairs 794.3 against 787.5, 8 pairs 894.4 against 859.3, 32 pairs 988.3 against 895.8.
COMPILED_KERNELS_MIN_BATCH = 4


# --ot choices. "dense" is the published computation and the reference the others are tested against.
WARPS: dict[str, WarpFunction] = {"dense": dense_warp, "stored": stored_warp, "chunked": chunked_warp,
                                  "auto": auto_warp}


class Correspondence(nn.Module):
    """Features, cosine similarity and optimal-transport warp of the pose mesh onto the identity mesh.

    The features keep float32 accuracy whatever `half_dtype` says: C enters exp(C / 0.03), so an error in the
    features or C is magnified about 33 times. With `half_dtype` (fp16/bf16) on a GPU, C (stored warp) and,
    under torch.compile, the 1x1 convolutions after the first layer are one fp16 product of split operands
    (`split_product`, 1.4e-6 relative error against float32's 2.9e-7), and the backward's matrix products after
    the first layer (the convolutions' and C's) run in that dtype (`mixed_product`), which moves the gradients
    by half-precision rounding. The stored warp then keeps C as 16-bit fixed point (steps of 1 / 32767, which
    moved warp_out by 1.4e-6 to 3.5e-5 relative in float64 tests), half the bytes of every pass over it. At inference
    on a GPU each 1x1 convolution is then one Triton kernel that also normalises and activates its input and splits
    it in registers (`forward_by_kernels`, feature_kernels.py): eager for every batch, and with the layers compiled
    (`compile_layers`) for batches of COMPILED_KERNELS_MIN_BATCH pairs and more. None: plain float32 throughout, the
    published arithmetic.
    """

    def __init__(self, ngf: int = 64, warp: WarpFunction = dense_warp, half_dtype: torch.dtype | None = None):
        super().__init__()
        channels = 4 * ngf
        self.adaptive_feature = PointFeature(ngf, half_dtype)
        self.layer = nn.Sequential(*[ResidualBlock(channels, half_dtype) for _ in range(4)])
        # phi is registered before theta: the published state_dict lists them in this order.
        self.phi = PointwiseConv1d(channels, channels, half_dtype=half_dtype)
        self.theta = PointwiseConv1d(channels, channels, half_dtype=half_dtype)
        self.warp = warp
        self.half_dtype = half_dtype
        self.kernels_fit = True  # until a kernel of `forward_by_kernels` needs more of the GPU than it has
        self.kernels_min_batch = 1  # COMPILED_KERNELS_MIN_BATCH once `compile_layers` has run
        # Each convolution's KernelWeight with the weight, its storage and its version it was formed from
        # (`_kernel_weight`).
        self._kernel_weights: dict[PointwiseConv1d, tuple[nn.Parameter, int, int, KernelWeight]] = {}

    def features(self, points: torch.Tensor, vertices: int | None = None) -> torch.Tensor:
        """points: (B, 3, N') -> features (B, 4ngf, N') after the residual blocks; statistics over the first
        `vertices` columns (None: all)."""
        x = normalize_features(self.adaptive_feature(points, vertices))
        for block in self.layer:
            x = block(x, vertices)
        return x

    def uses_kernels(self, points: torch.Tensor) -> bool:
        """Whether `forward` runs as Triton kernels (`forward_by_kernels`): at inference (no gradient) on the fast
        path (a half dtype), on a GPU the kernels support and fit, for batches of at least `kernels_min_batch`
        pairs, and not while Dynamo traces the forward (Corr or the model compiled whole keeps Inductor's code of the
        layers; the answer comes before the device query, which Dynamo would not trace)."""
        return (self.half_dtype is not None and points.is_cuda and not torch.is_grad_enabled()
                and not torch.compiler.is_compiling() and self.kernels_fit
                and points.shape[0] >= self.kernels_min_batch and feature_kernels.unsupported_reason(points) is None)

    def compile_layers(self) -> None:
        """torch.compile `forward_by_layers` in place, and take the kernels from COMPILED_KERNELS_MIN_BATCH pairs
        on: `forward` stays eager to choose, since Inductor's code of the layers is the faster for one pair and the
        kernels for batches."""
        self.forward_by_layers = torch.compile(self.forward_by_layers)
        self.kernels_min_batch = COMPILED_KERNELS_MIN_BATCH

    def forward_by_kernels(self, identity_points: torch.Tensor, pose_points: torch.Tensor,
                           identity_vertices: int | None = None,
                           pose_vertices: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward` without autograd, each 1x1 convolution one kernel that also applies its input's normalisation
        and activation (feature_kernels.py): the same values up to rounding (same arguments and results)."""
        return self._forward(identity_points, pose_points, identity_vertices, pose_vertices, self.kernel_features,
                             self._kernel_unit_projection)

    def kernel_features(self, points: torch.Tensor, vertices: int | None = None) -> torch.Tensor:
        """`features` as feature_kernels.py's kernels (same arguments and result, no autograd)."""
        vertices = points.shape[2] if vertices is None else vertices
        net = self.adaptive_feature
        leaky = points.new_full((1,), LEAKY_SLOPE)
        x, statistics, _ = normalized_convolution(points.float().contiguous(), self._kernel_weight(net.layer1),
                                                  net.layer1.bias, vertices)
        for layer in (net.layer2, net.layer3):
            x, statistics, _ = normalized_convolution(x, self._kernel_weight(layer), layer.bias, vertices,
                                                      statistics=statistics, slope=leaky)
        block_input = normalized_rows(x, statistics=statistics, unit_eps=FEATURE_NORM_EPS)
        slope = None
        for block in self.layer:
            if slope is None:
                hidden, hidden_statistics, _ = normalized_convolution(
                    block_input, self._kernel_weight(block.conv1), block.conv1.bias, vertices)
            else:  # the block's input, the previous block's output, formed as conv1 reads it and kept
                hidden, hidden_statistics, block_input = normalized_convolution(
                    x, self._kernel_weight(block.conv1), block.conv1.bias, vertices, statistics=statistics,
                    residual=block_input, slope=slope, keep_input=True)
            slope = block.prelu.weight
            x, statistics, _ = normalized_convolution(hidden, self._kernel_weight(block.conv2), block.conv2.bias,
                                                      vertices, statistics=hidden_statistics, slope=slope)
        return normalized_rows(x, statistics=statistics, residual=block_input, slope=slope)

    def _kernel_weight(self, conv: PointwiseConv1d) -> KernelWeight:
        """conv's weight as the kernels read it. Eager, it is formed again only when the weight has changed: an
        optimizer step or a loaded checkpoint bumps its version, a move to another device changes its storage,
        load_state_dict(assign=True) the parameter itself. Forming them all is some 90 small launches of host time
        per forward. Under a CUDA graph's capture it is formed in the graph, so that every replay reads the weights
        as they are then."""
        weight = conv.weight
        if weight.is_cuda and torch.cuda.is_current_stream_capturing():
            return kernel_weight(weight.squeeze(2))
        cached = self._kernel_weights.get(conv)
        if cached is None or cached[0] is not weight or cached[1:3] != (weight.data_ptr(), weight._version):
            cached = (weight, weight.data_ptr(), weight._version, kernel_weight(weight.squeeze(2)))
            self._kernel_weights[conv] = cached
        return cached[3]

    @staticmethod
    def _unit_projection(projection: PointwiseConv1d, features: torch.Tensor, vertices: int | None) -> torch.Tensor:
        """normalize_features(projection(features)), (B, C, N') -> (B, C, N) with N = vertices (None: N')."""
        return normalize_features(projection(features))[..., :vertices]

    def _kernel_unit_projection(self, projection: PointwiseConv1d, features: torch.Tensor,
                                vertices: int | None) -> torch.Tensor:
        """`_unit_projection` as feature_kernels.py's kernels."""
        projected, _, _ = normalized_convolution(features, self._kernel_weight(projection), projection.bias,
                                                 features.shape[2] if vertices is None else vertices)
        return normalized_rows(projected, unit_eps=FEATURE_NORM_EPS)[..., :vertices]

    def forward(self, identity_points: torch.Tensor, pose_points: torch.Tensor, identity_vertices: int | None = None,
                pose_vertices: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Warp the pose mesh onto the identity's vertices.

        Each mesh may come with its vertex axis padded (N' >= N columns, the real vertices first): the padding
        enters no statistic and no optimal-transport marginal, and only the features keep it.

        Args:
            identity_points: float (B, 3, N'), channels first; identity_vertices: N (None: N').
            pose_points: float (B, 3, M'), channels first; pose_vertices: M (None: M').
        Returns:
            warp_out: float (B, N, 3), the pose mesh in the identity's vertex order.
            identity_features: float (B, 4ngf, N'), the conditioning for the generator.
        """
        if self.uses_kernels(identity_points):
            try:
                return self.forward_by_kernels(identity_points, pose_points, identity_vertices, pose_vertices)
            except feature_kernels.KernelsDoNotFit as err:
                warnings.warn(f"{err}; the correspondence network runs its layers as before", stacklevel=2)
                self.kernels_fit = False
        return self.forward_by_layers(identity_points, pose_points, identity_vertices, pose_vertices)

    def forward_by_layers(self, identity_points: torch.Tensor, pose_points: torch.Tensor,
                          identity_vertices: int | None = None,
                          pose_vertices: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward` through the layers (what autograd, the CPU and the reference path run; same arguments and
        results)."""
        return self._forward(identity_points, pose_points, identity_vertices, pose_vertices, self.features,
                             self._unit_projection)

    def _forward(self, identity_points: torch.Tensor, pose_points: torch.Tensor, identity_vertices: int | None,
                 pose_vertices: int | None, features: Callable[[torch.Tensor, int | None], torch.Tensor],
                 unit_projection: Callable[[PointwiseConv1d, torch.Tensor, int | None], torch.Tensor]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward` with the feature network and the unit projections given."""
        if identity_points.shape == pose_points.shape and identity_vertices == pose_vertices:
            # One pass for both meshes (every layer acts on each batch element alone): half the kernel
            # launches, and products twice as large, which fill a GPU better at small batches.
            identity_features, pose_features = features(
                torch.cat([identity_points, pose_points]), identity_vertices).chunk(2)  # (B, 4ngf, N') each
        else:
            identity_features = features(identity_points, identity_vertices)
            pose_features = features(pose_points, pose_vertices)
        identity_theta = unit_projection(self.theta, identity_features, identity_vertices)  # (B, C, N)
        pose_phi = unit_projection(self.phi, pose_features, pose_vertices)  # (B, C, M)
        pose_xyz = pose_points[:, :, :pose_vertices].transpose(1, 2)  # (B, M, 3)
        warp_out = self.warp(identity_theta, pose_phi, pose_xyz, self.half_dtype)  # (B, N, 3)
        return warp_out, identity_features
