"""The interface every body model behind `python -m data.generate` implements.

A source turns identity (shape) parameters and pose parameters into posed vertices on one fixed native
topology. The generator draws `sample_identities` and `sample_poses` once per data set, then writes
mesh (i, p) = vertices(identity i, pose p), so that every mesh of identity i is the same body and every
mesh of pose p is the same articulation (the NPT data set is made this way; NPT.md, "Data").

Sources: data/sources/anny_source.py (Anny humans), data/sources/smpl.py (SMPL, SMAL from model files),
data/sources/quadruped.py (procedural quadrupeds). The registry is `data.sources.SOURCES`.
"""
from __future__ import annotations

import abc

import numpy as np
import torch


class BodySource(abc.ABC):
    """A parametric body: shape and pose parameters in, posed vertices out, on one native topology.

    Attributes:
        name: the registry key, e.g. "anny".
        layout: "human" (files id{i}_{p}.obj) or "animal" (files toy_{i}_{p}.ply).
        faces: int64 (F, 3), the native triangles.
        num_vertices: V, the native vertex count.
        shape_labels: names of the S identity parameters, in column order.
    """

    name: str
    layout: str
    faces: np.ndarray
    num_vertices: int
    shape_labels: list[str]

    @abc.abstractmethod
    def sample_identities(self, count: int, rng: np.random.Generator) -> np.ndarray:
        """Draw identity (shape) parameters.

        Args:
            count: number of identities.
            rng: the only source of randomness.
        Returns:
            float64 (count, S).
        """

    @abc.abstractmethod
    def sample_poses(self, count: int, rng: np.random.Generator) -> np.ndarray:
        """Draw pose parameters: the first count // 2 "random" (wide), the rest "straight" (near standing).

        Args:
            count: number of poses.
            rng: the only source of randomness.
        Returns:
            float64 (count, P).
        """

    @abc.abstractmethod
    def pose_labels(self) -> list[str]:
        """Names of the P pose parameters in column order, e.g. "upperleg01.L.rx"."""

    @abc.abstractmethod
    def vertices(self, shape: torch.Tensor, pose: torch.Tensor) -> torch.Tensor:
        """Pose bodies.

        Args:
            shape: float (B, S) identity parameters.
            pose: float (B, P) pose parameters.
        Returns:
            float32 (B, V, 3) on the source's device.
        """

    @abc.abstractmethod
    def to(self, device: torch.device) -> "BodySource":
        """Move the model to a device and return self."""

    def reference_shape(self) -> np.ndarray:
        """The identity whose rest pose (all pose parameters 0) is the template a resampled topology is built on.

        Zero shape parameters are the mean body of SMPL- and SMAL-style models; sources whose zero is
        not a typical body override this.

        Returns:
            float64 (S,).
        """
        return np.zeros(len(self.shape_labels))
