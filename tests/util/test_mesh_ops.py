"""Tests for util/mesh_ops.py against per-axis and per-face reference implementations."""
from __future__ import annotations

import itertools

import pytest
import torch

from util.mesh_ops import center_bbox, permute_mesh, random_permutation


def _center_bbox_naive(points: torch.Tensor) -> torch.Tensor:
    """Centre one (V, 3) point set axis by axis, in Python."""
    centred = points.clone()
    for axis in range(3):
        column = points[:, axis].tolist()
        centred[:, axis] -= (min(column) + max(column)) / 2
    return centred


def _permute_mesh_naive(
    vertices: torch.Tensor, faces: torch.Tensor, permutation: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Permute one mesh with a Python loop over faces, looking up where each old vertex went."""
    order = permutation.tolist()
    new_faces = [[order.index(old) for old in face] for face in faces.tolist()]
    return vertices[permutation], torch.tensor(new_faces, dtype=torch.int64).reshape(-1, 3)


def _random_mesh(
    num_vertices: int, num_faces: int, generator: torch.Generator, batch_shape: tuple[int, ...] = ()
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    vertices = torch.randn(*batch_shape, num_vertices, 3, generator=generator, dtype=torch.float64)
    faces = torch.randint(num_vertices, (*batch_shape, num_faces, 3), generator=generator)
    permutation = torch.argsort(torch.rand(*batch_shape, num_vertices, generator=generator), dim=-1)
    return vertices, faces, permutation


@pytest.mark.parametrize("batch_shape, num_vertices", list(itertools.product([(), (1,), (2, 3)], [1, 2, 17, 300])))
def test_center_bbox_matches_naive(batch_shape, num_vertices):
    generator = torch.Generator().manual_seed(0)
    points = torch.rand(*batch_shape, num_vertices, 3, generator=generator, dtype=torch.float64) * 5 + 3
    centred = center_bbox(points)
    assert centred.shape == points.shape and centred.dtype == points.dtype
    flat_points, flat_centred = points.reshape(-1, num_vertices, 3), centred.reshape(-1, num_vertices, 3)
    for single_points, single_centred in zip(flat_points, flat_centred):
        torch.testing.assert_close(single_centred, _center_bbox_naive(single_points), rtol=0, atol=1e-12)
    torch.testing.assert_close(centred.amin(-2) + centred.amax(-2), torch.zeros_like(centred[..., 0, :]))


def test_center_bbox_ignores_translation_and_keeps_scale():
    generator = torch.Generator().manual_seed(1)
    points = torch.randn(40, 3, generator=generator, dtype=torch.float64)
    shift = torch.tensor([10.0, -3.0, 0.5], dtype=torch.float64)
    torch.testing.assert_close(center_bbox(points + shift), center_bbox(points))
    centred = center_bbox(points)
    torch.testing.assert_close(centred.amax(0) - centred.amin(0), points.amax(0) - points.amin(0))


@pytest.mark.parametrize("shape", [(3,), (5, 2), (0, 3)])
def test_center_bbox_rejects_bad_shape(shape):
    with pytest.raises(ValueError, match=r"\(\.\.\., V, 3\)"):
        center_bbox(torch.zeros(shape))


@pytest.mark.parametrize("num_vertices, num_faces", list(itertools.product([1, 3, 17, 200], [0, 1, 50])))
def test_permute_mesh_matches_naive_and_keeps_triangles(num_vertices, num_faces):
    generator = torch.Generator().manual_seed(num_vertices * 100 + num_faces)
    vertices, faces, permutation = _random_mesh(num_vertices, num_faces, generator)
    permuted_vertices, permuted_faces = permute_mesh(vertices, faces, permutation)
    expected_vertices, expected_faces = _permute_mesh_naive(vertices, faces, permutation)
    assert torch.equal(permuted_vertices, expected_vertices)
    assert torch.equal(permuted_faces, expected_faces) and permuted_faces.dtype == torch.int64
    # Every face is the same triangle in space: same three corners, same winding.
    assert torch.equal(permuted_vertices[permuted_faces], vertices[faces])


@pytest.mark.parametrize(
    "batch_shape, num_vertices, num_faces", list(itertools.product([(1,), (4,), (2, 3)], [5, 64], [0, 30]))
)
def test_permute_mesh_batched_matches_per_mesh(batch_shape, num_vertices, num_faces):
    generator = torch.Generator().manual_seed(7)
    vertices, faces, permutation = _random_mesh(num_vertices, num_faces, generator, batch_shape)
    permuted_vertices, permuted_faces = permute_mesh(vertices, faces, permutation)
    assert permuted_vertices.shape == vertices.shape and permuted_faces.shape == faces.shape
    for index in itertools.product(*(range(size) for size in batch_shape)):
        expected_vertices, expected_faces = _permute_mesh_naive(vertices[index], faces[index], permutation[index])
        assert torch.equal(permuted_vertices[index], expected_vertices)
        assert torch.equal(permuted_faces[index], expected_faces)


def test_permute_mesh_rejects_bad_inputs():
    vertices, faces, permutation = _random_mesh(6, 4, torch.Generator().manual_seed(2))
    with pytest.raises(ValueError, match="permutation must have shape"):
        permute_mesh(vertices, faces, permutation[:5])
    with pytest.raises(ValueError, match="exactly once"):
        permute_mesh(vertices, faces, torch.zeros(6, dtype=torch.int64))
    with pytest.raises(ValueError, match="faces must have shape"):
        permute_mesh(vertices, faces[:, :2], permutation)
    with pytest.raises(ValueError, match="int64"):
        permute_mesh(vertices, faces.int(), permutation)


def test_random_permutation_is_reproducible_permutation():
    first = random_permutation(50, torch.Generator().manual_seed(3))
    again = random_permutation(50, torch.Generator().manual_seed(3))
    other = random_permutation(50, torch.Generator().manual_seed(4))
    assert first.dtype == torch.int64
    assert torch.equal(first.sort().values, torch.arange(50))
    assert torch.equal(first, again) and not torch.equal(first, other)
    with pytest.raises(ValueError, match="at least 1"):
        random_permutation(0, torch.Generator())
