"""scripts/overfit_pair.py: one pair fitted for a few steps, the error per axis printed; mismatched meshes refused."""
import re

import pytest

from scripts import overfit_pair
from tests.tiny_data import posed_ellipsoid
from util.mesh_io import write_mesh


def _write(tmp_path, name, identity, pose, subdivisions=1):
    path = tmp_path / name
    write_mesh(path, *posed_ellipsoid(identity, pose, subdivisions))
    return str(path)


def test_prints_the_error_per_axis_and_it_falls(tmp_path, capsys):
    paths = [_write(tmp_path, "id.obj", 0, 0), _write(tmp_path, "pose.obj", 1, 1), _write(tmp_path, "gt.obj", 0, 1)]
    overfit_pair.main(["--identity", paths[0], "--pose", paths[1], "--gt", paths[2], "--steps", "30", "--every", "30"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step")]
    errors = [[float(v) for v in re.findall(r"\d\.\d+e[+-]\d+", line)] for line in lines]
    assert [len(e) for e in errors] == [3, 3]
    assert sum(errors[1]) < sum(errors[0])


def test_a_ground_truth_of_another_vertex_count_is_refused(tmp_path):
    identity, pose = _write(tmp_path, "id.obj", 0, 0), _write(tmp_path, "pose.obj", 1, 1)
    gt = _write(tmp_path, "gt.obj", 0, 1, subdivisions=2)
    with pytest.raises(ValueError, match="the ground truth must be the identity's mesh in the pose"):
        overfit_pair.main(["--identity", identity, "--pose", pose, "--gt", gt, "--steps", "1"])
