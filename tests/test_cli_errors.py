"""Bad input through the real command lines: one 'error:' line, exit status 2, no traceback, nothing lost."""
import json
import shutil
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


@pytest.mark.parametrize("script", ["train.py", "test.py", "transfer.py"])
def test_help_of_every_script(script):
    result = run_script(script, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: ") and "--checkpoints_dir" in result.stdout


@pytest.mark.parametrize("args, fragment", [(["--model", "foo"], "argument --model: invalid choice: 'foo'"),
                                            (["--ngf", "abc"], "argument --ngf: invalid int value: 'abc'")])
def test_usage_error_is_one_line(args, fragment):
    result = run_script("train.py", "--gpu_ids", "-1", *args)
    assert_one_line_error(result, fragment, "; see --help")
    assert result.stderr.count("\n") == 1 and not result.stdout


def _model_files(checkpoints) -> dict:
    return {path.name: path.read_bytes() for path in (checkpoints / "human").iterdir() if path.is_file()}


def test_train_refuses_to_replace_a_trained_model(trained):
    before = _model_files(trained / "ckpt")
    result = run_script("train.py", "--gpu_ids", "-1", "--ngf", "8", "--nThreads", "0", "--batchSize", "2",
                        "--dataroot", str(trained / "data"), "--checkpoints_dir", str(trained / "ckpt"),
                        "--niter", "1", "--niter_decay", "0", "--epoch_size", "2", "--seed", "5")
    assert_one_line_error(result, f"{trained / 'ckpt' / 'human'} already holds a trained model",
                          "--continue_train to resume it or --overwrite to start over")
    assert _model_files(trained / "ckpt") == before


def test_continue_train_of_a_finished_run_says_so(trained):
    before = _model_files(trained / "ckpt")
    result = run_script("train.py", "--gpu_ids", "-1", "--ngf", "8", "--nThreads", "0", "--batchSize", "2",
                        "--dataroot", str(trained / "data"), "--checkpoints_dir", str(trained / "ckpt"),
                        "--niter", "1", "--niter_decay", "0", "--continue_train")
    assert result.returncode == 0, result.stderr
    assert "training already finished at epoch 1" in result.stdout and "raise --niter or --niter_decay" in \
        result.stdout
    assert _model_files(trained / "ckpt") == before


def test_continue_train_from_an_epoch_explains_that_only_latest_resumes(trained):
    result = run_script("train.py", "--gpu_ids", "-1", "--ngf", "8", "--nThreads", "0", "--batchSize", "2",
                        "--dataroot", str(trained / "data"), "--checkpoints_dir", str(trained / "ckpt"),
                        "--niter", "2", "--niter_decay", "0", "--continue_train", "--which_epoch", "1")
    assert_one_line_error(result, "only the latest save keeps the optimizer", "Drop --which_epoch")


def test_overwrite_that_fails_on_bad_data_keeps_the_options(trained, tmp_path):
    """--overwrite replaces a model only once training starts: a mesh that fails to read before then leaves
    opt.json as it was."""
    shutil.copytree(trained / "ckpt", tmp_path / "ckpt")
    shutil.copytree(trained / "data", tmp_path / "data")
    (tmp_path / "data" / "id1_2.obj").write_text("v 0 0 0\nv 1 1\n")
    before = _model_files(tmp_path / "ckpt")
    result = run_script("train.py", "--gpu_ids", "-1", "--ngf", "8", "--nThreads", "0", "--batchSize", "2",
                        "--dataroot", str(tmp_path / "data"), "--checkpoints_dir", str(tmp_path / "ckpt"),
                        "--niter", "1", "--niter_decay", "0", "--epoch_size", "2", "--seed", "5", "--overwrite")
    assert_one_line_error(result, "id1_2.obj", "fewer than three coordinates")
    assert _model_files(tmp_path / "ckpt") == before


def test_overwrite_sets_the_previous_run_aside(trained, tmp_path):
    """--overwrite moves every file of the run it replaces into one replaced_<time> folder (nothing is deleted,
    and no epoch file of the old run stays beside the new one's)."""
    shutil.copytree(trained / "ckpt", tmp_path / "ckpt")
    before = _model_files(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "human" / "7_net_G.pth").write_bytes(b"an old epoch")
    result = run_script("train.py", "--gpu_ids", "-1", "--ngf", "8", "--nThreads", "0", "--batchSize", "2",
                        "--dataroot", str(trained / "data"), "--checkpoints_dir", str(tmp_path / "ckpt"),
                        "--niter", "1", "--niter_decay", "0", "--epoch_size", "2", "--seed", "5", "--overwrite")
    assert result.returncode == 0, result.stderr
    human = tmp_path / "ckpt" / "human"
    [aside] = human.glob("replaced_*")
    assert f"previous run's files were moved to {aside}" in result.stdout
    assert {path.name: path.read_bytes() for path in aside.iterdir() if path.is_file()} == \
        {**before, "7_net_G.pth": b"an old epoch"}
    assert not (human / "7_net_G.pth").exists()
    assert {"latest_net_G.pth", "1_net_G.pth", "opt.json", "loss_log.txt"} <= set(_model_files(tmp_path / "ckpt"))


def test_opt_file_with_an_unknown_model_names_file_and_key(tmp_path):
    (tmp_path / "ckpt" / "human").mkdir(parents=True)
    (tmp_path / "ckpt" / "human" / "opt.json").write_text(json.dumps({"model": "foo", "gpu_ids": -1}))
    result = run_script("train.py", "--checkpoints_dir", str(tmp_path / "ckpt"), "--load_from_opt_file")
    assert_one_line_error(result, f'{tmp_path / "ckpt" / "human" / "opt.json"}: "model" must be one of ver2ver, npt, '
                                  f'got "foo"; fix or delete the file')


def test_split_file_epoch_too_large_to_list(tmp_path):
    data = write_tiny_dataset(tmp_path / "data")
    split = json.loads((data / "split.json").read_text())
    (data / "split.json").write_text(json.dumps({**split, "epoch_size": 10**11}))
    result = run_script("train.py", "--gpu_ids", "-1", "--ngf", "8", "--dataroot", str(data), "--checkpoints_dir",
                        str(tmp_path / "ckpt"))
    assert_one_line_error(result, "split.json asks for epoch_size 100,000,000,000", "at most 10,000,000 pairs")
    assert not (tmp_path / "ckpt").exists()


def test_training_meshes_too_many_to_list(tmp_path):
    result = run_script("train.py", "--gpu_ids", "-1", "--dataroot", str(write_tiny_dataset(tmp_path / "data")),
                        "--checkpoints_dir", str(tmp_path / "ckpt"), "--train_identities", "0-9999",
                        "--train_poses", "0-1000")
    assert_one_line_error(result, "10,000 identities x 1,001 poses", "more than 10,000,000 meshes")
