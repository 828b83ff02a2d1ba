"""Batched linear blend skinning (LBS) in PyTorch, and the joint-angle sampler the skinned sources draw poses with.

A skinned body is a rest mesh (B, V, 3), rest joints (B, J, 3) on a kinematic tree (parents) and per-vertex
weights (V, J). A pose gives each joint a rotation relative to its parent (axis-angle, Rodrigues'
formula); forward kinematics chains them into one rigid transform per joint, and every vertex moves by
the weight-blended transforms (Lewis et al., "Pose space deformation", SIGGRAPH 2000). SMPL-family models
(Loper et al., "SMPL", SIGGRAPH Asia 2015, eqs. 1-4; SMAL, Zuffi et al., CVPR 2017) build the rest mesh
as template + shape blend (shapedirs . betas), regress the joints from it (J_regressor) and add a pose
blend (posedirs . (R - I) of every non-root joint) before skinning; `blend`, `regress_joints` and
`pose_feature` are those pieces, `pose_rest_mesh` the skinning itself.

Everything is vectorised over the batch; dtype and device come from the inputs. The kinematic tree must
list every parent before its children (parents[0] == -1, parents[j] < j); the sources check that once
when they load a model.

The helpers at the end are shared by the skinned sources: the sampler draws each joint's three
axis-angle components uniformly from per-joint ranges in degrees, the way the NPT data set drew SMPL
poses (half of a set "random", wide; half "straight"), and `check_parameters` validates a batch.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def axis_angle_to_matrix(axis_angle: torch.Tensor) -> torch.Tensor:
    """Rotation matrices from axis-angle vectors (Rodrigues' formula), exact at and near zero angle.

    Args:
        axis_angle: float (..., 3), rotation axis times angle in radians.
    Returns:
        (..., 3, 3) rotation matrices, same dtype and device.
    """
    x, y, z = axis_angle.unbind(-1)
    zero = torch.zeros_like(x)
    skew = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], dim=-1).unflatten(-1, (3, 3))  # (..., 3, 3)
    angle_sq = (axis_angle * axis_angle).sum(-1)[..., None, None]  # (..., 1, 1)
    # R = I + a K + b K^2 with a = sin(t)/t, b = (1 - cos t)/t^2; below t ~ 1e-3 their Taylor series is
    # exact to float64 precision and avoids 0/0.
    small = angle_sq < 1e-6
    safe_sq = torch.where(small, torch.ones_like(angle_sq), angle_sq)
    angle = safe_sq.sqrt()
    a = torch.where(small, 1.0 - angle_sq / 6.0, torch.sin(angle) / angle)
    b = torch.where(small, 0.5 - angle_sq / 24.0, (1.0 - torch.cos(angle)) / safe_sq)
    eye = torch.eye(3, dtype=axis_angle.dtype, device=axis_angle.device)
    return eye + a * skew + b * (skew @ skew)


def blend(directions: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """Linear blend-shape offsets: sum_k coefficients[b, k] * directions[:, :, k].

    Args:
        directions: float (V, 3, K), e.g. SMPL's shapedirs or posedirs.
        coefficients: float (B, K), e.g. betas or `pose_feature`.
    Returns:
        (B, V, 3) offsets to add to a template.
    """
    return torch.einsum("vck,bk->bvc", directions, coefficients)  # (B, V, 3)


def regress_joints(regressor: torch.Tensor, vertices: torch.Tensor) -> torch.Tensor:
    """Joint positions as fixed linear combinations of vertices (SMPL's J_regressor).

    Args:
        regressor: float (J, V), dense.
        vertices: float (B, V, 3).
    Returns:
        (B, J, 3).
    """
    return torch.einsum("jv,bvc->bjc", regressor, vertices)  # (B, J, 3)


def pose_feature(rotations: torch.Tensor) -> torch.Tensor:
    """SMPL's pose-blend coefficients: (R_j - I) of every joint but the root, flattened row-major.

    Args:
        rotations: float (B, J, 3, 3) local joint rotations.
    Returns:
        (B, 9 (J - 1)), zero in the rest pose.
    """
    eye = torch.eye(3, dtype=rotations.dtype, device=rotations.device)
    return (rotations[:, 1:] - eye).flatten(1)  # (B, 9 (J - 1))


def forward_kinematics(rotations: torch.Tensor, joints: torch.Tensor,
                       parents: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Chain local joint rotations along the kinematic tree.

    Args:
        rotations: float (B, J, 3, 3), each joint's rotation relative to its parent (about the joint).
        joints: float (B, J, 3), rest-pose joint positions.
        parents: J ints, parents[0] == -1 and parents[j] < j.
    Returns:
        transforms: (B, J, 4, 4), the rigid motion of joint j's bone, mapping rest-pose points to posed
            points (the skinning matrices).
        posed_joints: (B, J, 3).
    """
    batch, num_joints = joints.shape[:2]
    parent_index = torch.as_tensor(list(parents[1:]), dtype=torch.long, device=joints.device)
    offsets = torch.cat([joints[:, :1], joints[:, 1:] - joints[:, parent_index]], dim=1)  # (B, J, 3)
    bottom = joints.new_tensor([0.0, 0.0, 0.0, 1.0]).expand(batch, num_joints, 1, 4)
    local = torch.cat([torch.cat([rotations, offsets[..., None]], dim=-1), bottom], dim=-2)  # (B, J, 4, 4)
    chain = [local[:, 0]]
    for joint in range(1, num_joints):
        chain.append(chain[parents[joint]] @ local[:, joint])  # (B, 4, 4)
    world = torch.stack(chain, dim=1)  # (B, J, 4, 4)
    posed_joints = world[..., :3, 3]
    # Moving a rest point p with joint j: R_j (p - joint_j) + posed_joint_j.
    translation = posed_joints - (world[..., :3, :3] @ joints[..., None])[..., 0]  # (B, J, 3)
    transforms = torch.cat([torch.cat([world[..., :3, :3], translation[..., None]], dim=-1), bottom], dim=-2)
    return transforms, posed_joints


def skin(vertices: torch.Tensor, weights: torch.Tensor, transforms: torch.Tensor) -> torch.Tensor:
    """Linear blend skinning: v' = (sum_j w_vj T_j) [v; 1].

    Args:
        vertices: float (B, V, 3) rest-pose vertices (after any pose blend).
        weights: float (V, J), rows summing to 1.
        transforms: float (B, J, 4, 4) from `forward_kinematics`.
    Returns:
        (B, V, 3) posed vertices.
    """
    blended = torch.einsum("vj,bjmn->bvmn", weights, transforms[..., :3, :])  # (B, V, 3, 4)
    return (blended[..., :3] @ vertices[..., None])[..., 0] + blended[..., 3]  # (B, V, 3)


def pose_rest_mesh(vertices: torch.Tensor, joints: torch.Tensor, rotations: torch.Tensor,
                   parents: Sequence[int], weights: torch.Tensor) -> torch.Tensor:
    """Pose a rest mesh: forward kinematics, then linear blend skinning.

    Args:
        vertices: float (B, V, 3) rest-pose vertices.
        joints: float (B, J, 3) rest-pose joints.
        rotations: float (B, J, 3, 3) local joint rotations.
        parents: J ints, parents[0] == -1 and parents[j] < j.
        weights: float (V, J) skinning weights.
    Returns:
        (B, V, 3) posed vertices.
    """
    transforms, _ = forward_kinematics(rotations, joints, parents)
    return skin(vertices, weights, transforms)


# ---------------------------------------------------------------------------------------------------
# Pose sampling and input checks shared by the skinned sources
# ---------------------------------------------------------------------------------------------------

JointRanges = dict[int, tuple[tuple[float, float], tuple[float, float], tuple[float, float]]]


def sample_joint_angles(count: int, rng: np.random.Generator, ranges: JointRanges,
                        num_joints: int) -> np.ndarray:
    """Axis-angle poses whose components are drawn independently and uniformly.

    Args:
        count: number of poses.
        rng: the only source of randomness.
        ranges: joint index -> ((low, high) about x, about y, about z) in degrees; joints not listed
            stay at rest.
        num_joints: J.
    Returns:
        float64 (count, 3 J), joint-major (joint j's x, y, z components at 3j, 3j + 1, 3j + 2), radians.
    """
    low = np.zeros((num_joints, 3))
    high = np.zeros((num_joints, 3))
    for joint, axes in ranges.items():
        low[joint], high[joint] = np.radians(np.asarray(axes, dtype=np.float64).T)
    return rng.uniform(low, high, size=(count, num_joints, 3)).reshape(count, 3 * num_joints)


def sample_pose_set(count: int, rng: np.random.Generator, random_ranges: JointRanges,
                    straight_ranges: JointRanges, num_joints: int) -> np.ndarray:
    """A pose set drawn like NPT's: the first count // 2 from the wide ranges, the rest from the straight ones.

    Args:
        count: number of poses.
        rng: the only source of randomness.
        random_ranges, straight_ranges: see `sample_joint_angles`.
        num_joints: J.
    Returns:
        float64 (count, 3 J) axis-angle components in radians.
    """
    wide = count // 2
    return np.concatenate([sample_joint_angles(wide, rng, random_ranges, num_joints),
                           sample_joint_angles(count - wide, rng, straight_ranges, num_joints)])


def axis_angle_labels(joint_names: Sequence[str]) -> list[str]:
    """Column names of an axis-angle pose vector: "<joint>.rx", "<joint>.ry", "<joint>.rz" per joint."""
    return [f"{name}.r{axis}" for name in joint_names for axis in "xyz"]


def check_parameters(source: str, shape: torch.Tensor, pose: torch.Tensor, num_shape: int, num_pose: int) -> None:
    """Raise ValueError unless shape is (B, num_shape) and pose is (B, num_pose) for the same B."""
    if shape.ndim != 2 or shape.shape[1] != num_shape:
        raise ValueError(f"{source} shape parameters must have shape (B, {num_shape}), got {tuple(shape.shape)}")
    if pose.ndim != 2 or pose.shape[1] != num_pose:
        raise ValueError(f"{source} pose parameters must have shape (B, {num_pose}), got {tuple(pose.shape)}")
    if shape.shape[0] != pose.shape[0]:
        raise ValueError(f"{source} got {shape.shape[0]} shapes but {pose.shape[0]} poses; they must match")
