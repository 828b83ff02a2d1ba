"""PoseTransferModel: 3D-CoreNet's correspondence network and refinement generator; the training forward
and its losses come from models/base_model.py.

Data enters and leaves as (B, N, 3) point sets; the networks are channel-first (B, C, N) because the
published Conv1d weights require it, and `transfer` is the one place that transposes between the two.
The model does no file I/O and holds no optimizer.

Two switches select the fast path (issue 4); their reference settings reproduce the published numbers:
- `ot`: how the optimal-transport warp is computed (networks/correspondence.py WARPS; "dense" = published).
- `precision`: the generator's autocast dtype. The correspondence network's forward always keeps float32
  accuracy: its similarity C enters exp(C / 0.03), so its error would be magnified about 33 times. With
  fp16/bf16 on a GPU its products (C, and the 1x1 convolutions when compiled) run as one fp16 product of
  split operands, as accurate as float32 in practice (networks/layers.py `split_product`), and its
  backward's matrix products run in that dtype (`mixed_product`).
- `fold_linear`: the generator's consecutive affine layers composed into one (networks/generator.py): the
  same function with about half its arithmetic.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from models.base_model import PairModel, autocast, precision_dtype
from models.networks import GENERATORS, Correspondence
from models.networks.correspondence import WARPS


class PoseTransferModel(PairModel):
    """Owns `corr` (the published net_Corr) and `G` (net_G)."""

    # The published Adam settings and linear decay after --niter epochs (SPEC.md).
    OPTIMIZER = {"lr": 1e-4, "betas": (0.0, 0.9), "eps": 1e-3}
    LR_DECAY = True
    LOSS_WEIGHTS = {"lambda_rec": 1000.0, "lambda_edge": 0.5}

    def __init__(self, ngf: int = 64, netG: str = "elain", lambda_rec: float = 1000.0,
                 lambda_edge: float = 0.5, ot: str = "dense", precision: str = "fp32", fold_linear: bool = False):
        super().__init__()
        for name, value, choices in (("netG", netG, GENERATORS), ("ot", ot, WARPS)):
            if value not in choices:
                raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")
        self.generator_dtype = precision_dtype(precision)
        self.corr = Correspondence(ngf=ngf, warp=WARPS[ot], half_dtype=self.generator_dtype)
        self.G = GENERATORS[netG](ngf=ngf, fold_linear=fold_linear)
        self.lambda_rec = lambda_rec
        self.lambda_edge = lambda_edge

    def checkpoint_networks(self) -> dict[str, nn.Module]:
        """The published checkpoint files: <label>_net_G.pth and <label>_net_Corr.pth."""
        return {"G": self.G, "Corr": self.corr}

    def compile_networks(self) -> None:
        """The generator with its autocast (`refine`) and the correspondence network (whose warp compiles its
        own passes and is left out of the graph: `sinkhorn_warp_stored` breaks it)."""
        self.refine = torch.compile(self.refine)
        self.corr.compile()

    def refine(self, warp_points: torch.Tensor, identity_features: torch.Tensor) -> torch.Tensor:
        """The generator under --precision's autocast: warp (B, 3, N), features (B, C, N) -> (B, 3, N).

        Compiled together, the autocast's dtype is part of the graph. Compiled alone under an enclosing
        autocast, torch 2.11's AOTAutograd cache keyed the graph only by whether autocast was on, and could
        hand a graph compiled for fp16 to a bf16 run (pytorch/pytorch#181564).
        """
        with autocast(warp_points.device, self.generator_dtype):
            return self.G(warp_points, identity_features)

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
        fake_points = self.refine(warp_out.transpose(1, 2), identity_features)  # (B, 3, N)
        return {"warp_out": warp_out, "fake_points": fake_points.float().transpose(1, 2)}
