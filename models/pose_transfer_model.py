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
from models.networks.layers import padded


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
        """The generator with its autocast (`refine`) and the correspondence network's layer path (whose warp
        compiles its own passes and is left out of the graph: `sinkhorn_warp_stored` breaks it). Corr's inference
        on batches of pairs still runs its layers as Triton kernels (`Correspondence.compile_layers`)."""
        self.refine = torch.compile(self.refine)
        self.corr.compile_layers()

    def refine(self, warp_points: torch.Tensor, identity_features: torch.Tensor,
               vertices: int | None = None) -> torch.Tensor:
        """The generator under --precision's autocast: warp (B, 3, N'), features (B, C, N') -> (B, 3, N'), the
        statistics over the first `vertices` columns (ElaINGenerator).

        Compiled together, the autocast's dtype is part of the graph. Compiled alone under an enclosing
        autocast, torch 2.11's AOTAutograd cache keyed the graph only by whether autocast was on, and could
        hand a graph compiled for fp16 to a bf16 run (pytorch/pytorch#181564).
        """
        with autocast(warp_points.device, self.generator_dtype):
            return self.G(warp_points, identity_features, vertices)

    def pads_vertex_axis(self, points: torch.Tensor) -> bool:
        """Whether `transfer` pads the vertex axis: where the networks' products run in half precision on a
        GPU, whose fast tensor-core kernels need it a multiple of layers.ALIGNMENT."""
        return points.is_cuda and self.generator_dtype is not None

    def transfer(self, identity_points: torch.Tensor, pose_points: torch.Tensor,
                 pad_vertex_axis: bool | None = None) -> dict[str, torch.Tensor]:
        """Put the identity's body in the pose mesh's pose.

        With the vertex axis padded, each mesh's point columns are zero-padded once here to a multiple of
        layers.ALIGNMENT and both networks run on the padded axis (their statistics and the optimal transport
        over the real vertices only); the outputs are the first N columns, the same values up to rounding.
        Otherwise every half-precision product pads its operand itself, a copy each (docs/benchmarks.md).

        Args:
            identity_points: float (B, N, 3).
            pose_points: float (B, M, 3).
            pad_vertex_axis: None: where `pads_vertex_axis` says (half precision on a GPU).
        Returns:
            warp_out: float (B, N, 3), the coarse correspondence result.
            fake_points: float (B, N, 3), the refined output.
        """
        if pad_vertex_axis is None:
            pad_vertex_axis = self.pads_vertex_axis(identity_points)
        identity_vertices, pose_vertices = identity_points.shape[1], pose_points.shape[1]
        pad = padded if pad_vertex_axis else (lambda channels: channels)
        warp_out, identity_features = self.corr(pad(identity_points.transpose(1, 2)), pad(pose_points.transpose(1, 2)),
                                                identity_vertices, pose_vertices)  # (B, N, 3), (B, C, N')
        warp_channels = pad(warp_out.transpose(1, 2))  # (B, 3, N'), zero past N
        fake_points = self.refine(warp_channels, identity_features, identity_vertices)  # (B, 3, N')
        return {"warp_out": warp_out, "fake_points": fake_points[..., :identity_vertices].float().transpose(1, 2)}
