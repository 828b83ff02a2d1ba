"""Anny humans for the generator: adult phenotypes and NPT-like poses on the 13,718-vertex Anny mesh.

Anny (the `anny` package: Apache-2.0 code, CC0 MakeHuman assets) is a rigged body whose shape is six
phenotype values in [0, 1]. The facts used here were measured with anny 0.6.2 (shared/reference/ANNY.md):
Z up, front -Y, the character's left +X, metres; the rest pose is an A-pose with the pelvis at the origin;
pose parameters are per-bone rotations in "local-ref" (world-aligned axes of the rest pose, about each
bone's head), and `lowerleg01.L` rotated +90 degrees about X bends the knee backwards, i.e. flexes it.

Identities: gender over [0, 1], adult age 0.77-0.93 (WHO-calibrated 18-90 years), muscle, weight and
proportions over [0.1, 0.9], spread by Latin hypercube sampling. The `height` parameter moves stature by
about 1.1 m over its range, so it is solved per identity from a target stature (1.755 m male, 1.625 m
female, +-0.15 m) through the model's own, linear, stature response.

Poses follow how NPT drew SMPL poses (shared/reference/NPT.md): the first half "random" (upper legs
forward up to 90 degrees, knees up to 100, arms +-30 degrees about two axes, elbows up to 60, small spine
and neck rotations), the second half "straight" (legs near standing, upper body as in random). Fingers,
toes and the face stay at rest; the root stays fixed. A pose parameter is one component of a bone's
rotation vector in radians, labelled "<bone>.rx|ry|rz".
"""
from __future__ import annotations

from importlib.metadata import version

import numpy as np
import torch

from data.sources.base import BodySource

# Degrees per rotation-vector component (x, y, z) of each left or central bone, (low, high) each.
# Left and right mirror through the x = 0 plane, which keeps rx and negates ry and rz.
# Left hip: rx < 0 swings the leg forward, ry < 0 takes it outwards (abduction).
_RANDOM_POSE_DEGREES = {
    "upperleg01.L": ((-90, 20), (-30, 10), (-15, 15)),
    "lowerleg01.L": ((0, 100), (0, 0), (0, 0)),
    "foot.L": ((-20, 20), (-10, 10), (0, 0)),
    "spine04": ((-10, 10), (-10, 10), (-10, 10)),
    "spine02": ((-10, 10), (-10, 10), (-10, 10)),
    "neck01": ((-10, 10), (-10, 10), (-10, 10)),
    "head": ((-10, 10), (-10, 10), (-10, 10)),
    "upperarm01.L": ((-30, 30), (-30, 30), (0, 0)),
    "lowerarm01.L": ((0, 60), (0, 0), (0, 0)),  # the x entry is flexion about the elbow hinge, see below
    "wrist.L": ((-20, 20), (0, 0), (-20, 20)),
}
_STRAIGHT_POSE_DEGREES = {
    **_RANDOM_POSE_DEGREES,
    "upperleg01.L": ((-15, 10), (-8, 4), (-5, 5)),
    "lowerleg01.L": ((0, 15), (0, 0), (0, 0)),
    "foot.L": ((-10, 10), (-5, 5), (0, 0)),
}
_ELBOWS = ("lowerarm01.L", "lowerarm01.R")

# Phenotype ranges of adults; age from the WHO calibration of ANNY.md (18 y -> 0.77, 90 y -> 0.926).
_PHENOTYPE_RANGES = {
    "gender": (0.0, 1.0),
    "age": (0.77, 0.93),
    "muscle": (0.1, 0.9),
    "weight": (0.1, 0.9),
    "proportions": (0.1, 0.9),
}
_MALE_STATURE_M, _FEMALE_STATURE_M, _STATURE_SPREAD_M = 1.755, 1.625, 0.30
_REFERENCE_PHENOTYPE = {"gender": 0.5, "age": 0.85, "muscle": 0.5, "weight": 0.5, "height": 0.5, "proportions": 0.5}


def _mirror(degrees: dict) -> dict:
    """Add the right-side twin of every ".L" bone: rx kept, ry and rz negated."""
    mirrored = dict(degrees)
    for bone, (x, (y_low, y_high), (z_low, z_high)) in degrees.items():
        if bone.endswith(".L"):
            mirrored[bone[:-2] + ".R"] = (x, (-y_high, -y_low), (-z_high, -z_low))
    return mirrored


class AnnySource(BodySource):
    """Anny adults (`anny.Anny(skinning_method="lbs")` in float32, the fastest setting on CPU)."""

    name = "anny"
    layout = "human"
    shape_labels = ["gender", "age", "muscle", "weight", "height", "proportions"]

    def __init__(self, device: torch.device | str = "cpu"):
        """Build the model; the first build in a fresh ANNY_CACHE_DIR parses the assets (minutes)."""
        import anny  # imported here so that the other sources work where anny is not installed
        import roma

        self._rotvec_to_rotmat = roma.rotvec_to_rotmat
        self.model = anny.Anny(skinning_method="lbs").to(dtype=torch.float32)
        if list(self.model.phenotype_labels) != self.shape_labels:
            raise RuntimeError(
                f"anny {version('anny')} has phenotypes {list(self.model.phenotype_labels)}; "
                f"this source expects {self.shape_labels}")
        self.device = torch.device("cpu")
        self.faces = self.model.faces.cpu().numpy().astype(np.int64)
        self.num_vertices = int(self.model.template_vertices.shape[0])
        random, straight = _mirror(_RANDOM_POSE_DEGREES), _mirror(_STRAIGHT_POSE_DEGREES)
        self._posed_bones = list(random)
        bone_labels = list(self.model.bone_labels)
        self._bone_index = torch.tensor([bone_labels.index(bone) for bone in self._posed_bones])
        self._random_radians = np.deg2rad(np.array([random[bone] for bone in self._posed_bones], dtype=np.float64))
        self._straight_radians = np.deg2rad(np.array([straight[bone] for bone in self._posed_bones], dtype=np.float64))
        self._elbow_axes = self._elbow_hinge_axes(bone_labels)
        self.to(device)

    def _elbow_hinge_axes(self, bone_labels: list[str]) -> np.ndarray:
        """Unit axes (2, 3) about which a positive rotation bends each elbow further, from the reference rest pose.

        The rest pose already bends the elbow; turning the forearm about the normal of the plane of
        upper arm and forearm, (upper arm x forearm), opens the angle between them further.
        """
        joints = self._rest_output(self.reference_shape()[None])["bone_poses"][0, :, :3, 3].double().numpy()
        axes = []
        for side in ("L", "R"):
            shoulder, elbow, wrist = (joints[bone_labels.index(f"{bone}.{side}")]
                                      for bone in ("upperarm01", "lowerarm01", "wrist"))
            normal = np.cross(elbow - shoulder, wrist - elbow)
            axes.append(normal / np.linalg.norm(normal))
        return np.stack(axes)

    def _rest_output(self, phenotypes: np.ndarray) -> dict[str, torch.Tensor]:
        """The model's output for phenotypes (B, 6) in the rest pose."""
        with torch.no_grad():
            return self.model(pose_parameters=None, phenotype_kwargs=torch.as_tensor(
                phenotypes, dtype=torch.float32, device=self.device))

    def _statures(self, phenotypes: np.ndarray) -> np.ndarray:
        """Standing height in metres (B,) of phenotypes (B, 6): the z extent of the rest-pose mesh."""
        z = self._rest_output(phenotypes)["vertices"][..., 2]  # (B, V)
        return (z.amax(dim=1) - z.amin(dim=1)).double().cpu().numpy()

    def reference_shape(self) -> np.ndarray:
        """An average adult: every phenotype 0.5 except age 0.85 (about 60 years; 0.5 would be a child)."""
        return np.array([_REFERENCE_PHENOTYPE[label] for label in self.shape_labels], dtype=np.float64)

    def sample_identities(self, count: int, rng: np.random.Generator) -> np.ndarray:
        """Adults spread by Latin hypercube sampling; `height` is solved from a target stature.

        Args:
            count: number of identities.
            rng: the only source of randomness.
        Returns:
            float64 (count, 6), columns in `shape_labels` order.
        """
        # Latin hypercube: each of the six quantities (five phenotypes and the stature) takes one value
        # from each of `count` equal strata, the strata paired at random across quantities.
        strata = np.stack([rng.permutation(count) for _ in range(6)], axis=1)  # (count, 6)
        quantiles = (strata + rng.random((count, 6))) / count  # (count, 6)
        phenotypes = np.empty((count, 6))
        for column, label in enumerate(self.shape_labels):
            if label != "height":
                low, high = _PHENOTYPE_RANGES[label]
                phenotypes[:, column] = low + (high - low) * quantiles[:, column]
        gender = phenotypes[:, self.shape_labels.index("gender")]
        target = (_MALE_STATURE_M + (_FEMALE_STATURE_M - _MALE_STATURE_M) * gender
                  + _STATURE_SPREAD_M * (quantiles[:, self.shape_labels.index("height")] - 0.5))
        # Stature is linear in `height` (ANNY.md: 1.355 / 1.902 / 2.449 m at 0 / 0.5 / 1), so the two
        # ends give the solution.
        height = self.shape_labels.index("height")
        ends = []
        for value in (0.0, 1.0):
            phenotypes[:, height] = value
            ends.append(self._statures(phenotypes))
        phenotypes[:, height] = np.clip((target - ends[0]) / (ends[1] - ends[0]), 0.0, 1.0)
        return phenotypes

    def sample_poses(self, count: int, rng: np.random.Generator) -> np.ndarray:
        """The first count // 2 poses "random", the rest "straight"; every component uniform in its range.

        Args:
            count: number of poses.
            rng: the only source of randomness.
        Returns:
            float64 (count, 3 K) rotation-vector components of the K posed bones, in radians.
        """
        num_random = count // 2
        ranges = np.concatenate([
            np.broadcast_to(self._random_radians, (num_random, *self._random_radians.shape)),
            np.broadcast_to(self._straight_radians, (count - num_random, *self._straight_radians.shape)),
        ])  # (count, K, 3, 2)
        rotvecs = rng.uniform(ranges[..., 0], ranges[..., 1])  # (count, K, 3)
        for elbow, axis in zip(_ELBOWS, self._elbow_axes):
            slot = self._posed_bones.index(elbow)
            rotvecs[:, slot] = rotvecs[:, slot, :1] * axis  # (count, 3): flexion angle times hinge axis
        return rotvecs.reshape(count, -1)

    def pose_labels(self) -> list[str]:
        return [f"{bone}.{axis}" for bone in self._posed_bones for axis in ("rx", "ry", "rz")]

    def vertices(self, shape: torch.Tensor, pose: torch.Tensor) -> torch.Tensor:
        """Pose Anny bodies (no gradient).

        Args:
            shape: float (B, 6) phenotypes in `shape_labels` order.
            pose: float (B, 3 K) rotation-vector components, as from `sample_poses`.
        Returns:
            float32 (B, 13718, 3) on the source's device.
        """
        batch = shape.shape[0]
        rotvecs = pose.to(device=self.device, dtype=torch.float32).reshape(batch, -1, 3)  # (B, K, 3)
        transforms = torch.eye(4, device=self.device).repeat(batch, self.model.bone_count, 1, 1)  # (B, J, 4, 4)
        transforms[:, self._bone_index, :3, :3] = self._rotvec_to_rotmat(rotvecs)  # (B, K, 3, 3)
        # The rest body (blend shapes and a Procrustes fit per bone) is about half of Anny's forward
        # pass; a batch holds few identities, so it is computed once per distinct identity, then the
        # same two steps as anny's forward pose it.
        identities, which = torch.unique(shape.to(device=self.device, dtype=torch.float32), dim=0, return_inverse=True)
        with torch.no_grad():
            rest = self.model(pose_parameters=None, phenotype_kwargs=identities)
            bone_transforms, _ = self.model.get_bone_transforms(transforms, rest["rest_bone_poses"][which])
            return self.model.get_skinned_vertices(
                bone_transforms=bone_transforms, rest_vertices=rest["rest_vertices"][which])

    def to(self, device: torch.device | str) -> "AnnySource":
        self.device = torch.device(device)
        self.model.to(self.device)
        self._bone_index = self._bone_index.to(self.device)
        return self
