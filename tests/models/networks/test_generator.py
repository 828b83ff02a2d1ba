"""The generator's folded affine layers (--fold_linear): the same function, gradients and checkpoint; its folded
input convolution as a matrix product."""
import pytest
import torch
import torch.nn.functional as F

from models.networks import generator as generator_module
from models.networks import init_weights
from models.networks.generator import ElaIN, ElaINGenerator


def relative_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (torch.linalg.norm(actual - expected) / torch.linalg.norm(expected)).item()


def random_biases(module: torch.nn.Module) -> None:
    """init_weights zeroes every bias; folding must also carry non-zero ones through."""
    for name, parameter in module.named_parameters():
        if name.endswith("bias"):
            parameter.data.normal_(0, 0.1)


def twin_generators(ngf: int) -> tuple[ElaINGenerator, ElaINGenerator]:
    torch.manual_seed(0)
    literal = ElaINGenerator(ngf=ngf)
    init_weights(literal, "xavier", 0.5)
    random_biases(literal)
    folded = ElaINGenerator(ngf=ngf, fold_linear=True)
    folded.load_state_dict(literal.state_dict())
    return literal, folded


def test_folded_generator_equals_the_literal_one_in_value_and_gradient():
    literal, folded = twin_generators(ngf=4)
    warp_points = torch.rand(2, 3, 40)
    identity_features = torch.randn(2, 16, 40)
    outputs, gradients = [], []
    for generator in (literal, folded):
        generator.train()
        out = generator(warp_points, identity_features)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        outputs.append(out)
        gradients.append({name: p.grad for name, p in generator.named_parameters()})
    assert relative_l2(outputs[1], outputs[0]) < 1e-5  # float32 round-off, not a different function
    assert gradients[0].keys() == gradients[1].keys()
    for name, gradient in gradients[0].items():
        assert relative_l2(gradients[1][name], gradient) < 1e-4, name
    # Spectral norm stepped its power iteration once per forward in both (its buffers are equal).
    for (name, buffer), (_, other) in zip(literal.named_buffers(), folded.named_buffers()):
        torch.testing.assert_close(other, buffer, rtol=1e-5, atol=1e-6, msg=name)


def test_folded_elain_does_less_work_for_the_same_identity_terms():
    torch.manual_seed(1)
    norm = ElaIN(channels=32, identity_channels=8)
    random_biases(norm)
    identity_features = torch.randn(3, 8, 25)
    literal_terms = norm.identity_terms(identity_features)
    norm.fold_linear = True
    for literal, folded in zip(literal_terms, norm.identity_terms(identity_features)):
        torch.testing.assert_close(folded, literal, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_folded_generator_under_autocast_is_as_close_to_float32_as_the_literal_one(dtype):
    literal, folded = twin_generators(ngf=4)
    # 300 vertices: with the affine map in half precision, fewer leave the two errors too noisy to compare.
    warp_points = torch.rand(1, 3, 300)
    identity_features = torch.randn(1, 16, 300)
    with torch.no_grad():
        for generator in (literal, folded):  # spectral norm's power iteration runs in training mode
            for _ in range(5):
                generator(warp_points, identity_features)
            generator.eval()
        reference = literal(warp_points, identity_features)
        with torch.autocast("cpu", dtype=dtype):
            literal_error = relative_l2(literal(warp_points, identity_features).float(), reference)
            folded_error = relative_l2(folded(warp_points, identity_features).float(), reference)
    assert 0 < folded_error <= 1.1 * literal_error


@pytest.mark.parametrize("on_tensor_cores", [False, True])
@pytest.mark.parametrize("kernel_size, channels", [(3, 3), (5, 2), (1, 4)])
def test_kernel_conv_as_product_equals_conv1d_in_value_and_gradient(kernel_size, channels, on_tensor_cores,
                                                                     monkeypatch):
    """On tensor cores the contraction is zero-padded (forced here on the CPU in float64)."""
    monkeypatch.setattr(generator_module, "runs_on_tensor_cores", lambda b: on_tensor_cores)
    generator = torch.Generator().manual_seed(kernel_size)
    points = torch.randn(2, channels, 11, dtype=torch.float64, generator=generator, requires_grad=True)
    weight = torch.randn(7, channels, kernel_size, dtype=torch.float64, generator=generator, requires_grad=True)
    bias = torch.randn(7, dtype=torch.float64, generator=generator, requires_grad=True)
    out = generator_module.kernel_conv_as_product(points, weight, bias)
    expected = F.conv1d(points, weight, bias, padding=kernel_size // 2)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    upstream = torch.randn(expected.shape, dtype=torch.float64, generator=generator)
    for grad, reference in zip(torch.autograd.grad(out, (points, weight, bias), upstream),
                               torch.autograd.grad(expected, (points, weight, bias), upstream)):
        torch.testing.assert_close(grad, reference, rtol=1e-12, atol=1e-12)


def test_neighbour_columns_are_the_windows_in_weight_order():
    points = torch.arange(8.0).view(1, 2, 4)  # channel 0: 0 1 2 3, channel 1: 4 5 6 7
    columns = generator_module.neighbour_columns(points, 3)
    expected = torch.tensor([[[0, 0, 1, 2], [0, 1, 2, 3], [1, 2, 3, 0],
                              [0, 4, 5, 6], [4, 5, 6, 7], [5, 6, 7, 0]]], dtype=torch.float32)
    assert torch.equal(columns, expected)


def test_compiled_folded_generator_steps_spectral_norm_once_a_call():
    """The fold calls spectral_norm's pre-hook itself for conv_s and conv_1 (`spectral_normalized_weight`); traced
    by torch.compile (AOTAutograd, without Inductor) it must still give the literal outputs and step the power
    iteration once a call."""
    literal, folded = twin_generators(ngf=4)
    compiled = torch.compile(folded, backend="aot_eager")
    warp_points, identity_features = torch.rand(2, 3, 40), torch.randn(2, 16, 40)
    try:
        for _ in range(2):
            expected = literal(warp_points, identity_features)
            actual = compiled(warp_points, identity_features)
            assert relative_l2(actual, expected) < 1e-5
    finally:
        torch._dynamo.reset()
    for (name, buffer), (_, other) in zip(literal.named_buffers(), folded.named_buffers()):
        torch.testing.assert_close(other, buffer, rtol=1e-5, atol=1e-6, msg=name)


def _elain_with_random_terms(fold_linear: bool) -> ElaIN:
    torch.manual_seed(5)
    norm = ElaIN(channels=6, identity_channels=4, fold_linear=fold_linear).double()
    random_biases(norm)
    return norm


def test_activated_elain_function_is_the_derivative_of_the_literal_map():
    """The folded ElaIN's activated map (`_ActivatedElaINMap`, a hand-written backward) against autograd through
    the literal map and leaky ReLU, on a padded vertex axis (statistics over 9 of 12 columns), in float64: same
    values, same gradients for x, the identity features and every parameter; and against finite differences."""
    generator = torch.Generator().manual_seed(6)
    x = torch.randn(2, 6, 12, generator=generator, dtype=torch.float64, requires_grad=True)
    features = torch.randn(2, 4, 12, generator=generator, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(2, 6, 12, generator=generator, dtype=torch.float64)
    results = []
    for fold_linear in (False, True):
        norm = _elain_with_random_terms(fold_linear)
        out = norm.activated(x, features, vertices=9)
        inputs = [x, features, *norm.parameters()]
        results.append((out, torch.autograd.grad(out, inputs, upstream)))
    (literal, literal_grads), (function, function_grads) = results
    torch.testing.assert_close(function, literal, rtol=1e-13, atol=1e-13)
    for by_hand, by_autograd in zip(function_grads, literal_grads):
        torch.testing.assert_close(by_hand, by_autograd, rtol=1e-11, atol=1e-12)
    norm = _elain_with_random_terms(True)
    assert torch.autograd.gradcheck(lambda t, f: norm.activated(t, f, vertices=9), (x, features))


def test_activated_elain_function_compiles_into_one_graph_with_its_backward():
    from torch._dynamo.testing import CompileCounter

    norm = _elain_with_random_terms(True)
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(2, 6, 16, generator=generator, dtype=torch.float64, requires_grad=True)
    features = torch.randn(2, 4, 16, generator=generator, dtype=torch.float64)
    counter = CompileCounter()
    compiled = torch.compile(lambda t: norm.activated(t, features, vertices=13).square().sum(), backend=counter)
    compiled_grad, = torch.autograd.grad(compiled(x), x)
    eager_grad, = torch.autograd.grad(norm.activated(x, features, vertices=13).square().sum(), x)
    torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-12, atol=1e-12)
    assert counter.frame_count == 1
