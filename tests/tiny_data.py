"""Tiny synthetic data sets in the published layouts, for end-to-end tests.

Identity i is an ellipsoid with its own axes; pose p bends the upper half about the x axis and twists it
about z, so the ground truth (i, p) is identity i's shape in pose p, as in the real data sets.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import trimesh

from data import DATASETS
from util.mesh_io import write_mesh


def posed_ellipsoid(identity: int, pose: int, subdivisions: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Vertices (V, 3) and faces (F, 3) of identity `identity` in pose `pose`."""
    sphere = trimesh.creation.icosphere(subdivisions=subdivisions)
    axes = np.array([0.3 + 0.05 * identity, 0.2 + 0.03 * (identity % 3), 0.9 + 0.1 * identity])
    points = sphere.vertices * axes
    bend, twist = 0.3 * np.sin(1.7 * pose), 0.4 * np.cos(2.3 * pose)
    upper = points[:, 2] > 0
    z = points[upper, 2:3]
    c, s = np.cos(bend * z), np.sin(bend * z)
    y = points[upper, 1:2]
    points[upper, 1:3] = np.hstack([c * y - s * z, s * y + c * z])
    ct, st = np.cos(twist * z), np.sin(twist * z)
    x, y = points[upper, 0:1].copy(), points[upper, 1:2].copy()
    points[upper, 0:2] = np.hstack([ct * x - st * y, st * x + ct * y])
    return points.astype(np.float32), np.asarray(sphere.faces, dtype=np.int64)


def write_tiny_dataset(root: Path, dataset_mode: str = "human", identities: int = 3, poses: int = 4,
                       subdivisions: int = 1) -> Path:
    """Write identities x poses meshes, a split.json training on all but the last identity and pose,
    and a test_list of the held-out pairs; return root."""
    layout = DATASETS[dataset_mode]
    root.mkdir(parents=True, exist_ok=True)
    for i in range(identities):
        for p in range(poses):
            write_mesh(root / layout.file_name(i, p), *posed_ellipsoid(i, p, subdivisions))
    split = {"dataset_mode": dataset_mode, "train_identities": list(range(identities - 1)),
             "train_poses": list(range(poses - 1)), "test_identities": [identities - 1],
             "test_poses": [poses - 1], "epoch_size": 4}
    (root / "split.json").write_text(json.dumps(split))
    lines = [f"{layout.file_name(identities - 1, poses - 1)} {layout.file_name(j, p)} "
             f"{layout.file_name(identities - 1, p)}" for j in range(identities) for p in range(poses)]
    (root / "test_list").write_text("\n".join(lines) + "\n")
    return root
