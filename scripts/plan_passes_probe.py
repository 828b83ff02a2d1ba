"""Device probe: the stored warp's last two Inductor passes over C as Triton kernels in fused.py's grouped layout,
timed against the compiled passes they would replace.

With fused passes (a GPU, bounded shifts, C in one block) the stored warp still leaves two reads of C to Inductor:
the final softmax's warp in the forward (`stored._plan_warp`: per identity row, the sum of exp(s + log b_T - shift)
and its weighted sum of the pose points) and, in the backward, that softmax's column sums (`stored._plan_column_sums`:
per pose column, the sums of the same weights times four per-row coefficients). The seventeenth session's profile
had the first at 0.66 ms a batch of 8 on a fixed-point C, 0.76 GB, about a third of the H100's bandwidth. Here the
first is a row pass (fused.py's first sweep, with four sums a row instead of one) and the second a column pass
(column chunk by column chunk, as fused.py's fixed-point column pass), both with fused.py's PASS_LAYOUT.

    python -m scripts.plan_passes_probe --check            # values against float64 (on a CPU: TRITON_INTERPRET=1)
    python -m scripts.plan_passes_probe --out probe.json   # a GPU: ms of both against the compiled passes
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from models.networks.ot import fused, stored
from models.networks.ot.common import bounded_shift, fixed_point_similarity
from util.bench import time_median
from util.cli import OneLineErrorParser, run_main

tl = fused.tl
EPSILON = stored.SINKHORN_EPSILON
# Largest relative L2 error --check and the tests accept against the float64 references.
CHECK_TOLERANCE = 1e-5
# Columns of the backward's per-row coefficients: the upstream gradient's three and -g.out (`_stored_backward`).
ROW_WEIGHT_COLUMNS = 4
# Layouts --out times, the first the kernels' default. Both kernels hold four sums a lane, so fused.PASS_LAYOUT's
# 8 x 1024 tiles would take up to 254 registers a thread; these take at most 128 for sm_90a (Triton 3.9's ptxas,
# float32 and fixed-point C), so that two programs of 8 warps share an SM.
LAYOUTS = [fused.PassLayout(8, 512, 8, 1, 2), fused.PassLayout(8, 256, 8, 1, 2), fused.PassLayout(16, 256, 8, 1, 2),
           fused.PassLayout(4, 512, 4, 1, 4)]


@fused._triton_jit
def _plan_warp_kernel(similarity_ptr, log_b_ptr, shift_ptr, points_ptr, warp_ptr, total_ptr, num_identity,
                      num_pose, readable_pose, batch_stride, row_stride, rows_per_program, similarity_step,
                      inverse_epsilon, GROUP_ROWS: tl.constexpr, CHUNK_LANES: tl.constexpr, NUM_STAGES: tl.constexpr):
    """Rows [p * rows_per_program, ...) of batch element b for program (p, b); see `plan_warp`."""
    batch = tl.program_id(1)
    first = tl.program_id(0) * rows_per_program
    last = tl.minimum(first + rows_per_program, num_identity)
    batch_ptr = similarity_ptr + batch.to(tl.int64) * batch_stride
    shift = tl.load(shift_ptr + batch)
    lanes = tl.arange(0, CHUNK_LANES)
    for group in range(first, last, GROUP_ROWS):
        rows, in_rows, row_ptrs = fused._group_rows(batch_ptr, group, last, row_stride, GROUP_ROWS)
        total = tl.zeros([GROUP_ROWS, CHUNK_LANES], dtype=tl.float32)
        sum_x = tl.zeros([GROUP_ROWS, CHUNK_LANES], dtype=tl.float32)
        sum_y = tl.zeros([GROUP_ROWS, CHUNK_LANES], dtype=tl.float32)
        sum_z = tl.zeros([GROUP_ROWS, CHUNK_LANES], dtype=tl.float32)
        for start in tl.range(0, num_pose, CHUNK_LANES, num_stages=NUM_STAGES):
            columns = start + lanes
            log_kernel = fused._log_kernel_tile(row_ptrs, in_rows, columns, num_pose, readable_pose, similarity_step,
                                                inverse_epsilon)
            # Lanes past M have log b = -inf and points 0.
            weights = tl.exp(log_kernel + (fused._pose_chunk(log_b_ptr, batch, num_pose, columns, float("-inf"))
                                           - shift)[None, :])
            total += weights
            sum_x += weights * fused._pose_chunk(points_ptr, 3 * batch, num_pose, columns, 0.0)[None, :]
            sum_y += weights * fused._pose_chunk(points_ptr, 3 * batch + 1, num_pose, columns, 0.0)[None, :]
            sum_z += weights * fused._pose_chunk(points_ptr, 3 * batch + 2, num_pose, columns, 0.0)[None, :]
        row_total = tl.sum(total, axis=1)  # (GROUP_ROWS,)
        index = batch * num_identity + rows
        tl.store(total_ptr + index, row_total, mask=in_rows)
        tl.store(warp_ptr + index * 3, tl.sum(sum_x, axis=1) / row_total, mask=in_rows)
        tl.store(warp_ptr + index * 3 + 1, tl.sum(sum_y, axis=1) / row_total, mask=in_rows)
        tl.store(warp_ptr + index * 3 + 2, tl.sum(sum_z, axis=1) / row_total, mask=in_rows)


@fused._triton_jit
def _plan_column_kernel(similarity_ptr, log_b_ptr, shift_ptr, row_weights_ptr, partial_ptr, num_identity, num_pose,
                        readable_pose, batch_stride, row_stride, rows_per_program, similarity_step, inverse_epsilon,
                        GROUP_ROWS: tl.constexpr, CHUNK_LANES: tl.constexpr, NUM_STAGES: tl.constexpr):
    """Rows [p * rows_per_program, ...) of batch element b for program (p, b); see `plan_column_sums`. Column chunk
    by column chunk, each summed over the program's rows in registers; partial sums (B, P, 4, M)."""
    batch, _, batch_ptr, column_sums_ptr, first, last = fused._program_rows(
        similarity_ptr, partial_ptr, num_identity, 4 * num_pose, batch_stride, rows_per_program)
    shift = tl.load(shift_ptr + batch)
    lanes = tl.arange(0, CHUNK_LANES)
    for start in range(0, num_pose, CHUNK_LANES):
        columns = start + lanes
        in_row = columns < num_pose
        offset = fused._pose_chunk(log_b_ptr, batch, num_pose, columns, float("-inf")) - shift
        sum_0 = tl.zeros([CHUNK_LANES], dtype=tl.float32)
        sum_1 = tl.zeros([CHUNK_LANES], dtype=tl.float32)
        sum_2 = tl.zeros([CHUNK_LANES], dtype=tl.float32)
        sum_3 = tl.zeros([CHUNK_LANES], dtype=tl.float32)
        for group in tl.range(first, last, GROUP_ROWS, num_stages=NUM_STAGES):
            rows, in_rows, row_ptrs = fused._group_rows(batch_ptr, group, last, row_stride, GROUP_ROWS)
            log_kernel = fused._log_kernel_tile(row_ptrs, in_rows, columns, num_pose, readable_pose, similarity_step,
                                                inverse_epsilon)
            weights = tl.exp(log_kernel + offset[None, :])
            # Rows past the program's have coefficients 0.
            coefficient_ptrs = row_weights_ptr + (batch * num_identity + rows) * 4
            sum_0 += tl.sum(weights * tl.load(coefficient_ptrs, mask=in_rows, other=0.0)[:, None], axis=0)
            sum_1 += tl.sum(weights * tl.load(coefficient_ptrs + 1, mask=in_rows, other=0.0)[:, None], axis=0)
            sum_2 += tl.sum(weights * tl.load(coefficient_ptrs + 2, mask=in_rows, other=0.0)[:, None], axis=0)
            sum_3 += tl.sum(weights * tl.load(coefficient_ptrs + 3, mask=in_rows, other=0.0)[:, None], axis=0)
        tl.store(column_sums_ptr + columns, sum_0, mask=in_row)
        tl.store(column_sums_ptr + num_pose + columns, sum_1, mask=in_row)
        tl.store(column_sums_ptr + 2 * num_pose + columns, sum_2, mask=in_row)
        tl.store(column_sums_ptr + 3 * num_pose + columns, sum_3, mask=in_row)


def plan_warp(similarity: torch.Tensor, log_b: torch.Tensor, pose_points: torch.Tensor, shift: torch.Tensor,
              epsilon: float, layout: fused.PassLayout = LAYOUTS[0]) -> tuple[torch.Tensor, torch.Tensor]:
    """`stored._plan_warp` with a bounded shift: the warp softmax_m(s + log b) @ pose_points (B, N, 3) and the
    softmax's sums (B, N) of exp(s + log b - shift).

    Args:
        similarity: C, float32 or fixed point (B, N, M), rows contiguous (`fused.fused_pass_supported`).
        log_b: float32 (B, M); pose_points: float32 (B, M, 3); shift: float32 (B,), `bounded_shift` of log b.
    """
    fused._validate_fused_inputs(similarity, epsilon, None, layout, log_b=(log_b, "BM"), shift=(shift, "B"))
    batch, num_identity, num_pose = similarity.shape
    if pose_points.shape != (batch, num_pose, 3):
        raise ValueError(f"pose_points must have shape {(batch, num_pose, 3)}, got {tuple(pose_points.shape)}")
    programs, rows_per_program = fused._programs(similarity, None, layout)
    warp = similarity.new_empty(batch, num_identity, 3, dtype=torch.float32)
    total = similarity.new_empty(batch, num_identity, dtype=torch.float32)
    with fused._on_device(similarity):
        _plan_warp_kernel[(programs, batch)](
            similarity, log_b.contiguous(), shift.contiguous(), pose_points.float().transpose(1, 2).contiguous(), warp,
            total, num_identity, num_pose, fused._readable_width(similarity), similarity.stride(0),
            similarity.stride(1), rows_per_program, fused._similarity_step(similarity), 1.0 / epsilon,
            **fused._compile_constants(layout))
    return warp, total


def plan_column_sums(similarity: torch.Tensor, log_b: torch.Tensor, shift: torch.Tensor, row_weights: torch.Tensor,
                     epsilon: float, layout: fused.PassLayout = LAYOUTS[0]) -> torch.Tensor:
    """`stored._plan_column_sums` with a bounded shift: sum_n exp(s + log b[m] - shift) row_weights[n], (B, M, 4).

    Args:
        similarity, log_b, shift: as in `plan_warp`; row_weights: float32 (B, N, 4).
    """
    fused._validate_fused_inputs(similarity, epsilon, None, layout, log_b=(log_b, "BM"), shift=(shift, "B"))
    batch, num_identity, num_pose = similarity.shape
    if row_weights.shape != (batch, num_identity, ROW_WEIGHT_COLUMNS):
        raise ValueError(f"row_weights must have shape {(batch, num_identity, ROW_WEIGHT_COLUMNS)}, "
                         f"got {tuple(row_weights.shape)}")
    programs, rows_per_program = fused._programs(similarity, None, layout)
    partial = similarity.new_empty(batch, programs, ROW_WEIGHT_COLUMNS, num_pose, dtype=torch.float32)
    with fused._on_device(similarity):
        _plan_column_kernel[(programs, batch)](
            similarity, log_b.contiguous(), shift.contiguous(), row_weights.float().contiguous(), partial,
            num_identity, num_pose, fused._readable_width(similarity), similarity.stride(0), similarity.stride(1),
            rows_per_program, fused._similarity_step(similarity), 1.0 / epsilon, **fused._compile_constants(layout))
    return partial.sum(1).transpose(1, 2)


def probe_inputs(batch: int, num_identity: int, num_pose: int, device: str, fixed_point: bool,
                 seed: int = 0) -> dict[str, torch.Tensor]:
    """C of random unit 16-channel features (B, N, M), float32 or 16-bit fixed point, with log b (B, M), its bounded
    shift (B,), pose points (B, M, 3) and the backward's row weights (B, N, 4)."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.nn.functional.normalize(torch.randn(batch, 16, num_identity + num_pose, generator=generator),
                                             dim=1)
    similarity = features[..., :num_identity].transpose(1, 2) @ features[..., num_identity:]  # (B, N, M)
    log_b = -math.log(num_pose) + 0.1 * torch.randn(batch, num_pose, generator=generator)
    inputs = {"similarity": fixed_point_similarity(similarity) if fixed_point else similarity, "log_b": log_b,
              "shift": bounded_shift(log_b, 1.0, EPSILON), "pose_points": torch.randn(batch, num_pose, 3,
                                                                                      generator=generator),
              "row_weights": torch.randn(batch, num_identity, ROW_WEIGHT_COLUMNS, generator=generator)}
    return {name: value.to(device) for name, value in inputs.items()}


def _relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value.double() - reference.double()).norm() / reference.double().norm()).item()


def _references(inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """stored.py's passes in float64: warp (B, N, 3), softmax sums (B, N), column sums (B, M, 4)."""
    similarity = inputs["similarity"]
    if similarity.dtype != torch.int16:
        similarity = similarity.double()
    log_b, shift = inputs["log_b"].double(), inputs["shift"].double()
    warp, _, total = stored._plan_warp(similarity, log_b, inputs["pose_points"].double(), EPSILON, shift)
    plan_max = shift.view(-1, 1).expand(similarity.shape[:2])
    column_sums = stored._plan_column_sums(similarity, log_b, plan_max, inputs["row_weights"].double(), EPSILON)
    return warp, total, column_sums


def pass_errors(inputs: dict[str, torch.Tensor], layout: fused.PassLayout = LAYOUTS[0]) -> dict[str, float]:
    """Relative L2 errors of both kernels' results against `_references`, by result name."""
    warp, total = plan_warp(inputs["similarity"], inputs["log_b"], inputs["pose_points"], inputs["shift"], EPSILON,
                            layout)
    column_sums = plan_column_sums(inputs["similarity"], inputs["log_b"], inputs["shift"], inputs["row_weights"],
                                   EPSILON, layout)
    return {name: _relative_error(value, reference) for name, value, reference in
            zip(("warp", "total", "column_sums"), (warp, total, column_sums), _references(inputs))}


def time_passes(batch: int, vertices: int, fixed_point: bool) -> dict:
    """ms of the compiled passes and of both kernels at each of LAYOUTS (CUDA events, medians of 20 after 3
    warm-ups), with each layout's errors against the float64 references."""
    inputs = probe_inputs(batch, vertices, vertices, "cuda", fixed_point)
    similarity, log_b, shift, row_weights = (inputs[name] for name in ("similarity", "log_b", "shift", "row_weights"))
    pose_major_points = stored._pose_major(inputs["pose_points"])
    plan_max = shift.view(-1, 1).expand(batch, vertices)

    def median_ms(step) -> float:
        return time_median(step, torch.device("cuda"), warmup=3, repeats=20)

    result = {"compiled_plan_warp_ms": median_ms(lambda: stored._run_pass(
                  True, stored._plan_warp, similarity, log_b, pose_major_points, EPSILON, shift)),
              "compiled_plan_column_sums_ms": median_ms(lambda: stored._run_pass(
                  True, stored._plan_column_sums, similarity, log_b, plan_max, row_weights, EPSILON)),
              "layouts": {}}
    for layout in LAYOUTS:
        result["layouts"]["x".join(map(str, layout))] = {
            "errors": pass_errors(inputs, layout),
            "plan_warp_ms": median_ms(lambda: plan_warp(similarity, log_b, inputs["pose_points"], shift, EPSILON,
                                                        layout)),
            "plan_column_sums_ms": median_ms(lambda: plan_column_sums(similarity, log_b, shift, row_weights, EPSILON,
                                                                      layout))}
    return result


def main(argv: list[str] | None = None) -> None:
    parser = OneLineErrorParser(prog="python -m scripts.plan_passes_probe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only compare values with the float64 references")
    parser.add_argument("--vertices", type=int, default=6890)
    parser.add_argument("--out", default="", help="write the timings as JSON here")
    args = parser.parse_args(argv)
    if args.vertices < 1:
        raise ValueError(f"--vertices must be at least 1, got {args.vertices}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    reason = fused.unsupported_reason(torch.empty(1, 1, 1, device=device))
    if reason is not None:
        raise RuntimeError(reason)
    for fixed_point in (False, True):
        errors = pass_errors(probe_inputs(2, 37, 45, device, fixed_point), fused.PassLayout(4, 16, 4, 1, 1))
        error = max(errors.values())
        print(f"{'fixed point' if fixed_point else 'float32'} C: largest relative error {error:.1e}", flush=True)
        if not error <= CHECK_TOLERANCE:
            raise RuntimeError(f"the plan passes are off by {error:.1e} (tolerance {CHECK_TOLERANCE:.0e})")
    if args.check:
        return
    if device != "cuda":
        raise RuntimeError("timing the passes needs a GPU; use --check on a CPU")
    started = time.perf_counter()
    results = {}
    for batch in (8, 1):
        for fixed_point in (True, False):
            key = f"batch{batch}_{'fixed_point' if fixed_point else 'float32'}"
            results[key] = time_passes(batch, args.vertices, fixed_point)
            print(key, json.dumps(results[key]), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(),
                                              "seconds": time.perf_counter() - started, **results}, indent=1))


if __name__ == "__main__":
    run_main(main)
