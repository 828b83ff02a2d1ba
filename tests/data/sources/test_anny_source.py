"""Tests for data/sources/anny_source.py: identities, poses and posing checked against anny's own forward pass.

The first Anny() in a fresh ANNY_CACHE_DIR parses the model assets (minutes) and fills the cache; every
later build, here and in the generator tests, reads the cache in under a second.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from data.sources.anny_source import AnnySource

LEFT_HIP, LEFT_KNEE = "upperleg01.L.rx", "lowerleg01.L.rx"


@pytest.fixture(scope="module")
def source() -> AnnySource:
    return AnnySource(torch.device("cpu"))


def _statures(source: AnnySource, shapes: np.ndarray) -> np.ndarray:
    rest = source.vertices(torch.as_tensor(shapes), torch.zeros(len(shapes), len(source.pose_labels())))
    return (rest[..., 2].amax(dim=1) - rest[..., 2].amin(dim=1)).double().numpy()


def _posed_naive(source: AnnySource, shape: np.ndarray, pose: np.ndarray) -> torch.Tensor:
    """One body posed through anny's public call, with bone transforms built one by one from the labels."""
    rotations = {}
    for label, value in zip(source.pose_labels(), pose):
        bone, axis = label.rsplit(".", 1)
        rotations.setdefault(bone, np.zeros(3))["xyz".index(axis[1])] = value
    pose_parameters = {}
    for bone, rotvec in rotations.items():
        transform = torch.eye(4)[None]
        transform[0, :3, :3] = torch.as_tensor(Rotation.from_rotvec(rotvec).as_matrix(), dtype=torch.float32)
        pose_parameters[bone] = transform
    phenotypes = {label: float(value) for label, value in zip(source.shape_labels, shape)}
    with torch.no_grad():
        return source.model(pose_parameters=pose_parameters, phenotype_kwargs=phenotypes)["vertices"][0]


def test_topology_matches_the_posed_meshes(source):
    shapes = source.sample_identities(2, np.random.default_rng(0))
    poses = source.sample_poses(2, np.random.default_rng(0))
    posed = source.vertices(torch.as_tensor(shapes), torch.as_tensor(poses))
    assert posed.dtype == torch.float32 and posed.shape == (2, source.num_vertices, 3)
    assert source.faces.dtype == np.int64 and source.faces.shape[1] == 3
    assert source.faces.min() == 0 and source.faces.max() == source.num_vertices - 1
    assert source.to(torch.device("cpu")) is source


def test_identities_are_adults_spread_over_their_ranges(source):
    count = 8
    shapes = source.sample_identities(count, np.random.default_rng(3))
    assert shapes.dtype == np.float64 and shapes.shape == (count, len(source.shape_labels))
    np.testing.assert_array_equal(shapes, source.sample_identities(count, np.random.default_rng(3)))
    column = dict(zip(source.shape_labels, shapes.T))
    assert np.all((column["age"] >= 0.77) & (column["age"] <= 0.93))  # 18 to 90 years (ANNY.md)
    # Latin hypercube: each phenotype has one identity in each of `count` equal strata of its range.
    for label, (low, high) in {"gender": (0, 1), "age": (0.77, 0.93), "muscle": (0.1, 0.9),
                               "weight": (0.1, 0.9), "proportions": (0.1, 0.9)}.items():
        strata = np.floor((column[label] - low) / (high - low) * count).astype(int)
        assert sorted(strata) == list(range(count)), label
    statures = _statures(source, shapes)
    assert statures.min() > 1.47 and statures.max() < 1.91
    assert statures.max() - statures.min() > 0.15


def test_height_is_solved_from_a_stature_within_the_gender_band(source):
    shapes = source.sample_identities(8, np.random.default_rng(5))
    gender = shapes[:, source.shape_labels.index("gender")]
    middle = 1.755 - 0.13 * gender  # the target band is this +-0.15 m
    assert np.all(np.abs(_statures(source, shapes) - middle) <= 0.15 + 1e-3)


def test_poses_half_random_half_straight_within_npt_ranges(source):
    count = 40
    poses = source.sample_poses(count, np.random.default_rng(1))
    labels = source.pose_labels()
    assert poses.dtype == np.float64 and poses.shape == (count, len(labels)) and len(set(labels)) == len(labels)
    assert not any(part in label for label in labels for part in ("finger", "toe", "eye", "metacarpal"))
    degrees = dict(zip(labels, np.rad2deg(poses).T))
    random, straight = slice(0, count // 2), slice(count // 2, count)
    for side in ("L", "R"):
        assert np.all((degrees[f"upperleg01.{side}.rx"] >= -90) & (degrees[f"upperleg01.{side}.rx"] <= 20))
        assert np.all((degrees[f"lowerleg01.{side}.rx"] >= 0) & (degrees[f"lowerleg01.{side}.rx"] <= 100))
        assert degrees[f"upperleg01.{side}.rx"][random].min() < -45
        assert degrees[f"lowerleg01.{side}.rx"][random].max() > 50
        assert np.all(degrees[f"lowerleg01.{side}.rx"][straight] <= 15)
        assert np.all(np.abs(degrees[f"upperleg01.{side}.rx"][straight]) <= 15)
        for axis in ("rx", "ry"):
            assert np.all(np.abs(degrees[f"upperarm01.{side}.{axis}"]) <= 30)
        elbow = np.stack([degrees[f"lowerarm01.{side}.{axis}"] for axis in ("rx", "ry", "rz")], axis=1)
        assert np.all(np.linalg.norm(elbow, axis=1) <= 60 + 1e-9)
        # A hinge: every elbow rotation is about one axis.
        assert np.linalg.matrix_rank(elbow, tol=1e-6) == 1
    for label in ("spine04", "spine02", "neck01", "head"):
        assert all(np.all(np.abs(degrees[f"{label}.{axis}"]) <= 10) for axis in ("rx", "ry", "rz"))


def test_vertices_match_anny_forward_pass(source):
    shapes = source.sample_identities(3, np.random.default_rng(2))
    poses = source.sample_poses(4, np.random.default_rng(2))
    pairs = [(0, 3), (2, 1), (2, 2)]
    posed = source.vertices(torch.as_tensor(shapes[[i for i, _ in pairs]]),
                            torch.as_tensor(poses[[p for _, p in pairs]]))
    for k, (i, p) in enumerate(pairs):
        torch.testing.assert_close(posed[k], _posed_naive(source, shapes[i], poses[p]), atol=2e-5, rtol=0)


def test_zero_pose_is_the_rest_pose_and_a_knee_flexes_backwards(source):
    shape = torch.as_tensor(source.reference_shape()[None])
    zero = torch.zeros(1, len(source.pose_labels()))
    with torch.no_grad():
        rest = source.model(pose_parameters=None, phenotype_kwargs=shape.float())["vertices"]
    torch.testing.assert_close(source.vertices(shape, zero), rest, atol=1e-6, rtol=0)
    knee = zero.clone()
    knee[0, source.pose_labels().index(LEFT_KNEE)] = np.pi / 2
    moved = source.vertices(shape, knee)[0] - rest[0]
    foot = rest[0, :, 2] < rest[0, :, 2].min() + 0.05  # the soles
    left, right = foot & (rest[0, :, 0] > 0), foot & (rest[0, :, 0] < 0)
    assert moved[left, 1].min() > 0.2  # front is -y, so the left foot swings backwards
    assert moved[right].abs().max() < 1e-6
    hip = zero.clone()
    hip[0, source.pose_labels().index(LEFT_HIP)] = -np.pi / 2
    assert (source.vertices(shape, hip)[0] - rest[0])[left, 1].max() < -0.5  # the leg swings forwards
