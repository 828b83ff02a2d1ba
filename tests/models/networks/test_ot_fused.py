"""Tests for models/networks/ot/fused.py: the fused row/column Sinkhorn passes against their float64 references.

The kernels run on the GPU when there is one, and otherwise in Triton's interpreter on CPU tensors (the root
conftest.py sets TRITON_INTERPRET=1 before triton is imported); both need triton. Without it (CI) the kernel tests are
skipped, and the references' math and the merge of per-program column sums are still tested.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.networks.ot import fused
from models.networks.ot.common import (LOG_DIVISION_EPS, fixed_point_similarity, kernel_offset, log_kernel_of,
                                       log_marginal_update)

EPSILON = 0.03
SIMILARITY_BOUND = 1.0
# (B, N, M): a tiny case, B = 1 with N < M, B = 3 with N > M and with N < M, and N = M = 64; only 64 is a power of
# two, so the other rows have masked lanes.
SHAPES = [(1, 2, 3), (1, 33, 47), (3, 48, 20), (3, 20, 70), (2, 64, 64)]
# The default, one program streaming every row (the running shift rises many times), several programs.
PROGRAMS_PER_BATCH = [None, 1, 5]
# Elementwise, against float64: sums relative, logs absolute (which is a's relative error).
SUM_TOLERANCE = 1e-5
LOG_TOLERANCE = 1e-5
# The gradient sums mix signs, so their error is measured against the largest entry.
GRADIENT_TOLERANCE = 1e-5

KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_KERNELS_UNAVAILABLE = fused.unsupported_reason(torch.empty(1, 1, 1, device=KERNEL_DEVICE))
requires_kernels = pytest.mark.skipif(_KERNELS_UNAVAILABLE is not None, reason=str(_KERNELS_UNAVAILABLE))


def _cosine_similarity(batch: int, num_identity: int, num_pose: int, generator: torch.Generator) -> torch.Tensor:
    """C = theta^T phi of random unit 4-channel features (few channels spread C over [-1, 1]): float64 (B, N, M)."""
    theta = torch.nn.functional.normalize(torch.randn(batch, 4, num_identity, generator=generator,
                                                      dtype=torch.float64), dim=1)
    phi = torch.nn.functional.normalize(torch.randn(batch, 4, num_pose, generator=generator, dtype=torch.float64),
                                        dim=1)
    return theta.transpose(1, 2) @ phi  # (B, N, M)


def _sinkhorn_state(batch: int, num_identity: int, num_pose: int, seed: int,
                    steps: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """C (B, N, M) and log a (B, N), log b (B, M) after `steps` Sinkhorn step pairs from a = 1 / N, all float64."""
    similarity = _cosine_similarity(batch, num_identity, num_pose, torch.Generator().manual_seed(seed))
    log_kernel = (similarity - 1.0) / EPSILON  # (B, N, M)
    log_a = similarity.new_full((batch, num_identity), -math.log(num_identity))
    for _ in range(steps):
        log_b = log_marginal_update(torch.logsumexp(log_kernel + log_a.unsqueeze(2), 1), num_pose)
        log_a = log_marginal_update(torch.logsumexp(log_kernel + log_b.unsqueeze(1), 2), num_identity)
    return similarity, log_a, log_b


def _forward_inputs(batch: int, num_identity: int, num_pose: int, seed: int,
                    similarity_bound: float = SIMILARITY_BOUND) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 similarity, log b and its bounded row shift (as common.py's `bounded_shift` forms it)."""
    similarity, _, log_b = _sinkhorn_state(batch, num_identity, num_pose, seed)
    log_b = log_b.float()
    return similarity.float(), log_b, log_b.amax(1) + (similarity_bound - 1.0) / EPSILON


def _backward_inputs(batch: int, num_identity: int, num_pose: int, seed: int) -> tuple:
    """float32 arguments of `fused_row_column_backward` for the step pair that starts from a real log b.

    The column coefficient is that of a random dL/dlog b_t, as `_stored_backward` forms it.
    """
    similarity, log_b_prev, row_shift = _forward_inputs(batch, num_identity, num_pose, seed)
    row_sum, log_a, column_shift, column_sum = fused.fused_row_column_forward_naive(
        similarity, log_b_prev, row_shift, EPSILON, SIMILARITY_BOUND)
    grad_log_b = torch.randn(batch, num_pose, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    column_lse = column_shift.unsqueeze(1) + column_sum.log()
    column_coefficient = -torch.sigmoid(column_lse - LOG_DIVISION_EPS) * grad_log_b / column_sum
    return (similarity, log_a.float(), column_shift.float(), column_coefficient.float(), row_shift, row_sum.float(),
            log_b_prev, EPSILON)


def _to_kernel_device(tensors) -> list:
    return [tensor.to(KERNEL_DEVICE) if isinstance(tensor, torch.Tensor) else tensor for tensor in tensors]


def _padded_lanes(fixed_point: torch.Tensor) -> torch.Tensor:
    """A kernel's fixed-point C (B, N, M), a view of padded rows, with its rows' every lane, on the CPU. (.cpu() of
    the view itself copies only the M lanes a row.)"""
    batch, num_identity, _ = fixed_point.shape
    return fixed_point.as_strided((batch, num_identity, fixed_point.stride(1)), fixed_point.stride()).cpu()


def _assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float) -> None:
    assert actual.dtype == torch.float32 and actual.shape == expected.shape, f"{name}: {actual.dtype} {actual.shape}"
    torch.testing.assert_close(actual.double().cpu(), expected, rtol=rtol, atol=atol,
                               msg=lambda text: f"{name}: {text}")


def _assert_gradient_close(name: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
    _assert_close(name, actual, expected, rtol=0, atol=GRADIENT_TOLERANCE * expected.abs().max().item())


# ---------------------------------------------------------------------------------------------------------------
# The references and the merge of program partials (no triton needed)
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape, similarity_bound", list(itertools.product(SHAPES, [1.0, 1.2])))
def test_naive_forward_matches_log_sum_exp_definition(shape, similarity_bound):
    similarity, _, log_b = _sinkhorn_state(*shape, seed=sum(shape))
    row_shift = log_b.amax(1) + (similarity_bound - 1.0) / EPSILON
    row_sum, log_a, column_shift, column_sum = fused.fused_row_column_forward_naive(
        similarity, log_b, row_shift, EPSILON, similarity_bound)
    log_kernel = (similarity - 1.0) / EPSILON  # (B, N, M)
    row_lse = torch.logsumexp(log_kernel + log_b.unsqueeze(1), 2)  # (B, N)
    expected_log_a = -math.log(shape[1]) - torch.logaddexp(row_lse, torch.full_like(row_lse, LOG_DIVISION_EPS))
    column_lse = torch.logsumexp(log_kernel + expected_log_a.unsqueeze(2), 1)  # (B, M)
    torch.testing.assert_close(row_shift.unsqueeze(1) + row_sum.log(), row_lse, rtol=0, atol=1e-12)
    torch.testing.assert_close(log_a, expected_log_a, rtol=0, atol=1e-12)
    torch.testing.assert_close(column_shift, expected_log_a.amax(1) + (similarity_bound - 1.0) / EPSILON)
    torch.testing.assert_close(column_shift.unsqueeze(1) + column_sum.log(), column_lse, rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_naive_backward_is_the_vector_jacobian_product(shape):
    """Through log b_{t-1} -> log a_{t-1} -> log b_t, autograd's gradients of <g, log b_t> in log a_{t-1} and
    log b_{t-1} are grad_log_a and grad_log_b, given the column coefficient of g."""
    batch, num_identity, num_pose = shape
    similarity, _, log_b_prev = _sinkhorn_state(*shape, seed=sum(shape) + 1)
    log_b_prev.requires_grad_()
    row_shift = log_b_prev.detach().amax(1)
    row_sum, log_a, column_shift, column_sum = fused.fused_row_column_forward_naive(
        similarity, log_b_prev, row_shift, EPSILON, SIMILARITY_BOUND)
    column_lse = column_shift.unsqueeze(1) + column_sum.log()
    log_b = log_marginal_update(column_lse, num_pose)
    grad_output = torch.randn(batch, num_pose, generator=torch.Generator().manual_seed(sum(shape)),
                              dtype=torch.float64)
    expected_grad_log_a, expected_grad_log_b = torch.autograd.grad((log_b * grad_output).sum(), [log_a, log_b_prev])
    column_coefficient = -torch.sigmoid(column_lse - LOG_DIVISION_EPS) * grad_output / column_sum
    grad_log_a, _, grad_log_b = fused.fused_row_column_backward_naive(
        similarity, log_a.detach(), column_shift.detach(), column_coefficient.detach(), row_shift, row_sum.detach(),
        log_b_prev.detach(), EPSILON)
    torch.testing.assert_close(grad_log_a, expected_grad_log_a, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_log_b, expected_grad_log_b, rtol=1e-10, atol=1e-12)


def _program_partials(log_kernel: torch.Tensor, log_a: torch.Tensor,
                      programs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward kernel's column partial sums (B, P, M) and program shifts (B, P), in float64: each program
    streams its rows and shifts its sums by the largest log a so far, rescaling them when that rises."""
    batch, num_identity, num_pose = log_kernel.shape
    rows_per_program = math.ceil(num_identity / programs)
    partial = log_kernel.new_zeros(batch, programs, num_pose)
    program_shift = log_kernel.new_full((batch, programs), -math.inf)
    for program in range(programs):
        for row in range(program * rows_per_program, min((program + 1) * rows_per_program, num_identity)):
            shift = torch.maximum(program_shift[:, program], log_a[:, row])  # (B,)
            partial[:, program] = (partial[:, program] * torch.exp(program_shift[:, program] - shift).unsqueeze(1)
                                   + torch.exp(log_kernel[:, row] + (log_a[:, row] - shift).unsqueeze(1)))
            program_shift[:, program] = shift
    return partial, program_shift


@pytest.mark.parametrize("programs", [1, 4, 9])
def test_program_partials_merge_to_the_column_sums(programs):
    # N = 9 in rows of ceil(9 / 4) = 3 leaves the fourth of 4 programs without rows.
    similarity, log_b, row_shift = (tensor.double() for tensor in _forward_inputs(2, 9, 13, seed=20))
    _, log_a, column_shift, column_sum = fused.fused_row_column_forward_naive(
        similarity, log_b, row_shift, EPSILON, SIMILARITY_BOUND)
    partial, program_shift = _program_partials((similarity - 1.0) / EPSILON, log_a, programs)
    merged = fused._merge_column_partials(partial, program_shift, column_shift)
    assert torch.isfinite(merged).all()
    torch.testing.assert_close(merged, column_sum, rtol=1e-12, atol=0)


def test_fused_pass_supported_rejects_what_the_kernels_cannot_read():
    similarity = torch.zeros(2, 3, 4, device=KERNEL_DEVICE)
    assert not fused.fused_pass_supported(similarity.double())
    assert not fused.fused_pass_supported(similarity.transpose(1, 2))
    assert not fused.fused_pass_supported(similarity[0])
    assert not fused.fused_pass_supported(torch.zeros(1, 1, fused.MAX_FUSED_POSE_VERTICES + 1, device=KERNEL_DEVICE))
    assert fused.fused_pass_supported(similarity) == (_KERNELS_UNAVAILABLE is None)


def test_readable_width_reads_padding_only_inside_the_storage():
    padded = torch.zeros(2, 5, 16)
    assert fused._readable_width(padded) == 16
    assert fused._readable_width(padded[..., :13]) == 16  # split_product's C: every row's padding is stored
    assert fused._readable_width(padded[:, 1:, :13]) == 16
    # The same strides over a storage that ends at the last row's M-th lane: its padding is not there to read.
    flat = torch.zeros(5 * 16 + 4 * 16 + 13)
    assert fused._readable_width(flat.as_strided((2, 5, 13), (5 * 16, 16, 1))) == 13
    assert fused._readable_width(padded.transpose(1, 2)[:, :13]) == 5  # row stride 1: no padding


def test_invalid_inputs_raise():
    similarity, log_b, row_shift = _forward_inputs(2, 5, 6, seed=21)
    with pytest.raises(ValueError, match="similarity must have shape"):
        fused.fused_row_column_forward(similarity[0], log_b, row_shift, EPSILON, SIMILARITY_BOUND)
    with pytest.raises(ValueError, match=r"log_b must be a float32 tensor of shape \(2, 6\)"):
        fused.fused_row_column_forward(similarity, log_b[:, :5], row_shift, EPSILON, SIMILARITY_BOUND)
    with pytest.raises(ValueError, match="row_shift must be a float32 tensor"):
        fused.fused_row_column_forward(similarity, log_b, row_shift.double(), EPSILON, SIMILARITY_BOUND)
    with pytest.raises(ValueError, match="epsilon must be positive"):
        fused.fused_row_column_forward(similarity, log_b, row_shift, 0.0, SIMILARITY_BOUND)
    with pytest.raises(ValueError, match="programs_per_batch"):
        fused.fused_row_column_forward(similarity, log_b, row_shift, EPSILON, SIMILARITY_BOUND, programs_per_batch=0)
    with pytest.raises(ValueError, match="pipeline_stages must be a positive int"):
        fused.fused_row_column_forward(similarity, log_b, row_shift, EPSILON, SIMILARITY_BOUND, pipeline_stages=2.0)
    with pytest.raises(ValueError, match="num_warps must be a power of two"):
        fused.fused_row_column_forward(similarity, log_b, row_shift, EPSILON, SIMILARITY_BOUND, num_warps=12)
    backward_inputs = list(_backward_inputs(2, 5, 6, seed=22))
    backward_inputs[5] = backward_inputs[5][:, :4]
    with pytest.raises(ValueError, match=r"row_sum must be a float32 tensor of shape \(2, 5\)"):
        fused.fused_row_column_backward(*backward_inputs, SIMILARITY_BOUND)
    non_contiguous = similarity.transpose(1, 2).contiguous().transpose(1, 2)
    with pytest.raises(RuntimeError, match="the fused Sinkhorn passes need"):
        fused.fused_row_column_forward(non_contiguous, log_b, row_shift, EPSILON, SIMILARITY_BOUND)


# ---------------------------------------------------------------------------------------------------------------
# The kernels (GPU, or Triton's interpreter on CPU)
# ---------------------------------------------------------------------------------------------------------------

def _padded_rows(similarity: torch.Tensor, extra: int) -> torch.Tensor:
    """similarity as a view of rows `extra` lanes longer, the lanes past M NaN (a kernel that read them would
    show it), as `split_product` forms C on a GPU."""
    if not extra:
        return similarity
    filler = similarity.new_full((*similarity.shape[:2], extra), float("nan"))
    return torch.cat([similarity, filler], dim=2)[..., :similarity.shape[2]]


def _fixed_point(inputs: tuple) -> tuple:
    """inputs with C (the first) in 16-bit fixed point, as the mixed-precision stored warp keeps it (in rows padded
    to 16 bytes)."""
    return (fixed_point_similarity(inputs[0]), *inputs[1:])


def _assert_forward_matches_naive(shape, programs_per_batch, seed: int, similarity_bound: float = SIMILARITY_BOUND,
                                  row_padding: int = 0, fixed_point: bool = False, **layout) -> None:
    inputs = _forward_inputs(*shape, seed=seed, similarity_bound=similarity_bound)
    if fixed_point:
        inputs = _fixed_point(inputs)
    expected = fused.fused_row_column_forward_naive(*inputs, EPSILON, similarity_bound)
    inputs = (_padded_rows(inputs[0], row_padding), *inputs[1:])
    actual = fused.fused_row_column_forward(*_to_kernel_device(inputs), EPSILON, similarity_bound,
                                            programs_per_batch=programs_per_batch, **layout)
    for name, value, reference, rtol, atol in zip(
            ("row_sum", "log_a", "column_shift", "column_sum"), actual, expected,
            (SUM_TOLERANCE, 0, 0, SUM_TOLERANCE), (0, LOG_TOLERANCE, LOG_TOLERANCE, 0)):
        _assert_close(name, value, reference, rtol, atol)


def _assert_backward_matches_naive(shape, programs_per_batch, seed: int, row_padding: int = 0,
                                   fixed_point: bool = False, **layout) -> None:
    inputs = _backward_inputs(*shape, seed=seed)
    if fixed_point:
        inputs = _fixed_point(inputs)
    expected = fused.fused_row_column_backward_naive(*inputs)
    inputs = (_padded_rows(inputs[0], row_padding), *inputs[1:])
    actual = fused.fused_row_column_backward(*_to_kernel_device(inputs), SIMILARITY_BOUND,
                                             programs_per_batch=programs_per_batch, **layout)
    for name, value, reference in zip(("grad_log_a", "row_coefficient", "grad_log_b"), actual, expected):
        _assert_gradient_close(name, value, reference)


@requires_kernels
@pytest.mark.parametrize("shape, programs_per_batch", list(itertools.product(SHAPES, PROGRAMS_PER_BATCH)))
def test_fused_forward_matches_naive(shape, programs_per_batch):
    _assert_forward_matches_naive(shape, programs_per_batch, seed=100 * shape[0] + shape[1] + shape[2])


@requires_kernels
@pytest.mark.parametrize("shape, programs_per_batch", list(itertools.product(SHAPES, PROGRAMS_PER_BATCH)))
def test_fused_backward_matches_naive(shape, programs_per_batch):
    _assert_backward_matches_naive(shape, programs_per_batch, seed=100 * shape[0] + shape[1] + shape[2] + 1)


@requires_kernels
def test_fused_passes_with_a_program_without_rows():
    # N = 9 in rows of ceil(9 / 4) = 3: the fourth program of each batch element has none.
    _assert_forward_matches_naive((2, 9, 13), programs_per_batch=4, seed=30)
    _assert_backward_matches_naive((2, 9, 13), programs_per_batch=4, seed=31)


@requires_kernels
@pytest.mark.parametrize("shape, row_padding", [((2, 9, 13), 3), ((1, 12, 6890), 6)])
def test_fused_passes_read_a_view_of_padded_rows(shape, row_padding):
    # C as split_product leaves it on a GPU: rows padded to a multiple of 8 lanes, the view keeps the first M.
    _assert_forward_matches_naive(shape, None, seed=33, row_padding=row_padding)
    _assert_backward_matches_naive(shape, None, seed=34, row_padding=row_padding)


@requires_kernels
@pytest.mark.parametrize("shape", [(2, 9, 13), (3, 20, 70), (1, 12, 6890)])
def test_fused_passes_read_a_fixed_point_similarity(shape):
    # int16 C as the mixed-precision stored warp keeps it: M = 13, 70 and 6890 are padded to 16, 72 and 6896 lanes.
    _assert_forward_matches_naive(shape, None, seed=37, fixed_point=True)
    _assert_backward_matches_naive(shape, None, seed=38, fixed_point=True)


@requires_kernels
@pytest.mark.parametrize("shape, programs_per_batch, row_padding",
                         [((1, 2, 3), None, 0), ((2, 9, 13), 4, 3), ((3, 20, 70), 1, 0), ((1, 12, 6890), None, 6)])
def test_fused_fixed_point_column_pass_matches_the_rounding_and_the_column_sums(shape, programs_per_batch,
                                                                                row_padding):
    """The fixed-point C equals common.py's `fixed_point_similarity` (values, zero padding, row stride) and the
    column sums are sum_n exp(s) over that C, the first column pass's at a_0 = 1 / N and bound 1."""
    similarity = _cosine_similarity(*shape, torch.Generator().manual_seed(39)).float()
    similarity[0, 0, 0] = 1.0 + 1e-6  # past the bound by rounding: clamped
    expected_fixed_point = fixed_point_similarity(similarity)
    log_kernel = log_kernel_of(expected_fixed_point, EPSILON, torch.float64)
    expected_column_sum = torch.exp(log_kernel).sum(1)  # (B, M)
    fixed_point, column_sum = fused.fused_fixed_point_column_pass(
        *_to_kernel_device([_padded_rows(similarity, row_padding)]), EPSILON, programs_per_batch=programs_per_batch)
    assert fixed_point.dtype == torch.int16 and fixed_point.stride() == expected_fixed_point.stride()
    assert torch.equal(fixed_point.cpu(), expected_fixed_point)
    assert not _padded_lanes(fixed_point)[..., shape[2]:].any()
    _assert_close("column_sum", column_sum, expected_column_sum, SUM_TOLERANCE, 0)


def _rounding_edges() -> torch.Tensor:
    """float32 similarities where rounding to fixed point is delicate, (1, 48, 64): C * LEVELS on a half level (in
    float32 steps) and one to three float32 steps either side, those around +-0.5 levels (where scaled + 0.5 itself
    rounds), 0 and -0, and values at or past +-1 (clamped)."""
    from models.networks.ot.common import SIMILARITY_LEVELS

    levels = torch.tensor([-32767, -30001, -12345, -2, -1, 0, 1, 2, 777, 16383, 16384, 32766], dtype=torch.float64)
    centres = ((levels + 0.5) / SIMILARITY_LEVELS).float()
    steps = torch.arange(-3, 4, dtype=torch.float32)
    near_ties = torch.stack([torch.nextafter(centres, centres + step.sign() * 2) if step else centres
                             for step in steps]).flatten()
    for _ in range(2):  # the second and third steps either side
        near_ties = torch.cat([near_ties, torch.nextafter(near_ties, torch.ones_like(near_ties)),
                               torch.nextafter(near_ties, -torch.ones_like(near_ties))]).unique()
    special = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1.0, -1.0, 1.0 + 1e-6, -1.0 - 1e-6, 2.0, -2.0])
    values = torch.cat([near_ties, special])
    values = torch.cat([values, values.new_zeros(48 * 64 - values.numel())])
    return values.view(1, 48, 64)


@requires_kernels
def test_fixed_point_rounding_matches_the_reference_at_ties_and_edges():
    """The kernels' rounding (`_rounded_to_levels`, two float additions and a correction each way instead of floor
    and ceil, and the int16 bits from an addition) equals `fixed_point_similarity` bit for bit at every delicate
    value: exact half levels (which it rounds away from zero), their float32 neighbours, and the sums scaled + 0.5
    that round in float32."""
    from models.networks.ot.common import SIMILARITY_LEVELS

    similarity = _rounding_edges()
    scaled = similarity.clamp(-1.0, 1.0) * SIMILARITY_LEVELS
    assert ((scaled - scaled.floor()) == 0.5).sum() >= 10, "the edges must hold exact half levels"
    fixed_point, _ = fused.fused_fixed_point_column_pass(*_to_kernel_device([similarity]), EPSILON)
    expected = fixed_point_similarity(similarity)
    assert torch.equal(fixed_point.cpu(), expected), (fixed_point.cpu() != expected).sum()


@requires_kernels
@pytest.mark.parametrize("shape, channels", [((1, 2, 3), 4), ((2, 33, 47), 16), ((3, 130, 140), 256),
                                             ((1, 12, 6890), 8)])
def test_fused_fixed_point_product_matches_the_split_product_and_the_first_column_pass(shape, channels):
    """C = theta^T phi of unit features from split_operands' fp16 pieces: the kernel's fixed point is that of the
    float64 product, except by one level where C lies within a float32 sum's rounding of a half level (0.05 of a
    level, 1.5e-6), and zero past M in the padded rows; its column sums are sum_n exp(s) over the fixed point it
    wrote. Contractions of 12 to 768 cover a partial last step of the kernel's 64; 130 x 140 two tiles each way."""
    from models.networks.layers import split_operands
    from models.networks.ot.common import SIMILARITY_LEVELS

    generator = torch.Generator().manual_seed(90 + channels)
    theta, phi = (torch.nn.functional.normalize(torch.randn(shape[0], channels, count, generator=generator), dim=1)
                  for count in shape[1:])
    left, right = split_operands(theta.transpose(1, 2).contiguous(), phi)
    similarity = (left.double() @ right.double())[..., :shape[2]]  # (B, N, M)
    expected = fixed_point_similarity(similarity.float())
    fixed_point, column_sum = fused.fused_fixed_point_product(*_to_kernel_device((left, right)), shape[2], EPSILON)
    assert fixed_point.dtype == torch.int16 and fixed_point.shape == shape and fixed_point.stride() == expected.stride()
    assert not _padded_lanes(fixed_point)[..., shape[2]:].any()
    fixed_point = fixed_point.cpu()
    scaled = similarity.clamp(-1.0, 1.0) * SIMILARITY_LEVELS
    near_half_level = (scaled - scaled.floor() - 0.5).abs() < 0.05
    difference = (fixed_point.int() - expected.int()).abs()
    assert difference.max() <= 1 and not ((difference > 0) & ~near_half_level).any(), difference.sum()
    expected_column_sum = torch.exp(log_kernel_of(fixed_point, EPSILON, torch.float64)).sum(1)  # (B, M)
    _assert_close("column_sum", column_sum, expected_column_sum, SUM_TOLERANCE, 0)


def test_fused_fixed_point_product_rejects_bad_operands():
    left = torch.zeros(2, 5, 12, dtype=torch.float16, device=KERNEL_DEVICE)
    right = torch.zeros(2, 12, 8, dtype=torch.float16, device=KERNEL_DEVICE)
    for bad_left, bad_right, num_pose in ((left.float(), right, 6), (left, right[:, :11], 6), (left, right, 9),
                                          (left, right, 0)):  # M' = 8 serves M = 1..8
        with pytest.raises(ValueError, match="fused_fixed_point_product takes float16"):
            fused.fused_fixed_point_product(bad_left, bad_right, num_pose, EPSILON)
    # Not a power of two; a contraction shorter than a tensor-core product takes; the warps missing.
    for tile in ((128, 96, 64, 8), (128, 128, 8, 8), (128, 128, 64)):
        with pytest.raises(ValueError, match=r"tile must be four powers of two \(rows, columns, contraction, warps\)"):
            fused.fused_fixed_point_product(left, right, 6, EPSILON, tile=tile)


def test_fused_fixed_point_column_pass_reads_only_float32():
    with pytest.raises(ValueError, match="reads a float32 similarity"):
        fused.fused_fixed_point_column_pass(torch.zeros(1, 2, 3, dtype=torch.int16, device=KERNEL_DEVICE), EPSILON)


@requires_kernels
@pytest.mark.parametrize("layout", [{"pipeline_stages": 1}, {"pipeline_stages": 3}, {"pipeline_stages": 4},
                                    {"num_warps": 8}, {"num_warps": 32}])
def test_fused_passes_with_other_launch_layouts(layout):
    # Rows of 6890 lanes in padded rows, as on the GPU; stages and warps change only how the work is scheduled.
    _assert_forward_matches_naive((2, 40, 6890), None, seed=35, row_padding=6, **layout)
    _assert_backward_matches_naive((2, 40, 6890), None, seed=36, row_padding=6, **layout)


@requires_kernels
def test_fused_forward_applies_the_similarity_bound():
    _assert_forward_matches_naive((2, 17, 23), None, seed=32, similarity_bound=1.2)


@requires_kernels
@pytest.mark.parametrize("num_pose", [6890, fused.MAX_FUSED_POSE_VERTICES])
def test_fused_passes_on_wide_rows(num_pose):
    # The SMPL vertex count (BLOCK_M = 8192, 16 warps) and the widest supported row (16384, 32 warps).
    _assert_forward_matches_naive((1, 12, num_pose), None, seed=num_pose)
    _assert_backward_matches_naive((1, 12, num_pose), None, seed=num_pose + 1)


def _gradient_factors(batch: int, num_identity: int, num_pose: int, rank: int, seed: int):
    """U (B, N, R) and pose-major V (B, M, R) of the bounded dL/dC, with the magnitudes of factors in (0, 1]
    times coefficients."""
    from models.networks.ot import stored

    generator = torch.Generator().manual_seed(seed)
    row_factors = torch.randn(batch, num_identity, rank, generator=generator)
    column_factors = stored._pose_major(torch.rand(batch, num_pose, rank, generator=generator))
    return row_factors, column_factors


@requires_kernels
@pytest.mark.parametrize("shape, rank, padding, row_padding",
                         [((1, 2, 3), 4, 0, 0), ((2, 33, 47), 13, 1, 0), ((3, 20, 70), 13, 2, 2),
                          ((1, 40, 6890), 9, 6, 6)])
@pytest.mark.parametrize("gradient_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_fused_similarity_gradient_matches_the_compiled_pass_reference(shape, rank, padding, row_padding,
                                                                       gradient_dtype):
    """fused_similarity_gradient against stored.py's `_bounded_similarity_gradient` (eager float32, the pass it
    replaces), rounded alike: tiles cut at the edges, padding lanes zero, C read through padded rows."""
    _assert_gradient_matches_reference(shape, rank, padding, row_padding, gradient_dtype, fused.GRADIENT_TILE)


@requires_kernels
@pytest.mark.parametrize("tile", [(32, 256, 4), (64, 128, 8), (16, 64, 1)])
def test_fused_similarity_gradient_with_other_tiles(tile):
    _assert_gradient_matches_reference((2, 70, 1000), 13, 6, 6, torch.float16, tile)


@requires_kernels
@pytest.mark.parametrize("shape, padding", [((2, 33, 47), 1), ((1, 40, 6890), 6)])
def test_fused_similarity_gradient_reads_a_fixed_point_similarity(shape, padding):
    _assert_gradient_matches_reference(shape, 9, padding, 0, torch.float16, fused.GRADIENT_TILE, fixed_point=True)


def _assert_gradient_matches_reference(shape, rank: int, padding: int, row_padding: int, gradient_dtype: torch.dtype,
                                       tile: tuple[int, int, int], fixed_point: bool = False) -> None:
    from models.networks.ot import stored

    similarity = _cosine_similarity(*shape, torch.Generator().manual_seed(60)).float()
    if fixed_point:
        similarity = fixed_point_similarity(similarity)
    row_factors, column_factors = _gradient_factors(*shape, rank, seed=61)
    expected = stored._bounded_similarity_gradient(similarity, row_factors, column_factors, EPSILON,
                                                   kernel_offset(SIMILARITY_BOUND, EPSILON), gradient_dtype, padding)
    actual = fused.fused_similarity_gradient(*_to_kernel_device((_padded_rows(similarity, row_padding), row_factors,
                                                                  column_factors)), EPSILON, SIMILARITY_BOUND,
                                             gradient_dtype, padding, tile=tile)
    assert actual.dtype == gradient_dtype and actual.shape == expected.shape
    assert not actual[..., shape[2]:].any()
    # Both round a float32 value that differs by float32 rounding (the order of the R products' sum).
    rtol = {torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7, torch.float32: 1e-5}[gradient_dtype]
    torch.testing.assert_close(actual.cpu().double(), expected.double(), rtol=rtol,
                               atol=1e-5 * expected.double().abs().max().item())


def test_fused_similarity_gradient_rejects_bad_arguments():
    similarity = torch.zeros(2, 5, 6, device=KERNEL_DEVICE)
    row_factors, column_factors = _to_kernel_device(_gradient_factors(2, 5, 6, 3, seed=62))
    with pytest.raises(ValueError, match="must match similarity"):
        fused.fused_similarity_gradient(similarity, row_factors[:, :4], column_factors, EPSILON, SIMILARITY_BOUND,
                                        torch.float16, 0)
    for tile in ((32, 100, 4), (8, 256, 4)):  # not a power of two; fewer rows than a tensor-core product takes
        with pytest.raises(ValueError, match="tile must be three powers of two"):
            fused.fused_similarity_gradient(similarity, row_factors, column_factors, EPSILON, SIMILARITY_BOUND,
                                            torch.float16, 0, tile=tile)
    with pytest.raises(ValueError, match="pose-major"):
        fused.fused_similarity_gradient(similarity, row_factors, column_factors.contiguous(), EPSILON,
                                        SIMILARITY_BOUND, torch.float16, 0)
    with pytest.raises(ValueError, match="padding must be >= 0"):
        fused.fused_similarity_gradient(similarity, row_factors, column_factors, EPSILON, SIMILARITY_BOUND,
                                        torch.float16, -1)


def _plan_inputs(shape, seed: int, row_padding: int = 0, fixed_point: bool = False) -> tuple:
    """float32 C (as a view of padded rows, or in fixed point), log b, its bounded shift and pose-major points of a
    final softmax, with C's float64 values (the fixed-point ones, as loaded, for fixed_point) for the reference."""
    from models.networks.ot import stored

    similarity, _, log_b = _sinkhorn_state(*shape, seed=seed)
    similarity = similarity.float()
    if fixed_point:
        similarity = fixed_point_similarity(similarity)
    log_b = log_b.float()
    points = stored._pose_major(torch.randn(shape[0], shape[2], 3, generator=torch.Generator().manual_seed(seed + 1)))
    return _padded_rows(similarity, row_padding), log_b, log_b.amax(1), points


def _assert_plan_pass_matches_the_float64_pass(name: str, shape, seed: int, **options) -> None:
    """fused_plan_warp ("warp") or fused_plan_column_sums ("column sums") against stored.py's pass it replaces
    (`_plan_warp`, `_plan_column_sums`) in float64. options: `_plan_inputs`' and the launch layout's."""
    from models.networks.ot import stored

    layout = {key: options.pop(key) for key in ("programs_per_batch", "num_warps") if key in options}
    similarity, log_b, shift, points = _plan_inputs(shape, seed, **options)
    reference_similarity = similarity if similarity.dtype == torch.int16 else similarity.double()
    if name == "warp":
        expected, _, expected_total = stored._plan_warp(reference_similarity, log_b.double(), points.double(),
                                                        EPSILON, shift.double())
        actual, total = fused.fused_plan_warp(*_to_kernel_device((similarity, log_b, shift, points)), EPSILON,
                                              **layout)
        _assert_close("total", total, expected_total, SUM_TOLERANCE, 0)
    else:
        row_weights = torch.randn(shape[0], shape[1], 4, generator=torch.Generator().manual_seed(seed + 2))
        expected = stored._plan_column_sums(reference_similarity, log_b.double(),
                                            shift.double().unsqueeze(1).expand(shape[0], shape[1]),
                                            row_weights.double(), EPSILON)
        actual = fused.fused_plan_column_sums(*_to_kernel_device((similarity, log_b, shift, row_weights)), EPSILON,
                                              **layout)
    # Terms of either sign: the error is measured against the largest entry.
    _assert_close(name, actual, expected, 0, SUM_TOLERANCE * expected.abs().max().item())


@requires_kernels
@pytest.mark.parametrize("name", ["warp", "column sums"])
@pytest.mark.parametrize("shape, programs_per_batch", list(itertools.product(SHAPES, PROGRAMS_PER_BATCH)))
def test_fused_plan_passes_match_the_float64_passes(name, shape, programs_per_batch):
    _assert_plan_pass_matches_the_float64_pass(name, shape, 60 + shape[1], programs_per_batch=programs_per_batch)


@requires_kernels
@pytest.mark.parametrize("name", ["warp", "column sums"])
@pytest.mark.parametrize("shape, options", [((2, 9, 13), {"row_padding": 3, "programs_per_batch": 4}),
                                            ((1, 12, 6890), {"row_padding": 6}),
                                            ((3, 20, 70), {"fixed_point": True}),
                                            ((1, 12, 6890), {"fixed_point": True, "num_warps": 4})])
def test_fused_plan_passes_read_padded_and_fixed_point_rows(name, shape, options):
    """The same through a view of padded rows (whose NaN lanes must not reach the sums), a fixed-point C, a
    program without rows and a warp count other than either kernel's default."""
    _assert_plan_pass_matches_the_float64_pass(name, shape, 64, **options)


def test_fused_plan_passes_reject_bad_arguments():
    similarity = torch.zeros(2, 5, 6, device=KERNEL_DEVICE)
    log_b, shift = torch.zeros(2, 6, device=KERNEL_DEVICE), torch.zeros(2, device=KERNEL_DEVICE)
    with pytest.raises(ValueError, match="stored pose-major"):
        fused.fused_plan_warp(similarity, log_b, shift, torch.zeros(2, 6, 3, device=KERNEL_DEVICE), EPSILON)
    points = torch.zeros(2, 3, 6, device=KERNEL_DEVICE).transpose(1, 2)
    with pytest.raises(ValueError, match="shift must be a float32 tensor of shape"):
        fused.fused_plan_warp(similarity, log_b, shift[:1], points, EPSILON)
    with pytest.raises(ValueError, match="row_weights must be float32"):
        fused.fused_plan_column_sums(similarity, log_b, shift, torch.zeros(2, 5, 3, device=KERNEL_DEVICE), EPSILON)
    with pytest.raises(ValueError, match="log_b must be a float32 tensor of shape"):
        fused.fused_plan_column_sums(similarity, log_b[:, :5], shift, torch.zeros(2, 5, 4, device=KERNEL_DEVICE),
                                     EPSILON)


def _fused_and_separate_passes(monkeypatch, warp_function, inputs: list[torch.Tensor], upstream: torch.Tensor) -> list:
    """[warp, gradients of every input] of warp_function(*inputs) with the stored warp's row and column passes
    fused (as on a GPU), then with them separate. The passes around the fused ones run eagerly here
    (compiled=False, so no torch.compile on the CPU): `_fused_passes` is told to ignore `compiled`."""
    from models.networks.ot import stored

    chosen = []

    def fused_unless_told_otherwise(use_fused):
        def choose(similarity, compiled, bounded, blocks):
            chosen.append(use_fused)
            return use_fused and bounded and len(blocks) == 1 and fused.fused_pass_supported(similarity)
        return choose

    results = []
    for use_fused in (True, False):
        monkeypatch.setattr(stored, "_fused_passes", fused_unless_told_otherwise(use_fused))
        leaves = [tensor.clone().requires_grad_() for tensor in inputs]
        warp = warp_function(*leaves)
        warp.backward(upstream)
        results.append([warp, *(tensor.grad for tensor in leaves)])
    assert chosen == [True, True, False, False], "forward and backward each ask once"
    return results


@requires_kernels
@pytest.mark.parametrize("iterations, epsilon, similarity_bound", [(1, EPSILON, 1.0), (2, EPSILON, 1.0),
                                                                   (5, EPSILON, 1.0), (5, 0.01, 0.4)])
# The interpreter's sigmoid of very negative log-sum-exps at epsilon 0.01 (1 / (1 + exp(-x)), 0 as it should be).
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
def test_stored_warp_with_fused_passes_matches_the_separate_passes(iterations, epsilon, similarity_bound,
                                                                   monkeypatch):
    """sinkhorn_warp_stored with its row and column passes fused gives the warp and gradients of the separate
    passes, at the model's epsilon and bound and at a small epsilon with the widest bound it allows (0.4), with a
    row of C at -0.4."""
    from models.networks.ot import stored

    generator = torch.Generator().manual_seed(40)
    similarity = similarity_bound * _cosine_similarity(2, 30, 26, generator).float()
    similarity[0, 0] = -similarity_bound
    points = torch.randn(2, 26, 3, generator=generator).to(KERNEL_DEVICE)
    upstream = torch.randn(2, 30, 3, generator=generator).to(KERNEL_DEVICE)
    results = _fused_and_separate_passes(
        monkeypatch, lambda *inputs: stored.sinkhorn_warp_stored(*inputs, epsilon, iterations,
                                                                 similarity_bound=similarity_bound),
        [similarity.to(KERNEL_DEVICE), points], upstream)
    for name, actual, expected in zip(("warp", "dL/dC", "dL/dpose_points"), *results):
        error = ((actual - expected).norm() / expected.norm()).item()
        assert error < 1e-5, f"{name} differs by {error:.3g} relative"


@requires_kernels
def test_fixed_point_similarity_warp_with_fused_passes_matches_the_separate_passes(monkeypatch):
    """The same for similarity_warp_stored with C in 16-bit fixed point, as the mixed-precision stored warp runs:
    every pass reads the int16 C, fused or not. Its features' gradients come through float16 products of dL/dC."""
    from models.networks.ot import stored

    generator = torch.Generator().manual_seed(41)
    theta, phi = (torch.nn.functional.normalize(torch.randn(2, 8, count, generator=generator), dim=1).to(KERNEL_DEVICE)
                  for count in (30, 26))
    points = torch.randn(2, 26, 3, generator=generator).to(KERNEL_DEVICE)
    upstream = torch.randn(2, 30, 3, generator=generator).to(KERNEL_DEVICE)
    results = _fused_and_separate_passes(
        monkeypatch, lambda *inputs: stored.similarity_warp_stored(*inputs, torch.float16, similarity_bound=1.0,
                                                                   fixed_point=True),
        [theta, phi, points], upstream)
    for name, actual, expected, tolerance in zip(("warp", "dL/dtheta", "dL/dphi", "dL/dpose_points"), *results,
                                                 (1e-5, 1e-3, 1e-3, 1e-5)):
        error = ((actual - expected).norm() / expected.norm()).item()
        assert error < tolerance, f"{name} differs by {error:.3g} relative"


@requires_kernels
@pytest.mark.parametrize("fused_passes, chunk_size", [(True, None), (False, None), (False, 7)])
def test_fixed_point_similarity_warp_from_the_fused_product_matches_the_split_product(monkeypatch, fused_passes,
                                                                                      chunk_size):
    """similarity_warp_stored with a fixed-point C where split products run (made to here, on the CPU): C and its
    first column pass from fused_fixed_point_product give the warp and gradients of C formed by split_product and
    rounded after it, the fused passes reading either, or the separate passes (which run where the passes are not
    compiled or C is read in row blocks), over all rows or blocks of 7."""
    from models.networks.ot import stored

    monkeypatch.setattr(stored, "split_products_run_on", lambda tensor: True)
    if fused_passes:
        monkeypatch.setattr(stored, "_fused_passes", lambda similarity, compiled, bounded, blocks: (
            bounded and len(blocks) == 1 and fused.fused_pass_supported(similarity)))
    products = []
    monkeypatch.setattr(stored, "fused_fixed_point_product",
                        lambda *args: products.append(args[2]) or fused.fused_fixed_point_product(*args))
    generator = torch.Generator().manual_seed(43)
    theta, phi = (torch.nn.functional.normalize(torch.randn(2, 8, count, generator=generator), dim=1).to(KERNEL_DEVICE)
                  for count in (30, 26))
    points = torch.randn(2, 26, 3, generator=generator).to(KERNEL_DEVICE)
    upstream = torch.randn(2, 30, 3, generator=generator).to(KERNEL_DEVICE)
    results = []
    for use_product in (True, False):
        if not use_product:
            monkeypatch.setattr(stored, "_fixed_point_product_runs", lambda theta_rows, pose_phi: False)
        leaves = [tensor.clone().requires_grad_() for tensor in (theta, phi, points)]
        warp = stored.similarity_warp_stored(*leaves, torch.float16, chunk_size=chunk_size, similarity_bound=1.0,
                                             fixed_point=True)
        warp.backward(upstream)
        results.append([warp, *(tensor.grad for tensor in leaves)])
    assert products == [26], "the product ran once, in the first forward"
    for name, actual, expected, tolerance in zip(("warp", "dL/dtheta", "dL/dphi", "dL/dpose_points"), *results,
                                                 (1e-5, 1e-3, 1e-3, 1e-5)):
        error = ((actual - expected).norm() / expected.norm()).item()
        assert error < tolerance, f"{name} differs by {error:.3g} relative"


@requires_kernels
def test_fused_passes_keep_rows_and_columns_far_below_the_shift():
    """An identity row and a pose column whose every cosine is -1: their terms lie 2 / epsilon (about 67) below the
    shifts, where exp is about 1e-29, still a normal float32; the kernels must keep them as the references do."""
    similarity, log_a, log_b = _sinkhorn_state(2, 11, 13, seed=50)
    similarity[0, 0] = -1.0  # (N, M) row 0 of batch 0
    similarity[1, :, 0] = -1.0  # column 0 of batch 1
    log_b = log_b.float()
    _assert_passes_match_naive_at_the_ends((similarity.float(), log_b, log_b.amax(1)), EPSILON, SIMILARITY_BOUND,
                                           seed=51)


def _assert_passes_match_naive_at_the_ends(inputs: tuple, epsilon: float, bound: float, seed: int) -> None:
    """Both passes on inputs (C, log b, row shift) whose C holds a row and a column at -bound: every sum finite
    and positive, and values and gradients as the float64 references give them."""
    expected = fused.fused_row_column_forward_naive(*inputs, epsilon, bound)
    actual = fused.fused_row_column_forward(*_to_kernel_device(inputs), epsilon, bound)
    for name, value, reference in zip(("row_sum", "log_a", "column_shift", "column_sum"), actual, expected):
        assert torch.isfinite(value).all() and (name in ("log_a", "column_shift") or (value.cpu() > 0).all()), name
        _assert_close(name, value, reference, *((SUM_TOLERANCE, 0) if "sum" in name else (0, LOG_TOLERANCE)))
    backward_inputs = (inputs[0], expected[1].float(), expected[2].float(),
                       torch.randn(*inputs[1].shape, generator=torch.Generator().manual_seed(seed)), inputs[2],
                       expected[0].float(), inputs[1], epsilon)
    expected_gradients = fused.fused_row_column_backward_naive(*backward_inputs)
    actual_gradients = fused.fused_row_column_backward(*_to_kernel_device(backward_inputs), bound)
    for name, value, reference in zip(("grad_log_a", "row_coefficient", "grad_log_b"), actual_gradients,
                                      expected_gradients):
        _assert_gradient_close(name, value, reference)


@requires_kernels
@pytest.mark.parametrize("fixed_point", [False, True])
# The interpreter's sigmoid of the backward's very negative log-sum-exps (1 / (1 + exp(-x)), 0 as it should be).
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
def test_fused_passes_keep_terms_of_a_narrow_bound_at_a_small_epsilon(fixed_point):
    """At epsilon 0.01 with |C| <= 0.4 (the widest bound allowed there), s = (C - 1) / epsilon reaches -140 and
    exp(s) is 0 in float32, but every term relative to its bounded shift lies within exp(-80) of its largest. A row
    and a column whose every C is -0.4 sit at that end: the passes must keep them as the float64 references do."""
    epsilon, bound = 0.01, 0.4
    similarity = bound * _cosine_similarity(2, 11, 13, torch.Generator().manual_seed(52))
    similarity[0, 0] = -bound  # (N, M) row 0 of batch 0
    similarity[1, :, 0] = -bound  # column 0 of batch 1
    noise = torch.randn(2, 13, generator=torch.Generator().manual_seed(53), dtype=torch.float64)
    log_b = (noise - math.log(13)).float()
    inputs = (similarity.float(), log_b, log_b.amax(1) + (bound - 1.0) / epsilon)
    if fixed_point:  # a fixed-point C holds q / LEVELS; scaled by the bound it stays within it
        inputs = _fixed_point(inputs)
    _assert_passes_match_naive_at_the_ends(inputs, epsilon, bound, seed=54)


def test_fused_passes_refuse_a_bound_too_wide_for_epsilon():
    similarity, log_b, row_shift = _forward_inputs(2, 5, 6, seed=23)
    with pytest.raises(ValueError, match=r"similarity_bound must lie in \(0, 1.2\] at epsilon 0.03"):
        fused.fused_row_column_forward(similarity, log_b, row_shift, EPSILON, 1.3)
    with pytest.raises(ValueError, match="similarity_bound must lie in"):
        fused.fused_row_column_backward(*_backward_inputs(2, 5, 6, seed=24), 0.0)


def test_shared_memory_shortfall_counts_the_pipelined_rows():
    # The pipelined rows of next_power_of_2(M) float32 lanes: 3 x 8192 x 4 bytes = 96 KiB at M = 6890, and
    # 2 x 16384 x 4 = 128 KiB above 8192 lanes.
    assert fused.shared_memory_shortfall(6890, 96 * 1024, "H100") is None
    assert fused.shared_memory_shortfall(8192, None, "unknown GPU") is None
    assert fused.shared_memory_shortfall(6890, 64 * 1024, "small GPU") == (
        "the fused Sinkhorn passes need 96 KiB of shared memory per block for rows of 6890 pose vertices, and the "
        "small GPU has 64 KiB")
    message = fused.shared_memory_shortfall(8193, 99 * 1024, "small GPU")
    assert message == ("the fused Sinkhorn passes need 128 KiB of shared memory per block for rows of 8193 pose "
                       "vertices, and the small GPU has 99 KiB")


# Compiles every kernel for Hopper (sm_90a) with Triton's own ptxas, no GPU needed (util/triton_offline.py), and
# prints, per kernel and dtype of C, the count of each global-memory instruction in its PTX.
_HOPPER_PTX_SCRIPT = """
import collections, json, re
from models.networks.ot import fused
from util.triton_offline import hopper_ptx

def global_memory_instructions(kernel, similarity_type, constexprs, num_warps):
    ptx = hopper_ptx(kernel, similarity_type, constexprs, num_warps)
    counts = collections.Counter(re.findall(r"\\b((?:ld|st)\\.global[.a-z0-9]*)\\s", ptx))
    counts.update(f"cp.async.{size}" for size in re.findall(
        r"cp\\.async\\.c[ag]\\.shared\\.global\\S*\\s+\\[[^\\]]+\\],\\s*\\[[^\\]]+\\],\\s*(\\w+)", ptx))
    return counts

rows = {"BLOCK_M": 8192, "NUM_STAGES": 3}
results = {}
for similarity_type in ("*fp32", "*i16"):
    results["forward " + similarity_type] = global_memory_instructions(
        fused._row_column_forward_kernel, similarity_type, rows, 8192 // (32 * fused.LANES_PER_THREAD))
    results["backward " + similarity_type] = global_memory_instructions(
        fused._row_column_backward_kernel, similarity_type, rows, 8192 // (32 * fused.LANES_PER_THREAD))
    results["plan warp " + similarity_type] = global_memory_instructions(
        fused._plan_warp_kernel, similarity_type, rows, 8192 // (32 * fused.LANES_PER_THREAD))
    results["plan column sums " + similarity_type] = global_memory_instructions(
        fused._plan_column_sums_kernel, similarity_type, rows, 8192 // (32 * fused.PLAN_COLUMN_SUMS_LANES_PER_THREAD))
    results["gradient " + similarity_type] = global_memory_instructions(
        fused._similarity_gradient_kernel, similarity_type,
        {"RANK": 13, "RANK_PADDED": 16, "BLOCK_N": fused.GRADIENT_TILE[0], "BLOCK_M": fused.GRADIENT_TILE[1]},
        fused.GRADIENT_TILE[2])
results["fixed point column"] = global_memory_instructions(fused._fixed_point_column_kernel, "*fp32", rows, 16)
block_n, block_m, block_k, num_warps = fused.PRODUCT_TILE
product_ptx = hopper_ptx(fused._fixed_point_product_kernel, "*fp32",
                         {"BLOCK_N": block_n, "BLOCK_M": block_m, "BLOCK_K": block_k}, num_warps)
results["product"] = collections.Counter(re.findall(r"\\b(st\\.global[.a-z0-9]*|wgmma\\.mma_async)", product_ptx))
print(json.dumps(results))
"""


@pytest.mark.skipif(fused.triton is None, reason="needs triton")
def test_kernels_compile_for_hopper_reading_fixed_point_rows_in_half_the_16_byte_loads():
    """Each kernel compiles for an H100 (sm_90) with a float32 and with an int16 C, and C's rows arrive in 16-byte
    copies: pipelined through shared memory (cp.async) in the row passes, vector loads in the dL/dC tiles, half as
    many for int16 as for float32, and no 2-byte loads; the fixed-point column pass stores its int16 rows 16 bytes
    at a time. Runs in a subprocess: here Triton's interpreter replaces its compiler."""
    environment = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _HOPPER_PTX_SCRIPT], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[3], env=environment, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    counts = json.loads(result.stdout.strip().splitlines()[-1])
    for kernel, lanes in (("forward", fused.LANES_PER_THREAD), ("backward", fused.LANES_PER_THREAD),
                          ("plan warp", fused.LANES_PER_THREAD),
                          ("plan column sums", fused.PLAN_COLUMN_SUMS_LANES_PER_THREAD)):
        float_copies, fixed_copies = (counts[f"{kernel} {dtype}"].get("cp.async.0x10", 0)
                                      for dtype in ("*fp32", "*i16"))
        # A thread's lanes of a row in 16-byte copies (4 float32 or 8 int16 lanes each), 3 rows in flight.
        assert float_copies == lanes // 4 * 3 and fixed_copies == lanes // 8 * 3, (kernel, counts)
    float_loads, fixed_loads = (counts[f"gradient {dtype}"].get("ld.global.v4.b32", 0) for dtype in ("*fp32", "*i16"))
    assert fixed_loads * 2 == float_loads > 0, counts
    assert not any(op.startswith(("ld.global.b16", "ld.global.u16", "ld.global.s16")) for kernel_counts in
                   counts.values() for op in kernel_counts), counts
    assert counts["fixed point column"].get("st.global.v4.b32", 0) > 0, counts
    # The fixed-point product on Hopper's warpgroup tensor cores, its int16 tile stored 16 bytes at a time.
    assert counts["product"].get("wgmma.mma_async", 0) > 0 and set(counts["product"]) <= {
        "wgmma.mma_async", "st.global.v4.b32", "st.global.b32"}, counts


_CONVERSION_UNIT_SCRIPT = """
import json
from models.networks.ot import fused
from util.triton_offline import hopper_ptx, loop_opcodes, opcodes

counts = {}
for name, kernel in (("forward", fused._row_column_forward_kernel), ("backward", fused._row_column_backward_kernel)):
    counts[name] = loop_opcodes(hopper_ptx(kernel, "*i16", {"BLOCK_M": 8192, "NUM_STAGES": 3},
                                           8192 // (32 * fused.LANES_PER_THREAD)))
block_n, block_m, block_k, num_warps = fused.PRODUCT_TILE
counts["product"] = opcodes(hopper_ptx(fused._fixed_point_product_kernel, "*fp32",
                                       {"BLOCK_N": block_n, "BLOCK_M": block_m, "BLOCK_K": block_k}, num_warps))
counts["fixed point column"] = opcodes(hopper_ptx(fused._fixed_point_column_kernel, "*fp32",
                                                  {"BLOCK_M": 8192, "NUM_STAGES": 3}, 16))
print(json.dumps({name: {op: count.get(op, 0) for op in ("MUFU", "FRND", "F2I", "I2F")}
                  for name, count in counts.items()}))
"""


@pytest.mark.skipif(fused.triton is None, reason="needs triton")
def test_kernels_take_the_conversion_unit_once_an_element():
    """Compiled for an H100: the row-column passes' loops issue one MUFU (the exp2 an element) per lane of a thread
    and a few a row (the log a update's log and exp, the rescale's exp2), where two exponentials an element took
    twice the lanes; the fixed-point product and column pass round C to fixed point with no FRND (floor, ceil) or
    F2I, their one MUFU an element being the first column pass's exp2. MUFU, FRND and the conversions share a unit
    at an eighth of the FMA pipes' rate, which bounded the passes (docs/benchmarks.md, twenty-first session)."""
    environment = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _CONVERSION_UNIT_SCRIPT], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[3], env=environment, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    counts = json.loads(result.stdout.strip().splitlines()[-1])
    for kernel in ("forward", "backward"):
        assert fused.LANES_PER_THREAD <= counts[kernel]["MUFU"] <= fused.LANES_PER_THREAD + 4, counts
    block_n, block_m, _, num_warps = fused.PRODUCT_TILE
    for kernel, elements in (("product", block_n * block_m // (32 * num_warps)), ("fixed point column", 8192 // 512)):
        assert counts[kernel] == {"MUFU": elements, "FRND": 0, "F2I": 0, "I2F": 0}, counts
