"""models/networks/layers.py: PointwiseConv1d computes what nn.Conv1d(kernel_size=1) does, with the same state_dict;
mixed_product keeps the float32 forward and rounds only its backward products to half precision; products on
tensor cores run on a padded vertex axis with unchanged values and gradients."""
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils import spectral_norm

from models.networks import layers
from models.networks.layers import PointwiseConv1d, mixed_product, padded, product


@pytest.mark.parametrize("batch, channels_in, channels_out, vertices, bias",
                         list(itertools.product([1, 3], [1, 5], [2, 7], [1, 11], [True, False])))
def test_equals_conv1d(batch, channels_in, channels_out, vertices, bias):
    torch.manual_seed(batch + channels_in + channels_out + vertices)
    layer = PointwiseConv1d(channels_in, channels_out, bias=bias).double()
    x = torch.randn(batch, channels_in, vertices, dtype=torch.float64, requires_grad=True)
    expected = F.conv1d(x, layer.weight, layer.bias)
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    assert list(layer.state_dict()) == (["weight", "bias"] if bias else ["weight"])
    assert layer.weight.shape == (channels_out, channels_in, 1)


def test_spectral_norm_keys_and_values_match_conv1d():
    torch.manual_seed(0)
    ours = spectral_norm(PointwiseConv1d(4, 6))
    reference = spectral_norm(torch.nn.Conv1d(4, 6, 1))
    reference.load_state_dict(ours.state_dict())
    x = torch.randn(2, 4, 9)
    torch.testing.assert_close(ours(x), reference(x))
    assert list(ours.state_dict()) == ["bias", "weight_orig", "weight_u", "weight_v"]


def _product_case(seed: int, bias: bool):
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(3, 5, 16, generator=generator, requires_grad=True)
    b = torch.randn(3, 16, 9, generator=generator, requires_grad=True)
    c = torch.randn(5, 1, generator=generator, requires_grad=True) if bias else None
    return a, b, c


@pytest.mark.parametrize("dtype, tolerance", [(torch.float16, 2e-3), (torch.bfloat16, 1.5e-2)])
@pytest.mark.parametrize("bias", [True, False])
def test_mixed_product_keeps_the_forward_and_rounds_only_the_backward(dtype, tolerance, bias):
    a, b, c = _product_case(0, bias)
    out = mixed_product(a, b, dtype, c)
    plain = mixed_product(a, b, None, c)  # plain autograd, float32 throughout
    assert torch.equal(out, plain)  # the same forward kernel: bit for bit
    upstream = torch.randn_like(out)
    inputs = [t for t in (a, b, c) if t is not None]
    grads = torch.autograd.grad(out, inputs, upstream)
    a64, b64 = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    c64 = None if c is None else c.detach().double().requires_grad_()
    out64 = a64 @ b64 if c64 is None else c64 + a64 @ b64
    exact = torch.autograd.grad(out64, [t for t in (a64, b64, c64) if t is not None], upstream.double())
    for grad, reference in zip(grads, exact):
        assert grad.dtype == torch.float32
        error = (torch.linalg.norm(grad.double() - reference) / torch.linalg.norm(reference)).item()
        assert error < tolerance, error
    if c is not None:  # the bias gradient is the float32 sum of the upstream gradient rounded to half
        rounded_sum = upstream.to(dtype).double().sum(dim=(0, 2)).unsqueeze(1)
        torch.testing.assert_close(grads[-1].double(), rounded_sum, rtol=1e-6, atol=1e-6)
        assert grads[-1].shape == c.shape
    float32_grads = torch.autograd.grad(plain, inputs, upstream)
    assert not torch.equal(grads[0], float32_grads[0])  # the products did run in half precision


def test_mixed_product_saves_half_copies_for_backward():
    a, b, _ = _product_case(1, bias=False)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.dtype) or t, lambda t: t):
        mixed_product(a, b, torch.bfloat16)
    assert saved == [torch.bfloat16, torch.bfloat16]
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.dtype) or t, lambda t: t):
        mixed_product(a, b, None)
    assert saved == [torch.float32, torch.float32]


def test_mixed_product_without_gradients_records_nothing():
    a, b, _ = _product_case(2, bias=False)
    with torch.no_grad():
        out = mixed_product(a, b, torch.float16)
    assert out.grad_fn is None and torch.equal(out, a.detach() @ b.detach())


def test_pointwise_conv_with_half_dtype_has_the_same_forward_and_close_gradients():
    torch.manual_seed(3)
    exact = PointwiseConv1d(8, 6)
    half = PointwiseConv1d(8, 6, half_dtype=torch.bfloat16)
    half.load_state_dict(exact.state_dict())
    x = torch.randn(2, 8, 40, requires_grad=True)
    out_exact, out_half = exact(x), half(x)
    assert torch.equal(out_exact, out_half)
    upstream = torch.randn_like(out_exact)
    grads_exact = torch.autograd.grad(out_exact, [x, exact.weight, exact.bias], upstream)
    grads_half = torch.autograd.grad(out_half, [x, half.weight, half.bias], upstream)
    for g_half, g_exact in zip(grads_half, grads_exact):
        assert g_half.shape == g_exact.shape and g_half.dtype == torch.float32
        torch.testing.assert_close(g_half, g_exact, rtol=0, atol=3e-2 * g_exact.abs().max().item())


def test_padded_zero_fills_the_columns_up_to_the_alignment():
    t = torch.randn(2, 3, 9)
    out = padded(t)
    assert out.shape == (2, 3, 16) and torch.equal(out[..., :9], t) and not out[..., 9:].any()
    aligned = torch.randn(2, 3, 16)
    assert padded(aligned) is aligned


@pytest.mark.parametrize("bias", [True, False])
def test_product_on_padded_columns_has_the_plain_values_and_gradients(monkeypatch, bias):
    """The padding only runs on GPUs in half precision; here it is forced on the CPU in float64."""
    monkeypatch.setattr(layers, "runs_on_tensor_cores", lambda b: True)
    a, b, c = (None if t is None else t.detach().double().requires_grad_() for t in _product_case(4, bias))
    inputs = [t for t in (a, b, c) if t is not None]
    out = product(a, b, c)
    expected = a @ b if c is None else c + a @ b
    assert out.shape == (3, 5, 9)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    upstream = torch.randn_like(expected)
    for grad, reference in zip(torch.autograd.grad(out, inputs, upstream),
                               torch.autograd.grad(expected, inputs, upstream)):
        assert grad.shape == reference.shape
        torch.testing.assert_close(grad, reference, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("aligned", [True, False], ids=["tensor-core-padding", "as-is"])
def test_accumulated_product_is_c_plus_the_product_in_value_and_gradient(monkeypatch, aligned):
    """c + a @ b, its columns padded and cut as `product` does them on tensor cores (forced here, float64)."""
    monkeypatch.setattr(layers, "runs_on_tensor_cores", lambda b: aligned)
    generator = torch.Generator().manual_seed(8)
    a, b, c = (torch.randn(*shape, generator=generator, dtype=torch.float64, requires_grad=True)
               for shape in ((3, 5, 4), (3, 4, 9), (3, 5, 9)))
    out = layers.accumulated_product(c, a, b)
    expected = c + a @ b
    assert out.shape == (3, 5, 9)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    upstream = torch.randn(3, 5, 9, generator=generator, dtype=torch.float64)
    for grad, reference in zip(torch.autograd.grad(out, (a, b, c), upstream),
                               torch.autograd.grad(expected, (a, b, c), upstream)):
        torch.testing.assert_close(grad, reference, rtol=1e-12, atol=1e-12)


def test_product_pads_only_on_tensor_cores(monkeypatch):
    padded_shapes = []
    monkeypatch.setattr(layers, "padded", lambda t: padded_shapes.append(tuple(t.shape)) or padded(t))
    a, b, _ = _product_case(5, bias=False)
    product(a, b)  # float32 on the CPU: no padding
    assert padded_shapes == []
    assert not layers.runs_on_tensor_cores(b.half())  # CPU tensors never count


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_product_on_a_gpu_pads_and_matches_the_unpadded_product(dtype):
    generator = torch.Generator(device="cuda").manual_seed(6)
    weight = torch.randn(1, 64, 32, device="cuda", dtype=dtype, generator=generator).expand(2, -1, -1)
    x = torch.randn(2, 32, 6890, device="cuda", dtype=dtype, generator=generator, requires_grad=True)
    out = product(weight, x)
    assert out.shape == (2, 64, 6890) and out.stride(1) == 6896  # a view of the padded product
    expected = torch.bmm(weight, x)
    torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)
    upstream = torch.randn_like(expected)
    torch.testing.assert_close(torch.autograd.grad(out, x, upstream)[0],
                               torch.autograd.grad(expected, x, upstream)[0], rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_product_adds_the_bias_after_the_product_when_compiling(monkeypatch, dtype, tolerance):
    """The compiled graph's form (bmm, then the bias in the product's dtype) against baddbmm's."""
    a, b, c = (t.detach() for t in _product_case(7, bias=True))
    a, b = a.to(dtype), b.to(dtype)
    expected = torch.baddbmm(c.to(dtype), a, b)
    calls = []
    monkeypatch.setattr(torch, "baddbmm", lambda *args: calls.append(args) or expected)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    out = product(a, b, c)
    assert not calls and out.dtype == dtype and out.shape == expected.shape
    torch.testing.assert_close(out.float(), expected.float(), rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("channels_in, bias", [(3, True), (1, False)])
def test_few_input_channels_are_broadcast_products_when_compiling(monkeypatch, channels_in, bias):
    """The compiled graph's form of a 1x1 convolution on x, y, z: no matrix product, the same values and gradients."""
    torch.manual_seed(0)
    layer = PointwiseConv1d(channels_in, 16, bias=bias)
    x = torch.randn(2, channels_in, 30, requires_grad=True)
    upstream = torch.randn(2, 16, 30)
    expected = layer(x)
    expected_grads = torch.autograd.grad(expected, [x, *layer.parameters()], upstream)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    monkeypatch.setattr(layers, "mixed_product", None)  # the broadcast form must not reach it
    out = layer(x)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    for grad, expected_grad in zip(torch.autograd.grad(out, [x, *layer.parameters()], upstream), expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-5)


def _relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return (torch.linalg.norm(value.double() - reference) / torch.linalg.norm(reference)).item()


def _pieces(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return layers.half_pieces(x)


@pytest.mark.parametrize("pieces", [_pieces, torch.compile(_pieces)], ids=["eager", "compiled"])
@pytest.mark.parametrize("scale", [1.0, 1e-3, 300.0])
def test_half_pieces_hold_a_float32_to_21_bits(scale, pieces):
    """Compiled too: Inductor keeps a float16 round trip in float32 inside a kernel, so a split that relied on
    one would have lo = 0 there."""
    x = torch.randn(4096, generator=torch.Generator().manual_seed(8)) * scale
    hi, lo = pieces(x)
    assert hi.dtype == lo.dtype == torch.float16
    error = (hi.double() + lo.double() - x.double()).abs()
    # lo's rounding, 2^-11 of |lo| < 2^-10 |x|, and below float16's normal range half its smallest subnormal
    # for hi and for lo.
    assert (error <= 2.0 ** -21 * x.abs().double() + 2.0 ** -24).all()
    assert (hi.double() - x.double()).abs().max() > 10 * error.max()  # lo carries what hi lost


def test_split_operands_sum_the_three_piece_products_on_padded_columns():
    generator = torch.Generator().manual_seed(9)
    a, b = torch.randn(2, 5, 4, generator=generator), torch.randn(2, 4, 11, generator=generator)
    left, right = layers.split_operands(a, b)
    assert left.shape == (2, 5, 12) and right.shape == (2, 12, 16) and left.dtype == right.dtype == torch.float16
    a_hi, a_lo = layers.half_pieces(a)
    b_hi, b_lo = layers.half_pieces(b)
    assert torch.equal(left, torch.cat([a_hi, a_hi, a_lo], dim=2))
    assert torch.equal(right[..., :11], torch.cat([b_hi, b_lo, b_hi], dim=1)) and not right[..., 11:].any()
    expected = a_hi.double() @ b_hi.double() + a_hi.double() @ b_lo.double() + a_lo.double() @ b_hi.double()
    torch.testing.assert_close(left.double() @ right[..., :11].double(), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bias", [True, False])
def test_split_product_is_as_accurate_as_float32_at_the_similarity_shape(bias):
    """C = theta^T phi of unit 256-channel features, as the correspondence network forms it (on the CPU the fp16
    pieces' products are summed in float32, as the tensor cores sum them)."""
    generator = torch.Generator().manual_seed(10)
    theta = F.normalize(torch.randn(2, 256, 300, generator=generator), dim=1)
    phi = F.normalize(torch.randn(2, 256, 203, generator=generator), dim=1)
    c = torch.randn(300, 1, generator=generator) if bias else None
    a = theta.transpose(1, 2)
    out = layers.split_product(a, phi, c)
    exact = a.double() @ phi.double() + (0 if c is None else c.double())
    assert out.dtype == torch.float32 and out.shape == (2, 300, 203)
    assert out.stride(1) == (203 if bias else 208)  # without a bias, a view of the padded product
    half = a.half().double() @ phi.half().double() + (0 if c is None else c.double())
    assert _relative_error(out, exact) < 3e-6
    assert _relative_error(out, exact) < _relative_error(half, exact) / 50  # one fp16 product: ~3e-4


def test_split_products_run_on_gpus_with_a_torch_that_has_float_output_half_products(monkeypatch):
    assert layers.FLOAT_OUTPUT_HALF_PRODUCTS  # the pinned torch has torch.bmm(..., out_dtype=...)
    assert not layers.split_products_run_on(torch.zeros(1))
    cuda_like = type("CudaTensor", (), {"is_cuda": True})()
    assert layers.split_products_run_on(cuda_like)
    monkeypatch.setattr(layers, "FLOAT_OUTPUT_HALF_PRODUCTS", False)
    assert not layers.split_products_run_on(cuda_like)


def test_mixed_product_forward_splits_only_when_compiled_on_a_gpu(monkeypatch):
    """On a CPU mixed_product's forward is float32's product even when compiling (the split pays only on tensor
    cores); the GPU side is the CUDA test below."""
    calls = []
    monkeypatch.setattr(layers, "split_product", lambda *args: calls.append(args))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    a, b, _ = _product_case(12, bias=False)
    out = mixed_product(a, b, torch.float16)
    assert not calls and torch.equal(out, a.detach() @ b.detach())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_split_product_on_a_gpu_is_as_accurate_as_float32():
    generator = torch.Generator(device="cuda").manual_seed(13)
    theta = F.normalize(torch.randn(2, 256, 6890, device="cuda", generator=generator), dim=1)
    phi = F.normalize(torch.randn(2, 256, 6890, device="cuda", generator=generator), dim=1)
    a = theta.transpose(1, 2)
    exact = a.double() @ phi.double()
    out = layers.split_product(a, phi)
    assert out.shape == (2, 6890, 6890) and out.stride(1) == 6896
    assert _relative_error(out, exact) < 3e-6
    compiled_product = torch.compile(lambda x, y: mixed_product(x, y, torch.float16))
    with torch.no_grad():
        assert _relative_error(compiled_product(a, phi), exact) < 3e-6
    weight = torch.randn(2, 256, 256, device="cuda", generator=generator, requires_grad=True)
    x = torch.randn(2, 256, 6890, device="cuda", generator=generator, requires_grad=True)
    out = compiled_product(weight, x)  # the autograd Function traced: split forward, half backward
    assert _relative_error(out, weight.double() @ x.double()) < 3e-6
    out.sum().backward()
    assert torch.isfinite(weight.grad).all() and torch.isfinite(x.grad).all()
