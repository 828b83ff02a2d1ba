"""Tests for models/npt_model.py: the PoseTransferModel interface around NPT, its checkpoint file, its
losses against their definitions, and a few optimiser steps with NPT's published settings."""
from __future__ import annotations

import pytest
import torch
import trimesh

from models.networks.npt import NPT, NPT_VARIANTS, init_npt_weights
from models.npt_model import NPTModel
from util import checkpoint


def _model(variant: str = "original", seed: int = 0, **kwargs) -> NPTModel:
    torch.manual_seed(seed)
    model = NPTModel(variant, **kwargs)
    init_npt_weights(model)
    return model


def _batch(num_pose: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    """Two samples on an icosahedron (12 vertices, 20 faces): identity, pose and a stretched ground truth."""
    sphere = trimesh.creation.icosphere(subdivisions=0)
    generator = torch.Generator().manual_seed(seed)
    vertices = torch.tensor(sphere.vertices, dtype=torch.float32)
    identity = torch.stack([vertices * torch.tensor([0.4, 0.3, 0.9]), vertices * torch.tensor([0.3, 0.3, 0.8])])
    gt = identity * torch.tensor([1.2, 0.8, 1.0]) + 0.05 * torch.randn(identity.shape, generator=generator)
    faces = torch.as_tensor(sphere.faces, dtype=torch.int64).expand(2, -1, -1)
    return {"identity_points": identity, "pose_points": torch.randn(2, num_pose, 3, generator=generator),
            "gt_points": gt, "identity_faces": faces}


def _naive_edge_loss(fake: torch.Tensor, identity: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """NPT.md: per face, sum over AB, BC, AC of |L_out / L_id - 1|; mean over faces, then over the batch."""
    per_sample = []
    for b in range(fake.shape[0]):
        per_face = []
        for a, c, d in faces[b].tolist():
            per_face.append(sum(abs((fake[b, p] - fake[b, q]).norm() / (identity[b, p] - identity[b, q]).norm() - 1)
                                for p, q in ((a, c), (c, d), (a, d))))
        per_sample.append(torch.stack(per_face).mean())
    return torch.stack(per_sample).mean()


def test_checkpoint_network_is_the_published_npt_state_dict():
    model = NPTModel()
    networks = model.checkpoint_networks()
    assert list(networks) == ["NPT"] and networks["NPT"] is model.npt
    assert networks["NPT"].state_dict().keys() == NPT().state_dict().keys()
    assert {f"npt.{key}" for key in NPT().state_dict()} == set(model.state_dict())


@pytest.mark.parametrize("variant", NPT_VARIANTS)
def test_saved_network_file_loads_back_bit_exact(variant, tmp_path):
    model = _model(variant, seed=1)
    checkpoint.save_networks(model, tmp_path, "latest")
    assert [path.name for path in tmp_path.iterdir()] == ["latest_net_NPT.pth"]
    # The file is a bare NPT state_dict, as NPT's released *.model files are.
    bare = NPT(variant)
    bare.load_state_dict(torch.load(tmp_path / "latest_net_NPT.pth", weights_only=True))
    other = _model(variant, seed=2)
    checkpoint.load_networks(other, tmp_path, "latest")
    for key, value in model.npt.state_dict().items():
        assert torch.equal(other.npt.state_dict()[key], value) and torch.equal(bare.state_dict()[key], value)


def test_unknown_variant_is_refused():
    with pytest.raises(ValueError, match="unknown NPT variant 'big'"):
        NPTModel("big")


@pytest.mark.parametrize("variant, num_pose", [("original", 12), ("maxpool", 12), ("maxpool", 5), ("maxpool", 30)])
def test_transfer_gives_identity_shaped_points_in_range(variant, num_pose):
    model = _model(variant)
    batch = _batch(num_pose)
    fake_points = model.transfer(batch["identity_points"], batch["pose_points"])["fake_points"]
    assert fake_points.shape == (2, 12, 3) and fake_points.abs().max() < 2
    # Channel-last in and out around the network's (pose, identity) channel-first order.
    expected = model.npt(batch["pose_points"].transpose(1, 2), batch["identity_points"].transpose(1, 2))
    assert torch.equal(fake_points, expected.transpose(1, 2))


@pytest.mark.parametrize("precision, dtype, bound", [("fp16", torch.float16, 3e-2), ("bf16", torch.bfloat16, 0.2)])
def test_autocast_runs_the_whole_network_and_returns_float32(precision, dtype, bound):
    batch = _batch()
    reference = _model().transfer(batch["identity_points"], batch["pose_points"])["fake_points"]
    model = _model(precision=precision)
    seen = []
    model.npt.decoder.conv4.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    fake_points = model.transfer(batch["identity_points"], batch["pose_points"])["fake_points"]
    assert seen == [dtype] and fake_points.dtype == torch.float32
    relative = ((fake_points - reference).norm() / reference.norm()).item()
    assert 0 < relative < bound  # rounded (bf16 keeps 8 bits, fp16 11), not another computation
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        NPTModel(precision="fp8")


def test_transfer_with_the_original_variant_refuses_differing_counts():
    batch = _batch(num_pose=10)
    with pytest.raises(ValueError, match="got 10 pose and 12 identity vertices; use --npt_variant maxpool"):
        NPTModel("original").transfer(batch["identity_points"], batch["pose_points"])


@pytest.mark.parametrize("variant", NPT_VARIANTS)
def test_forward_losses_match_their_definitions(variant):
    model = _model(variant, lambda_rec=2.0, lambda_edge=0.25)
    batch = _batch()
    outputs, losses = model(batch)
    fake = outputs["fake_points"].detach()
    assert torch.equal(fake, model.transfer(batch["identity_points"], batch["pose_points"])["fake_points"])
    assert set(losses) == {"rec", "edge"}
    rec = sum(float(d) ** 2 for d in (fake - batch["gt_points"]).flatten()) / fake.numel()
    torch.testing.assert_close(losses["rec"], torch.tensor(2.0 * rec), rtol=1e-5, atol=0)
    edge = _naive_edge_loss(fake, batch["identity_points"], batch["identity_faces"])
    torch.testing.assert_close(losses["edge"], 0.25 * edge, rtol=1e-5, atol=0)


def test_default_loss_weights_are_npts():
    model = _model()
    _, weighted = model(_batch())
    _, unit = _model(lambda_rec=1.0, lambda_edge=1.0)(_batch())
    torch.testing.assert_close(weighted["rec"], unit["rec"])
    torch.testing.assert_close(weighted["edge"], 0.0005 * unit["edge"])


@pytest.mark.parametrize("variant", NPT_VARIANTS)
def test_published_optimizer_settings_reduce_the_loss_on_a_fixed_batch(variant):
    assert NPTModel.OPTIMIZER == {"lr": 5e-5, "betas": (0.9, 0.999), "eps": 1e-8} and NPTModel.LR_DECAY is False
    model = _model(variant)
    optimizer = torch.optim.Adam(model.parameters(), **NPTModel.OPTIMIZER)
    batch = _batch()
    totals = []
    for _ in range(10):
        _, losses = model(batch)
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        totals.append(total.item())
    assert totals[-1] < 0.5 * totals[0], totals


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_forward_moves_a_cpu_batch_to_the_parameters_device():
    model = _model().cuda()
    outputs, losses = model(_batch())
    assert outputs["fake_points"].is_cuda and all(loss.is_cuda for loss in losses.values())
