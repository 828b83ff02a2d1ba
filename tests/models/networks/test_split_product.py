"""models/networks/split_product.py: float32-accurate products from fp16 pieces."""
import itertools

import pytest
import torch

from models.networks.split_product import split_product, split_product_available, split_product_naive


def _relative_error(actual: torch.Tensor, exact: torch.Tensor) -> float:
    return (torch.linalg.norm(actual.double() - exact) / torch.linalg.norm(exact)).item()


def _operands(batch: int, rows: int, inner: int, columns: int, seed: int, device: str = "cpu"):
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(batch, rows, inner, generator=generator)
    b = torch.randn(batch, inner, columns, generator=generator) / inner ** 0.5
    bias = torch.randn(rows, 1, generator=generator)
    return a.to(device), b.to(device), bias.to(device)


@pytest.mark.parametrize("scale", [1e-3, 1.0, 300.0])
def test_split_arithmetic_is_as_accurate_as_float32(scale):
    """Two fp16 pieces per operand and three products keep about 22 bits: the error of a float32 product,
    where one fp16 product is three orders of magnitude worse."""
    a, b, _ = _operands(2, 64, 256, 48, seed=0)
    a = a * scale
    exact = a.double() @ b.double()
    split_error = _relative_error(split_product_naive(a, b), exact)
    float32_error = _relative_error(a @ b, exact)
    fp16_error = _relative_error(a.half().double() @ b.half().double(), exact)
    assert split_error < 4 * float32_error + 1e-7, (split_error, float32_error)
    assert split_error < 1e-6 < 1e-4 < fp16_error, (split_error, fp16_error)


def test_split_arithmetic_adds_the_bias():
    a, b, bias = _operands(1, 8, 16, 5, seed=1)
    exact = bias.double() + a.double() @ b.double()
    assert _relative_error(split_product_naive(a, b, bias), exact) < 1e-6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("batch, rows, inner, columns, bias, transposed",
                         list(itertools.product([1, 3], [5, 256, 1000], [16, 256], [7, 6890], [True, False],
                                                [False, True])))
def test_kernel_equals_the_split_arithmetic(batch, rows, inner, columns, bias, transposed):
    assert split_product_available(torch.empty(1, device="cuda"))
    a, b, c = _operands(batch, rows, inner, columns, seed=rows + columns, device="cuda")
    if transposed:  # a as theta^T is: strided along its inner dimension
        a = a.transpose(1, 2).contiguous().transpose(1, 2)
    c = c if bias else None
    out = split_product(a, b, c)
    assert out.dtype == torch.float32 and out.shape == (batch, rows, columns)
    assert torch.isfinite(out).all()
    exact = a.double() @ b.double() + (0 if c is None else c.double())
    assert _relative_error(out, split_product_naive(a, b, c)) < 1e-6
    assert _relative_error(out, exact) < 1e-6
