"""The Sinkhorn warp with C = theta^T phi recomputed block by block, never held whole: memory linear in N."""
from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from models.networks.layers import float_product_of_halves, split_operands, split_products_run_on
from models.networks.ot.common import (SINKHORN_EPSILON, SINKHORN_ITERATIONS, log_marginal_update, row_blocks,
                                       validate_chunk_size, validate_feature_inputs, working_dtype)

# Identity rows per block in `sinkhorn_warp_chunked`: a (B, 1024, M) float32 block is 28 MB per pair at
# M = 6890 and 450 MB at 110K. On CPU 256 to 4096 rows run within 20% of each other (smaller blocks a little
# faster, from cache); on GPU fewer blocks mean fewer kernel launches.
SINKHORN_CHUNK_SIZE = 1024


class _LogKernelRows:
    """Blocks of rows of log K + a column shift, (theta^T phi - 1) / epsilon + shift[m], recomputed on demand.

    With `split` (float32 features on a GPU, `split_products_run_on`) each block of C is `split_product`'s one
    fp16 product, its operands split once here: float32 accuracy in practice, and the scale and shift then one
    more pass over the block. One 110,240-vertex pair took a third less time than with float32's products on
    the H100 (docs/benchmarks.md, thirteenth session). Otherwise one float32 baddbmm forms the block with its
    scale and shift.
    """

    def __init__(self, theta: torch.Tensor, phi: torch.Tensor, epsilon: float, split: bool):
        """theta: (B, C, N); phi: (B, C, M)."""
        self.theta, self.phi, self.epsilon = theta, phi, epsilon
        self.split = split and theta.dtype == phi.dtype == torch.float32 and split_products_run_on(theta)
        if self.split:
            self.left, self.right = split_operands(theta.transpose(1, 2), phi)  # (B, N, 3C), (B, 3C, M')

    def __call__(self, rows: slice, column_shift: torch.Tensor) -> torch.Tensor:
        """log K[rows] + column_shift: (B, k, M) for the k identity rows in `rows`; column_shift: (B, M)."""
        bias = (column_shift - 1.0 / self.epsilon).unsqueeze(1)  # (B, 1, M)
        if not self.split:
            return torch.baddbmm(bias, self.theta[:, :, rows].transpose(1, 2), self.phi, alpha=1.0 / self.epsilon)
        similarity = float_product_of_halves(self.left[:, rows], self.right)[..., :self.phi.shape[2]]  # (B, k, M)
        return torch.add(bias, similarity, alpha=1.0 / self.epsilon, out=similarity)


def _chunked_forward(theta: torch.Tensor, phi: torch.Tensor, pose_points: torch.Tensor, epsilon: float,
                     iterations: int, chunk_size: int, split: bool) -> tuple[torch.Tensor, ...]:
    """Potentials log a_0..a_{T-1}, log b_0..b_T, log row norms r and warp_out, one pass per step.

    Pass t forms exp(log K + log b_t - rowmax) for a block: its row sums give log(K b_t), hence log a_t,
    and weighted by exp(log a_t + rowmax) its column sums give (K^T a_t) b_t, hence log b_{t+1}, so one
    exponential per entry serves both half-steps. The column sums are accumulated over blocks in linear
    scale: a_t <= 1 / (N 1e-8) and K <= 1 bound them above, and a column only underflows where K^T a_t is
    so far below 1e-8 that the +1e-8 makes it irrelevant. The last pass (t = T) gives the warp.
    """
    batch, _, num_identity = theta.shape
    num_pose = phi.shape[2]
    log_kernel_rows = _LogKernelRows(theta, phi, epsilon, split)
    log_a = theta.new_empty(iterations, batch, num_identity)
    log_b = theta.new_empty(iterations + 1, batch, num_pose)
    log_b[0] = -math.log(num_pose)
    if iterations:
        log_a[0] = -math.log(num_identity)
    log_row_norm = theta.new_empty(batch, num_identity)
    warp = theta.new_empty(batch, num_identity, 3)
    for step in range(iterations + 1):
        column_mass = theta.new_zeros(batch, num_pose, 1)  # sum_n a_t[n] K[n, m] b_t[m]
        for rows in row_blocks(num_identity, chunk_size):
            block = log_kernel_rows(rows, log_b[step])  # (B, k, M)
            row_max = block.amax(dim=2, keepdim=True)  # (B, k, 1)
            block = block.sub_(row_max).exp_()
            row_sum = block.sum(dim=2, keepdim=True)  # (B, k, 1)
            log_row_mass = (row_max + row_sum.log()).squeeze(2)  # log (K b_t)[rows], (B, k)
            if step == iterations:
                log_row_norm[:, rows] = log_row_mass
                warp[:, rows] = (block @ pose_points) / row_sum  # (B, k, 3)
            else:
                if step > 0:
                    log_a[step, :, rows] = log_marginal_update(log_row_mass, num_identity)
                row_weight = torch.exp(log_a[step, :, rows].unsqueeze(2) + row_max)  # (B, k, 1)
                column_mass += block.transpose(1, 2) @ row_weight  # (B, M, 1)
        if step < iterations:
            log_b[step + 1] = log_marginal_update(column_mass.squeeze(2).log() - log_b[step], num_pose)
    return log_a, log_b, log_row_norm, warp


class _ChunkedSinkhornWarp(torch.autograd.Function):
    """warp_out from (theta, phi, pose_points) with a block-wise, recomputing backward.

    Reverse mode, with s = log K, z the log-sum-exp inside an update and P = softmax_m(s + log b_T):
    - out = P x: dL/ds[n, m] = P[n, m] (g[n].x[m] - g[n].out[n]) (softmax backward), dL/dx = P^T g, and
      dL/dlog b_T[m] is the column sum of that term.
    - log b_t = -log M - logaddexp(z_t, log 1e-8) with z_t[m] = logsumexp_n(s + log a_{t-1}): the chain
      rule gives d log b_t / dz_t = -e^z / (e^z + 1e-8) and dz_t / ds = softmax_n, whose product is
      -M a_{t-1}[n] K[n, m] b_t[m]. So gb_t = dL/dlog b_t adds -M gb_t[m] exp(s + log a_{t-1}[n] + log b_t[m])
      to dL/ds, and its row sums are dL/dlog a_{t-1}. Likewise ga_t adds
      -N ga_t[n] exp(s + log a_t[n] + log b_t[m]), whose column sums are gb_t (t < T).
    Hence dL/ds is a sum of 2T terms exp(s + log u[n] + log v[m]) * (U V^T)[n, m] with vectors saved
    from forward (the O(N + M) potentials). Only the ga, gb vectors need sequential passes (each one
    block-recomputing s); one last pass forms the whole dL/dC block by block, after a common shift that
    keeps every factor at most 1, and multiplies it into phi and theta.
    """

    @staticmethod
    def forward(ctx, theta, phi, pose_points, epsilon, iterations, chunk_size, split):
        with torch.autocast(theta.device.type, enabled=False):
            log_a, log_b, log_row_norm, warp = _chunked_forward(theta, phi, pose_points, epsilon, iterations,
                                                                chunk_size, split)
        ctx.save_for_backward(theta, phi, pose_points, log_a, log_b, log_row_norm, warp)
        ctx.epsilon, ctx.chunk_size, ctx.split = epsilon, chunk_size, split
        return warp

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_warp):
        theta, phi, pose_points, log_a, log_b, log_row_norm, warp = ctx.saved_tensors
        with torch.autocast(theta.device.type, enabled=False):
            grad_theta, grad_phi, grad_points = _chunked_backward(
                theta, phi, pose_points, log_a, log_b, log_row_norm, warp, grad_warp.to(warp.dtype),
                ctx.epsilon, ctx.chunk_size, ctx.needs_input_grad[0] or ctx.needs_input_grad[1], ctx.split)
        return grad_theta, grad_phi, grad_points, None, None, None, None


def _chunked_backward(theta: torch.Tensor, phi: torch.Tensor, pose_points: torch.Tensor, log_a: torch.Tensor,
                      log_b: torch.Tensor, log_row_norm: torch.Tensor, warp: torch.Tensor, grad_warp: torch.Tensor,
                      epsilon: float, chunk_size: int, features_need_grad: bool,
                      split: bool) -> tuple[torch.Tensor | None, ...]:
    """Gradients (theta, phi, pose_points) of <grad_warp, warp_out>; see `_ChunkedSinkhornWarp`."""
    batch, _, num_identity = theta.shape
    log_kernel_rows = _LogKernelRows(theta, phi, epsilon, split)
    num_pose = phi.shape[2]
    iterations = log_a.shape[0]
    blocks = row_blocks(num_identity, chunk_size)
    # Final softmax: U = [g, -g.out] against V = [x, 1] under the log factors (-r, log b_T).
    row_weights = torch.cat([grad_warp, -(grad_warp * warp).sum(2, keepdim=True)], dim=2)  # (B, N, 4)
    column_weights = torch.cat([pose_points, torch.ones_like(pose_points[..., :1])], dim=2)  # (B, M, 4)
    column_sums = theta.new_zeros(batch, 4, num_pose)
    for rows in blocks:
        block = log_kernel_rows(rows, log_b[iterations])  # (B, k, M)
        block = block.sub_(log_row_norm[:, rows].unsqueeze(2)).exp_()  # P rows
        column_sums += row_weights[:, rows].transpose(1, 2) @ block  # (B, 4, M)
    column_sums = column_sums.transpose(1, 2)  # (B, M, 4)
    grad_points = column_sums[..., :3]
    if not features_need_grad:
        return None, None, grad_points
    terms = [(-log_row_norm, row_weights, log_b[iterations], column_weights)]
    grad_log_b = (column_sums * column_weights).sum(2)  # dL/dlog b_T, (B, M)
    ones_identity = theta.new_ones(batch, num_identity, 1)
    ones_pose = theta.new_ones(batch, num_pose, 1)
    for step in range(iterations, 0, -1):
        b_coefficient = -num_pose * grad_log_b.unsqueeze(2)  # (B, M, 1)
        terms.append((log_a[step - 1], ones_identity, log_b[step], b_coefficient))
        if step == 1:
            break
        # One exponential for both reductions, shifted by the larger of log b_t, log b_{t-1}.
        shift = torch.maximum(log_b[step], log_b[step - 1])  # (B, M)
        b_weight = b_coefficient * torch.exp(log_b[step] - shift).unsqueeze(2)  # (B, M, 1)
        grad_log_a = theta.new_empty(batch, num_identity, 1)
        column_sum = theta.new_zeros(batch, num_pose, 1)
        for rows in blocks:
            block = log_kernel_rows(rows, shift)  # (B, k, M)
            block = block.add_(log_a[step - 1, :, rows].unsqueeze(2)).exp_()
            grad_log_a[:, rows] = block @ b_weight  # (B, k, 1)
            column_sum += block.transpose(1, 2) @ grad_log_a[:, rows]  # (B, M, 1)
        a_coefficient = -num_identity * grad_log_a
        terms.append((log_a[step - 1], a_coefficient, log_b[step - 1], ones_pose))
        grad_log_b = -num_identity * column_sum.squeeze(2) * torch.exp(log_b[step - 1] - shift)
    return (*_similarity_gradient_to_features(log_kernel_rows, terms, blocks), grad_points)


def _similarity_gradient_to_features(log_kernel_rows: _LogKernelRows, terms: list[tuple[torch.Tensor, ...]],
                                     blocks: list[slice]) -> tuple[torch.Tensor, torch.Tensor]:
    """Multiply dL/dC = (1 / epsilon) sum_j exp(s + log u_j[n] + log v_j[m]) (U_j V_j^T) into theta and phi.

    The log factors are shifted by their maxima per row and per column so every U, V entry keeps its
    scale; exp(s + shift) stays finite because each term is bounded by the plan entries (at most 1 / N,
    1 / M) times b_t / b_T ratios that the +1e-8 keeps below 1e16.
    """
    theta, phi, epsilon = log_kernel_rows.theta, log_kernel_rows.phi, log_kernel_rows.epsilon
    row_shift = torch.stack([log_u for log_u, _, _, _ in terms]).amax(0)  # (B, N)
    column_shift = torch.stack([log_v for _, _, log_v, _ in terms]).amax(0)  # (B, M)
    row_factors = torch.cat([u * torch.exp(log_u - row_shift).unsqueeze(2) for log_u, u, _, _ in terms],
                            dim=2) / epsilon  # (B, N, R)
    column_factors = torch.cat([v * torch.exp(log_v - column_shift).unsqueeze(2) for _, _, log_v, v in terms],
                               dim=2)  # (B, M, R)
    grad_theta = torch.empty_like(theta)
    grad_phi = torch.zeros_like(phi)
    for rows in blocks:
        block = log_kernel_rows(rows, column_shift)  # (B, k, M)
        block = block.add_(row_shift[:, rows].unsqueeze(2)).exp_()
        block = block.mul_(row_factors[:, rows] @ column_factors.transpose(1, 2))  # dL/dC rows, (B, k, M)
        grad_theta[:, :, rows] = phi @ block.transpose(1, 2)  # (B, C, k)
        grad_phi += theta[:, :, rows] @ block  # (B, C, M)
    return grad_theta, grad_phi


@torch.compiler.disable
def sinkhorn_warp_chunked(identity_features: torch.Tensor, pose_features: torch.Tensor,
                          pose_points: torch.Tensor, epsilon: float = SINKHORN_EPSILON,
                          iterations: int = SINKHORN_ITERATIONS,
                          chunk_size: int = SINKHORN_CHUNK_SIZE, split_products: bool = False) -> torch.Tensor:
    """`sinkhorn_warp_dense(theta^T phi, pose_points)` without materialising the (B, N, M) similarity.

    Every Sinkhorn half-step and the final warp visit the identity vertices in blocks of `chunk_size`,
    recomputing that block of C = theta^T phi; backward recomputes it likewise and saves only O(N + M)
    vectors per iteration. Working memory is O(B * chunk_size * M + B * (N + M) * (C + iterations)); the
    price is 2 * iterations + 4 similarity-sized matmuls (iterations + 1 forward, iterations + 3 backward)
    where the dense path has 3. A torch.compile of the caller does not trace into this function (it breaks
    the graph here): traced, its loops over blocks and iterations unroll into a graph that grows with N,
    whose compilation had not finished after 7 minutes at 110K vertices. Gradients reach all three inputs;
    double backward is not supported.

    Args:
        identity_features: theta, float (B, C, N), each vertex feature of unit L2 norm over C.
        pose_features: phi, float (B, C, M), each vertex feature of unit L2 norm over C.
        pose_points: float (B, M, 3).
        epsilon: entropic temperature; K = exp(-(1 - C) / epsilon).
        iterations: number of (b, a) update pairs.
        chunk_size: identity vertices per block.
        split_products: with float32 features on a GPU, form C's blocks by `split_product`'s one fp16 product
            (float32 accuracy in practice, `_LogKernelRows`); the gradient's products stay float32.
    Returns:
        warp_out: float32 or wider (B, N, 3) (bf16/fp16 inputs are upcast to float32), each row a convex
        combination of pose points.
    """
    validate_feature_inputs(identity_features, pose_features, pose_points, epsilon, iterations)
    validate_chunk_size(chunk_size)
    dtype = working_dtype(identity_features, pose_features, pose_points)
    return _ChunkedSinkhornWarp.apply(identity_features.to(dtype), pose_features.to(dtype), pose_points.to(dtype),
                                      float(epsilon), iterations, chunk_size, split_products)
