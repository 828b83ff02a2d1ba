"""NPT: Neural Pose Transfer by Spatially Adaptive Instance Normalization (Wang et al., CVPR 2020).

The baseline 3D-CoreNet compares against. A pose encoder (three 1x1 convs with instance norm) turns the pose
mesh into 1024 features per vertex; the decoder concatenates them with the identity's xyz and refines them
through three residual blocks of SPAdaIN, whose per-vertex scale and shift are 1x1 convs of the identity's
xyz. Every conv has kernel 1, so vertices interact only through instance-norm statistics (and, in the
max-pool variant, the max over pose vertices).

Variants (NPT_VARIANTS):
- "original" (the released model.py): pose feature i is concatenated with identity vertex i, so the two
  meshes need equal vertex counts; the vertices need not correspond (NPT trains with independent shuffles).
- "maxpool" (model_maxpool.py, NPT's supplementary): a max over pose vertices gives one global pose feature,
  repeated to the identity's vertex count, so any counts work. Its first residual block's SPAdaINs do not
  instance-normalise (gamma * x + beta), as published.

Both variants have the same 68 state_dict tensors (6,054,941 parameters), named as in the published code
so its released weights load unchanged. Facts from ../shared/reference/NPT.md (github
jiashunwang/Neural-Pose-Transfer at bd62eef); the code here is our own.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn import init

from models.networks.layers import INSTANCE_NORM_EPS

NPT_VARIANTS = ("original", "maxpool")
POSE_FEATURE_CHANNELS = 1024
INIT_STD = 0.02


class PoseFeature(nn.Module):
    """Pose encoder: three 1x1 convs 3 -> 64 -> 128 -> 1024, each followed by instance norm and ReLU."""

    def __init__(self, max_pool: bool = False):
        super().__init__()
        self.conv1 = nn.Conv1d(3, 64, 1)
        self.conv2 = nn.Conv1d(64, 128, 1)
        self.conv3 = nn.Conv1d(128, POSE_FEATURE_CHANNELS, 1)
        self.max_pool = max_pool

    def forward(self, pose_points: torch.Tensor) -> torch.Tensor:
        """
        Args:
            pose_points: float (B, 3, M), M >= 2.
        Returns:
            float (B, 1024, M) per-vertex features, or (B, 1024, 1) with max_pool.
        """
        x = pose_points
        for conv in (self.conv1, self.conv2, self.conv3):
            # PyTorch's InstanceNorm1d defaults: no affine, no running stats, biased variance, eps 1e-5.
            x = F.relu(F.instance_norm(conv(x), eps=INSTANCE_NORM_EPS))
        if self.max_pool:
            x = x.amax(dim=2, keepdim=True)  # (B, 1024, 1)
        return x


class SPAdaIN(nn.Module):
    """Spatially adaptive instance norm: gamma(xyz) * InstanceNorm(x) + beta(xyz), gamma and beta 1x1 convs."""

    def __init__(self, channels: int, normalize: bool = True):
        super().__init__()
        self.conv_weight = nn.Conv1d(3, channels, 1)
        self.conv_bias = nn.Conv1d(3, channels, 1)
        self.normalize = normalize

    def forward(self, x: torch.Tensor, identity_points: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: float (B, C, N).
            identity_points: float (B, 3, N), the identity's xyz.
        Returns:
            float (B, C, N).
        """
        h = F.instance_norm(x, eps=INSTANCE_NORM_EPS) if self.normalize else x
        # gamma is used as is, not as 1 + gamma (unlike SPADE and ElaIN).
        return self.conv_weight(identity_points) * h + self.conv_bias(identity_points)


class SPAdaINResBlock(nn.Module):
    """Residual block: main SPAdaIN-ReLU-conv-SPAdaIN-ReLU-conv plus a learned SPAdaIN-ReLU-conv shortcut."""

    def __init__(self, channels: int, normalize: bool = True):
        super().__init__()
        self.spadain1 = SPAdaIN(channels, normalize)
        self.conv1 = nn.Conv1d(channels, channels, 1)
        self.spadain2 = SPAdaIN(channels, normalize)
        self.conv2 = nn.Conv1d(channels, channels, 1)
        self.spadain_res = SPAdaIN(channels, normalize)
        self.conv_res = nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor, identity_points: torch.Tensor) -> torch.Tensor:
        """x: float (B, C, N), identity_points: float (B, 3, N) -> float (B, C, N); no activation after the sum."""
        dx = self.conv1(F.relu(self.spadain1(x, identity_points)))
        dx = self.conv2(F.relu(self.spadain2(dx, identity_points)))
        shortcut = self.conv_res(F.relu(self.spadain_res(x, identity_points)))
        return dx + shortcut


class Decoder(nn.Module):
    """(pose features ++ identity xyz) (B, 1027, N) -> points (B, 3, N) in (-2, 2)."""

    def __init__(self, normalize_first_block: bool = True):
        super().__init__()
        channels = POSE_FEATURE_CHANNELS + 3
        self.conv1 = nn.Conv1d(channels, channels, 1)
        self.spadain_block1 = SPAdaINResBlock(channels, normalize_first_block)
        self.conv2 = nn.Conv1d(channels, 513, 1)
        self.spadain_block2 = SPAdaINResBlock(513)
        self.conv3 = nn.Conv1d(513, 256, 1)
        self.spadain_block3 = SPAdaINResBlock(256)
        self.conv4 = nn.Conv1d(256, 3, 1)

    def forward(self, x: torch.Tensor, identity_points: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: float (B, 1027, N), pose features then identity xyz along channels.
            identity_points: float (B, 3, N), the SPAdaIN conditioning.
        Returns:
            float (B, 3, N).
        """
        x = self.spadain_block1(self.conv1(x), identity_points)
        x = self.spadain_block2(self.conv2(x), identity_points)
        x = self.spadain_block3(self.conv3(x), identity_points)
        return 2 * torch.tanh(self.conv4(x))


class NPT(nn.Module):
    """The whole network: `encoder` (PoseFeature) and `decoder` (Decoder), the published state_dict prefixes."""

    def __init__(self, variant: str = "original"):
        super().__init__()
        if variant not in NPT_VARIANTS:
            raise ValueError(f"unknown NPT variant {variant!r}; choose one of {', '.join(NPT_VARIANTS)}")
        self.variant = variant
        max_pool = variant == "maxpool"
        self.encoder = PoseFeature(max_pool=max_pool)
        self.decoder = Decoder(normalize_first_block=not max_pool)

    def forward(self, pose_points: torch.Tensor, identity_points: torch.Tensor) -> torch.Tensor:
        """Pose first, as in the published NPT.forward(pose, identity); both channel-first.

        Args:
            pose_points: float (B, 3, M); the "original" variant needs M == N.
            identity_points: float (B, 3, N).
        Returns:
            float (B, 3, N): the identity's body in the pose, in the identity's vertex order.
        """
        num_pose, num_identity = pose_points.shape[2], identity_points.shape[2]
        if self.variant == "original" and num_pose != num_identity:
            raise ValueError(f"NPT variant 'original' needs as many pose as identity vertices, got {num_pose} "
                             f"pose and {num_identity} identity vertices; use --npt_variant maxpool for "
                             f"differing counts")
        pose_features = self.encoder(pose_points)  # (B, 1024, M), or (B, 1024, 1) max-pooled
        pose_features = pose_features.expand(-1, -1, num_identity)  # (B, 1024, N)
        x = torch.cat([pose_features, identity_points], dim=1)  # (B, 1027, N)
        return self.decoder(x, identity_points)


def init_npt_weights(network: nn.Module) -> None:
    """NPT's published initialisation: every Conv1d weight ~ N(0, 0.02); biases keep PyTorch's default.

    Args:
        network: any module; its Conv1d weights are redrawn in place from the global torch RNG.
    """
    for module in network.modules():
        if isinstance(module, nn.Conv1d):
            init.normal_(module.weight.data, 0.0, INIT_STD)
