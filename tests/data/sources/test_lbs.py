"""Tests for data/sources/lbs.py against naive references: SciPy's rotations and a per-vertex skinning loop."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from data.sources.lbs import (axis_angle_labels, axis_angle_to_matrix, blend, check_parameters, pose_feature,
                              pose_rest_mesh, regress_joints, sample_joint_angles, sample_pose_set)


def naive_skinning(vertices: np.ndarray, joints: np.ndarray, axis_angle: np.ndarray, parents: list[int],
                   weights: np.ndarray) -> np.ndarray:
    """Linear blend skinning of one body, vertex by vertex, in float64.

    Args:
        vertices: (V, 3) rest vertices; joints: (J, 3) rest joints; axis_angle: (J, 3) local rotations;
        parents: J ints; weights: (V, J).
    Returns:
        (V, 3) posed vertices.
    """
    world = []
    for joint, parent in enumerate(parents):
        local = np.eye(4)
        local[:3, :3] = Rotation.from_rotvec(axis_angle[joint]).as_matrix()
        local[:3, 3] = joints[joint] - (joints[parent] if parent >= 0 else 0.0)
        world.append(local if parent < 0 else world[parent] @ local)
    skinning = []
    for joint in range(len(parents)):
        unpose = np.eye(4)
        unpose[:3, 3] = -joints[joint]
        skinning.append(world[joint] @ unpose)
    posed = np.zeros_like(vertices)
    for v in range(len(vertices)):
        point = np.append(vertices[v], 1.0)
        posed[v] = sum(weights[v, j] * (skinning[j] @ point)[:3] for j in range(len(parents)))
    return posed


def random_tree(num_joints: int, rng: np.random.Generator) -> list[int]:
    return [-1] + [int(rng.integers(0, j)) for j in range(1, num_joints)]


def test_axis_angle_to_matrix_matches_scipy():
    rng = np.random.default_rng(0)
    vectors = np.concatenate([rng.normal(size=(50, 3)) * 2.0, rng.normal(size=(10, 3)) * 1e-5,
                              np.zeros((1, 3)), [[np.pi, 0.0, 0.0]]])
    ours = axis_angle_to_matrix(torch.as_tensor(vectors)).numpy()
    np.testing.assert_allclose(ours, Rotation.from_rotvec(vectors).as_matrix(), atol=1e-12)


def test_axis_angle_to_matrix_float32_is_a_rotation_and_keeps_batch_shape():
    angles = torch.randn(4, 5, 3, generator=torch.Generator().manual_seed(1))
    rotations = axis_angle_to_matrix(angles)
    assert rotations.shape == (4, 5, 3, 3) and rotations.dtype == torch.float32
    eye = torch.eye(3).expand_as(rotations)
    torch.testing.assert_close(rotations @ rotations.transpose(-1, -2), eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.linalg.det(rotations), torch.ones(4, 5), atol=1e-5, rtol=0)


@pytest.mark.parametrize("batch,num_vertices,num_joints", list(itertools.product((1, 3), (1, 17), (1, 4, 9))))
def test_pose_rest_mesh_matches_naive_loop(batch, num_vertices, num_joints):
    rng = np.random.default_rng(batch * 100 + num_vertices * 10 + num_joints)
    parents = random_tree(num_joints, rng)
    vertices = rng.normal(size=(batch, num_vertices, 3))
    joints = rng.normal(size=(batch, num_joints, 3))
    axis_angle = rng.normal(size=(batch, num_joints, 3))
    weights = rng.random((num_vertices, num_joints))
    weights /= weights.sum(axis=1, keepdims=True)
    ours = pose_rest_mesh(torch.as_tensor(vertices), torch.as_tensor(joints),
                          axis_angle_to_matrix(torch.as_tensor(axis_angle)), parents, torch.as_tensor(weights))
    for b in range(batch):
        expected = naive_skinning(vertices[b], joints[b], axis_angle[b], parents, weights)
        np.testing.assert_allclose(ours[b].numpy(), expected, atol=1e-10, err_msg=f"body {b}")


def test_rest_pose_leaves_vertices_unchanged():
    rng = np.random.default_rng(2)
    vertices = torch.as_tensor(rng.normal(size=(2, 20, 3)))
    weights = torch.as_tensor(rng.dirichlet(np.ones(5), size=20))
    posed = pose_rest_mesh(vertices, torch.as_tensor(rng.normal(size=(2, 5, 3))),
                           axis_angle_to_matrix(torch.zeros(2, 5, 3, dtype=torch.float64)), [-1, 0, 1, 1, 0],
                           weights)
    torch.testing.assert_close(posed, vertices, atol=1e-12, rtol=0)


def test_blend_regress_and_pose_feature_match_their_definitions():
    rng = np.random.default_rng(3)
    directions, coefficients = rng.normal(size=(7, 3, 4)), rng.normal(size=(2, 4))
    expected = np.stack([sum(coefficients[b, k] * directions[:, :, k] for k in range(4)) for b in range(2)])
    np.testing.assert_allclose(blend(torch.as_tensor(directions), torch.as_tensor(coefficients)).numpy(), expected)
    regressor, vertices = rng.random((3, 7)), rng.normal(size=(2, 7, 3))
    np.testing.assert_allclose(regress_joints(torch.as_tensor(regressor), torch.as_tensor(vertices)).numpy(),
                               np.stack([regressor @ vertices[b] for b in range(2)]))
    rotations = axis_angle_to_matrix(torch.as_tensor(rng.normal(size=(2, 4, 3))))
    feature = pose_feature(rotations)
    assert feature.shape == (2, 27)
    np.testing.assert_allclose(feature[1, 9:18].numpy(), (rotations[1, 2].numpy() - np.eye(3)).ravel())


def test_sample_joint_angles_respects_ranges_and_seed():
    ranges = {1: ((-10.0, 0.0), (0.0, 0.0), (5.0, 20.0))}
    poses = sample_joint_angles(500, np.random.default_rng(4), ranges, num_joints=3)
    assert poses.shape == (500, 9) and poses.dtype == np.float64
    degrees = np.degrees(poses.reshape(500, 3, 3))
    assert np.all(degrees[:, [0, 2]] == 0.0) and np.all(degrees[:, 1, 1] == 0.0)
    assert -10.0 <= degrees[:, 1, 0].min() < -9.0 and -1.0 < degrees[:, 1, 0].max() <= 0.0
    assert 5.0 <= degrees[:, 1, 2].min() and degrees[:, 1, 2].max() <= 20.0
    np.testing.assert_array_equal(poses, sample_joint_angles(500, np.random.default_rng(4), ranges, 3))


def test_sample_pose_set_puts_wide_poses_first():
    wide, straight = {0: ((-90.0, 90.0),) * 3}, {0: ((-1.0, 1.0),) * 3}
    poses = np.degrees(sample_pose_set(9, np.random.default_rng(5), wide, straight, num_joints=1))
    assert poses.shape == (9, 3)
    assert np.abs(poses[:4]).max() > 1.0 and np.abs(poses[4:]).max() <= 1.0


def test_labels_and_parameter_checks():
    assert axis_angle_labels(["a", "b"]) == ["a.rx", "a.ry", "a.rz", "b.rx", "b.ry", "b.rz"]
    check_parameters("toy", torch.zeros(2, 3), torch.zeros(2, 6), 3, 6)
    with pytest.raises(ValueError, match=r"toy shape parameters must have shape \(B, 3\), got \(2, 4\)"):
        check_parameters("toy", torch.zeros(2, 4), torch.zeros(2, 6), 3, 6)
    with pytest.raises(ValueError, match="toy got 2 shapes but 1 poses"):
        check_parameters("toy", torch.zeros(2, 3), torch.zeros(1, 6), 3, 6)
