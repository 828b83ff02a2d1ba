"""Packed data sets: every mesh of a set in one array, pairs drawn on the GPU (issue 4, the data path).

`python -m data.packed --dataroot DIR --dataset_mode human` reads every `id{i}_{p}.obj` (or `toy_{i}_{p}.ply`)
once and writes DIR/packed/: vertices.npy (I, P, V, 3) float32 as read, faces.npy (F, 3) int64 (one topology
for the whole set, as the published and generated sets have), and index.json (identity and pose numbers of
the rows and columns, and a fingerprint of the mesh files). train.py then keeps the whole set on the device
and draws each batch there with PackedPairSampler: the same sampling, centring, permutation and face
re-indexing as TrainPairDataset, vectorised over the batch, with no file parsing and no host work per step.

Opening a pack checks it against the folder (every mesh file's name and size, and the content of a few,
recorded in index.json's source_files) and checks the arrays against index.json, so that a pack left
behind by a regenerated or edited set, or a damaged one, is refused with the advice to re-pack instead
of training on other meshes than the folder holds.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from data import DATASETS, MeshLayout
from data.pair_dataset import seeded_generator
from data.split import is_count
from util.atomic import atomic_write, atomic_write_text
from util.cli import OneLineErrorParser, run_main
from util.mesh_io import read_mesh
from util.mesh_ops import center_bbox, permute_mesh_unchecked

PACKED_DIR_NAME = "packed"
INDEX_KEYS = ("dataset_mode", "identities", "poses", "num_vertices", "num_faces")
# Files hashed whole for the fingerprint. Sizes alone miss rewrites of binary PLY files, which all have
# one size on one topology; 64 files spread over every identity row cost tens of milliseconds.
SAMPLED_FILES = 64


def _name_pattern(layout: MeshLayout) -> re.Pattern:
    """The layout's file names, with the identity and pose numbers as groups."""
    return re.compile("^" + re.escape(layout.file_pattern).replace(r"\{identity\}", r"(\d+)")
                      .replace(r"\{pose\}", r"(\d+)") + "$")


def _scan(root: Path, layout: MeshLayout) -> tuple[list[int], list[int]]:
    """Identity and pose numbers present in root, from the file names."""
    found = [tuple(map(int, match.groups())) for match in map(_name_pattern(layout).match, os.listdir(root)) if match]
    return sorted({i for i, _ in found}), sorted({p for _, p in found})


def _file_sizes(root: Path, layout: MeshLayout) -> dict[str, int]:
    """Byte size of every mesh file of the layout in root, by name: one directory scan and one stat a file
    (about 0.1 s for the 24,000 files of the published human set), unlike mtimes unchanged by a copy."""
    pattern = _name_pattern(layout)
    with os.scandir(root) as entries:
        return {entry.name: entry.stat().st_size for entry in entries if pattern.match(entry.name)}


def _sampled_cells(rows: int, columns: int) -> list[tuple[int, int]]:
    """(row, column) cells of the identity x pose grid whose files are hashed: all of a small set, else
    SAMPLED_FILES spread over the columns and cycling through the rows, so that a reordered identity list
    is caught even where every file has one size."""
    count = min(rows * columns, SAMPLED_FILES)
    return sorted({(k % rows, k * columns // count) for k in range(count)})


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def source_fingerprint(root: Path, layout: MeshLayout, identities: list[int], poses: list[int]) -> dict:
    """index.json's source_files: the byte size of every mesh file as an identity x pose grid in the pack's
    order, and the sha256 of the files of _sampled_cells as [row, column, digest]."""
    sizes = _file_sizes(root, layout)
    return {"sizes": [[sizes[layout.file_name(i, p)] for p in poses] for i in identities],
            "sha256": [[r, c, _sha256(root / layout.file_name(identities[r], poses[c]))]
                       for r, c in _sampled_cells(len(identities), len(poses))]}


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
    # Taken before reading, so that a file changed while packing makes the pack mismatch, not hide it.
    fingerprint = source_fingerprint(root, layout, identities, poses)
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
             "num_vertices": int(first_vertices.shape[0]), "num_faces": int(faces.shape[0]),
             "source_files": fingerprint}
    atomic_write_text(json.dumps(index) + "\n", out / "index.json")  # last: its presence marks a complete pack
    return out


def has_packed(dataroot: str | os.PathLike) -> bool:
    return (Path(dataroot) / PACKED_DIR_NAME / "index.json").is_file()


def _repack_advice(root: Path, layout: MeshLayout) -> str:
    return f"re-run python -m data.packed --dataroot {root} --dataset_mode {layout.name}"


def _files(count: int) -> str:
    return f"{count} file{'' if count == 1 else 's'}"


def _fingerprint_problem(fingerprint: object, rows: int, columns: int) -> str | None:
    """What makes index.json's source_files unusable for a rows x columns pack, or None."""
    sizes = fingerprint.get("sizes") if isinstance(fingerprint, dict) else None
    digests = fingerprint.get("sha256") if isinstance(fingerprint, dict) else None
    grid = isinstance(sizes, list) and len(sizes) == rows and all(
        isinstance(row, list) and len(row) == columns and all(map(is_count, row)) for row in sizes)
    cells = isinstance(digests, list) and all(
        isinstance(cell, list) and len(cell) == 3 and is_count(cell[0]) and cell[0] < rows
        and is_count(cell[1]) and cell[1] < columns and isinstance(cell[2], str) for cell in digests)
    return None if grid and cells else f"has a source_files entry that does not fit {rows} identities x {columns} poses"


def _index_problem(index: object) -> str | None:
    """What makes a parsed index.json unusable, or None; every later step may then trust its types."""
    if not isinstance(index, dict):
        return "is not a JSON object"
    missing = [key for key in INDEX_KEYS if key not in index]
    if missing:
        return f"lacks {', '.join(missing)}"
    if not isinstance(index["dataset_mode"], str):
        return f"has dataset_mode {index['dataset_mode']!r}, not a name"
    for key in ("identities", "poses"):
        numbers = index[key]
        if not (isinstance(numbers, list) and numbers and all(map(is_count, numbers))
                and len(set(numbers)) == len(numbers)):
            return f"has {key} that are not a non-empty list of distinct non-negative integers"
    for key in ("num_vertices", "num_faces"):
        if not (is_count(index[key]) and index[key] > 0):
            return f"has {key} {index[key]!r}, not a positive integer"
    if "source_files" in index:
        return _fingerprint_problem(index["source_files"], len(index["identities"]), len(index["poses"]))
    return None


def _read_index(folder: Path, advice: str) -> dict:
    """index.json, checked; a damaged one would otherwise fail later as a KeyError or TypeError naming no file."""
    path = folder / "index.json"
    try:
        index = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); {advice}") from None
    problem = _index_problem(index)
    if problem:
        raise ValueError(f"{path} {problem}; {advice}")
    return index


def _source_difference(root: Path, layout: MeshLayout, index: dict) -> str | None:
    """How the mesh files in root differ from those the pack was made from, or None when they match.

    The sizes are compared cell by cell of the identity x pose grid in index.json's order, so identities
    or poses reordered in index.json show as files at the wrong place, not only as changed files.
    """
    recorded = index["source_files"]
    names = [[layout.file_name(i, p) for p in index["poses"]] for i in index["identities"]]
    packed = {name: size for row_names, row_sizes in zip(names, recorded["sizes"])
              for name, size in zip(row_names, row_sizes)}
    present = _file_sizes(root, layout)
    gone, new = len(packed.keys() - present.keys()), len(present.keys() - packed.keys())
    resized = sum(present[name] != size for name, size in packed.items() if name in present)
    if resized and not (gone or new) and sorted(present.values()) == sorted(packed.values()):
        return (f"{_files(resized)} of the right sizes sit at other places of the identity x pose grid, as if "
                f"index.json's identities or poses were reordered")
    # Only files of unchanged size are hashed: the others already count as changed.
    rehashed = sum(_sha256(root / names[r][c]) != digest for r, c, digest in recorded["sha256"]
                   if present.get(names[r][c]) == recorded["sizes"][r][c])
    parts = [(gone, f"{_files(gone)} gone"), (new, f"{_files(new)} new"),
             (resized, f"{_files(resized)} changed size"),
             (rehashed, f"{rehashed} of {len(recorded['sha256'])} sampled files changed content")]
    return ", ".join(text for count, text in parts if count) or None


def _check_sources(root: Path, layout: MeshLayout, index: dict, advice: str) -> None:
    """Refuse a pack made from other files than root holds. A pack from before fingerprints only warns:
    it most likely still matches, and re-packing the published set takes minutes, so refusing it would
    cost every such user a re-pack to guard against the rarer stale one the warning names."""
    folder = root / PACKED_DIR_NAME
    if "source_files" not in index:
        print(f"warning: {folder} predates packs that record their mesh files, so it cannot be checked against "
              f"{root}; if the meshes changed since it was made, {advice}", file=sys.stderr)
        return
    difference = _source_difference(root, layout, index)
    if difference:
        raise ValueError(f"{folder} was made from other mesh files than {root} holds now ({difference}); {advice}")


def _load_array(path: Path, advice: str, mmap: bool) -> np.ndarray:
    """The .npy array in path; numpy says EOFError for an empty file and names no file for a cut-short one."""
    try:
        array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist; {advice}") from None
    except (OSError, ValueError, EOFError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"{path} is not a readable .npy array ({reason}); {advice}") from None
    if not isinstance(array, np.ndarray):
        array.close()
        raise ValueError(f"{path} is an .npz archive, not an .npy array; {advice}")
    return array


def _open_arrays(folder: Path, index: dict, advice: str) -> tuple[np.ndarray, np.ndarray]:
    """vertices.npy (memory-mapped) and faces.npy (int64), checked against index.json and each other."""
    vertices_path, faces_path = folder / "vertices.npy", folder / "faces.npy"
    vertices = _load_array(vertices_path, advice, mmap=True)
    shape = (len(index["identities"]), len(index["poses"]), index["num_vertices"], 3)
    if vertices.shape != shape or vertices.dtype != np.float32:
        raise ValueError(f"{vertices_path} holds {vertices.dtype} {vertices.shape} where index.json asks for "
                         f"float32 {shape} (identities, poses, vertices, xyz); {advice}")
    faces = _load_array(faces_path, advice, mmap=False)
    if faces.shape != (index["num_faces"], 3) or not np.issubdtype(faces.dtype, np.integer):
        raise ValueError(f"{faces_path} holds {faces.dtype} {faces.shape} where index.json asks for integer "
                         f"{(index['num_faces'], 3)}; {advice}")
    if faces.min() < 0 or faces.max() >= index["num_vertices"]:
        raise ValueError(f"{faces_path} refers to vertices {faces.min()} to {faces.max()}, but the meshes have "
                         f"{index['num_vertices']}; {advice}")
    return vertices, faces.astype(np.int64)


def _check_finite(vertices: torch.Tensor, path: Path, advice: str) -> None:
    """Refuse NaN or infinite coordinates in the loaded meshes (I, P, V, 3), which would train on NaN losses."""
    bad = (~torch.isfinite(vertices)).flatten(2).any(dim=2)  # (I, P)
    if bad.any():
        raise ValueError(f"{path} holds NaN or infinite coordinates in {int(bad.sum())} of the {bad.numel()} training "
                         f"meshes; {advice}")


def open_pack(root: Path, layout: MeshLayout) -> tuple[dict, np.ndarray, np.ndarray]:
    """index.json, vertices.npy (memory-mapped) and faces.npy of root's pack, checked against root's mesh
    files and each other.

    Raises:
        ValueError: the pack is of another layout, stale (made from other files) or damaged.
    """
    folder = root / PACKED_DIR_NAME
    advice = _repack_advice(root, layout)
    index = _read_index(folder, advice)
    if index["dataset_mode"] != layout.name:
        raise ValueError(f"{folder} packs a {index['dataset_mode']} set but --dataset_mode is {layout.name}")
    _check_sources(root, layout, index, advice)
    return (index, *_open_arrays(folder, index, advice))


class PackedPairSampler:
    """Training batches drawn on the device from a packed set, reproducible per (seed, epoch, iteration, rank).

    Each pair follows the published sampling: identities i, j and poses p1, p2 uniform over the training
    ranges; identity mesh (i, p1), pose mesh (j, p2), ground truth (i, p2); each mesh centred by its own
    bounding box; identity and ground truth share one random permutation, the pose mesh gets its own.
    """

    def __init__(self, dataroot: str | os.PathLike, layout: MeshLayout, identities: list[int], poses: list[int],
                 epoch_size: int, batch_size: int, seed: int, device: torch.device, rank: int = 0,
                 world_size: int = 1, shuffle_points: bool = True):
        root = Path(dataroot)
        folder = root / PACKED_DIR_NAME
        index, packed_vertices, faces = open_pack(root, layout)
        rows, columns = {n: k for k, n in enumerate(index["identities"])}, {n: k for k, n in enumerate(index["poses"])}
        absent = ([f"identity {i}" for i in identities if i not in rows]
                  + [f"pose {p}" for p in poses if p not in columns])
        if absent:
            raise ValueError(f"{folder} has no {absent[0]} ({len(absent)} training indices absent); re-pack the set")
        vertices = torch.from_numpy(packed_vertices[
            np.ix_([rows[i] for i in identities], [columns[p] for p in poses])])  # (I, P, V, 3)
        _check_finite(vertices, folder / "vertices.npy", _repack_advice(root, layout))
        # Centring does not depend on the pair, so it is done once for the whole set.
        self.vertices = center_bbox(vertices.to(device))
        self.faces = torch.from_numpy(faces).to(device)  # (F, 3)
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
    parser = OneLineErrorParser(description="Pack a mesh folder into DIR/packed for fast training.")
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
