"""Device probe: C's split product and the fixed-point column pass after it as one Triton kernel, timed against the
two it would replace.

Under mixed precision the stored warp forms C = theta^T phi as one fp16 product of split operands
(`layers.split_product`, float32 accuracy), which writes C in float32 (1.52 GB at batch 8 and N = M = 6890); then
`fused.fused_fixed_point_column_pass` reads it back, writes its 16-bit fixed-point copy (0.76 GB) and sums the first
Sinkhorn column pass. The seventeenth session's profile had them at 1.06 and 0.82 ms. Here the product's epilogue
rounds each tile to fixed point, stores that, and sums the tile's rows of exp(s) for the column pass, so the float32 C
is never written or read: 2.3 GB less traffic, for an epilogue of one exponential an element.

    python -m scripts.similarity_product_probe --check            # values (on a CPU: TRITON_INTERPRET=1)
    python -m scripts.similarity_product_probe --out probe.json   # a GPU: ms against the product + column pass
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import NamedTuple

import torch

from models.networks.layers import aligned, float_product_of_halves, split_operands
from models.networks.ot import fused
from models.networks.ot.common import SIMILARITY_LEVELS, SIMILARITY_STEP, SINKHORN_EPSILON, fixed_point_similarity
from util.bench import time_median
from util.cli import OneLineErrorParser, run_main

tl = fused.tl
# Feature channels of Corr's theta and phi: the split operands' contraction is three times this.
FEATURE_CHANNELS = 256
# Largest relative L2 error of the column sums --check and the tests accept against float64's.
CHECK_TOLERANCE = 1e-5


class ProductTile(NamedTuple):
    """How the product is launched."""
    block_rows: int  # identity rows of C a program forms, a power of two of at least 16
    block_columns: int  # pose columns of C a program forms, a power of two of at least 16
    block_contraction: int  # contraction steps a loop step loads, a power of two of at least 16
    num_warps: int
    stages: int  # contraction steps in flight
    group_tiles: int  # row tiles whose programs run column tile by column tile together (their operands stay in L2)


# Tiles --out times, the first the default: shapes of Triton's matmul tutorials for Hopper. For sm_90a (Triton 3.9's
# ptxas) the default takes 192 registers a thread and spills nothing; the 128 x 256 tiles and those at 4 warps take
# 255 and spill 16 to 60 bytes (the epilogue's rounding and exponentials beside the accumulator).
TILES = [ProductTile(128, 128, 64, 8, 4, 8), ProductTile(128, 256, 64, 8, 3, 8), ProductTile(128, 128, 64, 4, 4, 8),
         ProductTile(64, 256, 64, 4, 4, 8), ProductTile(128, 256, 32, 8, 4, 8)]


@fused._triton_jit
def _fixed_point_product_kernel(left_ptr, right_ptr, fixed_point_ptr, partial_ptr, num_identity, num_pose,
                                contraction, fixed_row_stride, left_batch_stride, right_batch_stride,
                                fixed_batch_stride, levels, similarity_step, inverse_epsilon,
                                BLOCK_ROWS: tl.constexpr, BLOCK_COLUMNS: tl.constexpr,
                                BLOCK_CONTRACTION: tl.constexpr, GROUP_TILES: tl.constexpr,
                                NUM_STAGES: tl.constexpr):
    """One (BLOCK_ROWS, BLOCK_COLUMNS) tile of C for program (tile, b); see `fixed_point_product`. The left operand's
    rows are `contraction` long, the right's and the fixed-point C's `fixed_row_stride`."""
    tile, batch = tl.program_id(0), tl.program_id(1)
    row_tiles = tl.cdiv(num_identity, BLOCK_ROWS)
    column_tiles = tl.cdiv(fixed_row_stride, BLOCK_COLUMNS)
    # Tiles go GROUP_TILES row tiles at a time, row tile fastest: programs in flight together share column tiles.
    tiles_per_group = GROUP_TILES * column_tiles
    first_row_tile = (tile // tiles_per_group) * GROUP_TILES
    group_size = tl.minimum(row_tiles - first_row_tile, GROUP_TILES)
    row_tile = first_row_tile + (tile % tiles_per_group) % group_size
    column_tile = (tile % tiles_per_group) // group_size
    rows = row_tile * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    columns = column_tile * BLOCK_COLUMNS + tl.arange(0, BLOCK_COLUMNS)
    depth = tl.arange(0, BLOCK_CONTRACTION)
    in_rows = rows < num_identity
    in_stride = columns < fixed_row_stride
    left_ptrs = left_ptr + batch.to(tl.int64) * left_batch_stride + rows.to(tl.int64)[:, None] * contraction
    right_ptrs = right_ptr + batch.to(tl.int64) * right_batch_stride + columns[None, :]
    similarity = tl.zeros([BLOCK_ROWS, BLOCK_COLUMNS], dtype=tl.float32)
    for start in tl.range(0, contraction, BLOCK_CONTRACTION, num_stages=NUM_STAGES):
        steps = start + depth
        in_depth = steps < contraction
        left = tl.load(left_ptrs + steps[None, :], mask=in_rows[:, None] & in_depth[None, :], other=0.0)
        right = tl.load(right_ptrs + steps.to(tl.int64)[:, None] * fixed_row_stride,
                        mask=in_depth[:, None] & in_stride[None, :], other=0.0)
        similarity = tl.dot(left, right, similarity)
    # common.py's `fixed_point_similarity` in the same float32 steps; zeros past M, as its padding.
    real = in_rows[:, None] & (columns < num_pose)[None, :]
    scaled = tl.minimum(tl.maximum(similarity, -1.0), 1.0) * levels
    fixed_point = tl.where(real, tl.where(scaled >= 0, tl.floor(scaled + 0.5), tl.ceil(scaled - 0.5)), 0.0)
    tl.store(fixed_point_ptr + batch.to(tl.int64) * fixed_batch_stride + rows.to(tl.int64)[:, None] * fixed_row_stride
             + columns[None, :], fixed_point.to(tl.int16), mask=in_rows[:, None] & in_stride[None, :])
    # The first column pass's terms (fused.py's `_fixed_point_column_kernel`), summed over the tile's rows.
    weights = tl.where(real, tl.exp((fixed_point * similarity_step - 1.0) * inverse_epsilon), 0.0)
    tl.store(partial_ptr + (batch * row_tiles + row_tile).to(tl.int64) * num_pose + columns, tl.sum(weights, axis=0),
             mask=columns < num_pose)


def fixed_point_product(left: torch.Tensor, right: torch.Tensor, num_pose: int, epsilon: float,
                        tile: ProductTile = TILES[0]) -> tuple[torch.Tensor, torch.Tensor]:
    """`fused.fused_fixed_point_column_pass(float_product_of_halves(left, right)[..., :num_pose], epsilon)` in one
    kernel that never writes the float32 product.

    Args:
        left: float16 (B, N, 3K), contiguous; right: float16 (B, 3K, M'), contiguous, M' = aligned(num_pose), zero
            past num_pose: the operands of `layers.split_operands`.
        num_pose: M.
        epsilon: entropic temperature.
        tile: the launch (for benchmarks).
    Returns:
        fixed_point: int16 (B, N, M), a view of rows zero-padded to M' lanes (common.py's `fixed_point_similarity`).
        column_sum: float32 (B, M), sum_n exp((q * SIMILARITY_STEP - 1) / epsilon).
    """
    batch, num_identity, contraction = left.shape
    padded_pose = aligned(num_pose)
    if (left.dtype != torch.float16 or right.dtype != torch.float16 or not left.is_contiguous()
            or not right.is_contiguous() or right.shape != (batch, contraction, padded_pose)):
        raise ValueError(f"fixed_point_product takes contiguous float16 left (B, N, K) and right (B, K, {padded_pose}) "
                         f"operands, got {left.dtype} {tuple(left.shape)} and {right.dtype} {tuple(right.shape)}")
    reason = fused.unsupported_reason(left.new_empty(1, 1, 1, dtype=torch.float32))
    if reason is not None:
        raise RuntimeError(reason)
    row_tiles = -(-num_identity // tile.block_rows)
    column_tiles = -(-padded_pose // tile.block_columns)
    fixed_point = left.new_empty(batch, num_identity, padded_pose, dtype=torch.int16)
    partial = left.new_empty(batch, row_tiles, num_pose, dtype=torch.float32)
    with fused._on_device(left):
        _fixed_point_product_kernel[(row_tiles * column_tiles, batch)](
            left, right, fixed_point, partial, num_identity, num_pose, contraction, padded_pose, left.stride(0),
            right.stride(0), fixed_point.stride(0), float(SIMILARITY_LEVELS), SIMILARITY_STEP, 1.0 / epsilon,
            BLOCK_ROWS=tile.block_rows, BLOCK_COLUMNS=tile.block_columns, BLOCK_CONTRACTION=tile.block_contraction,
            GROUP_TILES=tile.group_tiles, NUM_STAGES=tile.stages, num_warps=tile.num_warps)
    return fixed_point[..., :num_pose], partial.sum(1)


def probe_operands(batch: int, num_identity: int, num_pose: int, device: str, channels: int = FEATURE_CHANNELS,
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unit features theta (B, N, K) and phi (B, K, M), float32, as Corr gives them, and their split operands."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.nn.functional.normalize(torch.randn(batch, channels, num_identity + num_pose,
                                                         generator=generator), dim=1)
    theta_rows = features[..., :num_identity].transpose(1, 2).contiguous().to(device)
    pose_phi = features[..., num_identity:].contiguous().to(device)
    return (theta_rows, pose_phi, *split_operands(theta_rows, pose_phi))


def product_errors(theta_rows: torch.Tensor, pose_phi: torch.Tensor, left: torch.Tensor, right: torch.Tensor,
                   epsilon: float = SINKHORN_EPSILON, tile: ProductTile = TILES[0]) -> dict[str, float]:
    """The kernel's results against C in float64 and against the two passes it replaces: levels of the fixed-point C
    that differ (C near a rounding boundary may round either way), the largest difference in levels, and the column
    sums' relative L2 error."""
    num_pose = pose_phi.shape[2]
    fixed_point, column_sum = fixed_point_product(left, right, num_pose, epsilon, tile)
    exact = fixed_point_similarity(theta_rows.double() @ pose_phi.double())
    exact_sum = torch.exp((exact.double() * SIMILARITY_STEP - 1.0) / epsilon).sum(1)
    two_pass, two_pass_sum = fused.fused_fixed_point_column_pass(float_product_of_halves(left, right)[..., :num_pose],
                                                                 epsilon)
    errors = {}
    for name, levels, total in (("float64", exact, exact_sum), ("two_pass", two_pass, two_pass_sum)):
        difference = (fixed_point.int() - levels.int()).abs()
        errors[f"{name}_level_mismatches"] = int((difference > 0).sum())
        errors[f"{name}_largest_level_difference"] = int(difference.max())
        errors[f"{name}_column_sum_error"] = ((column_sum.double() - total.double()).norm()
                                              / total.double().norm()).item()
    return errors


def check(errors: dict[str, float]) -> None:
    """Raise unless the kernel rounds as the references do to one level and sums as they do to CHECK_TOLERANCE."""
    for name in ("float64", "two_pass"):
        if errors[f"{name}_largest_level_difference"] > 1 or not errors[f"{name}_column_sum_error"] <= CHECK_TOLERANCE:
            raise RuntimeError(f"the fused product is off from the {name} reference: {json.dumps(errors)}")


def time_product(batch: int, vertices: int) -> dict:
    """ms of the split product with the fixed-point column pass after it, each alone and together, and of the
    kernel at each of TILES (CUDA events, medians of 20 after 3 warm-ups), with each tile's errors."""
    theta_rows, pose_phi, left, right = probe_operands(batch, vertices, vertices, "cuda")

    def median_ms(step) -> float:
        return time_median(step, torch.device("cuda"), warmup=3, repeats=20)

    product = float_product_of_halves(left, right)[..., :vertices]
    result = {"split_product_ms": median_ms(lambda: float_product_of_halves(left, right)),
              "column_pass_ms": median_ms(lambda: fused.fused_fixed_point_column_pass(product, SINKHORN_EPSILON)),
              "both_ms": median_ms(lambda: fused.fused_fixed_point_column_pass(
                  float_product_of_halves(left, right)[..., :vertices], SINKHORN_EPSILON)),
              "tiles": {}}
    for tile in TILES:
        name = "x".join(map(str, tile))
        try:
            result["tiles"][name] = {"errors": product_errors(theta_rows, pose_phi, left, right, tile=tile),
                                     "ms": median_ms(lambda: fixed_point_product(left, right, vertices,
                                                                                 SINKHORN_EPSILON, tile))}
        except Exception as error:  # a tile that does not launch (shared memory, registers) says why and is skipped
            result["tiles"][name] = {"error": f"{type(error).__name__}: {error}"}
    return result


def main(argv: list[str] | None = None) -> None:
    parser = OneLineErrorParser(prog="python -m scripts.similarity_product_probe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only compare values with the references")
    parser.add_argument("--vertices", type=int, default=6890)
    parser.add_argument("--out", default="", help="write the timings as JSON here")
    args = parser.parse_args(argv)
    if args.vertices < 1:
        raise ValueError(f"--vertices must be at least 1, got {args.vertices}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    reason = fused.unsupported_reason(torch.empty(1, 1, 1, device=device))
    if reason is not None:
        raise RuntimeError(reason)
    errors = product_errors(*probe_operands(2, 37, 45, device, channels=24), tile=ProductTile(16, 16, 16, 4, 1, 2))
    print(f"fused product: {json.dumps(errors)}", flush=True)
    check(errors)
    if args.check:
        return
    if device != "cuda":
        raise RuntimeError("timing the product needs a GPU; use --check on a CPU")
    started = time.perf_counter()
    results = {}
    for batch in (8, 1):
        results[f"batch{batch}"] = time_product(batch, args.vertices)
        print(f"batch{batch}", json.dumps(results[f"batch{batch}"]), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(),
                                              "seconds": time.perf_counter() - started, **results}, indent=1))


if __name__ == "__main__":
    run_main(main)
