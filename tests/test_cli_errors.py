"""Bad input through the real command lines: one 'error:' line, exit status 2, no traceback, nothing lost."""
import subprocess

import pytest
import torch

from tests.cli import assert_one_line_error as check_one_line_error
from tests.cli import run_script
from tests.tiny_data import write_tiny_dataset


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    check_one_line_error(result.returncode, result.stderr, *fragments)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny data set and a checkpoint trained on it for one step."""
    root = tmp_path_factory.mktemp("cli")
    data = write_tiny_dataset(root / "data")
    result = run_script("train.py", "--gpu_ids", "-1", "--ngf", "8", "--nThreads", "0", "--batchSize", "2",
                 "--dataroot", str(data), "--checkpoints_dir", str(root / "ckpt"), "--output_dir",
                 str(root / "out"), "--niter", "1", "--niter_decay", "0", "--epoch_size", "2")
    assert result.returncode == 0, result.stderr
    return root


def test_train_missing_dataroot(tmp_path):
    result = run_script("train.py", "--gpu_ids", "-1", "--dataroot", str(tmp_path / "absent"),
                 "--checkpoints_dir", str(tmp_path / "ckpt"))
    assert_one_line_error(result, "absent does not exist", "--dataroot")
    assert not (tmp_path / "ckpt").exists()


def test_malformed_mesh_in_a_loader_worker_is_named(tmp_path):
    data = write_tiny_dataset(tmp_path / "data")
    for other in data.glob("id*_*.obj"):
        if other.name != "id0_0.obj":  # the dataset reads id0_0 itself; the others fail in the worker
            other.write_text("v 0 0 0\nv 1 1\n")
    result = run_script("train.py", "--gpu_ids", "-1", "--ngf", "8", "--nThreads", "1", "--batchSize", "2",
                 "--dataroot", str(data), "--checkpoints_dir", str(tmp_path / "ckpt"), "--niter", "1",
                 "--niter_decay", "0", "--epoch_size", "2")
    assert_one_line_error(result, "line 2 ('v 1 1') has fewer than three coordinates", ".obj")


def test_test_missing_checkpoint_never_uses_random_weights(trained, tmp_path):
    result = run_script("test.py", "--gpu_ids", "-1", "--ngf", "8", "--dataroot", str(trained / "data"),
                 "--checkpoints_dir", str(trained / "ckpt"), "--which_epoch", "77",
                 "--test_list", str(trained / "data" / "test_list"), "--results_dir", str(tmp_path / "res"))
    assert_one_line_error(result, "77_net_G.pth does not exist", "--which_epoch 77")
    assert not (tmp_path / "res").exists()


def test_test_checkpoint_of_another_width_lists_keys(trained, tmp_path):
    result = run_script("test.py", "--gpu_ids", "-1", "--ngf", "16", "--dataroot", str(trained / "data"),
                 "--checkpoints_dir", str(trained / "ckpt"), "--test_list", str(trained / "data" / "test_list"),
                 "--results_dir", str(tmp_path / "res"))
    assert_one_line_error(result, "mis-shaped", "fc.weight")


def test_compiled_passes_on_a_cpu_without_a_cpp_compiler(trained, tmp_path):
    """--ot stored compiles its passes for the CPU with torch.compile, which needs a C++ compiler."""
    result = run_script("test.py", "--gpu_ids", "-1", "--ngf", "8", "--ot", "stored", "--dataroot",
                        str(trained / "data"), "--checkpoints_dir", str(trained / "ckpt"), "--test_list",
                        str(trained / "data" / "test_list"), "--results_dir", str(tmp_path / "res"),
                        env={"CXX": str(tmp_path / "no-compiler"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")})
    assert_one_line_error(result, "No working C++ compiler", "install g++ or clang", "--ot dense --compile off")


def test_test_list_line_with_two_names(trained, tmp_path):
    bad_list = tmp_path / "list"
    bad_list.write_text("id2_3.obj id0_0.obj id2_0.obj\nid2_3.obj id0_0.obj\n")
    result = run_script("test.py", "--gpu_ids", "-1", "--ngf", "8", "--dataroot", str(trained / "data"),
                 "--checkpoints_dir", str(trained / "ckpt"), "--test_list", str(bad_list),
                 "--results_dir", str(tmp_path / "res"))
    assert_one_line_error(result, "line 2 has 2 names")


def test_test_results_of_an_earlier_run_survive_a_failed_run(trained, tmp_path):
    results = tmp_path / "res"
    args = ["--gpu_ids", "-1", "--ngf", "8", "--dataroot", str(trained / "data"), "--checkpoints_dir",
            str(trained / "ckpt"), "--test_list", str(trained / "data" / "test_list"), "--results_dir", str(results)]
    assert run_script("test.py", *args).returncode == 0
    table = (results / "human" / "pmd.csv").read_text()
    (trained / "data" / "id2_3.obj").rename(trained / "data" / "moved.obj")
    try:
        assert_one_line_error(run_script("test.py", *args), "id2_3.obj", "line 1")
    finally:
        (trained / "data" / "moved.obj").rename(trained / "data" / "id2_3.obj")
    assert (results / "human" / "pmd.csv").read_text() == table


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only machine's message")
def test_cuda_requested_without_a_gpu(trained):
    result = run_script("test.py", "--gpu_ids", "0", "--dataroot", str(trained / "data"))
    assert_one_line_error(result, "CUDA is not available", "--gpu_ids -1")


def test_several_gpus_without_torchrun():
    assert_one_line_error(run_script("train.py", "--gpu_ids", "0,1"), "torchrun --nproc_per_node=2 train.py")
