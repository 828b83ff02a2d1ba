"""Pose transfer on any meshes: give an identity mesh's body the pose of a pose mesh with a trained checkpoint.

    python transfer.py --identity A.obj --pose B.ply --out C.obj --dataset_mode human --render C.png
    python transfer.py --pairs pairs.txt --dataset_mode human --render_dir renders/
    python transfer.py --identity_dir ids/ --pose_dir poses/ --out_dir out/ --rescale

The published test can only run meshes of the training vertex count at the training scale. Here the two
meshes may have any vertex counts (the correspondence is computed between all N identity and M pose
vertices) and come from any file format trimesh reads. Per pair: both meshes are centred by their
bounding boxes, as in training (SPEC.md, "Preprocessing"); each bounding-box diagonal is compared with the
training meshes' (data_stats.json, written by train.py), with a warning when it is over 2x off and, with
--rescale, a scaling to the training diagonal; the model runs in eval mode; the output is re-centred by
its own bounding box, as test.py does, scaled back by the identity's factor and placed at the identity's
original bounding-box centre, and is written with the identity's faces in the identity's vertex order.

Every check that can fail (options, outputs that exist, the checkpoint's model and dataset mode, the
weights, every input mesh) runs before the first output is written, so a failed batch leaves nothing
half-done. Degenerate faces and non-manifold edges only warn: the networks read vertices, not faces.
"""
from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models import create_model, inference_transfer
from models.cuda_graphs import TransferFunction
from options.base_options import parse, read_options_json
from options.transfer_options import TransferOptions
from util import checkpoint
from util.atomic import unwritable_reason
from util.cli import run_main
from util.mesh_io import MESH_SUFFIXES, OUTPUT_SUFFIXES, read_mesh, read_mesh_triples, write_mesh
from util.mesh_ops import center_bbox
from util.render import render_side_by_side

MIN_VERTICES = 3
SCALE_TOLERANCE = 2.0  # warn when a bounding-box diagonal is over 2x or under 1/2 of the training one
DEGENERATE_AREA = 1e-10  # a face is degenerate when twice its area is below this x the squared diagonal
# The largest half-extent the model is given: the networks' float32 statistics square their inputs, and beyond
# about 1e19 a variance overflows and the output is silently meaningless (finite, but not a body).
MAX_MODEL_HALF_EXTENT = 1e15


@dataclass(frozen=True)
class TransferJob:
    """One pair: the two meshes to read, the mesh to write and, when asked, the picture to draw."""
    identity: Path
    pose: Path
    out: Path
    render: Path | None


@dataclass(frozen=True)
class InputMesh:
    """A mesh as read, with its bounding-box centre and the factor that takes it to the model's scale."""
    path: Path
    vertices: np.ndarray  # float32 (V, 3)
    faces: np.ndarray  # int64 (F, 3)
    centre: np.ndarray  # float64 (3,)
    scale: float  # the model sees (vertices - centre) * scale; 1 unless --rescale


def warn(message: str) -> None:
    """One warning line on stderr; the run goes on."""
    print(f"warning: {message}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------
# What to do: pairs, outputs and the checkpoint's notes
# ---------------------------------------------------------------------------------------------------

def read_pairs_list(path: Path) -> list[tuple[Path, Path, Path]]:
    """The (identity, pose, output) paths of a --pairs list, relative ones resolved against its folder."""
    return [tuple(path.parent / name for name in names)
            for _, names in read_mesh_triples(path, "--pairs list", "identity pose output")]


def list_meshes(folder: Path, flag: str) -> list[Path]:
    """The mesh files of a folder (suffixes MESH_SUFFIXES), sorted by name."""
    if not folder.is_dir():
        raise FileNotFoundError(f"--{flag} {folder} is not a folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in MESH_SUFFIXES)
    if not files:
        raise ValueError(f"--{flag} {folder} holds no mesh files ({', '.join(MESH_SUFFIXES)})")
    return files


def build_jobs(opt: TransferOptions) -> list[TransferJob]:
    """The pairs the options ask for: one, or those of --pairs and of the folders."""
    if opt.identity:
        return [TransferJob(Path(opt.identity), Path(opt.pose), Path(opt.out),
                            Path(opt.render) if opt.render else None)]
    triples = read_pairs_list(Path(opt.pairs)) if opt.pairs else []
    if opt.identity_dir:
        identities = list_meshes(Path(opt.identity_dir), "identity_dir")
        poses = list_meshes(Path(opt.pose_dir), "pose_dir")
        triples += [(i, p, Path(opt.out_dir) / f"{i.stem}_in_{p.stem}.obj") for i in identities for p in poses]
    for _, _, out in triples:
        if out.suffix.lower() not in OUTPUT_SUFFIXES:
            raise ValueError(f"output {out} must end in one of {', '.join(OUTPUT_SUFFIXES)}")
    return [TransferJob(i, p, out, Path(opt.render_dir) / f"{out.stem}.png" if opt.render_dir else None)
            for i, p, out in triples]


def check_outputs(jobs: list[TransferJob], overwrite: bool) -> None:
    """Refuse, before anything is written: an output or render whose folder is a file, two pairs writing one
    file and, unless overwrite, any output or render that exists."""
    targets = [job.out for job in jobs] + [job.render for job in jobs if job.render]
    for path in targets:
        reason = unwritable_reason(path)
        if reason is not None:
            raise ValueError(f"{reason}; nothing was written")
    counts = Counter(path.resolve() for path in targets)
    repeated = [path for path, count in counts.items() if count > 1]
    if repeated:
        raise ValueError(f"{repeated[0]} would be written by {counts[repeated[0]]} pairs; give each pair its "
                         f"own output")
    existing = [path for path in targets if path.exists()]
    if existing and not overwrite:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise FileExistsError(f"output {existing[0]} exists{more}; nothing was written, pass --overwrite to "
                              f"replace existing outputs")


def training_bbox_size(opt: TransferOptions) -> np.ndarray | None:
    """Check that the checkpoint is of --model and --dataset_mode; return the training bounding box.

    opt.json and data_stats.json, when present (released checkpoints have neither), name the model and
    dataset mode the checkpoint was trained as; data_stats.json also holds the mean bounding-box size.

    Returns:
        float64 (3,), the training meshes' mean bounding-box extent, or None without data_stats.json.
    """
    notes = {name: read_options_json(opt.checkpoint_dir / name) for name in ("opt.json", "data_stats.json")
             if (opt.checkpoint_dir / name).is_file()}
    for name, values in notes.items():
        for key in ("model", "dataset_mode"):
            if key in values and values[key] != getattr(opt, key):
                raise ValueError(f"{opt.checkpoint_dir / name} says this is a checkpoint of {key} "
                                 f"{values[key]!r}, not --{key} {getattr(opt, key)!r}; point --checkpoints_dir at "
                                 f"one trained with --{key} {getattr(opt, key)}")
    if "data_stats.json" not in notes:
        return None
    size = notes["data_stats.json"].get("bbox_size")
    if not (isinstance(size, list) and len(size) == 3
            and all(isinstance(x, (int, float)) and 0 < x < float("inf") for x in size)):
        raise ValueError(f"{opt.checkpoint_dir / 'data_stats.json'} must hold bbox_size as three positive finite "
                         f"numbers, got {size!r}")
    return np.asarray(size, dtype=np.float64)


# ---------------------------------------------------------------------------------------------------
# Reading and checking the meshes
# ---------------------------------------------------------------------------------------------------

def mesh_defects(vertices: np.ndarray, faces: np.ndarray) -> tuple[int, int]:
    """Count degenerate faces (zero area up to float32 round-off) and non-manifold edges.

    Args:
        vertices: float (V, 3).
        faces: int64 (F, 3).
    Returns:
        the number of faces with twice their area below DEGENERATE_AREA x the squared bounding-box
        diagonal, and the number of edges shared by more than two faces.
    """
    corners = vertices.astype(np.float64)[faces]  # (F, 3, 3)
    doubled_areas = np.linalg.norm(np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]), axis=1)
    diagonal_sq = float(np.sum(np.ptp(vertices.astype(np.float64), axis=0) ** 2))
    degenerate = int(np.count_nonzero(doubled_areas <= DEGENERATE_AREA * diagonal_sq))
    edges = np.sort(faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), axis=1)  # (3F, 2), each edge low-high
    _, uses = np.unique(edges[:, 0] * len(vertices) + edges[:, 1], return_counts=True)
    return degenerate, int(np.count_nonzero(uses > 2))


def _size_text(extent: np.ndarray) -> str:
    return f"{' x '.join(f'{x:.3g}' for x in extent)} (diagonal {np.linalg.norm(extent):.3g})"


def load_input(path: Path, role: str, training_size: np.ndarray | None, rescale: bool) -> InputMesh:
    """Read one input mesh, check it, warn about its faces and scale, and find its model scale factor.

    Args:
        path: the mesh file.
        role: "identity" or "pose", for the messages.
        training_size: float64 (3,) mean training bounding box, or None (no scale check, no --rescale).
        rescale: scale the mesh so that its bounding-box diagonal is the training one.
    """
    vertices, faces = read_mesh(path)
    if len(vertices) < MIN_VERTICES:
        raise ValueError(f"{role} mesh {path} has {len(vertices)} vertices; at least {MIN_VERTICES} are needed")
    degenerate, non_manifold = mesh_defects(vertices, faces)
    if degenerate or non_manifold:
        warn(f"{role} mesh {path} has {degenerate} degenerate (zero-area) faces and {non_manifold} non-manifold "
             f"edges (shared by more than two faces); running anyway")
    low, high = vertices.min(axis=0).astype(np.float64), vertices.max(axis=0).astype(np.float64)
    scale = 1.0
    if training_size is not None:
        diagonal, training_diagonal = np.linalg.norm(high - low), np.linalg.norm(training_size)
        if rescale and diagonal == 0:
            raise ValueError(f"{role} mesh {path} cannot be rescaled: all its vertices lie at one point")
        if rescale:
            scale = training_diagonal / diagonal
        elif not 1 / SCALE_TOLERANCE <= diagonal / training_diagonal <= SCALE_TOLERANCE:
            warn(f"{role} mesh {path} measures {_size_text(high - low)}, {diagonal / training_diagonal:.3g} times "
                 f"the training meshes' {_size_text(training_size)}; pass --rescale to scale it to the training size")
    if np.max(high - low) / 2 * scale > MAX_MODEL_HALF_EXTENT:
        raise ValueError(f"{role} mesh {path} measures {_size_text(high - low)}, too large for the model's float32 "
                         f"arithmetic (at most {2 * MAX_MODEL_HALF_EXTENT:.0e} across); scale it to the size of the "
                         f"training meshes (metres for the published sets)"
                         + ("" if training_size is None else " or pass --rescale"))
    return InputMesh(path, vertices, faces, (low + high) / 2, scale)


def check_finite_output(fake_points: np.ndarray, identity: InputMesh, pose: InputMesh) -> None:
    """Refuse an output that is not finite, naming the likely cause: inputs far from the model's scale (half
    precision overflows first) or an unsound checkpoint."""
    if np.isfinite(fake_points).all():
        return
    extents = [np.ptp(mesh.vertices.astype(np.float64), axis=0) * mesh.scale for mesh in (identity, pose)]
    sizes = " and ".join(_size_text(extent) for extent in extents)
    raise ValueError(f"the output for identity {identity.path} in the pose of {pose.path} is not finite (NaN or inf); "
                     f"the model saw meshes measuring {sizes}: scale them to the training meshes' size (--rescale), "
                     f"or try --precision fp32, or check the checkpoint. Earlier pairs' outputs were written")


# ---------------------------------------------------------------------------------------------------
# Transfer
# ---------------------------------------------------------------------------------------------------

def transfer_pair(transfer: TransferFunction, identity: InputMesh, pose: InputMesh,
                  device: torch.device) -> dict[str, np.ndarray]:
    """Run the model on one centred (and maybe rescaled) pair; return its outputs in the identity's frame.

    Args:
        transfer: the model's transfer(identity (B, N, 3), pose (B, M, 3)) -> dict, on device, in eval mode.
        identity, pose: the inputs, N and M vertices.
        device: where the model is.
    Returns:
        fake_points and, when the model gives it, warp_out: float64 (N, 3) each, re-centred by their own
        bounding box, divided by the identity's scale factor and moved to the identity's bounding-box centre.
    """
    identity_points = center_bbox(torch.from_numpy(identity.vertices).to(device)) * identity.scale  # (N, 3)
    pose_points = center_bbox(torch.from_numpy(pose.vertices).to(device)) * pose.scale  # (M, 3)
    with torch.no_grad():
        outputs = transfer(identity_points[None], pose_points[None])  # a batch of one: (1, N, 3), (1, M, 3)
    return {name: center_bbox(outputs[name][0]).double().cpu().numpy() / identity.scale + identity.centre
            for name in ("fake_points", "warp_out") if name in outputs}


def render_pair(path: Path, identity: InputMesh, pose: InputMesh, outputs: dict[str, np.ndarray],
                out_name: str) -> None:
    """identity | pose | warp | output in one PNG (no warp panel when the model has none)."""
    meshes = [(identity.vertices, identity.faces), (pose.vertices, pose.faces)]
    titles = [f"identity {identity.path.name}", f"pose {pose.path.name}"]
    if "warp_out" in outputs:
        meshes.append((outputs["warp_out"], identity.faces))
        titles.append("warp")
    meshes.append((outputs["fake_points"], identity.faces))
    titles.append(f"output {out_name}")
    render_side_by_side(meshes, titles, path)


def main(opt: TransferOptions) -> list[Path]:
    """Transfer every pair the options name; return the output paths written."""
    jobs = build_jobs(opt)
    check_outputs(jobs, opt.overwrite)
    training_size = training_bbox_size(opt)
    if opt.rescale and training_size is None:
        raise ValueError(f"--rescale needs the training meshes' size from {opt.checkpoint_dir / 'data_stats.json'}, "
                         f"which this checkpoint lacks; scale the inputs yourself or drop --rescale")
    device = torch.device(opt.device)
    model = create_model(opt)
    checkpoint.load_networks(model, opt.checkpoint_dir, opt.which_epoch)
    model.to(device).eval()
    transfer = inference_transfer(model, opt)
    wanted = dict.fromkeys([("identity", job.identity) for job in jobs] + [("pose", job.pose) for job in jobs])
    inputs = {(role, path): load_input(path, role, training_size, opt.rescale) for role, path in wanted}

    for job in jobs:
        identity, pose = inputs["identity", job.identity], inputs["pose", job.pose]
        outputs = transfer_pair(transfer, identity, pose, device)
        check_finite_output(outputs["fake_points"], identity, pose)
        write_mesh(job.out, outputs["fake_points"], identity.faces)
        if job.render:
            render_pair(job.render, identity, pose, outputs, job.out.name)
        rendered = f", render {job.render}" if job.render else ""
        print(f"wrote {job.out}: {identity.path.name} ({len(identity.vertices)} vertices) in the pose of "
              f"{pose.path.name} ({len(pose.vertices)} vertices){rendered}")
    return [job.out for job in jobs]


if __name__ == "__main__":
    run_main(lambda: main(parse(TransferOptions, script="transfer.py")))
