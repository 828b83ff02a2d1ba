"""The published Sinkhorn warp on a materialised similarity, and the same updates in the log domain."""
from __future__ import annotations

import math

import torch

from models.networks.ot.common import (SINKHORN_DIVISION_EPS, SINKHORN_EPSILON, SINKHORN_ITERATIONS, log_kernel_of,
                                       log_marginal_update, validate_similarity_inputs, working_dtype)


def sinkhorn_warp_dense(similarity: torch.Tensor, pose_points: torch.Tensor,
                        epsilon: float = SINKHORN_EPSILON,
                        iterations: int = SINKHORN_ITERATIONS) -> torch.Tensor:
    """Warp pose points onto the identity's vertices with the row-normalised Sinkhorn plan.

    Args:
        similarity: C, float (B, N, M), cosine similarity of identity vertex n and pose vertex m.
        pose_points: float (B, M, 3).
        epsilon: entropic temperature; K = exp(-(1 - C) / epsilon).
        iterations: number of (b, a) update pairs.
    Returns:
        warp_out: float (B, N, 3), each row a convex combination of pose points.
    """
    batch, num_identity, num_pose = similarity.shape
    kernel = torch.exp(-(1.0 - similarity) / epsilon)  # (B, N, M)
    a = similarity.new_full((batch, num_identity, 1), 1.0 / num_identity)
    b = similarity.new_full((batch, num_pose, 1), 1.0 / num_pose)
    for _ in range(iterations):
        b = (1.0 / num_pose) / (kernel.transpose(1, 2) @ a + SINKHORN_DIVISION_EPS)  # (B, M, 1)
        a = (1.0 / num_identity) / (kernel @ b + SINKHORN_DIVISION_EPS)  # (B, N, 1)
    plan = a * kernel * b.transpose(1, 2)  # (B, N, M)
    plan = plan / plan.sum(dim=-1, keepdim=True)
    return plan @ pose_points  # (B, N, 3)


def sinkhorn_warp_logdomain(similarity: torch.Tensor, pose_points: torch.Tensor,
                            epsilon: float = SINKHORN_EPSILON,
                            iterations: int = SINKHORN_ITERATIONS) -> torch.Tensor:
    """`sinkhorn_warp_dense` computed with log-sum-exps on the potentials log a, log b.

    Equal to the dense reference in value and gradient (autograd through every step); it keeps (B, N, M)
    intermediates for backward, so it is meant for small N and as a second reference.

    Args:
        similarity: C, float (B, N, M); computed in float32 or wider.
        pose_points: float (B, M, 3).
        epsilon: entropic temperature; log K = (C - 1) / epsilon.
        iterations: number of (b, a) update pairs.
    Returns:
        warp_out: float32 or wider (B, N, 3), each row a convex combination of pose points.
    """
    validate_similarity_inputs(similarity, pose_points, epsilon, iterations)
    batch, num_identity, num_pose = similarity.shape
    dtype = working_dtype(similarity, pose_points)
    log_kernel = log_kernel_of(similarity, epsilon, dtype)  # (B, N, M)
    log_a = log_kernel.new_full((batch, num_identity, 1), -math.log(num_identity))
    log_b = log_kernel.new_full((batch, 1, num_pose), -math.log(num_pose))
    for step in range(iterations):
        if step > 0:  # the last a update is skipped: the row normalisation cancels it
            log_a = log_marginal_update(torch.logsumexp(log_kernel + log_b, dim=2, keepdim=True), num_identity)
        log_b = log_marginal_update(torch.logsumexp(log_kernel + log_a, dim=1, keepdim=True), num_pose)
    plan = torch.softmax(log_kernel + log_b, dim=2)  # (B, N, M)
    return plan @ pose_points.to(dtype)  # (B, N, 3)
