"""Fit 3D-CoreNet to one (identity, pose, ground truth) triple and print the error per axis as it trains.

    python -m scripts.overfit_pair --identity A.ply --pose B.ply --gt C.ply [--steps 1200] [--every 150]

A diagnostic: a model that can fit one pair has no structural defect in its output, whatever a short
training on a full set shows. The reference path on the CPU, the published initialisation, Adam
settings and loss weights; the three meshes are centred by their bounding boxes, in file order.
docs/results.md uses it for the flat 3D-CoreNet animal outputs.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from data.pair_dataset import read_centred
from models.networks import init_weights
from models.pose_transfer_model import PoseTransferModel
from test import point_mesh_distance_per_axis
from util.cli import OneLineErrorParser, run_main


def load(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Centred vertices (1, V, 3) and faces (1, F, 3) of one mesh: a batch of one."""
    vertices, faces = read_centred(Path(path))
    return vertices[None], faces[None]


def main(argv: list[str] | None = None) -> None:
    parser = OneLineErrorParser(prog="python -m scripts.overfit_pair", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--identity", required=True)
    parser.add_argument("--pose", required=True)
    parser.add_argument("--gt", required=True, help="the identity in the pose, in the identity's vertex order")
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--every", type=int, default=150, help="print every this many steps")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    identity_points, faces = load(args.identity)
    pose_points, _ = load(args.pose)
    gt_points, _ = load(args.gt)
    if gt_points.shape != identity_points.shape:
        raise ValueError(f"--gt has {gt_points.shape[1]} vertices but --identity has {identity_points.shape[1]}; "
                         f"the ground truth must be the identity's mesh in the pose")
    print(f"ground truth variance per axis (x, y, z): {', '.join(f'{v:.2e}' for v in gt_points[0].var(dim=0))}")
    model = PoseTransferModel()
    init_weights(model)
    optimizer = torch.optim.Adam(model.parameters(), **model.OPTIMIZER)
    batch = {"identity_points": identity_points, "pose_points": pose_points, "gt_points": gt_points,
             "identity_faces": faces}
    started = time.perf_counter()
    for step in range(args.steps + 1):
        outputs, losses = model(batch)
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizer.step()
        if step % args.every == 0:
            error = point_mesh_distance_per_axis(outputs["fake_points"].detach(), gt_points)[0]  # (3,)
            print(f"step {step:5d}: output MSE per axis {', '.join(f'{v:.2e}' for v in error)}  "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    run_main(main)
