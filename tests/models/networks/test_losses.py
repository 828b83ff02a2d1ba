"""Losses: the batched edge loss equals the per-sample, per-face definition; reconstruction is the MSE."""
import itertools
import math

import pytest
import torch

from models.networks.losses import edge_loss, reconstruction_loss


def edge_loss_naive(fake, identity, faces):
    """SPEC.md's definition, one sample and one face at a time."""
    per_sample = []
    for b in range(fake.shape[0]):
        total = 0.0
        for a, c, d in faces[b].tolist():
            for u, v in ((a, c), (c, d), (a, d)):
                total += abs(math.dist(fake[b, u].tolist(), fake[b, v].tolist())
                             / math.dist(identity[b, u].tolist(), identity[b, v].tolist()) - 1)
        per_sample.append(total / faces.shape[1])
    return sum(per_sample) / len(per_sample)


@pytest.mark.parametrize("batch, vertices, faces", list(itertools.product([1, 3], [5, 17], [1, 12])))
def test_edge_loss_matches_the_per_face_definition(batch, vertices, faces):
    generator = torch.Generator().manual_seed(batch * 100 + vertices + faces)
    fake = torch.randn(batch, vertices, 3, dtype=torch.float64, generator=generator)
    identity = torch.randn(batch, vertices, 3, dtype=torch.float64, generator=generator)
    face_index = torch.stack([torch.stack([torch.randperm(vertices, generator=generator)[:3] for _ in range(faces)])
                              for _ in range(batch)])
    assert edge_loss(fake, identity, face_index).item() == pytest.approx(edge_loss_naive(fake, identity, face_index),
                                                                         rel=1e-12)


def test_edge_loss_is_zero_for_a_rigid_motion():
    identity = torch.randn(2, 10, 3, dtype=torch.float64)
    rotation = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))[0]
    faces = torch.tensor([[[0, 1, 2], [3, 4, 5], [6, 7, 8]]]).expand(2, -1, -1)
    assert edge_loss(identity @ rotation.T + 1.5, identity, faces).item() == pytest.approx(0, abs=1e-12)


def test_reconstruction_is_mean_squared_error():
    fake, gt = torch.randn(2, 7, 3), torch.randn(2, 7, 3)
    assert reconstruction_loss(fake, gt).item() == pytest.approx(((fake - gt) ** 2).sum().item() / 42, rel=1e-6)
