"""Constants, input checks and the log-domain pieces shared by the Sinkhorn forms of this package."""
from __future__ import annotations

import math

import torch

from models.networks.layers import padded

SINKHORN_EPSILON = 0.03
SINKHORN_ITERATIONS = 5
SINKHORN_DIVISION_EPS = 1e-8
LOG_DIVISION_EPS = math.log(SINKHORN_DIVISION_EPS)
# A cosine similarity C in [-1, 1] stored as 16-bit fixed point (`fixed_point_similarity`): q = round(C * LEVELS)
# in int16, read back as q * SIMILARITY_STEP. The rounding moves C by at most SIMILARITY_STEP / 2 (1.5e-5), so
# log K = (C - 1) / epsilon by at most 5.1e-4 at epsilon 0.03; float16 would move C near 1 by up to 2.4e-4.
SIMILARITY_LEVELS = 32767
SIMILARITY_STEP = 1.0 / SIMILARITY_LEVELS
# The widest range of log K a bounded shift may span (`bounded_shift`): exp(-80) is 1.8e-35, well above
# float32's smallest normal number (1.2e-38), so no row or column can underflow as a whole.
MAX_LOG_KERNEL_RANGE = 80.0


def validate_schedule(epsilon: float, iterations: int) -> None:
    """ValueError unless epsilon > 0 and iterations is a non-negative int."""
    if not epsilon > 0:
        raise ValueError(f"Sinkhorn epsilon must be positive, got {epsilon}")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
        raise ValueError(f"Sinkhorn iterations must be a non-negative int, got {iterations!r}")


def validate_similarity_bound(similarity_bound: float, epsilon: float) -> None:
    """ValueError unless similarity_bound lies in (0, MAX_LOG_KERNEL_RANGE * epsilon / 2]."""
    if not 0 < similarity_bound <= MAX_LOG_KERNEL_RANGE * epsilon / 2:
        raise ValueError(f"similarity_bound must lie in (0, {MAX_LOG_KERNEL_RANGE * epsilon / 2:g}] at epsilon "
                         f"{epsilon:g} (a wider one could underflow whole rows), got {similarity_bound!r}; "
                         f"pass None to shift by the maxima")


def kernel_offset(similarity_bound: float, epsilon: float) -> float:
    """kappa = (1 - similarity_bound) / epsilon, with exp(s + kappa) = exp((C - bound) / epsilon) in
    [exp(-2 bound / epsilon), 1] for |C| <= bound: a normal float32 for every bound `validate_similarity_bound`
    admits, where exp(s) alone flushes to 0 for (C - 1) / epsilon below -87.

    The bounded forms take each term exp(s + v - shift) (v a Sinkhorn vector's entry, shift its `bounded_shift`) as
    exp(s + kappa) times exp(v - shift - kappa) = exp(v - max v), a factor of its row or column at most 1: one
    exponential an element, and a product that flushes to 0 only where the term's own exponential would.
    """
    return (1.0 - similarity_bound) / epsilon


def validate_pose_points(pose_points: torch.Tensor, batch: int, num_pose: int) -> None:
    """ValueError unless pose_points is (batch, num_pose, 3)."""
    if pose_points.shape != (batch, num_pose, 3):
        raise ValueError(f"pose_points must have shape ({batch}, {num_pose}, 3) to match the features, "
                         f"got {tuple(pose_points.shape)}")


def validate_similarity_inputs(similarity: torch.Tensor, pose_points: torch.Tensor, epsilon: float,
                                iterations: int) -> None:
    """ValueError unless similarity is (B, N, M), pose_points (B, M, 3) and the schedule valid."""
    if similarity.dim() != 3:
        raise ValueError(f"similarity must have shape (B, N, M), got {tuple(similarity.shape)}")
    validate_pose_points(pose_points, similarity.shape[0], similarity.shape[2])
    validate_schedule(epsilon, iterations)


def validate_feature_inputs(identity_features: torch.Tensor, pose_features: torch.Tensor, pose_points: torch.Tensor,
                            epsilon: float, iterations: int) -> None:
    """ValueError unless the features are (B, C, N) and (B, C, M), pose_points (B, M, 3) and the schedule valid."""
    if identity_features.dim() != 3 or pose_features.dim() != 3 \
            or identity_features.shape[:2] != pose_features.shape[:2]:
        raise ValueError(f"identity and pose features must have shapes (B, C, N) and (B, C, M) with the same B "
                         f"and C, got {tuple(identity_features.shape)} and {tuple(pose_features.shape)}")
    validate_pose_points(pose_points, pose_features.shape[0], pose_features.shape[2])
    validate_schedule(epsilon, iterations)


def validate_chunk_size(chunk_size: int) -> None:
    """ValueError unless chunk_size is a positive int."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"Sinkhorn chunk_size must be a positive int, got {chunk_size!r}")


def working_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float32 or wider: bf16/fp16 inputs are upcast before C is scaled by 1 / epsilon."""
    dtype = torch.float32
    for tensor in tensors:
        if not tensor.is_floating_point():
            raise ValueError(f"Sinkhorn inputs must be floating point, got {tensor.dtype}")
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def fixed_point_similarity(similarity: torch.Tensor) -> torch.Tensor:
    """C (B, N, M), a cosine similarity, as 16-bit fixed point: int16 q = clamp(C, -1, 1) * LEVELS rounded half
    away from zero (as fused.py's kernel that forms it rounds, in the same float32 steps).

    Half the bytes of float32 for every pass that reads C. Returned as a view of rows zero-padded to a multiple
    of ALIGNMENT (8) lanes, 16 bytes, so that a kernel reading whole rows can issue aligned loads (fused.py).
    """
    scaled = similarity.float().clamp(-1.0, 1.0) * SIMILARITY_LEVELS
    rounded = torch.where(scaled >= 0, torch.floor(scaled + 0.5), torch.ceil(scaled - 0.5)).to(torch.int16)
    return padded(rounded)[..., :similarity.shape[2]]


def similarity_values(similarity: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """C in `dtype`: a fixed-point C (int16, `fixed_point_similarity`) scaled back, any other cast."""
    if similarity.dtype == torch.int16:
        return similarity.to(dtype) * SIMILARITY_STEP
    return similarity.to(dtype)


def log_kernel_of(similarity: torch.Tensor, epsilon: float, dtype: torch.dtype) -> torch.Tensor:
    """log K = (C - 1) / epsilon, computed in `dtype` (C float, or int16 fixed point)."""
    return (similarity_values(similarity, dtype) - 1.0) / epsilon


def bounded_shift(log_weights: torch.Tensor, similarity_bound: float | None, epsilon: float) -> torch.Tensor | None:
    """An upper bound (B,) of log K[n, m] + log_weights over a whole row or column, or None without a bound.

    With |C| <= similarity_bound, log K = (C - 1) / epsilon lies in [(-bound - 1) / epsilon,
    (bound - 1) / epsilon], so max(log_weights) + (bound - 1) / epsilon bounds every logit of a row (or
    column), and the largest of them lies at most 2 * bound / epsilon below it (about 67 for cosine
    similarities at epsilon 0.03, checked below 80 by `validate_similarity_bound`): shifted by this bound, every
    weight is at most 1 and each row's largest at least exp(-80), far above float32's smallest normal number.
    """
    if similarity_bound is None:
        return None
    return log_weights.amax(1) + (similarity_bound - 1.0) / epsilon


def log_marginal_update(log_mass: torch.Tensor, count: int) -> torch.Tensor:
    """log((1 / count) / (exp(log_mass) + 1e-8)): the published update, 1e-8 included, in log form."""
    return -math.log(count) - torch.logaddexp(log_mass, torch.full_like(log_mass, LOG_DIVISION_EPS))


def row_blocks(num_rows: int, chunk_size: int) -> list[slice]:
    """Consecutive slices of at most chunk_size identity rows covering num_rows."""
    return [slice(start, min(start + chunk_size, num_rows)) for start in range(0, num_rows, chunk_size)]
