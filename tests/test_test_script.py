"""test.py's guards: results never written over the test list's own meshes, no non-finite output scored."""
from pathlib import Path

import pytest
import torch

import test as test_script
from data.pair_dataset import TestPairDataset as PairList  # a Test* name would be collected as tests
from tests.tiny_data import write_tiny_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_tiny_dataset(tmp_path_factory.mktemp("data"))


def test_results_in_the_data_folder_are_refused(data):
    dataset = PairList(data, data / "test_list", seed=0)
    test_script.check_results_paths(dataset, data.parent / "results" / "human")  # elsewhere: fine
    with pytest.raises(ValueError, match=r"would be written over the input mesh .*id2_0.obj; choose a --results_dir"):
        test_script.check_results_paths(dataset, data)


def test_absolute_ground_truth_names_stay_under_the_results_folder(data, tmp_path):
    absolute = tmp_path / "list"
    absolute.write_text(f"{data / 'id2_3.obj'} {data / 'id0_1.obj'} {data / 'id2_1.obj'}\n")
    dataset = PairList(data, absolute, seed=0)
    test_script.check_results_paths(dataset, tmp_path / "results")
    assert test_script.result_path(tmp_path / "results", str(data / "id2_1.obj")) == tmp_path / "results" / "id2_1.obj"
    assert test_script.result_path(tmp_path / "results", "../x/id2_1.ply") == tmp_path / "results" / "id2_1.obj"
    assert test_script.result_path(tmp_path / "results", "sub/id2_1.ply") == tmp_path / "results" / "sub" / "id2_1.obj"


def test_non_finite_output_names_its_pair():
    batch = {"identity_name": ["a.obj", "b.obj"], "pose_name": ["c.obj", "d.obj"]}
    points = torch.zeros(2, 5, 3)
    test_script.check_finite_outputs(points, batch)
    points[1, 3, 0] = float("inf")
    with pytest.raises(ValueError, match=r"the output for identity b.obj in pose d.obj is not finite"):
        test_script.check_finite_outputs(points, batch)


def test_a_test_list_that_is_binary_or_a_folder_says_so(data, tmp_path):
    binary = tmp_path / "list"
    binary.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(ValueError, match="is not a text file of 'identity pose ground-truth' lines"):
        PairList(data, binary, seed=0)
    with pytest.raises(FileNotFoundError, match="is a folder"):
        PairList(data, tmp_path, seed=0)
