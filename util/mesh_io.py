"""Mesh file reading and writing: the one place in the project that parses or writes mesh files.

Every mesh leaves this module as float32 vertices (V, 3) and int64 triangle faces (F, 3), checked for
the failures a user can cause (missing file, unreadable or empty file, faces out of range, non-finite
coordinates) so that callers can trust what they get. Plain triangle OBJ files (only `v x y z`, `f a b c`
and comment lines: what this project and most exporters write) are parsed here with numpy, about twice as
fast; everything else by trimesh. Both keep the file's vertex order.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import trimesh

from util.atomic import atomic_write

MESH_SUFFIXES = (".obj", ".ply", ".off", ".stl", ".glb", ".gltf")
# What write_mesh writes with the faces and vertex order kept: STL stores each triangle's corners apart (6890
# vertices come back as 41,292), and glTF keeps its buffers in side files that one written file cannot hold.
OUTPUT_SUFFIXES = (".obj", ".ply", ".off", ".glb")


def read_mesh_triples(path: Path, what: str, columns: str) -> list[tuple[int, tuple[str, str, str]]]:
    """The lines of a list of mesh-file triples (a test list, a --pairs list): three names a line, blank lines
    skipped; ValueError or FileNotFoundError with one line naming the list for anything else.

    Args:
        path: the list; what: how messages call it ("test list"); columns: its line form ("identity pose output").
    Returns:
        (line number, (name, name, name)) for every non-blank line, at least one.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} {'is a folder' if path.is_dir() else 'does not exist'}")
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise ValueError(f"{what} {path} is not a text file of '{columns}' lines") from None
    triples = []
    for number, line in enumerate(text.splitlines(), start=1):
        names = line.split()
        if names and len(names) != 3:
            raise ValueError(f"{what} {path} line {number} has {len(names)} names; each line needs '{columns}'")
        if names:
            triples.append((number, (names[0], names[1], names[2])))
    if not triples:
        raise ValueError(f"{what} {path} has no lines; each line needs '{columns}'")
    return triples


def read_mesh(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a triangle mesh, keeping the file's vertex order.

    Args:
        path: an .obj, .ply or any other single-mesh format trimesh reads.
    Returns:
        vertices: float32 (V, 3), all finite, V >= 1.
        faces: int64 (F, 3), every index in [0, V). F may be 0 (a point cloud).
    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file cannot be parsed, holds no vertices, has faces that are not triangles or
            that index missing vertices, or has non-finite coordinates.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"mesh file {path} is a folder; name a mesh file")
    if not path.is_file():
        raise FileNotFoundError(f"mesh file {path} does not exist")
    obj_lines = path.read_bytes().splitlines() if path.suffix.lower() == ".obj" else None
    plain = _read_plain_obj(obj_lines) if obj_lines is not None else None
    if plain is not None:
        vertices, faces = plain
    else:
        if obj_lines is not None:
            _check_obj_elements(path, obj_lines)
        try:
            # maintain_order keeps OBJ vertices in file order even when texture coordinates are present;
            # process=False stops trimesh from merging or reordering vertices.
            mesh = trimesh.load(path, force="mesh", process=False, maintain_order=True)
        except Exception as err:  # trimesh raises many types for malformed files; report them as one
            raise ValueError(f"mesh file {path} could not be read ({type(err).__name__}: {err}); is it cut "
                             f"short or not a mesh file?") from None
        vertices = np.asarray(getattr(mesh, "vertices", np.zeros((0, 3))), dtype=np.float64)
        faces = np.asarray(getattr(mesh, "faces", np.zeros((0, 3))), dtype=np.int64)
    if vertices.ndim != 2 or vertices.shape[0] == 0 or vertices.shape[1] != 3:
        raise ValueError(f"mesh file {path} holds no vertices; it is empty or not a mesh")
    if faces.size and (faces.ndim != 2 or faces.shape[1] != 3):
        raise ValueError(f"mesh file {path} has faces of shape {faces.shape}; triangles (F, 3) are needed")
    faces = faces.reshape(-1, 3)
    if faces.size and (faces.min() < 0 or faces.max() >= vertices.shape[0]):
        raise ValueError(
            f"mesh file {path} has face indices in [{faces.min()}, {faces.max()}] "
            f"but only {vertices.shape[0]} vertices")
    with np.errstate(over="ignore"):
        vertices = vertices.astype(np.float32)  # coordinates beyond float32's range become inf here
    bad = _non_finite_vertices(vertices)
    if bad:
        raise ValueError(f"mesh file {path} has {bad} vertices with non-finite coordinates (NaN, inf, or beyond "
                         f"float32's range of 3.4e38)")
    return vertices, faces


def _non_finite_vertices(vertices: np.ndarray) -> int:
    """How many rows of vertices (V, 3) hold a NaN or infinite coordinate."""
    return int((~np.isfinite(vertices)).any(axis=1).sum())


def _check_obj_elements(path: Path, lines: list[bytes]) -> None:
    """Raise ValueError naming the first `v` line with fewer than three coordinates, `f` line with fewer than
    three vertices (a file cut short ends in one), or face index 0 (a 0-based file). trimesh would drop a short
    face silently (an identity mesh losing its faces), return no vertices at all, or shift a 0-based file's
    faces by one vertex."""
    for number, line in enumerate(lines, start=1):
        kind = line[:2]
        shown = line.decode(errors="replace")[:40]
        if kind in (b"v ", b"f ") and len(line.split()) < 4:
            what = "coordinates" if kind == b"v " else "vertices"
            raise ValueError(f"mesh file {path}: line {number} ({shown!r}) has fewer than three {what}; "
                             f"the file looks truncated or malformed, write or copy it again")
        if kind == b"f " and any(corner.split(b"/")[0] == b"0" for corner in line.split()[1:]):
            raise ValueError(f"mesh file {path}: line {number} ({shown!r}) has face index 0, but OBJ indices "
                             f"start at 1; was it written 0-based? Add 1 to every face index")


def _read_plain_obj(lines: list[bytes]) -> tuple[np.ndarray, np.ndarray] | None:
    """float64 vertices (V, 3) and 0-based int64 faces (F, 3) of an OBJ, given as its lines, made only of
    `v x y z`, `f a b c` (positive 1-based indices) and comment or blank lines; None for any other file, which
    trimesh then reads (vertex colours, normals, texture coordinates, polygons, relative indices, groups, ...).
    """
    vertex_lines = [line[2:] for line in lines if line[:2] == b"v "]
    face_lines = [line[2:] for line in lines if line[:2] == b"f "]
    comment_lines = sum(1 for line in lines if line[:1] == b"#" or not line.strip())
    if not vertex_lines or len(vertex_lines) + len(face_lines) + comment_lines != len(lines):
        return None
    vertex_text, face_text = b" ".join(vertex_lines), b" ".join(face_lines)
    # Decimal numbers and plain indices only ("nan", "1/1/1", "-1" go to trimesh); numpy stops at the first
    # token it cannot read, which the counts below then catch.
    if vertex_text.translate(None, b"0123456789.+-eE \t") or face_text.translate(None, b"0123456789 \t"):
        return None
    vertices = np.fromstring(vertex_text, dtype=np.float64, sep=" ")
    faces = np.fromstring(face_text, dtype=np.int64, sep=" ")
    if vertices.size != 3 * len(vertex_lines) or faces.size != 3 * len(face_lines) or (faces < 1).any():
        return None
    return vertices.reshape(-1, 3), faces.reshape(-1, 3) - 1


# trimesh's OBJ exporter writes this header, 8 decimals per coordinate and 1-based faces; the writer below
# reproduces its bytes for a plain triangle mesh.
_OBJ_HEADER = "# https://github.com/mikedh/trimesh\n"


@functools.lru_cache(maxsize=4)
def _obj_face_lines(face_bytes: bytes) -> str:
    """'f a b c' lines (1-based) of int64 faces given as bytes; cached because a data set writes thousands
    of meshes that share one face list."""
    indices = np.frombuffer(face_bytes, dtype=np.int64) + 1
    return ("f %d %d %d\n" * (len(indices) // 3)) % tuple(indices.tolist())


def _obj_text(vertices: np.ndarray, faces: np.ndarray) -> str:
    """OBJ text, byte-identical to trimesh's export of Trimesh(vertices, faces, process=False), about 5x faster."""
    vertex_lines = ("v %.8f %.8f %.8f\n" * len(vertices)) % tuple(vertices.ravel().tolist())
    return _OBJ_HEADER + vertex_lines + _obj_face_lines(faces.tobytes()) + "\n"


def write_mesh(path: str | os.PathLike, vertices: np.ndarray, faces: np.ndarray) -> None:
    """Write a triangle mesh atomically (temporary file, then rename); the format follows the suffix.

    Args:
        path: destination ending in one of OUTPUT_SUFFIXES, e.g. out.obj or out.ply; parent folders are created.
        vertices: float (V, 3), all finite.
        faces: int (F, 3), indices into vertices.
    Raises:
        ValueError: another suffix, wrong shapes, or non-finite vertices (nothing is written).
    """
    path = Path(path)
    if path.suffix.lower() not in OUTPUT_SUFFIXES:
        raise ValueError(f"cannot write {path}: a mesh is written as one of {', '.join(OUTPUT_SUFFIXES)}, which "
                         f"keep its faces and vertex order")
    vertices = np.asarray(vertices, dtype=np.float64)
    faces = np.ascontiguousarray(faces, dtype=np.int64)
    if vertices.ndim != 2 or vertices.shape[1] != 3:
        raise ValueError(f"vertices for {path} must have shape (V, 3), got {vertices.shape}")
    if faces.ndim != 2 or faces.shape[1] != 3:
        raise ValueError(f"faces for {path} must have shape (F, 3), got {faces.shape}")
    bad = _non_finite_vertices(vertices)
    if bad:
        raise ValueError(f"not writing {path}: {bad} of its {len(vertices)} vertices are not finite (NaN or inf)")
    file_type = path.suffix.lstrip(".").lower()
    with atomic_write(path) as handle:
        if file_type == "obj" and len(faces):
            handle.write(_obj_text(vertices, faces).encode("ascii"))
        else:
            trimesh.Trimesh(vertices=vertices, faces=faces, process=False).export(handle, file_type=file_type)
