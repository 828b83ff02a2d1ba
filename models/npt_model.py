"""NPTModel: the NPT baseline (Wang et al., CVPR 2020) behind the same interface as PoseTransferModel.

It owns one network, `npt` (models/networks/npt.py), saved as <label>_net_NPT.pth holding exactly the
published NPT state_dict. Its losses are NPT's: rec + 0.0005 * edge, with the same reconstruction and edge
definitions as 3D-CoreNet (models/networks/losses.py); `precision` autocasts the whole network (published:
fp32). OPTIMIZER and LR_DECAY carry NPT's published training settings (Adam, lr 5e-5, constant) for
train.py; the published initialisation is models.networks.npt.init_npt_weights. Data enters and leaves as
(B, N, 3); `transfer` is the one place that transposes to the network's channel-first layout. No file I/O,
no optimizer held.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from models.base_model import PairModel, autocast, precision_dtype
from models.networks.npt import NPT


class NPTModel(PairModel):
    """Owns `npt` (the published NPT network, either variant)."""

    # NPT's train.py: Adam with default betas and eps, no weight decay, and a constant learning rate.
    OPTIMIZER = {"lr": 5e-5, "betas": (0.9, 0.999), "eps": 1e-8}
    LR_DECAY = False
    LOSS_WEIGHTS = {"lambda_rec": 1.0, "lambda_edge": 0.0005}

    def __init__(self, variant: str = "original", lambda_rec: float = 1.0, lambda_edge: float = 0.0005,
                 precision: str = "fp32"):
        super().__init__()
        self.npt = NPT(variant)
        self.lambda_rec = lambda_rec
        self.lambda_edge = lambda_edge
        self.autocast_dtype = precision_dtype(precision)  # no similarity to keep exact: all of NPT may autocast

    def checkpoint_networks(self) -> dict[str, nn.Module]:
        """The checkpoint file: <label>_net_NPT.pth, loadable from NPT's released weights."""
        return {"NPT": self.npt}

    def compile_networks(self) -> None:
        """The whole transfer: NPT with its autocast, whose dtype must be part of the graph (see
        PoseTransferModel.refine)."""
        self.transfer = torch.compile(self.transfer)

    def transfer(self, identity_points: torch.Tensor, pose_points: torch.Tensor) -> dict[str, torch.Tensor]:
        """Put the identity's body in the pose mesh's pose.

        Args:
            identity_points: float (B, N, 3).
            pose_points: float (B, M, 3); the "original" variant needs M == N.
        Returns:
            fake_points: float (B, N, 3) in (-2, 2), in the identity's vertex order.
        """
        with autocast(identity_points.device, self.autocast_dtype):
            fake_points = self.npt(pose_points.transpose(1, 2), identity_points.transpose(1, 2))  # (B, 3, N)
        return {"fake_points": fake_points.float().transpose(1, 2)}  # (B, N, 3)
