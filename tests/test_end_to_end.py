"""End to end on the CPU: train a few iterations on a tiny set, resume exactly, test, and run under torchrun."""
import csv
import json
import re
from pathlib import Path

import pytest
import torch

import test as test_script
import train as train_script
from options.base_options import parse
from options.test_options import TestOptions
from options.train_options import TrainOptions
from tests.cli import run_script
from tests.tiny_data import write_tiny_dataset

SMALL = ["--gpu_ids", "-1", "--ngf", "8", "--nThreads", "0", "--batchSize", "2", "--dataset_mode", "human"]


def train_args(data: Path, checkpoints: Path, *extra: str) -> list[str]:
    return [*SMALL, "--dataroot", str(data), "--checkpoints_dir", str(checkpoints), "--output_dir",
            str(checkpoints / "output"), "--print_freq", "2", "--display_freq", "4", *extra]


def load_weights(checkpoints: Path, label: str = "latest") -> dict:
    state = {}
    for name in ("G", "Corr"):
        path = checkpoints / "human" / f"{label}_net_{name}.pth"
        state.update({f"{name}.{k}": v for k, v in torch.load(path, weights_only=True).items()})
    return state


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_tiny_dataset(tmp_path_factory.mktemp("data"))


def test_train_writes_published_files_then_test_reports_pmd(data, tmp_path, capsys):
    checkpoints = tmp_path / "ckpt"
    train_script.main(parse(TrainOptions, train_args(data, checkpoints, "--niter", "1", "--niter_decay", "1")))
    run_dir = checkpoints / "human"
    for name in ("latest_net_G.pth", "latest_net_Corr.pth", "2_net_G.pth", "2_net_Corr.pth", "optimizer.pth",
                 "iter.txt", "opt.txt", "opt.json", "loss_log.txt", "latest_resume.pth", "data_stats.json"):
        assert (run_dir / name).is_file(), name
    stats = json.loads((run_dir / "data_stats.json").read_text())
    assert stats["num_vertices"] == 42 and stats["dataset_mode"] == "human" and len(stats["bbox_size"]) == 3
    assert (run_dir / "iter.txt").read_text().strip() == "3,0"
    assert "rec:" in (run_dir / "loss_log.txt").read_text()
    assert any((run_dir / "tensorboard").iterdir())
    meshes = sorted(p.name for p in (checkpoints / "output" / "human").iterdir())
    assert {m.rsplit("_", 1)[1] for m in meshes} == {"id.obj", "pose.obj", "warp.obj", "out.obj"}

    results = tmp_path / "results"
    mean_pmd = test_script.main(parse(TestOptions, [*SMALL, "--dataroot", str(data), "--checkpoints_dir",
                                                    str(checkpoints), "--results_dir", str(results),
                                                    "--test_list", str(data / "test_list")]))
    assert torch.isfinite(torch.tensor(mean_pmd))
    printed = capsys.readouterr().out
    assert "x 1e-4" in printed
    timing = re.search(r"time over the test list: ([0-9.]+) s; the model and metric ([0-9.]+) s, of which the "
                       r"first batch ([0-9.]+) s .*; reading and writing meshes (-?[0-9.]+) s", printed)
    assert timing and float(timing[3]) <= float(timing[2]) <= float(timing[1]), printed
    with open(results / "human" / "pmd.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len((data / "test_list").read_text().split("\n")) - 1
    assert sum(float(r["pmd"]) for r in rows) / len(rows) == pytest.approx(mean_pmd)
    for row in rows:  # the per-axis columns average to the PMD
        assert (float(row["pmd_x"]) + float(row["pmd_y"]) + float(row["pmd_z"])) / 3 == pytest.approx(float(row["pmd"]))
    assert (results / "human" / rows[0]["ground_truth"]).is_file()


def test_same_seed_gives_same_pmd_twice(data, tmp_path):
    checkpoints = tmp_path / "ckpt"
    train_script.main(parse(TrainOptions, train_args(data, checkpoints, "--niter", "1", "--niter_decay", "0")))
    args = [*SMALL, "--dataroot", str(data), "--checkpoints_dir", str(checkpoints), "--test_list",
            str(data / "test_list")]
    first = test_script.main(parse(TestOptions, [*args, "--results_dir", str(tmp_path / "a")]))
    second = test_script.main(parse(TestOptions, [*args, "--results_dir", str(tmp_path / "b")]))
    other_seed = test_script.main(parse(TestOptions, [*args, "--results_dir", str(tmp_path / "c"), "--seed", "5"]))
    assert first == second
    assert other_seed != first


class Interrupt(Exception):
    pass


def test_continue_train_resumes_exactly_mid_epoch(data, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    flags = ["--niter", "1", "--niter_decay", "2", "--epoch_size", "6", "--save_latest_freq", "2"]
    train_script.main(parse(TrainOptions, train_args(data, straight, *flags)))

    resumed = tmp_path / "resumed"
    real_step = torch.optim.Adam.step
    calls = {"n": 0}

    def interrupting_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # second epoch, second iteration: after the 'latest' save of step 4
            raise Interrupt
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", interrupting_step)
    with pytest.raises(Interrupt):
        train_script.main(parse(TrainOptions, train_args(data, resumed, *flags)))
    monkeypatch.setattr(torch.optim.Adam, "step", real_step)
    assert (resumed / "human" / "iter.txt").read_text().strip() == "2,2"
    train_script.main(parse(TrainOptions, train_args(data, resumed, *flags, "--continue_train")))

    expected, actual = load_weights(straight), load_weights(resumed)
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
    log = (resumed / "human" / "loss_log.txt").read_text()
    assert log.count("(epoch: 3,") == (straight / "human" / "loss_log.txt").read_text().count("(epoch: 3,")


def is_bias_before_instance_norm(key: str) -> bool:
    """Corr conv biases that feed an InstanceNorm: their gradient is zero in exact arithmetic, so Adam
    (eps 1e-3) turns float round-off of the batch reduction into updates of any sign; not comparable."""
    return key.startswith(("Corr.adaptive_feature.", "Corr.layer.")) and key.endswith(".bias")


def test_torchrun_two_processes_match_one_process_on_the_whole_batch(data, tmp_path):
    flags = ["--niter", "1", "--niter_decay", "0", "--epoch_size", "4", "--seed", "3"]
    base = [a for a in train_args(data, tmp_path / "x", *flags)]

    def with_dirs(args, name, batch):
        args = list(args)
        args[args.index("--checkpoints_dir") + 1] = str(tmp_path / name)
        args[args.index("--batchSize") + 1] = str(batch)
        return args

    single = run_script("train.py", *with_dirs(base, "single", 4))
    assert single.returncode == 0, single.stderr
    # `python -m torch.distributed.run` is the torchrun command.
    double = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
                        *with_dirs(base, "ddp", 2))
    assert double.returncode == 0, double.stderr[-3000:]
    one, two = load_weights(tmp_path / "single"), load_weights(tmp_path / "ddp")
    compared = [key for key in one if not is_bias_before_instance_norm(key)]
    for key in compared:
        assert torch.allclose(one[key], two[key], rtol=1e-4, atol=1e-6), key
    assert len(compared) > 0.8 * len(one)
    # One checkpoint, written by rank 0 alone: no stray temporary files from a second writer.
    assert not list((tmp_path / "ddp" / "human").glob(".*.tmp"))


@pytest.mark.parametrize("variant", ["original", "maxpool"])
def test_npt_trains_and_tests_with_its_own_settings_and_files(data, tmp_path, variant):
    checkpoints = tmp_path / "ckpt"
    opt = parse(TrainOptions, train_args(data, checkpoints, "--model", "npt", "--npt_variant", variant,
                                         "--niter", "1", "--niter_decay", "1"))
    assert (opt.lr, opt.beta1, opt.beta2, opt.lambda_rec, opt.lambda_edge) == (5e-5, 0.9, 0.999, 1.0, 0.0005)
    train_script.main(opt)
    run_dir = checkpoints / "human"
    assert (run_dir / "latest_net_NPT.pth").is_file() and not (run_dir / "latest_net_G.pth").exists()
    resume = torch.load(run_dir / "latest_resume.pth", weights_only=True)
    assert resume["lr"] == 5e-5  # constant: NPT does not decay
    mean_pmd = test_script.main(parse(TestOptions, [*SMALL, "--model", "npt", "--npt_variant", variant,
                                                    "--dataroot", str(data), "--checkpoints_dir", str(checkpoints),
                                                    "--results_dir", str(tmp_path / "res"),
                                                    "--test_list", str(data / "test_list")]))
    assert torch.isfinite(torch.tensor(mean_pmd))
    with open(tmp_path / "res" / "human" / "pmd.csv") as handle:
        assert "warp_pmd" not in handle.readline()
