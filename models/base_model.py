"""PairModel: what every pose-transfer model here shares: the training forward around its own `transfer`,
and the --precision choices with the autocast context they select."""
from __future__ import annotations

import torch
import torch.nn as nn

from models.networks.losses import weighted_losses

# --precision -> autocast dtype; fp32 (None) is the published arithmetic: no autocast.
PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def precision_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a --precision value; ValueError with one line for an unknown one."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    return PRECISIONS[precision]


def autocast(device: torch.device, dtype: torch.dtype | None) -> torch.autocast:
    """torch.autocast to dtype on device's type; for None (float32) autocast switched off, also inside an
    enclosing autocast region."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


class PairModel(nn.Module):
    """A model with `transfer(identity_points, pose_points) -> dict` (fake_points at least) and the loss
    weights `lambda_rec`, `lambda_edge`; `forward` runs a loader batch through it and weighs the losses."""

    lambda_rec: float
    lambda_edge: float

    def transfer(self, identity_points: torch.Tensor, pose_points: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def compile_networks(self) -> None:
        """torch.compile what --compile on compiles, in place (the state_dict keys stay the published ones)."""
        raise NotImplementedError

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Run a batch from the data loaders and compute the weighted training losses.

        Args:
            batch: identity_points (B, N, 3), pose_points (B, M, 3), gt_points (B, N, 3),
                identity_faces int64 (B, F, 3); moved to the parameters' device here.
        Returns:
            outputs: as `transfer` returns them.
            losses: rec and edge (already multiplied by lambda_rec and lambda_edge), scalars.
        """
        device = next(self.parameters()).device
        identity_points, pose_points, gt_points, faces = (
            batch[key].to(device, non_blocking=True)
            for key in ("identity_points", "pose_points", "gt_points", "identity_faces"))
        outputs = self.transfer(identity_points, pose_points)
        losses = weighted_losses(outputs["fake_points"], gt_points, identity_points, faces, self.lambda_rec,
                                 self.lambda_edge)
        return outputs, losses
