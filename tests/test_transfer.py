"""transfer.py and its options on meshes of other vertex counts, scales and formats, with a checkpoint
trained for two steps: placement, vertex order, --rescale, the render, the batch forms and bad input."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

import train as train_script
import transfer
from models import create_model
from models.pose_transfer_model import PoseTransferModel
from options.base_options import parse
from options.train_options import TrainOptions
from options.transfer_options import TransferOptions
from tests.cli import assert_one_line_error, run_script
from tests.tiny_data import posed_ellipsoid, write_tiny_dataset
from util import checkpoint
from util.cli import run_main
from util.mesh_io import read_mesh, write_mesh
from util.mesh_ops import center_bbox
from util.render import DEFAULT_SIZE, TITLE_HEIGHT

OFFSET = np.array([5.0, -3.0, 2.0])  # the identity sits far from the origin, so placement is visible


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Path:
    """<checkpoints_dir> holding human/latest_net_*.pth, opt.json and data_stats.json after two steps."""
    root = tmp_path_factory.mktemp("transfer")
    data = write_tiny_dataset(root / "data")
    train_script.main(parse(TrainOptions, [
        "--gpu_ids", "-1", "--ngf", "8", "--nThreads", "0", "--batchSize", "2", "--dataroot", str(data),
        "--checkpoints_dir", str(root / "ckpt"), "--output_dir", str(root / "out"), "--niter", "1",
        "--niter_decay", "0", "--epoch_size", "4"]))
    return root / "ckpt"


def common_args(checkpoints: Path, *extra: str) -> list[str]:
    return ["--gpu_ids", "-1", "--ngf", "8", "--checkpoints_dir", str(checkpoints), *extra]


def write_ellipsoid(path: Path, identity: int, pose: int, subdivisions: int, scale: float = 1.0,
                    offset: np.ndarray = OFFSET) -> tuple[np.ndarray, np.ndarray]:
    """Write one of the tiny data set's shapes, scaled about the origin and moved; return what was written."""
    vertices, faces = posed_ellipsoid(identity, pose, subdivisions)
    vertices = ((vertices + offset) * scale).astype(np.float32)
    write_mesh(path, vertices, faces)
    return read_mesh(path)


def bbox_centre(vertices: np.ndarray) -> np.ndarray:
    return (vertices.min(axis=0).astype(np.float64) + vertices.max(axis=0)) / 2


def run_transfer(args: list[str]) -> list[Path]:
    return transfer.main(parse(TransferOptions, args, script="transfer.py"))


@pytest.fixture
def pair(tmp_path) -> dict[str, Path]:
    """An identity of 162 vertices (OBJ) and a pose of 42 (PLY), as the tiny set's shapes."""
    write_ellipsoid(tmp_path / "identity.obj", 0, 1, subdivisions=2)
    write_ellipsoid(tmp_path / "pose.ply", 1, 2, subdivisions=1, offset=np.zeros(3))
    return {"identity": tmp_path / "identity.obj", "pose": tmp_path / "pose.ply", "out": tmp_path / "out.obj"}


def pair_args(pair: dict[str, Path], *extra: str) -> list[str]:
    return ["--identity", str(pair["identity"]), "--pose", str(pair["pose"]), "--out", str(pair["out"]), *extra]


# ---------------------------------------------------------------------------------------------------
# One pair
# ---------------------------------------------------------------------------------------------------

def test_output_has_identity_faces_order_and_centre(checkpoints, pair, capsys):
    written = run_transfer(common_args(checkpoints, *pair_args(pair)))
    assert written == [pair["out"]]
    identity_vertices, identity_faces = read_mesh(pair["identity"])
    pose_vertices, _ = read_mesh(pair["pose"])
    out_vertices, out_faces = read_mesh(pair["out"])
    assert len(identity_vertices) == 162 and len(pose_vertices) == 42
    assert out_vertices.shape == identity_vertices.shape
    np.testing.assert_array_equal(out_faces, identity_faces)
    np.testing.assert_allclose(bbox_centre(out_vertices), bbox_centre(identity_vertices), atol=1e-5)
    # Reference: the model run by hand on the bbox-centred inputs in file order, the output re-centred.
    model = create_model(parse(TransferOptions, common_args(checkpoints, *pair_args(pair))))
    checkpoint.load_networks(model, checkpoints / "human", "latest")
    with torch.no_grad():
        expected = model.eval().transfer(center_bbox(torch.from_numpy(identity_vertices))[None],
                                         center_bbox(torch.from_numpy(pose_vertices))[None])["fake_points"][0]
    expected = center_bbox(expected).numpy() + bbox_centre(identity_vertices)
    np.testing.assert_allclose(out_vertices, expected, atol=1e-5)
    assert not np.allclose(out_vertices, identity_vertices, atol=1e-3)
    captured = capsys.readouterr()
    assert captured.out.count("wrote") == 1 and "162 vertices" in captured.out and captured.err == ""


def test_rescale_round_trip(checkpoints, tmp_path, capsys, monkeypatch):
    write_ellipsoid(tmp_path / "pose.obj", 1, 2, subdivisions=1)
    small, _ = write_ellipsoid(tmp_path / "small.obj", 0, 1, subdivisions=2)
    big, _ = write_ellipsoid(tmp_path / "big.obj", 0, 1, subdivisions=2, scale=10.0)
    for name in ("small", "big"):
        run_transfer(common_args(checkpoints, "--identity", str(tmp_path / f"{name}.obj"), "--pose",
                                 str(tmp_path / "pose.obj"), "--out", str(tmp_path / f"{name}_plain.obj")))
    warnings = capsys.readouterr().err.splitlines()
    assert len(warnings) == 1 and warnings[0].startswith("warning: identity mesh ")
    assert "big.obj" in warnings[0] and "--rescale" in warnings[0] and "training meshes'" in warnings[0]

    seen = []  # the bounding-box diagonals of what the model is given
    real_transfer = PoseTransferModel.transfer

    def recording_transfer(model, identity_points, pose_points):
        seen.append([float(torch.linalg.vector_norm(points.amax(dim=1) - points.amin(dim=1)))
                     for points in (identity_points, pose_points)])
        return real_transfer(model, identity_points, pose_points)

    monkeypatch.setattr(PoseTransferModel, "transfer", recording_transfer)
    for name in ("small", "big"):
        run_transfer(common_args(checkpoints, "--identity", str(tmp_path / f"{name}.obj"), "--pose",
                                 str(tmp_path / "pose.obj"), "--out", str(tmp_path / f"{name}_rescaled.obj"),
                                 "--rescale"))
    assert capsys.readouterr().err == ""
    training_diagonal = np.linalg.norm(json.loads((checkpoints / "human" / "data_stats.json").read_text())["bbox_size"])
    np.testing.assert_allclose(seen, np.full((2, 2), training_diagonal), rtol=1e-5)
    small_out, _ = read_mesh(tmp_path / "small_rescaled.obj")
    big_out, _ = read_mesh(tmp_path / "big_rescaled.obj")
    # The model saw the same centred input both times, so the outputs differ by the identities' factor 10.
    diagonal = np.linalg.norm(np.ptp(small, axis=0))
    np.testing.assert_allclose(big_out / 10, small_out, atol=1e-4 * diagonal)
    np.testing.assert_allclose(bbox_centre(big_out), bbox_centre(big), atol=1e-4 * diagonal)


def test_render_shows_identity_pose_warp_output(checkpoints, pair):
    render = pair["out"].with_suffix(".png")
    run_transfer(common_args(checkpoints, *pair_args(pair, "--render", str(render))))
    pixels = np.asarray(Image.open(render).convert("RGB"))
    width, height = DEFAULT_SIZE
    assert pixels.shape == (height, 4 * width, 3)
    for k in range(4):
        panel = pixels[TITLE_HEIGHT:, k * width:(k + 1) * width]
        assert (panel < 250).any(axis=-1).sum() > 100, f"panel {k} is empty"


def test_degenerate_and_non_manifold_faces_warn_and_run(checkpoints, pair, capsys):
    vertices, faces = read_mesh(pair["identity"])
    a, b, _ = faces[0]
    write_mesh(pair["identity"], vertices, np.vstack([faces, [[a, b, a]]]))  # zero area; edge ab in 3 faces
    run_transfer(common_args(checkpoints, *pair_args(pair)))
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("warning: identity mesh")
    assert "1 degenerate" in err[0] and "1 non-manifold" in err[0]
    assert len(read_mesh(pair["out"])[1]) == len(faces) + 1


def _mesh_defects_naive(vertices: np.ndarray, faces: np.ndarray) -> tuple[int, int]:
    """Per face: area by the cross product; per edge: a dict of uses."""
    diagonal_sq = float(np.sum(np.ptp(vertices.astype(np.float64), axis=0) ** 2))
    degenerate, uses = 0, {}
    for face in faces.tolist():
        p = vertices[face].astype(np.float64)
        degenerate += np.linalg.norm(np.cross(p[1] - p[0], p[2] - p[0])) <= transfer.DEGENERATE_AREA * diagonal_sq
        for k in range(3):
            edge = tuple(sorted((face[k], face[(k + 1) % 3])))
            uses[edge] = uses.get(edge, 0) + 1
    return int(degenerate), sum(count > 2 for count in uses.values())


@pytest.mark.parametrize("seed", range(4))
def test_mesh_defects_match_naive(seed):
    rng = np.random.default_rng(seed)
    vertices = rng.normal(size=(12, 3)).astype(np.float32)
    vertices[5] = vertices[4]  # faces on 4 and 5 with a third vertex are degenerate
    faces = rng.integers(0, 12, size=(40, 3))
    degenerate, non_manifold = transfer.mesh_defects(vertices, faces)
    assert (degenerate, non_manifold) == _mesh_defects_naive(vertices, faces)
    assert degenerate > 0 and non_manifold > 0


# ---------------------------------------------------------------------------------------------------
# Batch forms
# ---------------------------------------------------------------------------------------------------

def test_pairs_list_resolves_against_its_folder(checkpoints, tmp_path, monkeypatch, capsys):
    write_ellipsoid(tmp_path / "meshes" / "a.obj", 0, 1, subdivisions=2)
    write_ellipsoid(tmp_path / "meshes" / "b.ply", 1, 2, subdivisions=1)
    pairs = tmp_path / "lists" / "pairs.txt"
    pairs.parent.mkdir()
    pairs.write_text("../meshes/a.obj ../meshes/b.ply out/a_b.obj\n\n"
                     f"{tmp_path / 'meshes' / 'b.ply'}  ../meshes/a.obj   out/b_a.ply\n")
    monkeypatch.chdir(tmp_path / "meshes")  # the current folder plays no part
    written = run_transfer(common_args(checkpoints, "--pairs", str(pairs), "--render_dir", str(tmp_path / "r")))
    assert written == [pairs.parent / "out" / "a_b.obj", pairs.parent / "out" / "b_a.ply"]
    assert len(read_mesh(written[0])[0]) == 162 and len(read_mesh(written[1])[0]) == 42
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["a_b.png", "b_a.png"]
    assert capsys.readouterr().out.count("wrote") == 2


def test_folders_give_every_identity_in_every_pose(checkpoints, tmp_path):
    write_ellipsoid(tmp_path / "ids" / "tall.obj", 0, 0, subdivisions=2)
    write_ellipsoid(tmp_path / "ids" / "wide.off", 2, 1, subdivisions=1)
    write_ellipsoid(tmp_path / "poses" / "bent.ply", 1, 3, subdivisions=1)
    # STL is read (a pose's vertex order does not matter) though write_mesh refuses it: trimesh writes it here.
    trimesh.Trimesh(*posed_ellipsoid(1, 2, subdivisions=2), process=False).export(tmp_path / "poses" / "twisted.stl")
    (tmp_path / "poses" / "notes.txt").write_text("not a mesh")
    written = run_transfer(common_args(checkpoints, "--identity_dir", str(tmp_path / "ids"), "--pose_dir",
                                       str(tmp_path / "poses"), "--out_dir", str(tmp_path / "out")))
    assert [p.name for p in written] == ["tall_in_bent.obj", "tall_in_twisted.obj", "wide_in_bent.obj",
                                         "wide_in_twisted.obj"]
    for path in written:
        identity = tmp_path / "ids" / next(p.name for p in (tmp_path / "ids").iterdir()
                                           if p.stem == path.stem.split("_in_")[0])
        np.testing.assert_array_equal(read_mesh(path)[1], read_mesh(identity)[1])


# ---------------------------------------------------------------------------------------------------
# Bad input: one 'error:' line, exit status 2, nothing written
# ---------------------------------------------------------------------------------------------------

def cli(args: list[str], capsys, monkeypatch, through: str = "process") -> list[str]:
    """Run transfer.py's command line in this process (run_main, as its __main__ guard does) or as a
    subprocess in the current folder; check exit status 2 and one last 'error:' line; return stderr's lines."""
    monkeypatch.delenv("CORENET_TRACEBACK", raising=False)
    if through == "subprocess":
        result = run_script("transfer.py", *args)
        status, stderr = result.returncode, result.stderr
    else:
        with pytest.raises(SystemExit) as exit_info:
            run_main(lambda: transfer.main(parse(TransferOptions, args, script="transfer.py")))
        status, stderr = exit_info.value.code, capsys.readouterr().err
    return assert_one_line_error(status, stderr)


def _input_text(role: str, name: str, text: str):
    """A setup that replaces the identity or pose mesh by a file holding text."""
    def setup(pair, checkpoints, tmp_path):
        (tmp_path / name).write_text(text)
        pair[role] = tmp_path / name
        return checkpoints
    return setup


def _pose_with_two_vertices(pair, checkpoints, tmp_path):
    pair["pose"] = tmp_path / "pose2.obj"
    write_mesh(pair["pose"], np.array([[0, 0, 0], [1, 1, 1]], np.float32), np.array([[0, 1, 1]]))
    return checkpoints


def _checkpoint_saying(key: str, value: str):
    def setup(pair, checkpoints, tmp_path):
        copy = tmp_path / "ckpt"
        shutil.copytree(checkpoints, copy)
        for name in ("opt.json", "data_stats.json"):
            path = copy / "human" / name
            path.write_text(json.dumps({**json.loads(path.read_text()), key: value}))
        return copy
    return setup


def _checkpoint_without_stats(pair, checkpoints, tmp_path):
    copy = tmp_path / "ckpt"
    shutil.copytree(checkpoints, copy)
    (copy / "human" / "data_stats.json").unlink()
    return copy


def _unchanged(pair, checkpoints, tmp_path):
    return checkpoints


def _checkpoint_with_nan_weight(pair, checkpoints, tmp_path):
    copy = tmp_path / "ckpt"
    shutil.copytree(checkpoints, copy)
    state = torch.load(copy / "human" / "latest_net_G.pth", weights_only=True)
    state["fc.weight"][0, 0, 0] = float("nan")
    torch.save(state, copy / "human" / "latest_net_G.pth")
    return copy


BAD_INPUTS = {
    "unreadable mesh": (_input_text("identity", "identity.ply", "ply\nformat binary\x01 garbage"), [],
                        "could not be read"),
    "empty mesh": (_input_text("pose", "empty.obj", ""), [], "holds no vertices"),
    "pose with two vertices": (_pose_with_two_vertices, [], "has 2 vertices; at least 3"),
    "NaN coordinates": (_input_text("pose", "nan.obj", "v nan 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n"), [], "non-finite"),
    "missing mesh": (_unchanged, ["--pose", "absent.obj"], "absent.obj does not exist"),
    "checkpoint of the animal set": (_checkpoint_saying("dataset_mode", "animal"), [], "dataset_mode 'animal'"),
    "checkpoint of another model": (_checkpoint_saying("model", "npt"), [], "model 'npt'"),
    "missing checkpoint": (_unchanged, ["--which_epoch", "77"], "77_net_G.pth does not exist"),
    "rescale without data_stats.json": (_checkpoint_without_stats, ["--rescale"], "--rescale needs"),
    "render not png": (_unchanged, ["--render", "out.jpg"], "must end in .png"),
    "0-based OBJ": (_input_text("identity", "zero.obj", "v 0 0 0\nv 1 0 0\nv 0 1 0\nf 0 1 2\n"), [],
                    "face index 0"),
    "coordinates beyond float32": (_input_text("pose", "huge.obj", "v 0 0 0\nv 1e39 0 0\nv 0 1 0\nf 1 2 3\n"), [],
                                   "float32's range"),
    "checkpoint with a NaN weight": (_checkpoint_with_nan_weight, [], "holds NaN or inf values"),
    # Finite in float32, but a variance of the first layer's output would overflow and the output mean nothing.
    "coordinates too large for the model": (_input_text("pose", "vast.obj", "v 0 0 0\nv 1e30 0 0\nv 0 1 0\nf 1 2 3\n"),
                                            [], "too large for the model's float32 arithmetic"),
}


@pytest.mark.parametrize("through", ["process", pytest.param("subprocess", marks=pytest.mark.slow)])
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gives_one_error_line_and_writes_nothing(case, through, checkpoints, pair, tmp_path, capsys,
                                                           monkeypatch):
    setup, extra, fragment = BAD_INPUTS[case]
    monkeypatch.chdir(tmp_path)
    used_checkpoints = setup(pair, checkpoints, tmp_path)
    lines = cli(common_args(used_checkpoints, *pair_args(pair), *extra), capsys, monkeypatch, through)
    assert fragment in lines[-1], lines[-1]
    assert not pair["out"].exists() and not list(tmp_path.glob("*.png"))


def test_existing_output_is_refused_and_kept(checkpoints, pair, capsys, monkeypatch):
    pair["out"].write_text("keep me")
    lines = cli(common_args(checkpoints, *pair_args(pair)), capsys, monkeypatch)
    assert "out.obj exists" in lines[-1] and "--overwrite" in lines[-1]
    assert pair["out"].read_text() == "keep me"
    run_transfer(common_args(checkpoints, *pair_args(pair, "--overwrite")))
    assert len(read_mesh(pair["out"])[0]) == 162


def test_batch_checks_every_output_and_input_before_writing(checkpoints, tmp_path, capsys, monkeypatch):
    write_ellipsoid(tmp_path / "a.obj", 0, 1, subdivisions=2)
    write_ellipsoid(tmp_path / "b.obj", 1, 2, subdivisions=1)
    (tmp_path / "nan.obj").write_text("v nan 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n")
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("a.obj b.obj first.obj\na.obj b.obj second.obj\n")
    (tmp_path / "second.obj").write_text("keep me")
    assert "second.obj exists" in cli(common_args(checkpoints, "--pairs", str(pairs)), capsys, monkeypatch)[-1]
    pairs.write_text("a.obj b.obj first.obj\na.obj nan.obj third.obj\n")
    assert "non-finite" in cli(common_args(checkpoints, "--pairs", str(pairs)), capsys, monkeypatch)[-1]
    pairs.write_text("a.obj b.obj first.obj\nb.obj a.obj first.obj\n")
    assert "written by 2 pairs" in cli(common_args(checkpoints, "--pairs", str(pairs)), capsys, monkeypatch)[-1]
    pairs.write_text("a.obj b.obj first.obj\na.obj b.obj\n")
    assert "line 2 has 2 names" in cli(common_args(checkpoints, "--pairs", str(pairs)), capsys, monkeypatch)[-1]
    pairs.write_bytes(b"\xff\xfe\x00binary")
    assert "is not a text file" in cli(common_args(checkpoints, "--pairs", str(pairs)), capsys, monkeypatch)[-1]
    assert "is a folder" in cli(common_args(checkpoints, "--pairs", str(tmp_path)), capsys, monkeypatch)[-1]
    assert not (tmp_path / "first.obj").exists() and not (tmp_path / "third.obj").exists()
    assert (tmp_path / "second.obj").read_text() == "keep me"


@pytest.mark.parametrize("args, message", [
    (["--identity", "a.obj", "--pose", "b.obj"], "--out is missing"),
    (["--identity_dir", "i", "--out_dir", "o"], "--pose_dir is missing"),
    ([], "nothing to transfer"),
    (["--identity", "a.obj", "--pose", "b.obj", "--out", "c.obj", "--pairs", "p.txt"], "not both"),
    (["--pairs", "p.txt", "--render", "x.png"], "for a batch use --render_dir"),
    (["--identity", "a.obj", "--pose", "b.obj", "--out", "c.obj", "--render_dir", "r"], "single pair use --render"),
    (["--identity", "a.obj", "--pose", "b.obj", "--out", "c.xyz"], "must end in one of .obj"),
    (["--identity", "a.obj", "--pose", "b.obj", "--out", "c.stl"], "must end in one of .obj, .ply, .off, .glb$"),
])
def test_option_combinations_are_validated(args, message):
    with pytest.raises(ValueError, match=message):
        parse(TransferOptions, ["--gpu_ids", "-1", *args])


def test_command_line_refuses_existing_output(checkpoints, pair, capsys, monkeypatch):
    """The script itself, through its __main__ guard (the other bad inputs run this way under -m slow)."""
    pair["out"].write_text("keep me")
    lines = cli(common_args(checkpoints, *pair_args(pair)), capsys, monkeypatch, "subprocess")
    assert lines == [f"error: output {pair['out']} exists; nothing was written, pass --overwrite to replace "
                     f"existing outputs"]
    assert pair["out"].read_text() == "keep me"


def test_render_folder_that_is_a_file_is_refused_before_any_output(checkpoints, tmp_path, capsys, monkeypatch):
    write_ellipsoid(tmp_path / "a.obj", 0, 1, subdivisions=2)
    write_ellipsoid(tmp_path / "b.obj", 1, 2, subdivisions=1)
    (tmp_path / "pairs.txt").write_text("a.obj b.obj first.obj\n")
    lines = cli(common_args(checkpoints, "--pairs", str(tmp_path / "pairs.txt"), "--render_dir",
                            str(tmp_path / "a.obj")), capsys, monkeypatch)
    assert f"{tmp_path / 'a.obj'} is a file, not a folder; nothing was written" in lines[-1]
    assert not (tmp_path / "first.obj").exists()
    lines = cli(common_args(checkpoints, "--identity", str(tmp_path / "a.obj"), "--pose", str(tmp_path / "b.obj"),
                            "--out", str(tmp_path / "one.obj"), "--render", str(tmp_path / "a.obj" / "x.png")),
                capsys, monkeypatch)
    assert "is a file, not a folder" in lines[-1] and not (tmp_path / "one.obj").exists()


def test_non_finite_output_is_not_written(checkpoints, pair, capsys, monkeypatch):
    def nan_pair(*args):
        return {"fake_points": np.full((162, 3), np.nan)}
    monkeypatch.setattr(transfer, "transfer_pair", nan_pair)
    lines = cli(common_args(checkpoints, *pair_args(pair)), capsys, monkeypatch)
    assert f"the output for identity {pair['identity']} in the pose of {pair['pose']} is not finite" in lines[-1]
    assert "scale them to the training meshes' size (--rescale)" in lines[-1]
    assert not pair["out"].exists()
