"""Entropic optimal transport (Sinkhorn) between two vertex sets, as pure functions, one form per module.

3D-CoreNet (Song et al., NeurIPS 2021, Sec. 3.1) warps the pose mesh onto the identity's vertex order with
an optimal-transport plan computed from the cosine similarity C of their features. `sinkhorn_warp_dense`
(dense.py) is the faithful reference: it materialises the (B, N, M) kernel and runs the published multiplicative
Sinkhorn iterations, including the +1e-8 in every division, which is part of the method (SPEC.md: it
dominates columns where K^T a is tiny; dropping it changes warp_out by about 30%).

Three equivalent forms follow (issue 4, the fast path):
- `sinkhorn_warp_logdomain` (dense.py) runs the same updates as log-sum-exps on a materialised C, with plain autograd.
  Since the final row normalisation cancels a, warp_out = softmax_m(log K + log b_T) @ pose_points.
- `sinkhorn_warp_chunked` (chunked.py) never materialises C: every pass recomputes C = theta^T phi for a block of
  identity rows, so memory grows linearly with N and M, and a hand-written backward recomputes the blocks
  again instead of saving N x M intermediates. Its derivation is in `_ChunkedSinkhornWarp`.
- `sinkhorn_warp_stored` (stored.py) takes a materialised C (training at moderate N) and saves nothing N x M but C
  itself: each Sinkhorn half-step is one read pass over C, the backward's vectors come from read passes
  too and dL/dC from one elementwise pass, each pass a small function that torch.compile fuses into one
  kernel. Its derivation is in `_StoredSinkhornWarp`. Given a bound on |C| (1 for the model's cosine
  similarities), each log-sum-exp is shifted by a bound known before the pass instead of C's maximum, so
  a pass is one reduction. `similarity_warp_stored` forms C itself from the features and writes its gradient
  in the half precision of C's backward products (training under --precision fp16/bf16).
All compute in at least float32: C enters exp(C / epsilon) with epsilon = 0.03, so any error in C is
magnified about 33 times (keep TF32 matmuls off on GPUs for the same reason). Constants and input checks
shared by the forms are in common.py.
"""
from models.networks.ot.chunked import SINKHORN_CHUNK_SIZE, sinkhorn_warp_chunked
from models.networks.ot.common import (MAX_LOG_KERNEL_RANGE, SINKHORN_DIVISION_EPS, SINKHORN_EPSILON,
                                       SINKHORN_ITERATIONS)
from models.networks.ot.dense import sinkhorn_warp_dense, sinkhorn_warp_logdomain
from models.networks.ot.stored import similarity_warp_stored, sinkhorn_warp_stored

__all__ = ["MAX_LOG_KERNEL_RANGE", "SINKHORN_CHUNK_SIZE", "SINKHORN_DIVISION_EPS", "SINKHORN_EPSILON",
           "SINKHORN_ITERATIONS", "similarity_warp_stored", "sinkhorn_warp_chunked", "sinkhorn_warp_dense",
           "sinkhorn_warp_logdomain", "sinkhorn_warp_stored"]
