"""Shared layers of the 3D-CoreNet networks."""
from __future__ import annotations

import torch
import torch.nn as nn


class PointwiseConv1d(nn.Conv1d):
    """nn.Conv1d(in, out, kernel_size=1) computed as one batched matrix product.

    Same function, parameters and state_dict keys (weight (out, in, 1), bias (out,)) as the published
    1x1 convolutions, so checkpoints and spectral_norm work unchanged; on GPUs cuBLAS matrix products run
    these shapes (thousands of vertices, hundreds of channels) much faster than cuDNN's convolution kernels,
    above all in backward and in half precision.
    """

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True):
        super().__init__(in_channels, out_channels, kernel_size=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C_in, N) -> (B, C_out, N)."""
        weight = self.weight.squeeze(-1).expand(x.shape[0], -1, -1)  # (B, C_out, C_in)
        if self.bias is None:
            return torch.bmm(weight, x)  # (B, C_out, N)
        return torch.baddbmm(self.bias.unsqueeze(-1), weight, x)  # (B, C_out, N)
