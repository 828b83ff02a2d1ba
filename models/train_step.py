"""One training step as train.py takes it, and as util.bench times it: eager (`training_step`), or replayed from a
CUDA graph (`GraphedTrainingStep`).

A compiled step of 3D-CoreNet at batch 8 and 6890 vertices issues about 870 kernels, and on a slow host issuing
them takes longer than the GPU takes to run them (docs/benchmarks.md: 29.7 ms of kernels in a 38.3 ms step). A CUDA
graph records the launches of one whole step once and replays them with one launch: the same kernels on the same
buffers, so the same arithmetic as the eager step.
"""
from __future__ import annotations

import sys

import torch
import torch.nn as nn

from models.cuda_graphs import first_line, on_side_stream

# Eager steps before the first capture: compiled graphs, cuBLAS workspaces, Adam's moments and the loss scale are made
# on first use, which a capture cannot record.
WARMUP_STEPS = 3


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


def _require_cuda_model(network: nn.Module) -> torch.device:
    device = next(network.parameters()).device
    if device.type != "cuda":
        raise ValueError(f"CUDA graphs need the model on a CUDA device, got {device}")
    return device


def _tensor_shapes(batch: dict) -> tuple:
    return tuple((key, tuple(value.shape), value.dtype, value.device) for key, value in batch.items()
                 if isinstance(value, torch.Tensor))


class GraphedTrainingStep:
    """`training_step` replayed from a CUDA graph; called like it, with the batch alone.

    The first WARMUP_STEPS calls run eagerly on a side stream, as a capture needs; the next captures the step and
    replays it, and every later call copies its batch into the graph's input buffers and replays. The learning rate
    is a constant of the recorded Adam kernel, so a call after the lr changed (an epoch of linear decay) captures
    again. A batch of other shapes than the captured one runs eagerly, and so does every step after a capture that
    failed (out of memory, say: a graph keeps its own memory), after one warning line. Each call is exactly one
    optimizer step on its batch.

    The outputs and losses returned are the graph's own tensors: read them before the next call.

    Args:
        network: a PairModel on a CUDA device (one process: a DistributedDataParallel step is not captured).
        optimizer: made with capturable=True (on a GPU: torch.optim.Adam(..., fused=True, capturable=True)).
        scaler: the step's GradScaler, enabled or not.
    """

    def __init__(self, network: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler):
        if not all(group.get("capturable", False) for group in optimizer.param_groups):
            raise ValueError("a graphed training step needs an optimizer made with capturable=True")
        self.device = _require_cuda_model(network)
        self.network, self.optimizer, self.scaler = network, optimizer, scaler
        self.eager_steps = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: dict[str, torch.Tensor] | None = None  # the graph's input buffers, and its results
        self.outputs: dict[str, torch.Tensor] | None = None
        self.losses: dict[str, torch.Tensor] | None = None
        self.captured_key: tuple | None = None
        self.capture_failed = False

    def __call__(self, batch: dict) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        shapes = _tensor_shapes(batch)
        if self.capture_failed or (self.captured_key is not None and shapes != self.captured_key[0]):
            return training_step(self.network, self.optimizer, self.scaler, batch)
        if self.eager_steps < WARMUP_STEPS:
            self.eager_steps += 1
            return on_side_stream(self.device, lambda: training_step(self.network, self.optimizer, self.scaler,
                                                                     batch))
        key = (shapes, tuple(group["lr"] for group in self.optimizer.param_groups))
        if key != self.captured_key:
            try:
                self._capture(batch)
            except RuntimeError as error:  # torch.OutOfMemoryError included; _capture left no graph
                self.capture_failed = True
                print(f"warning: the training step could not be captured as a CUDA graph ({first_line(error)}); "
                      f"training goes on without one", file=sys.stderr)
                return training_step(self.network, self.optimizer, self.scaler, batch)
            self.captured_key = key
        for name, buffer in self.inputs.items():
            buffer.copy_(batch[name])
        self.graph.replay()
        return self.outputs, self.losses

    def _capture(self, batch: dict) -> None:
        """Record one step on buffers holding this batch, on the model's device; the recorded step runs only when
        replayed."""
        # Free the previous graph's memory first: its gradients, outputs and inputs live in its pool.
        self.graph = self.inputs = self.outputs = self.losses = None
        self.optimizer.zero_grad(set_to_none=True)
        # On the model's device, whichever the loader's: the step then moves nothing, and each call's copy into them
        # (a host-to-device one for the file loaders) runs before the replay, outside the graph.
        self.inputs = {name: value.to(self.device, copy=True) for name, value in batch.items()
                       if isinstance(value, torch.Tensor)}
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self.outputs, self.losses = training_step(self.network, self.optimizer, self.scaler,
                                                      {**batch, **self.inputs})
        self.graph = graph
