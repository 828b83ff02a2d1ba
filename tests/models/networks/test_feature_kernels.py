"""Tests for models/networks/feature_kernels.py: Corr's convolutions with their input's normalisation and activation
against float64, and the correspondence network's kernel path against its autograd path.

The kernels run on the GPU when there is one, and otherwise in Triton's interpreter on CPU tensors (the root
conftest.py sets TRITON_INTERPRET=1 before triton is imported).
"""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from models.networks import feature_kernels
from models.networks.correspondence import (COMPILED_KERNELS_MIN_BATCH, Correspondence, instance_norm,
                                             normalize_features)
from models.networks.feature_kernels import Statistics, kernel_weight, normalized_convolution, normalized_rows
from models.networks.layers import INSTANCE_NORM_EPS

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_UNAVAILABLE = feature_kernels.unsupported_reason(torch.empty(1, device=DEVICE))
pytestmark = pytest.mark.skipif(_UNAVAILABLE is not None, reason=str(_UNAVAILABLE))
# Small tiles, so that the interpreter covers several tiles of every axis.
TILE = (16, 16, 16, 4)
# Relative L2 to float64: the split product's float32-class error is about 1e-6; fp16 operands would give 1e-3.
PRODUCT_TOLERANCE = 1e-5


def _relative(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value.double() - reference).norm() / reference.norm()).item()


def _statistics(x: torch.Tensor, vertices: int) -> Statistics:
    variance, mean = torch.var_mean(x[..., :vertices], dim=2, unbiased=False)
    return Statistics(mean.contiguous(), torch.rsqrt(variance + INSTANCE_NORM_EPS).contiguous())


def _activated(x: torch.Tensor, statistics: Statistics | None, residual: torch.Tensor | None,
               slope: torch.Tensor | None) -> torch.Tensor:
    """The input as the kernels activate it, in float64."""
    x = x.double()
    if statistics is not None:
        x = (x - statistics.mean.double().unsqueeze(2)) * statistics.rstd.double().unsqueeze(2)
    if residual is not None:
        x = x + residual.double()
    return x if slope is None else torch.where(x >= 0, x, x * slope.double())


@pytest.mark.parametrize("normalize,residual,activate,bias", list(itertools.product([False, True], repeat=4)))
def test_convolution_equals_float64(normalize: bool, residual: bool, activate: bool, bias: bool) -> None:
    generator = torch.Generator().manual_seed(int(normalize) + 2 * residual + 4 * activate + 8 * bias)
    batch, in_channels, out_channels, columns, vertices = 2, 40, 24, 40, 37  # channels not multiples of the tile
    x = (torch.randn(batch, in_channels, columns, generator=generator) * 3 + 1).to(DEVICE)
    statistics = _statistics(x, vertices) if normalize else None
    residual_input = torch.randn(batch, in_channels, columns, generator=generator).to(DEVICE) if residual else None
    slope = torch.tensor([0.3], device=DEVICE) if activate else None
    weight = (torch.randn(out_channels, in_channels, generator=generator) * 0.2).to(DEVICE)
    bias_values = torch.randn(out_channels, generator=generator).to(DEVICE) if bias else None
    out, out_statistics, kept = normalized_convolution(x, kernel_weight(weight), bias_values, vertices,
                                                       statistics=statistics,
                                                       residual=residual_input, slope=slope, keep_input=True,
                                                       tile=TILE)
    activated = _activated(x, statistics, residual_input, slope)
    expected = weight.double() @ activated + (0 if bias_values is None else bias_values.double().unsqueeze(1))
    assert _relative(out, expected) < PRODUCT_TOLERANCE
    assert torch.allclose(kept.double(), activated, rtol=1e-6, atol=1e-6)
    variance, mean = torch.var_mean(expected[..., :vertices], dim=2, unbiased=False)
    assert torch.allclose(out_statistics.mean.double(), mean, rtol=1e-5, atol=1e-5)
    assert torch.allclose(out_statistics.rstd.double(), torch.rsqrt(variance + INSTANCE_NORM_EPS), rtol=1e-5)


def test_three_input_channels_and_padding_outside_the_statistics() -> None:
    """The first layer's three channels (masked to a tile of 16), and columns past `vertices` that are computed but
    enter no statistic: changing them changes no real column and no statistic."""
    generator = torch.Generator().manual_seed(7)
    points = torch.randn(3, 3, 35, generator=generator).to(DEVICE)
    weight, bias = torch.randn(64, 3, generator=generator).to(DEVICE), torch.randn(64, generator=generator).to(DEVICE)
    out, statistics, _ = normalized_convolution(points, kernel_weight(weight), bias, 30, tile=TILE)
    expected = weight.double() @ points.double() + bias.double().unsqueeze(1)
    assert _relative(out, expected) < PRODUCT_TOLERANCE
    changed = points.clone()
    changed[..., 30:] = 1e3
    out_changed, statistics_changed, _ = normalized_convolution(changed, kernel_weight(weight), bias, 30, tile=TILE)
    assert torch.equal(out_changed[..., :30], out[..., :30])
    assert torch.equal(statistics_changed.mean, statistics.mean) and torch.equal(statistics_changed.rstd,
                                                                                   statistics.rstd)
    assert not torch.equal(out_changed[..., 30:], out[..., 30:])


def test_rows_equal_the_layers_they_replace() -> None:
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, 24, 33, generator=generator).to(DEVICE)
    residual = torch.randn(2, 24, 33, generator=generator).to(DEVICE)
    statistics = _statistics(x, 30)
    slope = torch.tensor([0.25], device=DEVICE)
    expected = F.prelu(instance_norm(x, 30) + residual, slope)
    assert torch.allclose(normalized_rows(x, statistics=statistics, residual=residual, slope=slope), expected,
                          rtol=1e-5, atol=1e-6)
    unit = normalized_rows(x, statistics=statistics, unit_eps=2.2e-16)
    assert torch.allclose(unit, normalize_features(instance_norm(x, 30)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tiles_a_step", [2, feature_kernels.STATISTICS_TILES])
def test_statistics_combine_the_tiles_in_steps(monkeypatch: pytest.MonkeyPatch, tiles_a_step: int) -> None:
    """Seven tiles of 16 columns (the last one padding only), combined two at a time (four steps, the last one short)
    or all in one step: the output's statistics over its first 90 columns."""
    monkeypatch.setattr(feature_kernels, "STATISTICS_TILES", tiles_a_step)
    generator = torch.Generator().manual_seed(8)
    x = (torch.randn(2, 24, 100, generator=generator) * 2 + 3).to(DEVICE)
    weight = (torch.randn(40, 24, generator=generator) * 0.3).to(DEVICE)
    out, statistics, _ = normalized_convolution(x, kernel_weight(weight), None, 90, tile=TILE)
    expected = _statistics(out, 90)
    assert torch.allclose(statistics.mean, expected.mean, rtol=1e-5, atol=1e-6)
    assert torch.allclose(statistics.rstd, expected.rstd, rtol=1e-5, atol=1e-6)


def _correspondence() -> Correspondence:
    torch.manual_seed(0)
    corr = Correspondence(ngf=8, half_dtype=torch.float16).to(DEVICE).eval()
    for block in corr.layer:  # slopes of their own, so that a mixed-up block would show
        torch.nn.init.uniform_(block.prelu.weight, 0.1, 0.4)
    return corr


@pytest.mark.parametrize("pose_columns,pose_vertices", [(40, 37), (29, None)])
def test_correspondence_kernel_path_equals_autograd_path(pose_columns: int, pose_vertices: int | None) -> None:
    """Both meshes in one feature pass (same shapes), and in two (different vertex counts)."""
    corr = _correspondence()
    generator = torch.Generator().manual_seed(11)
    identity = F.pad(torch.randn(2, 3, 37, generator=generator), (0, 3)).to(DEVICE)
    pose = torch.randn(2, 3, pose_columns, generator=generator).to(DEVICE)
    if pose_vertices is not None:
        pose[..., pose_vertices:] = 0
    with torch.no_grad():
        expected_features = corr.features(identity, 37)
        assert _relative(corr.kernel_features(identity, 37), expected_features.double()) < PRODUCT_TOLERANCE
        warp_out, features = corr._forward(identity, pose, 37, pose_vertices, corr.features, corr._unit_projection)
        kernel_warp_out, kernel_features = corr.forward_by_kernels(identity, pose, 37, pose_vertices)
    assert _relative(kernel_features, features.double()) < PRODUCT_TOLERANCE
    assert _relative(kernel_warp_out, warp_out.double()) < PRODUCT_TOLERANCE


def test_kernel_path_only_at_gpu_inference_on_the_fast_path() -> None:
    corr = _correspondence()
    points = torch.zeros(1, 3, 8, device=DEVICE)
    with torch.no_grad():
        assert corr.uses_kernels(points) == points.is_cuda
        corr.half_dtype = None
        assert not corr.uses_kernels(points)
    corr.half_dtype = torch.float16
    assert not corr.uses_kernels(points)  # gradients enabled


@pytest.mark.skipif(DEVICE != "cuda", reason="the kernel path runs on a GPU")
def test_compiled_layers_leave_the_kernels_to_batches() -> None:
    """Once its layers are compiled, Corr takes Inductor's code for one pair and the kernels from
    COMPILED_KERNELS_MIN_BATCH pairs on."""
    corr = _correspondence()
    with torch.no_grad():
        assert corr.uses_kernels(torch.zeros(1, 3, 8, device=DEVICE))  # eager layers: the kernels for one pair too
    corr.compile_layers()
    assert corr.kernels_min_batch == COMPILED_KERNELS_MIN_BATCH > 1
    with torch.no_grad():
        assert not corr.uses_kernels(torch.zeros(COMPILED_KERNELS_MIN_BATCH - 1, 3, 8, device=DEVICE))
        assert corr.uses_kernels(torch.zeros(COMPILED_KERNELS_MIN_BATCH, 3, 8, device=DEVICE))


@pytest.mark.parametrize("change,message", [
    (lambda args: {**args, "x": args["x"].double()}, "contiguous float32"),
    (lambda args: {**args, "x": args["x"].transpose(1, 2)}, "contiguous float32"),
    (lambda args: {**args, "vertices": 0}, "vertices must lie"),
    (lambda args: {**args, "weight": kernel_weight(torch.zeros(16, 3, device=DEVICE))}, "weight must be"),
    (lambda args: {**args, "tile": (16, 16, 8, 4)}, r"powers of two \(vertices, output channels, input channels, "
                                                     r"warps\), all but the warps at least 16"),
    (lambda args: {**args, "tile": (16, 16, 16, 3)}, "powers of two"),
    (lambda args: {**args, "statistics": Statistics(torch.zeros(2, 3), torch.zeros(2, 3))}, "statistics mean"),
    (lambda args: {**args, "slope": torch.zeros(2)}, "slope must be"),
])
def test_bad_arguments_get_one_line(change, message: str) -> None:
    zeros = torch.zeros(16, 16, device=DEVICE)
    arguments = {"x": zeros.expand(2, 16, 16).contiguous(), "weight": kernel_weight(zeros), "bias": None,
                 "vertices": 16, "tile": TILE}
    arguments = change(arguments)
    with pytest.raises(ValueError, match=message):
        normalized_convolution(arguments.pop("x"), arguments.pop("weight"), arguments.pop("bias"),
                               arguments.pop("vertices"), **arguments)


def test_a_gpu_too_small_falls_back_to_the_layers_with_one_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    corr = _correspondence()
    points = torch.randn(1, 3, 16, device=DEVICE)

    def too_big(*args) -> None:
        with feature_kernels._reported_as_not_fitting():
            raise feature_kernels.triton.runtime.OutOfResources(300000, 232448, "shared memory")

    monkeypatch.setattr(corr, "uses_kernels", lambda points: corr.kernels_fit)
    monkeypatch.setattr(corr, "forward_by_kernels", too_big)
    with torch.no_grad():
        with pytest.warns(UserWarning, match="do not fit this GPU.*shared memory"):
            warp_out, _ = corr(points, points)
        assert not corr.kernels_fit
        expected, _ = corr._forward(points, points, None, None, corr.features, corr._unit_projection)
    assert torch.equal(warp_out, expected)


def test_kernel_weights_are_formed_again_when_the_weights_change() -> None:
    """The cached pieces follow in-place changes (an optimizer step, a loaded checkpoint)."""
    corr = _correspondence()
    points = F.pad(torch.randn(1, 3, 20, generator=torch.Generator().manual_seed(5)), (0, 4)).to(DEVICE)
    with torch.no_grad():
        before = corr.kernel_features(points, 20)
        assert corr._kernel_weight(corr.theta) is corr._kernel_weight(corr.theta)
        corr.layer[0].conv1.weight.mul_(0.5)
        expected = corr.features(points, 20)
        after = corr.kernel_features(points, 20)
        assert not torch.equal(after, before)
        assert _relative(after, expected.double()) < PRODUCT_TOLERANCE
        state = {name: value * 2 for name, value in corr.theta.state_dict().items()}
        corr.theta.load_state_dict(state, assign=True)  # new parameters
        assert torch.equal(corr._kernel_weight(corr.theta).hi, kernel_weight(state["weight"].squeeze(2)).hi)
