"""Refinement generator ("G") of 3D-CoreNet with elastic instance normalisation (ElaIN), Sec. 3.2.

G refines the coarse warp_out into the final mesh, conditioned on the identity's correspondence features.
ElaIN blends the statistics of the conditioning (gamma_id, beta_id) with the input's own statistics
(std s, mean m) through a learned per-channel weight w. Attribute names follow the published state_dict.

`fold_linear=True` computes the same function with 38% of the arithmetic (213 -> 82 GFLOP per pair at 6890
vertices, ngf 64, by torch.utils.flop_counter): two affine layers with nothing between them are one affine layer.
So ElaIN's mlp_gamma(mlp_same(f)) and mlp_beta(mlp_same(f)) become one (2C x Cid) product of the identity features
(instead of C x Cid, then two C x C); conv1(fc(x)) becomes one kernel-3 convolution of the 3-channel input (instead
of a 1024 x 1024 product per vertex), computed as one product over each vertex's window; and each residual block's
output conv_s(a_s) + conv_1(a_1), followed by a convolution (conv2, conv3, conv4), becomes (W W_s) a_s + (W W_1) a_1,
two products of the branches, the second adding the first as it writes (`ElaINGenerator.block_then_conv`), without
the block's two C x C products and its C-channel sum. The folded weights are made from the parameters on every call
(spectral norm's power iteration included, once a call as unfolded), so training, gradients and checkpoints are
unchanged; only the rounding differs. With it, each ElaIN's map and the leaky ReLU after it are also one
autograd.Function whose backward is written out (`_ActivatedElaINMap`): the same values, fewer passes over the
activations in backward; at eager inference on a GPU, one Triton kernel with the condition's product
(elain_kernels.py).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import spectral_norm
from torch.autograd.function import once_differentiable
from torch.nn.utils.spectral_norm import SpectralNorm

from models.networks import elain_kernels
from models.networks.elain_kernels import activated_elain_map
from models.networks.layers import PointwiseConv1d, accumulated_product, aligned, product, runs_on_tensor_cores

ELAIN_EPS = 1e-5
# The negative slope of the leaky ReLU after every ElaIN.
LEAKY_SLOPE = 0.2


def statistics_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype ElaIN's statistics of t are taken in: float32, or float64 for float64 t (tests)."""
    return torch.promote_types(t.dtype, torch.float32)


def elain_moments(x: torch.Tensor, vertices: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """ElaIN's mean and std of x (B, C, N') over its first `vertices` columns (None: all), each (B, C, 1) in
    `statistics_dtype` (float32 even under mixed precision: a sum over N vertices in half precision loses the mean)."""
    statistics = x[..., :vertices].to(statistics_dtype(x))
    mean = statistics.mean(dim=2, keepdim=True)  # (B, C, 1)
    # Unbiased variance, unlike the InstanceNorm1d layers of Corr (SPEC.md; parity depends on it).
    std = torch.sqrt(statistics.var(dim=2, keepdim=True, unbiased=True) + ELAIN_EPS)  # (B, C, 1)
    return mean, std


def spectral_normalized_weight(conv: nn.Module) -> torch.Tensor:
    """conv.weight as calling conv would use it: its spectral_norm pre-hook is run first (one power iteration in
    training mode, as a call makes), so that the weight can be folded into another product without calling conv."""
    for hook in conv._forward_pre_hooks.values():
        if isinstance(hook, SpectralNorm):
            hook(conv, ())
    return conv.weight


def neighbour_columns(points: torch.Tensor, width: int) -> torch.Tensor:
    """Each vertex's window of `width` consecutive vertices (zeros past the ends), as the rows of the matrix
    a kernel-`width` convolution with padding width // 2 multiplies its flattened weight (C_out, C * width) by.

    Args:
        points: (B, C, N).
    Returns:
        (B, C * width, N): row c * width + k holds points[:, c, n + k - width // 2].
    """
    num_points = points.shape[2]
    padded = F.pad(points, (width // 2, width // 2))
    return torch.stack([padded[..., k:k + num_points] for k in range(width)], dim=2).flatten(1, 2)


def kernel_conv_as_product(points: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """F.conv1d(points, weight, bias, padding=K // 2) for an odd kernel K, as one matrix product over the
    vertices' windows (`neighbour_columns`): (B, C, N), (C_out, C, K), (C_out,) -> (B, C_out, N).

    cuDNN's kernel for this convolution's backward took 0.8 ms of a training step on the H100 (3 input
    channels, 1024 outputs, 6890 vertices); as a product, its two backward products only read the output's
    gradient. On tensor cores the contraction (C * K) is zero-padded to a multiple of ALIGNMENT.
    """
    columns = neighbour_columns(points, weight.shape[2])  # (B, C * K, N)
    flat_weight = weight.flatten(1)  # (C_out, C * K)
    if runs_on_tensor_cores(columns):
        extra = aligned(columns.shape[1]) - columns.shape[1]
        columns, flat_weight = F.pad(columns, (0, 0, 0, extra)), F.pad(flat_weight, (0, extra))
    return product(flat_weight.expand(points.shape[0], -1, -1), columns, bias.unsqueeze(-1))


def _elain_map_terms(x: torch.Tensor, gamma_id: torch.Tensor, beta_id: torch.Tensor, mean: torch.Tensor,
                     std: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x_hat = (x - mean) / std, 1 + gamma and beta of ElaIN's map y = x_hat (1 + gamma) + beta, in x's dtype:
    gamma = gamma_id w + std (1 - w), beta = beta_id w + mean (1 - w). Shapes as `_ActivatedElaINMap`."""
    dtype = x.dtype
    weight_x = weight.to(dtype)
    one_plus_gamma = 1 + (gamma_id.to(dtype) * weight_x + (std * (1 - weight)).to(dtype))
    beta = beta_id.to(dtype) * weight_x + (mean * (1 - weight)).to(dtype)
    return (x - mean.to(dtype)) / std.to(dtype), one_plus_gamma, beta


def _with_bias(products: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """products (B, C, N') plus bias (C, 1), in the products' dtype, as `product` adds a bias under torch.compile."""
    return products + bias.to(products.dtype)


class _ActivatedElaINMap(torch.autograd.Function):
    """leaky_relu(y) with y = x_hat (1 + gamma) + beta, ElaIN's map on every column (`_elain_map_terms`), and a
    backward written out: one pass over the (B, C, N') tensors gives the elementwise gradients and the five sums
    over columns that the (B, C, 1) inputs' gradients need, where autograd through the map differentiates its
    operations one by one.

    The condition gamma_id = P_gamma + b_gamma, beta_id = P_beta + b_beta comes in as its products P and its biases
    b: the biases' gradients are then sums over the batch of the (B, C, 1) sums below, where a bias added to P
    before the map would have its gradient summed again over the (B, C, N') gradient of P.

    With g = dL/dy (the activation's gradient applied) and sums over all columns:
    dL/dx = g (1 + gamma) / std, dL/dP_gamma = g x_hat w, dL/dP_beta = g w,
    dL/db_gamma = sum over the batch of w S2, dL/db_beta = sum over the batch of w S1,
    dL/dmean = (1 - w) S1 - ((1 + std (1 - w)) S1 + w S3) / std,
    dL/dstd = (1 - w) S2 - ((1 + std (1 - w)) S2 + w S4) / std,
    dL/dw = S4 - std S2 + S5 - mean S1,
    where S1 = sum g, S2 = sum g x_hat, S3 = sum g gamma_id, S4 = sum g gamma_id x_hat, S5 = sum g beta_id.
    mean, std and w come from x's statistics and the identity features; their own gradients flow on through
    autograd.

    Args (forward):
        x, gamma_products, beta_products: (B, C, N'), x's dtype (half under autocast).
        gamma_bias, beta_bias: (C, 1), the composed biases: float32, or half where autocast runs their composition.
        mean, std, weight: (B, C, 1) in `statistics_dtype`.
    Returns:
        (B, C, N') in x's dtype.
    """

    @staticmethod
    def forward(ctx, x, gamma_products, beta_products, gamma_bias, beta_bias, mean, std, weight):
        gamma_id, beta_id = _with_bias(gamma_products, gamma_bias), _with_bias(beta_products, beta_bias)
        x_hat, one_plus_gamma, beta = _elain_map_terms(x, gamma_id, beta_id, mean, std, weight)
        ctx.save_for_backward(x, gamma_products, beta_products, gamma_bias, beta_bias, mean, std, weight)
        return F.leaky_relu(x_hat * one_plus_gamma + beta, LEAKY_SLOPE)

    @staticmethod
    @once_differentiable  # the saved tensors carry no graph: a second derivative would be wrong
    def backward(ctx, grad_out):
        x, gamma_products, beta_products, gamma_bias, beta_bias, mean, std, weight = ctx.saved_tensors
        gamma_id, beta_id = _with_bias(gamma_products, gamma_bias), _with_bias(beta_products, beta_bias)
        x_hat, one_plus_gamma, beta = _elain_map_terms(x, gamma_id, beta_id, mean, std, weight)
        grad = torch.where(x_hat * one_plus_gamma + beta > 0, grad_out, grad_out * LEAKY_SLOPE)  # dL/dy
        grad_stats, x_hat_stats, gamma_id_stats = (t.to(mean.dtype) for t in (grad, x_hat, gamma_id))
        sums = [(grad_stats * factor).sum(dim=2, keepdim=True) for factor in (
            1, x_hat_stats, gamma_id_stats, gamma_id_stats * x_hat_stats, beta_id.to(mean.dtype))]  # S1..S5
        shortcut = 1 + std * (1 - weight)
        grad_mean = (1 - weight) * sums[0] - (shortcut * sums[0] + weight * sums[2]) / std
        grad_std = (1 - weight) * sums[1] - (shortcut * sums[1] + weight * sums[3]) / std
        grad_weight = sums[3] - std * sums[1] + sums[4] - mean * sums[0]
        grad_gamma_bias = (weight * sums[1]).sum(dim=0).to(gamma_bias.dtype)  # (C, 1)
        grad_beta_bias = (weight * sums[0]).sum(dim=0).to(beta_bias.dtype)
        weight_x = weight.to(x.dtype)
        return (grad * one_plus_gamma / std.to(x.dtype), grad * x_hat * weight_x, grad * weight_x, grad_gamma_bias,
                grad_beta_bias, grad_mean, grad_std, grad_weight)


class ElaIN(nn.Module):
    """Elastic instance normalisation of x (B, C, N), conditioned on identity features (B, Cid, N)."""

    def __init__(self, channels: int, identity_channels: int = 256, fold_linear: bool = False):
        super().__init__()
        self.mlp_same = PointwiseConv1d(identity_channels, channels)
        self.mlp_gamma = PointwiseConv1d(channels, channels)
        self.mlp_beta = PointwiseConv1d(channels, channels)
        self.mlp_weight = PointwiseConv1d(2 * channels, channels)
        self.fold_linear = fold_linear

    def identity_terms(self, identity_features: torch.Tensor,
                       vertices: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """gamma_id, beta_id (B, C, N') in the products' dtype (half under autocast), and the mean over the first
        `vertices` columns (None: all) of mlp_same's output (B, C, 1) in `statistics_dtype` (float32).

        Folded: gamma_id and beta_id come from one product with the composed weights (`folded_identity_products`).
        """
        if not self.fold_linear:
            condition = self.mlp_same(identity_features)  # (B, C, N)
            return (self.mlp_gamma(condition), self.mlp_beta(condition),
                    condition[..., :vertices].to(statistics_dtype(identity_features)).mean(dim=2, keepdim=True))
        gamma_products, beta_products, gamma_bias, beta_bias, condition_mean = self.folded_identity_products(
            identity_features, vertices)
        return _with_bias(gamma_products, gamma_bias), _with_bias(beta_products, beta_bias), condition_mean

    def folded_condition(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The condition [gamma_id; beta_id] = [mlp_gamma; mlp_beta](mlp_same(f)) of the identity features f as one
        affine map: its composed weight (2C, Cid) and bias (2C,), the gamma rows first."""
        same_weight = self.mlp_same.weight.squeeze(-1)  # (C, Cid)
        outer_weight = torch.cat([self.mlp_gamma.weight, self.mlp_beta.weight]).squeeze(-1)  # (2C, C)
        weight = outer_weight @ same_weight  # (2C, Cid)
        bias = outer_weight @ self.mlp_same.bias + torch.cat([self.mlp_gamma.bias, self.mlp_beta.bias])  # (2C,)
        return weight, bias

    def condition_mean(self, identity_features: torch.Tensor, vertices: int | None = None) -> torch.Tensor:
        """The mean of mlp_same's output over the first `vertices` columns (None: all), (B, C, 1) in
        `statistics_dtype`: the mean of the (affine) condition is the condition of the mean."""
        mean_features = identity_features[..., :vertices].mean(dim=2, keepdim=True,
                                                               dtype=statistics_dtype(identity_features))  # (B, Cid, 1)
        return self.mlp_same.on_statistics(mean_features).to(statistics_dtype(identity_features))

    def folded_identity_products(self, identity_features: torch.Tensor,
                                 vertices: int | None = None) -> tuple[torch.Tensor, ...]:
        """The folded condition before its bias: gamma_id = P_gamma + b_gamma and beta_id = P_beta + b_beta with
        P_gamma, P_beta (B, C, N') from one product of the identity features with the composed weight
        (`folded_condition`), b_gamma, b_beta (C, 1) the composed biases, and `condition_mean`."""
        weight, bias = self.folded_condition()
        gamma_beta = product(weight.expand(identity_features.shape[0], -1, -1), identity_features)  # (B, 2C, N')
        gamma_products, beta_products = gamma_beta.chunk(2, dim=1)
        gamma_bias, beta_bias = bias.unsqueeze(-1).chunk(2)  # (C, 1) each
        return gamma_products, beta_products, gamma_bias, beta_bias, self.condition_mean(identity_features, vertices)

    def statistics(self, x: torch.Tensor, condition_mean: torch.Tensor, vertices: int | None = None,
                   moments: tuple[torch.Tensor, torch.Tensor] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x's mean and std (`elain_moments`, or `moments` where the caller has them) and the blend weight w, each
        (B, C, 1) in `statistics_dtype`, from x (B, C, N') over its first `vertices` columns and the condition's mean
        (B, C, 1)."""
        mean, std = elain_moments(x, vertices) if moments is None else moments
        stacked = torch.cat([condition_mean, mean], dim=1)  # (B, 2C, 1)
        weight = self.mlp_weight.on_statistics(stacked) if self.fold_linear else self.mlp_weight(stacked)
        return mean, std, weight.to(mean.dtype)

    def forward(self, x: torch.Tensor, identity_features: torch.Tensor, vertices: int | None = None) -> torch.Tensor:
        """
        Args:
            x: float (B, C, N').
            identity_features: float (B, Cid, N').
            vertices: the real vertex count N <= N', the columns the statistics run over (None: all); the
                columns past it are padding (`ElaINGenerator`).
        Returns:
            float (B, C, N'). The (B, C, N') map runs in x's dtype: float32 on the reference path, half precision
            under autocast, which halves the memory it moves.
        """
        gamma_id, beta_id, condition_mean = self.identity_terms(identity_features, vertices)
        x_hat, one_plus_gamma, beta = _elain_map_terms(x, gamma_id, beta_id,
                                                       *self.statistics(x, condition_mean, vertices))
        return x_hat * one_plus_gamma + beta

    def activated(self, x: torch.Tensor, identity_features: torch.Tensor, vertices: int | None = None,
                  moments: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """leaky_relu(self(x, identity_features, vertices)), what every ElaIN of the generator is followed by;
        with fold_linear, map and activation are one `_ActivatedElaINMap` (the same values), or at eager inference on
        a GPU one kernel with the condition's product (`activated_by_kernel`, where `elain_kernels.applies`). With
        fold_linear, `moments` are x's (`elain_moments`) where the caller has them (two ElaINs of a block read the
        same x)."""
        if not self.fold_linear:
            return F.leaky_relu(self(x, identity_features, vertices), LEAKY_SLOPE)
        if elain_kernels.applies(x):
            return self.activated_by_kernel(x, identity_features, vertices, moments)
        gamma_products, beta_products, gamma_bias, beta_bias, condition_mean = self.folded_identity_products(
            identity_features, vertices)
        return _ActivatedElaINMap.apply(x, gamma_products, beta_products, gamma_bias, beta_bias,
                                        *self.statistics(x, condition_mean, vertices, moments))

    def activated_by_kernel(self, x: torch.Tensor, identity_features: torch.Tensor, vertices: int | None = None,
                            moments: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """`activated` with fold_linear, no autograd: the condition's product, the map and the activation as one
        kernel (elain_kernels.py), which writes neither gamma_id nor beta_id. Same arguments and values up to
        rounding; x in half precision."""
        weight, bias = self.folded_condition()
        mean, std, blend = self.statistics(x, self.condition_mean(identity_features, vertices), vertices, moments)
        return activated_elain_map(x.contiguous(), identity_features.contiguous(), weight.to(x.dtype).contiguous(),
                                   bias, mean, std, blend, LEAKY_SLOPE)


class ElaINBlock(nn.Module):
    """Residual block: learned shortcut conv_s(lrelu(norm_s)) plus two norm-lrelu-conv steps."""

    def __init__(self, channels: int, identity_channels: int = 256, fold_linear: bool = False):
        super().__init__()
        self.conv_0 = spectral_norm(PointwiseConv1d(channels, channels))
        self.conv_1 = spectral_norm(PointwiseConv1d(channels, channels))
        self.conv_s = spectral_norm(PointwiseConv1d(channels, channels, bias=False))
        self.norm_0 = ElaIN(channels, identity_channels, fold_linear)
        self.norm_1 = ElaIN(channels, identity_channels, fold_linear)
        self.norm_s = ElaIN(channels, identity_channels, fold_linear)

    def branches(self, x: torch.Tensor, identity_features: torch.Tensor,
                 vertices: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The inputs of the block's two output convolutions, conv_s and conv_1, each (B, C, N'):
        lrelu(norm_s(x)) and lrelu(norm_1(conv_0(lrelu(norm_0(x)))))."""
        moments = elain_moments(x, vertices) if self.norm_s.fold_linear else None  # norm_s's and norm_0's
        shortcut_input = self.norm_s.activated(x, identity_features, vertices, moments)
        dx = self.conv_0(self.norm_0.activated(x, identity_features, vertices, moments))
        return shortcut_input, self.norm_1.activated(dx, identity_features, vertices)

    def forward(self, x: torch.Tensor, identity_features: torch.Tensor, vertices: int | None = None) -> torch.Tensor:
        """x: (B, C, N'), identity_features: (B, Cid, N') -> (B, C, N'); vertices as in `ElaIN`."""
        shortcut_input, residual_input = self.branches(x, identity_features, vertices)
        return self.conv_s(shortcut_input) + self.conv_1(residual_input)


class ElaINGenerator(nn.Module):
    """warp_out (B, 3, N) + identity features (B, 4ngf, N) -> refined points (B, 3, N) in (-2, 2)."""

    def __init__(self, ngf: int = 64, fold_linear: bool = False):
        super().__init__()
        identity_channels = 4 * ngf
        # Kernel 3 along the vertex axis: the output depends on vertex order (why inputs are shuffled).
        self.fc = nn.Conv1d(3, 16 * ngf, kernel_size=3, padding=1)
        self.conv1 = PointwiseConv1d(16 * ngf, 16 * ngf)
        self.conv2 = PointwiseConv1d(16 * ngf, 8 * ngf)
        self.conv3 = PointwiseConv1d(8 * ngf, 4 * ngf)
        self.conv4 = PointwiseConv1d(4 * ngf, 3)
        self.elain_block1 = ElaINBlock(16 * ngf, identity_channels, fold_linear)
        self.elain_block2 = ElaINBlock(8 * ngf, identity_channels, fold_linear)
        self.elain_block3 = ElaINBlock(4 * ngf, identity_channels, fold_linear)
        self.fold_linear = fold_linear

    def input_layers(self, warp_points: torch.Tensor) -> torch.Tensor:
        """conv1(fc(warp_points)): (B, 3, N) -> (B, 16ngf, N); folded, one convolution with the composed weight
        (`kernel_conv_as_product`)."""
        if not self.fold_linear:
            return self.conv1(self.fc(warp_points))
        conv1_weight = self.conv1.weight.squeeze(-1)  # (16ngf, 16ngf)
        weight = (conv1_weight @ self.fc.weight.flatten(1)).view_as(self.fc.weight)  # (16ngf, 3, 3)
        bias = conv1_weight @ self.fc.bias + self.conv1.bias
        return kernel_conv_as_product(warp_points, weight, bias)

    def block_then_conv(self, block: ElaINBlock, conv: PointwiseConv1d, x: torch.Tensor,
                        identity_features: torch.Tensor, vertices: int | None) -> torch.Tensor:
        """conv(block(x)): (B, C, N') -> (B, C_out, N'). Folded, W (W_s a_s + W_1 a_1 + b_1) + b as
        (W W_s) a_s + (W W_1) a_1 + (W b_1 + b) of the block's branches (`ElaINBlock.branches`): two products, the
        second adding the first as it writes (`accumulated_product`). One product of the stacked branches
        [a_s; a_1] would first copy both into a (B, 2C, N') tensor."""
        if not self.fold_linear:
            return conv(block(x, identity_features, vertices))
        shortcut_input, residual_input = block.branches(x, identity_features, vertices)
        out_weight = conv.weight.squeeze(-1)  # (C_out, C)
        batch = x.shape[0]
        shortcut_weight = out_weight @ spectral_normalized_weight(block.conv_s).squeeze(-1)  # (C_out, C)
        residual_weight = out_weight @ spectral_normalized_weight(block.conv_1).squeeze(-1)  # (C_out, C)
        bias = out_weight @ block.conv_1.bias + conv.bias  # (C_out,)
        shortcut_out = product(shortcut_weight.expand(batch, -1, -1), shortcut_input, bias.unsqueeze(-1))
        return accumulated_product(shortcut_out, residual_weight.expand(batch, -1, -1), residual_input)

    def forward(self, warp_points: torch.Tensor, identity_features: torch.Tensor,
                vertices: int | None = None) -> torch.Tensor:
        """The vertex axis may be padded (N' >= N columns, the real vertices first): every layer but the
        normalisations' statistics acts on each column alone, and the input convolution's window reads the
        padding as the zeros its own padding would give, so with warp_points zero past N the first N output
        columns are those of the unpadded input.

        Args:
            warp_points: float (B, 3, N'), the coarse warp_out channels first, zero past column N.
            identity_features: float (B, 4ngf, N') from the correspondence network.
            vertices: N (None: N').
        Returns:
            float (B, 3, N').
        """
        x = self.input_layers(warp_points)
        if self.fold_linear and elain_kernels.applies(x):
            # The ElaIN kernels read the features in x's dtype: rounded once here rather than in each of the nine
            # kernels (autocast rounds a product's operand the same way).
            identity_features = identity_features.to(x.dtype)
        x = self.block_then_conv(self.elain_block1, self.conv2, x, identity_features, vertices)
        x = self.block_then_conv(self.elain_block2, self.conv3, x, identity_features, vertices)
        x = self.block_then_conv(self.elain_block3, self.conv4, x, identity_features, vertices)
        return 2 * torch.tanh(x)
