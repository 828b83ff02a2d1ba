"""Packed data sets: every mesh of a set in one array, pairs drawn on the GPU (issue 4, the data path).

`python -m data.packed --dataroot DIR --dataset_mode human` reads every `id{i}_{p}.obj` (or `toy_{i}_{p}.ply`)
once and writes DIR/packed/: vertices.npy (I, P, V, 3) float32 as read, faces.npy (F, 3) int64 (one topology
for the whole set, as the published and generated sets have), and index.json (identity and pose numbers of
the rows and columns). train.py then keeps the whole set on the device and draws each batch there with
PackedPairSampler: the same sampling, centring, permutation and face re-indexing as TrainPairDataset,
vectorised over the batch, with no file parsing and no host work per step.
"""
from __future__ import annotations

import argparse
import json
import os
import re
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from data import DATASETS, MeshLayout
from data.pair_dataset import seeded_generator
from util.atomic import atomic_write, atomic_write_text
from util.cli import run_main
from util.mesh_io import read_mesh
from util.mesh_ops import center_bbox, permute_mesh_unchecked

PACKED_DIR_NAME = "packed"


def _scan(root: Path, layout: MeshLayout) -> tuple[list[int], list[int]]:
    """Identity and pose numbers present in root, from the file names."""
    pattern = re.compile("^" + re.escape(layout.file_pattern).replace(r"\{identity\}", r"(\d+)")
                         .replace(r"\{pose\}", r"(\d+)") + "$")
    found = [tuple(map(int, match.groups())) for match in map(pattern.match, os.listdir(root)) if match]
    return sorted({i for i, _ in found}), sorted({p for _, p in found})


def pack_dataset(dataroot: str | os.PathLike, layout: MeshLayout, workers: int = 2) -> Path:
    """Read every mesh of a folder into DIR/packed; return that folder.

    Raises:
        FileNotFoundError: dataroot is missing, holds no mesh of the layout, or misses one of the grid.
        ValueError: a mesh is unreadable, or the meshes do not share one vertex count and face list.
    """
    root = Path(dataroot)
    if not root.is_dir():
        raise FileNotFoundError(f"dataroot {root} does not exist; pass --dataroot with the folder that holds "
                                f"the meshes")
    identities, poses = _scan(root, layout)
    if not identities:
        raise FileNotFoundError(f"{root} holds no {layout.name} meshes named like {layout.file_pattern}")
    paths = [root / layout.file_name(i, p) for i in identities for p in poses]
    missing = [path for path in paths if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"mesh file {missing[0]} does not exist; a packed set needs every identity in "
                                f"every pose ({len(missing)} of {len(paths)} missing)")
    first_vertices, faces = read_mesh(paths[0])
    vertices = np.empty((len(identities), len(poses), *first_vertices.shape), dtype=np.float32)
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for k, (mesh_vertices, mesh_faces) in enumerate(tqdm(pool.map(read_mesh, paths, chunksize=64),
                                                               total=len(paths), desc="packing")):
            if mesh_vertices.shape != first_vertices.shape or not np.array_equal(mesh_faces, faces):
                raise ValueError(f"mesh file {paths[k]} does not share the topology of {paths[0]} "
                                 f"({len(mesh_vertices)} vs {len(first_vertices)} vertices or other faces)")
            vertices[divmod(k, len(poses))] = mesh_vertices
    out = root / PACKED_DIR_NAME
    with atomic_write(out / "vertices.npy") as handle:
        np.save(handle, vertices)
    with atomic_write(out / "faces.npy") as handle:
        np.save(handle, faces)
    index = {"dataset_mode": layout.name, "identities": identities, "poses": poses,
             "num_vertices": int(first_vertices.shape[0]), "num_faces": int(faces.shape[0])}
    atomic_write_text(json.dumps(index) + "\n", out / "index.json")  # last: its presence marks a complete pack
    return out


def has_packed(dataroot: str | os.PathLike) -> bool:
    return (Path(dataroot) / PACKED_DIR_NAME / "index.json").is_file()


class PackedPairSampler:
    """Training batches drawn on the device from a packed set, reproducible per (seed, epoch, iteration, rank).

    Each pair follows the published sampling: identities i, j and poses p1, p2 uniform over the training
    ranges; identity mesh (i, p1), pose mesh (j, p2), ground truth (i, p2); each mesh centred by its own
    bounding box; identity and ground truth share one random permutation, the pose mesh gets its own.
    """

    def __init__(self, dataroot: str | os.PathLike, layout: MeshLayout, identities: list[int], poses: list[int],
                 epoch_size: int, batch_size: int, seed: int, device: torch.device, rank: int = 0,
                 world_size: int = 1, shuffle_points: bool = True):
        folder = Path(dataroot) / PACKED_DIR_NAME
        index = json.loads((folder / "index.json").read_text())
        if index["dataset_mode"] != layout.name:
            raise ValueError(f"{folder} packs a {index['dataset_mode']} set but --dataset_mode is {layout.name}")
        rows, columns = {n: k for k, n in enumerate(index["identities"])}, {n: k for k, n in enumerate(index["poses"])}
        absent = ([f"identity {i}" for i in identities if i not in rows]
                  + [f"pose {p}" for p in poses if p not in columns])
        if absent:
            raise ValueError(f"{folder} has no {absent[0]} ({len(absent)} training indices absent); re-pack the set")
        vertices = torch.from_numpy(np.load(folder / "vertices.npy", mmap_mode="r")[
            np.ix_([rows[i] for i in identities], [columns[p] for p in poses])])  # (I, P, V, 3)
        # Centring does not depend on the pair, so it is done once for the whole set.
        self.vertices = center_bbox(vertices.to(device))
        self.faces = torch.from_numpy(np.load(folder / "faces.npy")).to(device)  # (F, 3)
        self.identities, self.poses = list(identities), list(poses)
        self.layout, self.batch_size, self.seed, self.device = layout, batch_size, seed, device
        self.rank, self.world_size, self.shuffle_points = rank, world_size, shuffle_points
        self.num_vertices = self.vertices.shape[2]
        self.batches_per_epoch = max(1, epoch_size // (batch_size * world_size))

    def __len__(self) -> int:
        return self.batches_per_epoch

    def epoch_batches(self, epoch: int, start_batch: int = 0):
        """This rank's batches of an epoch from batch start_batch on (resume)."""
        return (self.batch(epoch, k) for k in range(start_batch, self.batches_per_epoch))

    def sample_meshes(self, count: int = 16) -> list[torch.Tensor]:
        """A few training meshes (V, 3), spread over the set, for data statistics."""
        flat = self.vertices.flatten(0, 1)  # (I*P, V, 3)
        return list(flat[:: max(1, len(flat) // count)][:count].cpu())

    def batch(self, epoch: int, iteration: int) -> dict:
        """Batch number `iteration` (0-based) of `epoch` for this rank; see TrainPairDataset for the keys."""
        generator = seeded_generator(self.seed, epoch, iteration, self.rank)
        batch = self.batch_size
        i, j = torch.randint(len(self.identities), (2, batch), generator=generator)
        p1, p2 = torch.randint(len(self.poses), (2, batch), generator=generator)
        identity_points = self.vertices[i, p1]  # (B, N, 3)
        pose_points = self.vertices[j, p2]
        gt_points = self.vertices[i, p2]
        faces = self.faces.expand(batch, -1, -1)  # (B, F, 3)
        identity_faces, pose_faces = faces, faces
        if self.shuffle_points:
            seed = int(torch.randint(2**62, (1,), generator=generator))
            device_generator = torch.Generator(device=self.device).manual_seed(seed)
            orders = torch.rand(2, batch, self.num_vertices, device=self.device,
                                generator=device_generator).argsort(dim=-1)
            identity_points, identity_faces = permute_mesh_unchecked(identity_points, faces, orders[0])
            gt_points = torch.gather(gt_points, 1, orders[0].unsqueeze(-1).expand_as(gt_points))
            pose_points, pose_faces = permute_mesh_unchecked(pose_points, faces, orders[1])
        name = self.layout.file_name
        return {
            "identity_points": identity_points, "pose_points": pose_points, "gt_points": gt_points,
            "identity_faces": identity_faces, "pose_faces": pose_faces,
            "identity_name": [name(self.identities[a], self.poses[b]) for a, b in zip(i.tolist(), p1.tolist())],
            "pose_name": [name(self.identities[a], self.poses[b]) for a, b in zip(j.tolist(), p2.tolist())],
            "gt_name": [name(self.identities[a], self.poses[b]) for a, b in zip(i.tolist(), p2.tolist())],
        }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Pack a mesh folder into DIR/packed for fast training.")
    parser.add_argument("--dataroot", required=True, help="folder of id{i}_{p}.obj or toy_{i}_{p}.ply meshes")
    parser.add_argument("--dataset_mode", default="human", choices=tuple(DATASETS))
    parser.add_argument("--workers", type=int, default=2, help="processes reading mesh files")
    args = parser.parse_args(argv)
    out = pack_dataset(args.dataroot, DATASETS[args.dataset_mode], args.workers)
    index = json.loads((out / "index.json").read_text())
    print(f"packed {len(index['identities'])} identities x {len(index['poses'])} poses of "
          f"{index['num_vertices']} vertices into {out}")


if __name__ == "__main__":
    run_main(main)
