"""The Sinkhorn warp on a materialised similarity C that keeps nothing N x M but C for backward: each pass is a
small function of C and vectors that torch.compile fuses into one kernel reading C once. On a GPU with triton,
each row pass and the column pass after it read C once together instead, and dL/dC is one Triton kernel
(fused.py)."""
from __future__ import annotations

import functools
import itertools
import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from models.networks.layers import (half_copies, half_product_gradients, product, split_operands, split_product,
                                    split_products_run_on)
from models.networks.ot.common import (LOG_DIVISION_EPS, SINKHORN_EPSILON, SINKHORN_ITERATIONS, bounded_shift,
                                       fixed_point_similarity, kernel_offset, log_kernel_of, log_marginal_update,
                                       row_blocks, validate_chunk_size, validate_feature_inputs,
                                       validate_similarity_bound, validate_similarity_inputs, working_dtype)
from models.networks.ot.fused import (fused_fixed_point_column_pass, fused_fixed_point_product, fused_pass_supported,
                                      fused_plan_column_sums, fused_plan_warp, fused_row_column_backward,
                                      fused_row_column_forward, fused_similarity_gradient)


def _weighted_sums(weights: torch.Tensor, vectors: torch.Tensor, dim: int) -> torch.Tensor:
    """Sums over identity (dim 1) or pose (dim 2) vertices of weights times each column of vectors.

    Eager mode uses a matmul. Under torch.compile one reduction per column is written instead: Inductor
    fuses those reductions with the pointwise code that forms `weights` into one read of C, whereas a
    matmul would first write `weights` out as an N x M tensor.

    Args:
        weights: (B, N, M).
        vectors: (B, N, K) for dim 1, (B, M, K) for dim 2.
    Returns:
        (B, M, K) for dim 1, (B, N, K) for dim 2.
    """
    if torch.compiler.is_compiling():
        return torch.stack([(weights * vectors[..., k].unsqueeze(3 - dim)).sum(dim) for k in range(vectors.shape[2])],
                           dim=2)
    return (weights.transpose(1, 2) if dim == 1 else weights) @ vectors  # (B, M or N, K)


def _pose_major(vectors: torch.Tensor) -> torch.Tensor:
    """(B, M, K) vectors stored as (B, K, M): under torch.compile a pass reads each vectors[..., k] at
    consecutive pose vertices, so the loads of neighbouring threads coalesce (with a stride of K floats
    they would not)."""
    return vectors.transpose(1, 2).contiguous().transpose(1, 2)


def _outer_sum(row_vectors: torch.Tensor, column_vectors: torch.Tensor) -> torch.Tensor:
    """row_vectors @ column_vectors^T for a small K, as a broadcast sum under torch.compile (see above).

    Args:
        row_vectors: (B, N, K); column_vectors: (B, M, K).
    Returns:
        (B, N, M).
    """
    if torch.compiler.is_compiling():
        return sum(row_vectors[..., k].unsqueeze(2) * column_vectors[..., k].unsqueeze(1)
                   for k in range(row_vectors.shape[2]))
    return row_vectors @ column_vectors.transpose(1, 2)  # (B, N, M)


def _softmax_parts(logits: torch.Tensor, dim: int,
                   shift: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The shift (by default the maximum over `dim`), the weights exp(logits - shift) and their sum over `dim`.

    The pair (shift, sum) is what the stored form keeps of a log-sum-exp: backward recomputes
    exp(logits - shift) / sum exactly as the forward formed it, so the recomputed softmax weights still
    sum to 1 to rounding. Recomputing them as exp(logits - logsumexp) instead would carry the rounding of
    logsumexp, which the float32 ulp at |logsumexp| ~ 20 makes about 1e-6 relative, into every weight.
    A given `shift` (B,), a bound from `bounded_shift`, spares the pass over C that finds the maximum.
    """
    if shift is None:
        maximum = logits.amax(dim, keepdim=True)
    else:  # the same shape as the maximum, so that the pair saved for backward is shaped alike either way
        shape = list(logits.shape)
        shape[dim] = 1
        maximum = shift.view(-1, 1, 1).expand(shape)
    weights = torch.exp(logits - maximum)
    return maximum.squeeze(dim), weights, weights.sum(dim)


def _column_logits(similarity: torch.Tensor, log_a: torch.Tensor, epsilon: float) -> torch.Tensor:
    """log K[n, m] + log a[n], whose log-sum-exp over identity rows is u = log (K^T a): (B, k, M), (B, k)."""
    return log_kernel_of(similarity, epsilon, log_a.dtype) + log_a.unsqueeze(2)  # (B, k, M)


def _row_logits(similarity: torch.Tensor, log_b: torch.Tensor, epsilon: float) -> torch.Tensor:
    """log K[n, m] + log b[m], whose log-sum-exp over pose columns is v = log (K b): (B, k, M), (B, M)."""
    return log_kernel_of(similarity, epsilon, log_b.dtype) + log_b.unsqueeze(1)  # (B, k, M)


def _column_weights(similarity: torch.Tensor, log_a: torch.Tensor, column_max: torch.Tensor,
                    epsilon: float) -> torch.Tensor:
    """exp(column logits - maximum) as `_softmax_parts` formed them: (B, k, M), (B, k), (B, M) -> (B, k, M)."""
    return torch.exp(_column_logits(similarity, log_a, epsilon) - column_max.unsqueeze(1))


def _row_weights(similarity: torch.Tensor, log_b: torch.Tensor, row_max: torch.Tensor,
                 epsilon: float) -> torch.Tensor:
    """exp(row logits - maximum) as `_softmax_parts` formed them: (B, k, M), (B, M), (B, k) -> (B, k, M)."""
    return torch.exp(_row_logits(similarity, log_b, epsilon) - row_max.unsqueeze(2))


def _column_normaliser(similarity: torch.Tensor, log_a: torch.Tensor, epsilon: float,
                       shift: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(shift, sum) of the column logits over identity rows, two (B, M) tensors; u = shift + log sum."""
    maximum, _, total = _softmax_parts(_column_logits(similarity, log_a, epsilon), dim=1, shift=shift)
    return maximum, total


def _row_normaliser(similarity: torch.Tensor, log_b: torch.Tensor, epsilon: float,
                    shift: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(shift, sum) of the row logits over pose columns, two (B, k) tensors; v = shift + log sum."""
    maximum, _, total = _softmax_parts(_row_logits(similarity, log_b, epsilon), dim=2, shift=shift)
    return maximum, total


def _plan_warp(similarity: torch.Tensor, log_b: torch.Tensor, pose_points: torch.Tensor, epsilon: float,
               shift: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """softmax_m(log K + log b) @ pose_points, with the softmax's (shift, sum), for k identity rows.

    Args:
        similarity: (B, k, M); log_b: (B, M); pose_points: (B, M, 3); shift: (B,) or None (the row maxima).
    Returns:
        warp (B, k, 3), shift (B, k), sum (B, k).
    """
    maximum, weights, total = _softmax_parts(_row_logits(similarity, log_b, epsilon), dim=2, shift=shift)
    return _weighted_sums(weights, pose_points, dim=2) / total.unsqueeze(2), maximum, total  # (B, k, 3)


def _plan_column_sums(similarity: torch.Tensor, log_b: torch.Tensor, plan_max: torch.Tensor,
                      row_weights: torch.Tensor, epsilon: float) -> torch.Tensor:
    """sum_n exp(s + log b_T[m] - plan_max[n]) row_weights[n] over k identity rows: (B, M, K)."""
    return _weighted_sums(_row_weights(similarity, log_b, plan_max, epsilon), row_weights, dim=1)


def _log_a_gradient(similarity: torch.Tensor, log_a: torch.Tensor, column_max: torch.Tensor,
                    column_coefficient: torch.Tensor, epsilon: float) -> torch.Tensor:
    """sum_m exp(s + log a_{t-1}[n] - column_max[m]) column_coefficient[m] for k identity rows: (B, k)."""
    return _weighted_sums(_column_weights(similarity, log_a, column_max, epsilon), column_coefficient.unsqueeze(2),
                          dim=2).squeeze(2)


def _log_b_gradient(similarity: torch.Tensor, log_b: torch.Tensor, row_max: torch.Tensor,
                    row_coefficient: torch.Tensor, epsilon: float) -> torch.Tensor:
    """sum_n exp(s + log b_t[m] - row_max[n]) row_coefficient[n] over k identity rows: (B, M)."""
    return _weighted_sums(_row_weights(similarity, log_b, row_max, epsilon), row_coefficient.unsqueeze(2),
                          dim=1).squeeze(2)


def _similarity_gradient(similarity: torch.Tensor, log_b: torch.Tensor, plan_max: torch.Tensor,
                         row_weights: torch.Tensor, column_weights: torch.Tensor,
                         column_terms: list[tuple[torch.Tensor, ...]], row_terms: list[tuple[torch.Tensor, ...]],
                         epsilon: float, gradient_dtype: torch.dtype, padding: int) -> torch.Tensor:
    """dL/dC for k identity rows: one elementwise pass over C that sums every step's term.

    Args:
        similarity: (B, k, M); log_b: log b_T (B, M); plan_max: (B, k).
        row_weights: (B, k, 4); column_weights: (B, M, 4): the softmax term's factors.
        column_terms: (log a_{t-1} (B, k), column maximum (B, M), coefficient (B, M)) for each step.
        row_terms: (log b_t (B, M), row maximum (B, k), coefficient (B, k)) for each step but the last.
        gradient_dtype, padding: see `_gradient_layout`.
    Returns:
        dL/dC, (B, k, M + padding) in gradient_dtype.
    """
    grad = _row_weights(similarity, log_b, plan_max, epsilon) * _outer_sum(row_weights, column_weights)
    for log_a, column_max, coefficient in column_terms:
        grad = grad + _column_weights(similarity, log_a, column_max, epsilon) * coefficient.unsqueeze(1)
    for log_b_step, row_max, coefficient in row_terms:
        grad = grad + _row_weights(similarity, log_b_step, row_max, epsilon) * coefficient.unsqueeze(2)
    return _gradient_layout(grad / epsilon, gradient_dtype, padding)


def _bounded_similarity_gradient(similarity: torch.Tensor, row_factors: torch.Tensor, column_factors: torch.Tensor,
                                 epsilon: float, kappa: float, gradient_dtype: torch.dtype,
                                 padding: int) -> torch.Tensor:
    """dL/dC for k identity rows when every shift is a bound, one per batch element: exp(s + kappa) (U V^T) /
    epsilon, kappa = `kernel_offset` of the bound.

    Then each term's exp(s + v - shift) is exp(s + kappa) exp(v - shift - kappa) with the vector factors formed
    once (`_bounded_gradient_factors`), so the pass takes one exponential per element, not 2T.

    Args:
        similarity: (B, k, M); row_factors U: (B, k, R); column_factors V: (B, M, R).
        gradient_dtype, padding: see `_gradient_layout`.
    Returns:
        dL/dC, (B, k, M + padding) in gradient_dtype.
    """
    kernel = torch.exp(log_kernel_of(similarity, epsilon, row_factors.dtype) + kappa)
    return _gradient_layout(kernel * _outer_sum(row_factors, column_factors) / epsilon, gradient_dtype, padding)


def _gradient_layout(grad: torch.Tensor, gradient_dtype: torch.dtype, padding: int) -> torch.Tensor:
    """dL/dC (B, k, M) as the pass writes it: in gradient_dtype, with `padding` zero columns appended (the
    layout half-precision products read, `models.networks.layers.padded`). Compiled, the cast and the padding
    are part of the pass, so no float32 N x M gradient is written when C's own gradient products are half."""
    grad = grad.to(gradient_dtype)
    return F.pad(grad, (0, padding)) if padding else grad


def _bounded_gradient_factors(log_b: torch.Tensor, plan_max: torch.Tensor, row_weights: torch.Tensor,
                              column_weights: torch.Tensor, column_terms: list[tuple[torch.Tensor, ...]],
                              row_terms: list[tuple[torch.Tensor, ...]],
                              kappa: float) -> tuple[torch.Tensor, torch.Tensor]:
    """U (B, N, R) and V (B, M, R), R = 4 + 2T - 1, with dL/ds = exp(s + kappa) U V^T: `_similarity_gradient`'s
    terms factored, for shifts that are the same over a whole row or column (`bounded_shift`), kappa their bound's
    `kernel_offset`.

    Each factor exp(log a[n] - shift - kappa) or exp(log b[m] - shift - kappa) is exp(v - max v), in (0, 1]; the
    coefficients are those `_similarity_gradient` multiplies by.
    """
    row_factors = [row_weights]
    column_factors = [torch.exp(log_b - plan_max[:, :1] - kappa).unsqueeze(2) * column_weights]
    for log_a, column_max, coefficient in column_terms:
        row_factors.append(torch.exp(log_a - column_max[:, :1] - kappa).unsqueeze(2))
        column_factors.append(coefficient.unsqueeze(2))
    for log_b_step, row_max, coefficient in row_terms:
        row_factors.append(coefficient.unsqueeze(2))
        column_factors.append(torch.exp(log_b_step - row_max[:, :1] - kappa).unsqueeze(2))
    return torch.cat(row_factors, dim=2), _pose_major(torch.cat(column_factors, dim=2))


def _concatenate_rows(parts: list) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Per-block results of a row pass joined along the identity rows (tuples element by element)."""
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(parts, dim=1)
    return tuple(torch.cat(column, dim=1) for column in zip(*parts))


def _add_parts(parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(parts).sum(0)


def _merge_column_normalisers(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(maximum, sum) of a column log-sum-exp from those of blocks of identity rows."""
    maxima = torch.stack([maximum for maximum, _ in parts])  # (blocks, B, M)
    maximum = maxima.amax(0)
    return maximum, (torch.stack([total for _, total in parts]) * torch.exp(maxima - maximum)).sum(0)


def _over_row_blocks(blocks: list[slice], row_pass, combine):
    """row_pass(rows) for every block of identity rows, the results joined by `combine`.

    A single block (the default) is returned as it is.
    """
    parts = [row_pass(rows) for rows in blocks]
    return parts[0] if len(parts) == 1 else combine(parts)


@functools.cache
def _compiled_pass(read_pass):
    """`read_pass` as its own torch.compile graph, which Inductor turns into one kernel reading C once (or,
    for the vector arithmetic between passes, into one or two small kernels instead of several).

    Each pass is compiled alone, with its vectors as graph inputs (so they are materialised): traced
    together, AOTAutograd would merge the backward's recomputations with forward intermediates, keep an
    N x M one for backward, and inline small vector arithmetic into every N x M loop.
    """
    return torch.compile(read_pass, fullgraph=True)


def _run_pass(compiled: bool, read_pass, *args):
    return (_compiled_pass(read_pass) if compiled else read_pass)(*args)


def _fused_passes(similarity: torch.Tensor, compiled: bool, bounded: bool, blocks: list[slice]) -> bool:
    """Whether each row pass and the column pass after it read C once together, and the final softmax's warp, its
    backward's column sums and dL/dC are one kernel each (fused.py, Triton): on a GPU (`compiled`), with bounded
    shifts (known before a pass) and C in one block."""
    return compiled and bounded and len(blocks) == 1 and fused_pass_supported(similarity)


def _log_sum(maximum: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    return maximum + total.log()


def _marginal_step(maximum: torch.Tensor, total: torch.Tensor, similarity_bound: float | None,
                   epsilon: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The next Sinkhorn vector from a log-sum-exp's (shift, sum), and the shift of the pass that reads it.

    Args:
        maximum, total: (B, K), K = N for a row log-sum-exp v (giving log a), M for a column one u (log b).
    Returns:
        log(1 / K / (exp(lse) + 1e-8)) (B, K), and its `bounded_shift` (B,) (None without a bound).
    Compiled, the few small kernels between two passes become one or two.
    """
    log_vector = log_marginal_update(_log_sum(maximum, total), total.shape[1])
    return log_vector, bounded_shift(log_vector, similarity_bound, epsilon)


def _lse_coefficient(maximum: torch.Tensor, total: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """-sigmoid(lse - log 1e-8) * gradient / sum, (B, K) each: the gradient of a Sinkhorn update taken back
    through logaddexp(lse, log 1e-8) to the log-sum-exp lse = maximum + log sum, then divided by its sum,
    which turns the recomputed exp(. - maximum) weights into softmax weights (`_StoredSinkhornWarp`)."""
    return -torch.sigmoid(_log_sum(maximum, total) - LOG_DIVISION_EPS) * gradient / total


def _stored_forward(similarity: torch.Tensor, pose_points: torch.Tensor, epsilon: float, iterations: int,
                    blocks: list[slice], compiled: bool, similarity_bound: float | None, fixed_point: bool = False,
                    first_column_sum: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, list[list[torch.Tensor]], torch.Tensor]:
    """warp_out and the vectors backward needs, one read pass over C per Sinkhorn half-step.

    Each log-sum-exp is shifted by its maximum, or with `similarity_bound` by `bounded_shift`, which
    the pass then need not find: one reduction over C instead of two. With `fixed_point` (similarity_bound 1), C
    is first turned into 16-bit fixed point (`fixed_point_similarity`), which every pass then reads; with fused
    passes, in the same read as the first column pass (`fused_fixed_point_column_pass`). With `first_column_sum`,
    C came in fixed point with that first column pass's sums (`fused_fixed_point_product`).

    Returns warp (B, N, 3), the lists [log a_0..a_{T-1} (B, N); log b_0..b_T (B, M); (maximum, sum) of
    the column log-sum-exps u_1..u_T (B, M); those of the row log-sum-exps v_1..v_{T-1} (B, N); those of
    the final softmax (B, N)] and the C the passes read (for backward). v_T is not formed: it is the final
    softmax's normaliser, and log a_T cancels.
    """
    batch, num_identity, num_pose = similarity.shape
    run = functools.partial(_run_pass, compiled)
    log_a = [pose_points.new_full((batch, num_identity), -math.log(num_identity))]
    log_b = [pose_points.new_full((batch, num_pose), -math.log(num_pose))]
    column_max, column_sum, row_max, row_sum = [], [], [], []
    fused = _fused_passes(similarity, compiled, similarity_bound is not None, blocks)
    # One shift for every block (a bound over all rows), so the blocks' sums merge as they are.
    shift = bounded_shift(log_a[0], similarity_bound, epsilon)
    if first_column_sum is None and fixed_point and fused and iterations:
        similarity, first_column_sum = fused_fixed_point_column_pass(similarity, epsilon)
    elif first_column_sum is None and fixed_point:
        similarity = run(fixed_point_similarity, similarity)
    if first_column_sum is not None:  # the first column pass (step 0) came with the fixed-point C
        column_max.append(shift.unsqueeze(1).expand(batch, num_pose))
        column_sum.append(first_column_sum)
    for step in range(iterations):
        if step and fused:  # v_t's row pass and u_{t+1}'s column pass in one read of C
            total, next_log_a, column_shift, column_total = fused_row_column_forward(
                similarity, log_b[-1], shift, epsilon, similarity_bound)
            row_max.append(shift.unsqueeze(1).expand(batch, num_identity))
            row_sum.append(total)
            log_a.append(next_log_a)
            column_max.append(column_shift.unsqueeze(1).expand(batch, num_pose))
            column_sum.append(column_total)
        elif step or not column_sum:  # step 0's column pass is done if it came with the fixed-point C
            if step:
                maximum, total = _over_row_blocks(blocks, lambda rows: run(
                    _row_normaliser, similarity[:, rows], log_b[-1], epsilon, shift), _concatenate_rows)
                row_max.append(maximum)
                row_sum.append(total)
                next_log_a, shift = run(_marginal_step, maximum, total, similarity_bound, epsilon)
                log_a.append(next_log_a)
            maximum, total = _over_row_blocks(blocks, lambda rows: run(
                _column_normaliser, similarity[:, rows], log_a[-1][:, rows], epsilon, shift),
                _merge_column_normalisers)
            column_max.append(maximum)
            column_sum.append(total)
        next_log_b, shift = run(_marginal_step, column_max[-1], column_sum[-1], similarity_bound, epsilon)
        log_b.append(next_log_b)
    if not iterations:  # the final softmax reads log b_0
        shift = bounded_shift(log_b[0], similarity_bound, epsilon)
    pose_major_points = _pose_major(pose_points)
    if fused:
        warp, plan_sum = fused_plan_warp(similarity, log_b[-1], shift, pose_major_points, epsilon)
        plan_max = shift.unsqueeze(1).expand(batch, num_identity)
    else:
        warp, plan_max, plan_sum = _over_row_blocks(blocks, lambda rows: run(
            _plan_warp, similarity[:, rows], log_b[-1], pose_major_points, epsilon, shift), _concatenate_rows)
    vectors = [log_a[:iterations], log_b, column_max, column_sum, row_max, row_sum, [plan_max, plan_sum]]
    return warp, vectors, similarity


class _StoredSinkhornWarp(torch.autograd.Function):
    """warp_out from a materialised similarity C, saving only C and O(B * (N + M)) vectors per step.

    Notation: s = log K = (C - 1) / epsilon, L = log 1e-8, a_0 = 1 / N. For t = 1..T the forward forms
    u_t = logsumexp_n(s + log a_{t-1}), log b_t = -log M - logaddexp(u_t, L),
    v_t = logsumexp_m(s + log b_t), log a_t = -log N - logaddexp(v_t, L) (t < T),
    and out = P x with P = softmax_m(s + log b_T).
    Reverse mode, g = dL/dout:
    - softmax: dL/ds += P (g[n].x[m] - g[n].out[n]); dL/dx = P^T g; dL/dlog b_T is the column sum of that
      term (one pass reads C for both).
    - d logaddexp(z, L) / dz = sigmoid(z - L) and d logsumexp / d its argument = the softmax weights, so for
      t = T..1: du_t = -sigmoid(u_t - L) dlog b_t adds du_t[m] exp(s + log a_{t-1}[n] - u_t[m]) to dL/ds,
      whose row sums are dlog a_{t-1} (one pass, t > 1); dv_{t-1} = -sigmoid(v_{t-1} - L) dlog a_{t-1} adds
      dv_{t-1}[n] exp(s + log b_{t-1}[m] - v_{t-1}[n]), whose column sums are dlog b_{t-1} (one pass).
    Every exponent is a log-softmax weight, so each term is bounded by its vector coefficient; each weight
    is recomputed as exp(. - maximum) / sum from the saved pair (see `_softmax_parts`), the 1 / sum folded
    into the coefficient. The 2T - 1 reduction passes give all vectors; one elementwise pass then sums
    the 2T terms of dL/dC = dL/ds / epsilon. With a similarity bound every shift is one number per batch
    element, so the terms factor into exp(s) times a rank-(2T + 3) product of vectors, one exponential per
    element (`_bounded_similarity_gradient`).
    """

    @staticmethod
    def forward(ctx, similarity, pose_points, epsilon, iterations, chunk_size, compiled, similarity_bound):
        return _forward_saving(ctx, similarity, pose_points, epsilon, iterations, chunk_size, compiled,
                               similarity_bound, fixed_point=False)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_warp):
        grad_similarity, grad_points, _ = _saved_backward(ctx, grad_warp, None, 0, ctx.needs_input_grad[0])
        return grad_similarity, grad_points, None, None, None, None, None


def _similarity(theta_rows: torch.Tensor, pose_phi: torch.Tensor, compiled: bool) -> torch.Tensor:
    """C = theta^T phi in float32 accuracy: (B, N, C), (B, C, M) -> (B, N, M).

    On a GPU, `models.networks.layers.split_product`'s one fp16 product (its operands formed by a compiled pass
    when `compiled`), whose rows are padded to an aligned length (C is a view of them); on a CPU (or with a torch
    before 2.8), float32's.
    """
    if not split_products_run_on(theta_rows):
        return product(theta_rows, pose_phi)
    return split_product(theta_rows, pose_phi, form_operands=functools.partial(_run_pass, compiled, split_operands))


def _fixed_point_product_runs(theta_rows: torch.Tensor, pose_phi: torch.Tensor) -> bool:
    """Whether a fixed-point C and its first column pass come from `fused_fixed_point_product` (which never forms
    C in float32): where split products run and the fused kernels can read a fixed-point C of this shape."""
    probe = torch.empty_strided((theta_rows.shape[0], theta_rows.shape[1], pose_phi.shape[2]), (0, 0, 1),
                                dtype=torch.int16, device=theta_rows.device)  # (B, N, M), storage of M
    return split_products_run_on(theta_rows) and fused_pass_supported(probe)


def _non_finite_marker(theta_rows: torch.Tensor, pose_phi: torch.Tensor) -> torch.Tensor:
    """0, or NaN when either features hold a non-finite value: int16 has no NaN, so the fixed-point C of such
    features would be finite integers and the warp a finite answer to a failed computation. Added to that
    warp, it keeps the NaN a float32 C would have carried (a scalar, without a host synchronisation)."""
    finite = torch.isfinite(theta_rows).all() & torch.isfinite(pose_phi).all()
    return torch.where(finite, 0.0, float("nan"))


class _StoredSimilarityWarp(torch.autograd.Function):
    """`_StoredSinkhornWarp` of C = theta^T phi, formed here (`_similarity`), with C's backward products in half
    precision: the gradient pass writes dL/dC once, already half and padded for those products, where a
    separate product would take a float32 dL/dC (twice the bytes) and convert it in a pass of its own."""

    @staticmethod
    def forward(ctx, identity_theta, pose_phi, pose_points, half_dtype, epsilon, iterations, chunk_size, compiled,
                similarity_bound, fixed_point):
        theta_rows = identity_theta.transpose(1, 2)  # (B, N, C)
        first_column_sum = None
        with torch.autocast(identity_theta.device.type, enabled=False):
            if fixed_point and iterations and _fixed_point_product_runs(theta_rows, pose_phi):
                similarity, first_column_sum = fused_fixed_point_product(
                    *_run_pass(compiled, split_operands, theta_rows, pose_phi), pose_phi.shape[2], epsilon)
            else:
                similarity = _similarity(theta_rows, pose_phi, compiled)  # (B, N, M)
        # The half copies serve C's backward products alone: none without a gradient to the features (inference).
        kept = half_copies(theta_rows, pose_phi, half_dtype) if any(ctx.needs_input_grad[:2]) else ()
        # With fixed_point, the passes read C's int16 copy, which is what backward keeps.
        warp = _forward_saving(ctx, similarity, pose_points, epsilon, iterations, chunk_size, compiled,
                               similarity_bound, fixed_point, *kept,
                               first_column_sum=first_column_sum)  # kept: (B, N, C), (B, C, M')
        ctx.half_dtype, ctx.padding = half_dtype, kept[1].shape[2] - similarity.shape[2] if kept else 0
        ctx.feature_dtypes = identity_theta.dtype, pose_phi.dtype
        if fixed_point:
            warp = warp + _run_pass(compiled, _non_finite_marker, theta_rows, pose_phi)
        return warp

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_warp):
        needs_features = ctx.needs_input_grad[:2]
        grad_similarity, grad_points, kept = _saved_backward(
            ctx, grad_warp, ctx.half_dtype, ctx.padding, any(needs_features))  # dL/dC: (B, N, M') half
        grad_theta_rows, grad_phi = (None, None) if grad_similarity is None else half_product_gradients(
            *kept, grad_similarity, grad_points.shape[1], needs_features, ctx.feature_dtypes)
        grad_theta = None if grad_theta_rows is None else grad_theta_rows.transpose(1, 2)  # (B, C, N)
        return grad_theta, grad_phi, grad_points, None, None, None, None, None, None, None


def _forward_saving(ctx, similarity: torch.Tensor, pose_points: torch.Tensor, epsilon: float, iterations: int,
                    chunk_size: int | None, compiled: bool, similarity_bound: float | None, fixed_point: bool,
                    *kept: torch.Tensor, first_column_sum: torch.Tensor | None = None) -> torch.Tensor:
    """`_stored_forward` for an autograd Function's forward, saving for `_saved_backward` C (as the passes read
    it, fixed point or not), the vectors and `kept` (the Function's own tensors). Returns warp (B, N, 3)."""
    blocks = row_blocks(similarity.shape[1], chunk_size or similarity.shape[1])
    with torch.autocast(similarity.device.type, enabled=False):
        warp, vectors, similarity = _stored_forward(similarity, pose_points, epsilon, iterations, blocks, compiled,
                                                    similarity_bound, fixed_point, first_column_sum)
    # save_for_backward takes a flat list; the group lengths (T, T + 1, T, T, T - 1, T - 1, 2) split it again.
    ctx.save_for_backward(similarity, pose_points, warp, *kept, *itertools.chain(*vectors))
    ctx.group_lengths = [len(group) for group in vectors]
    ctx.epsilon, ctx.chunk_size, ctx.compiled = epsilon, chunk_size, compiled
    ctx.similarity_bound = similarity_bound
    ctx.kept_count = len(kept)
    return warp


def _saved_backward(ctx, grad_warp: torch.Tensor, gradient_dtype: torch.dtype | None, padding: int,
                    similarity_needs_grad: bool) -> tuple[torch.Tensor | None, torch.Tensor, list[torch.Tensor]]:
    """`_stored_backward` from what `_forward_saving` saved: dL/dC (in gradient_dtype, C's by default, with
    `padding` zero columns; None unless needed), dL/dpose_points and the kept tensors."""
    similarity, pose_points, warp, *rest = ctx.saved_tensors
    kept, flat_vectors = rest[:ctx.kept_count], rest[ctx.kept_count:]
    ends = list(itertools.accumulate(ctx.group_lengths))
    vectors = [flat_vectors[end - length:end] for end, length in zip(ends, ctx.group_lengths)]
    blocks = row_blocks(similarity.shape[1], ctx.chunk_size or similarity.shape[1])
    with torch.autocast(similarity.device.type, enabled=False):
        grad_similarity, grad_points = _stored_backward(
            similarity, pose_points, warp, grad_warp.to(warp.dtype), vectors, ctx.epsilon, blocks, ctx.compiled,
            ctx.similarity_bound, similarity_needs_grad, gradient_dtype or similarity.dtype, padding)
    return grad_similarity, grad_points, kept


def _stored_backward(similarity: torch.Tensor, pose_points: torch.Tensor, warp: torch.Tensor,
                     grad_warp: torch.Tensor, vectors: list[list[torch.Tensor]], epsilon: float,
                     blocks: list[slice], compiled: bool, similarity_bound: float | None, similarity_needs_grad: bool,
                     gradient_dtype: torch.dtype, padding: int) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Gradients (similarity, pose_points) of <grad_warp, warp_out>; see `_StoredSinkhornWarp`.

    `similarity_bound`: the forward's; with one, it shifted by `bounded_shift`, so dL/dC comes from
    `_bounded_similarity_gradient`.
    dL/dC comes in gradient_dtype with `padding` zero columns (`_gradient_layout`).
    """
    log_a, log_b, column_max, column_sum, row_max, row_sum, (plan_max, plan_sum) = vectors
    run = functools.partial(_run_pass, compiled)
    bounded = similarity_bound is not None
    fused = _fused_passes(similarity, compiled, bounded, blocks)
    # Softmax term: P (g.x[m] - g.out[n]) = exp(s + log b_T - plan_max) * ([g, -g.out] / plan_sum @ [x, 1]^T).
    row_weights = torch.cat([grad_warp, -(grad_warp * warp).sum(2, keepdim=True)], dim=2) / plan_sum.unsqueeze(2)
    column_weights = _pose_major(torch.cat([pose_points, torch.ones_like(pose_points[..., :1])], dim=2))  # (B, M, 4)
    if fused:  # plan_max is the softmax's shift, one number per batch element
        column_sums = fused_plan_column_sums(similarity, log_b[-1], plan_max[:, 0], row_weights, epsilon)  # (B, M, 4)
    else:
        column_sums = _over_row_blocks(blocks, lambda rows: run(
            _plan_column_sums, similarity[:, rows], log_b[-1], plan_max[:, rows], row_weights[:, rows], epsilon),
            _add_parts)  # (B, M, 4)
    grad_points = column_sums[..., :3]
    if not similarity_needs_grad:
        return None, grad_points
    grad_log_b = (column_sums * column_weights).sum(2)  # dL/dlog b_T, (B, M)
    column_coefficients, row_coefficients = [], []  # du_t / sum for t = T..1, dv_t / sum for t = T-1..1
    for step in range(len(log_a), 0, -1):
        column_coefficients.append(run(_lse_coefficient, column_max[step - 1], column_sum[step - 1], grad_log_b))
        if step == 1:  # log a_0 is a constant
            break
        if fused:  # both passes below in one read of C; every shift is one number per batch element
            _, row_coefficient, grad_log_b = fused_row_column_backward(
                similarity, log_a[step - 1], column_max[step - 1][:, 0], column_coefficients[-1],
                row_max[step - 2][:, 0], row_sum[step - 2], log_b[step - 1], epsilon, similarity_bound)
            row_coefficients.append(row_coefficient)
            continue
        grad_log_a = _over_row_blocks(blocks, lambda rows: run(
            _log_a_gradient, similarity[:, rows], log_a[step - 1][:, rows], column_max[step - 1],
            column_coefficients[-1], epsilon), _concatenate_rows)  # dL/dlog a_{t-1}, (B, N)
        row_coefficients.append(run(_lse_coefficient, row_max[step - 2], row_sum[step - 2], grad_log_a))
        grad_log_b = _over_row_blocks(blocks, lambda rows: run(
            _log_b_gradient, similarity[:, rows], log_b[step - 1], row_max[step - 2][:, rows],
            row_coefficients[-1][:, rows], epsilon), _add_parts)  # dL/dlog b_{t-1}, (B, M)
    column_terms = list(zip(log_a[::-1], column_max[::-1], column_coefficients))
    row_terms = list(zip(log_b[-2:0:-1], row_max[::-1], row_coefficients))

    if bounded:
        kappa = kernel_offset(similarity_bound, epsilon)
        row_factors, column_factors = run(_bounded_gradient_factors, log_b[-1], plan_max, row_weights,
                                          column_weights, column_terms, row_terms, kappa)
    if fused:  # C in one block: dL/dC in one Triton kernel
        return fused_similarity_gradient(similarity, row_factors, column_factors, epsilon, similarity_bound,
                                         gradient_dtype, padding), grad_points

    def gradient_rows(rows: slice) -> torch.Tensor:
        if bounded:
            return run(_bounded_similarity_gradient, similarity[:, rows], row_factors[:, rows], column_factors,
                       epsilon, kappa, gradient_dtype, padding)
        return run(_similarity_gradient, similarity[:, rows], log_b[-1], plan_max[:, rows], row_weights[:, rows],
                   column_weights, [(log_a_step[:, rows], maximum, coefficient)
                                    for log_a_step, maximum, coefficient in column_terms],
                   [(log_b_step, maximum[:, rows], coefficient[:, rows])
                    for log_b_step, maximum, coefficient in row_terms], epsilon, gradient_dtype, padding)

    if len(blocks) == 1:
        return gradient_rows(blocks[0]), grad_points
    batch, num_identity, num_pose = similarity.shape
    grad_similarity = similarity.new_empty((batch, num_identity, num_pose + padding), dtype=gradient_dtype)
    for rows in blocks:
        grad_similarity[:, rows] = gradient_rows(rows)
    return grad_similarity, grad_points


@torch.compiler.disable
def sinkhorn_warp_stored(similarity: torch.Tensor, pose_points: torch.Tensor, epsilon: float = SINKHORN_EPSILON,
                         iterations: int = SINKHORN_ITERATIONS, chunk_size: int | None = None,
                         compiled: bool = False, similarity_bound: float | None = None) -> torch.Tensor:
    """`sinkhorn_warp_dense(similarity, pose_points)` that keeps no N x M tensor but C for backward.

    Meant for training at moderate N, where C fits in memory: the forward makes 2T read passes over C
    (T column and T - 1 row log-sum-exps, then the warp with its own row normaliser), the backward 2T - 1
    read passes for its vectors and one pass that writes dL/dC, its only N x M output; on a GPU, compiled,
    with a bound and one block, each row pass shares its read with the column pass after it (fused.py),
    T + 1 reads forward and T + 1 backward. Each pass is a
    small pure function of C and vectors: with `compiled`, torch.compile turns each into one fused kernel
    (for GPUs); in eager mode a pass allocates N x M temporaries that are freed at once, which `chunk_size`
    bounds. A torch.compile of the caller does not trace into this function (it breaks the graph here);
    pass `compiled` instead. Derivation in `_StoredSinkhornWarp`. Gradients reach similarity and
    pose_points; double backward is not supported.

    Args:
        similarity: C, float (B, N, M), kept as it is (bf16/fp16 are read and upcast pass by pass, so no
            float32 copy is kept).
        pose_points: float (B, M, 3).
        epsilon: entropic temperature; log K = (C - 1) / epsilon.
        iterations: number of (b, a) update pairs.
        chunk_size: identity vertices per block inside each pass, or None for one block.
        compiled: run each pass as a torch.compile'd kernel (compiled once per pass, shape and dtype).
        similarity_bound: a bound on |C| that the caller guarantees, up to rounding (1 for cosine
            similarities), at most 40 * epsilon: each forward pass then shifts its log-sum-exp by a bound
            from its vector instead of first finding the maximum over C (`bounded_shift`). None: maxima.
    Returns:
        warp_out: float32 or wider (B, N, 3), each row a convex combination of pose points.
    """
    validate_similarity_inputs(similarity, pose_points, epsilon, iterations)
    _validate_stored_options(chunk_size, similarity_bound, epsilon)
    dtype = working_dtype(similarity, pose_points)
    return _StoredSinkhornWarp.apply(similarity, pose_points.to(dtype), float(epsilon), iterations, chunk_size,
                                     compiled, similarity_bound)


@torch.compiler.disable
def similarity_warp_stored(identity_theta: torch.Tensor, pose_phi: torch.Tensor, pose_points: torch.Tensor,
                           half_dtype: torch.dtype, epsilon: float = SINKHORN_EPSILON,
                           iterations: int = SINKHORN_ITERATIONS, chunk_size: int | None = None,
                           compiled: bool = False, similarity_bound: float | None = None,
                           fixed_point: bool = False) -> torch.Tensor:
    """`sinkhorn_warp_stored(theta^T phi, pose_points, ...)` with C formed inside in float32 accuracy (on a GPU
    from fp16 pieces, `models.networks.layers.split_product`) and its two backward products in half precision,
    as `models.networks.layers.mixed_product` computes them, but with dL/dC written once in half precision
    (`_StoredSimilarityWarp`): less memory and time.

    Args:
        identity_theta: float32 (B, C, N); pose_phi: float32 (B, C, M); pose_points: float (B, M, 3).
        half_dtype: torch.float16 or torch.bfloat16, the backward products' precision.
        epsilon, iterations, chunk_size, compiled, similarity_bound: as for `sinkhorn_warp_stored`.
        fixed_point: keep C, once formed, as 16-bit fixed point (common.py's `fixed_point_similarity`, for
            cosine similarities, similarity_bound 1): every pass reads half the bytes and backward keeps half,
            for a rounding of C by at most 1.5e-5.
    Returns:
        warp_out: float32 (B, N, 3).
    """
    validate_feature_inputs(identity_theta, pose_phi, pose_points, epsilon, iterations)
    _validate_stored_options(chunk_size, similarity_bound, epsilon)
    if identity_theta.dtype != torch.float32 or pose_phi.dtype != torch.float32:
        raise ValueError(f"similarity_warp_stored forms C in float32 and takes float32 features, got "
                         f"{identity_theta.dtype} and {pose_phi.dtype}")
    if fixed_point and similarity_bound != 1.0:
        raise ValueError(f"a fixed-point C holds cosine similarities: pass similarity_bound=1.0 with fixed_point, "
                         f"got {similarity_bound!r}")
    return _StoredSimilarityWarp.apply(identity_theta, pose_phi, pose_points.to(working_dtype(pose_points)),
                                       half_dtype, float(epsilon), iterations, chunk_size, compiled,
                                       similarity_bound, fixed_point)


def _validate_stored_options(chunk_size: int | None, similarity_bound: float | None, epsilon: float) -> None:
    if chunk_size is not None:
        validate_chunk_size(chunk_size)
    if similarity_bound is not None:
        validate_similarity_bound(similarity_bound, epsilon)
