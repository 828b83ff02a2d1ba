"""One training step as train.py takes it, and as util.bench times it."""
from __future__ import annotations

import torch
import torch.nn as nn


def training_step(network: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                  batch: dict) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Forward, the weighted losses, backward (scaled when the scaler is enabled: fp16) and the update.

    Args:
        network: a PairModel, or one wrapped in DistributedDataParallel.
        batch: a loader batch (models/base_model.py PairModel.forward).
    Returns:
        the network's outputs and its weighted losses (scalars), detached: holding them keeps no autograd graph
        alive into the next step.
    """
    outputs, losses = network(batch)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(sum(losses.values())).backward()
    scaler.step(optimizer)
    scaler.update()
    return _detached(outputs), _detached(losses)


def _detached(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: value.detach() for name, value in tensors.items()}
