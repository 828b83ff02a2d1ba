"""Inference replayed from CUDA graphs: `GraphedTransfer(model)` is called like `model.transfer`.

One pair at 6890 vertices is a few hundred small kernels whose launches cost more than their arithmetic
(issue 4: about 9 ms eager against roughly 2 ms of work). A CUDA graph records every kernel of one call
and replays them with a single launch. A graph is fixed to its input shapes and buffers, so one is kept
per shape: the first call of a shape runs eagerly (one call alone gains nothing from capturing), the
second captures a graph, and every later call copies its inputs into the graph's buffers and replays it.
The graph computes exactly what the eager call computes (the same kernels on the same data). A shape whose
capture fails (out of memory, say: a graph keeps its own memory) runs eagerly from then on, with one
warning line, so that replaying never makes a call fail that would run without it.
"""
from __future__ import annotations

import sys
from collections import OrderedDict
from typing import Callable, TypeVar

import torch
import torch.nn as nn

TransferFunction = Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]
T = TypeVar("T")

# Warm-up calls before a capture: the first call of a shape allocates cuBLAS workspaces and may compile.
WARMUP_CALLS = 2


class _CapturedTransfer:
    """One CUDA graph of transfer for fixed input shapes, with its input buffers and outputs."""

    def __init__(self, transfer: TransferFunction, identity_points: torch.Tensor, pose_points: torch.Tensor):
        self.identity_points = identity_points.clone()
        self.pose_points = pose_points.clone()
        for _ in range(WARMUP_CALLS):
            on_side_stream(identity_points.device, lambda: transfer(self.identity_points, self.pose_points))
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = transfer(self.identity_points, self.pose_points)

    def __call__(self, identity_points: torch.Tensor, pose_points: torch.Tensor) -> dict[str, torch.Tensor]:
        self.identity_points.copy_(identity_points)
        self.pose_points.copy_(pose_points)
        self.graph.replay()
        # The next replay overwrites the outputs in place, so the caller gets copies.
        return {name: value.clone() for name, value in self.outputs.items()}


class GraphedTransfer:
    """`model.transfer` (no gradient) from CUDA graphs, one per input shape, at most max_graphs kept.

    Args:
        model: a model on a CUDA device with a `transfer(identity_points (B, N, 3), pose_points (B, M, 3))`
            method returning a dict of tensors; put it in eval mode first.
        max_graphs: graphs kept at once (each holds its own memory); the least recently used goes first.
    """

    def __init__(self, model: nn.Module, max_graphs: int = 4):
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be at least 1, got {max_graphs}")
        self.model = model
        self.max_graphs = max_graphs
        self.graphs: OrderedDict[tuple, _CapturedTransfer] = OrderedDict()
        self.shapes_seen: set[tuple] = set()
        self.eager_shapes: set[tuple] = set()  # shapes whose capture failed

    def __call__(self, identity_points: torch.Tensor, pose_points: torch.Tensor) -> dict[str, torch.Tensor]:
        _require_cuda(identity_points)
        key = (tuple(identity_points.shape), tuple(pose_points.shape), identity_points.dtype, pose_points.dtype,
               identity_points.device)
        with torch.no_grad():
            if key not in self.graphs:
                if key not in self.shapes_seen or key in self.eager_shapes:
                    self.shapes_seen.add(key)
                    return self.model.transfer(identity_points, pose_points)
                try:
                    self.graphs[key] = _CapturedTransfer(self.model.transfer, identity_points, pose_points)
                except RuntimeError as error:  # torch.OutOfMemoryError included
                    self.eager_shapes.add(key)
                    print(f"warning: no CUDA graph for inputs {key[0]} and {key[1]} ({first_line(error)}); "
                          f"they run without one", file=sys.stderr)
                    return self.model.transfer(identity_points, pose_points)
                if len(self.graphs) > self.max_graphs:
                    self.graphs.popitem(last=False)
            self.graphs.move_to_end(key)
            return self.graphs[key](identity_points, pose_points)


def on_side_stream(device: torch.device, function: Callable[[], T]) -> T:
    """function() on a fresh side stream of `device`, ordered after and before the current stream's work: the
    warm-up a capture needs (work on the default stream before a capture is not allowed in it)."""
    side_stream = torch.cuda.Stream(device)
    side_stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side_stream):
        result = function()
    torch.cuda.current_stream(device).wait_stream(side_stream)
    return result


def first_line(error: BaseException) -> str:
    """The first line of a failed capture's error (an out-of-memory message runs on for lines), or its type."""
    message = str(error).strip()
    return message.splitlines()[0] if message else type(error).__name__


def _require_cuda(identity_points: torch.Tensor) -> None:
    if identity_points.device.type != "cuda":
        raise ValueError(f"CUDA graphs need inputs on a CUDA device, got {identity_points.device}")
