"""The golden parity fixture (../shared/reference/golden): weights rebuilt from SPEC.md's rule, and inputs.

For a state_dict entry k of shape s, n = prod(s), i = 0..n-1 in float64: u_i = frac(sin(12.9898 i + phi)
* 43758.5453) with phi = (sum of the UTF-8 bytes of k) / 100, base = 2u - 1. Conv weights: base *
sqrt(3 / (s[1] * s[2])); biases: 0.1 * base; PReLU slopes: 0.25; spectral-norm u, v from spectral_uv.npz.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

SHARED_DIR = Path(os.environ.get("CORENET_SHARED", Path(__file__).resolve().parents[2] / "shared"))
GOLDEN_DIR = SHARED_DIR / "reference" / "golden"


def rule_values(key: str, shape: tuple[int, ...]) -> np.ndarray:
    """The fixture's deterministic pseudo-random values in [-1, 1) for one state_dict entry, float64."""
    phase = sum(key.encode("utf-8")) / 100.0
    index = np.arange(int(np.prod(shape)), dtype=np.float64)
    u = np.mod(np.sin(12.9898 * index + phase) * 43758.5453, 1.0)
    return (2.0 * u - 1.0).reshape(shape)


def golden_state_dict(network: torch.nn.Module, spectral_uv: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Build the fixture's weights for every entry of network.state_dict(), float32."""
    state = {}
    for key, tensor in network.state_dict().items():
        shape = tuple(tensor.shape)
        if key.endswith(("weight_u", "weight_v")):
            values = spectral_uv[key]
        elif key.endswith("prelu.weight"):
            values = np.full(shape, 0.25)
        elif key.endswith(".bias"):
            values = 0.1 * rule_values(key, shape)
        elif len(shape) == 3:
            values = rule_values(key, shape) * np.sqrt(3.0 / (shape[1] * shape[2]))
        else:
            raise KeyError(f"golden rule has no case for {key} {shape}")
        state[key] = torch.from_numpy(np.asarray(values, dtype=np.float32).copy())
    return state


def load_golden_model(model: torch.nn.Module) -> torch.nn.Module:
    """Load the golden weights into a PoseTransferModel (its corr and G) in place and return it."""
    with np.load(GOLDEN_DIR / "spectral_uv.npz") as archive:
        spectral_uv = {key: archive[key] for key in archive.files}
    model.G.load_state_dict(golden_state_dict(model.G, spectral_uv))
    model.corr.load_state_dict(golden_state_dict(model.corr, spectral_uv))
    return model


def golden_inputs() -> dict[str, torch.Tensor]:
    """The fixture's batch of one: identity, pose and ground-truth points (1, 1000, 3), faces (1, F, 3)."""
    def load(name: str) -> torch.Tensor:
        return torch.from_numpy(np.load(GOLDEN_DIR / f"{name}.npy"))[None]
    return {
        "identity_points": load("identity_points").float(),
        "pose_points": load("pose_points").float(),
        "gt_points": load("gt_points").float(),
        "identity_faces": load("identity_faces").long(),
    }
