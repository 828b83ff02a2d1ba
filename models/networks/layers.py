"""Shared layers of the 3D-CoreNet networks: batched matrix products (`product`, aligned for tensor cores;
`split_product`, float32-class products on fp16 tensor cores; `mixed_product`, float32-class forward with a
half-precision backward) and the 1x1 convolution built on them."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

# Elements: 16 bytes of fp16/bf16. Hopper's fast tensor-core kernels need every matrix's leading dimension
# to be a multiple of this; at 6890 vertices (not one) cuBLAS falls back to kernels 1.5 to 3.6 times slower
# (docs/benchmarks.md, "Aligned vertex axis").
ALIGNMENT = 8
HALF_DTYPES = (torch.float16, torch.bfloat16)
# torch.bmm(..., out_dtype=torch.float32) on fp16 CUDA tensors (`float_product_of_halves`) arrived in PyTorch 2.8;
# with an older torch, `split_product` is not used and float32's products run instead.
FLOAT_OUTPUT_HALF_PRODUCTS = "dtype" in torch.ops.aten.bmm.overloads()
# F.instance_norm's default epsilon, which the published InstanceNorm1d layers (Corr's, NPT's) use.
INSTANCE_NORM_EPS = 1e-5


def aligned(size: int) -> int:
    """size rounded up to a multiple of ALIGNMENT."""
    return size + -size % ALIGNMENT


def padded(t: torch.Tensor) -> torch.Tensor:
    """t (B, P, Q) with its columns zero-padded to a multiple of ALIGNMENT (t itself when Q is one). The zeros
    leave a product unchanged where the padding meets its contraction."""
    extra = aligned(t.shape[2]) - t.shape[2]
    return F.pad(t, (0, extra)) if extra else t


def runs_on_tensor_cores(b: torch.Tensor) -> bool:
    """Whether a product with b would run in half precision on a GPU (half b, or CUDA autocast on): the
    case where a misaligned vertex axis costs (float32 products run the same either way)."""
    return b.is_cuda and (b.dtype in HALF_DTYPES or torch.is_autocast_enabled("cuda"))


def product(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """bias + a @ b, batched: (B, P, Q) from a (B, P, K), b (B, K, Q) and bias None or (P, 1).

    On tensor cores (`runs_on_tensor_cores`) the product runs on b's columns (the vertex axis) zero-padded
    to a multiple of ALIGNMENT and returns a view of the first Q: the same values, and, through autograd,
    aligned backward products too (their rows or contraction run over the padded axis).
    Under torch.compile the bias is added after the product, where Inductor fuses the addition into the
    next kernel: its baddbmm would first copy the broadcast bias into the output, then read it back.
    """
    columns = b.shape[2]
    if runs_on_tensor_cores(b):
        b = padded(b)
    if bias is None:
        out = torch.bmm(a, b)
    elif torch.compiler.is_compiling():
        out = torch.bmm(a, b)
        out = out + bias.to(out.dtype)
    else:
        out = torch.baddbmm(bias, a, b)
    return out[..., :columns]


def accumulated_product(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """c + a @ b, batched, as one product that adds c as it writes its output: (B, P, Q) from c (B, P, Q),
    a (B, P, K) and b (B, K, Q); on tensor cores aligned as `product` aligns (a view of the first Q columns)."""
    columns = b.shape[2]
    if runs_on_tensor_cores(b):
        b, c = padded(b), padded(c)
    return torch.baddbmm(c, a, b)[..., :columns]


# Clears the 13 low significand bits of a float32 (0xFFFFE000 as int32), leaving float16's 11 significant bits.
HALF_SIGNIFICAND_MASK = -8192


def half_pieces(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 x as fp16 (hi, lo) with x = hi + lo to about 2^-21 relative (2^-24 absolute below float16's
    normal range): hi is x cut to float16's 11 significant bits, lo = x - hi (exact in float32) rounded to fp16,
    subnormal where |x| is below about 0.1 (tensor cores multiply fp16 subnormals exactly).

    hi is cut with a bit mask rather than as x.to(float16).float(): Inductor computes in float32 and drops such
    a round trip inside a kernel, which would leave lo = 0.
    """
    hi = (x.view(torch.int32) & HALF_SIGNIFICAND_MASK).view(torch.float32)
    return hi.to(torch.float16), (x - hi).to(torch.float16)


def split_operands(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp16 operands of `split_product`: [a_hi | a_hi | a_lo] (B, P, 3K) and [b_hi; b_lo; b_hi] (B, 3K, Q')
    with Q' = Q padded (`padded`), so that their one product sums a_hi b_hi + a_hi b_lo + a_lo b_hi.

    Args:
        a: float32 (B, P, K); b: float32 (B, K, Q), both within float16's range (|x| < 65504).
    """
    a_hi, a_lo = half_pieces(a)
    b_hi, b_lo = (padded(piece) for piece in half_pieces(b))
    # Each piece padded before the concatenation: compiled, the one kernel that splits b then writes the padded
    # layout directly (padding the concatenated tensor took a copy of its own, 0.9 ms of a training step).
    return torch.cat([a_hi, a_hi, a_lo], dim=2), torch.cat([b_hi, b_lo, b_hi], dim=1)


def float_product_of_halves(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """left @ right of fp16 (B, P, K), (B, K, Q) as float32 (B, P, Q): one tensor-core product accumulated and
    written in float32 on a GPU; on a CPU (tests) the same products, exact in float32, summed in float32."""
    if left.is_cuda:
        return torch.bmm(left, right, out_dtype=torch.float32)
    return torch.bmm(left.float(), right.float())


def split_products_run_on(t: torch.Tensor) -> bool:
    """Whether products with t use `split_product` where they may (a CUDA tensor and a torch that has it)."""
    return t.is_cuda and FLOAT_OUTPUT_HALF_PRODUCTS


def split_product(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None,
                  form_operands: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
                  = split_operands) -> torch.Tensor:
    """bias + a @ b for float32 a, b, as accurate as float32 in practice, on fp16 tensor cores.

    Each operand is split into fp16 pieces, x = hi + lo, and the three products that matter (hi hi, hi lo,
    lo hi; lo lo is below float32's rounding) run as one fp16 product with the contraction tripled, accumulated
    in float32. On the H100 this is 3.7 times faster than cuBLAS's float32 product for C = theta^T phi at batch
    8 (1.09 against 4.04 ms), at 1.4e-6 relative error to float64 against float32's 2.9e-7
    (docs/benchmarks.md, "Float32-class products from one fp16 product").

    Args:
        a: float32 (B, P, K); b: float32 (B, K, Q), both within float16's range; bias: None or (P, 1).
        form_operands: `split_operands`, or the same function compiled (the stored warp's C).
    Returns:
        float32 (B, P, Q); without a bias, a view of the first Q columns of a (B, P, Q') product (Q' = Q padded).
    """
    left, right = form_operands(a, b)
    out = float_product_of_halves(left, right)[..., :b.shape[2]]
    return out if bias is None else out + bias


def half_copies(a: torch.Tensor, b: torch.Tensor, half_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """What a half-precision backward of a @ b keeps: a (B, P, K) row-major (K, its last, is channels) and
    b (B, K, Q) with its columns padded (`padded`), both in half_dtype: every leading dimension aligned, and
    half the memory of float32 copies."""
    return a.to(half_dtype, memory_format=torch.contiguous_format), padded(b.to(half_dtype))


def half_product_gradients(a: torch.Tensor, b: torch.Tensor, grad: torch.Tensor, columns: int,
                           needs_grad: tuple[bool, bool],
                           dtypes: tuple[torch.dtype, torch.dtype]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of a @ b from `half_copies` and the output's gradient, as two half-precision products.

    Args:
        a: half (B, P, K); b: half (B, K, Q'), Q' = Q padded; grad: half (B, P, Q'), zero past column Q.
        columns: Q. needs_grad: which of (a, b) need a gradient. dtypes: the dtypes to return them in.
    Returns:
        dL/da (B, P, K) and dL/db (B, K, Q), or None where not needed.
    """
    grad_a = torch.bmm(grad, b.transpose(1, 2)).to(dtypes[0]) if needs_grad[0] else None  # (B, P, K)
    grad_b = torch.bmm(a.transpose(1, 2), grad)[..., :columns].to(dtypes[1]) if needs_grad[1] else None  # (B, K, Q)
    return grad_a, grad_b


def _mixed_forward(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`mixed_product`'s float32-class forward: `split_product` when compiled on a GPU, where Inductor fuses the
    split into the kernels that produce b; eager, the split's own passes would cost what it saves, so there
    (and on a CPU) it is cuBLAS's or the CPU's float32 product."""
    if split_products_run_on(a) and torch.compiler.is_compiling():
        return split_product(a, b, bias)
    return product(a, b, bias)


class _MixedProduct(torch.autograd.Function):
    """`mixed_product` with its half-precision backward."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None,
                half_dtype: torch.dtype) -> torch.Tensor:
        ctx.save_for_backward(*half_copies(a, b, half_dtype))
        ctx.input_dtypes = a.dtype, b.dtype
        ctx.columns = b.shape[2]
        ctx.bias_shape = None if bias is None else bias.shape
        return _mixed_forward(a, b, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        a, b = ctx.saved_tensors
        half_grad = padded(grad.to(a.dtype))  # (B, P, Q'), zero past column Q
        # The bias gradient sums the half-precision gradient the products read, in float32: compiled, the float32
        # gradient then need not be written out for this sum alone.
        grad_bias = (half_grad.sum(dim=(0, 2), dtype=torch.float32).reshape(ctx.bias_shape)
                     if ctx.needs_input_grad[2] else None)
        grad_a, grad_b = half_product_gradients(a, b, half_grad, ctx.columns, ctx.needs_input_grad[:2],
                                                ctx.input_dtypes)
        return grad_a, grad_b, grad_bias, None


def mixed_product(a: torch.Tensor, b: torch.Tensor, half_dtype: torch.dtype | None,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """bias + a @ b (batched) whose forward keeps float32 accuracy and whose backward products run in half precision.

    With `half_dtype` (fp16/bf16) the forward is float32's product, or under torch.compile on a GPU
    `split_product` (float32-class accuracy from fp16 pieces), so values stay exact where they must (the
    correspondence network's features and similarity, which enter exp(C / 0.03)), while the backward's two
    products, twice the forward's work, run on half-precision tensor cores, as autocast runs the generator's;
    the bias gradient is the float32 sum of the half-precision output gradient. Gradients come back in the
    inputs' dtypes, carrying half-precision rounding. None: plain autograd, float32's product.

    Args:
        a: float32 (B, P, K); b: float32 (B, K, Q); bias: None or float32 (P, 1).
        half_dtype: torch.float16, torch.bfloat16 or None.
    Returns:
        float32 (B, P, Q).
    """
    if half_dtype is None:
        return product(a, b, bias)
    needs_gradient = any(t is not None and t.requires_grad for t in (a, b, bias))
    if not torch.is_grad_enabled() or not needs_gradient:
        return _mixed_forward(a, b, bias)
    return _MixedProduct.apply(a, b, bias, half_dtype)


# Under torch.compile, outside autocast, a 1x1 convolution with at most this many input channels (the correspondence
# network's first layer reads x, y, z) is that many broadcast multiply-adds (`few_channel_product`). cuBLAS's float32
# weight gradient of its (64, 3) weight over 16 x 6896 vertices took 0.21 ms of a training step on the H100 (a 32 x 32
# tile kernel at 0 TFLOP/s, docs/products_by_shape_h100_2026-12-06.txt); as a reduction Inductor fuses it is a pass
# over the gradient.
FEW_INPUT_CHANNELS = 4


def few_channel_product(weight: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """bias + weight @ x as a sum over the few input channels of broadcast products, the form of a 1x1
    convolution Inductor fuses with its neighbours, in both directions.

    Args:
        weight: (C_out, C_in); x: (B, C_in, N); bias: None or (C_out, 1).
    Returns:
        (B, C_out, N).
    """
    out = sum(weight[:, channel].unsqueeze(1) * x[:, channel].unsqueeze(1) for channel in range(x.shape[1]))
    return out if bias is None else out + bias


class PointwiseConv1d(nn.Conv1d):
    """nn.Conv1d(in, out, kernel_size=1) computed as one batched matrix product.

    Same function, parameters and state_dict keys (weight (out, in, 1), bias (out,)) as the published
    1x1 convolutions, so checkpoints and spectral_norm work unchanged; on GPUs cuBLAS matrix products run
    these shapes (thousands of vertices, hundreds of channels) much faster than cuDNN's convolution kernels,
    above all in backward and in half precision. With `half_dtype` (fp16/bf16) the product is a
    `mixed_product`: float32-class forward, half-precision backward.
    """

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True,
                 half_dtype: torch.dtype | None = None):
        super().__init__(in_channels, out_channels, kernel_size=1, bias=bias)
        self.half_dtype = half_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C_in, N) -> (B, C_out, N)."""
        bias = None if self.bias is None else self.bias.unsqueeze(-1)  # (C_out, 1)
        if (torch.compiler.is_compiling() and self.in_channels <= FEW_INPUT_CHANNELS
                and not torch.is_autocast_enabled(x.device.type)):  # under autocast a product's dtype is autocast's
            return few_channel_product(self.weight.squeeze(-1), x, bias)
        weight = self.weight.squeeze(-1).expand(x.shape[0], -1, -1)  # (B, C_out, C_in)
        return mixed_product(weight, x, self.half_dtype, bias)  # (B, C_out, N)

    def on_statistics(self, statistics: torch.Tensor) -> torch.Tensor:
        """This convolution of per-channel statistics, (B, C_in, 1) -> (B, C_out, 1), as one (B, C_in) x (C_in, C_out)
        product: it reads the weight once and its weight gradient is one product, where the batched product reads
        the weight B times, pads the single column to ALIGNMENT on tensor cores and sums B weight gradients."""
        return F.linear(statistics.squeeze(2), self.weight.squeeze(2), self.bias).unsqueeze(2)
