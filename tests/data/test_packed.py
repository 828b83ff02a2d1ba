"""Packed data sets: exact round trip, and GPU-free pair sampling that follows the published rule."""
import json

import numpy as np
import pytest
import torch

from data import DATASETS
from data.packed import PackedPairSampler, has_packed, main as pack_main, pack_dataset
from tests.tiny_data import write_tiny_dataset
from util.mesh_io import read_mesh, write_mesh
from util.mesh_ops import center_bbox

HUMAN = DATASETS["human"]


@pytest.fixture(scope="module")
def packed_root(tmp_path_factory):
    root = write_tiny_dataset(tmp_path_factory.mktemp("packed") / "data", identities=3, poses=4)
    pack_main(["--dataroot", str(root), "--workers", "1"])
    return root


def test_pack_round_trip(packed_root):
    assert has_packed(packed_root)
    vertices = np.load(packed_root / "packed" / "vertices.npy")
    faces = np.load(packed_root / "packed" / "faces.npy")
    index = json.loads((packed_root / "packed" / "index.json").read_text())
    assert vertices.shape == (3, 4, 42, 3) and index["identities"] == [0, 1, 2] and index["poses"] == [0, 1, 2, 3]
    for i in range(3):
        for p in range(4):
            file_vertices, file_faces = read_mesh(packed_root / HUMAN.file_name(i, p))
            np.testing.assert_array_equal(vertices[i, p], file_vertices)
            np.testing.assert_array_equal(faces, file_faces)


def sampler(root, **kwargs):
    settings = dict(identities=[0, 1], poses=[0, 1, 2], epoch_size=12, batch_size=4, seed=7,
                    device=torch.device("cpu"))
    settings.update(kwargs)
    return PackedPairSampler(root, HUMAN, **settings)


def centred_file(root, name):
    vertices, faces = read_mesh(root / name)
    return center_bbox(torch.from_numpy(vertices)), torch.from_numpy(faces)


def recover_order(points, reference):
    """Index into reference of every row of points (the vertices are distinct)."""
    distances = torch.cdist(points.double(), reference.double())  # (N, N)
    order = distances.argmin(dim=1)
    assert torch.allclose(points, reference[order], atol=1e-6)
    return order


def test_batches_follow_the_published_sampling(packed_root):
    batch = sampler(packed_root).batch(epoch=1, iteration=0)
    assert batch["identity_points"].shape == (4, 42, 3) and batch["identity_faces"].shape == (4, 80, 3)
    for b in range(4):
        identity, pose, gt = batch["identity_name"][b], batch["pose_name"][b], batch["gt_name"][b]
        i, p1 = identity[2:-4].split("_")
        j, p2 = pose[2:-4].split("_")
        assert gt == HUMAN.file_name(int(i), int(p2)) and int(i) in (0, 1) and int(j) in (0, 1)
        identity_file, faces = centred_file(packed_root, identity)
        order = recover_order(batch["identity_points"][b], identity_file)
        # The ground truth shares the identity's permutation; faces are the same triangles in space.
        assert torch.allclose(batch["gt_points"][b], centred_file(packed_root, gt)[0][order], atol=1e-6)
        assert torch.equal(order[batch["identity_faces"][b]], faces)
        pose_file, pose_faces = centred_file(packed_root, pose)
        pose_order = recover_order(batch["pose_points"][b], pose_file)
        assert torch.equal(pose_order[batch["pose_faces"][b]], pose_faces)
        assert not torch.equal(order, torch.arange(42))


def test_batches_are_reproducible_and_differ_by_iteration_epoch_and_rank(packed_root):
    draw = lambda s, e, k: s.batch(e, k)["identity_points"]  # noqa: E731
    first, second = sampler(packed_root), sampler(packed_root)
    assert torch.equal(draw(first, 1, 2), draw(second, 1, 2))
    assert not torch.equal(draw(first, 1, 2), draw(first, 1, 3))
    assert not torch.equal(draw(first, 1, 2), draw(first, 2, 2))
    assert not torch.equal(draw(first, 1, 2), draw(sampler(packed_root, rank=1, world_size=2), 1, 2))
    assert len(first) == 3 and len(sampler(packed_root, world_size=2)) == 1
    assert len(list(first.epoch_batches(1, start_batch=1))) == 2


def test_no_shuffle_keeps_file_order(packed_root):
    batch = sampler(packed_root, shuffle_points=False).batch(0, 0)
    expected, faces = centred_file(packed_root, batch["identity_name"][0])
    assert torch.equal(batch["identity_points"][0], expected) and torch.equal(batch["identity_faces"][0], faces)


def test_pack_refuses_mixed_topologies_and_holes(tmp_path):
    root = write_tiny_dataset(tmp_path / "data", identities=2, poses=2)
    vertices, faces = read_mesh(root / "id1_1.obj")
    write_mesh(root / "id1_1.obj", vertices, faces[::-1].copy())
    with pytest.raises(ValueError, match="does not share the topology"):
        pack_dataset(root, HUMAN, workers=1)
    (root / "id1_1.obj").unlink()
    with pytest.raises(FileNotFoundError, match="id1_1.obj does not exist"):
        pack_dataset(root, HUMAN, workers=1)
    assert not has_packed(root)


def test_sampler_refuses_indices_outside_the_pack(packed_root):
    with pytest.raises(ValueError, match="has no identity 9"):
        sampler(packed_root, identities=[0, 9])


def test_train_uses_the_pack(packed_root, tmp_path):
    import train as train_script
    from options.base_options import parse
    from options.train_options import TrainOptions
    args = ["--gpu_ids", "-1", "--ngf", "8", "--batchSize", "2", "--dataroot", str(packed_root), "--niter", "1",
            "--niter_decay", "0", "--epoch_size", "4", "--checkpoints_dir", str(tmp_path / "ckpt"),
            "--output_dir", str(tmp_path / "out"), "--loader", "packed", "--display_freq", "2"]
    train_script.main(parse(TrainOptions, args))
    assert (tmp_path / "ckpt" / "human" / "latest_net_G.pth").is_file()
    assert len(list((tmp_path / "out" / "human").glob("*_out.obj"))) == 2
    with pytest.raises(FileNotFoundError, match="python -m data.packed"):
        train_script.main(parse(TrainOptions, [*args[:10], "--dataroot", str(tmp_path), "--loader", "packed"]))
