"""A packed set is checked when opened: refused with one line naming the file and the re-pack advice when it
was made from other mesh files than its folder holds now (stale) or when its files are damaged."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from data import DATASETS
from data.packed import PackedPairSampler, main as pack_main
from tests.cli import assert_one_line_error, run_script
from tests.tiny_data import posed_ellipsoid, write_tiny_dataset
from util.mesh_io import write_mesh

REPACK = "re-run python -m data.packed --dataroot"


def pack(root: Path) -> Path:
    pack_main(["--dataroot", str(root), "--dataset_mode", root.name, "--workers", "1"])
    return root


@pytest.fixture(scope="module")
def packed_sets(tmp_path_factory) -> dict[str, Path]:
    """A packed human (OBJ) and animal (binary PLY) set of 3 identities x 4 poses, each named by its layout."""
    base = tmp_path_factory.mktemp("packed")
    return {mode: pack(write_tiny_dataset(base / mode, mode)) for mode in ("human", "animal")}


@pytest.fixture
def human(packed_sets, tmp_path) -> Path:
    """A fresh copy of the packed human set, as `cp -r` makes it: new mtimes."""
    return Path(shutil.copytree(packed_sets["human"], tmp_path / "human", copy_function=shutil.copy))


@pytest.fixture
def animal(packed_sets, tmp_path) -> Path:
    return Path(shutil.copytree(packed_sets["animal"], tmp_path / "animal", copy_function=shutil.copy))


def open_sampler(root: Path) -> PackedPairSampler:
    return PackedPairSampler(root, DATASETS[root.name], [0, 1], [0, 1, 2], epoch_size=4, batch_size=2, seed=0,
                             device=torch.device("cpu"))


def edit_index(root: Path, **changes) -> None:
    path = root / "packed" / "index.json"
    index = json.loads(path.read_text())
    index.update(changes)
    path.write_text(json.dumps({key: value for key, value in index.items() if value is not None}))


def test_a_copied_pack_opens_and_matches_the_files(human):
    sampler = open_sampler(human)
    assert sampler.vertices.shape == (2, 3, 42, 3) and sampler.faces.dtype == torch.int64


@pytest.mark.parametrize("change, difference", [
    ("resize", "(1 file changed size)"),
    ("same_size", "(1 of 12 sampled files changed content)"),
    ("remove", "(1 file gone)"),
    ("add", "(1 file new)"),
])
def test_pack_of_other_mesh_files_is_refused(human, change, difference):
    mesh = human / "id1_2.obj"
    if change == "resize":
        write_mesh(mesh, *posed_ellipsoid(1, 9))
    elif change == "same_size":
        text = mesh.read_bytes()
        mesh.write_bytes(text.replace(b"v 0", b"v 1", 1))
    elif change == "remove":
        mesh.unlink()
    else:
        write_mesh(human / "id3_0.obj", *posed_ellipsoid(3, 0))
    with pytest.raises(ValueError) as error:
        open_sampler(human)
    assert str(error.value) == (f"{human}/packed was made from other mesh files than {human} holds now {difference}; "
                                f"{REPACK} {human} --dataset_mode human")


def test_regenerated_binary_ply_set_of_unchanged_sizes_is_refused(animal):
    layout = DATASETS["animal"]
    sizes = {path.name: path.stat().st_size for path in animal.glob("*.ply")}
    for i in range(3):
        for p in range(4):
            write_mesh(animal / layout.file_name(i, p), *posed_ellipsoid(i, p + 5))
    assert sizes == {path.name: path.stat().st_size for path in animal.glob("*.ply")}
    with pytest.raises(ValueError, match=r"other mesh files .*\(12 of 12 sampled files changed content\).*"
                                         r"--dataset_mode animal"):
        open_sampler(animal)


@pytest.mark.parametrize("mode, sizes_differ, difference", [
    ("human", True, "(8 files of the right sizes sit at other places of the identity x pose grid, as if index.json's "
                    "identities or poses were reordered)"),
    ("human", False, "(8 of 12 sampled files changed content)"),  # one size for every file: only the hashes tell
    ("animal", False, "(8 of 12 sampled files changed content)"),
])
def test_identities_reordered_in_index_json_are_refused(packed_sets, tmp_path, mode, sizes_differ, difference):
    root = Path(shutil.copytree(packed_sets[mode], tmp_path / mode))
    if sizes_differ:  # as in real OBJ sets, whose files differ in size: identity 0's files grow by a comment
        for mesh in root.glob("id0_*.obj"):
            mesh.write_bytes(b"# identity 0\n" + mesh.read_bytes())
        pack(root)
    edit_index(root, identities=[1, 0, 2])
    with pytest.raises(ValueError, match=f"other mesh files .*{re.escape(difference)}"):
        open_sampler(root)


def test_pack_without_fingerprint_opens_with_one_warning(human, capsys):
    edit_index(human, source_files=None)
    open_sampler(human)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"warning: {human}/packed predates") and REPACK in lines[0]


def _save(name: str, array_of: object):
    """A damage that saves array_of(the stored array) over packed/name."""
    def damage(folder: Path) -> None:
        np.save(folder / name, array_of(np.load(folder / name)))
    return damage


def _write(name: str, content: bytes):
    def damage(folder: Path) -> None:
        (folder / name).write_bytes(content)
    return damage


def _index(**changes):
    def damage(folder: Path) -> None:
        edit_index(folder.parent, **changes)
    return damage


def _truncate(name: str):
    def damage(folder: Path) -> None:
        path = folder / name
        path.write_bytes(path.read_bytes()[:-100])
    return damage


def _with_nan(vertices: np.ndarray) -> np.ndarray:
    vertices[1, 2, 5, 0] = np.nan
    return vertices


@pytest.mark.parametrize("damage, file, message", [
    (_write("vertices.npy", b""), "vertices.npy", "is not a readable .npy array (No data left in file)"),
    (_truncate("vertices.npy"), "vertices.npy", "is not a readable .npy array (mmap length is greater"),
    (_write("faces.npy", b"not numpy"), "faces.npy", "is not a readable .npy array"),
    (_write("index.json", b"{}"), "index.json", "lacks dataset_mode, identities, poses, num_vertices, num_faces"),
    (_write("index.json", b"[]"), "index.json", "is not a JSON object"),
    (_write("index.json", b"{'a': 1}"), "index.json", "is not valid JSON (Expecting property name"),
    (_write("index.json", b"\xff\xfe"), "index.json", "is not valid JSON"),
    (_index(identities=["0", "1", "2"]), "index.json", "has identities that are not a non-empty list"),
    (_index(poses=[0, 0, 1, 2]), "index.json", "has poses that are not a non-empty list of distinct"),
    (_index(num_vertices=True), "index.json", "has num_vertices True, not a positive integer"),
    (_index(identities=[0, 1, 2, 3]), "index.json", "has a source_files entry that does not fit 4 identities"),
    (_index(identities=[0, 1, 2, 3], source_files=None), "vertices.npy",
     "holds float32 (3, 4, 42, 3) where index.json asks for float32 (4, 4, 42, 3)"),
    (_save("vertices.npy", lambda v: v[0]), "vertices.npy", "holds float32 (4, 42, 3) where index.json asks for"),
    (_save("vertices.npy", lambda v: v.astype(np.float64)), "vertices.npy", "holds float64 (3, 4, 42, 3)"),
    (_save("faces.npy", lambda f: f.astype(np.float32)), "faces.npy", "holds float32 (80, 3) where index.json asks"),
    (_save("faces.npy", lambda f: f[:, :2]), "faces.npy", "holds int64 (80, 2)"),
    (_save("faces.npy", lambda f: np.where(f == 7, 1000000, f)), "faces.npy",
     "refers to vertices 0 to 1000000, but the meshes have 42"),
    (_save("faces.npy", lambda f: f - 1), "faces.npy", "refers to vertices -1 to 40"),
    (_save("vertices.npy", _with_nan), "vertices.npy", "holds NaN or infinite coordinates in 1 of the 6 training"),
])
def test_damaged_pack_is_refused_naming_the_file(human, damage, file, message):
    damage(human / "packed")
    with pytest.raises(ValueError) as error:
        open_sampler(human)
    text = str(error.value)
    assert text.startswith(f"{human}/packed/{file} ") and message in text, text
    assert text.endswith(f"; {REPACK} {human} --dataset_mode human") and "\n" not in text


def test_missing_array_is_named(human):
    (human / "packed" / "faces.npy").unlink()
    with pytest.raises(FileNotFoundError, match=f"faces.npy does not exist; {REPACK}"):
        open_sampler(human)


def test_train_on_a_stale_pack_is_one_line_error(human, tmp_path):
    write_mesh(human / "id0_1.obj", *posed_ellipsoid(0, 7))
    result = run_script("train.py", "--gpu_ids", "-1", "--ngf", "8", "--batchSize", "2", "--dataroot", str(human),
                        "--niter", "1", "--niter_decay", "0", "--checkpoints_dir", str(tmp_path / "ck"))
    assert_one_line_error(result.returncode, result.stderr, f"error: {human}/packed was made from other mesh files",
                          "(1 file changed size)", f"{REPACK} {human}")
