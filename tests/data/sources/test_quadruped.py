"""Tests for data/sources/quadruped.py: fixed watertight topology, sensible proportions, skinning, determinism."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import trimesh

from data.sources.quadruped import (JOINT_NAMES, SHAPE_FACTOR_RANGES, SHAPE_LABELS, QuadrupedSource,
                                    rest_skeleton)

LEG_JOINTS = [j for j, name in enumerate(JOINT_NAMES) if name[:2] in ("L_", "R_")]


@pytest.fixture(scope="module")
def source():
    return QuadrupedSource()


@pytest.fixture(scope="module")
def sample(source):
    rng = np.random.default_rng(0)
    shapes = torch.as_tensor(source.sample_identities(6, rng))
    poses = torch.as_tensor(source.sample_poses(6, rng))
    return shapes, poses


def test_interface(source):
    assert (source.name, source.layout) == ("quadruped", "animal")
    assert source.shape_labels == list(SHAPE_LABELS) and len(source.pose_labels()) == 3 * len(JOINT_NAMES)
    assert 3500 <= source.num_vertices <= 4300, "about SMAL's 3889 vertices"
    assert source.faces.dtype == np.int64 and source.faces.shape == (2 * source.num_vertices - 4, 3)
    assert source.faces.min() == 0 and source.faces.max() == source.num_vertices - 1
    assert source.to(torch.device("cpu")) is source
    np.testing.assert_array_equal(source.reference_shape(), np.zeros(len(SHAPE_LABELS)))


def test_every_shape_and_pose_is_finite_on_the_fixed_topology(source, sample):
    shapes, poses = sample
    vertices = source.vertices(shapes, poses)
    assert vertices.shape == (6, source.num_vertices, 3) and vertices.dtype == torch.float32
    assert torch.isfinite(vertices).all()


@pytest.mark.parametrize("index", range(4))
def test_rest_surfaces_are_closed_and_outward(source, sample, index):
    shapes, _ = sample
    shape = torch.zeros(1, 7) if index == 0 else shapes[index:index + 1]
    vertices = source.vertices(shape, torch.zeros(1, 3 * len(JOINT_NAMES)))[0].double().numpy()
    mesh = trimesh.Trimesh(vertices, source.faces, process=False)
    assert mesh.is_watertight and mesh.is_winding_consistent
    assert mesh.euler_number == 2, "one closed surface of genus 0"
    assert mesh.volume > 0, "faces point outwards"


def test_proportions_legs_below_body(source, sample):
    shapes, _ = sample
    joints, _, _ = rest_skeleton(shapes.exp())
    vertices = source.vertices(shapes, torch.zeros(6, 3 * len(JOINT_NAMES)))
    leg = source.buffers["weights"][:, LEG_JOINTS].sum(1) > 0.99
    assert 0.1 < leg.float().mean() < 0.5
    for b in range(6):
        body_bottom = vertices[b, ~leg, 1].min()
        assert vertices[b, leg, 1].min() < 0.02 < body_bottom, "paws on the ground, body above"
        extent = vertices[b].max(0).values - vertices[b].min(0).values
        assert extent[0] > extent[1] > extent[2], "longer than tall, taller than wide"
        assert (joints[b, LEG_JOINTS, 1] < joints[b, 0, 1]).all(), "leg joints below the pelvis"


@pytest.mark.parametrize("label", SHAPE_LABELS)
def test_each_shape_parameter_changes_the_body(source, label):
    shape = torch.zeros(2, 7)
    shape[1, SHAPE_LABELS.index(label)] = 0.3
    vertices = source.vertices(shape, torch.zeros(2, 3 * len(JOINT_NAMES)))
    assert (vertices[1] - vertices[0]).norm(dim=1).max() > 0.01


def test_shape_parameters_mean_what_they_say(source):
    def extent(label: str, value: float) -> torch.Tensor:
        shape = torch.zeros(1, 7)
        shape[0, SHAPE_LABELS.index(label)] = value
        vertices = source.vertices(shape, torch.zeros(1, 3 * len(JOINT_NAMES)))[0]
        return vertices.max(0).values - vertices.min(0).values

    assert extent("body_length", 0.2)[0] > extent("body_length", -0.2)[0]
    assert extent("leg_length", 0.3)[1] > extent("leg_length", -0.3)[1]
    assert extent("girth", 0.3)[2] > extent("girth", -0.3)[2]


def test_sampled_identities_stay_in_their_ranges(source):
    identities = np.exp(source.sample_identities(500, np.random.default_rng(1)))
    low, high = np.array([SHAPE_FACTOR_RANGES[label] for label in SHAPE_LABELS]).T
    assert np.all(identities >= low) and np.all(identities <= high)


def test_straight_poses_move_less_than_random_ones(source):
    poses = torch.as_tensor(source.sample_poses(40, np.random.default_rng(2)))
    assert torch.all(poses[:, :3] == 0), "the root stays at rest"
    shape = torch.zeros(40, 7)
    rest = source.vertices(shape, torch.zeros_like(poses))
    moved = (source.vertices(shape, poses) - rest).norm(dim=-1).mean(dim=1)
    assert moved[:20].mean() > 2 * moved[20:].mean() > 0


def test_skinning_weights_are_normalised_and_root_rotation_is_rigid(source):
    weights = source.buffers["weights"]
    assert (weights >= 0).all()
    torch.testing.assert_close(weights.sum(1), torch.ones(source.num_vertices))
    pose = torch.zeros(1, 3 * len(JOINT_NAMES))
    pose[0, :3] = torch.tensor([0.3, -0.5, 0.2])
    rest = source.vertices(torch.zeros(1, 7), torch.zeros_like(pose))[0]
    turned = source.vertices(torch.zeros(1, 7), pose)[0]
    def pairwise(points: torch.Tensor) -> torch.Tensor:
        return (points[:, None] - points[None]).norm(dim=-1)  # (N, N)

    torch.testing.assert_close(pairwise(turned[::10]), pairwise(rest[::10]), atol=1e-5, rtol=0)


def test_batches_equal_single_calls_and_runs_are_deterministic(source, sample):
    shapes, poses = sample
    batched = source.vertices(shapes, poses)
    for b in (0, 5):
        torch.testing.assert_close(batched[b], source.vertices(shapes[b:b + 1], poses[b:b + 1])[0], atol=1e-6, rtol=0)
    other = QuadrupedSource()
    np.testing.assert_array_equal(other.faces, source.faces)
    assert torch.equal(other.vertices(shapes, poses), batched)
    np.testing.assert_array_equal(other.sample_poses(6, np.random.default_rng(0)),
                                  source.sample_poses(6, np.random.default_rng(0)))
    np.testing.assert_array_equal(other.sample_identities(6, np.random.default_rng(0)),
                                  source.sample_identities(6, np.random.default_rng(0)))
