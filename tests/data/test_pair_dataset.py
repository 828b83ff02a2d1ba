"""Tests for data/pair_dataset.py and data/__init__.py on small meshes written to tmp_path.

Each sample is checked against the definition: the files read back, centred by their bounding box in
NumPy, and the permutation recovered from the coordinates (every vertex is distinct).
"""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from data import DATASETS, create_dataloader, pair_dataset
from util.mesh_io import read_mesh, write_mesh

NUM_VERTICES = 30
NUM_FACES = 20
IDENTITIES = {"human": [0, 1, 2], "animal": [21, 0, 5]}
POSES = {"human": [200, 201, 202], "animal": [0, 1, 399]}
POINT_KEYS = ("identity_points", "pose_points", "gt_points", "identity_faces", "pose_faces")
NAME_KEYS = ("identity_name", "pose_name", "gt_name")


def _write_meshes(root, layout, identities, poses) -> dict[str, tuple[int, int]]:
    """Write one mesh per (identity, pose): faces fixed per identity, random distinct vertices per file."""
    names = {}
    for identity in identities:
        faces = np.random.default_rng(identity).integers(NUM_VERTICES, size=(NUM_FACES, 3))
        for pose in poses:
            vertices = np.random.default_rng([identity, pose]).normal(size=(NUM_VERTICES, 3)) + [1.0, -2.0, 3.0]
            name = layout.file_name(identity, pose)
            write_mesh(root / name, vertices, faces)
            names[name] = (identity, pose)
    return names


def _centred_file(path) -> tuple[np.ndarray, np.ndarray]:
    vertices, faces = read_mesh(path)
    return vertices - (vertices.min(0) + vertices.max(0)) / 2, faces


def _recover_permutation(points: torch.Tensor, reference: np.ndarray) -> np.ndarray:
    """The order that takes the reference rows to the sample rows, found by nearest coordinates."""
    distances = np.linalg.norm(points.numpy()[:, None, :] - reference[None, :, :], axis=-1)  # (V, V)
    permutation = distances.argmin(1)
    assert sorted(permutation.tolist()) == list(range(len(reference))), "sample rows are not the file's rows"
    return permutation


def _check_sample(sample: dict, root, shuffled: bool) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Assert the sample is the three files centred, identity and ground truth under one permutation.

    Returns the identity and pose permutations that were found.
    """
    identity, identity_faces = _centred_file(root / sample["identity_name"])
    pose, pose_faces = _centred_file(root / sample["pose_name"])
    gt, _ = _centred_file(root / sample["gt_name"])
    for key in POINT_KEYS:
        expected_dtype = torch.int64 if key.endswith("faces") else torch.float32
        assert sample[key].dtype == expected_dtype and sample[key].dim() == 2 and sample[key].shape[1] == 3, key
    assert sample["identity_points"].shape == sample["gt_points"].shape == (NUM_VERTICES, 3)
    assert sample["identity_faces"].shape == sample["pose_faces"].shape == (NUM_FACES, 3)
    identity_order = _recover_permutation(sample["identity_points"], identity)
    pose_order = _recover_permutation(sample["pose_points"], pose)
    torch.testing.assert_close(sample["identity_points"], torch.from_numpy(identity[identity_order]))
    torch.testing.assert_close(sample["gt_points"], torch.from_numpy(gt[identity_order]))
    torch.testing.assert_close(sample["pose_points"], torch.from_numpy(pose[pose_order]))
    # The re-indexed faces pick out the same triangles, corner by corner.
    for points, faces, reference, reference_faces in (
        (sample["identity_points"], sample["identity_faces"], identity, identity_faces),
        (sample["pose_points"], sample["pose_faces"], pose, pose_faces),
    ):
        torch.testing.assert_close(points[faces], torch.from_numpy(reference[reference_faces]))  # (F, 3, 3)
    file_order = np.arange(NUM_VERTICES)
    assert np.array_equal(identity_order, file_order) != shuffled
    assert np.array_equal(pose_order, file_order) != shuffled
    return tuple(identity_order.tolist()), tuple(pose_order.tolist())


def _same_sample(sample: dict, other: dict) -> bool:
    return all(sample[key] == other[key] for key in NAME_KEYS) and all(
        torch.equal(sample[key], other[key]) for key in POINT_KEYS)


def _assert_same_samples(first: list[dict], second: list[dict]) -> None:
    assert len(first) == len(second)
    assert all(_same_sample(sample, other) for sample, other in zip(first, second))


@pytest.fixture(params=["human", "animal"])
def mesh_root(request, tmp_path):
    """A dataroot holding a 3 x 3 grid of meshes of one layout; yields (root, layout, names)."""
    layout = DATASETS[request.param]
    names = _write_meshes(tmp_path, layout, IDENTITIES[request.param], POSES[request.param])
    return tmp_path, layout, names


def _train_dataset(mesh_root, epoch_size=8, seed=0, shuffle_points=True):
    root, layout, _ = mesh_root
    return pair_dataset.TrainPairDataset(
        root, layout, IDENTITIES[layout.name], POSES[layout.name], epoch_size, seed, shuffle_points)


def _write_test_list(path, lines: list[str]):
    path.write_text("\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------------------------------------------
# Layouts and training samples
# ---------------------------------------------------------------------------------------------------

def test_layouts_hold_published_values():
    human, animal = DATASETS["human"], DATASETS["animal"]
    assert human.file_name(3, 250) == "id3_250.obj" and animal.file_name(21, 7) == "toy_21_7.ply"
    assert human.train_identities == tuple(range(15)) and human.train_poses == tuple(range(200, 600))
    assert animal.train_identities == (*range(16), 21, 23, 24, 26, 27, 28, 29, 30, 31, 34, 35, 38, 39)
    assert animal.train_poses == tuple(range(400))
    assert (human.epoch_size, animal.epoch_size) == (4000, 11600)


def test_train_samples_follow_published_sampling(mesh_root):
    root, layout, names = mesh_root
    dataset = _train_dataset(mesh_root, epoch_size=24)
    assert len(dataset) == 24 and dataset.num_vertices == NUM_VERTICES
    drawn_identities, drawn_poses, permutations = set(), set(), []
    for index in range(len(dataset)):
        sample = dataset[index]
        permutations.extend(_check_sample(sample, root, shuffled=True))
        i, p1 = names[sample["identity_name"]]
        j, p2 = names[sample["pose_name"]]
        assert names[sample["gt_name"]] == (i, p2), "ground truth must be the identity in the pose mesh's pose"
        drawn_identities.update((i, j))
        drawn_poses.update((p1, p2))
    assert drawn_identities == set(IDENTITIES[layout.name]) and drawn_poses == set(POSES[layout.name])
    assert len(set(permutations)) == len(permutations), "every item and mesh needs its own permutation"


def test_train_samples_keep_file_order_without_shuffle(mesh_root):
    root, _, _ = mesh_root
    for index in range(4):
        _check_sample(_train_dataset(mesh_root, shuffle_points=False)[index], root, shuffled=False)


def test_train_samples_are_reproducible(mesh_root):
    dataset, again = _train_dataset(mesh_root), _train_dataset(mesh_root)
    samples = [dataset[index] for index in range(len(dataset))]
    _assert_same_samples(samples, [again[index] for index in range(len(again))])
    assert not _same_sample(samples[0], samples[1])
    other_seed = _train_dataset(mesh_root, seed=1)
    assert not any(_same_sample(sample, other_seed[index]) for index, sample in enumerate(samples))


def test_set_epoch_changes_draws(mesh_root):
    dataset = _train_dataset(mesh_root)
    epoch_zero = [dataset[index] for index in range(len(dataset))]
    dataset.set_epoch(1)
    assert not any(_same_sample(sample, dataset[index]) for index, sample in enumerate(epoch_zero))
    dataset.set_epoch(0)
    _assert_same_samples(epoch_zero, [dataset[index] for index in range(len(dataset))])
    with pytest.raises(ValueError, match="epoch must be non-negative"):
        dataset.set_epoch(-1)


def test_train_index_out_of_range(mesh_root):
    with pytest.raises(IndexError, match="index 8"):
        _train_dataset(mesh_root)[8]


# ---------------------------------------------------------------------------------------------------
# Loaders
# ---------------------------------------------------------------------------------------------------

def test_loader_batches_do_not_depend_on_worker_count(mesh_root):
    dataset = _train_dataset(mesh_root, epoch_size=6)
    dataset.set_epoch(3)
    batches = {
        workers: list(create_dataloader(dataset, 3, workers, shuffle=False, distributed=False, drop_last=False))
        for workers in (0, 2)
    }
    assert batches[0][0]["identity_points"].shape == (3, NUM_VERTICES, 3)
    assert batches[0][0]["identity_faces"].shape == (3, NUM_FACES, 3)
    _assert_same_samples(batches[0], batches[2])
    expected = [dataset[index] for index in range(len(dataset))]
    for batch_index, batch in enumerate(batches[0]):
        for row in range(3):
            assert _same_sample({key: value[row] for key, value in batch.items()}, expected[3 * batch_index + row])


@pytest.fixture
def two_ranks(monkeypatch):
    """Pretend to be in a process group of two; returns a function that selects this process's rank."""
    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)

    def set_rank(rank: int) -> None:
        monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: rank)

    return set_rank


@pytest.mark.parametrize("shuffle", [True, False])
def test_distributed_loader_splits_disjointly(mesh_root, two_ranks, shuffle):
    dataset = _train_dataset(mesh_root, epoch_size=10)
    shares = []
    for rank in (0, 1):
        two_ranks(rank)
        loader = create_dataloader(dataset, 5, 0, shuffle=shuffle, distributed=True, drop_last=False)
        assert isinstance(loader.sampler, DistributedSampler) == shuffle
        indices = list(loader.sampler)
        (batch,) = list(loader)
        assert batch["identity_name"] == [dataset[index]["identity_name"] for index in indices]
        shares.append(set(indices))
    assert shares[0].isdisjoint(shares[1]) and shares[0] | shares[1] == set(range(10))


@pytest.mark.parametrize("distributed", [False, True])
def test_start_batch_skips_into_the_same_order(mesh_root, two_ranks, distributed):
    dataset = _train_dataset(mesh_root, epoch_size=10)
    two_ranks(1)
    full = list(create_dataloader(dataset, 2, 0, distributed=distributed))
    resumed = list(create_dataloader(dataset, 2, 0, distributed=distributed, start_batch=2))
    assert len(full) == (3 if distributed else 5)
    _assert_same_samples(resumed, full[2:])
    with pytest.raises(ValueError, match="needs shuffle=False"):
        create_dataloader(dataset, 2, 0, shuffle=True, distributed=distributed, start_batch=1)
    with pytest.raises(ValueError, match="non-negative"):
        create_dataloader(dataset, 2, 0, distributed=distributed, start_batch=-1)


# ---------------------------------------------------------------------------------------------------
# Test lists
# ---------------------------------------------------------------------------------------------------

def _test_lines(names: dict[str, tuple[int, int]]) -> list[str]:
    """Lines "identity pose ground-truth" over the written grid, with the published pairing."""
    by_key = {key: name for name, key in names.items()}
    keys = sorted(by_key)
    lines = []
    for (i, p1), (j, p2) in zip(keys, reversed(keys)):
        lines.append(f"{by_key[(i, p1)]} {by_key[(j, p2)]}  {by_key[(i, p2)]}")
    return lines


def test_test_list_samples(mesh_root, tmp_path):
    root, _, names = mesh_root
    lines = _test_lines(names)
    test_list = _write_test_list(tmp_path / "test_list", lines[:2] + ["", "   "] + lines[2:])
    dataset = pair_dataset.TestPairDataset(root, test_list, seed=5)
    assert len(dataset) == len(lines)
    samples = [dataset[index] for index in range(len(dataset))]
    permutations = []
    for sample, line in zip(samples, lines):
        assert [sample[key] for key in NAME_KEYS] == line.split()
        permutations.extend(_check_sample(sample, root, shuffled=True))
    assert len(set(permutations)) == len(permutations), "every item and mesh needs its own permutation"
    again = pair_dataset.TestPairDataset(root, test_list, seed=5)
    _assert_same_samples(samples, [again[index] for index in range(len(again))])
    unshuffled = pair_dataset.TestPairDataset(root, test_list, seed=5, shuffle_points=False)
    _check_sample(unshuffled[0], root, shuffled=False)


# ---------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------

def test_missing_dataroot(tmp_path):
    absent = tmp_path / "absent"
    message = re.escape(f"dataroot {absent} does not exist; pass --dataroot")
    with pytest.raises(FileNotFoundError, match=message):
        pair_dataset.TrainPairDataset(absent, DATASETS["human"], [0], [200], 4, seed=0)
    with pytest.raises(FileNotFoundError, match=message):
        pair_dataset.TestPairDataset(absent, tmp_path / "list", seed=0)


def test_missing_file_in_range(mesh_root):
    root, layout, names = mesh_root
    first_missing = layout.file_name(IDENTITIES[layout.name][1], POSES[layout.name][0])
    second_missing = list(names)[-1]
    (root / second_missing).unlink()
    (root / first_missing).unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(f"{root / first_missing} does not exist; 2 of the 9")):
        _train_dataset(mesh_root)


@pytest.mark.parametrize(
    "identities, poses, epoch_size, seed, message",
    [([], [200], 4, 0, "at least one identity"), ([0], [200], 0, 0, "epoch_size"), ([0], [200], 4, -1, "seed")],
)
def test_bad_train_arguments(tmp_path, identities, poses, epoch_size, seed, message):
    _write_meshes(tmp_path, DATASETS["human"], [0], [200])
    with pytest.raises(ValueError, match=message):
        pair_dataset.TrainPairDataset(tmp_path, DATASETS["human"], identities, poses, epoch_size, seed)


@pytest.fixture
def human_root(tmp_path):
    """A human-layout dataroot with identity 0 in poses 200 and 201; yields (root, [both names])."""
    root = tmp_path / "meshes"
    names = list(_write_meshes(root, DATASETS["human"], [0], [200, 201]))
    return root, names


@pytest.mark.parametrize("line", ["id0_200.obj id0_201.obj", "id0_200.obj id0_201.obj id0_201.obj id0_200.obj"])
def test_test_list_line_with_wrong_name_count(human_root, line):
    root, _ = human_root
    test_list = _write_test_list(root.parent / "list", ["id0_200.obj id0_201.obj id0_201.obj", "", line])
    count = len(line.split())
    message = re.escape(f"test list {test_list} line 3 has {count} names; each line needs 'identity pose ground-truth'")
    with pytest.raises(ValueError, match=message):
        pair_dataset.TestPairDataset(root, test_list, seed=0)


def test_test_list_names_missing_file(human_root):
    root, _ = human_root
    lines = ["id0_200.obj id0_201.obj id0_201.obj", "id0_200.obj id9_9.obj id0_200.obj"]
    test_list = _write_test_list(root.parent / "list", lines)
    message = re.escape(f"{root / 'id9_9.obj'} named on line 2 of test list {test_list}")
    with pytest.raises(FileNotFoundError, match=message):
        pair_dataset.TestPairDataset(root, test_list, seed=0)


def test_test_list_missing_or_empty(human_root):
    root, _ = human_root
    with pytest.raises(FileNotFoundError, match="test list .* does not exist"):
        pair_dataset.TestPairDataset(root, root.parent / "absent_list", seed=0)
    with pytest.raises(ValueError, match="has no lines"):
        pair_dataset.TestPairDataset(root, _write_test_list(root.parent / "list", ["", " "]), seed=0)


def _bad_mesh_dataset(root, bad_name: str, bad_text: str | None = None, bad_vertices: int | None = None):
    """A one-line test list whose ground truth is bad_name, written as bad_text or with bad_vertices."""
    if bad_text is not None:
        (root / bad_name).write_text(bad_text)
    else:
        write_mesh(root / bad_name, np.random.default_rng(0).normal(size=(bad_vertices, 3)), [[0, 1, 2]])
    test_list = _write_test_list(root.parent / "list", [f"id0_200.obj id0_201.obj {bad_name}"])
    return pair_dataset.TestPairDataset(root, test_list, seed=0)


def test_identity_and_ground_truth_vertex_counts_must_match(human_root):
    root, _ = human_root
    dataset = _bad_mesh_dataset(root, "id0_202.obj", bad_vertices=NUM_VERTICES + 1)
    message = re.escape(
        f"identity mesh {root / 'id0_200.obj'} has {NUM_VERTICES} vertices, ground-truth mesh "
        f"{root / 'id0_202.obj'} has {NUM_VERTICES + 1}; they must match")
    with pytest.raises(ValueError, match=message):
        dataset[0]


@pytest.mark.parametrize(
    "text, message", [("", "holds no vertices"), ("v 0 0 0\nv nan 1 2\nv 1 1 1\nf 1 2 3\n", "non-finite")]
)
def test_bad_mesh_file(human_root, text, message):
    root, _ = human_root
    dataset = _bad_mesh_dataset(root, "id0_202.obj", bad_text=text)
    with pytest.raises(ValueError, match=rf"id0_202\.obj .*{message}"):
        dataset[0]


def test_meshes_of_different_sizes_in_one_batch_are_named(human_root):
    root, _ = human_root
    write_mesh(root / "small.obj", np.random.default_rng(1).normal(size=(12, 3)), np.array([[0, 1, 2]]))
    test_list = _write_test_list(root.parent / "list", ["id0_200.obj id0_201.obj id0_201.obj",
                                                        "id0_200.obj small.obj id0_201.obj"])
    dataset = pair_dataset.TestPairDataset(root, test_list, seed=0)
    with pytest.raises(ValueError, match="id0_201.obj, small.obj have different sizes .*use --batchSize 1"):
        next(iter(create_dataloader(dataset, batch_size=2, num_workers=0)))
    assert len(list(create_dataloader(dataset, batch_size=1, num_workers=0))) == 2
