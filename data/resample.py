"""One shared coarser topology for a whole generated data set: fixed barycentric points on the source surface.

The published human set has SMPL's 6890 vertices, while a body model such as Anny has 13,718. To give a
data set another vertex count we decimate the source's template mesh (its reference body in the rest
pose) with quadric edge collapse (Garland & Heckbert, SIGGRAPH 1997; the fast_simplification package),
then project every decimated vertex onto the template's surface, which fixes it as a source triangle and
barycentric weights. Every mesh of the set is resampled with the same triangles and weights, so all of
them share one vertex order and one face list, and a new vertex follows the body surface as it poses.

The result is a deterministic function of the template mesh and the requested count: no randomness, and
fast_simplification is single-threaded.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import fast_simplification
import numpy as np
import torch
from scipy.spatial import cKDTree

# At most this many decimation runs while searching the face budget that gives the requested vertex count.
_MAX_DECIMATION_TRIES = 24


@dataclass(frozen=True)
class Resampling:
    """New vertices as fixed barycentric points on source triangles, plus the triangles joining them.

    Attributes:
        corners: int64 (N, 3), the source vertices of the triangle each new vertex lies on.
        barycentric: float64 (N, 3), non-negative weights of those corners, summing to 1.
        faces: int64 (F, 3), triangles over the N new vertices.
    """

    corners: np.ndarray
    barycentric: np.ndarray
    faces: np.ndarray

    @property
    def num_vertices(self) -> int:
        return self.corners.shape[0]

    def apply(self, vertices: torch.Tensor) -> torch.Tensor:
        """Resample source meshes.

        Args:
            vertices: float (B, V, 3) on the source topology.
        Returns:
            float (B, N, 3), same dtype and device.
        """
        corners = torch.as_tensor(self.corners, device=vertices.device)
        weights = torch.as_tensor(self.barycentric, dtype=vertices.dtype, device=vertices.device)
        gathered = vertices[:, corners]  # (B, N, 3 corners, 3 xyz)
        return (weights[None, :, :, None] * gathered).sum(dim=2)  # (B, N, 3)


def closest_points_on_triangles(points: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """Barycentric coordinates of the point of each triangle closest to each point.

    Region tests after Ericson, "Real-Time Collision Detection" (2005), section 5.1.5, vectorised: the
    answer is a vertex, a point on an edge, or the interior projection, whichever region holds the point.

    Args:
        points: float64 (..., 3).
        triangles: float64 (..., 3 corners, 3 xyz), broadcastable against points.
    Returns:
        float64 (..., 3) weights of the three corners, non-negative, summing to 1.
    """
    a, b, c = triangles[..., 0, :], triangles[..., 1, :], triangles[..., 2, :]
    ab, ac = b - a, c - a
    ap, bp, cp = points - a, points - b, points - c
    d1, d2 = (ab * ap).sum(-1), (ac * ap).sum(-1)
    d3, d4 = (ab * bp).sum(-1), (ac * bp).sum(-1)
    d5, d6 = (ab * cp).sum(-1), (ac * cp).sum(-1)
    va, vb, vc = d3 * d6 - d5 * d4, d5 * d2 - d1 * d6, d1 * d4 - d3 * d2

    def ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
        safe = np.where(denominator == 0, 1.0, denominator)
        return np.where(denominator == 0, 0.0, numerator / safe)

    total = va + vb + vc
    v, w = ratio(vb, total), ratio(vc, total)
    weights = np.stack([1 - v - w, v, w], axis=-1)  # interior projection
    zero, one = np.zeros_like(d1), np.ones_like(d1)
    edge_ab, edge_ac = ratio(d1, d1 - d3), ratio(d2, d2 - d6)
    edge_bc = ratio(d4 - d3, (d4 - d3) + (d5 - d6))
    regions = [  # in Ericson's order: the first region that holds decides
        ((d1 <= 0) & (d2 <= 0), (one, zero, zero)),  # vertex a
        ((d3 >= 0) & (d4 <= d3), (zero, one, zero)),  # vertex b
        ((vc <= 0) & (d1 >= 0) & (d3 <= 0), (1 - edge_ab, edge_ab, zero)),  # edge ab
        ((d6 >= 0) & (d5 <= d6), (zero, zero, one)),  # vertex c
        ((vb <= 0) & (d2 >= 0) & (d6 <= 0), (1 - edge_ac, zero, edge_ac)),  # edge ac
        ((va <= 0) & (d4 - d3 >= 0) & (d5 - d6 >= 0), (zero, 1 - edge_bc, edge_bc)),  # edge bc
    ]
    for holds, corner_weights in reversed(regions):
        weights = np.where(holds[..., None], np.stack(corner_weights, axis=-1), weights)
    weights = np.clip(weights, 0.0, 1.0)  # rounding can leave -1e-17 on an edge
    return weights / weights.sum(axis=-1, keepdims=True)


def closest_points_on_mesh(
    points: np.ndarray, vertices: np.ndarray, faces: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Project points onto a triangle mesh: for each point, the closest face and barycentric weights.

    Exact, without testing every face: the nearest mesh corner bounds the distance from above, and a
    face can only hold a closer point if its centroid lies within that bound plus the face's radius
    (its largest centroid-to-corner distance). Ties go to the lower face index.

    Args:
        points: float64 (N, 3).
        vertices: float64 (V, 3).
        faces: int64 (F, 3).
    Returns:
        face_index: int64 (N,), into faces.
        barycentric: float64 (N, 3), weights of faces[face_index]'s corners.
    """
    points = np.asarray(points, dtype=np.float64)
    corners = np.asarray(vertices, dtype=np.float64)[faces]  # (F, 3, 3)
    centroids = corners.mean(axis=1)  # (F, 3)
    radii = np.linalg.norm(corners - centroids[:, None, :], axis=-1).max(axis=1)  # (F,)
    bound, _ = cKDTree(corners.reshape(-1, 3)).query(points)  # (N,)
    near = cKDTree(centroids).query_ball_point(points, bound + radii.max())
    counts = [len(found) for found in near]
    point_index = np.repeat(np.arange(len(points)), counts)
    face_index = np.fromiter(itertools.chain.from_iterable(near), dtype=np.int64, count=sum(counts))
    gap = np.linalg.norm(points[point_index] - centroids[face_index], axis=1) - radii[face_index]
    # The faces around the nearest corner always pass; the slack absorbs rounding in that argument.
    keep = gap <= bound[point_index] + 1e-9
    point_index, face_index = point_index[keep], face_index[keep]
    weights = closest_points_on_triangles(points[point_index], corners[face_index])  # (K, 3)
    closest = (weights[:, :, None] * corners[face_index]).sum(axis=1)  # (K, 3)
    distance = np.linalg.norm(closest - points[point_index], axis=1)  # (K,)
    order = np.lexsort((face_index, distance, point_index))  # by point, then distance, then face
    first = order[np.r_[True, point_index[order][1:] != point_index[order][:-1]]]
    return face_index[first], weights[first]


def _decimate(vertices: np.ndarray, faces: np.ndarray, num_vertices: int) -> tuple[np.ndarray, np.ndarray]:
    """Quadric decimation to the face budget whose result has the vertex count nearest num_vertices.

    Edge collapses remove about one vertex per two faces, so the budget moves by twice the vertex
    shortfall until the count is met or a budget repeats.
    """
    budget = round(len(faces) * num_vertices / len(vertices))
    tried: set[int] = set()
    best = None
    while budget not in tried and len(tried) < _MAX_DECIMATION_TRIES:
        tried.add(budget)
        points, triangles = fast_simplification.simplify(vertices, faces, target_count=budget)
        if best is None or abs(len(points) - num_vertices) < abs(len(best[0]) - num_vertices):
            best = (points, triangles.astype(np.int64))
        if len(points) == num_vertices:
            break
        budget = min(max(budget + 2 * (num_vertices - len(points)), 1), len(faces) - 1)
    return best


def build_resampling(template_vertices: np.ndarray, template_faces: np.ndarray, num_vertices: int) -> Resampling:
    """Build the shared topology of about num_vertices vertices on a template mesh.

    Args:
        template_vertices: float (V, 3), the source's reference body in the rest pose.
        template_faces: int64 (F, 3), the source's native triangles.
        num_vertices: the requested count, 4 <= num_vertices < V; the result is the nearest count
            quadric decimation reaches (usually exactly num_vertices).
    Returns:
        the Resampling; apply it to (B, V, 3) meshes of the same topology.
    """
    template_vertices = np.asarray(template_vertices, dtype=np.float64)
    template_faces = np.asarray(template_faces, dtype=np.int64)
    if not 4 <= num_vertices < len(template_vertices):
        raise ValueError(
            f"resampled vertex count must lie in [4, {len(template_vertices) - 1}] for a source with "
            f"{len(template_vertices)} vertices, got {num_vertices}")
    points, faces = _decimate(template_vertices, template_faces, num_vertices)
    face_index, barycentric = closest_points_on_mesh(points, template_vertices, template_faces)
    return Resampling(corners=template_faces[face_index], barycentric=barycentric, faces=faces)
