"""SMPL and SMAL bodies from a user's own model file, posed the way the NPT data set was drawn.

Both models ship as a pickled dict (read here by util.safe_pickle, so a model file can never run code):
v_template (V, 3), shapedirs (V, 3, S), posedirs (V, 3, 9 (J - 1)), J_regressor (J, V) (often a SciPy
sparse matrix), weights (V, J), kintree_table (2, J) (row 0 parents, row 1 joint ids) and f (F, 3).
A body is v_template + shapedirs . betas; joints are regressed from it, the pose blend posedirs .
(R - I) is added, and linear blend skinning poses it (data/sources/lbs.py; SMPL, Loper et al. 2015).

SMPL (6890 vertices, 24 joints): identities are the first 10 betas drawn from U(-4, 4), as NPT drew its
16 identities (NPT.md, "Data"). Poses follow NPT's wide/straight split with the angle ranges of issue 3
on SMPL's joints (joint indices below). The rest frame of SMPL has y up, the body facing +z and its left
side at +x, which fixes the signs: a hip flexes forward with a negative x rotation, a knee with a
positive one, and the left (right) elbow bends forward with a negative (positive) y rotation.

SMAL (3889 vertices, 33 joints; Zuffi et al., CVPR 2017): the joint order below is the one of the
published 33-joint SMAL kinematic tree (pelvis and spine 0-6, front legs 7-14, neck 15, head 16, hind
legs 17-24, tail 25-31, mouth 32); a model file must have that tree. Assumptions, stated plainly:
(1) SMAL's rest frame has the body along x, up along z and the legs swinging about y, which the joint
limits of SMAL fitting code suggest; poses therefore rotate most about y and z. Knee directions are not
known here, so leg ranges are symmetric and "small". (2) Shape coefficients are taken as unit-variance
PCA coordinates: the first 20 are drawn from U(-1.5, 1.5), the rest stay 0. This spans the model's
shape space evenly; it is not the per-family (cat, dog, horse, cow, hippo) distribution, which SMAL
keeps in a separate data file that is not read here. The mouth stays closed and the root at rest.

Extra joints beyond these trees (e.g. SMAL variants with ears) stay at rest.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from data.sources.base import BodySource
from data.sources.lbs import (JointRanges, axis_angle_labels, axis_angle_to_matrix, blend, check_parameters,
                              pose_feature, pose_rest_mesh, regress_joints, sample_pose_set)
from util.safe_pickle import load_model_file

SMPL_JOINT_NAMES = (
    "pelvis", "L_hip", "R_hip", "spine1", "L_knee", "R_knee", "spine2", "L_ankle", "R_ankle", "spine3",
    "L_foot", "R_foot", "neck", "L_collar", "R_collar", "head", "L_shoulder", "R_shoulder", "L_elbow",
    "R_elbow", "L_wrist", "R_wrist", "L_hand", "R_hand")
SMPL_PARENTS = (-1, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 12, 13, 14, 16, 17, 18, 19, 20, 21)

# Degrees about (x, y, z) for SMPL's centre and left joints: (wide, straight). Wide: hips forward up to 90,
# knees up to 100, shoulders +-30 about two axes, elbows up to 60, small spine and neck twists (issue 3,
# after NPT); straight: legs nearly straight, everything else smaller. Feet, collars and hands rest.
_SPINE = (((-10.0, 10.0), (-10.0, 10.0), (-5.0, 5.0)), ((-3.0, 3.0), (-3.0, 3.0), (-3.0, 3.0)))
_SMPL_CENTRE_AND_LEFT = {
    1: (((-90.0, 0.0), (-5.0, 5.0), (-10.0, 10.0)), ((-20.0, 5.0), (-3.0, 3.0), (-5.0, 5.0))),
    3: _SPINE,
    4: (((0.0, 100.0), (0.0, 0.0), (0.0, 0.0)), ((0.0, 15.0), (0.0, 0.0), (0.0, 0.0))),
    6: _SPINE,
    7: (((-15.0, 15.0), (0.0, 0.0), (-10.0, 10.0)), ((-5.0, 5.0), (0.0, 0.0), (-5.0, 5.0))),
    9: _SPINE,
    12: (((-10.0, 10.0), (-20.0, 20.0), (-5.0, 5.0)), ((-5.0, 5.0), (-10.0, 10.0), (-3.0, 3.0))),
    15: (((-10.0, 10.0), (-15.0, 15.0), (-5.0, 5.0)), ((-5.0, 5.0), (-10.0, 10.0), (-3.0, 3.0))),
    16: (((0.0, 0.0), (-30.0, 30.0), (-30.0, 30.0)), ((0.0, 0.0), (-15.0, 15.0), (-15.0, 15.0))),
    18: (((0.0, 0.0), (-60.0, 0.0), (0.0, 0.0)), ((0.0, 0.0), (-20.0, 0.0), (0.0, 0.0))),
    20: (((-10.0, 10.0), (-10.0, 10.0), (-10.0, 10.0)), ((-5.0, 5.0), (-5.0, 5.0), (-5.0, 5.0))),
}
SMPL_LEFT_TO_RIGHT = {1: 2, 4: 5, 7: 8, 16: 17, 18: 19, 20: 21}


def _smpl_ranges(column: int) -> JointRanges:
    """Wide (column 0) or straight (1) ranges; a right joint mirrors its left one through the plane x = 0,
    which maps an axis-angle vector (x, y, z) to (x, -y, -z)."""
    ranges = {joint: axes[column] for joint, axes in _SMPL_CENTRE_AND_LEFT.items()}
    for left, right in SMPL_LEFT_TO_RIGHT.items():
        about_x, (y_low, y_high), (z_low, z_high) = ranges[left]
        ranges[right] = (about_x, (-y_high, -y_low), (-z_high, -z_low))
    return ranges


SMPL_RANDOM_RANGES = _smpl_ranges(0)
SMPL_STRAIGHT_RANGES = _smpl_ranges(1)

SMAL_JOINT_NAMES = (
    "root", "pelvis0", "spine", "spine0", "spine1", "spine2", "spine3",
    "LLeg1", "LLeg2", "LLeg3", "LFoot", "RLeg1", "RLeg2", "RLeg3", "RFoot", "Neck", "Head",
    "LLegBack1", "LLegBack2", "LLegBack3", "LFootBack", "RLegBack1", "RLegBack2", "RLegBack3", "RFootBack",
    "Tail1", "Tail2", "Tail3", "Tail4", "Tail5", "Tail6", "Tail7", "Mouth")
SMAL_PARENTS = (-1, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 6, 11, 12, 13, 6, 15, 0, 17, 18, 19, 0, 21, 22, 23,
                0, 25, 26, 27, 28, 29, 30, 16)
SMAL_SPINE = (1, 2, 3, 4, 5, 6)
SMAL_LEG_TOPS = (7, 11, 17, 21)
SMAL_LEG_LOWER = (8, 9, 10, 12, 13, 14, 18, 19, 20, 22, 23, 24)
SMAL_NECK, SMAL_HEAD = 15, 16
SMAL_TAIL = (25, 26, 27, 28, 29, 30, 31)


def _smal_ranges(scale: float) -> JointRanges:
    """SMAL's per-joint ranges in degrees, all multiplied by scale (1 wide, 1/3 straight)."""
    groups = (
        (SMAL_SPINE, ((-5.0, 5.0), (-10.0, 10.0), (-10.0, 10.0))),
        (SMAL_LEG_TOPS, ((-5.0, 5.0), (-30.0, 30.0), (-5.0, 5.0))),
        (SMAL_LEG_LOWER, ((-5.0, 5.0), (-25.0, 25.0), (-5.0, 5.0))),
        ((SMAL_NECK,), ((-10.0, 10.0), (-25.0, 25.0), (-25.0, 25.0))),
        ((SMAL_HEAD,), ((-10.0, 10.0), (-20.0, 20.0), (-20.0, 20.0))),
        (SMAL_TAIL, ((0.0, 0.0), (-15.0, 15.0), (-15.0, 15.0))),
    )
    return {joint: tuple((low * scale, high * scale) for low, high in axes)
            for joints, axes in groups for joint in joints}


# ---------------------------------------------------------------------------------------------------
# Model file reading
# ---------------------------------------------------------------------------------------------------

def _entry(model: dict[str, Any], key: str, where: str, ndim: int) -> np.ndarray:
    """One numeric array of a model file, sparse matrices made dense, checked for its number of axes."""
    if key not in model:
        raise ValueError(f"{where} has no {key!r} entry; an SMPL-format model needs it")
    value = model[key]
    array = value.toarray() if sp.issparse(value) else np.asarray(value)
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise ValueError(f"{where} entry {key!r} holds {array.dtype} values; numbers were expected")
    if array.ndim != ndim:
        raise ValueError(f"{where} entry {key!r} has shape {array.shape}; {ndim} axes were expected")
    if not np.isfinite(array).all():
        raise ValueError(f"{where} entry {key!r} holds non-finite (NaN or inf) values")
    return array


def _expect_shape(array: np.ndarray, expected: tuple[int, ...], key: str, where: str, meaning: str) -> None:
    if array.shape != expected:
        raise ValueError(f"{where} entry {key!r} has shape {array.shape}; {meaning} = {expected} was expected")


def _read_skinned_model(model: dict[str, Any], where: str) -> dict[str, np.ndarray]:
    """Check an SMPL-format dict and return its arrays, with `parents` (J,) int64 in place of kintree_table."""
    template = _entry(model, "v_template", where, 2)
    num_vertices = template.shape[0]
    _expect_shape(template, (num_vertices, 3), "v_template", where, "(V, 3)")
    kintree = _entry(model, "kintree_table", where, 2)
    num_joints = kintree.shape[1]
    _expect_shape(kintree, (2, num_joints), "kintree_table", where, "(2, J)")
    if not np.array_equal(kintree[1], np.arange(num_joints)):
        raise ValueError(f"{where} entry 'kintree_table' row 1 must list joints 0..{num_joints - 1} in order, "
                         f"got {kintree[1].tolist()}")
    # Row 0 holds each joint's parent; the root's is -1 stored as uint32 (4294967295) in SMPL files.
    parents = kintree[0].astype(np.int64)
    parents[0] = -1
    bad = [j for j in range(1, num_joints) if not 0 <= parents[j] < j]
    if bad:
        raise ValueError(f"{where} entry 'kintree_table' gives joint {bad[0]} the parent {parents[bad[0]]}; "
                         "every parent must come before its child")
    shapedirs = _entry(model, "shapedirs", where, 3)
    if shapedirs.shape[:2] != (num_vertices, 3) or shapedirs.shape[2] < 1:
        raise ValueError(f"{where} entry 'shapedirs' has shape {shapedirs.shape}; "
                         f"(V, 3, S) = ({num_vertices}, 3, S >= 1) was expected")
    posedirs = _entry(model, "posedirs", where, 3)
    _expect_shape(posedirs, (num_vertices, 3, 9 * (num_joints - 1)), "posedirs", where, "(V, 3, 9 (J - 1))")
    regressor = _entry(model, "J_regressor", where, 2)
    _expect_shape(regressor, (num_joints, num_vertices), "J_regressor", where, "(J, V)")
    weights = _entry(model, "weights", where, 2)
    _expect_shape(weights, (num_vertices, num_joints), "weights", where, "(V, J)")
    faces = _entry(model, "f", where, 2)
    if faces.shape[1:] != (3,) or not np.issubdtype(faces.dtype, np.integer):
        raise ValueError(f"{where} entry 'f' has shape {faces.shape} and dtype {faces.dtype}; "
                         "integer triangles (F, 3) were expected")
    if faces.size and (faces.min() < 0 or faces.max() >= num_vertices):
        raise ValueError(f"{where} entry 'f' indexes vertices {faces.min()}..{faces.max()} "
                         f"but v_template has {num_vertices}")
    return {"v_template": template, "shapedirs": shapedirs, "posedirs": posedirs, "J_regressor": regressor,
            "weights": weights, "parents": parents, "f": faces.astype(np.int64)}


# ---------------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------------

def _float32(array: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(array), dtype=torch.float32)


class _SkinnedModelSource(BodySource):
    """An SMPL-format model file as a BodySource; subclasses name the model, its skeleton and its ranges."""

    model_name: str
    joint_names: tuple[str, ...]
    expected_parents: tuple[int, ...]
    num_shape_coefficients: int
    shape_range: float
    random_ranges: JointRanges
    straight_ranges: JointRanges

    def __init__(self, model_file: str | os.PathLike, device: torch.device = torch.device("cpu")) -> None:
        path = Path(model_file)
        where = f"{self.model_name} model file {path}"
        arrays = _read_skinned_model(load_model_file(path), where)
        parents = arrays["parents"]
        expected = len(self.expected_parents)
        if len(parents) < expected or tuple(parents[:expected].tolist()) != self.expected_parents:
            raise ValueError(f"{where} has the kinematic tree (parents) {parents.tolist()}; "
                             f"{self.model_name}'s {expected}-joint tree {list(self.expected_parents)} was expected")
        self.parents = parents.tolist()
        self.num_joints = len(parents)
        self.faces = arrays["f"]
        self.num_vertices = arrays["v_template"].shape[0]
        num_shape = min(self.num_shape_coefficients, arrays["shapedirs"].shape[2])
        self.shape_labels = [f"beta{k}" for k in range(num_shape)]
        self.v_template = _float32(arrays["v_template"])
        self.shapedirs = _float32(arrays["shapedirs"][:, :, :num_shape])
        self.posedirs = _float32(arrays["posedirs"])
        self.joint_regressor = _float32(arrays["J_regressor"])
        self.weights = _float32(arrays["weights"])
        self.device = torch.device("cpu")
        self.to(device)

    def to(self, device: torch.device) -> "_SkinnedModelSource":
        self.device = torch.device(device)
        for key in ("v_template", "shapedirs", "posedirs", "joint_regressor", "weights"):
            setattr(self, key, getattr(self, key).to(self.device))
        return self

    def sample_identities(self, count: int, rng: np.random.Generator) -> np.ndarray:
        return rng.uniform(-self.shape_range, self.shape_range, size=(count, len(self.shape_labels)))

    def sample_poses(self, count: int, rng: np.random.Generator) -> np.ndarray:
        return sample_pose_set(count, rng, self.random_ranges, self.straight_ranges, self.num_joints)

    def pose_labels(self) -> list[str]:
        extra = [f"joint{j}" for j in range(len(self.joint_names), self.num_joints)]
        return axis_angle_labels(list(self.joint_names) + extra)

    def vertices(self, shape: torch.Tensor, pose: torch.Tensor) -> torch.Tensor:
        check_parameters(self.name, shape, pose, len(self.shape_labels), 3 * self.num_joints)
        shape = shape.to(self.device, torch.float32)
        pose = pose.to(self.device, torch.float32)
        rotations = axis_angle_to_matrix(pose.unflatten(1, (self.num_joints, 3)))  # (B, J, 3, 3)
        shaped = self.v_template + blend(self.shapedirs, shape)  # (B, V, 3)
        joints = regress_joints(self.joint_regressor, shaped)  # (B, J, 3)
        posed = shaped + blend(self.posedirs, pose_feature(rotations))  # (B, V, 3)
        return pose_rest_mesh(posed, joints, rotations, self.parents, self.weights)


class SMPLSource(_SkinnedModelSource):
    """SMPL humans from a user's SMPL model file (basicModel_*.pkl / SMPL_*.pkl), human layout.

    Args:
        model_file: the SMPL .pkl as its authors distribute it (chumpy objects allowed).
        device: where the model's tensors live.
    """

    name = "smpl"
    layout = "human"
    model_name = "SMPL"
    joint_names = SMPL_JOINT_NAMES
    expected_parents = SMPL_PARENTS
    num_shape_coefficients = 10
    shape_range = 4.0
    random_ranges = SMPL_RANDOM_RANGES
    straight_ranges = SMPL_STRAIGHT_RANGES


class SMALSource(_SkinnedModelSource):
    """SMAL animals from a user's SMAL model file (smal_CVPR2017.pkl), animal layout.

    Args:
        model_file: the SMAL .pkl as its authors distribute it (chumpy objects allowed).
        device: where the model's tensors live.
    """

    name = "smal"
    layout = "animal"
    model_name = "SMAL"
    joint_names = SMAL_JOINT_NAMES
    expected_parents = SMAL_PARENTS
    num_shape_coefficients = 20
    shape_range = 1.5
    random_ranges = _smal_ranges(1.0)
    straight_ranges = _smal_ranges(1.0 / 3.0)
