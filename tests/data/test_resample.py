"""Tests for data/resample.py against brute-force closest points and a per-vertex resampling loop."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import trimesh

from data.resample import Resampling, build_resampling, closest_points_on_mesh, closest_points_on_triangles


def _closest_point_on_triangle_naive(point: np.ndarray, triangle: np.ndarray) -> np.ndarray:
    """The nearest of: the plane projection when it falls inside, and the nearest point of each edge."""
    a, b, c = triangle
    candidates = []
    normal = np.cross(b - a, c - a)
    if np.linalg.norm(normal) > 0:
        projected = point - (point - a) @ normal / (normal @ normal) * normal
        inside = all(np.cross(q - p, projected - p) @ normal >= 0 for p, q in ((a, b), (b, c), (c, a)))
        if inside:
            candidates.append(projected)
    for p, q in ((a, b), (b, c), (c, a)):
        span = q - p
        t = 0.0 if span @ span == 0 else np.clip((point - p) @ span / (span @ span), 0.0, 1.0)
        candidates.append(p + t * span)
    return min(candidates, key=lambda candidate: np.linalg.norm(candidate - point))


def _noisy_sphere(subdivisions: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An icosphere with bumpy radius, and points scattered around its surface."""
    rng = np.random.default_rng(seed)
    sphere = trimesh.creation.icosphere(subdivisions=subdivisions)
    vertices = sphere.vertices * rng.uniform(0.8, 1.2, (len(sphere.vertices), 1))
    points = rng.standard_normal((60, 3)) * rng.uniform(0.2, 1.6, (60, 1))
    return vertices, np.asarray(sphere.faces, dtype=np.int64), points


def _distance_to_mesh_brute_force(points: np.ndarray, vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Distance (N,) from each point to the mesh, by checking every face."""
    triangles = vertices[faces][None]  # (1, F, 3, 3)
    weights = closest_points_on_triangles(points[:, None, :], triangles)  # (N, F, 3)
    closest = (weights[..., None] * triangles).sum(axis=2)  # (N, F, 3)
    return np.linalg.norm(closest - points[:, None, :], axis=-1).min(axis=1)


@pytest.mark.parametrize("seed, scale", list(itertools.product(range(3), [1e-3, 1.0, 50.0])))
def test_closest_points_on_triangles_match_naive(seed, scale):
    rng = np.random.default_rng(seed)
    triangles = rng.standard_normal((200, 3, 3))
    triangles[:10, 2] = triangles[:10, 1]  # degenerate: two corners equal
    points = rng.standard_normal((200, 3)) * scale
    weights = closest_points_on_triangles(points, triangles)
    assert np.all(weights >= 0) and np.allclose(weights.sum(axis=1), 1.0)
    closest = (weights[:, :, None] * triangles).sum(axis=1)
    for point, triangle, found in zip(points, triangles, closest):
        expected = _closest_point_on_triangle_naive(point, triangle)
        assert np.linalg.norm(found - point) == pytest.approx(np.linalg.norm(expected - point), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("subdivisions, seed", list(itertools.product([1, 3], range(2))))
def test_closest_points_on_mesh_match_brute_force(subdivisions, seed):
    vertices, faces, points = _noisy_sphere(subdivisions, seed)
    face_index, weights = closest_points_on_mesh(points, vertices, faces)
    found = (weights[:, :, None] * vertices[faces[face_index]]).sum(axis=1)
    np.testing.assert_allclose(np.linalg.norm(found - points, axis=1),
                               _distance_to_mesh_brute_force(points, vertices, faces), rtol=1e-12, atol=1e-12)


def test_apply_matches_per_vertex_loop():
    rng = np.random.default_rng(0)
    resampling = Resampling(corners=rng.integers(0, 9, (5, 3)), barycentric=rng.dirichlet(np.ones(3), 5),
                            faces=np.array([[0, 1, 2], [2, 3, 4]]))
    vertices = torch.randn(2, 9, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    expected = torch.zeros(2, 5, 3, dtype=torch.float64)
    for b, n, k in itertools.product(range(2), range(5), range(3)):
        expected[b, n] += resampling.barycentric[n, k] * vertices[b, resampling.corners[n, k]]
    torch.testing.assert_close(resampling.apply(vertices), expected)


@pytest.mark.parametrize("requested, volume_tolerance", [(40, 0.3), (150, 0.1), (500, 0.03)])
def test_build_resampling_puts_points_on_the_template_surface(requested, volume_tolerance):
    vertices, faces, _ = _noisy_sphere(3, seed=0)  # 642 vertices
    resampling = build_resampling(vertices, faces, requested)
    assert abs(resampling.num_vertices - requested) <= 2
    assert resampling.faces.min() >= 0 and resampling.faces.max() == resampling.num_vertices - 1
    assert np.all(resampling.barycentric >= 0) and np.allclose(resampling.barycentric.sum(axis=1), 1.0)
    source_faces = {tuple(sorted(face)) for face in faces.tolist()}
    assert all(tuple(sorted(corner)) in source_faces for corner in resampling.corners.tolist())
    # The new mesh follows the source: every new vertex lies on it, and it stays close everywhere.
    points = resampling.apply(torch.from_numpy(vertices)[None])[0].numpy()
    assert _distance_to_mesh_brute_force(points, vertices, faces).max() < 1e-12
    source = trimesh.Trimesh(vertices, faces, process=False)
    coarse = trimesh.Trimesh(points, resampling.faces, process=False)
    assert abs(coarse.volume / source.volume - 1) < volume_tolerance
    assert coarse.is_watertight


def test_build_resampling_is_deterministic_and_follows_the_mesh_when_it_moves():
    vertices, faces, _ = _noisy_sphere(3, seed=1)
    first, second = build_resampling(vertices, faces, 200), build_resampling(vertices.copy(), faces.copy(), 200)
    for name in ("corners", "barycentric", "faces"):
        np.testing.assert_array_equal(getattr(first, name), getattr(second, name))
    moved = vertices * np.array([2.0, 1.0, 0.5]) + 3.0  # an affine map keeps barycentric points in place
    np.testing.assert_allclose(first.apply(torch.from_numpy(moved)[None])[0].numpy(),
                               first.apply(torch.from_numpy(vertices)[None])[0].numpy() * [2.0, 1.0, 0.5] + 3.0)


@pytest.mark.parametrize("requested", [0, 3, 642, 1000])
def test_build_resampling_refuses_counts_it_cannot_reach(requested):
    vertices, faces, _ = _noisy_sphere(3, seed=0)
    with pytest.raises(ValueError, match="resampled vertex count"):
        build_resampling(vertices, faces, requested)
