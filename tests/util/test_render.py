"""Tests for util/render.py: coverage against a naive point-in-triangle rasteriser, hidden surfaces and
shading against the Lambert definition, the view frames, and the written PNG."""
from __future__ import annotations

import numpy as np
import pytest
import trimesh
from PIL import Image, ImageFont

from tests.tiny_data import posed_ellipsoid
from util.render import (AMBIENT, BASE_COLOUR, CAMERAS, LIGHT, TITLE_HEIGHT, choose_view, fit_title,
                         project_to_panel, render_grid, render_side_by_side)

SIZE = (160, 200)
WHITE_LIMIT = 250  # a pixel with every channel above this counts as background


def _read(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(int)  # (H, W, 3)


def _drawn(pixels: np.ndarray) -> np.ndarray:
    """Mask of pixels that are not background, below the title band."""
    mask = (pixels < WHITE_LIMIT).any(axis=-1)
    mask[:TITLE_HEIGHT] = False
    return mask


def _covered_naive(pixel_points: np.ndarray, faces: np.ndarray, width: int, height: int) -> np.ndarray:
    """Pixels whose centre lies inside some projected triangle, one triangle at a time (sign tests)."""
    columns, rows = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    covered = np.zeros((height, width), dtype=bool)
    for face in faces:
        (x0, y0), (x1, y1), (x2, y2) = pixel_points[face, :2]
        signs = [(xb - xa) * (rows - ya) - (yb - ya) * (columns - xa)
                 for (xa, ya), (xb, yb) in (((x0, y0), (x1, y1)), ((x1, y1), (x2, y2)), ((x2, y2), (x0, y0)))]
        covered |= ((signs[0] >= 0) & (signs[1] >= 0) & (signs[2] >= 0)) | \
                   ((signs[0] <= 0) & (signs[1] <= 0) & (signs[2] <= 0))
    return covered


def _grow(mask: np.ndarray, pixels: int) -> np.ndarray:
    """The mask dilated by `pixels` in every direction (a square neighbourhood)."""
    padded = np.pad(mask, pixels)
    shifts = range(-pixels, pixels + 1)
    return np.any([padded[pixels + dr:pixels + dr + mask.shape[0], pixels + dc:pixels + dc + mask.shape[1]]
                   for dr in shifts for dc in shifts], axis=0)


def _lambert(normal: np.ndarray, camera: np.ndarray) -> np.ndarray:
    """The colour the module docstring defines for a face with this mesh-frame normal."""
    n = camera @ (normal / np.linalg.norm(normal))
    return np.rint(BASE_COLOUR * (AMBIENT + (1 - AMBIENT) * abs(n @ LIGHT)))


def _square(half: float, depth: float, tilt: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """A square in the XZ plane at y = depth, tilted by `tilt` radians about the X axis."""
    corners = np.array([[-half, 0, -half], [half, 0, -half], [half, 0, half], [-half, 0, half]])
    c, s = np.cos(tilt), np.sin(tilt)
    rotation = np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    return corners @ rotation.T + [0, depth, 0], np.array([[0, 1, 2], [0, 2, 3]])


def _l_shape_z_up() -> tuple[np.ndarray, np.ndarray]:
    """A tall bar along Z with a foot towards +X at its bottom, thin along Y (our humans' frame)."""
    bar = trimesh.creation.box(extents=(0.2, 0.2, 2.0))
    foot = trimesh.creation.box(extents=(0.6, 0.2, 0.2))
    foot.apply_translation((0.3, 0.0, -0.9))
    mesh = trimesh.util.concatenate([bar, foot])
    return np.asarray(mesh.vertices), np.asarray(mesh.faces)


@pytest.mark.parametrize("subdivisions, view_axis", [(1, "y"), (2, "z"), (3, "x")])
def test_coverage_matches_naive_rasteriser(tmp_path, subdivisions, view_axis):
    vertices, faces = posed_ellipsoid(2, 3, subdivisions)
    render_side_by_side([(vertices, faces)], ["m"], tmp_path / "m.png", size=SIZE, view_axis=view_axis)
    drawn = _drawn(_read(tmp_path / "m.png"))
    naive = _covered_naive(project_to_panel(vertices, CAMERAS[view_axis], *SIZE), faces, *SIZE)
    # Anti-aliasing and the outline drawn against cracks colour pixels whose centre is just outside,
    # up to two pixels at a sharp tip; nothing further.
    assert naive.sum() > 1000
    assert not (drawn & ~_grow(naive, 2)).any()
    assert not (naive & ~_grow(drawn, 1)).any()
    assert (drawn == naive).mean() > 0.97


@pytest.mark.parametrize("tilted_in_front", [False, True])
def test_nearer_face_hides_farther_with_lambert_colours(tmp_path, tilted_in_front):
    # Camera "y" looks from -Y, so the more negative y is nearer.
    flat = _square(0.5, -1.0 if not tilted_in_front else 1.0)
    tilted = _square(1.0, 1.0 if not tilted_in_front else -1.0, tilt=np.pi / 4)
    vertices = np.vstack([flat[0], tilted[0]])
    faces = np.vstack([flat[1], tilted[1] + 4])
    render_side_by_side([(vertices, faces)], ["m"], tmp_path / "m.png", size=SIZE, view_axis="y")
    pixels = _read(tmp_path / "m.png")
    points = project_to_panel(vertices, CAMERAS["y"], *SIZE)
    centre = points[:4, :2].mean(axis=0).astype(int)  # the middle of the flat square, where both overlap
    flat_colour = _lambert(np.array([0.0, 1.0, 0.0]), CAMERAS["y"])
    tilted_colour = _lambert(np.array([0.0, np.cos(np.pi / 4), np.sin(np.pi / 4)]), CAMERAS["y"])
    assert np.abs(flat_colour - tilted_colour).max() > 20  # the test can tell them apart
    expected = tilted_colour if tilted_in_front else flat_colour
    assert np.abs(pixels[centre[1], centre[0]] - expected).max() <= 1
    side = ((points[5, :2] + points[6, :2]) / 2 * 0.9 + centre * 0.1).astype(int)  # tilted square only
    assert np.abs(pixels[side[1], side[0]] - tilted_colour).max() <= 1


def test_front_views_of_z_up_and_y_up_frames_agree(tmp_path):
    vertices, faces = _l_shape_z_up()
    y_up = vertices[:, [0, 2, 1]] * [1, 1, -1]  # Y up, front +Z: (x, y, z) -> (x, z, -y)
    assert choose_view([(vertices, faces)]) == "y" and choose_view([(y_up, faces)]) == "z"
    render_side_by_side([(vertices, faces)], ["z up"], tmp_path / "z.png", size=SIZE)
    render_side_by_side([(y_up, faces)], ["y up"], tmp_path / "y.png", size=SIZE)
    z_up_mask, y_up_mask = _drawn(_read(tmp_path / "z.png")), _drawn(_read(tmp_path / "y.png"))
    assert (z_up_mask == y_up_mask).mean() > 0.99
    rows, columns = np.nonzero(z_up_mask)
    assert np.ptp(rows) > 2 * np.ptp(columns)  # upright
    bottom = columns[rows > rows.max() - 0.05 * np.ptp(rows)]
    assert bottom.mean() > columns.mean() + 0.2 * np.ptp(columns)  # the +X foot is on the right


def test_choose_view_weighs_meshes_by_their_own_size():
    thin = {axis: np.diag([1.0, 1.0, 1.0]) for axis in "xyz"}
    for k, axis in enumerate("xyz"):
        thin[axis][k, k] = 0.1
        box = trimesh.creation.box(extents=np.diag(thin[axis]))
        assert choose_view([(np.asarray(box.vertices), np.asarray(box.faces))]) == axis
    small = trimesh.creation.box(extents=(1.0, 0.1, 1.0))
    huge = trimesh.creation.box(extents=(99.0, 100.0, 100.0))
    meshes = [(np.asarray(m.vertices), np.asarray(m.faces)) for m in (small, huge)]
    assert choose_view(meshes) == "y"  # summed raw extents would pick x


def test_picture_has_one_titled_panel_per_mesh(tmp_path):
    meshes = [posed_ellipsoid(i, i, 2) for i in range(3)] + [(posed_ellipsoid(0, 0, 1)[0], np.zeros((0, 3), int))]
    path = tmp_path / "deep" / "side.png"
    render_side_by_side(meshes, ["identity", "pose", "output", "points only"], path, size=SIZE)
    pixels = _read(path)
    assert pixels.shape == (SIZE[1], 4 * SIZE[0], 3)
    for k in range(4):
        panel = pixels[:, k * SIZE[0]:(k + 1) * SIZE[0]]
        assert _drawn(panel).sum() > 200, k
        assert (panel[:TITLE_HEIGHT].max(axis=-1) < 128).any(), k  # dark title text
    assert [p.name for p in path.parent.iterdir()] == ["side.png"]  # no temporary file left


def test_grid_has_rows_of_panels_and_leaves_short_rows_blank(tmp_path):
    rows = [[posed_ellipsoid(0, 0, 2), posed_ellipsoid(1, 1, 2)], [posed_ellipsoid(2, 2, 2)]]
    path = tmp_path / "grid.png"
    render_grid(rows, [["a", "b"], ["c"]], path, size=SIZE)
    pixels = _read(path)
    assert pixels.shape == (2 * SIZE[1], 2 * SIZE[0], 3)
    panels = {(r, c): pixels[r * SIZE[1]:(r + 1) * SIZE[1], c * SIZE[0]:(c + 1) * SIZE[0]]
              for r in range(2) for c in range(2)}
    for key in ((0, 0), (0, 1), (1, 0)):
        assert _drawn(panels[key]).sum() > 200, key
    assert not _drawn(panels[1, 1]).any()
    with pytest.raises(ValueError, match="one title row per mesh row"):
        render_grid(rows, [["a", "b"]], tmp_path / "bad.png", size=SIZE)


def test_long_titles_are_shortened_to_the_panel():
    font = ImageFont.load_default(size=14)
    assert fit_title("short", font, 100) == "short"
    shortened = fit_title("output " + "very_long_name_" * 10 + ".obj", font, 100)
    assert shortened.startswith("output ") and shortened.endswith("...") and font.getlength(shortened) <= 100


def test_overwrites_an_existing_picture(tmp_path):
    path = tmp_path / "m.png"
    path.write_bytes(b"old")
    render_side_by_side([posed_ellipsoid(0, 0, 1)], ["m"], path, size=SIZE)
    assert _drawn(_read(path)).any()


@pytest.mark.parametrize("meshes, titles, path, view_axis, message", [
    ([posed_ellipsoid(0, 0)], ["a", "b"], "m.png", None, "one title per mesh"),
    ([], [], "m.png", None, "at least one mesh"),
    ([posed_ellipsoid(0, 0)], ["a"], "m.jpg", None, "must end in .png"),
    ([(np.full((3, 3), np.nan), np.array([[0, 1, 2]]))], ["a"], "m.png", None, "finite vertices"),
    ([(np.eye(3), np.array([[0, 1, 3]]))], ["a"], "m.png", None, "indexing its 3 vertices"),
    ([posed_ellipsoid(0, 0)], ["a"], "m.png", "w", "view_axis must be one of"),
])
def test_bad_arguments_raise_one_line(tmp_path, meshes, titles, path, view_axis, message):
    with pytest.raises(ValueError, match=message):
        render_side_by_side(meshes, titles, tmp_path / path, view_axis=view_axis)
    assert not list(tmp_path.iterdir())
