"""Float32 matrix products on half-precision tensor cores, for the correspondence network's forward (issue 4).

Each float32 operand x is split into two fp16 pieces, x = hi + lo / 2048 with hi = fp16(x) and
lo = fp16((x - hi) * 2048), which together keep about 22 significant bits (fp16 has 11; float32 24). Then
a @ b = hi_a @ hi_b + (hi_a @ lo_b + lo_a @ hi_b) / 2048 + lo_a @ lo_b / 2048^2, and the last term, below
2^-22 relative, is dropped: three fp16 tensor-core products with float32 accumulation, about 5e-7 relative
error, where a float32 product measured 3e-7 and one fp16 product 4e-4 (H100, K = 256). The split is done
in registers inside one Triton kernel, so the memory traffic is a float32 product's.

The correspondence network needs this accuracy: its similarity C enters exp(C / 0.03), and an error of
4e-4 in C becomes one of about 1% in the transport plan. Its products are also too small for the H100's
float32 units to be busy (46 TFLOP/s for C at batch 8, 33 for a 256-channel convolution).

Range: fp16 holds |x| < 65504. The operands this is used for are bounded far below that: instance-normalised
activations (|x| <= sqrt(N - 1) per channel, before a residual sum of a few), unit feature vectors and the
layers' weights. Inputs with |x| >= 65504 would give inf, so the callers keep raw points out of it.
"""
from __future__ import annotations

import torch
from torch.utils._triton import has_triton

# lo = fp16((x - hi) * LO_SCALE): the residual of an fp16 rounding is at most 2^-11 |x|, so this scale keeps lo
# in fp16's normal range for every normal hi.
LO_SCALE = 2048.0


def split_product_available(a: torch.Tensor) -> bool:
    """Whether the tensor-core kernel can run on a's device (a CUDA GPU with Triton)."""
    return a.is_cuda and has_triton()


def split_product_naive(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The split arithmetic of `split_product` in float64 on any device: the reference its tests compare with.

    Args:
        a: float32 (B, P, K); b: float32 (B, K, Q); bias: None or float32 broadcastable to (B, P, Q).
    Returns:
        float64 (B, P, Q).
    """
    def pieces(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hi = x.half()
        return hi.double(), ((x - hi.float()) * LO_SCALE).half().double()

    hi_a, lo_a = pieces(a)
    hi_b, lo_b = pieces(b)
    out = hi_a @ hi_b + (hi_a @ lo_b + lo_a @ hi_b) / LO_SCALE  # (B, P, Q)
    return out if bias is None else out + bias.double()


if has_triton():
    import triton
    import triton.language as tl

    @triton.jit
    def _split_product_kernel(a_ptr, b_ptr, bias_ptr, out_ptr, P, Q, K,
                              stride_ab, stride_ap, stride_ak, stride_bb, stride_bk, stride_bq, stride_bias_p,
                              stride_ob, stride_op, stride_oq, HAS_BIAS: tl.constexpr, BLOCK_P: tl.constexpr,
                              BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_P: tl.constexpr):
        """One (BLOCK_P, BLOCK_Q) tile of out[batch] = bias + a[batch] @ b[batch]; programs are grouped along P
        so neighbouring ones share tiles of b in L2."""
        batch = tl.program_id(1)
        tiles_p, tiles_q = tl.cdiv(P, BLOCK_P), tl.cdiv(Q, BLOCK_Q)
        tile = tl.program_id(0)
        group = tile // (GROUP_P * tiles_q)
        first_p = group * GROUP_P
        group_size = min(tiles_p - first_p, GROUP_P)
        tile_p = first_p + (tile % (GROUP_P * tiles_q)) % group_size
        tile_q = (tile % (GROUP_P * tiles_q)) // group_size
        rows = tile_p * BLOCK_P + tl.arange(0, BLOCK_P)
        columns = tile_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
        inner = tl.arange(0, BLOCK_K)
        a_tile = a_ptr + batch * stride_ab + rows[:, None] * stride_ap + inner[None, :] * stride_ak
        b_tile = b_ptr + batch * stride_bb + inner[:, None] * stride_bk + columns[None, :] * stride_bq
        high = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
        cross = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
        for start in range(0, K, BLOCK_K):
            a = tl.load(a_tile, mask=(rows[:, None] < P) & (inner[None, :] < K - start), other=0.0)
            b = tl.load(b_tile, mask=(inner[:, None] < K - start) & (columns[None, :] < Q), other=0.0)
            hi_a = a.to(tl.float16)
            lo_a = ((a - hi_a.to(tl.float32)) * 2048.0).to(tl.float16)
            hi_b = b.to(tl.float16)
            lo_b = ((b - hi_b.to(tl.float32)) * 2048.0).to(tl.float16)
            high = tl.dot(hi_a, hi_b, high)
            cross = tl.dot(hi_a, lo_b, cross)
            cross = tl.dot(lo_a, hi_b, cross)
            a_tile += BLOCK_K * stride_ak
            b_tile += BLOCK_K * stride_bk
        out = high + cross * (1.0 / 2048.0)
        if HAS_BIAS:
            out += tl.load(bias_ptr + rows * stride_bias_p, mask=rows < P, other=0.0)[:, None]
        out_tile = out_ptr + batch * stride_ob + rows[:, None] * stride_op + columns[None, :] * stride_oq
        tl.store(out_tile, out, mask=(rows[:, None] < P) & (columns[None, :] < Q))

    @torch.library.triton_op("corenet::split_product", mutates_args=())
    def _split_product(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        batch, rows, inner = a.shape
        columns = b.shape[2]
        out = a.new_empty(batch, rows, columns)
        block_p, block_q, block_k = 128, 128, 32
        grid = (triton.cdiv(rows, block_p) * triton.cdiv(columns, block_q), batch)
        bias_stride = 0 if bias is None else bias.stride(0)
        torch.library.wrap_triton(_split_product_kernel)[grid](
            a, b, a if bias is None else bias, out, rows, columns, inner, *a.stride(), *b.stride(), bias_stride,
            *out.stride(), HAS_BIAS=bias is not None, BLOCK_P=block_p, BLOCK_Q=block_q, BLOCK_K=block_k, GROUP_P=8,
            num_warps=8, num_stages=3)
        return out


def split_product(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """bias + a @ b for float32 CUDA tensors, to about float32 accuracy on fp16 tensor cores (module docstring).

    Forward only (callers own the backward: `layers.half_gradient_product`); the operands must stay below
    fp16's 65504 in magnitude.

    Args:
        a: float32 (B, P, K); b: float32 (B, K, Q), on a CUDA device (`split_product_available`).
        bias: None or float32 (P, 1), added to every column.
    Returns:
        float32 (B, P, Q).
    """
    return _split_product(a, b, bias)
