"""A headless CPU renderer for looking at pose-transfer results: meshes side by side in one PNG.

Each mesh gets its own panel: an orthographic view, scaled to fill the panel, flat Lambert shading per
face (two-sided, so inconsistent winding still shades), hidden surfaces resolved with the painter's
algorithm (faces drawn far to near by centroid depth), the title above, a white background. Panels are
drawn at SUPERSAMPLE times the size and downsampled for smooth edges. Only numpy and Pillow are used, so
it runs on any machine without OpenGL or a display: four meshes of 6890 vertices take about 0.15 s on one
CPU core.

The view. Our generated humans (data/sources/anny_source.py) are Z-up with their front towards -Y;
SMPL and SMAL data and our quadrupeds are Y-up and thin along Z. The camera looks along the axis on
which the meshes are thinnest (their extents summed, each mesh's scaled to its largest, so a large mesh
does not decide alone), or along `view_axis` when given, from the side CAMERAS names; every panel of a
picture shares that view:
    "y": from -Y, Z up: the front of a Z-up, -Y-facing human (Anny).
    "z": from +Z, Y up: the front of a Y-up, +Z-facing human (SMPL), the side of a quadruped.
    "x": from +X, Z up.
In the two front views the body's left (+X) appears on the right of the picture, as when facing someone.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from util.atomic import atomic_write

# Rows: the picture's right, the picture's up and the direction towards the camera, in mesh coordinates
# (right x up = towards, a right-handed frame).
CAMERAS = {
    "y": np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]]),
    "z": np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]),
    "x": np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]),
}
AXES = "xyz"
DEFAULT_SIZE = (320, 400)  # one panel, width x height in pixels
TITLE_HEIGHT = 24  # pixels at the top of each panel for the title
MARGIN = 8  # pixels kept free around the mesh
SUPERSAMPLE = 2  # panels are drawn this many times larger, then downsampled (anti-aliasing)
BASE_COLOUR = np.array([150.0, 180.0, 230.0])  # RGB of a face lit head-on
AMBIENT = 0.25  # share of BASE_COLOUR a face gets when it is lit edge-on
LIGHT = np.array([-0.3, 0.4, 1.0]) / np.linalg.norm([-0.3, 0.4, 1.0])  # camera frame: from upper left, front
POINT_RADIUS = 2  # pixels (supersampled) of a vertex drawn for a mesh without faces
TITLE_COLOUR = (30, 30, 30)
BACKGROUND = (255, 255, 255)


def choose_view(meshes: list[tuple[np.ndarray, np.ndarray]]) -> str:
    """The axis the camera looks along: the one on which the meshes are thinnest (see module docstring).

    Args:
        meshes: (vertices float (V, 3), faces int (F, 3)) pairs.
    Returns:
        "x", "y" or "z", a key of CAMERAS.
    """
    total = np.zeros(3)
    for vertices, _ in meshes:
        extent = np.ptp(vertices, axis=0)  # (3,)
        total += extent / max(extent.max(), np.finfo(np.float64).tiny)
    return AXES[int(np.argmin(total))]


def project_to_panel(vertices: np.ndarray, camera: np.ndarray, width: int, height: int) -> np.ndarray:
    """Orthographic projection of a mesh, scaled and centred to fill the drawing area of one panel.

    The drawing area is the panel less TITLE_HEIGHT at the top and MARGIN on every side; the mesh keeps
    its proportions and fills the area's width or height.

    Args:
        vertices: float (V, 3).
        camera: float (3, 3), a value of CAMERAS.
        width, height: the panel in pixels.
    Returns:
        float64 (V, 3): pixel column, pixel row (downwards) and depth towards the camera (in pixels;
        larger is nearer). Pixel (c, r) covers columns [c, c + 1) and rows [r, r + 1).
    """
    view = np.asarray(vertices, dtype=np.float64) @ camera.T  # (V, 3): right, up, towards the camera
    low, high = view.min(axis=0), view.max(axis=0)  # (3,)
    area = np.array([width - 2 * MARGIN, height - TITLE_HEIGHT - 2 * MARGIN], dtype=np.float64)
    span = high[:2] - low[:2]
    fits = area[span > 0] / span[span > 0]
    scale = fits.min() if fits.size else 1.0
    middle = (low + high) / 2
    column = width / 2 + (view[:, 0] - middle[0]) * scale
    row = TITLE_HEIGHT + MARGIN + area[1] / 2 - (view[:, 1] - middle[1]) * scale
    return np.stack([column, row, view[:, 2] * scale], axis=1)  # (V, 3)


def face_colours(points: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Flat two-sided Lambert shading: BASE_COLOUR x (AMBIENT + (1 - AMBIENT) |n . LIGHT|) per face.

    Args:
        points: float (V, 3) from `project_to_panel` (a mirror image of the camera frame, since rows
            grow downwards; the shading flips the row axis back).
        faces: int (F, 3).
    Returns:
        uint8 (F, 3) RGB; a zero-area face gets the ambient colour.
    """
    camera_frame = points * np.array([1.0, -1.0, 1.0])  # (V, 3): right, up, towards the camera
    corners = camera_frame[faces]  # (F, 3, 3)
    normals = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])  # (F, 3)
    lengths = np.linalg.norm(normals, axis=1, keepdims=True)  # (F, 1)
    normals = np.divide(normals, lengths, out=np.zeros_like(normals), where=lengths > 0)
    shade = AMBIENT + (1 - AMBIENT) * np.abs(normals @ LIGHT)  # (F,)
    return np.rint(shade[:, None] * BASE_COLOUR).astype(np.uint8)  # (F, 3)


def _validate_meshes(meshes: list[tuple[np.ndarray, np.ndarray]], titles: list[str]) -> None:
    if not meshes or len(meshes) != len(titles):
        raise ValueError(f"rendering needs one title per mesh and at least one mesh, got "
                         f"{len(meshes)} meshes and {len(titles)} titles")
    for title, (vertices, faces) in zip(titles, meshes):
        vertices, faces = np.asarray(vertices), np.asarray(faces)
        if vertices.ndim != 2 or vertices.shape[1] != 3 or len(vertices) == 0 or not np.isfinite(vertices).all():
            raise ValueError(f"mesh {title!r} must have finite vertices of shape (V, 3) with V >= 1, got "
                             f"shape {vertices.shape}")
        if faces.ndim != 2 or faces.shape[1] != 3 or (faces.size and (faces.min() < 0 or faces.max() >= len(vertices))):
            raise ValueError(f"mesh {title!r} must have faces of shape (F, 3) indexing its {len(vertices)} "
                             f"vertices, got shape {faces.shape}")


def _draw_panel(vertices: np.ndarray, faces: np.ndarray, title: str, camera: np.ndarray,
                size: tuple[int, int], font: ImageFont.ImageFont) -> Image.Image:
    """One panel: the mesh drawn far to near at SUPERSAMPLE x the size, downsampled, then titled."""
    width, height = size
    points = project_to_panel(vertices, camera, width, height)  # (V, 3)
    image = Image.new("RGB", (width * SUPERSAMPLE, height * SUPERSAMPLE), BACKGROUND)
    draw = ImageDraw.Draw(image)
    corners = points[:, :2] * SUPERSAMPLE  # (V, 2)
    if len(faces):
        colours = face_colours(points, faces)  # (F, 3)
        order = np.argsort(points[faces, 2].mean(axis=1), kind="stable")  # far to near
        triangles = corners[faces[order]].reshape(len(faces), 6).tolist()  # (F, 6): x0 y0 x1 y1 x2 y2
        # The outline in the fill colour closes the hairline cracks Pillow leaves between neighbours.
        for triangle, colour in zip(triangles, map(tuple, colours[order].tolist())):
            draw.polygon(triangle, fill=colour, outline=colour)
    else:
        colour = tuple(np.rint(BASE_COLOUR * AMBIENT).astype(int).tolist())
        for x, y in corners[np.argsort(points[:, 2], kind="stable")].tolist():
            draw.ellipse((x - POINT_RADIUS, y - POINT_RADIUS, x + POINT_RADIUS, y + POINT_RADIUS), fill=colour)
    panel = image.resize(size, Image.Resampling.BOX)
    ImageDraw.Draw(panel).text((width / 2, TITLE_HEIGHT / 2), fit_title(title, font, width - 2 * MARGIN),
                               fill=TITLE_COLOUR, font=font, anchor="mm")
    return panel


def fit_title(title: str, font: ImageFont.FreeTypeFont, width: int) -> str:
    """The title, shortened at the end and marked with '...' until it is at most width pixels long."""
    if font.getlength(title) <= width:
        return title
    while title and font.getlength(title + "...") > width:
        title = title[:-1]
    return title + "..."


def render_side_by_side(meshes: list[tuple[np.ndarray, np.ndarray]], titles: list[str],
                        path: str | os.PathLike, size: tuple[int, int] = DEFAULT_SIZE,
                        view_axis: str | None = None) -> None:
    """Draw meshes in panels from left to right and write one PNG, atomically.

    Args:
        meshes: (vertices float (V, 3), faces int (F, 3)) per panel; V and F may differ between meshes,
            F may be 0 (vertices are then drawn as dots).
        titles: one line per panel, drawn above its mesh.
        path: the .png to write; parent folders are created.
        size: (width, height) of one panel in pixels; the picture is len(meshes) x width by height.
        view_axis: "x", "y" or "z" (see CAMERAS), or None to choose from the meshes' extents.
    """
    render_grid([meshes], [titles], path, size, view_axis)


def render_grid(rows: list[list[tuple[np.ndarray, np.ndarray]]], titles: list[list[str]],
                path: str | os.PathLike, size: tuple[int, int] = DEFAULT_SIZE,
                view_axis: str | None = None) -> None:
    """Draw rows of meshes, each row left to right as in render_side_by_side, one PNG, one view for all.

    Args:
        rows: per row, (vertices (V, 3), faces (F, 3)) per panel; rows may differ in length.
        titles: per row, one line per panel.
        path, size, view_axis: as in render_side_by_side; the picture is the longest row's panels wide
            and len(rows) panels high.
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"render path {path} must end in .png")
    if len(size) != 2 or min(size) < 1 or size[1] <= TITLE_HEIGHT + 2 * MARGIN:
        raise ValueError(f"panel size must be (width, height) with height above {TITLE_HEIGHT + 2 * MARGIN} "
                         f"pixels, got {size}")
    if view_axis is not None and view_axis not in CAMERAS:
        raise ValueError(f"view_axis must be one of {', '.join(CAMERAS)} or None, got {view_axis!r}")
    if not rows or len(rows) != len(titles):
        raise ValueError(f"render_grid needs one title row per mesh row and at least one row, got "
                         f"{len(rows)} mesh rows and {len(titles)} title rows")
    for meshes, row_titles in zip(rows, titles):
        _validate_meshes(meshes, row_titles)
    camera = CAMERAS[view_axis or choose_view([mesh for meshes in rows for mesh in meshes])]
    font = ImageFont.load_default(size=TITLE_HEIGHT * 0.6)
    picture = Image.new("RGB", (size[0] * max(map(len, rows)), size[1] * len(rows)), BACKGROUND)
    for row, (meshes, row_titles) in enumerate(zip(rows, titles)):
        for column, ((vertices, faces), title) in enumerate(zip(meshes, row_titles)):
            panel = _draw_panel(np.asarray(vertices), np.asarray(faces, dtype=np.int64), title, camera, size, font)
            picture.paste(panel, (column * size[0], row * size[1]))
    with atomic_write(path) as handle:
        picture.save(handle, format="PNG")
