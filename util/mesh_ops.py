"""Mesh preprocessing shared by training and test: bounding-box centring and vertex permutation.

3D-CoreNet (Song et al., NeurIPS 2021) centres every mesh by its axis-aligned bounding box and feeds the
networks vertices in a random order, so that correspondence has to be learned rather than read off the
vertex index (SPEC.md, "Preprocessing"). The identity mesh and its ground truth share one permutation;
the pose mesh gets its own. Faces follow a permutation by re-indexing, done here with one gather
instead of the published per-face Python loop (SPEC.md, "Known defects").

All functions are torch-only, keep the device and dtype of their inputs and accept any leading batch
dimensions.
"""
from __future__ import annotations

import torch


def center_bbox(points: torch.Tensor) -> torch.Tensor:
    """Centre point sets by their axis-aligned bounding box: subtract (min + max) / 2 per axis. No scaling.

    Args:
        points: float (..., V, 3), V >= 1.
    Returns:
        float (..., V, 3), same dtype and device; per point set, min + max is 0 on every axis.
    """
    if points.dim() < 2 or points.shape[-1] != 3 or points.shape[-2] == 0:
        raise ValueError(f"points must have shape (..., V, 3) with V >= 1, got {tuple(points.shape)}")
    low = points.amin(dim=-2, keepdim=True)  # (..., 1, 3)
    high = points.amax(dim=-2, keepdim=True)  # (..., 1, 3)
    return points - (low + high) / 2


def random_permutation(num_vertices: int, generator: torch.Generator) -> torch.Tensor:
    """Draw a uniformly random vertex order.

    Args:
        num_vertices: V >= 1.
        generator: the source of randomness; the result lies on its device.
    Returns:
        int64 (V,): a permutation of 0..V-1.
    """
    if num_vertices < 1:
        raise ValueError(f"num_vertices must be at least 1, got {num_vertices}")
    return torch.randperm(num_vertices, generator=generator, device=generator.device)


def permute_mesh(
    vertices: torch.Tensor, faces: torch.Tensor, permutation: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reorder a mesh's vertices and re-index its faces so that every face is the same triangle.

    New vertex n is old vertex permutation[n], so old vertex k moves to position inverse[k], where
    inverse[permutation[n]] = n; each face index k becomes inverse[k], which keeps the winding.

    Args:
        vertices: float (..., V, 3).
        faces: int64 (..., F, 3), indices into V; F may be 0.
        permutation: int64 (..., V), a permutation of 0..V-1 per mesh; leading dims as vertices.
    Returns:
        permuted_vertices: float (..., V, 3), vertices[..., permutation, :].
        permuted_faces: int64 (..., F, 3), the faces in the new vertex order.
    """
    if vertices.dim() < 2 or vertices.shape[-1] != 3:
        raise ValueError(f"vertices must have shape (..., V, 3), got {tuple(vertices.shape)}")
    batch_shape, num_vertices = vertices.shape[:-2], vertices.shape[-2]
    if faces.shape[:-2] != batch_shape or faces.dim() != vertices.dim() or faces.shape[-1] != 3:
        raise ValueError(
            f"faces must have shape {(*batch_shape, 'F', 3)} to match vertices {tuple(vertices.shape)}, "
            f"got {tuple(faces.shape)}")
    if faces.dtype != torch.int64 or permutation.dtype != torch.int64:
        raise ValueError(f"faces and permutation must be int64, got {faces.dtype} and {permutation.dtype}")
    if permutation.shape != (*batch_shape, num_vertices):
        raise ValueError(
            f"permutation must have shape {(*batch_shape, num_vertices)} to match vertices "
            f"{tuple(vertices.shape)}, got {tuple(permutation.shape)}")
    identity = torch.arange(num_vertices, device=permutation.device).expand_as(permutation)  # (..., V)
    if not torch.equal(permutation.sort(dim=-1).values, identity):
        raise ValueError("permutation must hold every vertex index 0..V-1 exactly once per mesh")
    return permute_mesh_unchecked(vertices, faces, permutation)


def permute_mesh_unchecked(
    vertices: torch.Tensor, faces: torch.Tensor, permutation: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """permute_mesh without its input checks, for hot paths whose permutations come from argsort.

    Same arguments and returns as permute_mesh; no host synchronisation on a GPU.
    """
    identity = torch.arange(permutation.shape[-1], device=permutation.device).expand_as(permutation)  # (..., V)
    permuted_vertices = torch.gather(vertices, -2, permutation.unsqueeze(-1).expand_as(vertices))  # (..., V, 3)
    inverse = torch.empty_like(permutation).scatter_(-1, permutation, identity)  # (..., V)
    permuted_faces = torch.gather(inverse, -1, faces.flatten(-2)).view_as(faces)  # (..., F, 3)
    return permuted_vertices, permuted_faces
