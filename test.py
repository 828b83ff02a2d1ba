"""Test 3D-CoreNet on a test list: write the output meshes, the per-pair PMD table and the mean PMD.

    python test.py --dataset_mode human --dataroot DATA --which_epoch latest

For each "identity pose ground-truth" line, the three meshes are centred and permuted (seeded by --seed,
or kept in file order with --no_shuffle), the model runs in eval mode, the output is re-centred by its
own bounding box, and PMD = mean over vertices and xyz of the squared difference to the ground truth
(SPEC.md, "Test and the metric"). Papers quote the mean PMD x 1e-4.
"""
from __future__ import annotations

import csv
import time
from pathlib import Path

import torch
from tqdm import tqdm

from data import TestPairDataset, create_dataloader
from models import create_model, inference_transfer
from options.base_options import parse
from options.test_options import TestOptions
from util import checkpoint
from util.cli import run_main
from util.mesh_io import write_mesh
from util.mesh_ops import center_bbox

PROJECT_ROOT = Path(__file__).resolve().parent


def point_mesh_distance_per_axis(points: torch.Tensor, gt_points: torch.Tensor) -> torch.Tensor:
    """Mean over vertices of the squared difference, per axis.

    Args:
        points, gt_points: float (B, N, 3), in the same vertex order.
    Returns:
        float (B, 3).
    """
    return ((points - gt_points) ** 2).mean(dim=1)


def point_mesh_distance(points: torch.Tensor, gt_points: torch.Tensor) -> torch.Tensor:
    """PMD per pair: mean over vertices and xyz of the squared difference (same arguments); float (B,)."""
    return point_mesh_distance_per_axis(points, gt_points).mean(dim=1)


def result_path(results_dir: Path, gt_name: str) -> Path:
    """Where the output of a pair with this ground truth goes: its name as an OBJ under results_dir (the
    published layout; animal results too), or only its file name where it is absolute or climbs out with '..'."""
    name = Path(gt_name)
    if name.is_absolute() or ".." in name.parts:
        name = Path(name.name)
    return results_dir / name.with_suffix(".obj")


def check_results_paths(dataset: TestPairDataset, results_dir: Path) -> None:
    """Refuse, before anything runs, a test list whose outputs would replace one of its own meshes (results
    written into the data folder). Pairs sharing a ground truth share its output file, as published (the
    published lists have 21 and 28 such names); pmd.csv keeps every pair."""
    inputs = {(dataset.root / name).resolve() for triple in dataset.triples for name in triple}
    for _, _, gt_name in dataset.triples:
        out = result_path(results_dir, gt_name).resolve()
        if out in inputs:
            raise ValueError(f"the output for ground truth {gt_name} would be written over the input mesh {out}; "
                             f"choose a --results_dir outside the data folder")


def check_finite_outputs(fake_points: torch.Tensor, batch: dict) -> None:
    """Refuse to write or score an output that is not finite: the weights (or the inputs) are unsound."""
    finite = torch.isfinite(fake_points).flatten(1).all(dim=1)  # (B,)
    if not bool(finite.all()):
        k = int((~finite).nonzero()[0])
        raise ValueError(f"the output for identity {batch['identity_name'][k]} in pose {batch['pose_name'][k]} "
                         f"is not finite (NaN or inf); is the checkpoint sound? Earlier pairs' outputs were written")


def main(opt: TestOptions) -> float:
    """Run the test list; return the mean PMD."""
    device = torch.device(opt.device)
    test_list = Path(opt.test_list) if opt.test_list else PROJECT_ROOT / f"{opt.dataset_mode}_test_list"
    dataset = TestPairDataset(opt.dataroot, test_list, seed=opt.seed, shuffle_points=not opt.no_shuffle)
    results_dir = Path(opt.results_dir) / opt.dataset_mode
    check_results_paths(dataset, results_dir)
    model = create_model(opt)
    checkpoint.load_networks(model, opt.checkpoint_dir, opt.which_epoch)
    model.to(device).eval()
    transfer = inference_transfer(model, opt)
    loader = create_dataloader(dataset, opt.batchSize, opt.nThreads, distributed=False)

    rows = []
    started = time.perf_counter()
    model_seconds = []  # per batch: transfer and metric, up to the PMD's copy to the host
    with torch.no_grad():
        for batch in tqdm(loader, desc="test", dynamic_ncols=True):
            batch_started = time.perf_counter()
            outputs = transfer(batch["identity_points"].to(device), batch["pose_points"].to(device))
            gt_points = batch["gt_points"].to(device)
            fake_points = center_bbox(outputs["fake_points"])
            check_finite_outputs(fake_points, batch)
            # Per axis (mean over vertices): shows, for example, an output flattened along one axis.
            axis_pmd = point_mesh_distance_per_axis(fake_points, gt_points)  # (B, 3)
            pmd = axis_pmd.mean(dim=1).tolist()
            axis_pmd = axis_pmd.tolist()
            # The correspondence alone (no refinement), the paper's ablation; 3D-CoreNet only.
            warp_pmd = point_mesh_distance(center_bbox(outputs["warp_out"]), gt_points).tolist() \
                if "warp_out" in outputs else None
            model_seconds.append(time.perf_counter() - batch_started)
            fake_points = fake_points.cpu().numpy()  # (B, N, 3), one copy for the batch
            for k in range(len(pmd)):
                write_mesh(result_path(results_dir, batch["gt_name"][k]), fake_points[k],
                           batch["identity_faces"][k].numpy())
                row = {"identity": batch["identity_name"][k], "pose": batch["pose_name"][k],
                       "ground_truth": batch["gt_name"][k], "pmd": pmd[k],
                       **{f"pmd_{axis}": value for axis, value in zip("xyz", axis_pmd[k])}}
                if warp_pmd is not None:
                    row["warp_pmd"] = warp_pmd[k]
                rows.append(row)

    table_path = results_dir / "pmd.csv"
    with open(table_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    mean_pmd = sum(row["pmd"] for row in rows) / len(rows)
    print(f"{len(rows)} pairs from {test_list}, checkpoint {opt.checkpoint_dir}/{opt.which_epoch}_net_*.pth")
    print(f"mean PMD: {mean_pmd:.6e} ({mean_pmd / 1e-4:.4f} x 1e-4)")
    if "warp_pmd" in rows[0]:
        mean_warp_pmd = sum(row["warp_pmd"] for row in rows) / len(rows)
        print(f"warp_out alone (no refinement): {mean_warp_pmd:.6e} ({mean_warp_pmd / 1e-4:.4f} x 1e-4)")
    axis_means = (sum(row[f"pmd_{axis}"] for row in rows) / len(rows) for axis in "xyz")
    print("per axis (x 1e-4): " + ", ".join(f"{axis} {mean / 1e-4:.4f}" for axis, mean in zip("xyz", axis_means)))
    print(f"meshes and the per-pair table {table_path} written under {results_dir}")
    total_seconds = time.perf_counter() - started
    print(f"time over the test list: {total_seconds:.1f} s; the model and metric {sum(model_seconds):.1f} s, "
          f"of which the first batch {model_seconds[0]:.1f} s (with any compilation); reading and writing "
          f"meshes {total_seconds - sum(model_seconds):.1f} s")
    return mean_pmd


if __name__ == "__main__":
    run_main(lambda: main(parse(TestOptions, script="test.py")))
