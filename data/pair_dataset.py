"""Pose-transfer samples: (identity mesh, pose mesh, ground truth) triples read from a mesh folder.

Training draws triples at random the way the published code does (SPEC.md, "Data layouts"): identity
mesh (i, p1), pose mesh (j, p2) and ground truth (i, p2), with i, j drawn from the training identities
and p1, p2 from the training poses. Testing reads the published lists, one "identity pose ground-truth"
line per sample. Both apply the same preprocessing (SPEC.md, "Preprocessing"): each mesh centred by its
own bounding box, then the identity and ground truth reordered by one random permutation and the pose
mesh by another, faces re-indexed to match.

A layout only says how files are named and which ranges the published checkpoints were trained on; the
samples of every layout look the same, so nothing downstream needs to know which one it reads.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from util.mesh_io import read_mesh, read_mesh_triples
from util.mesh_ops import center_bbox, permute_mesh_unchecked, random_permutation


@dataclass(frozen=True)
class MeshLayout:
    """File naming and published training split of one data set."""

    name: str
    file_pattern: str  # str.format pattern with the fields {identity} and {pose}
    train_identities: tuple[int, ...]
    train_poses: tuple[int, ...]
    epoch_size: int  # samples per training epoch in the published code

    def file_name(self, identity: int, pose: int) -> str:
        """The file name of one identity in one pose, e.g. id3_250.obj."""
        return self.file_pattern.format(identity=identity, pose=pose)


HUMAN_LAYOUT = MeshLayout(
    name="human",
    file_pattern="id{identity}_{pose}.obj",
    train_identities=tuple(range(15)),
    train_poses=tuple(range(200, 600)),
    epoch_size=4000,
)
ANIMAL_LAYOUT = MeshLayout(
    name="animal",
    file_pattern="toy_{identity}_{pose}.ply",
    train_identities=(*range(16), 21, 23, 24, 26, 27, 28, 29, 30, 31, 34, 35, 38, 39),
    train_poses=tuple(range(400)),
    epoch_size=11600,
)


def _check_dataroot(dataroot: str | os.PathLike) -> Path:
    """The dataroot as a Path, after checking that the folder exists."""
    root = Path(dataroot)
    if not root.is_dir():
        raise FileNotFoundError(
            f"dataroot {root} does not exist; pass --dataroot with the folder that holds the meshes")
    return root


def seeded_generator(*keys: int) -> torch.Generator:
    """A generator seeded from the keys alone, so a sample does not depend on which worker draws it."""
    # SeedSequence mixes the keys, so nearby keys such as (seed, epoch, 7) and (seed, epoch, 8) give
    # unrelated streams; a sum or product of the keys would collide.
    state = np.random.SeedSequence(keys).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def read_centred(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Vertices float32 (V, 3) centred by their bounding box, and faces int64 (F, 3), in file order."""
    vertices, faces = read_mesh(path)
    return center_bbox(torch.from_numpy(vertices)), torch.from_numpy(faces)


def _load_triple(
    root: Path, identity_name: str, pose_name: str, gt_name: str, generator: torch.Generator, shuffle_points: bool
) -> dict:
    """Read, centre and permute one sample.

    Args:
        root: the folder holding the three files.
        identity_name, pose_name, gt_name: file names inside root.
        generator: draws the identity/ground-truth permutation, then the pose permutation.
        shuffle_points: False keeps every mesh in file order.
    Returns:
        dict with identity_points float32 (N, 3), pose_points float32 (M, 3), gt_points float32 (N, 3),
        identity_faces int64 (F, 3), pose_faces int64 (Fp, 3), and the three file names as
        identity_name, pose_name, gt_name.
    """
    identity_points, identity_faces = read_centred(root / identity_name)
    pose_points, pose_faces = read_centred(root / pose_name)
    gt_points, _ = read_centred(root / gt_name)
    if gt_points.shape[0] != identity_points.shape[0]:
        raise ValueError(
            f"identity mesh {root / identity_name} has {identity_points.shape[0]} vertices, ground-truth mesh "
            f"{root / gt_name} has {gt_points.shape[0]}; they must match")
    if shuffle_points:
        # The ground truth is compared vertex by vertex with the output, which is in the identity's
        # order, so the two share one permutation.
        identity_order = random_permutation(identity_points.shape[0], generator)
        identity_points, identity_faces = permute_mesh_unchecked(identity_points, identity_faces, identity_order)
        gt_points = gt_points[identity_order]
        pose_order = random_permutation(pose_points.shape[0], generator)
        pose_points, pose_faces = permute_mesh_unchecked(pose_points, pose_faces, pose_order)
    return {
        "identity_points": identity_points,
        "pose_points": pose_points,
        "gt_points": gt_points,
        "identity_faces": identity_faces,
        "pose_faces": pose_faces,
        "identity_name": identity_name,
        "pose_name": pose_name,
        "gt_name": gt_name,
    }


class TrainPairDataset(Dataset):
    """Random training triples over given identities and poses; reproducible per (seed, epoch, index)."""

    def __init__(
        self,
        dataroot: str | os.PathLike,
        layout: MeshLayout,
        identities: list[int],
        poses: list[int],
        epoch_size: int,
        seed: int,
        shuffle_points: bool = True,
    ):
        """
        Args:
            dataroot: the folder holding every file that layout names for identities x poses.
            layout: file naming, e.g. data.DATASETS["human"].
            identities, poses: the indices to draw from (uniformly, with repeats allowed).
            epoch_size: samples per epoch.
            seed: non-negative; with the epoch and the index it fixes every draw.
            shuffle_points: False keeps file vertex order (for inspection and parity tests).
        """
        self.root = _check_dataroot(dataroot)
        if not identities or not poses:
            raise ValueError(
                f"training needs at least one identity and one pose, got {len(identities)} identities and "
                f"{len(poses)} poses")
        if epoch_size < 1:
            raise ValueError(f"epoch_size must be at least 1, got {epoch_size}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        names = [layout.file_name(identity, pose) for identity in identities for pose in poses]
        missing = [name for name in names if not (self.root / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"mesh file {self.root / missing[0]} does not exist; {len(missing)} of the {len(names)} "
                f"{layout.name} meshes named by the training identities and poses are missing")
        self.layout = layout
        self.identities = list(identities)
        self.poses = list(poses)
        self.epoch_size = epoch_size
        self.seed = seed
        self.shuffle_points = shuffle_points
        self.num_vertices = read_mesh(self.root / names[0])[0].shape[0]
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the draws of this epoch; call before iterating (workers copy the dataset each epoch)."""
        if epoch < 0:
            raise ValueError(f"epoch must be non-negative, got {epoch}")
        self.epoch = epoch

    def __len__(self) -> int:
        return self.epoch_size

    def __getitem__(self, index: int) -> dict:
        """One sample; see _load_triple for the keys, shapes and dtypes."""
        if not 0 <= index < self.epoch_size:
            raise IndexError(f"index {index} is outside the epoch of {self.epoch_size} samples")
        generator = seeded_generator(self.seed, self.epoch, index)
        i, j = (self.identities[k] for k in torch.randint(len(self.identities), (2,), generator=generator).tolist())
        p1, p2 = (self.poses[k] for k in torch.randint(len(self.poses), (2,), generator=generator).tolist())
        return _load_triple(
            self.root,
            identity_name=self.layout.file_name(i, p1),
            pose_name=self.layout.file_name(j, p2),
            gt_name=self.layout.file_name(i, p2),
            generator=generator,
            shuffle_points=self.shuffle_points,
        )


class TestPairDataset(Dataset):
    """The triples of a test list, one per non-empty "identity pose ground-truth" line."""

    def __init__(
        self,
        dataroot: str | os.PathLike,
        test_list_path: str | os.PathLike,
        seed: int,
        shuffle_points: bool = True,
    ):
        """
        Args:
            dataroot: the folder holding every file the list names.
            test_list_path: e.g. human_test_list.
            seed: non-negative; with the item's index it fixes the item's permutations.
            shuffle_points: False keeps file vertex order.
        """
        self.root = _check_dataroot(dataroot)
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        list_path = Path(test_list_path)
        self.triples: list[tuple[str, str, str]] = []
        for line_number, names in read_mesh_triples(list_path, "test list", "identity pose ground-truth"):
            for name in names:
                if not (self.root / name).is_file():
                    raise FileNotFoundError(
                        f"mesh file {self.root / name} named on line {line_number} of test list {list_path} "
                        f"does not exist")
            self.triples.append(names)
        self.seed = seed
        self.shuffle_points = shuffle_points

    def __len__(self) -> int:
        return len(self.triples)

    def __getitem__(self, index: int) -> dict:
        """One sample; see _load_triple for the keys, shapes and dtypes."""
        if not 0 <= index < len(self.triples):
            raise IndexError(f"index {index} is outside the {len(self.triples)} samples of the test list")
        identity_name, pose_name, gt_name = self.triples[index]
        return _load_triple(
            self.root, identity_name, pose_name, gt_name, seeded_generator(self.seed, index), self.shuffle_points
        )
