"""Mesh IO: file order kept, round trips, and one-sentence errors for every malformed file."""
import numpy as np
import pytest
import trimesh

from util import mesh_io
from util.mesh_io import read_mesh, write_mesh


@pytest.mark.parametrize("suffix", [".obj", ".ply", ".off"])
def test_round_trip_keeps_vertex_order_and_faces(tmp_path, suffix):
    rng = np.random.default_rng(0)
    vertices = rng.normal(size=(37, 3)).astype(np.float32)
    faces = np.stack([rng.permutation(37)[:3] for _ in range(50)])
    write_mesh(tmp_path / f"m{suffix}", vertices, faces)
    read_vertices, read_faces = read_mesh(tmp_path / f"m{suffix}")
    assert read_vertices.dtype == np.float32 and read_faces.dtype == np.int64
    np.testing.assert_allclose(read_vertices, vertices, atol=1e-6)
    np.testing.assert_array_equal(read_faces, faces)


def test_obj_with_texture_coordinates_keeps_file_order(tmp_path):
    text = "v 0 0 0\nv 1 0 0\nv 0 1 0\nv 0 0 1\nvt 0 0\nvt 1 0\nvt 0 1\nf 4/1 2/2 3/3\nf 1/1 2/2 4/3\n"
    (tmp_path / "t.obj").write_text(text)
    vertices, faces = read_mesh(tmp_path / "t.obj")
    np.testing.assert_array_equal(vertices, [[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]])
    np.testing.assert_array_equal(faces, [[3, 1, 2], [0, 1, 3]])


@pytest.mark.parametrize("content, message", [
    ("", "holds no vertices"),
    ("# only a comment\n", "holds no vertices"),
    ("v 0 0 nan\nv 1 0 0\nv 0 1 0\nf 1 2 3\n", "1 vertices with non-finite"),
    ("v 0 0 inf\nv 1 0 0\nv 0 1 0\nf 1 2 3\n", "non-finite"),
    ("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 9\n", "could not be read|face indices"),
])
def test_malformed_files_raise_one_sentence(tmp_path, content, message):
    path = tmp_path / "bad.obj"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as info:
        read_mesh(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.obj does not exist"):
        read_mesh(tmp_path / "nope.obj")


def test_binary_garbage_ply(tmp_path):
    (tmp_path / "g.ply").write_bytes(b"ply\nformat binary_little_endian 1.0\nelement vertex 5\n" + b"\x00" * 7)
    with pytest.raises(ValueError, match="g.ply"):
        read_mesh(tmp_path / "g.ply")


def test_write_rejects_bad_shapes(tmp_path):
    with pytest.raises(ValueError, match=r"must have shape \(V, 3\)"):
        write_mesh(tmp_path / "x.obj", np.zeros((4, 2)), np.zeros((1, 3), dtype=int))
    assert not list(tmp_path.iterdir())


def _trimesh_read(path) -> tuple[np.ndarray, np.ndarray]:
    mesh = trimesh.load(path, force="mesh", process=False, maintain_order=True)
    return np.asarray(mesh.vertices, dtype=np.float32), np.asarray(mesh.faces, dtype=np.int64)


def test_plain_obj_fast_path_reads_what_trimesh_reads(tmp_path):
    rng = np.random.default_rng(1)
    vertices = rng.normal(scale=100, size=(500, 3)) * 10.0 ** rng.integers(-6, 3, size=(500, 1))
    faces = rng.integers(0, 500, size=(900, 3))
    write_mesh(tmp_path / "written.obj", vertices, faces)
    (tmp_path / "handmade.obj").write_text("# made by hand\r\n\r\nv 1e-3 -2.5E+01 +3\r\nv 0 1  0\r\n"
                                           "v 0 0 1\r\nf 1 2 3\r\n")
    for name in ("written.obj", "handmade.obj"):
        assert mesh_io._read_plain_obj((tmp_path / name).read_bytes().splitlines()) is not None  # the fast path
        for ours, theirs in zip(read_mesh(tmp_path / name), _trimesh_read(tmp_path / name)):
            np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("text", [
    "v 0 0 0\nv 1 0 0\nv 0 1 0\nvn 0 0 1\nf 1//1 2//1 3//1\n",  # normals
    "v 0 0 0 1 0 0\nv 1 0 0 0 1 0\nv 0 1 0 0 0 1\nf 1 2 3\n",  # vertex colours
    "v 0 0 0\nv 1 0 0\nv 0 1 0\nv 1 1 0\nf 1 2 3 4\n",  # a quad
    "v 0 0 0\nv 1 0 0\nv 0 1 0\nf -3 -2 -1\n",  # relative indices
    "o body\nv 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n",  # an object name
    "v 0 0 nan\nv 1 0 0\nv 0 1 0\nf 1 2 3\n",  # not a decimal number
])
def test_other_obj_files_go_to_trimesh(tmp_path, text):
    path = tmp_path / "other.obj"
    path.write_text(text)
    assert mesh_io._read_plain_obj(path.read_bytes().splitlines()) is None


@pytest.mark.parametrize("cut, line", [("vertex", "v -0."), ("face", "f 2")])
def test_obj_cut_short_names_its_broken_line(tmp_path, cut, line):
    """A copy cut inside the vertices (trimesh reads no vertices) or the faces (trimesh drops the face)."""
    vertices = np.random.default_rng(0).normal(size=(30, 3))
    faces = np.stack([np.arange(28), np.arange(1, 29), np.arange(2, 30)], axis=1)
    write_mesh(tmp_path / "whole.obj", vertices, faces)
    text = (tmp_path / "whole.obj").read_text()
    element = "\nv " if cut == "vertex" else "\nf "
    cut_at = text.index(element, text.index(element) + 1)  # after the first vertex or face
    broken = tmp_path / "broken.obj"
    broken.write_text(text[:cut_at] + "\n" + line)
    number = broken.read_text().count("\n") + 1
    with pytest.raises(ValueError, match=rf"broken.obj: line {number} \('{line}'\) has fewer than three .*truncated"):
        read_mesh(broken)


def test_obj_with_0_based_faces_is_refused_not_shifted(tmp_path):
    path = tmp_path / "zero_based.obj"
    path.write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\nv 1 1 0\nf 0 1 2\nf 1 3 2\n")
    with pytest.raises(ValueError, match=r"line 5 \('f 0 1 2'\) has face index 0, but OBJ indices start at 1"):
        read_mesh(path)


def test_coordinates_beyond_float32_are_refused(tmp_path):
    path = tmp_path / "huge.obj"
    path.write_text("v 0 0 0\nv 1e39 0 0\nv 0 1 0\nf 1 2 3\n")  # finite in float64, inf in float32
    with pytest.raises(ValueError, match=r"1 vertices with non-finite coordinates .*float32"):
        read_mesh(path)


@pytest.mark.parametrize("suffix", [".stl", ".gltf", ".xyz"])
def test_write_mesh_refuses_formats_that_lose_the_vertex_order(tmp_path, suffix):
    with pytest.raises(ValueError, match=r"a mesh is written as one of \.obj, \.ply, \.off, \.glb"):
        write_mesh(tmp_path / f"out{suffix}", np.eye(3), np.array([[0, 1, 2]]))
    assert not list(tmp_path.iterdir())


def test_write_mesh_refuses_non_finite_vertices(tmp_path):
    vertices = np.eye(3)
    vertices[1, 2] = np.nan
    with pytest.raises(ValueError, match=r"not writing .*out.obj: 1 of its 3 vertices are not finite"):
        write_mesh(tmp_path / "out.obj", vertices, np.array([[0, 1, 2]]))
    assert not list(tmp_path.iterdir())


def test_a_folder_named_as_a_mesh_is_called_a_folder(tmp_path):
    with pytest.raises(IsADirectoryError, match=r"mesh file .* is a folder; name a mesh file"):
        read_mesh(tmp_path)
