"""Tests for data/generate.py: splits, test lists, and small generated sets checked file by file.

The sets are 2 identities x 4 poses of Anny, resampled to 500 vertices to keep them quick; the ground
truth is recomputed from the source itself.
"""
from __future__ import annotations

import io
import itertools
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh

from data import DATASETS
from data.generate import PUBLISHED_SPLITS, _template_resampling, main, make_split, make_test_list
from data.sources import AnnySource
from data.split import read_split_file
from tests.cli import run_script
from util.mesh_io import read_mesh, write_mesh

# Two chunks of 4, so that the writer processes take part.
SMALL = ["--identities", "2", "--poses", "4", "--vertices", "500", "--seed", "3", "--batch_size", "4"]


def _contents(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def _mtimes(folder: Path) -> dict[str, int]:
    return {path.name: path.stat().st_mtime_ns for path in folder.iterdir()}


def _age(folder: Path) -> None:
    """Date every file back an hour, so that a rewrite shows in its mtime whatever the clock's resolution."""
    for path in folder.iterdir():
        stamp = path.stat().st_mtime_ns - 3600 * 10**9
        os.utime(path, ns=(stamp, stamp))


@pytest.fixture(scope="module")
def anny_set(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("anny") / "set"
    main(["--out", str(out), *SMALL])
    return out


# ----------------------------------------------------------------------------------------------------
# Splits and test lists
# ----------------------------------------------------------------------------------------------------

def test_published_counts_give_the_published_splits():
    human = make_split("human", 30, 800)
    assert human["train_identities"] == list(range(15)) and human["test_identities"] == list(range(16, 30))
    assert human["train_poses"] == list(range(200, 600)) and human["test_poses"] == list(range(600, 800))
    assert human["epoch_size"] == 4000
    animal = make_split("animal", 41, 600)
    assert animal["train_identities"] == [*range(16), 21, 23, 24, 26, 27, 28, 29, 30, 31, 34, 35, 38, 39]
    assert animal["test_identities"] == [16, 17, 18, 19, 20, 22, 25, 32, 33, 36, 37, 40]
    assert animal["train_poses"] == list(range(400)) and animal["test_poses"] == list(range(400, 600))
    assert animal["epoch_size"] == 11600


def _runs(indices: list[int]) -> int:
    """Number of maximal runs of consecutive integers, e.g. 3 for [0, 1, 2, 5, 7, 8]."""
    return sum(1 for k, index in enumerate(indices) if k == 0 or indices[k - 1] != index - 1)


@pytest.mark.parametrize("layout, identities, poses",
                         list(itertools.product(["human", "animal"], [3, 7, 30, 41, 100], [2, 5, 600, 1000])))
def test_scaled_splits_keep_the_published_proportions(layout, identities, poses):
    split = make_split(layout, identities, poses)
    published = PUBLISHED_SPLITS[layout]
    for part, count in (("identities", identities), ("poses", poses)):
        train, test = split[f"train_{part}"], split[f"test_{part}"]
        assert train and test and not set(train) & set(test) and max(train + test) < count
        for role, chosen in (("train", train), ("test", test)):
            # Each run of consecutive published indices scales to its share of the new count, +-1.
            indices = published[f"{role}_{part}"]
            expected = len(indices) * count / published[part]
            assert abs(len(chosen) - expected) <= _runs(indices), (role, part)
    pairs = len(split["train_identities"]) * len(split["train_poses"])
    published_pairs = len(published["train_identities"]) * len(published["train_poses"])
    assert split["epoch_size"] == max(1, round(published["epoch_size"] * pairs / published_pairs))


@pytest.mark.parametrize("layout, identities, poses", [("human", 1, 800), ("human", 30, 1), ("animal", 2, 600)])
def test_counts_too_small_for_a_split_are_refused(layout, identities, poses):
    with pytest.raises(ValueError, match="cannot hold a train/test split"):
        make_split(layout, identities, poses)


@pytest.mark.parametrize("identities, poses", [(30, 800), (41, 600), (3, 5)])
def test_test_list_draws_distinct_test_pairs(identities, poses):
    split = make_split("human", identities, poses)
    quadruples = make_test_list(split)
    pairs_possible = len(split["test_identities"]) ** 2 * len(split["test_poses"]) ** 2
    assert len(quadruples) == min(400, pairs_possible) and len(set(quadruples)) == len(quadruples)
    for i, j, p1, p2 in quadruples:
        assert {i, j} <= set(split["test_identities"]) and {p1, p2} <= set(split["test_poses"])
    assert make_test_list(split) == quadruples


def test_seen_poses_test_list_takes_test_identities_in_training_poses():
    split = make_split("human", 30, 800)
    quadruples = make_test_list(split, "train_poses")
    assert len(quadruples) == 400 and len(set(quadruples)) == 400
    for i, j, p1, p2 in quadruples:
        assert {i, j} <= set(split["test_identities"]) and {p1, p2} <= set(split["train_poses"])
    assert not set(split["test_identities"]) & set(split["train_identities"])


# ----------------------------------------------------------------------------------------------------
# Generated sets
# ----------------------------------------------------------------------------------------------------

def test_small_set_has_the_layout_split_and_test_list(anny_set):
    split = json.loads((anny_set / "split.json").read_text())
    assert read_split_file(anny_set)["dataset_mode"] == "human"
    assert split["identities"] == 2 and split["poses"] == 4
    names = {DATASETS["human"].file_name(i, p) for i in range(2) for p in range(4)}
    assert {path.name for path in anny_set.iterdir()} == names | {
        "split.json", "test_list", "test_list_seen_poses", "metadata.json"}
    for list_name, poses_key in (("test_list", "test_poses"), ("test_list_seen_poses", "train_poses")):
        lines = (anny_set / list_name).read_text().splitlines()
        assert lines and all(set(line.split()) <= names for line in lines)
        for line in lines:
            identity, pose, truth = (re.fullmatch(r"id(\d+)_(\d+)\.obj", name).groups() for name in line.split())
            assert truth == (identity[0], pose[1])
            assert {int(identity[1]), int(pose[1])} <= set(split[poses_key])


def test_every_mesh_shares_one_topology_of_the_requested_size(anny_set):
    split = json.loads((anny_set / "split.json").read_text())
    first_vertices, first_faces = read_mesh(anny_set / "id0_0.obj")
    assert abs(len(first_vertices) - 500) <= 2 and split["vertices"] == len(first_vertices)
    assert split["faces"] == len(first_faces)
    for path in anny_set.glob("id*.obj"):
        vertices, faces = read_mesh(path)
        np.testing.assert_array_equal(faces, first_faces)
        assert vertices.shape == first_vertices.shape


def test_ground_truth_is_identity_shape_in_pose_from_the_source(anny_set):
    metadata = json.loads((anny_set / "metadata.json").read_text())
    source = AnnySource(torch.device("cpu"))
    shapes = source.sample_identities(2, np.random.default_rng([3, 0]))
    poses = source.sample_poses(4, np.random.default_rng([3, 1]))
    np.testing.assert_array_equal(np.array(metadata["identity_shapes"]), shapes)
    np.testing.assert_array_equal(np.array(metadata["pose_parameters"]), poses)
    resampling = _template_resampling(source, 500)
    for i, p in [(0, 2), (1, 3), (1, 0)]:
        expected = resampling.apply(source.vertices(torch.as_tensor(shapes[[i]]), torch.as_tensor(poses[[p]])))[0]
        vertices, _ = read_mesh(anny_set / f"id{i}_{p}.obj")
        np.testing.assert_allclose(vertices, expected.numpy(), atol=2e-6, rtol=0)
    first = read_mesh(anny_set / "id0_0.obj")[0]
    poses_differ = [np.abs(read_mesh(anny_set / f"id0_{p}.obj")[0] - first).mean() for p in range(1, 4)]
    assert min(poses_differ) > 1e-3
    assert np.abs(read_mesh(anny_set / "id1_0.obj")[0] - first).mean() > 1e-3  # identities differ


def test_same_command_writes_byte_identical_files(anny_set, tmp_path):
    # The fixture wrote through writer processes; writing in this process must not change a byte either.
    main(["--out", str(tmp_path / "again"), *SMALL, "--workers", "0"])
    assert _contents(tmp_path / "again") == _contents(anny_set)


def test_rerun_rewrites_only_the_missing_file(anny_set, tmp_path):
    folder = tmp_path / "set"
    shutil.copytree(anny_set, folder)
    _age(folder)
    (folder / "id1_2.obj").unlink()
    (folder / ".id1_3.obj.abc123.tmp").write_text("interrupted write")
    before = _mtimes(folder)
    main(["--out", str(folder), *SMALL])
    after = _mtimes(folder)
    assert _contents(folder) == _contents(anny_set)
    rewritten = {name for name in after if after[name] != before.get(name)}
    assert rewritten == {"id1_2.obj", "metadata.json", "split.json", "test_list", "test_list_seen_poses"}


def test_folder_with_another_set_is_refused_and_kept(anny_set, tmp_path):
    folder = tmp_path / "set"
    shutil.copytree(anny_set, folder)
    before, stamps = _contents(folder), _mtimes(folder)
    other = [*SMALL[:2], "--poses", "3", *SMALL[4:]]
    with pytest.raises(ValueError, match=r"other parameters \(poses 4 -> 3\).*--overwrite"):
        main(["--out", str(folder), *other])
    assert _contents(folder) == before and _mtimes(folder) == stamps
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(anny_set / "id0_0.obj", bare)
    with pytest.raises(ValueError, match="holds meshes but no metadata.json"):
        main(["--out", str(bare), *SMALL])
    assert [path.name for path in bare.iterdir()] == ["id0_0.obj"]


def test_overwrite_replaces_the_whole_set(anny_set, tmp_path):
    folder = tmp_path / "set"
    shutil.copytree(anny_set, folder)
    (folder / "notes.txt").write_text("not ours")
    main(["--out", str(folder), "--identities", "3", "--poses", "2", "--vertices", "500", "--overwrite"])
    names = {path.name for path in folder.iterdir()}
    assert names == {f"id{i}_{p}.obj" for i in range(3) for p in range(2)} | {
        "split.json", "test_list", "test_list_seen_poses", "metadata.json", "notes.txt"}


@pytest.mark.parametrize("arguments, error, message", [
    (["--source", "smpl"], ValueError, "--source smpl needs --model_file"),
    (["--source", "smal", "--model_file", "missing.pkl"], FileNotFoundError, "--model_file missing.pkl does not exist"),
    (["--source", "anny", "--model_file", "model.pkl"], ValueError, "takes no --model_file"),
    (["--poses", "1"], ValueError, "cannot hold a train/test split"),
    (["--vertices", "-5"], ValueError, "--vertices must be at least 0"),
])
def test_bad_input_is_refused_before_anything_is_written(tmp_path, arguments, error, message):
    with pytest.raises(error, match=re.escape(message)):
        main(["--out", str(tmp_path / "set"), *arguments])
    assert not (tmp_path / "set").exists()


def test_command_line_error_is_one_line_and_exit_status_2(tmp_path):
    result = run_script("-m", "data.generate", "--out", str(tmp_path / "set"), "--identities", "1")
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1 and "split" in result.stderr
    assert not (tmp_path / "set").exists()


def test_quadruped_set_in_the_animal_layout(tmp_path):
    main(["--out", str(tmp_path), "--source", "quadruped", "--identities", "3", "--poses", "2"])
    split = read_split_file(tmp_path)
    assert split["dataset_mode"] == "animal"
    meshes = [read_mesh(tmp_path / DATASETS["animal"].file_name(i, p)) for i in range(3) for p in range(2)]
    for vertices, faces in meshes:
        np.testing.assert_array_equal(faces, meshes[0][1])
        assert vertices.shape == meshes[0][0].shape


def test_written_obj_matches_trimesh_export(tmp_path):
    """The generator relies on write_mesh's OBJ fast path producing trimesh's exact bytes."""
    rng = np.random.default_rng(0)
    for num_vertices, num_faces in [(3, 1), (50, 80)]:
        scales = 10.0 ** rng.integers(-9, 4, (num_vertices, 3))
        vertices = rng.standard_normal((num_vertices, 3)).astype(np.float32) * scales
        vertices[0, 0] = -0.0
        faces = rng.integers(0, num_vertices, (num_faces, 3))
        expected = io.BytesIO()
        trimesh.Trimesh(vertices.astype(np.float64), faces, process=False).export(expected, file_type="obj")
        write_mesh(tmp_path / "mesh.obj", vertices, faces)
        assert (tmp_path / "mesh.obj").read_bytes() == expected.getvalue()


@pytest.mark.parametrize("source, dataset_mode", [("anny", "human"), ("quadruped", "animal")])
def test_train_and_test_run_unchanged_on_a_generated_set(source, dataset_mode, anny_set, tmp_path):
    import test as test_script
    import train as train_script
    from options.base_options import parse
    from options.test_options import TestOptions
    from options.train_options import TrainOptions

    data = anny_set if source == "anny" else tmp_path / "set"
    if source == "quadruped":
        main(["--out", str(data), "--source", "quadruped", "--identities", "3", "--poses", "2"])
    common = ["--gpu_ids", "-1", "--ngf", "8", "--nThreads", "0", "--batchSize", "2", "--dataset_mode",
              dataset_mode, "--dataroot", str(data), "--checkpoints_dir", str(tmp_path / "ckpt")]
    train_script.main(parse(TrainOptions, [*common, "--niter", "1", "--niter_decay", "0", "--epoch_size", "2",
                                           "--output_dir", str(tmp_path / "out")]))
    mean_pmd = test_script.main(parse(TestOptions, [*common, "--test_list", str(data / "test_list"),
                                                    "--results_dir", str(tmp_path / "results")]))
    assert np.isfinite(mean_pmd) and mean_pmd > 0
    assert len(list((tmp_path / "results" / dataset_mode).glob("*.obj"))) > 0


def test_overwrite_removes_the_pack_of_the_replaced_set(anny_set, tmp_path, capsys):
    from data.packed import main as pack_main
    folder = Path(shutil.copytree(anny_set, tmp_path / "set"))
    pack_main(["--dataroot", str(folder), "--workers", "1"])
    main(["--out", str(folder), *SMALL])  # the same set: its pack stays
    assert (folder / "packed" / "index.json").is_file()
    capsys.readouterr()
    main(["--out", str(folder), *SMALL[:-4], "--seed", "7", "--batch_size", "4", "--overwrite"])
    assert not (folder / "packed").exists()
    assert capsys.readouterr().out.splitlines() == [
        f"removed {folder}/packed, packed from the set this run replaces; re-run python -m data.packed --dataroot "
        f"{folder} --dataset_mode human to pack the new one"]
