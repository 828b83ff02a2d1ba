"""Write a pose-transfer data set from a body model: `python -m data.generate --out DIR [--source anny]`.

The published human and animal sets come from SMPL and SMAL, whose files many users cannot get. This
generator writes a set in the same layouts (SPEC.md, "Data layouts"): mesh (i, p) is identity i's body in
pose p, as `id{i}_{p}.obj` (human) or `toy_{i}_{p}.ply` (animal), every mesh on one topology. Beside the
meshes it writes

- metadata.json: the parameters that define the set (source, model-file hash, counts, vertex count,
  seed), how it was run, every identity's shape values and every pose's parameters;
- split.json: the train/test split the loaders read (data/split.py), the published one for the published
  counts and the same proportions for other counts;
- test_list: up to 400 "identity pose ground-truth" lines drawn from the test split with a fixed seed,
  identity (i, p1), pose (j, p2), ground truth (i, p2), like the published test lists: identities and
  poses both unseen in training;
- test_list_seen_poses: the same for test identities in training poses (NPT's "seen poses" test).

The output is a function of the parameters alone: the same command writes byte-identical files. Meshes
are computed in fixed chunks of the (identity, pose) grid, each file is written atomically, and a rerun
skips every chunk whose files all exist, so an interrupted run continues where it stopped. A folder
holding a set with other parameters is refused unless --overwrite, which also removes the folder's
packed/ (python -m data.packed), made from the meshes it replaces.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import multiprocessing
import re
import shutil
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from data import DATASETS
from data.packed import PACKED_DIR_NAME
from data.resample import Resampling, build_resampling
from data.sources import SOURCES
from data.sources.base import BodySource
from data.split import SPLIT_FILE_NAME
from util.atomic import atomic_write_text
from util.cli import OneLineErrorParser, run_main
from util.mesh_io import write_mesh

METADATA_FILE_NAME = "metadata.json"
TEST_LIST_FILE_NAME = "test_list"
SEEN_POSES_TEST_LIST_FILE_NAME = "test_list_seen_poses"
MODEL_FILE_SOURCES = ("smpl", "smal")
# Anny is resampled to SMPL's vertex count so that an Anny set can stand in for the published one.
DEFAULT_VERTICES = {"anny": 6890, "smpl": 0, "smal": 0, "quadruped": 0}
TEST_LIST_LINES = 400
_RECORDED_PACKAGES = ("anny", "fast-simplification", "numpy", "torch")
_TEST_LIST_SEED = 2021  # fixed, so that sets made with different --seed share their test pairs

# The published splits at the published counts (SPEC.md, "Data layouts"); other counts scale them.
PUBLISHED_SPLITS = {
    "human": {
        "identities": 30,
        "poses": 800,
        "train_identities": list(DATASETS["human"].train_identities),
        "train_poses": list(DATASETS["human"].train_poses),
        "test_identities": list(range(16, 30)),
        "test_poses": list(range(600, 800)),
        "epoch_size": DATASETS["human"].epoch_size,
    },
    "animal": {
        "identities": 41,
        "poses": 600,
        "train_identities": list(DATASETS["animal"].train_identities),
        "train_poses": list(DATASETS["animal"].train_poses),
        "test_identities": [16, 17, 18, 19, 20, 22, 25, 32, 33, 36, 37, 40],
        "test_poses": list(range(400, 600)),
        "epoch_size": DATASETS["animal"].epoch_size,
    },
}
_GENERATED_NAME = re.compile(r"(id\d+_\d+\.obj|toy_\d+_\d+\.ply)")
_INTERRUPTED_WRITE = re.compile(r"\.(id\d+_\d+\.obj|toy_\d+_\d+\.ply)\..*\.tmp")  # write_mesh's temporaries


def _installed_version(package: str) -> str | None:
    """The installed version of package, or None (anny is only needed by the anny source)."""
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _scale_indices(published: list[int], published_count: int, count: int) -> list[int]:
    """Indices of 0..count-1 whose nearest published index (same relative position) is in `published`."""
    members = set(published)
    return [index for index in range(count) if (2 * index + 1) * published_count // (2 * count) in members]


def make_split(layout: str, identities: int, poses: int) -> dict:
    """The train/test split of a set, in the split.json format the loaders read.

    At the published counts this is the published split. Other counts keep its proportions: index k of
    n takes the role of the published index at the same relative position, floor((k + 1/2) N / n), and
    the epoch keeps the published ratio of samples to training pairs.

    Args:
        layout: "human" or "animal".
        identities, poses: the counts of the set.
    Returns:
        dict with dataset_mode, identities, poses, train_identities, train_poses, test_identities,
        test_poses (sorted int lists) and epoch_size.
    """
    published = PUBLISHED_SPLITS[layout]
    split = {"dataset_mode": layout, "identities": identities, "poses": poses}
    for part in ("train", "test"):
        split[f"{part}_identities"] = _scale_indices(
            published[f"{part}_identities"], published["identities"], identities)
        split[f"{part}_poses"] = _scale_indices(published[f"{part}_poses"], published["poses"], poses)
    empty = [key for key in ("train_identities", "train_poses", "test_identities", "test_poses") if not split[key]]
    if empty:
        raise ValueError(
            f"a {layout} set of {identities} identities x {poses} poses cannot hold a train/test split: "
            f"{', '.join(empty)} would be empty; use more identities or poses (the published set has "
            f"{published['identities']} x {published['poses']})")
    published_pairs = len(published["train_identities"]) * len(published["train_poses"])
    pairs = len(split["train_identities"]) * len(split["train_poses"])
    split["epoch_size"] = max(1, round(published["epoch_size"] * pairs / published_pairs))
    return split


def make_test_list(split: dict, poses_key: str = "test_poses") -> list[tuple[int, int, int, int]]:
    """Distinct test quadruples (i, j, p1, p2), at most 400, drawn with a fixed seed from the test identities
    and the poses split[poses_key] ("test_poses", or "train_poses" for poses seen in training).

    A line reads: identity mesh (i, p1), pose mesh (j, p2), ground truth (i, p2).
    """
    identities, poses = split["test_identities"], split[poses_key]
    grid = (len(identities), len(identities), len(poses), len(poses))
    total = int(np.prod(grid))
    drawn = np.random.default_rng(_TEST_LIST_SEED).choice(total, size=min(TEST_LIST_LINES, total), replace=False)
    return [(identities[i], identities[j], poses[p1], poses[p2])
            for i, j, p1, p2 in zip(*np.unravel_index(drawn, grid))]


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _differences(stored: dict, wanted: dict) -> str:
    """'key stored -> wanted' for every parameter that differs."""
    keys = sorted(set(stored) | set(wanted))
    return ", ".join(f"{key} {stored.get(key)} -> {wanted.get(key)}"
                     for key in keys if stored.get(key) != wanted.get(key))


def _folder_conflict(out: Path, parameters: dict) -> str | None:
    """Why out cannot take the set of these parameters as it stands, or None when it can (new, empty or same set)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; a folder is needed")
    metadata_path = out / METADATA_FILE_NAME
    if metadata_path.is_file():
        try:
            stored = json.loads(metadata_path.read_text()).get("parameters")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            stored = None
        if stored == parameters:
            return None
        if isinstance(stored, dict):
            return f"holds a set made with other parameters ({_differences(stored, parameters)})"
        return f"has a {METADATA_FILE_NAME} without readable parameters"
    if out.is_dir() and any(_GENERATED_NAME.fullmatch(path.name) for path in out.iterdir()):
        return f"holds meshes but no {METADATA_FILE_NAME}, so their parameters are unknown"
    return None


def _clear_folder(out: Path, whole_set: bool) -> None:
    """Remove interrupted writes and, when whole_set, every file of the set in out.

    Only files this generator writes are ever removed: meshes named like a layout's files, their
    temporaries, metadata.json, split.json and the test lists.
    """
    out.mkdir(parents=True, exist_ok=True)
    generated = {METADATA_FILE_NAME, SPLIT_FILE_NAME, TEST_LIST_FILE_NAME, SEEN_POSES_TEST_LIST_FILE_NAME}
    for path in out.iterdir():
        of_set = _GENERATED_NAME.fullmatch(path.name) or path.name in generated
        if (whole_set and of_set) or _INTERRUPTED_WRITE.fullmatch(path.name):
            path.unlink()


def _remove_stale_pack(out: Path, layout: str) -> None:
    """Remove out/packed, which holds the meshes of the set being replaced: left there, train.py's
    --loader auto would train on them instead of the new files."""
    packed = out / PACKED_DIR_NAME
    if packed.is_dir():
        shutil.rmtree(packed)
        print(f"removed {packed}, packed from the set this run replaces; re-run python -m data.packed "
              f"--dataroot {out} --dataset_mode {layout} to pack the new one")


def _build_source(name: str, model_file: str | None, device: torch.device) -> BodySource:
    if name in MODEL_FILE_SOURCES:
        return SOURCES[name](model_file, device)
    return SOURCES[name](device)


def _template_resampling(source: BodySource, num_vertices: int) -> Resampling | None:
    """The shared topology for --vertices: None for the native one (0 or the native count)."""
    if num_vertices in (0, source.num_vertices):
        return None
    shape = torch.as_tensor(source.reference_shape()[None])  # (1, S)
    rest = torch.zeros(1, len(source.pose_labels()), dtype=torch.float64)  # (1, P)
    template = source.vertices(shape, rest)[0].double().cpu().numpy()  # (V, 3)
    return build_resampling(template, source.faces, num_vertices)


def _metadata_text(metadata: dict) -> str:
    """JSON with one top-level key per line and one row per line for tables (shapes, poses)."""
    entries = []
    for key, value in metadata.items():
        if isinstance(value, list) and value and isinstance(value[0], list):
            text = "[\n" + ",\n".join(f"  {json.dumps(row)}" for row in value) + "\n ]"
        else:
            text = json.dumps(value)
        entries.append(f" {json.dumps(key)}: {text}")
    return "{\n" + ",\n".join(entries) + "\n}\n"


def _write_meshes(paths: list[Path], vertices: np.ndarray, faces: np.ndarray) -> None:
    """Write meshes (b, N, 3) that share faces (F, 3); runs in a writer process."""
    for path, mesh_vertices in zip(paths, vertices):
        write_mesh(path, mesh_vertices, faces)


def _write_missing_meshes(out: Path, layout: str, source: BodySource, resampling: Resampling | None,
                          shapes: np.ndarray, pose_parameters: np.ndarray, batch_size: int, workers: int) -> None:
    """Write every mesh of the set that out lacks, with a progress bar.

    Args:
        shapes: float64 (I, S) identity parameters; pose_parameters: float64 (P, Q).
    """
    file_name = DATASETS[layout].file_name
    faces = source.faces if resampling is None else resampling.faces
    grid = [(i, p) for i in range(len(shapes)) for p in range(len(pose_parameters))]
    # Chunks are fixed by the batch size, not by which files exist: a mesh's float32 bits can depend on
    # what else is in its batch, so a resumed run recomputes whole chunks to stay byte-identical.
    chunks = [grid[start:start + batch_size] for start in range(0, len(grid), batch_size)]
    if sum(not all((out / file_name(i, p)).is_file() for i, p in chunk) for chunk in chunks) < 2:
        workers = 0  # nothing to overlap, and a writer process takes seconds to start
    with contextlib.ExitStack() as stack:
        progress = stack.enter_context(tqdm(total=len(grid), unit="mesh", desc=f"{source.name} -> {out}"))
        # Formatting text costs about as much as posing, so worker processes write while the model
        # runs. Forked (fast to start, as DataLoader workers are): they only format and write files
        # and never call into torch, whose thread pool a fork does not carry over.
        writers = stack.enter_context(ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("fork"))) if workers else None
        in_flight: deque = deque()  # (future or None, meshes in the chunk), oldest first
        for chunk in chunks:
            names = [file_name(i, p) for i, p in chunk]
            missing = [k for k, name in enumerate(names) if not (out / name).is_file()]
            future = None
            if missing:
                chunk_shapes = torch.as_tensor(shapes[[i for i, _ in chunk]])  # (b, S)
                chunk_poses = torch.as_tensor(pose_parameters[[p for _, p in chunk]])  # (b, Q)
                posed = source.vertices(chunk_shapes, chunk_poses)  # (b, V, 3)
                if resampling is not None:
                    posed = resampling.apply(posed)  # (b, N, 3)
                paths = [out / names[k] for k in missing]
                posed = posed[missing].cpu().numpy()
                if writers is None:
                    _write_meshes(paths, posed, faces)
                else:
                    future = writers.submit(_write_meshes, paths, posed, faces)
            in_flight.append((future, len(chunk)))
            # At most one waiting chunk per writer bounds memory; result() re-raises a writer's error.
            while in_flight and (len(in_flight) > workers or in_flight[0][0] is None):
                future, count = in_flight.popleft()
                if future is not None:
                    future.result()
                progress.update(count)
        for future, count in in_flight:
            future.result()
            progress.update(count)


def generate(args: argparse.Namespace) -> dict:
    """Write the set that args describe into args.out; see the module docstring.

    Returns:
        the split.json content.
    """
    layout = SOURCES[args.source].layout
    identities = args.identities if args.identities is not None else PUBLISHED_SPLITS[layout]["identities"]
    poses = args.poses if args.poses is not None else PUBLISHED_SPLITS[layout]["poses"]
    vertices = args.vertices if args.vertices is not None else DEFAULT_VERTICES[args.source]
    for flag, value, minimum in (("--identities", identities, 1), ("--poses", poses, 1),
                                 ("--vertices", vertices, 0), ("--batch_size", args.batch_size, 1),
                                 ("--seed", args.seed, 0), ("--workers", args.workers, 0)):
        if value < minimum:
            raise ValueError(f"{flag} must be at least {minimum}, got {value}")
    model_sha256 = None
    if args.source in MODEL_FILE_SOURCES:
        if args.model_file is None:
            raise ValueError(f"--source {args.source} needs --model_file, the {args.source.upper()} model file")
        if not Path(args.model_file).is_file():
            raise FileNotFoundError(f"--model_file {args.model_file} does not exist")
        model_sha256 = _file_sha256(Path(args.model_file))
    elif args.model_file is not None:
        raise ValueError(f"--source {args.source} takes no --model_file, got {args.model_file}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but torch finds no CUDA device; use --device cpu")
    split = make_split(layout, identities, poses)
    parameters = {"source": args.source, "model_sha256": model_sha256, "identities": identities, "poses": poses,
                  "vertices": vertices, "seed": args.seed}
    out = Path(args.out)
    conflict = _folder_conflict(out, parameters)
    if conflict is not None and not args.overwrite:
        raise ValueError(f"output folder {out} {conflict}; pass --overwrite to replace that set or choose "
                         f"another --out")

    source = _build_source(args.source, args.model_file, torch.device(args.device))
    shapes = source.sample_identities(identities, np.random.default_rng([args.seed, 0]))  # (I, S)
    pose_parameters = source.sample_poses(poses, np.random.default_rng([args.seed, 1]))  # (P, Q)
    resampling = _template_resampling(source, vertices)
    # Only now, with every input checked and the model built, is anything in out removed.
    _clear_folder(out, whole_set=conflict is not None)
    if conflict is not None:
        _remove_stale_pack(out, layout)
    faces = source.faces if resampling is None else resampling.faces
    num_vertices = source.num_vertices if resampling is None else resampling.num_vertices
    metadata = {
        "parameters": parameters,
        "run": {"model_file": args.model_file, "device": args.device, "batch_size": args.batch_size,
                "packages": {name: _installed_version(name) for name in _RECORDED_PACKAGES}},
        "dataset_mode": layout,
        "vertices": num_vertices,
        "faces": len(faces),
        "native_vertices": source.num_vertices,
        "native_faces": len(source.faces),
        "random_poses": poses // 2,
        "shape_labels": list(source.shape_labels),
        "identity_shapes": shapes.tolist(),
        "pose_labels": source.pose_labels(),
        "pose_parameters": pose_parameters.tolist(),
    }
    atomic_write_text(_metadata_text(metadata), out / METADATA_FILE_NAME)
    _write_missing_meshes(out, layout, source, resampling, shapes, pose_parameters, args.batch_size, args.workers)
    split_file = {**split, "vertices": num_vertices, "faces": len(faces)}
    atomic_write_text(json.dumps(split_file) + "\n", out / SPLIT_FILE_NAME)
    file_name = DATASETS[layout].file_name
    for list_name, poses_key in ((TEST_LIST_FILE_NAME, "test_poses"), (SEEN_POSES_TEST_LIST_FILE_NAME, "train_poses")):
        lines = [f"{file_name(i, p1)} {file_name(j, p2)} {file_name(i, p2)}"
                 for i, j, p1, p2 in make_test_list(split, poses_key)]
        atomic_write_text("\n".join(lines) + "\n", out / list_name)
    return split_file


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="python -m data.generate",
        description="Write a pose-transfer data set (meshes, split.json, test lists, metadata.json) from a body model.")
    parser.add_argument("--out", required=True, help="output folder; an interrupted run continues in it")
    parser.add_argument("--source", default="anny", choices=tuple(SOURCES),
                        help="anny: Anny humans (human layout); smpl / smal: from --model_file; quadruped: "
                             "procedural four-legged animals (animal layout)")
    parser.add_argument("--model_file", default=None, help="the SMPL or SMAL model file (.pkl) for --source smpl/smal")
    parser.add_argument("--identities", type=int, default=None,
                        help="number of identities (default: 30 for human layouts, 41 for animal)")
    parser.add_argument("--poses", type=int, default=None,
                        help="poses per identity, the first half random, the rest straight "
                             "(default: 800 for human layouts, 600 for animal)")
    parser.add_argument("--vertices", type=int, default=None,
                        help="resample every mesh to one decimated topology of about this many vertices; "
                             "0 keeps the native mesh (default: 6890 for anny, native otherwise)")
    parser.add_argument("--seed", type=int, default=0, help="fixes every identity and pose")
    parser.add_argument("--batch_size", type=int, default=64, help="meshes posed per model call")
    parser.add_argument("--workers", type=int, default=2,
                        help="processes that write files while the model runs; 0 writes in this process")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the body model runs")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a set with other parameters found in --out instead of refusing")
    return parser


def main(argv: list[str] | None = None) -> dict:
    return generate(build_parser().parse_args(argv))


if __name__ == "__main__":
    run_main(main)
