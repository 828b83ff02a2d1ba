"""Shared layers of the 3D-CoreNet networks: batched matrix products (`product`, aligned for tensor cores;
`mixed_product`, float32 forward with a half-precision backward) and the 1x1 convolution built on them."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

# Elements: 16 bytes of fp16/bf16. Hopper's fast tensor-core kernels need every matrix's leading dimension
# to be a multiple of this; at 6890 vertices (not one) cuBLAS falls back to kernels 1.5 to 3.6 times slower
# (docs/benchmarks.md, "Aligned vertex axis").
ALIGNMENT = 8
HALF_DTYPES = (torch.float16, torch.bfloat16)


def padded(t: torch.Tensor) -> torch.Tensor:
    """t (B, P, Q) with its columns zero-padded to a multiple of ALIGNMENT (t itself when Q is one). The zeros
    leave a product unchanged where the padding meets its contraction."""
    extra = -t.shape[2] % ALIGNMENT
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


class _MixedProduct(torch.autograd.Function):
    """`mixed_product` with its half-precision backward."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None,
                half_dtype: torch.dtype) -> torch.Tensor:
        ctx.save_for_backward(*half_copies(a, b, half_dtype))
        ctx.input_dtypes = a.dtype, b.dtype
        ctx.columns = b.shape[2]
        ctx.bias_shape = None if bias is None else bias.shape
        return product(a, b, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        a, b = ctx.saved_tensors
        grad_bias = grad.sum_to_size(ctx.bias_shape) if ctx.needs_input_grad[2] else None
        grad_a, grad_b = half_product_gradients(a, b, padded(grad.to(a.dtype)), ctx.columns,
                                                ctx.needs_input_grad[:2], ctx.input_dtypes)
        return grad_a, grad_b, grad_bias, None


def mixed_product(a: torch.Tensor, b: torch.Tensor, half_dtype: torch.dtype | None,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """bias + a @ b (batched) whose forward stays float32 and whose backward products run in half precision.

    The forward is the same float32 kernel either way, so values stay exact where they must (the
    correspondence network's features and similarity, which enter exp(C / 0.03)), while with `half_dtype`
    (fp16/bf16) the backward's two products, twice the forward's work, run on half-precision tensor cores,
    as autocast runs the generator's; the bias gradient is summed in float32. Gradients come back in the
    inputs' dtypes, carrying half-precision rounding. None: plain autograd.

    Args:
        a: float32 (B, P, K); b: float32 (B, K, Q); bias: None or float32 (P, 1).
        half_dtype: torch.float16, torch.bfloat16 or None.
    Returns:
        float32 (B, P, Q).
    """
    needs_gradient = any(t is not None and t.requires_grad for t in (a, b, bias))
    if half_dtype is None or not torch.is_grad_enabled() or not needs_gradient:
        return product(a, b, bias)
    return _MixedProduct.apply(a, b, bias, half_dtype)


class PointwiseConv1d(nn.Conv1d):
    """nn.Conv1d(in, out, kernel_size=1) computed as one batched matrix product.

    Same function, parameters and state_dict keys (weight (out, in, 1), bias (out,)) as the published
    1x1 convolutions, so checkpoints and spectral_norm work unchanged; on GPUs cuBLAS matrix products run
    these shapes (thousands of vertices, hundreds of channels) much faster than cuDNN's convolution kernels,
    above all in backward and in half precision. With `half_dtype` (fp16/bf16) the product is a
    `mixed_product`: float32 forward, half-precision backward.
    """

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True,
                 half_dtype: torch.dtype | None = None):
        super().__init__(in_channels, out_channels, kernel_size=1, bias=bias)
        self.half_dtype = half_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C_in, N) -> (B, C_out, N)."""
        weight = self.weight.squeeze(-1).expand(x.shape[0], -1, -1)  # (B, C_out, C_in)
        bias = None if self.bias is None else self.bias.unsqueeze(-1)  # (C_out, 1)
        return mixed_product(weight, x, self.half_dtype, bias)  # (B, C_out, N)
