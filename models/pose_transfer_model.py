"""PoseTransferModel: 3D-CoreNet's correspondence network and refinement generator, with their losses.

Data enters and leaves as (B, N, 3) point sets; the networks are channel-first (B, C, N) because the
published Conv1d weights require it, and `forward` is the one place that transposes between the two.
The model does no file I/O and holds no optimizer.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from models.networks import GENERATORS, Correspondence
from models.networks.correspondence import WarpFunction, dense_warp
from models.networks.losses import edge_loss, reconstruction_loss


class PoseTransferModel(nn.Module):
    """Owns `corr` (the published net_Corr) and `G` (net_G)."""

    def __init__(self, ngf: int = 64, netG: str = "elain", lambda_rec: float = 1000.0,
                 lambda_edge: float = 0.5, warp: WarpFunction = dense_warp):
        super().__init__()
        if netG not in GENERATORS:
            raise ValueError(f"unknown generator {netG!r}; choose one of {', '.join(GENERATORS)}")
        self.corr = Correspondence(ngf=ngf, warp=warp)
        self.G = GENERATORS[netG](ngf=ngf)
        self.lambda_rec = lambda_rec
        self.lambda_edge = lambda_edge

    def checkpoint_networks(self) -> dict[str, nn.Module]:
        """The published checkpoint files: <label>_net_G.pth and <label>_net_Corr.pth."""
        return {"G": self.G, "Corr": self.corr}

    def transfer(self, identity_points: torch.Tensor, pose_points: torch.Tensor) -> dict[str, torch.Tensor]:
        """Put the identity's body in the pose mesh's pose.

        Args:
            identity_points: float (B, N, 3).
            pose_points: float (B, M, 3).
        Returns:
            warp_out: float (B, N, 3), the coarse correspondence result.
            fake_points: float (B, N, 3), the refined output.
        """
        warp_out, identity_features = self.corr(identity_points.transpose(1, 2),
                                                pose_points.transpose(1, 2))  # (B, N, 3), (B, C, N)
        fake_points = self.G(warp_out.transpose(1, 2), identity_features).transpose(1, 2)  # (B, N, 3)
        return {"warp_out": warp_out, "fake_points": fake_points}

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Run a batch from the data loaders and compute the weighted training losses.

        Args:
            batch: identity_points (B, N, 3), pose_points (B, M, 3), gt_points (B, N, 3),
                identity_faces int64 (B, F, 3); moved to the parameters' device here.
        Returns:
            outputs: as `transfer` returns them.
            losses: rec and edge (already multiplied by lambda_rec and lambda_edge), scalars.
        """
        device = self.G.conv4.weight.device
        identity_points = batch["identity_points"].to(device, non_blocking=True)
        gt_points = batch["gt_points"].to(device, non_blocking=True)
        faces = batch["identity_faces"].to(device, non_blocking=True)
        outputs = self.transfer(identity_points, batch["pose_points"].to(device, non_blocking=True))
        fake_points = outputs["fake_points"]
        losses = {
            "rec": self.lambda_rec * reconstruction_loss(fake_points, gt_points),
            "edge": self.lambda_edge * edge_loss(fake_points, identity_points, faces),
        }
        return outputs, losses
