"""A procedural four-legged animal with linear blend skinning: an animal data set anyone can make.

This is not SMAL and is not fitted to any scan. It is a parametric toy quadruped, built so that the
animal pipeline (layout "animal", toy_{i}_{p}.ply) can be trained and tested without a licensed model.

Skeleton (27 joints, frame: x forward, y up, z lateral; the animal's left side is -z): root (pelvis),
three spine joints up to the chest, two neck joints and the head, four tail joints, and four legs of
four joints each (shoulder/hip, elbow/knee, wrist/hock, paw).

Surface: one closed, consistently oriented triangle mesh of fixed topology. A generalized cylinder
(elliptic rings along a Catmull-Rom curve through "knots") runs from the tail tip over the rump, torso,
neck and head to the nose; each leg is a second such tube. A leg is sewn into the body: a 4 x 4 patch of
body quads on the lower flank is removed and the patch's 16 boundary vertices are the leg tube's first
ring, so body and legs form a single watertight surface. Caps are single pole vertices. Knot positions
and radii are simple formulas of the shape parameters, so every shape has the same vertices and faces:
3874 vertices and 7744 triangles (SMAL has 3889 vertices), set by RING_SPACING.

Shape parameters (S = 7): natural logs of scale factors relative to the canonical animal (all zeros):
body_length, girth, leg_length, leg_thickness, neck_length, tail_length, head_size.

Skinning weights are computed once on the canonical animal from distances to bone segments (a softmin
with a 2 cm temperature, normalised): body vertices see the spine, neck, head and tail bones, leg
vertices their own leg's bones, and body vertices around each leg's patch blend smoothly (50 % at the
seam) into the leg's top joint so the skin stretches instead of tearing when a leg swings.

Poses: axis-angle per joint (P = 81), root at rest; "random" poses swing legs fore and aft, bend elbows,
knees, wrists and hocks, bend the spine and move neck, head and tail; "straight" poses stand with small
variations (data/sources/lbs.py `sample_pose_set`).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from data.sources.base import BodySource
from data.sources.lbs import (JointRanges, axis_angle_labels, axis_angle_to_matrix, check_parameters,
                              pose_rest_mesh, sample_pose_set)

SHAPE_LABELS = ("body_length", "girth", "leg_length", "leg_thickness", "neck_length", "tail_length", "head_size")
# Scale-factor ranges identities are drawn from (log-uniformly), per shape parameter.
SHAPE_FACTOR_RANGES = {
    "body_length": (0.8, 1.25),
    "girth": (0.75, 1.35),
    "leg_length": (0.65, 1.45),
    "leg_thickness": (0.7, 1.4),
    "neck_length": (0.6, 1.6),
    "tail_length": (0.3, 1.8),
    "head_size": (0.75, 1.3),
}

JOINT_NAMES = (
    "root", "spine1", "spine2", "chest", "neck1", "neck2", "head", "tail1", "tail2", "tail3", "tail4",
    "L_shoulder", "L_elbow", "L_wrist", "L_front_paw", "R_shoulder", "R_elbow", "R_wrist", "R_front_paw",
    "L_hip", "L_knee", "L_hock", "L_hind_paw", "R_hip", "R_knee", "R_hock", "R_hind_paw")
PARENTS = (-1, 0, 1, 2, 3, 4, 5, 0, 7, 8, 9, 3, 11, 12, 13, 3, 15, 16, 17, 0, 19, 20, 21, 0, 23, 24, 25)
# Legs in tube order: (top joint, side: -1 left / +1 right, front leg?).
LEGS = ((11, -1.0, True), (15, 1.0, True), (19, -1.0, False), (23, 1.0, False))

# Mesh resolution: body rings have 32 vertices; a leg's rings have 16, the boundary of a 4 x 4 patch.
BODY_RING = 32
PATCH = 4
# Patch centre column per side: theta = 2 pi j / BODY_RING from the top, 135 degrees on the +z flank.
PATCH_COLUMN = {1.0: 12, -1.0: 20}
RING_SPACING = 0.0277
HIND_PATCH_KNOT, FRONT_PATCH_KNOT = 7, 10
SKIN_TEMPERATURE = 0.02


def _leg_ranges(swing: tuple[float, float], abduct: float, mid: tuple[float, float], low: tuple[float, float],
                paw: float) -> dict[str, tuple[tuple[float, float], ...]]:
    """Degrees for a leg's four joints; z rotations swing forward (+) and back, x rotations abduct."""
    return {"top": ((-abduct, abduct), (-abduct / 2, abduct / 2), swing),
            "mid": ((0.0, 0.0), (0.0, 0.0), mid),
            "low": ((0.0, 0.0), (0.0, 0.0), low),
            "paw": ((0.0, 0.0), (0.0, 0.0), (-paw, paw))}


def _pose_ranges(scale: float, front: dict, hind: dict) -> JointRanges:
    """Per-joint degrees: spine/neck/head/tail ranges scaled by `scale`, the legs as given."""
    spine = ((-5.0 * scale, 5.0 * scale), (-10.0 * scale, 10.0 * scale), (-10.0 * scale, 10.0 * scale))
    neck = ((-8.0 * scale, 8.0 * scale), (-25.0 * scale, 25.0 * scale), (-25.0 * scale, 25.0 * scale))
    tail = ((0.0, 0.0), (-30.0 * scale, 30.0 * scale), (-30.0 * scale, 30.0 * scale))
    ranges: JointRanges = {1: spine, 2: spine, 3: spine, 4: neck, 5: neck, 6: neck, 7: tail, 8: tail, 9: tail,
                           10: tail}
    for top, _, is_front in LEGS:
        leg = front if is_front else hind
        for offset, part in enumerate(("top", "mid", "low", "paw")):
            ranges[top + offset] = leg[part]
    return ranges


# Elbows, wrists and knees flex backwards (negative z), hocks forwards, as in a standing dog.
RANDOM_RANGES = _pose_ranges(1.0, _leg_ranges((-35.0, 45.0), 8.0, (-70.0, 5.0), (-60.0, 5.0), 20.0),
                             _leg_ranges((-35.0, 45.0), 8.0, (-60.0, 5.0), (-5.0, 60.0), 20.0))
STRAIGHT_RANGES = _pose_ranges(0.3, _leg_ranges((-10.0, 10.0), 3.0, (-15.0, 3.0), (-10.0, 3.0), 5.0),
                               _leg_ranges((-10.0, 10.0), 3.0, (-15.0, 3.0), (-3.0, 15.0), 5.0))


# ---------------------------------------------------------------------------------------------------
# Rest geometry as a function of shape
# ---------------------------------------------------------------------------------------------------

def _direction(degrees: float) -> tuple[float, float]:
    return math.cos(math.radians(degrees)), math.sin(math.radians(degrees))


def _point(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return torch.stack(torch.broadcast_tensors(x, y, z), dim=-1)  # (B, 3)


def _knot(point: torch.Tensor, radius_vertical: torch.Tensor, radius_lateral: torch.Tensor) -> torch.Tensor:
    """A tube knot: centre (B, 3) and its two radii (B,), packed as (B, 5)."""
    radii = torch.stack(torch.broadcast_tensors(radius_vertical, radius_lateral), dim=-1)  # (B, 2)
    return torch.cat([point, radii], dim=-1)


# Leg shapes: (forward offset, height as a fraction from paw to body) of the middle (elbow/knee) and
# lower (wrist/hock) joints in units of the visible leg length, the paw's forward offset, and the radii of
# the top and middle rings in leg radii. Front legs are straight, hind legs zigzag (knee forward, hock back).
LEG_PROFILES = {
    "front": {"mid": (-0.06, 0.6), "low": (0.0, 0.18), "paw": 0.02, "top_radius": 1.15, "mid_radius": 0.9},
    "hind": {"mid": (0.12, 0.65), "low": (-0.14, 0.3), "paw": -0.09, "top_radius": 1.3, "mid_radius": 1.0},
}


def _leg(x: torch.Tensor, centre_y: torch.Tensor, body_radius: torch.Tensor, z: torch.Tensor,
         leg_radius: torch.Tensor, profile: dict) -> tuple[list[torch.Tensor], torch.Tensor]:
    """One leg below a body ring of centre height centre_y and vertical radius body_radius, at (x, z).

    The top joint sits inside the body; the tube starts where the leg leaves the body's underside and
    ends in a paw resting on the ground (y = 0).

    Returns:
        joints: 4 tensors (B, 3), top to paw; knots: (B, 6, 5), the last a pole at the toe tip.
    """
    zero = torch.zeros_like(leg_radius)
    paw_y = 0.9 * leg_radius
    out_y = centre_y - 1.02 * body_radius
    visible = out_y - paw_y

    def at(forward: float, fraction: float) -> torch.Tensor:
        return _point(x + forward * visible, paw_y + fraction * visible, z)

    mid, low, paw = at(*profile["mid"]), at(*profile["low"]), at(profile["paw"], 0.0)
    knots = torch.stack([
        _knot(at(0.0, 1.0), profile["top_radius"] * leg_radius, profile["top_radius"] * leg_radius),
        _knot(mid, profile["mid_radius"] * leg_radius, profile["mid_radius"] * leg_radius),
        _knot(low, 0.6 * leg_radius, 0.6 * leg_radius),
        _knot(paw, 0.62 * leg_radius, 0.62 * leg_radius),
        _knot(paw + _point(leg_radius, -0.35 * leg_radius, zero), 0.5 * leg_radius, 0.5 * leg_radius),
        _knot(paw + _point(1.6 * leg_radius, -0.45 * leg_radius, zero), zero, zero),
    ], dim=1)  # (B, 6, 5)
    return [_point(x, centre_y - 0.35 * body_radius, z), mid, low, paw], knots


def rest_skeleton(factors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rest-pose joints and tube knots of quadrupeds with the given proportions.

    Args:
        factors: float (B, 7) positive scale factors, SHAPE_LABELS order (1 = canonical animal, about
            2.1 m from tail tip to nose, 0.77 m high at the back).
    Returns:
        joints: (B, 27, 3).
        body_knots: (B, 19, 5) along the body tube from tail tip to nose tip: x, y, z, vertical and
            lateral radius; the first and last have radius 0 (the poles).
        leg_knots: (B, 4, 6, 5), per leg from where it leaves the body to the toe tip (radius 0).
    """
    body_length, girth, leg_length, leg_thickness, neck_length, tail_length, head_size = factors.unbind(-1)
    zero = torch.zeros_like(girth)
    torso = 0.9 * body_length
    radius_v, radius_l = 0.16 * girth, 0.13 * girth
    rump = 1.1 * radius_v
    height = 0.55 * leg_length + 0.35 * radius_v  # of the body axis above the ground
    tail_radius = 0.03 * girth.sqrt()
    neck_radius = 0.075 * (girth * head_size).sqrt()
    skull = 0.085 * head_size
    tail_len, neck_len, head_len = 0.5 * tail_length, 0.35 * neck_length, 0.28 * head_size

    def offset(origin: torch.Tensor, direction: tuple[float, float], distance: torch.Tensor) -> torch.Tensor:
        return origin + _point(direction[0] * distance, direction[1] * distance, zero)

    root = _point(zero, height, zero)
    spine1 = _point(torso / 3, height + 0.02 * radius_v, zero)
    spine2 = _point(2 * torso / 3, height + 0.02 * radius_v, zero)
    chest_radius = 1.12 * radius_v  # a deeper chest than belly
    chest = _point(torso, height - 0.05 * radius_v, zero)
    neck1 = chest + _point(0.7 * rump, 0.35 * radius_v, zero)
    neck2 = offset(neck1, _direction(50.0), 0.5 * neck_len)
    head = offset(neck1, _direction(50.0), neck_len)
    tail1 = _point(-0.95 * rump, height + 0.3 * radius_v, zero)
    tails = [offset(tail1, _direction(200.0), k / 4 * tail_len) for k in range(5)]  # tail1..tail4, tip

    def at_head(fraction: float) -> torch.Tensor:
        return offset(head, _direction(-30.0), fraction * head_len)

    body_knots = torch.stack([
        _knot(tails[4], zero, zero),
        _knot(tails[3], 0.45 * tail_radius, 0.45 * tail_radius),
        _knot(tails[2], 0.6 * tail_radius, 0.6 * tail_radius),
        _knot(tails[1], 0.8 * tail_radius, 0.8 * tail_radius),
        _knot(tails[0], tail_radius, tail_radius),
        _knot(_point(-0.8 * rump, height + 0.15 * radius_v, zero), 0.55 * radius_v, 0.55 * radius_l),
        _knot(_point(-0.45 * rump, height + 0.04 * radius_v, zero), 0.9 * radius_v, 0.9 * radius_l),
        _knot(root, radius_v, radius_l),
        _knot(spine1, 0.88 * radius_v, 0.93 * radius_l),
        _knot(spine2, 1.02 * radius_v, radius_l),
        _knot(chest, chest_radius, 1.02 * radius_l),
        _knot(chest + _point(0.5 * rump, 0.15 * radius_v, zero), 0.85 * radius_v, 0.85 * radius_l),
        _knot(neck1, 1.25 * neck_radius, 1.15 * neck_radius),
        _knot(neck2, neck_radius, neck_radius),
        _knot(head, 0.85 * skull, 0.8 * skull),
        _knot(at_head(0.3), skull, 0.9 * skull),
        _knot(at_head(0.7), 0.5 * skull, 0.5 * skull),
        _knot(at_head(1.0), 0.35 * skull, 0.35 * skull),
        _knot(at_head(1.08), zero, zero),
    ], dim=1)  # (B, 19, 5)

    leg_radius = 0.05 * leg_thickness
    leg_joints, leg_knots = [], []
    for _, side, is_front in LEGS:
        x, centre_y, local_radius = (torso, chest[:, 1], chest_radius) if is_front else (zero, height, radius_v)
        top_to_paw, knots = _leg(x, centre_y, local_radius, side * 0.6 * radius_l, leg_radius,
                             LEG_PROFILES["front" if is_front else "hind"])
        leg_joints += top_to_paw
        leg_knots.append(knots)
    joints = torch.stack([root, spine1, spine2, chest, neck1, neck2, head, *tails[:4], *leg_joints],
                         dim=1)  # (B, 27, 3)
    return joints, body_knots, torch.stack(leg_knots, dim=1)


# ---------------------------------------------------------------------------------------------------
# Tubes: rings along Catmull-Rom curves through the knots
# ---------------------------------------------------------------------------------------------------

def _ring_parameters(knots: np.ndarray) -> np.ndarray:
    """Curve parameters u of a tube's rings: segment k gets about length / RING_SPACING rings (at least 2).

    Args:
        knots: (P, 5) canonical knots.
    Returns:
        float64 (R,) increasing from 0 to P - 1; u = k is knot k. The first and last are the end rings.
    """
    lengths = np.linalg.norm(np.diff(knots[:, :3], axis=0), axis=1)
    counts = np.maximum(2, np.round(lengths / RING_SPACING).astype(int))
    return np.concatenate([k + np.arange(n) / n for k, n in enumerate(counts)] + [[len(knots) - 1.0]])


def _catmull_rom(parameters: np.ndarray, num_knots: int) -> tuple[np.ndarray, np.ndarray]:
    """Uniform Catmull-Rom interpolation and its derivative as matrices over the knots.

    Args:
        parameters: (R,) curve parameters in [0, P - 1].
        num_knots: P.
    Returns:
        values, slopes: float64 (R, P) each; values @ knots is the curve, slopes @ knots its tangent.
    """
    segment = np.minimum(np.floor(parameters).astype(int), num_knots - 2)
    s = (parameters - segment)[:, None]
    basis = 0.5 * np.concatenate([-s**3 + 2 * s**2 - s, 3 * s**3 - 5 * s**2 + 2,
                                  -3 * s**3 + 4 * s**2 + s, s**3 - s**2], axis=1)  # (R, 4)
    slope = 0.5 * np.concatenate([-3 * s**2 + 4 * s - 1, 9 * s**2 - 10 * s,
                                  -9 * s**2 + 8 * s + 1, 3 * s**2 - 2 * s], axis=1)  # (R, 4)
    columns = np.clip(segment[:, None] + np.arange(-1, 3), 0, num_knots - 1)  # (R, 4); the ends repeat
    rows = np.repeat(np.arange(len(parameters)), 4)
    values = np.zeros((len(parameters), num_knots))
    slopes = np.zeros((len(parameters), num_knots))
    np.add.at(values, (rows, columns.ravel()), basis.ravel())
    np.add.at(slopes, (rows, columns.ravel()), slope.ravel())
    return values, slopes


def _ring_frames(values: torch.Tensor, slopes: torch.Tensor,
                 knots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Centres, radii and in-plane normals of a tube's rings.

    Every tube lies in a plane z = const, so a ring's frame is its normal n (the tangent turned by
    +90 degrees about z) and z itself.

    Args:
        values, slopes: (R, P) from `_catmull_rom`.
        knots: (..., P, 5).
    Returns:
        centres (..., R, 3), radii (..., R, 2) (vertical, lateral; >= 0), normals (..., R, 3).
    """
    rings = values @ knots  # (..., R, 5)
    tangents = slopes @ knots[..., :3]  # (..., R, 3)
    normals = torch.stack([-tangents[..., 1], tangents[..., 0], torch.zeros_like(tangents[..., 0])], dim=-1)
    return rings[..., :3], rings[..., 3:].clamp(min=0.0), torch.nn.functional.normalize(normals, dim=-1)


def _place(centres: torch.Tensor, radii: torch.Tensor, normals: torch.Tensor, ring: torch.Tensor,
           cos_coef: torch.Tensor, sin_coef: torch.Tensor) -> torch.Tensor:
    """Vertices c + cos(a) r_v n + sin(a) r_l z of their rings.

    Args:
        centres, radii, normals: (B, R, 3), (B, R, 2), (B, R, 3) from `_ring_frames`.
        ring: long (V,) ring of each vertex; cos_coef, sin_coef: (V,) its angle's cosine and sine.
    Returns:
        (B, V, 3).
    """
    lateral = centres.new_tensor([0.0, 0.0, 1.0])
    return (centres[:, ring] + (cos_coef * radii[:, ring, 0])[..., None] * normals[:, ring]
            + (sin_coef * radii[:, ring, 1])[..., None] * lateral)  # (B, V, 3)


def _band(first: np.ndarray, second: np.ndarray, skip: frozenset[int] = frozenset()) -> list[tuple[int, ...]]:
    """Outward triangles between consecutive rings of a tube; a ring of one vertex is a pole.

    Rings follow the tube's tangent t and their vertices go by increasing angle from n towards z, so
    (next vertex on the ring - vertex) x t points outwards: quads (a_j, a_j+1, b_j+1), (a_j, b_j+1, b_j).

    Args:
        first, second: vertex ids of the two rings.
        skip: quads j (between vertices j and j + 1) to leave open.
    """
    if len(first) == 1:
        return [(first[0], second[(j + 1) % len(second)], second[j]) for j in range(len(second))]
    if len(second) == 1:
        return [(first[j], first[(j + 1) % len(first)], second[0]) for j in range(len(first))]
    count = len(first)
    triangles = []
    for j in range(count):
        if j not in skip:
            after = (j + 1) % count
            triangles += [(first[j], first[after], second[after]), (first[j], second[after], second[j])]
    return triangles


# ---------------------------------------------------------------------------------------------------
# Fixed topology and skinning weights, built once from the canonical animal
# ---------------------------------------------------------------------------------------------------

class _Mesh(NamedTuple):
    """The quadruped's topology: faces, each vertex's ring and angle, and where each leg is sewn on."""

    faces: np.ndarray  # int64 (F, 3)
    ring: np.ndarray  # int64 (V,): body rings first, then leg 0's rings, leg 1's, ...
    cos_coef: np.ndarray  # float64 (V,)
    sin_coef: np.ndarray  # float64 (V,)
    leg: np.ndarray  # int64 (V,): the leg a vertex belongs to, -1 for the body
    seams: list[np.ndarray]  # per leg, the body vertices its first ring is made of


def _build_mesh(body_knots: torch.Tensor, leg_knots: torch.Tensor, body_u: np.ndarray, leg_u: np.ndarray) -> _Mesh:
    """Rings, patches and faces of the canonical animal.

    Args:
        body_knots: float64 (19, 5); leg_knots: float64 (4, 6, 5), canonical.
        body_u, leg_u: ring parameters from `_ring_parameters`.
    """
    ring, cos_coef, sin_coef = [], [], []

    def add_ring(index: int, angles: np.ndarray | None) -> np.ndarray:
        start = len(ring)
        count = 1 if angles is None else len(angles)
        ring.extend([index] * count)
        cos_coef.extend(np.zeros(1) if angles is None else np.cos(angles))
        sin_coef.extend(np.zeros(1) if angles is None else np.sin(angles))
        return np.arange(start, start + count)

    theta = 2 * np.pi * np.arange(BODY_RING) / BODY_RING
    last_body = len(body_u) - 1
    body_rings = [add_ring(r, None if r in (0, last_body) else theta) for r in range(len(body_u))]
    body_frames = _ring_frames(*(torch.as_tensor(m) for m in _catmull_rom(body_u, len(body_knots))), body_knots)
    body_points = _place(*(t[None] for t in body_frames), torch.as_tensor(ring), torch.as_tensor(cos_coef),
                         torch.as_tensor(sin_coef))[0].numpy()
    leg_centres, _, leg_normals = _ring_frames(
        *(torch.as_tensor(m) for m in _catmull_rom(leg_u, leg_knots.shape[1])), leg_knots)

    open_quads: dict[int, set[int]] = {}
    leg_rings = []
    for leg, (_, side, is_front) in enumerate(LEGS):
        centre = int(np.flatnonzero(body_u == (FRONT_PATCH_KNOT if is_front else HIND_PATCH_KNOT))[0])
        first_ring, first_column = centre - PATCH // 2, PATCH_COLUMN[side] - PATCH // 2
        for r in range(first_ring, first_ring + PATCH):
            open_quads.setdefault(r, set()).update(range(first_column, first_column + PATCH))
        boundary = [(first_ring + i, first_column + j) for i in range(PATCH + 1) for j in range(PATCH + 1)
                    if i in (0, PATCH) or j in (0, PATCH)]
        # Order the patch boundary by angle about the leg's first ring, in the leg tube's (n, z) frame,
        # so that it serves as the tube's ring 0 and the leg's rings take the same angles.
        offsets = body_points[[body_rings[r][j] for r, j in boundary]] - leg_centres[leg, 0].numpy()
        angles = np.arctan2(offsets[:, 2], offsets @ leg_normals[leg, 0].numpy())
        order = np.argsort(angles)
        cells = [boundary[k] for k in order]
        steps = [abs(a[0] - b[0]) + abs(a[1] - b[1]) for a, b in zip(cells, cells[1:] + cells[:1])]
        assert steps == [1] * len(cells), "the patch boundary is not star-shaped about the leg axis"
        seam = np.array([body_rings[r][j] for r, j in cells])
        leg_rings.append([seam] + [add_ring(len(body_u) + leg * len(leg_u) + r,
                                            None if r == len(leg_u) - 1 else angles[order])
                                   for r in range(len(leg_u))])

    faces = []
    for r in range(last_body):
        faces += _band(body_rings[r], body_rings[r + 1], frozenset(open_quads.get(r, ())))
    for rings in leg_rings:
        for first, second in zip(rings[:-1], rings[1:]):
            faces += _band(first, second)
    leg_of_vertex = np.full(len(ring), -1)
    for leg, rings in enumerate(leg_rings):
        leg_of_vertex[np.concatenate(rings[1:])] = leg

    # The patch interiors are used by no face: drop them and renumber.
    faces = np.asarray(faces, dtype=np.int64)
    used = np.unique(faces)
    renumber = np.full(len(ring), -1, dtype=np.int64)
    renumber[used] = np.arange(len(used))
    return _Mesh(renumber[faces], np.asarray(ring)[used], np.asarray(cos_coef)[used], np.asarray(sin_coef)[used],
                 leg_of_vertex[used], [renumber[rings[0]] for rings in leg_rings])


def _segment_distances(points: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Distance of each point (N, 3) to each segment starts[k]-ends[k] (K, 3); returns (N, K)."""
    direction = ends - starts  # (K, 3)
    relative = points[:, None] - starts[None]  # (N, K, 3)
    along = np.clip((relative * direction).sum(-1) / (direction * direction).sum(-1), 0.0, 1.0)  # (N, K)
    return np.linalg.norm(relative - along[..., None] * direction, axis=-1)


def _softmin_weights(points: np.ndarray, starts: np.ndarray, ends: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Normalised exp(-(d - d_min) / SKIN_TEMPERATURE) over bones, summed per bone's joint; (N, J)."""
    distances = _segment_distances(points, starts, ends)  # (N, K)
    affinity = np.exp(-(distances - distances.min(axis=1, keepdims=True)) / SKIN_TEMPERATURE)
    weights = affinity @ np.eye(len(JOINT_NAMES))[labels]  # (N, J)
    return weights / weights.sum(axis=1, keepdims=True)


def _skinning_weights(mesh: _Mesh, rest: np.ndarray, joints: np.ndarray, body_knots: np.ndarray,
                      leg_knots: np.ndarray) -> np.ndarray:
    """Bone-distance skinning weights of the canonical animal, float64 (V, J), rows summing to 1.

    Args:
        mesh: the topology.
        rest: (V, 3) canonical rest vertices; joints: (J, 3); body_knots (19, 5), leg_knots (4, 6, 5).
    """
    # Body bones, labelled by the joint that moves them; the tips are the tube's end knots.
    labels = np.array([0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    ends = np.concatenate([joints[[1, 7, 2, 3, 4, 5, 6]], body_knots[-1:, :3], joints[[8, 9, 10]],
                           body_knots[:1, :3]])
    weights = np.zeros((len(rest), len(JOINT_NAMES)))
    is_body = mesh.leg == -1
    weights[is_body] = _softmin_weights(rest[is_body], joints[labels], ends, labels)
    seam_share = np.zeros(len(rest))
    seam_weights = np.zeros_like(weights)
    for leg, (top, _, _) in enumerate(LEGS):
        leg_labels = np.arange(top, top + 4)
        leg_ends = np.concatenate([joints[top + 1:top + 4], leg_knots[leg, -1:, :3]])
        mine = mesh.leg == leg
        weights[mine] = _softmin_weights(rest[mine], joints[leg_labels], leg_ends, leg_labels)
        # Body skin near the seam follows the leg's top joint: half at the seam, fading over one patch radius.
        centre = rest[mesh.seams[leg]].mean(axis=0)
        reach = np.linalg.norm(rest[mesh.seams[leg]] - centre, axis=1).max()
        beyond = np.maximum(0.0, np.linalg.norm(rest - centre, axis=1) - reach) / reach
        share = np.where(is_body, 0.5 * np.exp(-beyond**2), 0.0)
        seam_share += share
        seam_weights[:, top] += share
    return (1.0 - seam_share)[:, None] * weights + seam_weights


class QuadrupedSource(BodySource):
    """Procedural four-legged animals (not SMAL), skinned with linear blend skinning; animal layout.

    Args:
        device: where the model's tensors live.
    """

    name = "quadruped"
    layout = "animal"
    shape_labels = list(SHAPE_LABELS)

    def __init__(self, device: torch.device = torch.device("cpu")) -> None:
        joints, body_knots, leg_knots = (t[0] for t in rest_skeleton(torch.ones(1, len(SHAPE_LABELS),
                                                                               dtype=torch.float64)))
        body_u = _ring_parameters(body_knots.numpy())
        leg_u = _ring_parameters(leg_knots[0].numpy())
        mesh = _build_mesh(body_knots, leg_knots, body_u, leg_u)
        self.faces = mesh.faces
        self.num_vertices = len(mesh.ring)
        body_values, body_slopes = _catmull_rom(body_u, len(body_knots))
        leg_values, leg_slopes = _catmull_rom(leg_u, leg_knots.shape[1])
        self.buffers = {
            "body_values": torch.as_tensor(body_values), "body_slopes": torch.as_tensor(body_slopes),
            "leg_values": torch.as_tensor(leg_values), "leg_slopes": torch.as_tensor(leg_slopes),
            "ring": torch.as_tensor(mesh.ring), "cos_coef": torch.as_tensor(mesh.cos_coef),
            "sin_coef": torch.as_tensor(mesh.sin_coef),
        }
        # Weights come from the canonical animal in float64; the model then runs in float32.
        rest = self._rest_vertices(body_knots[None], leg_knots[None])[0].numpy()
        self.buffers["weights"] = torch.as_tensor(
            _skinning_weights(mesh, rest, joints.numpy(), body_knots.numpy(), leg_knots.numpy()))
        self.buffers = {key: value.float() if value.is_floating_point() else value
                        for key, value in self.buffers.items()}
        self.device = torch.device("cpu")
        self.to(device)

    def to(self, device: torch.device) -> "QuadrupedSource":
        self.device = torch.device(device)
        self.buffers = {key: value.to(self.device) for key, value in self.buffers.items()}
        return self

    def _rest_vertices(self, body_knots: torch.Tensor, leg_knots: torch.Tensor) -> torch.Tensor:
        """Rest-pose vertices (B, V, 3) from knots (B, 19, 5) and (B, 4, 6, 5) of the buffers' dtype."""
        buffers = self.buffers
        body = _ring_frames(buffers["body_values"], buffers["body_slopes"], body_knots)
        legs = _ring_frames(buffers["leg_values"], buffers["leg_slopes"], leg_knots)
        frames = [torch.cat([body_frame, leg_frame.flatten(1, 2)], dim=1)
                  for body_frame, leg_frame in zip(body, legs)]  # (B, R, .)
        return _place(*frames, buffers["ring"], buffers["cos_coef"], buffers["sin_coef"])

    def sample_identities(self, count: int, rng: np.random.Generator) -> np.ndarray:
        low, high = np.log(np.array([SHAPE_FACTOR_RANGES[label] for label in SHAPE_LABELS])).T
        return rng.uniform(low, high, size=(count, len(SHAPE_LABELS)))

    def sample_poses(self, count: int, rng: np.random.Generator) -> np.ndarray:
        return sample_pose_set(count, rng, RANDOM_RANGES, STRAIGHT_RANGES, len(JOINT_NAMES))

    def pose_labels(self) -> list[str]:
        return axis_angle_labels(JOINT_NAMES)

    def vertices(self, shape: torch.Tensor, pose: torch.Tensor) -> torch.Tensor:
        check_parameters(self.name, shape, pose, len(SHAPE_LABELS), 3 * len(JOINT_NAMES))
        shape = shape.to(self.device, torch.float32)
        pose = pose.to(self.device, torch.float32)
        joints, body_knots, leg_knots = rest_skeleton(shape.exp())
        rest = self._rest_vertices(body_knots, leg_knots)  # (B, V, 3)
        rotations = axis_angle_to_matrix(pose.unflatten(1, (len(JOINT_NAMES), 3)))  # (B, J, 3, 3)
        return pose_rest_mesh(rest, joints, rotations, PARENTS, self.buffers["weights"])
