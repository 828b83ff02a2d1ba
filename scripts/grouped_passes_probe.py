"""Device probe: the fused Sinkhorn passes with identity rows taken in groups, timed against fused.py's kernels.

fused.py's row + column passes (`fused_row_column_forward`, `fused_row_column_backward`) hold one whole row of C
in a program's registers at a time, and every row waits for a block-wide reduction before its column sums can
be added: on the H100 they take the same time on a float32 C and on its 16-bit copy, half the bytes, and run
faster with fewer warps in each reduction (docs/benchmarks.md, seventeenth session). Here a program takes R rows
at once and sweeps them twice in column chunks: first the R row sums, each accumulated lane by lane and reduced
once for the group, then the group's contributions to the column sums, added to the program's partial sums in
global memory (the R rows are reread from L2, R x 13.8 KB on a fixed-point C at M = 6890). Rows of any width fit,
the chunks being fixed, where fused.py is limited to M <= 16,384 by its registers.

The values are fused.py's (the same shifts and formulas); only the order of the sums differs.

    python -m scripts.grouped_passes_probe --check             # values against the float64 references
                                                                # (on a CPU: TRITON_INTERPRET=1 first)
    python -m scripts.grouped_passes_probe --out probe.json    # a GPU: ms of each layout against fused.py's
    python -m scripts.grouped_passes_probe --registers         # no GPU needed: registers a thread of each layout
                                                                # for sm_90a, from Triton's bundled ptxas
"""
from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch

from models.networks.ot import fused
from models.networks.ot.common import LOG_DIVISION_EPS, bounded_shift, fixed_point_similarity
from util.bench import time_median
from util.cli import OneLineErrorParser, run_main
from util.triton_offline import hopper_ptx, ptxas_usage

triton, tl = fused.triton, fused.tl
EPSILON = 0.03
SIMILARITY_BOUND = 1.0


class GroupLayout(NamedTuple):
    """How a grouped pass is launched."""
    rows: int  # R, identity rows a program sweeps at once (a power of two)
    chunk: int  # lanes of a row a sweep step loads (a power of two)
    num_warps: int
    stages: int  # chunks in flight
    programs_per_sm: int  # programs over the whole batch, per streaming multiprocessor


# Layouts --out times (the first is the default of `grouped_forward` and `grouped_backward`). Registers a thread
# (--registers), forward pass on a fixed-point C: 8 x 1024 at 8 warps takes 118 with 1 stage (two programs fit an
# H100 SM), 161 with 2, 211 with 3; fused.py's forward pass takes 161 (seventeenth session).
LAYOUTS = [GroupLayout(8, 1024, 8, 1, 2), GroupLayout(8, 1024, 8, 1, 4), GroupLayout(8, 1024, 8, 2, 2),
           GroupLayout(8, 1024, 8, 3, 1), GroupLayout(8, 512, 4, 1, 4), GroupLayout(8, 512, 4, 2, 4),
           GroupLayout(4, 512, 4, 2, 8), GroupLayout(16, 512, 8, 1, 2), GroupLayout(16, 1024, 8, 1, 2),
           GroupLayout(4, 1024, 4, 1, 4), GroupLayout(8, 256, 2, 2, 8)]
# Programs per batch element without a GPU (the interpreter).
INTERPRETER_PROGRAMS = 3
# Largest relative L2 error --check accepts against the float64 references (fused.py's tests allow 1e-5 elementwise).
CHECK_TOLERANCE = 1e-5


@fused._triton_jit
def _program_span(similarity_ptr, partial_ptr, num_identity, num_pose, batch_stride, rows_per_program):
    """Program (p, b)'s batch element b, its partial sums' index, pointers to b's C and to its partial sums, and its
    rows [first, last)."""
    program = tl.program_id(0)
    batch = tl.program_id(1)
    partial = batch * tl.num_programs(0) + program
    first = program * rows_per_program
    return (batch, partial, similarity_ptr + batch.to(tl.int64) * batch_stride,
            partial_ptr + partial.to(tl.int64) * num_pose, first, tl.minimum(first + rows_per_program, num_identity))


@fused._triton_jit
def _group_rows(batch_ptr, group, last, row_stride, ROWS: tl.constexpr):
    """The group's row indices, which of them are below `last`, and pointers to their first lanes."""
    rows = group + tl.arange(0, ROWS)
    return rows, rows < last, batch_ptr + rows.to(tl.int64)[:, None] * row_stride


@fused._triton_jit
def _log_kernel_tile(row_ptrs, in_rows, columns, readable_pose, similarity_step, inverse_epsilon):
    """s = (C - 1) / epsilon of the group's rows at `columns`, (R, CHUNK); lanes at or past readable_pose are
    loaded as C = 0."""
    loaded = tl.load(row_ptrs + columns[None, :], mask=in_rows[:, None] & (columns < readable_pose)[None, :],
                     other=0).to(tl.float32) * similarity_step
    return (loaded - 1.0) * inverse_epsilon


@fused._triton_jit
def _grouped_forward_kernel(similarity_ptr, log_b_ptr, row_shift_ptr, row_sum_ptr, log_a_ptr, partial_ptr,
                            program_shift_ptr, num_identity, num_pose, readable_pose, batch_stride, row_stride,
                            rows_per_program, similarity_step, inverse_epsilon, log_num_identity, log_division_eps,
                            ROWS: tl.constexpr, CHUNK: tl.constexpr, NUM_STAGES: tl.constexpr):
    """Rows [p * rows_per_program, ...) of batch element b for program (p, b), R at a time; see `grouped_forward`.
    The partial column sums (zeros at launch) are shifted by the largest log a so far, as in fused.py."""
    batch, partial, batch_ptr, column_sum_ptr, first, last = _program_span(
        similarity_ptr, partial_ptr, num_identity, num_pose, batch_stride, rows_per_program)
    row_shift = tl.load(row_shift_ptr + batch)
    lanes = tl.arange(0, CHUNK)
    program_shift = tl.full([], float("-inf"), tl.float32)
    for group in range(first, last, ROWS):
        rows, in_rows, row_ptrs = _group_rows(batch_ptr, group, last, row_stride, ROWS)
        terms = tl.zeros([ROWS, CHUNK], dtype=tl.float32)
        for start in tl.range(0, readable_pose, CHUNK, num_stages=NUM_STAGES):
            columns = start + lanes
            log_kernel = _log_kernel_tile(row_ptrs, in_rows, columns, readable_pose, similarity_step, inverse_epsilon)
            # Lanes past M have log b = -inf, so their terms are 0.
            offset = tl.load(log_b_ptr + batch * num_pose + columns, mask=columns < num_pose,
                             other=float("-inf")) - row_shift
            terms += tl.exp(log_kernel + offset[None, :])
        row_sum = tl.sum(terms, axis=1)  # (R,)
        row_lse = row_shift + tl.log(row_sum)
        high = tl.maximum(row_lse, log_division_eps)  # logaddexp(row_lse, log 1e-8), as fused.py forms it
        log_a = -log_num_identity - (high + tl.log(1.0 + tl.exp(tl.minimum(row_lse, log_division_eps) - high)))
        index = batch * num_identity + rows
        tl.store(row_sum_ptr + index, row_sum, mask=in_rows)
        tl.store(log_a_ptr + index, log_a, mask=in_rows)
        log_a = tl.where(in_rows, log_a, float("-inf"))
        shift = tl.maximum(program_shift, tl.max(log_a, axis=0))
        rescale = tl.exp(program_shift - shift)  # 0 for the first group
        for start in tl.range(0, num_pose, CHUNK, num_stages=NUM_STAGES):
            columns = start + lanes
            in_row = columns < num_pose
            log_kernel = _log_kernel_tile(row_ptrs, in_rows, columns, readable_pose, similarity_step, inverse_epsilon)
            contribution = tl.sum(tl.exp(log_kernel + (log_a - shift)[:, None]), axis=0)  # (CHUNK,)
            column_sum = tl.load(column_sum_ptr + columns, mask=in_row, other=0.0)
            tl.store(column_sum_ptr + columns, column_sum * rescale + contribution, mask=in_row)
        program_shift = shift
    tl.store(program_shift_ptr + partial, program_shift)


@fused._triton_jit
def _grouped_backward_kernel(similarity_ptr, log_a_prev_ptr, column_shift_ptr, column_coefficient_ptr,
                             row_shift_ptr, row_sum_ptr, log_b_prev_ptr, grad_log_a_ptr, row_coefficient_ptr,
                             partial_ptr, num_identity, num_pose, readable_pose, batch_stride, row_stride,
                             rows_per_program, similarity_step, inverse_epsilon, log_division_eps,
                             ROWS: tl.constexpr, CHUNK: tl.constexpr, NUM_STAGES: tl.constexpr):
    """Rows [p * rows_per_program, ...) of batch element b for program (p, b), R at a time; see
    `grouped_backward`. The partial sums of dlog b are zeros at launch."""
    batch, _, batch_ptr, grad_log_b_ptr, first, last = _program_span(
        similarity_ptr, partial_ptr, num_identity, num_pose, batch_stride, rows_per_program)
    column_shift = tl.load(column_shift_ptr + batch)
    row_shift = tl.load(row_shift_ptr + batch)
    lanes = tl.arange(0, CHUNK)
    for group in range(first, last, ROWS):
        rows, in_rows, row_ptrs = _group_rows(batch_ptr, group, last, row_stride, ROWS)
        index = batch * num_identity + rows
        row_offset = tl.load(log_a_prev_ptr + index, mask=in_rows, other=float("-inf")) - column_shift
        terms = tl.zeros([ROWS, CHUNK], dtype=tl.float32)
        for start in tl.range(0, readable_pose, CHUNK, num_stages=NUM_STAGES):
            columns = start + lanes
            log_kernel = _log_kernel_tile(row_ptrs, in_rows, columns, readable_pose, similarity_step, inverse_epsilon)
            # Lanes past M have coefficient 0.
            coefficient = tl.load(column_coefficient_ptr + batch * num_pose + columns, mask=columns < num_pose,
                                  other=0.0)
            terms += tl.exp(log_kernel + row_offset[:, None]) * coefficient[None, :]
        grad_log_a = tl.sum(terms, axis=1)  # (R,)
        row_sum = tl.load(row_sum_ptr + index, mask=in_rows, other=1.0)
        row_coefficient = (-tl.sigmoid(row_shift + tl.log(row_sum) - log_division_eps) * grad_log_a) / row_sum
        row_coefficient = tl.where(in_rows, row_coefficient, 0.0)
        tl.store(grad_log_a_ptr + index, grad_log_a, mask=in_rows)
        tl.store(row_coefficient_ptr + index, row_coefficient, mask=in_rows)
        for start in tl.range(0, num_pose, CHUNK, num_stages=NUM_STAGES):
            columns = start + lanes
            in_row = columns < num_pose
            log_kernel = _log_kernel_tile(row_ptrs, in_rows, columns, readable_pose, similarity_step, inverse_epsilon)
            column_offset = tl.load(log_b_prev_ptr + batch * num_pose + columns, mask=in_row,
                                    other=float("-inf")) - row_shift
            contribution = tl.sum(tl.exp(log_kernel + column_offset[None, :]) * row_coefficient[:, None], axis=0)
            grad_log_b = tl.load(grad_log_b_ptr + columns, mask=in_row, other=0.0)
            tl.store(grad_log_b_ptr + columns, grad_log_b + contribution, mask=in_row)


def _programs(similarity: torch.Tensor, layout: GroupLayout) -> tuple[int, int]:
    """Programs per batch element and rows per program of a grouped pass over similarity (B, N, M)."""
    batch, num_identity, _ = similarity.shape
    if similarity.is_cuda:
        sm_count = torch.cuda.get_device_properties(similarity.device).multi_processor_count
        programs = max(1, layout.programs_per_sm * sm_count // batch)
    else:
        programs = INTERPRETER_PROGRAMS
    programs = min(programs, num_identity)
    return programs, triton.cdiv(num_identity, programs)


def grouped_forward(similarity: torch.Tensor, log_b: torch.Tensor, row_shift: torch.Tensor, epsilon: float,
                    similarity_bound: float, layout: GroupLayout = LAYOUTS[0]
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`fused.fused_row_column_forward` (same arguments and results) with rows taken R at a time."""
    batch, num_identity, num_pose = similarity.shape
    programs, rows_per_program = _programs(similarity, layout)
    row_sum = similarity.new_empty(batch, num_identity, dtype=torch.float32)
    log_a = similarity.new_empty(batch, num_identity, dtype=torch.float32)
    partial = similarity.new_zeros(batch, programs, num_pose, dtype=torch.float32)
    program_shift = similarity.new_empty(batch, programs, dtype=torch.float32)
    _grouped_forward_kernel[(programs, batch)](
        similarity, log_b.contiguous(), row_shift.contiguous(), row_sum, log_a, partial, program_shift, num_identity,
        num_pose, fused._readable_width(similarity), similarity.stride(0), similarity.stride(1), rows_per_program,
        fused._similarity_step(similarity), 1.0 / epsilon, math.log(num_identity), LOG_DIVISION_EPS,
        ROWS=layout.rows, CHUNK=layout.chunk, NUM_STAGES=layout.stages, num_warps=layout.num_warps)
    column_shift = bounded_shift(program_shift, similarity_bound, epsilon)
    return row_sum, log_a, column_shift, fused._merge_column_partials(partial, program_shift, column_shift)


def grouped_backward(similarity: torch.Tensor, log_a_prev: torch.Tensor, column_shift: torch.Tensor,
                     column_coefficient: torch.Tensor, row_shift: torch.Tensor, row_sum: torch.Tensor,
                     log_b_prev: torch.Tensor, epsilon: float, layout: GroupLayout = LAYOUTS[0]
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`fused.fused_row_column_backward` (same arguments and results) with rows taken R at a time."""
    batch, num_identity, num_pose = similarity.shape
    programs, rows_per_program = _programs(similarity, layout)
    grad_log_a = similarity.new_empty(batch, num_identity, dtype=torch.float32)
    row_coefficient = similarity.new_empty(batch, num_identity, dtype=torch.float32)
    partial = similarity.new_zeros(batch, programs, num_pose, dtype=torch.float32)
    _grouped_backward_kernel[(programs, batch)](
        similarity, log_a_prev.contiguous(), column_shift.contiguous(), column_coefficient.contiguous(),
        row_shift.contiguous(), row_sum.contiguous(), log_b_prev.contiguous(), grad_log_a, row_coefficient, partial,
        num_identity, num_pose, fused._readable_width(similarity), similarity.stride(0), similarity.stride(1),
        rows_per_program, fused._similarity_step(similarity), 1.0 / epsilon, LOG_DIVISION_EPS,
        ROWS=layout.rows, CHUNK=layout.chunk, NUM_STAGES=layout.stages, num_warps=layout.num_warps)
    return grad_log_a, row_coefficient, partial.sum(1)


def probe_inputs(batch: int, num_identity: int, num_pose: int, device: str, fixed_point: bool,
                 seed: int = 0) -> dict[str, torch.Tensor]:
    """C of random unit 16-channel features (B, N, M), float32 or as 16-bit fixed point, with the forward pass's
    log b (B, M) and row shift (B,) and the backward pass's column coefficient (B, M)."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.nn.functional.normalize(torch.randn(batch, 16, num_identity + num_pose, generator=generator),
                                             dim=1).to(device)
    similarity = features[..., :num_identity].transpose(1, 2) @ features[..., num_identity:]  # (B, N, M)
    log_b = (-math.log(num_pose) + 0.1 * torch.randn(batch, num_pose, generator=generator)).to(device)
    return {"similarity": fixed_point_similarity(similarity) if fixed_point else similarity, "log_b": log_b,
            "row_shift": bounded_shift(log_b, SIMILARITY_BOUND, EPSILON),
            "column_coefficient": torch.randn(batch, num_pose, generator=generator).to(device)}


def _relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value.double() - reference.double()).norm() / reference.double().norm()).item()


def pass_errors(inputs: dict[str, torch.Tensor], layout: GroupLayout) -> dict[str, float]:
    """Relative L2 errors of both grouped passes against fused.py's float64 references, by result name."""
    similarity, log_b, row_shift = inputs["similarity"], inputs["log_b"], inputs["row_shift"]
    forward = grouped_forward(similarity, log_b, row_shift, EPSILON, SIMILARITY_BOUND, layout)
    forward_reference = fused.fused_row_column_forward_naive(similarity, log_b, row_shift, EPSILON, SIMILARITY_BOUND)
    row_sum, log_a, column_shift, _ = (t.float() for t in forward_reference)
    backward_args = (similarity, log_a, column_shift, inputs["column_coefficient"], row_shift, row_sum, log_b)
    backward = grouped_backward(*backward_args, EPSILON, layout)
    backward_reference = fused.fused_row_column_backward_naive(*backward_args, EPSILON)
    names = ["row_sum", "log_a", "column_shift", "column_sum", "grad_log_a", "row_coefficient", "grad_log_b"]
    return {name: _relative_error(value, reference) for name, value, reference in
            zip(names, [*forward, *backward], [*forward_reference, *backward_reference])}


def _median_ms(step: Callable[[], object]) -> float:
    return time_median(step, torch.device("cuda"), warmup=3, repeats=20)


def time_layouts(batch: int, vertices: int, fixed_point: bool) -> dict:
    """ms of fused.py's forward and backward passes and of each grouped layout's (CUDA events, medians of 20 after
    3 warm-ups), with each layout's largest relative error against fused.py's results."""
    inputs = probe_inputs(batch, vertices, vertices, "cuda", fixed_point)
    similarity, log_b, row_shift = inputs["similarity"], inputs["log_b"], inputs["row_shift"]
    forward_args = (similarity, log_b, row_shift, EPSILON, SIMILARITY_BOUND)
    forward = fused.fused_row_column_forward(*forward_args)
    row_sum, log_a, column_shift, _ = forward
    backward_args = (similarity, log_a, column_shift, inputs["column_coefficient"], row_shift, row_sum, log_b, EPSILON)
    backward = fused.fused_row_column_backward(*backward_args)
    result = {"fused_forward_ms": _median_ms(lambda: fused.fused_row_column_forward(*forward_args)),
              "fused_backward_ms": _median_ms(lambda: fused.fused_row_column_backward(*backward_args)), "layouts": []}
    for layout in LAYOUTS:
        row = layout._asdict()
        try:
            errors = [_relative_error(value, reference) for value, reference in
                      zip([*grouped_forward(*forward_args, layout), *grouped_backward(*backward_args, layout)],
                          [*forward, *backward])]
            row.update(max_error=max(errors), forward_ms=_median_ms(lambda: grouped_forward(*forward_args, layout)),
                       backward_ms=_median_ms(lambda: grouped_backward(*backward_args, layout)))
        except Exception as error:  # a layout that does not fit the GPU (registers, shared memory)
            row["failed"] = f"{type(error).__name__}: {str(error)[:200]}"
        result["layouts"].append(row)
        print(json.dumps(row), flush=True)
    return result


def register_counts(layout: GroupLayout) -> dict[str, dict[str, int]]:
    """Registers a thread and bytes of spill stores of each grouped kernel at `layout`, on a float32 and on a
    fixed-point C, compiled for sm_90a without a GPU as a launch at N = M = 6890 specialises it
    (util/triton_offline.py)."""
    constexprs = {"ROWS": layout.rows, "CHUNK": layout.chunk, "NUM_STAGES": layout.stages}
    return {f"{kernel_name}_{c_name}": ptxas_usage(hopper_ptx(kernel, c_type, constexprs, layout.num_warps))
            for kernel_name, kernel in (("forward", _grouped_forward_kernel), ("backward", _grouped_backward_kernel))
            for c_name, c_type in (("float32", "*fp32"), ("fixed_point", "*i16"))}


def main(argv: list[str] | None = None) -> None:
    parser = OneLineErrorParser(prog="python -m scripts.grouped_passes_probe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only compare values with the float64 references")
    parser.add_argument("--vertices", type=int, default=6890)
    parser.add_argument("--out", default="", help="write the timings as JSON here")
    parser.add_argument("--registers", action="store_true", help="only print each layout's registers (no GPU needed)")
    args = parser.parse_args(argv)
    if args.vertices < 1:
        raise ValueError(f"--vertices must be at least 1, got {args.vertices}")
    if args.registers:
        for layout in LAYOUTS:
            print(layout, json.dumps(register_counts(layout)), flush=True)
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    reason = fused.unsupported_reason(torch.empty(1, 1, 1, device=device))
    if reason is not None:
        raise RuntimeError(reason)
    for fixed_point in (False, True):
        for layout in (LAYOUTS[0], GroupLayout(4, 16, 4, 2, 1)):
            error = max(pass_errors(probe_inputs(2, 37, 45, device, fixed_point), layout).values())
            print(f"{'fixed point' if fixed_point else 'float32'} C, {layout}: largest relative error {error:.1e}",
                  flush=True)
            if not error <= CHECK_TOLERANCE:
                raise RuntimeError(f"the grouped passes are off by {error:.1e} (tolerance {CHECK_TOLERANCE:.0e})")
    if args.check:
        return
    if device != "cuda":
        raise RuntimeError("timing the passes needs a GPU; use --check on a CPU")
    results = {f"batch{batch}_{'fixed_point' if fixed else 'float32'}": time_layouts(batch, args.vertices, fixed)
               for batch in (8, 1) for fixed in (True, False)}
    if args.out:
        Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), **results}, indent=1))


if __name__ == "__main__":
    run_main(main)
