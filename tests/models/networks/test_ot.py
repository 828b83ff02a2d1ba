"""Tests for models/networks/ot/: the log-domain, chunked and stored Sinkhorn warps against the dense reference.

`sinkhorn_warp_dense` (the published multiplicative iterations, autograd through them) is the naive
reference; every other form must equal it in value and gradient over a product of sizes.
"""
from __future__ import annotations

import functools
import itertools
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.networks import ot
from models.networks.layers import mixed_product
from models.networks.ot import (similarity_warp_stored, sinkhorn_warp_chunked, sinkhorn_warp_dense,
                                sinkhorn_warp_logdomain, sinkhorn_warp_stored)

# (N, M): square, more identity than pose vertices, fewer; none divisible by the chunk sizes below.
SIZES = [(7, 7), (13, 9), (9, 20)]
# Several blocks with a partial last one, and one block larger than N.
CHUNK_SIZES = [3, 4, 64]
# One block (the default) and several with a partial last one.
STORED_CHUNK_SIZES = [None, 4]
# Log-sum-exps shifted by their maxima, and by the bound of cosine similarities (|C| <= 1).
SIMILARITY_BOUNDS = [None, 1.0]
ITERATIONS = [0, 1, 5]
# Relative L2 error allowed against the dense reference in the same dtype.
VALUE_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}
GRADIENT_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4}


def _unit_features(batch: int, channels: int, count: int, generator: torch.Generator) -> torch.Tensor:
    features = torch.randn(batch, channels, count, generator=generator, dtype=torch.float64)
    return features / features.norm(dim=1, keepdim=True)  # (B, C, count)


def _random_problem(batch: int, num_identity: int, num_pose: int, dtype: torch.dtype, seed: int,
                    channels: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """theta (B, C, N), phi (B, C, M), pose points (B, M, 3); few channels spread C over [-1, 1]."""
    generator = torch.Generator().manual_seed(seed)
    theta = _unit_features(batch, channels, num_identity, generator)
    phi = _unit_features(batch, channels, num_pose, generator)
    points = torch.randn(batch, num_pose, 3, generator=generator, dtype=torch.float64)
    return theta.to(dtype), phi.to(dtype), points.to(dtype)


def _random_similarity(batch: int, num_identity: int, num_pose: int, dtype: torch.dtype,
                       seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarities (B, N, M) of random 4-channel unit features, and pose points (B, M, 3)."""
    theta, phi, points = _random_problem(batch, num_identity, num_pose, torch.float64, seed)
    return (theta.transpose(1, 2) @ phi).to(dtype), points.to(dtype)  # (B, N, M)


def _cap_directions(count: int, min_degrees: float, max_degrees: float, generator: torch.Generator) -> torch.Tensor:
    """Unit vectors (3, count) whose angle to +z lies in [min_degrees, max_degrees]."""
    polar = torch.deg2rad(min_degrees + (max_degrees - min_degrees) * torch.rand(count, generator=generator,
                                                                                   dtype=torch.float64))
    azimuth = 2 * math.pi * torch.rand(count, generator=generator, dtype=torch.float64)
    return torch.stack([polar.sin() * azimuth.cos(), polar.sin() * azimuth.sin(), polar.cos()])  # (3, count)


def _division_eps_problem() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Identity features in a 10-degree cap; half the pose features 62-68 degrees away from +z.

    The far pose columns then have K^T a ~ 1e-8 (cosine about 0.45, K ~ exp(-0.55 / 0.03)), the regime
    where SPEC.md says the +1e-8 of the published division dominates.
    """
    generator = torch.Generator().manual_seed(0)
    num_identity, num_pose = 24, 30
    theta = _cap_directions(num_identity, 0, 10, generator)[None]  # (1, 3, N)
    phi = torch.cat([_cap_directions(num_pose // 2, 0, 10, generator),
                     _cap_directions(num_pose - num_pose // 2, 62, 68, generator)], dim=1)[None]  # (1, 3, M)
    points = torch.randn(1, num_pose, 3, generator=generator, dtype=torch.float64)
    return theta, phi, points


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def _warp_and_gradients(warp_function, *inputs, seed: int = 1):
    """warp_out and the gradients of <w, warp_out> (fixed random w) in every input."""
    leaves = [tensor.detach().clone().requires_grad_() for tensor in inputs]
    warp = warp_function(*leaves)
    generator = torch.Generator().manual_seed(seed)
    weights = torch.randn(warp.shape, generator=generator, dtype=torch.float64).to(warp.dtype)
    gradients = torch.autograd.grad((warp * weights).sum(), leaves)
    return warp.detach(), gradients


def _from_features(warp_function, **options):
    """A warp of (similarity, pose points) as a warp of (theta, phi, pose points): C = theta^T phi."""
    return lambda theta, phi, points: warp_function(theta.transpose(1, 2) @ phi, points, **options)  # (B, N, M)


def _dense_from_features(iterations: int = ot.SINKHORN_ITERATIONS):
    return _from_features(sinkhorn_warp_dense, iterations=iterations)


def _logdomain_from_features(iterations: int = ot.SINKHORN_ITERATIONS):
    return _from_features(sinkhorn_warp_logdomain, iterations=iterations)


def _assert_matches_dense(warp_function, theta, phi, points, iterations: int = ot.SINKHORN_ITERATIONS):
    dtype = theta.dtype
    expected, expected_gradients = _warp_and_gradients(_dense_from_features(iterations), theta, phi, points)
    warp, gradients = _warp_and_gradients(warp_function, theta, phi, points)
    assert warp.dtype == dtype and warp.shape == expected.shape
    assert _relative_error(warp, expected) < VALUE_TOLERANCE[dtype]
    for name, gradient, expected_gradient in zip(("theta", "phi", "pose_points"), gradients, expected_gradients):
        error = _relative_error(gradient, expected_gradient)
        assert error < GRADIENT_TOLERANCE[dtype], f"gradient of {name} differs by {error:.3g} relative"


@pytest.mark.parametrize("dtype, batch, sizes, iterations",
                         list(itertools.product([torch.float64, torch.float32], [1, 2], SIZES, ITERATIONS)))
def test_logdomain_matches_dense(dtype, batch, sizes, iterations):
    theta, phi, points = _random_problem(batch, *sizes, dtype, seed=10 * batch + iterations)
    _assert_matches_dense(_logdomain_from_features(iterations), theta, phi, points, iterations)


@pytest.mark.parametrize("dtype, batch, sizes, chunk_size, iterations",
                         list(itertools.product([torch.float64, torch.float32], [1, 2], SIZES, CHUNK_SIZES,
                                                ITERATIONS)))
def test_chunked_matches_dense(dtype, batch, sizes, chunk_size, iterations):
    theta, phi, points = _random_problem(batch, *sizes, dtype, seed=100 * batch + chunk_size + iterations)
    chunked = functools.partial(sinkhorn_warp_chunked, iterations=iterations, chunk_size=chunk_size)
    _assert_matches_dense(chunked, theta, phi, points, iterations)


@pytest.mark.parametrize("iterations", [1, 5])
def test_chunked_gradcheck(iterations):
    theta, phi, points = _random_problem(2, 5, 7, torch.float64, seed=3, channels=3)
    inputs = tuple(tensor.requires_grad_() for tensor in (theta, phi, points))
    assert torch.autograd.gradcheck(
        functools.partial(sinkhorn_warp_chunked, iterations=iterations, chunk_size=2), inputs)


@pytest.mark.parametrize("warp_function", [functools.partial(sinkhorn_warp_chunked, chunk_size=4),
                                           _from_features(sinkhorn_warp_stored)], ids=["chunked", "stored"])
def test_gradient_of_points_alone_matches_dense(warp_function):
    """With a similarity that needs no gradient, backward stops after the pass that gives dL/dpose_points."""
    theta, phi, points = _random_problem(2, 11, 8, torch.float64, seed=4)
    gradients = []
    for function in (_dense_from_features(), warp_function):
        leaf = points.clone().requires_grad_()
        warp = function(theta, phi, leaf)
        gradients.append(torch.autograd.grad(warp.square().sum(), leaf)[0])
    expected, gradient = gradients
    assert _relative_error(gradient, expected) < 1e-10


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_division_eps_is_kept(dtype, monkeypatch):
    theta, phi, points = _division_eps_problem()
    column_mass = torch.exp((theta.transpose(1, 2) @ phi - 1) / ot.SINKHORN_EPSILON).mean(dim=1)  # K^T a_0, (1, M)
    assert ((column_mass > 1e-9) & (column_mass < 1e-6)).sum() >= 10, "the fixture must reach the 1e-8 regime"
    theta, phi, points = theta.to(dtype), phi.to(dtype), points.to(dtype)
    _assert_matches_dense(functools.partial(sinkhorn_warp_chunked, chunk_size=5), theta, phi, points)
    _assert_matches_dense(_logdomain_from_features(), theta, phi, points)
    _assert_matches_dense(_from_features(sinkhorn_warp_stored, chunk_size=7), theta, phi, points)
    _assert_similarity_warp_matches_dense(sinkhorn_warp_stored, theta.transpose(1, 2) @ phi, points)  # (B, N, M)
    _assert_similarity_warp_matches_dense(functools.partial(sinkhorn_warp_stored, similarity_bound=1.0),
                                          theta.transpose(1, 2) @ phi, points)
    reference = sinkhorn_warp_dense(theta.transpose(1, 2) @ phi, points)
    for changed_eps in (0.0, 1e-7):
        monkeypatch.setattr(ot.dense, "SINKHORN_DIVISION_EPS", changed_eps)  # the module that reads it
        changed = sinkhorn_warp_dense(theta.transpose(1, 2) @ phi, points)
        assert _relative_error(changed, reference) > 0.1, f"+{changed_eps} instead of +1e-8 must move warp_out"


def test_warp_rows_are_convex_combinations():
    theta, phi, points = _random_problem(2, 50, 40, torch.float32, seed=5, channels=8)
    points = points * torch.tensor([1.0, 5.0, 0.2])
    lower, upper = points.amin(dim=1, keepdim=True), points.amax(dim=1, keepdim=True)  # (B, 1, 3)
    similarity = theta.transpose(1, 2) @ phi  # (B, N, M)
    for warp in (sinkhorn_warp_chunked(theta, phi, points, chunk_size=16),
                 sinkhorn_warp_logdomain(similarity, points), sinkhorn_warp_stored(similarity, points)):
        slack = 1e-5 * (upper - lower)
        assert torch.all(warp >= lower - slack) and torch.all(warp <= upper + slack)


def test_chunked_upcasts_half_precision_inputs():
    theta, phi, points = _random_problem(2, 9, 12, torch.float32, seed=6)
    half_inputs = [tensor.to(torch.bfloat16).requires_grad_() for tensor in (theta, phi, points)]
    warp = sinkhorn_warp_chunked(*half_inputs, chunk_size=4)
    expected = sinkhorn_warp_chunked(*(tensor.detach().float() for tensor in half_inputs), chunk_size=4)
    assert warp.dtype == torch.float32
    torch.testing.assert_close(warp, expected, rtol=0, atol=0)
    warp.sum().backward()
    assert all(tensor.grad.dtype == torch.bfloat16 for tensor in half_inputs)


@pytest.mark.parametrize("warp_function, inputs", [
    (functools.partial(sinkhorn_warp_chunked, chunk_size=4), _random_problem(1, 10, 10, torch.float32, seed=7)),
    (sinkhorn_warp_stored, _random_similarity(1, 10, 10, torch.float32, seed=7)),
], ids=["chunked", "stored"])
def test_ignores_autocast(warp_function, inputs):
    expected = warp_function(*inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        warp = warp_function(*inputs)
    torch.testing.assert_close(warp, expected, rtol=0, atol=0)


@pytest.mark.parametrize("warp_function", [
    lambda theta, phi, points, chunk_size: sinkhorn_warp_chunked(theta, phi, points, chunk_size=chunk_size),
    lambda theta, phi, points, chunk_size: sinkhorn_warp_stored(theta.transpose(1, 2) @ phi, points,
                                                                chunk_size=chunk_size),
], ids=["chunked", "stored"])
def test_compiled_caller_graph_does_not_grow_with_blocks(warp_function):
    """--compile on compiles the network that calls the warp: its loops over blocks must stay out of the
    graph, or the graph (and its compile time) grows with N."""
    def graph_nodes(num_vertices: int) -> int:
        nodes = []

        def count_nodes(graph_module, example_inputs):
            nodes.append(len(graph_module.graph.nodes))
            return graph_module.forward

        theta, phi, points = _random_problem(1, num_vertices, num_vertices, torch.float32, seed=9)
        caller = torch.compile(lambda theta, phi, points: 2 * warp_function(theta, phi, points, chunk_size=4),
                               backend=count_nodes, dynamic=False)
        torch._dynamo.reset()
        torch.testing.assert_close(caller(theta, phi, points), 2 * warp_function(theta, phi, points, 4))
        return sum(nodes)

    assert graph_nodes(32) == graph_nodes(8)


@pytest.mark.parametrize("chunk_size", [16, 1024])
def test_chunked_with_split_products_matches_dense(chunk_size, monkeypatch):
    """C's blocks from the split fp16 product (as on a GPU; on the CPU its float32 emulation, the same products),
    against the dense float32 warp: within float32's tolerance in value and gradient."""
    from models.networks.ot import chunked

    built = []
    monkeypatch.setattr(chunked, "split_products_run_on", lambda tensor: built.append(tensor.shape) or True)
    theta, phi, points = _random_problem(2, 70, 50, torch.float32, seed=12, channels=16)
    split = functools.partial(sinkhorn_warp_chunked, chunk_size=chunk_size, split_products=True)
    _assert_matches_dense(split, theta, phi, points)
    assert len(built) == 2  # the split operands formed once in forward, once in backward


def test_chunked_splits_only_float32_features(monkeypatch):
    from models.networks.ot import chunked

    monkeypatch.setattr(chunked, "split_products_run_on", lambda tensor: True)
    theta, phi, _ = _random_problem(1, 5, 6, torch.float64, seed=13)
    assert not chunked._LogKernelRows(theta, phi, 0.03, split=True).split
    assert chunked._LogKernelRows(theta.float(), phi.float(), 0.03, split=True).split
    assert not chunked._LogKernelRows(theta.float(), phi.float(), 0.03, split=False).split


def test_chunked_saves_no_similarity_sized_tensor():
    num_vertices = 64
    theta, phi, points = _random_problem(1, num_vertices, num_vertices, torch.float32, seed=8)
    theta.requires_grad_()
    saved_sizes = []

    def pack(tensor):
        saved_sizes.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        sinkhorn_warp_chunked(theta, phi, points, chunk_size=16).sum().backward()
    assert saved_sizes and max(saved_sizes) < num_vertices * num_vertices / 4


@pytest.mark.parametrize("arguments, message", [
    (dict(identity_features=torch.zeros(1, 4, 5, 1)), "identity and pose features"),
    (dict(pose_features=torch.zeros(1, 3, 6)), "identity and pose features"),
    (dict(pose_points=torch.zeros(1, 5, 3)), "pose_points"),
    (dict(epsilon=0.0), "epsilon"),
    (dict(iterations=-1), "iterations"),
    (dict(iterations=2.0), "iterations"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(identity_features=torch.zeros(1, 4, 5, dtype=torch.int64)), "floating point"),
])
def test_chunked_rejects_bad_inputs(arguments, message):
    inputs = dict(identity_features=torch.zeros(1, 4, 5), pose_features=torch.zeros(1, 4, 6),
                  pose_points=torch.zeros(1, 6, 3))
    with pytest.raises(ValueError, match=message):
        sinkhorn_warp_chunked(**{**inputs, **arguments})


@pytest.mark.parametrize("warp_function, arguments, message", [
    *itertools.product([sinkhorn_warp_logdomain, sinkhorn_warp_stored], [dict(similarity=torch.zeros(5, 6))],
                       ["similarity"]),
    *itertools.product([sinkhorn_warp_logdomain, sinkhorn_warp_stored], [dict(pose_points=torch.zeros(1, 6, 2))],
                       ["pose_points"]),
    *itertools.product([sinkhorn_warp_logdomain, sinkhorn_warp_stored], [dict(epsilon=-0.03)], ["epsilon"]),
    (sinkhorn_warp_stored, dict(iterations=1.5), "iterations"),
    (sinkhorn_warp_stored, dict(chunk_size=0), "chunk_size"),
    (sinkhorn_warp_stored, dict(chunk_size=True), "chunk_size"),
    (sinkhorn_warp_stored, dict(similarity=torch.zeros(1, 5, 6, dtype=torch.int64)), "floating point"),
])
def test_similarity_warps_reject_bad_inputs(warp_function, arguments, message):
    inputs = dict(similarity=torch.zeros(1, 5, 6), pose_points=torch.zeros(1, 6, 3))
    with pytest.raises(ValueError, match=message):
        warp_function(**{**inputs, **arguments})


# ----------------------------------------------------------------------------------------------------
# sinkhorn_warp_stored
# ----------------------------------------------------------------------------------------------------

# With C itself as the leaf, warp_out and its gradients are compared with dense run in float64 on the same
# inputs: float32 dense is itself up to 3e-6 away from that in dL/dC, the stored form up to 7e-6.
SIMILARITY_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


def _assert_similarity_warp_matches_dense(warp_function, similarity, points,
                                          iterations: int = ot.SINKHORN_ITERATIONS,
                                          epsilon: float = ot.SINKHORN_EPSILON):
    expected = _warp_and_gradients(functools.partial(sinkhorn_warp_dense, iterations=iterations, epsilon=epsilon),
                                   similarity.double(), points.double())
    warp, gradients = _warp_and_gradients(warp_function, similarity, points)
    assert warp.dtype == similarity.dtype and warp.shape == expected[0].shape
    for name, actual, reference in zip(("warp_out", "dL/dsimilarity", "dL/dpose_points"), (warp, *gradients),
                                       (expected[0], *expected[1])):
        error = _relative_error(actual, reference)
        assert error < SIMILARITY_TOLERANCE[similarity.dtype], f"{name} differs by {error:.3g} relative"


@pytest.mark.parametrize("dtype, batch, sizes, chunk_size, iterations, similarity_bound",
                         list(itertools.product([torch.float64, torch.float32], [1, 2], SIZES, STORED_CHUNK_SIZES,
                                                ITERATIONS, SIMILARITY_BOUNDS)))
def test_stored_matches_dense(dtype, batch, sizes, chunk_size, iterations, similarity_bound):
    seed = 1000 * batch + 10 * (chunk_size or 0) + iterations
    similarity, points = _random_similarity(batch, *sizes, dtype, seed)
    options = dict(iterations=iterations, chunk_size=chunk_size, similarity_bound=similarity_bound)
    _assert_similarity_warp_matches_dense(functools.partial(sinkhorn_warp_stored, **options), similarity, points,
                                          iterations)
    theta, phi, points = _random_problem(batch, *sizes, dtype, seed + 1)
    _assert_matches_dense(_from_features(sinkhorn_warp_stored, **options), theta, phi, points, iterations)


@pytest.mark.parametrize("chunk_size, compiled_forms", [(None, False), (3, False), (None, True)])
def test_stored_keeps_a_narrow_bound_at_a_small_epsilon(chunk_size, compiled_forms, monkeypatch):
    """At epsilon 0.01 the widest bound allowed is 0.4. There s = (C - 1) / epsilon reaches -140, where exp(s) alone
    is 0 in float32, while every term lies within exp(-80) of its bounded shift. With a row and a column whose every
    C is -0.4, the float32 stored warp and its gradients match float64's dense warp (float32's dense warp is NaN)."""
    epsilon, bound = 0.01, 0.4
    similarity, points = _random_similarity(2, 9, 11, torch.float64, seed=13)
    similarity = bound * similarity
    similarity[0, 0] = -bound  # (N, M) row 0 of batch 0
    similarity[1, :, 0] = -bound  # column 0 of batch 1
    if compiled_forms:  # the broadcast reductions written for torch.compile, run eagerly
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    _assert_similarity_warp_matches_dense(
        functools.partial(sinkhorn_warp_stored, epsilon=epsilon, chunk_size=chunk_size, similarity_bound=bound),
        similarity.float(), points.float(), epsilon=epsilon)


@pytest.mark.parametrize("iterations, chunk_size, similarity_bound",
                         [(0, None, None), (1, 2, None), (5, None, None), (5, 2, None), (5, None, 1.0), (5, 2, 1.0)])
def test_stored_gradcheck(iterations, chunk_size, similarity_bound):
    similarity, points = _random_similarity(2, 5, 7, torch.float64, seed=11)
    inputs = (similarity.requires_grad_(), points.requires_grad_())
    assert torch.autograd.gradcheck(functools.partial(
        sinkhorn_warp_stored, iterations=iterations, chunk_size=chunk_size, similarity_bound=similarity_bound), inputs)


@pytest.mark.parametrize("sizes, similarity_bound", list(itertools.product(SIZES, SIMILARITY_BOUNDS)))
def test_stored_compiled_forms_match_dense(sizes, similarity_bound, monkeypatch):
    """The broadcast reductions written for torch.compile, run eagerly, give the same warp and gradients."""
    similarity, points = _random_similarity(2, *sizes, torch.float64, seed=12)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    _assert_similarity_warp_matches_dense(functools.partial(sinkhorn_warp_stored, similarity_bound=similarity_bound),
                                          similarity, points)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_stored_bound_keeps_far_rows_and_columns(dtype):
    """The bounded shift at its extreme: an identity row whose every cosine is -1 (batch 0) and a pose
    column whose every cosine is -1 (batch 1), so their largest logits lie 2 / epsilon below the shift."""
    generator = torch.Generator().manual_seed(16)
    direction = torch.nn.functional.normalize(torch.randn(3, 1, generator=generator, dtype=torch.float64), dim=0)
    identity = torch.stack([torch.cat([-direction, _cap_directions(9, 0, 180, generator)], dim=1),
                            direction.expand(3, 10)])  # (2, 3, 10)
    pose = torch.stack([direction.expand(3, 12),
                        torch.cat([-direction, _cap_directions(11, 0, 180, generator)], dim=1)])  # (2, 3, 12)
    similarity = (identity.transpose(1, 2) @ pose).clamp(-1, 1)  # (2, 10, 12)
    assert similarity[0, 0].eq(-1).all() and similarity[1, :, 0].eq(-1).all()
    points = torch.randn(2, 12, 3, generator=generator, dtype=torch.float64)
    for chunk_size in (None, 3):
        _assert_similarity_warp_matches_dense(
            functools.partial(sinkhorn_warp_stored, similarity_bound=1.0, chunk_size=chunk_size),
            similarity.to(dtype), points.to(dtype))


def test_stored_bound_is_checked():
    similarity, points = _random_similarity(1, 5, 6, torch.float32, seed=17)
    for bound in (0.0, -1.0, 1.3):
        with pytest.raises(ValueError, match="similarity_bound must lie in"):
            sinkhorn_warp_stored(similarity, points, similarity_bound=bound)
    assert torch.isfinite(sinkhorn_warp_stored(similarity, points, similarity_bound=1.2)).all()


def _saved_tensors(function):
    """Every tensor autograd saves while `function()` runs, and its result."""
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = function()
    return saved, result


@pytest.mark.parametrize("chunk_size", STORED_CHUNK_SIZES)
def test_stored_saves_no_other_similarity_sized_tensor(chunk_size):
    theta, phi, points = _random_problem(2, 40, 30, torch.float32, seed=13)
    theta.requires_grad_()
    similarity = theta.transpose(1, 2) @ phi  # (B, N, M)
    saved, warp = _saved_tensors(lambda: sinkhorn_warp_stored(similarity, points, chunk_size=chunk_size))
    large = [tensor for tensor in saved if tensor.numel() >= similarity.numel()]
    assert len(large) == 1 and large[0].data_ptr() == similarity.data_ptr(), "only C itself may be saved"
    assert max(tensor.numel() for tensor in saved if tensor is not large[0]) <= 2 * 40 * 3
    warp.sum().backward()
    assert theta.grad is not None and torch.isfinite(theta.grad).all()


def test_stored_reads_half_precision_similarity_without_a_copy():
    similarity, points = _random_similarity(2, 9, 12, torch.float32, seed=14)
    half_similarity = similarity.to(torch.bfloat16).requires_grad_()
    saved, warp = _saved_tensors(lambda: sinkhorn_warp_stored(half_similarity, points, chunk_size=4))
    large = [tensor for tensor in saved if tensor.numel() >= similarity.numel()]
    assert [tensor.dtype for tensor in large] == [torch.bfloat16] and large[0].data_ptr() == half_similarity.data_ptr()
    expected = sinkhorn_warp_stored(half_similarity.detach().float(), points, chunk_size=4)
    assert warp.dtype == torch.float32
    torch.testing.assert_close(warp, expected, rtol=0, atol=0)
    warp.sum().backward()
    assert half_similarity.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("half_dtype, chunk_size, similarity_bound",
                         list(itertools.product([torch.float16, torch.bfloat16], STORED_CHUNK_SIZES,
                                                SIMILARITY_BOUNDS)))
def test_similarity_warp_equals_the_half_gradient_product_then_the_warp(half_dtype, chunk_size, similarity_bound):
    """similarity_warp_stored forms C and writes dL/dC in half precision itself: the warp and every gradient
    equal those of mixed_product (float32 C, half-precision backward products) followed by sinkhorn_warp_stored,
    bit for bit (the same float32 dL/dC, rounded once to half either way)."""
    theta, phi, points = _random_problem(2, 13, 9, torch.float32, seed=18, channels=8)
    options = dict(chunk_size=chunk_size, similarity_bound=similarity_bound)

    def composed(theta, phi, points):
        return sinkhorn_warp_stored(mixed_product(theta.transpose(1, 2), phi, half_dtype), points, **options)

    results = []
    for warp_function in (functools.partial(similarity_warp_stored, half_dtype=half_dtype, **options), composed):
        inputs = [tensor.clone().requires_grad_() for tensor in (theta, phi, points)]
        warp = warp_function(*inputs)
        warp.backward(torch.randn(warp.shape, generator=torch.Generator().manual_seed(19)))
        results.append([warp, *(tensor.grad for tensor in inputs)])
    for actual, expected in zip(*results):
        assert actual.dtype == torch.float32
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_fixed_point_similarity_rounds_to_steps_of_one_in_32767():
    similarity, _ = _random_similarity(2, 5, 13, torch.float32, seed=26)
    similarity[0, 0, :2] = torch.tensor([1.0 + 1e-6, -1.0 - 1e-6])  # rounding past the bound is clamped
    fixed_point = ot.common.fixed_point_similarity(similarity)
    assert fixed_point.dtype == torch.int16 and fixed_point.shape == (2, 5, 13)
    assert fixed_point.stride(1) == 16, "rows padded to 16 bytes"
    values = ot.common.similarity_values(fixed_point, torch.float64)
    assert values[0, 0, :2].tolist() == [1.0, -1.0]
    error = (values - similarity.double().clamp(-1, 1)).abs().max().item()
    assert 0 < error <= ot.common.SIMILARITY_STEP / 2 * (1 + 1e-6)
    unpadded = ot.common.fixed_point_similarity(similarity[..., :8])
    assert unpadded.is_contiguous() and torch.equal(unpadded, fixed_point[..., :8])


def test_fixed_point_similarity_moves_a_warp_of_matching_features_by_its_rounding_alone():
    """Features that vary smoothly over a point cloud, the pose's a noisy copy of the identity's (row maxima of C near
    1, as trained features give): the dense warp of the fixed-point C is within 1e-5 relative of that of C itself
    (measured 1.4e-6 at 500 vertices, 2.2e-6 at 2000), where rounding C to float16 moves it by 1.9e-5 (3.4e-5)."""
    generator = torch.Generator().manual_seed(0)
    points = torch.randn(1, 500, 3, generator=generator, dtype=torch.float64)
    projection = 3 * torch.randn(3, 128, generator=generator, dtype=torch.float64)
    features = torch.cat([torch.sin(points @ projection), torch.cos(points @ projection)], dim=2)  # (1, 500, 256)
    noise = 0.03 * torch.randn(features.shape, generator=generator, dtype=torch.float64)
    similarity = (torch.nn.functional.normalize(features, dim=2)
                  @ torch.nn.functional.normalize(features + noise, dim=2).transpose(1, 2))  # (1, N, M)
    assert similarity.amax(2).mean() > 0.99
    pose_points = points + 0.05 * torch.randn(points.shape, generator=generator, dtype=torch.float64)
    exact = sinkhorn_warp_dense(similarity, pose_points)
    rounded = ot.common.similarity_values(ot.common.fixed_point_similarity(similarity), torch.float64)
    fixed_point_error = _relative_error(sinkhorn_warp_dense(rounded, pose_points), exact)
    half_error = _relative_error(sinkhorn_warp_dense(similarity.half().double(), pose_points), exact)
    assert 0 < fixed_point_error < 1e-5 < half_error


def _fixed_point_then_warp(half_dtype: torch.dtype, **options):
    """What similarity_warp_stored(fixed_point=True) computes: mixed_product's C moved onto its fixed-point
    values outside autograd (so its gradient is taken there), then sinkhorn_warp_stored."""
    def warp(theta, phi, points):
        similarity = mixed_product(theta.transpose(1, 2), phi, half_dtype)
        rounded = ot.common.similarity_values(ot.common.fixed_point_similarity(similarity.detach()), torch.float32)
        return sinkhorn_warp_stored(similarity + (rounded - similarity).detach(), points, **options)
    return warp


@pytest.mark.parametrize("chunk_size", STORED_CHUNK_SIZES)
def test_fixed_point_similarity_warp_is_the_warp_of_the_rounded_similarity(chunk_size):
    """fixed_point only changes how C is stored: the warp and gradients are those of the float32 warp of C rounded
    to its fixed-point values (to float32 rounding, and the half rounding of dL/dC), and differ from the float32
    C's by the rounding alone."""
    theta, phi, points = _random_problem(2, 13, 9, torch.float32, seed=27, channels=8)
    options = dict(chunk_size=chunk_size, similarity_bound=1.0)
    upstream = torch.randn(2, 13, 3, generator=torch.Generator().manual_seed(28))
    results = []
    for warp_function in (functools.partial(similarity_warp_stored, half_dtype=torch.float16, fixed_point=True,
                                            **options),
                          _fixed_point_then_warp(torch.float16, **options),
                          functools.partial(similarity_warp_stored, half_dtype=torch.float16, **options)):
        inputs = [tensor.clone().requires_grad_() for tensor in (theta, phi, points)]
        warp = warp_function(*inputs)
        warp.backward(upstream)
        results.append([warp.detach(), *(tensor.grad for tensor in inputs)])
    fixed_point, rounded_first, float_similarity = results
    assert _relative_error(fixed_point[0], rounded_first[0]) < 1e-6
    for name, actual, expected in zip(("theta", "phi", "pose_points"), fixed_point[1:], rounded_first[1:]):
        assert _relative_error(actual, expected) < 1e-3, name
    assert 0 < _relative_error(fixed_point[0], float_similarity[0]) < 1e-3


@pytest.mark.parametrize("fixed_point", [False, True])
def test_similarity_warp_of_non_finite_features_is_nan(fixed_point):
    """A NaN feature makes C NaN in float32; in fixed point it would round to an integer, so the warp is made NaN
    instead of a finite answer."""
    theta, phi, points = _random_problem(2, 13, 9, torch.float32, seed=30)
    phi[1, 0, 4] = float("nan")
    warp = similarity_warp_stored(theta, phi, points, torch.float16, similarity_bound=1.0, fixed_point=fixed_point)
    assert torch.isnan(warp[1]).any()
    theta[0, 2, 3] = float("inf")
    warp = similarity_warp_stored(theta, phi, points, torch.float16, similarity_bound=1.0, fixed_point=fixed_point)
    assert torch.isnan(warp[0]).any()


def test_fixed_point_similarity_warp_saves_c_in_int16():
    theta, phi, points = _random_problem(2, 40, 30, torch.float32, seed=29)
    theta.requires_grad_()
    saved, warp = _saved_tensors(lambda: similarity_warp_stored(theta, phi, points, torch.float16,
                                                                similarity_bound=1.0, fixed_point=True))
    large = [tensor for tensor in saved if tensor.numel() >= 40 * 30]
    assert [tensor.dtype for tensor in large] == [torch.int16], "C alone, in fixed point"
    warp.sum().backward()
    assert torch.isfinite(theta.grad).all()


@pytest.mark.parametrize("compiled", [False, True])
def test_similarity_warp_forms_c_from_split_pieces_where_split_products_run(compiled, monkeypatch):
    """As on a GPU (here through the split product's float32 emulation): C is a view of padded rows of the split
    product (its operands formed by a compiled pass when `compiled`), within float32's tolerance of the warp of a
    float32 C."""
    from models.networks.ot import stored

    monkeypatch.setattr(stored, "split_products_run_on", lambda tensor: True)
    theta, phi, points = _random_problem(2, 13, 9, torch.float32, seed=21, channels=8)
    saved, warp = _saved_tensors(lambda: similarity_warp_stored(theta.requires_grad_(), phi, points, torch.float16,
                                                                compiled=compiled, similarity_bound=1.0))
    similarity = saved[0]
    assert similarity.shape == (2, 13, 9) and similarity.stride(1) == 16  # 9 pose columns padded to 16
    expected = sinkhorn_warp_stored(theta.detach().transpose(1, 2) @ phi, points, similarity_bound=1.0)
    assert _relative_error(warp.detach(), expected) < VALUE_TOLERANCE[torch.float32]


def test_similarity_warp_saves_half_copies_and_similarity_only():
    theta, phi, points = _random_problem(2, 40, 30, torch.float32, seed=20)
    theta.requires_grad_()
    saved, warp = _saved_tensors(lambda: similarity_warp_stored(theta, phi, points, torch.float16))
    large = [tensor for tensor in saved if tensor.numel() >= 40 * 30 * 2]
    assert [tensor.dtype for tensor in large] == [torch.float32], "C alone, in float32"
    assert sorted(str(tensor.dtype) for tensor in saved if tensor.dtype != torch.float32) == ["torch.float16"] * 2
    warp.sum().backward()
    assert theta.grad.dtype == torch.float32 and phi.grad is None and torch.isfinite(theta.grad).all()


def test_similarity_warp_makes_no_half_copies_without_a_gradient_to_the_features(monkeypatch):
    """The half-precision feature copies serve dL/dC's products alone: inference, or a gradient to the pose points
    only, makes none, and the points' gradient is the one computed beside the features'."""
    from models.networks.ot import stored

    theta, phi, points = _random_problem(2, 13, 9, torch.float32, seed=31)
    upstream = torch.randn(2, 13, 3, generator=torch.Generator().manual_seed(32))
    options = dict(similarity_bound=1.0, fixed_point=True)
    features_too = [tensor.clone().requires_grad_() for tensor in (theta, phi, points)]
    similarity_warp_stored(*features_too, torch.float16, **options).backward(upstream)
    monkeypatch.setattr(stored, "half_copies", None)  # calling it would fail
    with torch.no_grad():
        inference = similarity_warp_stored(theta, phi, points, torch.float16, **options)
    points_only = points.clone().requires_grad_()
    warp = similarity_warp_stored(theta, phi, points_only, torch.float16, **options)
    warp.backward(upstream)
    torch.testing.assert_close(inference, warp.detach(), rtol=0, atol=0)
    torch.testing.assert_close(points_only.grad, features_too[2].grad, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("num_pose", [203, 6890])
def test_similarity_warp_on_a_gpu_forms_c_from_fp16_pieces_to_float32_accuracy(num_pose):
    """On a GPU C comes from split_product (fp16 pieces, padded rows): the warp and its gradients match the
    warp of C formed in float64 and rounded to float32, as closely as two float32 computations agree."""
    theta, phi, points = (tensor.cuda() for tensor in _random_problem(2, 300, num_pose, torch.float32, seed=22,
                                                                        channels=256))
    upstream = torch.randn(2, 300, 3, device="cuda", generator=torch.Generator(device="cuda").manual_seed(23))
    options = dict(compiled=True, similarity_bound=1.0)
    results = []
    for split in (True, False):
        inputs = [tensor.clone().requires_grad_() for tensor in (theta, phi, points)]
        if split:
            warp = similarity_warp_stored(*inputs, torch.float16, **options)
        else:
            exact = (inputs[0].double().transpose(1, 2) @ inputs[1].double()).float()
            warp = sinkhorn_warp_stored(exact, inputs[2], **options)
        warp.backward(upstream)
        results.append([warp, *(tensor.grad for tensor in inputs)])
    (warp, *grads), (expected, *expected_grads) = results
    torch.testing.assert_close(warp, expected, rtol=1e-5, atol=1e-5)
    for grad, reference in zip(grads, expected_grads):  # C's products run in fp16 on one side only
        assert torch.isfinite(grad).all()
        assert (torch.linalg.norm(grad - reference) / torch.linalg.norm(reference)).item() < 1e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("num_pose", [203, 2000])
def test_chunked_warp_on_a_gpu_forms_c_blocks_from_fp16_pieces_to_float32_accuracy(num_pose):
    """On a GPU the chunked warp's blocks of C come from split_product: warp and gradients match the dense warp of
    C formed in float64 and rounded to float32, as the stored warp's do (test above)."""
    theta, phi, points = (tensor.cuda() for tensor in _random_problem(2, 300, num_pose, torch.float32, seed=24,
                                                                        channels=256))
    upstream = torch.randn(2, 300, 3, device="cuda", generator=torch.Generator(device="cuda").manual_seed(25))
    results = []
    for split in (True, False):
        inputs = [tensor.clone().requires_grad_() for tensor in (theta, phi, points)]
        if split:
            warp = sinkhorn_warp_chunked(*inputs, chunk_size=128, split_products=True)
        else:
            exact = (inputs[0].double().transpose(1, 2) @ inputs[1].double()).float()
            warp = sinkhorn_warp_dense(exact, inputs[2])
        warp.backward(upstream)
        results.append([warp, *(tensor.grad for tensor in inputs)])
    (warp, *grads), (expected, *expected_grads) = results
    torch.testing.assert_close(warp, expected, rtol=1e-5, atol=1e-5)
    for grad, reference in zip(grads, expected_grads):
        assert torch.isfinite(grad).all()
        assert (torch.linalg.norm(grad - reference) / torch.linalg.norm(reference)).item() < 1e-3


def test_similarity_warp_checks_its_inputs():
    theta, phi, points = _random_problem(1, 6, 5, torch.float32, seed=21)
    with pytest.raises(ValueError, match="float32 features"):
        similarity_warp_stored(theta.double(), phi.double(), points, torch.float16)
    with pytest.raises(ValueError, match=r"shapes \(B, C, N\) and \(B, C, M\)"):
        similarity_warp_stored(theta, phi[:, :2], points, torch.float16)
    with pytest.raises(ValueError, match="pose_points must have shape"):
        similarity_warp_stored(theta, phi, points[:, :4], torch.float16)
    with pytest.raises(ValueError, match="similarity_bound must lie in"):
        similarity_warp_stored(theta, phi, points, torch.float16, similarity_bound=2.0)
    with pytest.raises(ValueError, match="pass similarity_bound=1.0 with fixed_point"):
        similarity_warp_stored(theta, phi, points, torch.float16, fixed_point=True)


@pytest.mark.slow
def test_stored_compiled_passes_match_dense_and_save_only_similarity():
    """compiled=True runs each pass through torch.compile; an enclosing torch.compile breaks the graph at it."""
    from torch._dynamo.testing import CompileCounter  # imported here: dynamo is slow to import

    theta, phi, points = _random_problem(2, 24, 20, torch.float32, seed=15)
    compiled = _from_features(sinkhorn_warp_stored, compiled=True)
    _assert_matches_dense(compiled, theta, phi, points)
    _assert_matches_dense(_from_features(sinkhorn_warp_stored, compiled=True, similarity_bound=1.0), theta, phi, points)

    def caller(theta, phi, points):
        return 2 * compiled(theta, phi, points)

    counter = CompileCounter()
    torch.testing.assert_close(torch.compile(caller, backend=counter)(theta, phi, points), caller(theta, phi, points))
    assert counter.frame_count == 2, "the caller's graph must break around the warp (one graph each side)"
    similarity = (theta.transpose(1, 2) @ phi).requires_grad_()  # (B, N, M)
    saved, _ = _saved_tensors(lambda: sinkhorn_warp_stored(similarity, points, compiled=True))
    assert [tensor.data_ptr() for tensor in saved if tensor.numel() >= similarity.numel()] == [similarity.data_ptr()]


_PEAK_MEMORY_SCRIPT = """
import sys, torch
from models.networks.ot import sinkhorn_warp_chunked
num_vertices = int(sys.argv[1])
generator = torch.Generator().manual_seed(0)
features = [torch.nn.functional.normalize(torch.randn(1, 64, num_vertices, generator=generator), dim=1)
            .requires_grad_() for _ in range(2)]
points = torch.randn(1, num_vertices, 3, generator=generator)
def resident_kib(field):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field))
open("/proc/self/clear_refs", "w").write("5")
before = resident_kib("VmRSS:")
sinkhorn_warp_chunked(*features, points, chunk_size=256).sum().backward()
print(resident_kib("VmHWM:") - before)
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS reset needs Linux /proc")
def test_chunked_memory_grows_linearly():
    # A fixed mmap threshold makes glibc return every freed block to the OS, so that peak RSS follows the
    # tensors alive at once; with its default, heap fragmentation over the many blocks grows RSS with N * M.
    environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    growth_kib = {}
    for num_vertices in (4096, 8192):
        result = subprocess.run([sys.executable, "-c", _PEAK_MEMORY_SCRIPT, str(num_vertices)], check=True,
                                capture_output=True, text=True, cwd=Path(__file__).resolve().parents[3],
                                env=environment)
        growth_kib[num_vertices] = int(result.stdout)
    similarity_kib = 8192 * 8192 * 4 / 1024
    assert growth_kib[8192] < similarity_kib / 4, f"peak grew by {growth_kib[8192]} KiB at N = M = 8192"
    assert growth_kib[8192] < 3 * growth_kib[4096], f"peak growth is not linear: {growth_kib}"
