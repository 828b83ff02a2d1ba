"""Tests for models/networks/elain_kernels.py: the ElaIN map with its condition's product against float64, and the
generator's kernel path against its autograd path.

The kernel runs on the GPU when there is one, and otherwise in Triton's interpreter on CPU tensors (the root
conftest.py sets TRITON_INTERPRET=1 before triton is imported).
"""
from __future__ import annotations

import pytest
import torch

from models.networks import elain_kernels, init_weights
from models.networks import generator as generator_module
from models.networks.elain_kernels import activated_elain_map
from models.networks.generator import LEAKY_SLOPE, ElaIN, ElaINGenerator

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_UNAVAILABLE = elain_kernels.unsupported_reason(torch.empty(1, device=DEVICE, dtype=torch.float16))
pytestmark = pytest.mark.skipif(_UNAVAILABLE is not None, reason=str(_UNAVAILABLE))
# Small tiles, so that the interpreter covers several tiles of every axis.
TILE = (16, 16, 16, 4)
# Relative L2 to float64 of a half-precision output (fp16 keeps 11 significant bits: 2^-11 is 4.9e-4 at most; bf16's 8
# bits give 3.9e-3).
TOLERANCE = {torch.float16: 1e-3, torch.bfloat16: 8e-3}


def _relative(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value.double() - reference).norm() / reference.norm()).item()


def _expected(x, identity_features, weight, bias, mean, std, blend, slope) -> torch.Tensor:
    """The map of `activated_elain_map`'s docstring in float64, from the operands as the kernel rounds them."""
    channels = x.shape[1]
    condition = weight.double() @ identity_features.to(x.dtype).double() + bias.double().unsqueeze(-1)  # (B, 2C, N')
    gamma_id, beta_id = condition[:, :channels], condition[:, channels:]
    mean, std, blend = (value.double().unsqueeze(-1) for value in (mean, std, blend))
    mapped = ((x.double() - mean) / std * (1 + gamma_id * blend + std * (1 - blend))
              + beta_id * blend + mean * (1 - blend))
    return torch.where(mapped > 0, mapped, mapped * slope)


@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    DEVICE != "cuda", reason="Triton's interpreter reads bfloat16 tensors as their raw bits"))])
@pytest.mark.parametrize("features_dtype", ["x", torch.float32])
def test_map_equals_float64(dtype: torch.dtype, features_dtype) -> None:
    generator = torch.Generator().manual_seed(3)
    batch, channels, feature_channels, columns = 2, 40, 24, 37  # none a multiple of the tile
    x = (torch.randn(batch, channels, columns, generator=generator) * 2 + 0.5).to(DEVICE, dtype)
    identity_features = torch.randn(batch, feature_channels, columns, generator=generator).to(
        DEVICE, dtype if features_dtype == "x" else features_dtype)
    weight = (torch.randn(2 * channels, feature_channels, generator=generator) * 0.3).to(DEVICE, dtype)
    bias = torch.randn(2 * channels, generator=generator).to(DEVICE)
    mean, blend = (torch.randn(batch, channels, generator=generator).to(DEVICE) for _ in range(2))
    std = (torch.rand(batch, channels, generator=generator) + 0.5).to(DEVICE)
    out = activated_elain_map(x, identity_features, weight, bias, mean, std, blend, 0.3, tile=TILE, stages=2)
    assert out.dtype == dtype and out.shape == x.shape
    expected = _expected(x, identity_features, weight, bias, mean, std, blend, 0.3)
    assert _relative(out, expected) < TOLERANCE[dtype]
    assert (out < 0).any() and (out > 0).any()  # both sides of the activation were taken


@pytest.mark.parametrize("half_features", [False, True])
def test_elain_kernel_path_equals_autograd_path(half_features: bool) -> None:
    """`ElaIN.activated_by_kernel` in half precision against `activated` (the written-out Function) in float64, on a
    padded vertex axis whose statistics run over the real columns only, with the features in float32 or already in
    fp16 (as the generator passes them at eager inference)."""
    torch.manual_seed(0)
    norm = ElaIN(40, identity_channels=24, fold_linear=True).to(DEVICE).eval()
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(2, 40, 40, generator=generator).to(DEVICE) * 3 + 1
    identity_features = torch.randn(2, 24, 40, generator=generator).to(DEVICE)
    with torch.no_grad():
        expected = norm.double().activated(x.double(), identity_features.double(), 37)
        norm.float()
        half_x = x.half()
        out = norm.activated_by_kernel(half_x, identity_features.half() if half_features else identity_features, 37)
    assert out.dtype == torch.float16
    # The reference is the map of the half-precision input (the kernel's own rounding of x is not an error).
    with torch.no_grad():
        expected_of_half = norm.double().activated(half_x.double(), identity_features.half().double(), 37)
    assert _relative(out, expected_of_half) < TOLERANCE[torch.float16]
    assert _relative(out, expected) < 1e-2


def test_small_gpus_get_the_small_tile(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.zeros(1, 4, 8, device=DEVICE, dtype=torch.float16)
    for available, expected in ((None, elain_kernels.ELAIN_TILE), (227 * 1024, elain_kernels.ELAIN_TILE),
                                (99 * 1024, elain_kernels.ELAIN_SMALL_TILE)):
        monkeypatch.setattr(elain_kernels, "block_shared_memory", lambda tensor, available=available: available)
        assert elain_kernels.default_tile(x)[0] == expected


def test_kernel_only_at_gpu_inference_in_half_precision() -> None:
    x = torch.zeros(1, 4, 8, device=DEVICE, dtype=torch.float16)
    with torch.no_grad():
        assert elain_kernels.applies(x) == x.is_cuda
        assert not elain_kernels.applies(x.float())
    assert not elain_kernels.applies(x)  # gradients enabled


@pytest.mark.skipif(DEVICE != "cuda", reason="the generator takes the kernel on a GPU")
def test_generator_inference_takes_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """All nine ElaINs of an fp16 generator at eager inference run the kernel, and its output is as close to float64 as
    the autograd path's; compiled, the generator keeps Inductor's code."""
    torch.manual_seed(0)
    net = ElaINGenerator(ngf=8, fold_linear=True).to(DEVICE).eval()
    init_weights(net)
    generator = torch.Generator().manual_seed(6)
    warp = torch.randn(2, 3, 48, generator=generator).to(DEVICE)
    identity_features = torch.randn(2, 32, 48, generator=generator).to(DEVICE)
    with torch.no_grad():
        expected = net.double()(warp.double(), identity_features.double(), 45)[..., :45]
    net.float()
    calls = []
    monkeypatch.setattr(generator_module, "activated_elain_map",
                        lambda *args, **kwargs: calls.append(1) or activated_elain_map(*args, **kwargs))
    with torch.autocast("cuda", torch.float16):
        autograd_out = net(warp, identity_features, 45).detach()
        assert not calls
        with torch.no_grad():
            out = net(warp, identity_features, 45)
            assert len(calls) == 9
            compiled_out = torch.compile(net)(warp, identity_features, 45)
    assert len(calls) == 9
    error, autograd_error = (_relative(value[..., :45], expected) for value in (out, autograd_out))
    assert error < 1e-2 and error < 2 * autograd_error
    assert _relative(compiled_out[..., :45], expected) < 1e-2


@pytest.mark.parametrize("change,message", [
    (lambda args: {**args, "x": args["x"].float()}, "float16 or bfloat16"),
    (lambda args: {**args, "weight": args["weight"].float()}, "weight must be a contiguous"),
    (lambda args: {**args, "weight": args["weight"][:16]}, r"shape \(32, 16\)"),
    (lambda args: {**args, "identity_features": args["identity_features"].transpose(1, 2)}, "not contiguous"),
    (lambda args: {**args, "bias": args["bias"][:3]}, "bias must have 32 values"),
    (lambda args: {**args, "tile": (16, 16, 8, 4)}, "powers of two"),
    (lambda args: {**args, "mean": torch.ones(2, 15, device=DEVICE)}, r"mean must have 32 values on .* \(one per "),
    (lambda args: {**args, "x": args["x"][0]}, r"must be \(B, C, N'\) tensors"),
])
def test_bad_arguments_get_one_line(change, message: str) -> None:
    arguments = {"x": torch.zeros(2, 16, 16, device=DEVICE, dtype=torch.float16),
                 "identity_features": torch.zeros(2, 16, 16, device=DEVICE, dtype=torch.float16),
                 "weight": torch.zeros(32, 16, device=DEVICE, dtype=torch.float16),
                 "bias": torch.zeros(32, device=DEVICE), "tile": TILE,
                 **{name: torch.ones(2, 16, device=DEVICE) for name in ("mean", "std", "blend")}}
    arguments = change(arguments)
    with pytest.raises((ValueError, RuntimeError), match=message):
        activated_elain_map(*(arguments.pop(name) for name in ("x", "identity_features", "weight", "bias", "mean",
                                                                "std", "blend")), LEAKY_SLOPE, **arguments)
