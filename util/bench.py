"""Benchmark: training-step and inference time, throughput and peak memory of the model on one device.

    python -m util.bench --device cuda --batch 8 --vertices 6890 --out bench.json

Inputs are random points with random faces (timing does not depend on the values), made on the device.
Times are medians over --repeats after --warmup steps, measured with CUDA events (or a synchronised wall
clock on the CPU). The FLOP count per pair at 6890 vertices is the issue's figure: about 256 GFLOP forward,
3x that for a training step.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from models.pose_transfer_model import PoseTransferModel

FORWARD_GFLOP_PER_PAIR_6890 = 256.0


def synthetic_batch(batch: int, vertices: int, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random identity/pose/gt points (B, N, 3) and faces (B, 2N, 3) of distinct corners."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    points = lambda: torch.rand(batch, vertices, 3, generator=generator).sub_(0.5)  # noqa: E731
    corners = torch.stack([torch.randperm(vertices, generator=generator)[:3] for _ in range(2 * vertices)])
    faces = corners.expand(batch, -1, -1).contiguous()
    sample = {"identity_points": points(), "pose_points": points(), "gt_points": points(), "identity_faces": faces}
    return {key: value.to(device) for key, value in sample.items()}


def time_median(step: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    """Median milliseconds of step() after warm-up."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            started = time.perf_counter()
            step()
            times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


def peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def bench_training(model: PoseTransferModel, batch: dict, device: torch.device, warmup: int,
                   repeats: int) -> dict[str, float]:
    """One full step: forward, both losses, backward, Adam (published settings)."""
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.0, 0.9), eps=1e-3)

    def step():
        _, losses = model(batch)
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizer.step()
    reset_peak(device)
    ms = time_median(step, device, warmup, repeats)
    return {"ms": ms, "peak_gib": peak_gib(device)}


def bench_inference(model: PoseTransferModel, batch: dict, device: torch.device, warmup: int,
                    repeats: int) -> dict[str, float]:
    model.eval()

    def step():
        with torch.no_grad():
            model.transfer(batch["identity_points"], batch["pose_points"])
    reset_peak(device)
    ms = time_median(step, device, warmup, repeats)
    return {"ms": ms, "peak_gib": peak_gib(device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--vertices", type=int, default=6890)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default="", help="write the results as JSON here")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = PoseTransferModel().to(device)
    batch = synthetic_batch(args.batch, args.vertices, device)
    flop_scale = args.vertices / 6890  # the generator dominates and is linear in N
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "batch": args.batch, "vertices": args.vertices,
               "date": time.strftime("%Y-%m-%d")}
    train = bench_training(model, batch, device, args.warmup, args.repeats)
    results["train_reference"] = {**train, "pairs_per_s": args.batch / train["ms"] * 1e3,
                                  "tflops": 3 * FORWARD_GFLOP_PER_PAIR_6890 * flop_scale * args.batch / train["ms"]}
    one = {key: value[:1] for key, value in batch.items()}
    results["infer_reference_one_pair"] = bench_inference(model, one, device, args.warmup, args.repeats)
    infer = bench_inference(model, batch, device, args.warmup, args.repeats)
    results["infer_reference_batch"] = {**infer, "pairs_per_s": args.batch / infer["ms"] * 1e3}
    print(f"{'case':28} {'ms':>9} {'pairs/s':>9} {'peak GiB':>9}")
    for name, row in results.items():
        if isinstance(row, dict):
            print(f"{name:28} {row['ms']:9.2f} {row.get('pairs_per_s', float('nan')):9.1f} {row['peak_gib']:9.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
