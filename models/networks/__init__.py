"""Networks of 3D-CoreNet and their construction: the generator registry and weight initialisation."""
from __future__ import annotations

import torch.nn as nn
from torch.nn import init

from models.networks.correspondence import Correspondence
from models.networks.generator import ElaINGenerator

GENERATORS = {"elain": ElaINGenerator}


def _init_conv_weight(weight, init_type: str, gain: float) -> None:
    if init_type == "normal":
        init.normal_(weight, 0.0, gain)
    elif init_type == "xavier":
        init.xavier_normal_(weight, gain=gain)
    elif init_type == "xavier_uniform":
        init.xavier_uniform_(weight, gain=1.0)
    elif init_type == "kaiming":
        init.kaiming_normal_(weight, a=0, mode="fan_in")
    elif init_type == "orthogonal":
        init.orthogonal_(weight, gain=gain)


INIT_TYPES = ("xavier", "normal", "xavier_uniform", "kaiming", "orthogonal", "none")


def init_weights(network: nn.Module, init_type: str = "xavier", gain: float = 0.02) -> None:
    """Initialise every convolution weight (weight_orig under spectral norm) and zero every conv bias.

    Args:
        network: any module; its Conv1d layers are initialised in place.
        init_type: one of INIT_TYPES; "none" keeps PyTorch's default initialisation (biases still zeroed).
        gain: the published --init_variance, used as the gain (or std for "normal").
    """
    if init_type not in INIT_TYPES:
        raise ValueError(f"unknown init_type {init_type!r}; choose one of {', '.join(INIT_TYPES)}")
    for module in network.modules():
        if not isinstance(module, nn.Conv1d):
            continue
        # Under spectral norm the trainable weight is weight_orig (the published init wrote it in place
        # through the .weight alias, which shares its storage).
        weight = getattr(module, "weight_orig", module.weight)
        if init_type != "none":
            _init_conv_weight(weight.data, init_type, gain)
        if module.bias is not None:
            init.zeros_(module.bias.data)


__all__ = ["Correspondence", "ElaINGenerator", "GENERATORS", "INIT_TYPES", "init_weights"]
