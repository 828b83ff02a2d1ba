"""A Sinkhorn row pass and the column pass that follows it in one read of a materialised similarity C (Triton).

The stored warp (stored.py) reads C (B, N, M) once per pass, and on a GPU every pass is memory-bound, so a
half-step costs one read of C however little arithmetic it does. A column pass needs the per-row result of
the row pass before it; here both happen in the same read: each program owns a contiguous range of identity
rows, loads one whole row of C at a time (BLOCK_M = next_power_of_2(M) lanes, at most MAX_FUSED_POSE_VERTICES),
finishes that row's reduction, forms the row's scalar and adds the row's contribution to all M column sums,
which it holds in registers. Each program writes its column partial sums to a (B, P, M) scratch tensor and a
torch epilogue adds the P partials in a fixed order, so results are deterministic (no atomics).

- `fused_row_column_forward`: the row log-sum-exp of s + log b, the update log a, then the column log-sum-exp
  of s + log a (one forward Sinkhorn step pair of `_StoredSinkhornWarp`, s = log K = (C - 1) / epsilon).
- `fused_row_column_backward`: the reverse-mode passes of the same pair, dlog a and then dlog b.
Both take the bounded shifts of common.py's `bounded_shift` (one number per batch element), which need no
pass over C, and one exponential an element, exp(s + kappa) (`_kernel_row`), shared by its row and column terms.
- `fused_similarity_gradient`: dL/dC = exp(s + kappa) (U V^T) / epsilon of the bounded backward, written in half
  precision and padded, in one read of C (Inductor's version of this pass wrote U V^T out first), U V^T a product on
  the tensor cores.
- `fused_plan_warp`: the final softmax's warp, sum_m softmax_m(s + log b) pose_points[m], a row pass like the
  forward's with four sums a row.
- `fused_plan_column_sums`: its backward's column sums of four row weights, sum_n exp(s + log b - shift) w[n], a
  column pass like the forward's with four sums a column.
- `fused_fixed_point_product`: C = theta^T phi from `split_product`'s fp16 operands, stored directly as the 16-bit
  fixed point the passes read, with the first column pass in the same kernel (C never exists in float32).
`fused_row_column_forward_naive` and `fused_row_column_backward_naive` are their float64 references.
Each kernel reads C as float32 or as 16-bit fixed point (int16, common.py's `fixed_point_similarity`), which halves
the bytes every pass reads.

triton is imported only if it is installed (CPU-only installs have none; triton_support.py). With TRITON_INTERPRET=1
set before triton is imported, the kernels run in Triton's interpreter on CPU tensors (the tests do this without a
GPU).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from models.networks.layers import ALIGNMENT, aligned
from models.networks.ot.common import (LOG_DIVISION_EPS, SIMILARITY_LEVELS, SIMILARITY_STEP, bounded_shift,
                                       kernel_offset, log_kernel_of, log_marginal_update, validate_similarity_bound)
from models.networks.triton_support import INTERPRETED, on_device, tl, triton, triton_jit, validate_tile

# The kernels take exp(x) as exp2(x log2 e) with the product folded into the multiply-add that forms x: tl.exp2 is the
# hardware's ex2 (results below 2^-126 flushed to 0), where tl.exp adds a multiply and the instructions that keep
# subnormal results. The forward pass issued half the instructions it did with tl.exp (Nsight Compute, 206.1M against
# 388.5M at batch 8 and N = M = 6890; docs/benchmarks.md, twenty-first session).
LOG2_E = 1.0 / math.log(2.0)
_LOG2_E = None if tl is None else tl.constexpr(LOG2_E)
# 1.5 * 2^23 and its float32 bits: float32's step is 1 from 2^23 to 2^24, so for |x| < 2^22 the sum 1.5 * 2^23 + x
# is x rounded to an integer, and its bits are those of 1.5 * 2^23 plus that integer (`_int16_to_float`,
# `_integral_float_to_int16`, `_nearest_integer`): conversions on the FMA and integer pipes instead of the unit that
# takes every exp2.
_MAGIC = None if tl is None else tl.constexpr(12582912.0)
_MAGIC_BITS = None if tl is None else tl.constexpr(0x4B400000)

# The widest row a program holds in registers: with at most 32 warps each thread keeps LANES_PER_THREAD lanes of every
# row-wide value (the row, a per-column vector or two, the column sums).
MAX_FUSED_POSE_VERTICES = 16384
# Programs per streaming multiprocessor over the whole batch, rounded down so that the last wave is never a few
# programs alone (with 16 lanes a thread a program of 8192 lanes, 16 warps of about 110 registers a thread, filled an
# H100 SM's registers, so each wave was one program per SM; the 8-warp forward pass now fits two). Measured on the
# H100 at N = M = 6890 (docs/benchmarks.md, 2026-12-06), one fused forward pass: batch 8, 0.905 ms at 2 per SM,
# 0.953 at 4, 1.52 at 136 programs (a second wave of 4); one pair, 0.196 ms at 2 per SM, 0.215 at 4.
PROGRAMS_PER_SM = 2
# Programs per batch element without a GPU (the interpreter): enough that tests cover several per batch.
INTERPRETER_PROGRAMS = 4
# Rows in flight in a program's loop (the next rows' loads overlap the current row's arithmetic): 3 for rows of up to
# WIDE_ROW_LANES lanes (96 KiB of shared memory at 8192), 2 above (128 KiB at 16,384; 3 would take 192). From 2 to 3
# stages at N = M = 6890, batch 8, on two H100s (docs/benchmarks.md, tenth and eleventh sessions): forward 0.855 ->
# 0.723 and 0.847 -> 0.823 ms, backward 0.887 -> 0.777 and 0.838 -> 0.721 ms.
PIPELINE_STAGES = 3
WIDE_ROW_PIPELINE_STAGES = 2
WIDE_ROW_LANES = 8192
# Lanes of a row each thread holds (num_warps = BLOCK_M / (32 x this), between 4 and 32 warps): every row-wide value
# is this many registers a thread. With the exp2 passes (twenty-first session) 32 lanes (8 warps; forward 128
# registers a thread, so two programs share an SM) beat 16 in the same call on one H100: a training step's kernels
# 27.74 against 28.38 ms, batched inference 726 against 700 pairs/s (docs/benchmarks.md). Before them 16 won. With one
# exponential an element (`_kernel_row`) the backward takes 128 registers too, not 190, so two of its programs also
# share an SM (ptxas for sm_90a, int16 C, 8192 lanes).
LANES_PER_THREAD = 32
# `fused_plan_column_sums` keeps four sums a lane: at 32 lanes a thread its kernel takes 235 registers a thread, at 16
# lanes 122 (ptxas for sm_90a, no spills at either), so it launches twice the warps. At batch 8 and 6890 vertices on
# the H100 (`python -m util.bench --fused_passes`, 2026-12-07) the plan kernels took 0.443 ms (warp) and 0.392 ms
# (column sums) on the fixed-point C, against 0.738 and 0.727 for the compiled passes they replace.
PLAN_COLUMN_SUMS_LANES_PER_THREAD = 16


@triton_jit
def _row_lanes(num_pose, readable_pose, BLOCK_M: tl.constexpr):
    """A program's lanes 0..BLOCK_M - 1 of a row, the mask of those inside the row (below M) and the mask of those
    a load may read (below `_readable_width`)."""
    columns = tl.arange(0, BLOCK_M)
    return columns, columns < num_pose, columns < readable_pose


@triton_jit
def _program_rows(similarity_ptr, batch_stride, num_identity, rows_per_program):
    """Program (p, b)'s p, its batch element b, a pointer to b's first row of C, and its rows [first, last)."""
    program = tl.program_id(0)
    batch = tl.program_id(1)
    first = program * rows_per_program
    return (program, batch, similarity_ptr + batch.to(tl.int64) * batch_stride, first,
            tl.minimum(first + rows_per_program, num_identity))


@triton_jit
def _similarity_row(batch_ptr, row, row_stride, columns, in_row, in_readable):
    """One row of C (batch_ptr: its batch element's first row) at the lanes `columns`, as loaded (q for a
    fixed-point C), in float32.

    The load reads every lane of in_readable (`_readable_width`), padding past M included: a mask whose bound is a
    multiple of 16 lets Triton issue 16-byte loads. A float32 C's padding is set to 0 past M (it may hold anything);
    a fixed-point C's padding is left, being a finite integer whose terms the callers' -inf offsets or 0
    coefficients past M cancel."""
    similarity_row = tl.load(batch_ptr + tl.cast(row, tl.int64) * row_stride + columns, mask=in_readable, other=0)
    if batch_ptr.dtype.element_ty == tl.int16:
        return _int16_to_float(similarity_row)
    return tl.where(in_row, similarity_row, 0.0)


@triton_jit
def _int16_to_float(value):
    """An int16 tensor in float32, exactly, with integer and float additions instead of the conversion instruction,
    which runs on the unit that also takes every exp2 (the passes' bottleneck): 1.5 * 2^23 + q, for |q| < 2^22, is
    the float whose bits are those of 1.5 * 2^23 plus q."""
    return (value.to(tl.int32) + _MAGIC_BITS).to(tl.float32, bitcast=True) - _MAGIC


@triton_jit
def _integral_float_to_int16(value):
    """`_int16_to_float` reversed: a float32 tensor of integers in int16's range as int16, by the same bits."""
    return ((value + _MAGIC).to(tl.int32, bitcast=True) - _MAGIC_BITS).to(tl.int16)


@triton_jit
def _nearest_integer(value):
    """value rounded to the nearest integer, ties to even, for |value| < 2^22: 1.5 * 2^23 + value lies where float32's
    step is 1, so the sum rounds it, and subtracting 1.5 * 2^23 again is exact. Two additions on the FMA pipe, where
    tl.floor and tl.ceil are FRND instructions on the unit that takes every exp2."""
    return (value + _MAGIC) - _MAGIC


@triton_jit
def _log2_kernel_row(similarity_row, log2_scale, log2_offset):
    """x with exp2(x) = exp(s + offset) for s = (C - 1) / epsilon: C_loaded log2_scale + log2_offset, where
    log2_scale is similarity_step log2(e) / epsilon and log2_offset is (offset - 1 / epsilon) log2(e)
    (`_log2_constants`)."""
    return tl.fma(similarity_row, log2_scale, log2_offset)


@triton_jit
def _pose_log2_offsets(log_b_ptr, shift, batch, num_pose, columns, in_row, log2_bias):
    """(log_b[m] - shift) log2(e) + log2_bias at the lanes `columns` of batch element `batch`: the offsets
    `_log2_kernel_row` takes for terms exp(s + log b - shift) or, with log2_bias = -kappa log2(e), the log2 of
    their pose factors (`_kernel_row`). Lanes past M get -inf, so that their terms are 0."""
    log_b = tl.load(log_b_ptr + batch * num_pose + columns, mask=in_row, other=float("-inf"))
    return (log_b - shift) * _LOG2_E + log2_bias


@triton_jit
def _kernel_row(similarity_row, log2_scale, log2_bias, log2_kappa):
    """exp(s + kappa) at every element of a loaded row or tile of C, s = (C - 1) / epsilon, kappa = common.py's
    `kernel_offset` (log2_kappa = kappa log2(e)): with the factors exp(v - shift - kappa) of a row or a lane, the
    terms exp(s + v - shift) at one exponential an element (the row-column passes took two)."""
    return tl.exp2(_log2_kernel_row(similarity_row, log2_scale, log2_bias + log2_kappa))


@triton_jit
def _row_column_forward_kernel(similarity_ptr, log_b_ptr, row_shift_ptr, row_sum_ptr, log_a_ptr, partial_ptr,
                               program_shift_ptr, num_identity, num_pose, readable_pose, batch_stride, row_stride,
                               rows_per_program, log2_scale, log2_bias, log2_kappa, log_num_identity,
                               log_division_eps, BLOCK_M: tl.constexpr, NUM_STAGES: tl.constexpr):
    """Rows [p * rows_per_program, ...) of batch element b for program (p, b); see `fused_row_column_forward`.

    Each element's exponential is `_kernel_row`'s, shared by its row and column terms. The column terms are
    exp(s + kappa) exp(log a[n] - shift), shift the largest log a of the program's rows so far: when a row raises
    it, the sums are rescaled by exp(old - new) (0 for the first row, whose old shift is -inf). So the column sums
    are shifted by shift - kappa, which is `bounded_shift` of that largest log a.
    """
    program, batch, batch_ptr, first, last = _program_rows(similarity_ptr, batch_stride, num_identity,
                                                           rows_per_program)
    columns, in_row, in_readable = _row_lanes(num_pose, readable_pose, BLOCK_M)
    row_shift = tl.load(row_shift_ptr + batch)
    # exp(log b[m] - row_shift - kappa), 0 past M.
    pose_factor = tl.exp2(_pose_log2_offsets(log_b_ptr, row_shift, batch, num_pose, columns, in_row, -log2_kappa))
    column_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    program_shift = tl.full([], float("-inf"), tl.float32)
    for row in tl.range(first, last, num_stages=NUM_STAGES):
        index = batch * num_identity + row
        kernel_row = _kernel_row(_similarity_row(batch_ptr, row, row_stride, columns, in_row, in_readable),
                                 log2_scale, log2_bias, log2_kappa)
        row_sum = tl.sum(kernel_row * pose_factor, axis=0)
        row_lse = row_shift + tl.log(row_sum)
        # logaddexp(row_lse, log 1e-8). tl has no log1p (libdevice's does not run in the interpreter); log(1 + x)
        # is off by less than 6e-8 absolute.
        high = tl.maximum(row_lse, log_division_eps)
        log_a = -log_num_identity - (high + tl.log(1.0 + tl.exp(tl.minimum(row_lse, log_division_eps) - high)))
        if log_a > program_shift:  # rare after the first rows: the multiply by exp2(0) = 1 is skipped, not rounded
            column_sum = column_sum * tl.exp2((program_shift - log_a) * _LOG2_E)
            program_shift = log_a
        column_sum += kernel_row * tl.exp2((log_a - program_shift) * _LOG2_E)
        tl.store(row_sum_ptr + index, row_sum)
        tl.store(log_a_ptr + index, log_a)
    partial = batch * tl.num_programs(0) + program
    tl.store(partial_ptr + partial.to(tl.int64) * num_pose + columns, column_sum, mask=in_row)
    tl.store(program_shift_ptr + partial, program_shift)


@triton_jit
def _row_column_backward_kernel(similarity_ptr, log_a_prev_ptr, column_shift_ptr, column_coefficient_ptr,
                                row_shift_ptr, row_sum_ptr, log_b_prev_ptr, grad_log_a_ptr, row_coefficient_ptr,
                                partial_ptr, num_identity, num_pose, readable_pose, batch_stride, row_stride,
                                rows_per_program, log2_scale, log2_bias, log2_kappa, log_division_eps,
                                BLOCK_M: tl.constexpr, NUM_STAGES: tl.constexpr):
    """Rows [p * rows_per_program, ...) of batch element b for program (p, b); see `fused_row_column_backward`.
    Each element's exponential is `_kernel_row`'s; a row's factor multiplies its sum, the pose factor the program's
    column sums once, at the end."""
    program, batch, batch_ptr, first, last = _program_rows(similarity_ptr, batch_stride, num_identity,
                                                           rows_per_program)
    columns, in_row, in_readable = _row_lanes(num_pose, readable_pose, BLOCK_M)
    column_shift = tl.load(column_shift_ptr + batch)
    row_shift = tl.load(row_shift_ptr + batch)
    # Lanes past M have coefficient 0, so that all their terms are 0.
    column_coefficient = tl.load(column_coefficient_ptr + batch * num_pose + columns, mask=in_row, other=0.0)
    grad_log_b = tl.zeros([BLOCK_M], dtype=tl.float32)
    for row in tl.range(first, last, num_stages=NUM_STAGES):
        index = batch * num_identity + row
        kernel_row = _kernel_row(_similarity_row(batch_ptr, row, row_stride, columns, in_row, in_readable),
                                 log2_scale, log2_bias, log2_kappa)
        row_factor = tl.exp2((tl.load(log_a_prev_ptr + index) - column_shift) * _LOG2_E - log2_kappa)
        grad_log_a = tl.sum(kernel_row * column_coefficient, axis=0) * row_factor
        row_sum = tl.load(row_sum_ptr + index)
        row_coefficient = (-tl.sigmoid(row_shift + tl.log(row_sum) - log_division_eps) * grad_log_a) / row_sum
        grad_log_b += kernel_row * row_coefficient
        tl.store(grad_log_a_ptr + index, grad_log_a)
        tl.store(row_coefficient_ptr + index, row_coefficient)
    # exp(log b_prev[m] - row_shift - kappa), 0 past M (never stored).
    pose_factor = tl.exp2(_pose_log2_offsets(log_b_prev_ptr, row_shift, batch, num_pose, columns, in_row,
                                             -log2_kappa))
    partial = batch * tl.num_programs(0) + program
    tl.store(partial_ptr + partial.to(tl.int64) * num_pose + columns, grad_log_b * pose_factor, mask=in_row)


@triton_jit
def _rounded_to_levels(similarity, levels):
    """clamp(C, -1, 1) * levels rounded half away from zero as common.py's `fixed_point_similarity` rounds it, bit for
    bit: floor(scaled + 0.5) or ceil(scaled - 0.5), each sum rounded to float32 first. floor and ceil are the
    nearest integer (`_nearest_integer`) moved by one where it lies on the other side."""
    scaled = tl.minimum(tl.maximum(similarity, -1.0), 1.0) * levels
    up = scaled + 0.5
    floor_up = _nearest_integer(up)
    floor_up = tl.where(floor_up > up, floor_up - 1.0, floor_up)
    down = scaled - 0.5
    ceil_down = _nearest_integer(down)
    ceil_down = tl.where(ceil_down < down, ceil_down + 1.0, ceil_down)
    return tl.where(scaled >= 0, floor_up, ceil_down)


@triton_jit
def _fixed_point_column_kernel(similarity_ptr, fixed_point_ptr, partial_ptr, num_identity, num_pose, readable_pose,
                               fixed_row_stride, batch_stride, row_stride, fixed_batch_stride, rows_per_program,
                               levels, log2_scale, log2_bias, BLOCK_M: tl.constexpr, NUM_STAGES: tl.constexpr):
    """Rows [p * rows_per_program, ...) of batch element b for program (p, b); see
    `fused_fixed_point_column_pass`. Lanes from M to fixed_row_stride store zeros."""
    program, batch, batch_ptr, first, last = _program_rows(similarity_ptr, batch_stride, num_identity,
                                                           rows_per_program)
    columns, in_row, in_readable = _row_lanes(num_pose, readable_pose, BLOCK_M)
    column_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    fixed_batch_ptr = fixed_point_ptr + batch.to(tl.int64) * fixed_batch_stride
    for row in tl.range(first, last, num_stages=NUM_STAGES):
        similarity_row = tl.load(batch_ptr + tl.cast(row, tl.int64) * row_stride + columns, mask=in_readable,
                                 other=0.0)
        fixed_point = _rounded_to_levels(tl.where(in_row, similarity_row, 0.0), levels)
        tl.store(fixed_batch_ptr + tl.cast(row, tl.int64) * fixed_row_stride + columns,
                 _integral_float_to_int16(fixed_point),
                 mask=columns < fixed_row_stride)
        column_sum += tl.exp2(_log2_kernel_row(fixed_point, log2_scale, log2_bias))  # never stored past M
    partial = batch * tl.num_programs(0) + program
    tl.store(partial_ptr + partial.to(tl.int64) * num_pose + columns, column_sum, mask=in_row)


@triton_jit
def _add_four(total, x, y, z, other_total, other_x, other_y, other_z):
    return total + other_total, x + other_x, y + other_y, z + other_z


@triton_jit
def _plan_warp_kernel(similarity_ptr, log_b_ptr, shift_ptr, points_ptr, warp_ptr, total_ptr, num_identity, num_pose,
                      readable_pose, batch_stride, row_stride, rows_per_program, log2_scale, log2_bias,
                      BLOCK_M: tl.constexpr, NUM_STAGES: tl.constexpr):
    """Rows [p * rows_per_program, ...) of batch element b for program (p, b); see `fused_plan_warp`. The pose
    points stay in registers; each row's four sums are one reduction."""
    program, batch, batch_ptr, first, last = _program_rows(similarity_ptr, batch_stride, num_identity,
                                                           rows_per_program)
    columns, in_row, in_readable = _row_lanes(num_pose, readable_pose, BLOCK_M)
    # Lanes past M have weight 0 and points 0.
    row_log2_offset = _pose_log2_offsets(log_b_ptr, tl.load(shift_ptr + batch), batch, num_pose, columns, in_row,
                                         log2_bias)
    point_ptr = points_ptr + batch.to(tl.int64) * 3 * num_pose + columns
    x = tl.load(point_ptr, mask=in_row, other=0.0)
    y = tl.load(point_ptr + num_pose, mask=in_row, other=0.0)
    z = tl.load(point_ptr + 2 * num_pose, mask=in_row, other=0.0)
    for row in tl.range(first, last, num_stages=NUM_STAGES):
        similarity_row = _similarity_row(batch_ptr, row, row_stride, columns, in_row, in_readable)
        weights = tl.exp2(_log2_kernel_row(similarity_row, log2_scale, row_log2_offset))
        total, warp_x, warp_y, warp_z = tl.reduce((weights, weights * x, weights * y, weights * z), 0, _add_four)
        index = batch * num_identity + row
        tl.store(total_ptr + index, total)
        tl.store(warp_ptr + index * 3, warp_x / total)
        tl.store(warp_ptr + index * 3 + 1, warp_y / total)
        tl.store(warp_ptr + index * 3 + 2, warp_z / total)


@triton_jit
def _plan_column_sums_kernel(similarity_ptr, log_b_ptr, shift_ptr, row_weights_ptr, partial_ptr, num_identity,
                             num_pose, readable_pose, batch_stride, row_stride, rows_per_program, log2_scale,
                             log2_bias, BLOCK_M: tl.constexpr, NUM_STAGES: tl.constexpr):
    """Rows [p * rows_per_program, ...) of batch element b for program (p, b); see `fused_plan_column_sums`. The
    program's four column sums are written as its partials (B, P, 4, M)."""
    program, batch, batch_ptr, first, last = _program_rows(similarity_ptr, batch_stride, num_identity,
                                                           rows_per_program)
    columns, in_row, in_readable = _row_lanes(num_pose, readable_pose, BLOCK_M)
    column_log2_offset = _pose_log2_offsets(log_b_ptr, tl.load(shift_ptr + batch), batch, num_pose, columns,
                                            in_row, log2_bias)  # lanes past M: terms 0, never stored
    sum_0 = tl.zeros([BLOCK_M], dtype=tl.float32)
    sum_1 = tl.zeros([BLOCK_M], dtype=tl.float32)
    sum_2 = tl.zeros([BLOCK_M], dtype=tl.float32)
    sum_3 = tl.zeros([BLOCK_M], dtype=tl.float32)
    for row in tl.range(first, last, num_stages=NUM_STAGES):
        similarity_row = _similarity_row(batch_ptr, row, row_stride, columns, in_row, in_readable)
        weights = tl.exp2(_log2_kernel_row(similarity_row, log2_scale, column_log2_offset))
        row_weights_row = row_weights_ptr + (batch * num_identity + row).to(tl.int64) * 4
        sum_0 += weights * tl.load(row_weights_row)
        sum_1 += weights * tl.load(row_weights_row + 1)
        sum_2 += weights * tl.load(row_weights_row + 2)
        sum_3 += weights * tl.load(row_weights_row + 3)
    partial_row = partial_ptr + ((batch * tl.num_programs(0) + program) * 4).to(tl.int64) * num_pose + columns
    tl.store(partial_row, sum_0, mask=in_row)
    tl.store(partial_row + num_pose, sum_1, mask=in_row)
    tl.store(partial_row + 2 * num_pose, sum_2, mask=in_row)
    tl.store(partial_row + 3 * num_pose, sum_3, mask=in_row)


@triton_jit
def _fixed_point_product_kernel(left_ptr, right_ptr, fixed_point_ptr, partial_ptr, num_identity, num_pose, depth,
                                padded_pose, left_batch_stride, right_batch_stride, fixed_batch_stride, levels,
                                log2_scale, log2_bias, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                                BLOCK_K: tl.constexpr):
    """One (BLOCK_N, BLOCK_M) tile of C = left @ right for program (row block, column block, b), accumulated in
    float32 on the tensor cores and stored as fixed point; its terms exp(s) summed over the tile's rows are the
    program's partial column sums (B, row blocks, M). See `fused_fixed_point_product`."""
    row_block, column_block, batch = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = row_block * BLOCK_N + tl.arange(0, BLOCK_N)
    columns = column_block * BLOCK_M + tl.arange(0, BLOCK_M)
    depths = tl.arange(0, BLOCK_K)
    in_rows = rows < num_identity
    in_columns = columns < padded_pose
    left_tile = left_ptr + batch.to(tl.int64) * left_batch_stride + rows[:, None].to(tl.int64) * depth + depths[None, :]
    right_tile = (right_ptr + batch.to(tl.int64) * right_batch_stride + depths[:, None].to(tl.int64) * padded_pose
                  + columns[None, :])
    product = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for start in tl.range(0, depth, BLOCK_K):
        in_depth = start + depths < depth
        left = tl.load(left_tile, mask=in_rows[:, None] & in_depth[None, :], other=0.0)
        right = tl.load(right_tile, mask=in_depth[:, None] & in_columns[None, :], other=0.0)
        product = tl.dot(left, right, product)
        left_tile += BLOCK_K
        right_tile += BLOCK_K * padded_pose
    fixed_point = _rounded_to_levels(product, levels)  # the padding columns of right are 0, so are C's
    tl.store(fixed_point_ptr + batch.to(tl.int64) * fixed_batch_stride + rows[:, None].to(tl.int64) * padded_pose
             + columns[None, :], _integral_float_to_int16(fixed_point), mask=in_rows[:, None] & in_columns[None, :])
    terms = tl.where(in_rows[:, None], tl.exp2(_log2_kernel_row(fixed_point, log2_scale, log2_bias)), 0.0)
    partial = batch * tl.num_programs(0) + row_block
    tl.store(partial_ptr + partial.to(tl.int64) * num_pose + columns, tl.sum(terms, axis=0), mask=columns < num_pose)


@triton_jit
def _similarity_gradient_kernel(similarity_ptr, row_factors_ptr, column_factors_ptr, gradient_ptr, num_identity,
                                 num_pose, readable_pose, padded_pose, batch_stride, row_stride, column_factor_stride,
                                 log2_scale, log2_bias, log2_kappa, inverse_epsilon, RANK: tl.constexpr,
                                 RANK_PADDED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """One (BLOCK_N, BLOCK_M) tile of dL/dC for program (row block, column block, b); see
    `fused_similarity_gradient`. Lanes from num_pose to padded_pose store zeros.

    U V^T is a product on the tensor cores over RANK_PADDED (a power of two, at least 16) ranks, the ones past RANK
    zero, in three TF32 products whose sum carries float32's precision ("tf32x3")."""
    row_block, column_block, batch = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = row_block * BLOCK_N + tl.arange(0, BLOCK_N)
    columns = column_block * BLOCK_M + tl.arange(0, BLOCK_M)
    in_rows = rows < num_identity
    in_columns = columns < num_pose
    inside = in_rows[:, None] & in_columns[None, :]
    # Padding past M is read too (see `_similarity_row`) and discarded by the last `tl.where`.
    similarity = tl.load(similarity_ptr + batch.to(tl.int64) * batch_stride + rows[:, None].to(tl.int64) * row_stride
                         + columns[None, :], mask=in_rows[:, None] & (columns[None, :] < readable_pose), other=0)
    if similarity_ptr.dtype.element_ty == tl.int16:
        similarity = _int16_to_float(similarity)
    ranks = tl.arange(0, RANK_PADDED)
    in_ranks = ranks < RANK
    row_factors = tl.load(row_factors_ptr + (batch * num_identity + rows[:, None]) * RANK + ranks[None, :],
                          mask=in_rows[:, None] & in_ranks[None, :], other=0.0)  # (BLOCK_N, RANK_PADDED)
    column_factors = tl.load(column_factors_ptr + batch * RANK * column_factor_stride
                             + ranks[:, None] * column_factor_stride + columns[None, :],
                             mask=in_ranks[:, None] & in_columns[None, :], other=0.0)  # (RANK_PADDED, BLOCK_M)
    outer = tl.dot(row_factors, column_factors, input_precision="tf32x3")
    gradient = _kernel_row(similarity, log2_scale, log2_bias, log2_kappa) * outer * inverse_epsilon
    gradient = tl.where(inside, gradient, 0.0)
    tl.store(gradient_ptr + (batch * num_identity + rows[:, None]).to(tl.int64) * padded_pose + columns[None, :],
             gradient.to(gradient_ptr.dtype.element_ty), mask=in_rows[:, None] & (columns[None, :] < padded_pose))


def unsupported_reason(similarity: torch.Tensor) -> str | None:
    """Why the fused kernels cannot read `similarity`, in one sentence, or None when they can."""
    if triton is None:
        return "the fused Sinkhorn passes need triton, which is not installed"
    rows_contiguous = similarity.dim() == 3 and similarity.stride(2) == 1
    if similarity.dtype not in (torch.float32, torch.int16) or not rows_contiguous:
        return (f"the fused Sinkhorn passes need a float32 or fixed-point (int16) (B, N, M) similarity with "
                f"contiguous rows, got a {'' if rows_contiguous else 'non-contiguous '}{similarity.dtype} tensor "
                f"of shape {tuple(similarity.shape)}")
    if not (similarity.is_cuda or (similarity.device.type == "cpu" and INTERPRETED)):
        return (f"the fused Sinkhorn passes run on CUDA tensors (on CPU ones only if TRITON_INTERPRET=1 was set "
                f"before triton was imported), got one on {similarity.device}")
    if similarity.shape[2] > MAX_FUSED_POSE_VERTICES:
        return (f"the fused Sinkhorn passes hold a whole row of C in registers, at most {MAX_FUSED_POSE_VERTICES} "
                f"pose vertices, got M = {similarity.shape[2]}")
    if similarity.is_cuda:
        properties = torch.cuda.get_device_properties(similarity.device)
        return shared_memory_shortfall(similarity.shape[2], getattr(properties, "shared_memory_per_block_optin", None),
                                       properties.name)
    return None


def _block_width(num_pose: int) -> int:
    """BLOCK_M, the lanes a program holds a row of C in: the power of two at or above num_pose, and at least the 8
    lanes of a fixed-point row padded to 16 bytes (which `fused_fixed_point_column_pass` writes whole)."""
    return max(ALIGNMENT, 1 << max(num_pose - 1, 0).bit_length())


def _pipeline_stages(block: int) -> int:
    """Rows in flight in a program of BLOCK_M = block lanes."""
    return PIPELINE_STAGES if block <= WIDE_ROW_LANES else WIDE_ROW_PIPELINE_STAGES


def shared_memory_shortfall(num_pose: int, available: int | None, device_name: str) -> str | None:
    """Why a GPU with `available` bytes of shared memory per block (None: unknown, assumed enough) cannot run
    the kernels for rows of num_pose, or None. The bound is the pipelined rows (`_pipeline_stages`) of BLOCK_M
    float32 lanes (96 KiB at M = 6890, 128 KiB at 16,384): a GPU below it takes the separate passes rather than
    risk failing to launch."""
    block = _block_width(num_pose)
    needed = _pipeline_stages(block) * 4 * block
    if available is None or needed <= available:
        return None
    return (f"the fused Sinkhorn passes need {needed // 1024} KiB of shared memory per block for rows of {num_pose} "
            f"pose vertices, and the {device_name} has {available // 1024} KiB")


def fused_pass_supported(similarity: torch.Tensor) -> bool:
    """Whether `fused_row_column_forward` and `fused_row_column_backward` can read `similarity`.

    True when triton is installed and similarity is a float32 or fixed-point (int16) (B, N, M) CUDA tensor with
    contiguous rows (or a CPU one while TRITON_INTERPRET=1 selects Triton's interpreter) with
    M <= MAX_FUSED_POSE_VERTICES.
    """
    return unsupported_reason(similarity) is None


def _validate_fused_inputs(similarity: torch.Tensor, epsilon: float, programs_per_batch: int | None = None,
                           pipeline_stages: int | None = None, num_warps: int | None = None,
                           similarity_bound: float | None = None, **vectors: tuple[torch.Tensor, str]) -> None:
    """ValueError unless similarity is (B, N, M) with N, M >= 1, epsilon > 0, programs_per_batch,
    pipeline_stages and num_warps None or a positive int (num_warps a power of two), similarity_bound None or in
    (0, MAX_LOG_KERNEL_RANGE * epsilon / 2], and each named (vector, dims) float32 of shape dims ("BN": (B, N),
    "BM": (B, M), "B": (B,)) on similarity's device; then RuntimeError when the kernels cannot read similarity
    (`fused_pass_supported`)."""
    if similarity.dim() != 3 or similarity.shape[1] == 0 or similarity.shape[2] == 0:
        raise ValueError(f"similarity must have shape (B, N, M) with N, M >= 1, got {tuple(similarity.shape)}")
    if not epsilon > 0:
        raise ValueError(f"Sinkhorn epsilon must be positive, got {epsilon}")
    if similarity_bound is not None:
        validate_similarity_bound(similarity_bound, epsilon)
    for name, value in (("programs_per_batch", programs_per_batch), ("pipeline_stages", pipeline_stages),
                        ("num_warps", num_warps)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    if num_warps is not None and num_warps & (num_warps - 1):
        raise ValueError(f"num_warps must be a power of two, got {num_warps}")
    sizes = dict(zip("BNM", similarity.shape))
    for name, (vector, dims) in vectors.items():
        shape = tuple(sizes[dim] for dim in dims)
        if vector.shape != shape or vector.dtype != torch.float32 or vector.device != similarity.device:
            raise ValueError(f"{name} must be a float32 tensor of shape {shape} on {similarity.device} to match "
                             f"similarity {tuple(similarity.shape)}, got {vector.dtype} {tuple(vector.shape)} on "
                             f"{vector.device}")
    reason = unsupported_reason(similarity)
    if reason is not None:
        raise RuntimeError(reason)


class _LaunchLayout(NamedTuple):
    """The grid and compile-time shape of a fused pass (`_launch_layout`)."""
    programs: int  # P, per batch element
    rows_per_program: int
    block: int  # BLOCK_M
    num_warps: int
    stages: int  # rows in flight


def _launch_layout(similarity: torch.Tensor, programs_per_batch: int | None, pipeline_stages: int | None,
                   num_warps: int | None, lanes_per_thread: int = LANES_PER_THREAD) -> _LaunchLayout:
    """How a fused pass over `similarity` is launched.

    P defaults to PROGRAMS_PER_SM programs per SM over the whole batch (rounded down), at most N. num_warps
    keeps lanes_per_thread lanes of a row per thread, between 4 and 32 warps. The stages default to
    `_pipeline_stages`. A given num_warps or pipeline_stages replaces the rule's.
    """
    batch, num_identity, num_pose = similarity.shape
    if programs_per_batch is None:
        if similarity.is_cuda:
            sm_count = torch.cuda.get_device_properties(similarity.device).multi_processor_count
            programs_per_batch = max(1, PROGRAMS_PER_SM * sm_count // batch)
        else:
            programs_per_batch = INTERPRETER_PROGRAMS
    programs = min(programs_per_batch, num_identity)
    block = _block_width(num_pose)
    stages = pipeline_stages or _pipeline_stages(block)
    num_warps = num_warps or min(32, max(4, block // (32 * lanes_per_thread)))
    return _LaunchLayout(programs, triton.cdiv(num_identity, programs), block, num_warps, stages)


def _readable_width(similarity: torch.Tensor) -> int:
    """The lanes of each row of C (B, N, M) a kernel may load: the row stride where C is a view of longer rows
    that lie in its storage (`split_product` pads them to a multiple of 8), else M.

    The kernels load the padding too and discard it: with M = 6890 a mask bound of M lets Triton issue only
    8-byte loads, with the padded 6896 (Triton treats an integer argument divisible by 16 as such) 16-byte ones.
    """
    batch, num_identity, num_pose = similarity.shape
    row_stride = similarity.stride(1)
    if row_stride <= num_pose:
        return num_pose
    end = similarity.storage_offset() + (batch - 1) * similarity.stride(0) + num_identity * row_stride
    return row_stride if end * similarity.element_size() <= similarity.untyped_storage().nbytes() else num_pose


def _log2_constants(similarity: torch.Tensor, epsilon: float) -> tuple[float, float]:
    """(log2_scale, log2_bias) of `_log2_kernel_row` for a C of similarity's dtype: s log2(e) = (C - 1) log2(e) /
    epsilon = C_loaded log2_scale + log2_bias, where a loaded element of C is read as C_loaded SIMILARITY_STEP for
    fixed point (int16) and as itself for float32."""
    step = SIMILARITY_STEP if similarity.dtype == torch.int16 else 1.0
    return step * LOG2_E / epsilon, -LOG2_E / epsilon


def _log2_kappa(epsilon: float, similarity_bound: float) -> float:
    """kappa log2(e) of `_kernel_row`, kappa common.py's `kernel_offset`."""
    return kernel_offset(similarity_bound, epsilon) * LOG2_E


def _merge_column_partials(partial: torch.Tensor, program_shift: torch.Tensor,
                           column_shift: torch.Tensor) -> torch.Tensor:
    """Column sums shifted by column_shift from the programs' partial sums, each shifted by its program's own.

    A program without rows has shift -inf and partial sums 0, and adds 0.

    Args:
        partial: (B, P, M); program_shift: (B, P); column_shift: (B,), less than 80 below the largest
            program shift (so that no factor overflows).
    Returns:
        (B, M).
    """
    return (partial * torch.exp(program_shift - column_shift.unsqueeze(1)).unsqueeze(2)).sum(1)  # (B, M)


def fused_row_column_forward(similarity: torch.Tensor, log_b: torch.Tensor, row_shift: torch.Tensor, epsilon: float,
                             similarity_bound: float, *, programs_per_batch: int | None = None,
                             pipeline_stages: int | None = None, num_warps: int | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A row pass with log b, the log a update, then the column pass with that log a, in one read of C.

    With s = (C - 1) / epsilon and L = log 1e-8:
    row_sum[n] = sum_m exp(s[n, m] + log_b[m] - row_shift), log_a[n] = -log N - logaddexp(row_shift +
    log row_sum[n], L), column_shift = max_n log_a[n] + (similarity_bound - 1) / epsilon and
    column_sum[m] = sum_n exp(s[n, m] + log_a[n] - column_shift), for each batch element. An element's row and
    column terms share one exponential, exp(s + kappa) (`_kernel_row`), times a factor of its column or of its
    row; each factor and the exponential come from exp2 of one multiply-add, which round differently from
    exp(s + offset) by a few float32 ulps.

    Args:
        similarity: C, float32 or fixed point (int16, common.py's `fixed_point_similarity`) (B, N, M), rows
            contiguous (any row and batch strides, such as a view of padded rows), |C| <= similarity_bound up to
            rounding; see `fused_pass_supported`.
        log_b: float32 (B, M).
        row_shift: float32 (B,), an upper bound of s + log b over each batch element (`bounded_shift`).
        epsilon: entropic temperature.
        similarity_bound: the bound on |C| that places column_shift above every column logit, in (0,
            MAX_LOG_KERNEL_RANGE * epsilon / 2].
        programs_per_batch: programs P that split each batch element's rows, or None for a few per SM.
        pipeline_stages: rows in flight in a program's loop, or None for `_pipeline_stages` (for benchmarks; more
            than the default may exceed a GPU's shared memory and fail to launch).
        num_warps: warps of a program, a power of two, or None for LANES_PER_THREAD lanes of a row a thread (for
            benchmarks).
    Returns:
        row_sum: float32 (B, N).
        log_a: float32 (B, N).
        column_shift: float32 (B,).
        column_sum: float32 (B, M).
    """
    _validate_fused_inputs(similarity, epsilon, programs_per_batch, pipeline_stages, num_warps, similarity_bound,
                           log_b=(log_b, "BM"), row_shift=(row_shift, "B"))
    batch, num_identity, num_pose = similarity.shape
    layout = _launch_layout(similarity, programs_per_batch, pipeline_stages, num_warps)
    row_sum = similarity.new_empty(batch, num_identity, dtype=torch.float32)
    log_a = similarity.new_empty(batch, num_identity, dtype=torch.float32)
    partial = similarity.new_empty(batch, layout.programs, num_pose, dtype=torch.float32)
    program_shift = similarity.new_empty(batch, layout.programs, dtype=torch.float32)
    with on_device(similarity):
        _row_column_forward_kernel[(layout.programs, batch)](
            similarity, log_b.contiguous(), row_shift.contiguous(), row_sum, log_a, partial, program_shift,
            num_identity, num_pose, _readable_width(similarity), similarity.stride(0), similarity.stride(1),
            layout.rows_per_program, *_log2_constants(similarity, epsilon), _log2_kappa(epsilon, similarity_bound),
            math.log(num_identity), LOG_DIVISION_EPS, BLOCK_M=layout.block, NUM_STAGES=layout.stages,
            num_warps=layout.num_warps)
    program_shift = program_shift - kernel_offset(similarity_bound, epsilon)  # each program's column sums' shift
    column_shift = program_shift.amax(1)
    return row_sum, log_a, column_shift, _merge_column_partials(partial, program_shift, column_shift)


def fused_row_column_backward(similarity: torch.Tensor, log_a_prev: torch.Tensor, column_shift: torch.Tensor,
                              column_coefficient: torch.Tensor, row_shift: torch.Tensor, row_sum: torch.Tensor,
                              log_b_prev: torch.Tensor, epsilon: float, similarity_bound: float, *,
                              programs_per_batch: int | None = None, pipeline_stages: int | None = None,
                              num_warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dlog a_{t-1}, then the row coefficients and dlog b_{t-1} from it, in one read of C.

    The reverse-mode passes of one Sinkhorn step pair (`_StoredSinkhornWarp`). With s = (C - 1) / epsilon
    (formed as in `fused_row_column_forward`) and L = log 1e-8:
    grad_log_a[n] = sum_m exp(s[n, m] + log_a_prev[n] - column_shift) column_coefficient[m],
    row_coefficient[n] = -sigmoid(row_shift + log row_sum[n] - L) grad_log_a[n] / row_sum[n] and
    grad_log_b[m] = sum_n exp(s[n, m] + log_b_prev[m] - row_shift) row_coefficient[n], for each batch element.

    Args:
        similarity: C, float32 or fixed point (int16, common.py's `fixed_point_similarity`) (B, N, M), rows
            contiguous; see `fused_pass_supported`.
        log_a_prev: float32 (B, N), the log a that the column pass of column_shift read.
        column_shift: float32 (B,), that pass's shift.
        column_coefficient: float32 (B, M).
        row_shift: float32 (B,), the shift of the row pass that summed to row_sum.
        row_sum: float32 (B, N), positive.
        log_b_prev: float32 (B, M), the log b that row pass read.
        epsilon: entropic temperature.
        similarity_bound: the forward's bound on |C|.
        programs_per_batch, pipeline_stages, num_warps: as in `fused_row_column_forward`.
    Returns:
        grad_log_a: float32 (B, N).
        row_coefficient: float32 (B, N).
        grad_log_b: float32 (B, M).
    """
    _validate_fused_inputs(similarity, epsilon, programs_per_batch, pipeline_stages, num_warps, similarity_bound,
                           log_a_prev=(log_a_prev, "BN"),
                           column_shift=(column_shift, "B"), column_coefficient=(column_coefficient, "BM"),
                           row_shift=(row_shift, "B"), row_sum=(row_sum, "BN"), log_b_prev=(log_b_prev, "BM"))
    batch, num_identity, num_pose = similarity.shape
    layout = _launch_layout(similarity, programs_per_batch, pipeline_stages, num_warps)
    grad_log_a = similarity.new_empty(batch, num_identity, dtype=torch.float32)
    row_coefficient = similarity.new_empty(batch, num_identity, dtype=torch.float32)
    partial = similarity.new_empty(batch, layout.programs, num_pose, dtype=torch.float32)
    with on_device(similarity):
        _row_column_backward_kernel[(layout.programs, batch)](
            similarity, log_a_prev.contiguous(), column_shift.contiguous(), column_coefficient.contiguous(),
            row_shift.contiguous(), row_sum.contiguous(), log_b_prev.contiguous(), grad_log_a, row_coefficient,
            partial, num_identity, num_pose, _readable_width(similarity), similarity.stride(0), similarity.stride(1),
            layout.rows_per_program, *_log2_constants(similarity, epsilon), _log2_kappa(epsilon, similarity_bound),
            LOG_DIVISION_EPS, BLOCK_M=layout.block, NUM_STAGES=layout.stages, num_warps=layout.num_warps)
    return grad_log_a, row_coefficient, partial.sum(1)


def fused_plan_warp(similarity: torch.Tensor, log_b: torch.Tensor, shift: torch.Tensor, pose_points: torch.Tensor,
                    epsilon: float, *, programs_per_batch: int | None = None, pipeline_stages: int | None = None,
                    num_warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The final softmax's warp in one read of C: stored.py's `_plan_warp` with a bounded shift.

    With s = (C - 1) / epsilon (formed as in `fused_row_column_forward`):
    total[n] = sum_m exp(s[n, m] + log_b[m] - shift) and
    warp[n] = sum_m exp(s[n, m] + log_b[m] - shift) pose_points[m] / total[n], for each batch element.

    Args:
        similarity: C, float32 or fixed point (int16) (B, N, M), rows contiguous; see `fused_pass_supported`.
        log_b: float32 (B, M).
        shift: float32 (B,), an upper bound of s + log b over each batch element (`bounded_shift`).
        pose_points: float32 (B, M, 3) stored pose-major, as (B, 3, M) (stored.py's `_pose_major`).
        epsilon: entropic temperature.
        programs_per_batch, pipeline_stages, num_warps: as in `fused_row_column_forward`.
    Returns:
        warp: float32 (B, N, 3).
        total: float32 (B, N).
    """
    _validate_fused_inputs(similarity, epsilon, programs_per_batch, pipeline_stages, num_warps, log_b=(log_b, "BM"),
                           shift=(shift, "B"))
    batch, num_identity, num_pose = similarity.shape
    if pose_points.shape != (batch, num_pose, 3) or pose_points.dtype != torch.float32 or \
            pose_points.device != similarity.device or pose_points.stride(1) != 1 or pose_points.stride(2) != num_pose:
        raise ValueError(f"pose_points must be float32 (B, M, 3) = {(batch, num_pose, 3)} on {similarity.device} "
                         f"stored pose-major, as (B, 3, M) (stored.py's _pose_major), got {pose_points.dtype} "
                         f"{tuple(pose_points.shape)} with strides {pose_points.stride()} on {pose_points.device}")
    layout = _launch_layout(similarity, programs_per_batch, pipeline_stages, num_warps)
    warp = similarity.new_empty(batch, num_identity, 3, dtype=torch.float32)
    total = similarity.new_empty(batch, num_identity, dtype=torch.float32)
    with on_device(similarity):
        _plan_warp_kernel[(layout.programs, batch)](
            similarity, log_b.contiguous(), shift.contiguous(), pose_points, warp, total, num_identity, num_pose,
            _readable_width(similarity), similarity.stride(0), similarity.stride(1), layout.rows_per_program,
            *_log2_constants(similarity, epsilon), BLOCK_M=layout.block, NUM_STAGES=layout.stages,
            num_warps=layout.num_warps)
    return warp, total


def fused_plan_column_sums(similarity: torch.Tensor, log_b: torch.Tensor, shift: torch.Tensor,
                           row_weights: torch.Tensor, epsilon: float, *, programs_per_batch: int | None = None,
                           pipeline_stages: int | None = None, num_warps: int | None = None) -> torch.Tensor:
    """The final softmax's column sums in one read of C: stored.py's `_plan_column_sums` with a bounded shift.

    sums[m, k] = sum_n exp(s[n, m] + log_b[m] - shift) row_weights[n, k], for each batch element, with s formed as
    in `fused_row_column_forward`. Each program sums its rows; a torch epilogue adds the programs' partial sums in a
    fixed order.

    Args:
        similarity: C, float32 or fixed point (int16) (B, N, M), rows contiguous; see `fused_pass_supported`.
        log_b: float32 (B, M).
        shift: float32 (B,), the shift of the softmax (`fused_plan_warp`).
        row_weights: float32 (B, N, 4), the backward's [g, -g.warp] / total.
        epsilon: entropic temperature.
        programs_per_batch, pipeline_stages, num_warps: as in `fused_row_column_forward`.
    Returns:
        float32 (B, M, 4).
    """
    _validate_fused_inputs(similarity, epsilon, programs_per_batch, pipeline_stages, num_warps, log_b=(log_b, "BM"),
                           shift=(shift, "B"))
    batch, num_identity, num_pose = similarity.shape
    if row_weights.shape != (batch, num_identity, 4) or row_weights.dtype != torch.float32 or \
            row_weights.device != similarity.device:
        raise ValueError(f"row_weights must be float32 (B, N, 4) = {(batch, num_identity, 4)} on "
                         f"{similarity.device}, got {row_weights.dtype} {tuple(row_weights.shape)} on "
                         f"{row_weights.device}")
    layout = _launch_layout(similarity, programs_per_batch, pipeline_stages, num_warps,
                            PLAN_COLUMN_SUMS_LANES_PER_THREAD)
    partial = similarity.new_empty(batch, layout.programs, 4, num_pose, dtype=torch.float32)
    with on_device(similarity):
        _plan_column_sums_kernel[(layout.programs, batch)](
            similarity, log_b.contiguous(), shift.contiguous(), row_weights.contiguous(), partial, num_identity,
            num_pose, _readable_width(similarity), similarity.stride(0), similarity.stride(1),
            layout.rows_per_program, *_log2_constants(similarity, epsilon), BLOCK_M=layout.block,
            NUM_STAGES=layout.stages, num_warps=layout.num_warps)
    return partial.sum(1).transpose(1, 2).contiguous()


def fused_fixed_point_column_pass(similarity: torch.Tensor, epsilon: float, *, programs_per_batch: int | None = None,
                                  pipeline_stages: int | None = None, num_warps: int | None = None
                                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """A float32 C turned into 16-bit fixed point, and the first Sinkhorn column pass over the fixed-point values,
    in one read of the float32 C.

    The first column pass reads a_0 = 1 / N, whose bounded shift at similarity bound 1 (`bounded_shift`) is
    log a_0 itself, so its shifted logits are s = (q * SIMILARITY_STEP - 1) / epsilon and its sums
    column_sum[m] = sum_n exp(s[n, m]).

    Args:
        similarity: C, float32 (B, N, M), rows contiguous; see `fused_pass_supported`.
        epsilon: entropic temperature.
        programs_per_batch, pipeline_stages, num_warps: as in `fused_row_column_forward`.
    Returns:
        fixed_point: int16 (B, N, M), common.py's `fixed_point_similarity(similarity)`: a view of rows zero-padded
            to a multiple of 8 lanes.
        column_sum: float32 (B, M).
    """
    _validate_fused_inputs(similarity, epsilon, programs_per_batch, pipeline_stages, num_warps)
    if similarity.dtype != torch.float32:
        raise ValueError(f"fused_fixed_point_column_pass reads a float32 similarity, got {similarity.dtype}")
    batch, num_identity, num_pose = similarity.shape
    layout = _launch_layout(similarity, programs_per_batch, pipeline_stages, num_warps)
    fixed_row_stride = aligned(num_pose)  # as common.py's `fixed_point_similarity` pads
    fixed_point = similarity.new_empty(batch, num_identity, fixed_row_stride, dtype=torch.int16)
    partial = similarity.new_empty(batch, layout.programs, num_pose, dtype=torch.float32)
    with on_device(similarity):
        _fixed_point_column_kernel[(layout.programs, batch)](
            similarity, fixed_point, partial, num_identity, num_pose, _readable_width(similarity), fixed_row_stride,
            similarity.stride(0), similarity.stride(1), fixed_point.stride(0), layout.rows_per_program,
            float(SIMILARITY_LEVELS), *_log2_constants(fixed_point, epsilon), BLOCK_M=layout.block,
            NUM_STAGES=layout.stages, num_warps=layout.num_warps)
    return fixed_point[..., :num_pose], partial.sum(1)


# The fixed-point product's tile (identity rows, pose columns, contraction, warps): 128 x 128 fp32 accumulators at 8
# warps with three 32 KiB stages of operands in shared memory. At batch 8 and 6890 vertices on the H100 (`python -m
# util.bench --fused_passes`, 2026-12-07) it took 1.561 ms, against 1.922 for C's split product and the fixed-point
# column pass it replaces and 1.62 to 1.75 for the other tiles timed.
PRODUCT_TILE = (128, 128, 64, 8)
PRODUCT_STAGES = 3


def fused_fixed_point_product(left: torch.Tensor, right: torch.Tensor, num_pose: int, epsilon: float, *,
                              tile: tuple[int, int, int, int] = PRODUCT_TILE) -> tuple[torch.Tensor, torch.Tensor]:
    """C = left @ right as 16-bit fixed point, with the first Sinkhorn column pass over it, without C in float32.

    What `split_product` and then `fused_fixed_point_column_pass` give, in one kernel: each tile of the product is
    accumulated in float32 on the tensor cores, rounded to fixed point (common.py's `fixed_point_similarity`) and
    stored as int16, and its terms exp(s) = exp((q SIMILARITY_STEP - 1) / epsilon) are summed over its rows. A C
    element within a float32 rounding of a half level may round to the neighbouring level where cuBLAS's sum order
    would not.

    Args:
        left: float16 (B, N, D), rows contiguous; right: float16 (B, D, M') with M' >= num_pose, columns contiguous,
            zero past num_pose (layers.py's `split_operands` forms both, M' = aligned(M)).
        num_pose: M.
        epsilon: entropic temperature.
        tile: (rows, columns, contraction, warps) of a program, powers of two, the first three at least 16 (for
            benchmarks).
    Returns:
        fixed_point: int16 (B, N, M), a view of rows of M' lanes, zero past M.
        column_sum: float32 (B, M), as `fused_fixed_point_column_pass` returns it.
    """
    if left.dim() != 3 or right.dim() != 3 or left.dtype != torch.float16 or right.dtype != torch.float16 or \
            left.shape[0] != right.shape[0] or left.shape[2] != right.shape[1] or \
            not 1 <= num_pose <= right.shape[2] or right.shape[2] != aligned(num_pose):
        raise ValueError(f"fused_fixed_point_product takes float16 (B, N, D) and (B, D, M') with M' = "
                         f"{aligned(num_pose) if num_pose > 0 else 'aligned(M)'} for M = {num_pose}, got "
                         f"{left.dtype} {tuple(left.shape)} and {right.dtype} {tuple(right.shape)}")
    validate_tile(tile, ("rows", "columns", "contraction"))
    left, right = left.contiguous(), right.contiguous()
    batch, num_identity, depth = left.shape
    padded_pose = right.shape[2]
    fixed_point = left.new_empty(batch, num_identity, padded_pose, dtype=torch.int16)
    _validate_fused_inputs(fixed_point[..., :num_pose], epsilon)
    block_n, block_m, block_k, num_warps = tile
    row_blocks = triton.cdiv(num_identity, block_n)
    partial = left.new_empty(batch, row_blocks, num_pose, dtype=torch.float32)
    with on_device(left):
        _fixed_point_product_kernel[(row_blocks, triton.cdiv(padded_pose, block_m), batch)](
            left, right, fixed_point, partial, num_identity, num_pose, depth, padded_pose, left.stride(0),
            right.stride(0), fixed_point.stride(0), float(SIMILARITY_LEVELS),
            *_log2_constants(fixed_point, epsilon), BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_K=block_k,
            num_warps=num_warps, num_stages=PRODUCT_STAGES)
    return fixed_point[..., :num_pose], partial.sum(1)


# dL/dC tiles (identity rows, pose columns, warps), each side at least the 16 a product on the tensor cores needs. At
# batch 8 and 6890 vertices on the H100 (`python -m util.bench --fused_passes`, 2026-12-07): 32 x 128 at 4 warps took
# 0.867 ms on the fixed-point C (0.923 on float32) against 0.925 for 64 x 128 and 0.960 for 32 x 256; the earlier
# kernel, a rank-by-rank outer product in 4 x 1024 tiles, took 1.135 ms (1.204).
GRADIENT_TILE = (32, 128, 4)
# U V^T's ranks, padded with zeros to a power of two of at least this (the products' depth).
MIN_PADDED_RANK = 16


def fused_similarity_gradient(similarity: torch.Tensor, row_factors: torch.Tensor, column_factors: torch.Tensor,
                              epsilon: float, similarity_bound: float, gradient_dtype: torch.dtype, padding: int, *,
                              tile: tuple[int, int, int] = GRADIENT_TILE) -> torch.Tensor:
    """dL/dC = exp(s + kappa) (U V^T) / epsilon in one read of C (s = (C - 1) / epsilon, kappa common.py's
    `kernel_offset`), written in gradient_dtype with `padding` zero columns: stored.py's
    `_bounded_similarity_gradient` (its float32 reference) as one kernel.

    Args:
        similarity: C, float32 or fixed point (int16, common.py's `fixed_point_similarity`) (B, N, M), rows
            contiguous; see `fused_pass_supported`.
        row_factors: U, float32 (B, N, R); column_factors: V, float32 (B, M, R) stored pose-major, as (B, R, M)
            (stored.py's `_pose_major`).
        epsilon: entropic temperature. similarity_bound: the forward's bound on |C|.
        gradient_dtype: float16, bfloat16 or float32. padding: >= 0.
        tile: (rows, columns, warps) of a program, powers of two, rows and columns at least 16 (for benchmarks).
    Returns:
        dL/dC, (B, N, M + padding) in gradient_dtype.
    """
    batch, num_identity, num_pose = similarity.shape
    rank = row_factors.shape[2]
    if row_factors.shape != (batch, num_identity, rank) or column_factors.shape != (batch, num_pose, rank):
        raise ValueError(f"row_factors (B, N, R) and column_factors (B, M, R) must match similarity "
                         f"{tuple(similarity.shape)}, got {tuple(row_factors.shape)} and {tuple(column_factors.shape)}")
    if column_factors.stride(1) != 1 or column_factors.stride(0) != rank * column_factors.stride(2):
        raise ValueError("column_factors must be stored pose-major, as (B, R, M) (stored.py's _pose_major)")
    if padding < 0 or gradient_dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"padding must be >= 0 and gradient_dtype float16, bfloat16 or float32, got {padding} and "
                         f"{gradient_dtype}")
    validate_tile(tile, ("rows", "columns"))
    _validate_fused_inputs(similarity, epsilon, similarity_bound=similarity_bound)
    block_n, block_m, num_warps = tile
    padded_pose = num_pose + padding
    gradient = similarity.new_empty(batch, num_identity, padded_pose, dtype=gradient_dtype)
    grid = (triton.cdiv(num_identity, block_n), triton.cdiv(padded_pose, block_m), batch)
    with on_device(similarity):
        _similarity_gradient_kernel[grid](
            similarity, row_factors.contiguous(), column_factors, gradient, num_identity, num_pose,
            _readable_width(similarity), padded_pose, similarity.stride(0), similarity.stride(1),
            column_factors.stride(2), *_log2_constants(similarity, epsilon), _log2_kappa(epsilon, similarity_bound),
            1.0 / epsilon, RANK=rank,
            RANK_PADDED=max(MIN_PADDED_RANK, triton.next_power_of_2(rank)), BLOCK_N=block_n, BLOCK_M=block_m,
            num_warps=num_warps)
    return gradient


def fused_row_column_forward_naive(similarity: torch.Tensor, log_b: torch.Tensor, row_shift: torch.Tensor,
                                   epsilon: float, similarity_bound: float
                                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`fused_row_column_forward` in float64 on whole (B, N, M) tensors, for testing.

    Args:
        similarity: float or int16 fixed point (B, N, M); log_b: float (B, M); row_shift: float (B,).
    Returns:
        row_sum (B, N), log_a (B, N), column_shift (B,), column_sum (B, M), all float64.
    """
    log_kernel = log_kernel_of(similarity, epsilon, torch.float64)  # (B, N, M)
    row_shift = row_shift.double()
    row_sum = torch.exp(log_kernel + log_b.double().unsqueeze(1) - row_shift.view(-1, 1, 1)).sum(2)  # (B, N)
    log_a = log_marginal_update(row_shift.unsqueeze(1) + row_sum.log(), similarity.shape[1])
    column_shift = bounded_shift(log_a, similarity_bound, epsilon)
    column_sum = torch.exp(log_kernel + log_a.unsqueeze(2) - column_shift.view(-1, 1, 1)).sum(1)  # (B, M)
    return row_sum, log_a, column_shift, column_sum


def fused_row_column_backward_naive(similarity: torch.Tensor, log_a_prev: torch.Tensor, column_shift: torch.Tensor,
                                    column_coefficient: torch.Tensor, row_shift: torch.Tensor, row_sum: torch.Tensor,
                                    log_b_prev: torch.Tensor, epsilon: float
                                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`fused_row_column_backward` in float64 on whole (B, N, M) tensors, for testing.

    Args:
        similarity: float or int16 fixed point (B, N, M); log_a_prev, row_sum: float (B, N); column_coefficient,
            log_b_prev: float (B, M); column_shift, row_shift: float (B,).
    Returns:
        grad_log_a (B, N), row_coefficient (B, N), grad_log_b (B, M), all float64.
    """
    log_kernel = log_kernel_of(similarity, epsilon, torch.float64)  # (B, N, M)
    column_weights = torch.exp(log_kernel + (log_a_prev.double() - column_shift.double().unsqueeze(1)).unsqueeze(2))
    grad_log_a = (column_weights * column_coefficient.double().unsqueeze(1)).sum(2)  # (B, N)
    row_shift, row_sum = row_shift.double(), row_sum.double()
    row_coefficient = (-torch.sigmoid(row_shift.unsqueeze(1) + row_sum.log() - LOG_DIVISION_EPS) * grad_log_a
                       / row_sum)
    row_weights = torch.exp(log_kernel + (log_b_prev.double() - row_shift.unsqueeze(1)).unsqueeze(1))  # (B, N, M)
    return grad_log_a, row_coefficient, (row_weights * row_coefficient.unsqueeze(2)).sum(1)
