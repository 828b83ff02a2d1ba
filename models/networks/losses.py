"""Training losses of 3D-CoreNet: vertex reconstruction and the edge-length (smoothness) term.

The edge loss compares, face by face, each edge length of the output with the same edge of the identity
input: sum over a face's three edges of |L_out / L_id - 1|, mean over faces and batch (no epsilon, as
published). It runs batched on the device of its inputs.
"""
from __future__ import annotations

import torch


def reconstruction_loss(fake_points: torch.Tensor, gt_points: torch.Tensor) -> torch.Tensor:
    """Mean squared error over batch, vertices and xyz.

    Args:
        fake_points, gt_points: float (B, N, 3).
    Returns:
        scalar tensor.
    """
    return ((fake_points - gt_points) ** 2).mean()


def face_edge_lengths(points: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Lengths of the edges AB, BC, CA of every face.

    Args:
        points: float (B, N, 3).
        faces: int64 (B, F, 3), indices into each sample's points.
    Returns:
        float (B, F, 3).
    """
    batch, num_faces, _ = faces.shape
    corners = torch.gather(points, 1, faces.reshape(batch, -1, 1).expand(-1, -1, 3))  # (B, 3F, 3)
    corners = corners.reshape(batch, num_faces, 3, 3)  # (B, F, corner, xyz)
    edges = corners.roll(-1, dims=2) - corners  # (B, F, 3, 3): B-A, C-B, A-C
    return edges.norm(dim=-1)  # (B, F, 3)


def edge_loss(fake_points: torch.Tensor, identity_points: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Mean over batch and faces of sum_edges |L_fake / L_identity - 1|.

    Args:
        fake_points: float (B, N, 3), the output.
        identity_points: float (B, N, 3), the identity input (same vertex order).
        faces: int64 (B, F, 3), the identity's faces in that order.
    Returns:
        scalar tensor.
    """
    ratio = face_edge_lengths(fake_points, faces) / face_edge_lengths(identity_points, faces)  # (B, F, 3)
    return (ratio - 1).abs().sum(dim=-1).mean()


def weighted_losses(fake_points: torch.Tensor, gt_points: torch.Tensor, identity_points: torch.Tensor,
                    faces: torch.Tensor, lambda_rec: float, lambda_edge: float) -> dict[str, torch.Tensor]:
    """The named training losses, already weighted: {"rec": lambda_rec * MSE, "edge": lambda_edge * edge}.

    Args:
        fake_points, gt_points, identity_points: float (B, N, 3), one vertex order.
        faces: int64 (B, F, 3), the identity's faces in that order.
    """
    return {"rec": lambda_rec * reconstruction_loss(fake_points, gt_points),
            "edge": lambda_edge * edge_loss(fake_points, identity_points, faces)}
