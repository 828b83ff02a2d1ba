"""Tests for data/sources/smpl.py: SMPL and SMAL sources on tiny model files written in the published format."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from data.sources.smpl import SMPL_RANDOM_RANGES, SMPL_STRAIGHT_RANGES, SMALSource, SMPLSource
from tests.data.sources.model_files import as_chumpy, tiny_smal_model, tiny_smpl_model, write_model_file
from tests.data.sources.test_lbs import naive_skinning


def naive_smpl(model: dict, betas: np.ndarray, pose: np.ndarray) -> np.ndarray:
    """SMPL's forward pass for one body from the model dict, by its definition (Loper et al. 2015, eqs. 1-4)."""
    num_joints = model["kintree_table"].shape[1]
    parents = [-1] + model["kintree_table"][0, 1:].astype(int).tolist()
    axis_angle = pose.reshape(num_joints, 3)
    shaped = model["v_template"] + sum(betas[k] * model["shapedirs"][:, :, k] for k in range(len(betas)))
    joints = model["J_regressor"].toarray() @ shaped
    rotations = Rotation.from_rotvec(axis_angle).as_matrix()
    feature = np.concatenate([(r - np.eye(3)).ravel() for r in rotations[1:]])
    posed = shaped + model["posedirs"] @ feature
    return naive_skinning(posed, joints, axis_angle, parents, model["weights"])


@pytest.fixture
def smpl_file(tmp_path):
    model = tiny_smpl_model()
    return model, write_model_file(tmp_path / "basicModel_tiny.pkl", model)


def test_smpl_vertices_match_the_naive_definition(smpl_file):
    model, path = smpl_file
    source = SMPLSource(path)
    rng = np.random.default_rng(0)
    betas, poses = source.sample_identities(3, rng), source.sample_poses(3, rng)
    vertices = source.vertices(torch.as_tensor(betas), torch.as_tensor(poses))
    assert vertices.shape == (3, 50, 3) and vertices.dtype == torch.float32
    assert torch.isfinite(vertices).all()
    for b in range(3):
        np.testing.assert_allclose(vertices[b].numpy(), naive_smpl(model, betas[b], poses[b]), atol=2e-4,
                                   err_msg=f"body {b}")


def test_zero_shape_and_pose_give_the_template(smpl_file):
    model, path = smpl_file
    source = SMPLSource(path)
    vertices = source.vertices(torch.zeros(2, 10), torch.zeros(2, 72))
    np.testing.assert_allclose(vertices.numpy(), np.broadcast_to(model["v_template"], (2, 50, 3)), atol=1e-6)
    betas = np.linspace(-2.0, 2.0, 10)
    shaped = source.vertices(torch.as_tensor(betas[None]), torch.zeros(1, 72))[0].numpy()
    np.testing.assert_allclose(shaped, model["v_template"] + model["shapedirs"] @ betas, atol=1e-5)


def test_chumpy_python2_file_poses_like_the_plain_file(smpl_file, tmp_path):
    model, path = smpl_file
    chumpy_path = write_model_file(tmp_path / "py2.pkl", as_chumpy(model), python2=True)
    shape, pose = torch.full((1, 10), 0.5), torch.full((1, 72), 0.1)
    torch.testing.assert_close(SMPLSource(chumpy_path).vertices(shape, pose), SMPLSource(path).vertices(shape, pose))


def test_smpl_interface_and_sampling(smpl_file):
    _, path = smpl_file
    source = SMPLSource(path, device=torch.device("cpu"))
    assert (source.name, source.layout, source.num_vertices) == ("smpl", "human", 50)
    assert source.faces.dtype == np.int64 and source.faces.shape == (50, 3)
    assert source.shape_labels == [f"beta{k}" for k in range(10)]
    assert len(source.pose_labels()) == 72 and source.pose_labels()[3:6] == ["L_hip.rx", "L_hip.ry", "L_hip.rz"]
    assert source.to(torch.device("cpu")) is source
    identities = source.sample_identities(200, np.random.default_rng(1))
    assert identities.shape == (200, 10) and np.abs(identities).max() <= 4.0 and np.abs(identities).max() > 3.5
    np.testing.assert_array_equal(identities, source.sample_identities(200, np.random.default_rng(1)))
    poses = np.degrees(source.sample_poses(400, np.random.default_rng(2)).reshape(400, 24, 3))
    for half, ranges in ((poses[:200], SMPL_RANDOM_RANGES), (poses[200:], SMPL_STRAIGHT_RANGES)):
        low, high = np.zeros((24, 3)), np.zeros((24, 3))
        for joint, axes in ranges.items():
            low[joint], high[joint] = np.asarray(axes).T
        assert np.all(half >= low - 1e-9) and np.all(half <= high + 1e-9)
    assert np.all(poses[:, 0] == 0.0), "global orientation stays zero"
    assert poses[:200, 4, 0].max() > 90.0 and poses[200:, 4, 0].max() <= 15.0, "knees bend far only in wide poses"


def test_smal_source_on_a_tiny_file(tmp_path):
    model = tiny_smal_model()
    source = SMALSource(write_model_file(tmp_path / "smal_tiny.pkl", model))
    assert (source.name, source.layout, source.num_vertices) == ("smal", "animal", 70)
    assert len(source.shape_labels) == 20 and len(source.pose_labels()) == 99
    rng = np.random.default_rng(3)
    shapes, poses = source.sample_identities(4, rng), source.sample_poses(4, rng)
    assert np.abs(shapes).max() <= 1.5
    rest = poses.reshape(4, 33, 3)[:, [0, 32]]
    assert np.all(rest == 0.0), "root and mouth stay at rest"
    vertices = source.vertices(torch.as_tensor(shapes), torch.as_tensor(poses))
    assert vertices.shape == (4, 70, 3) and torch.isfinite(vertices).all()
    padded = np.concatenate([shapes[0], np.zeros(21)])
    np.testing.assert_allclose(vertices[0].numpy(), naive_smpl(model, padded, poses[0]), atol=2e-4)


@pytest.mark.parametrize("key", ["v_template", "shapedirs", "posedirs", "J_regressor", "weights", "kintree_table", "f"])
def test_missing_key_is_one_clear_error(tmp_path, key):
    model = tiny_smpl_model()
    del model[key]
    with pytest.raises(ValueError, match=f"has no '{key}' entry") as error:
        SMPLSource(write_model_file(tmp_path / "bad.pkl", model))
    assert "\n" not in str(error.value) and "SMPL model file" in str(error.value)


@pytest.mark.parametrize("key,value,message", [
    ("posedirs", np.zeros((50, 3, 200)), r"entry 'posedirs' has shape \(50, 3, 200\); \(V, 3, 9 \(J - 1\)\)"),
    ("weights", np.zeros((24, 50)), r"entry 'weights' has shape \(24, 50\); \(V, J\) = \(50, 24\)"),
    ("shapedirs", np.zeros((50, 3)), r"entry 'shapedirs' has shape \(50, 3\); 3 axes were expected"),
    ("v_template", np.zeros((50, 2)), r"entry 'v_template' has shape \(50, 2\); \(V, 3\)"),
    ("f", np.array([[0, 1, 50]]), r"entry 'f' indexes vertices 0\.\.50 but v_template has 50"),
    ("v_template", np.full((50, 3), np.nan), r"entry 'v_template' holds non-finite"),
])
def test_wrong_shapes_are_one_clear_error(tmp_path, key, value, message):
    model = tiny_smpl_model()
    model[key] = value
    with pytest.raises(ValueError, match=message):
        SMPLSource(write_model_file(tmp_path / "bad.pkl", model))


def test_wrong_tree_forbidden_class_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match=r"SMAL model file .* has the kinematic tree"):
        SMALSource(write_model_file(tmp_path / "smpl_as_smal.pkl", tiny_smpl_model()))
    with pytest.raises(ValueError, match="SMPL model file .* has the kinematic tree"):
        SMPLSource(write_model_file(tmp_path / "smal_as_smpl.pkl", tiny_smal_model()))
    model = tiny_smpl_model()
    model["shapedirs"] = torch.nn.Identity()
    with pytest.raises(ValueError, match=r"asks to load torch\..*; only NumPy/SciPy arrays are allowed"):
        SMPLSource(write_model_file(tmp_path / "evil.pkl", model))
    with pytest.raises(FileNotFoundError):
        SMPLSource(tmp_path / "absent.pkl")


def test_batched_input_shapes_are_checked(smpl_file):
    _, path = smpl_file
    with pytest.raises(ValueError, match=r"smpl pose parameters must have shape \(B, 72\), got \(2, 69\)"):
        SMPLSource(path).vertices(torch.zeros(2, 10), torch.zeros(2, 69))
