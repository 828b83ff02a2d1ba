"""Options: published defaults, frozen values, JSON round trip and one-line errors."""
import dataclasses
import json
import re

import pytest
import torch

from options.base_options import parse
from options.test_options import TestOptions
from options.train_options import TrainOptions


def test_published_defaults():
    opt = parse(TrainOptions, ["--gpu_ids", "-1"])
    assert (opt.batchSize, opt.ngf, opt.netG, opt.model, opt.dataset_mode) == (8, 64, "elain", "ver2ver", "human")
    assert (opt.niter, opt.niter_decay, opt.lr, opt.beta1, opt.beta2) == (100, 100, 1e-4, 0.0, 0.9)
    assert (opt.lambda_rec, opt.lambda_edge, opt.init_type, opt.init_variance) == (1000.0, 0.5, "xavier", 0.02)
    assert (opt.display_freq, opt.print_freq, opt.save_latest_freq, opt.save_epoch_freq) == (2000, 100, 5000, 10)
    assert opt.which_epoch == "latest" and opt.checkpoints_dir == "./checkpoints"
    test_opt = parse(TestOptions, ["--gpu_ids", "-1"])
    assert test_opt.results_dir == "./test_results/" and not test_opt.isTrain and opt.isTrain
    assert opt.device == "cpu" and opt.world_size == 1


def test_options_are_frozen():
    opt = parse(TrainOptions, ["--gpu_ids", "-1"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        opt.lr = 1.0


def test_saved_json_is_read_back_and_command_line_wins(tmp_path):
    from options.base_options import save_options
    opt = parse(TrainOptions, ["--gpu_ids", "-1", "--checkpoints_dir", str(tmp_path), "--ngf", "16", "--lr", "0.5"])
    save_options(opt, opt.checkpoint_dir)
    saved = json.loads((tmp_path / "human" / "opt.json").read_text())
    assert saved["ngf"] == 16 and "device" not in saved
    text = (tmp_path / "human" / "opt.txt").read_text()
    assert "[default: 64]" in text and "[default: 0.0001]" in text  # --lr 0.5 against ver2ver's published 1e-4
    assert "beta1" in text and "[default: 0.0]" not in text  # beta1 left at the published value: not marked
    loaded = parse(TrainOptions, ["--checkpoints_dir", str(tmp_path), "--load_from_opt_file", "--lr", "0.25"])
    assert loaded.ngf == 16 and loaded.lr == 0.25 and loaded.gpu_ids == "-1"


def _pretend_one_gpu(patch: pytest.MonkeyPatch) -> None:
    """parse() as on a one-GPU machine: option resolution only asks torch.cuda whether a GPU is there."""
    patch.setattr(torch.cuda, "is_available", lambda: True)
    patch.setattr(torch.cuda, "device_count", lambda: 1)


def test_opt_file_keeps_auto_choices_for_the_machine_that_loads_it(tmp_path, monkeypatch):
    """A run trained on a GPU and tested on the CPU from its opt.json takes the CPU's choices; explicit
    choices are kept."""
    from options.base_options import save_options
    with monkeypatch.context() as gpu:
        _pretend_one_gpu(gpu)
        trained = parse(TrainOptions, ["--checkpoints_dir", str(tmp_path), "--ngf", "16", "--ot", "stored"])
    assert (trained.precision, trained.fold_linear, trained.compile) == ("fp16", "on", "on")
    save_options(trained, trained.checkpoint_dir)
    saved = json.loads((tmp_path / "human" / "opt.json").read_text())
    assert {name: saved[name] for name in ("precision", "fold_linear", "ot", "compile", "cuda_graphs")} == \
        {"precision": "auto", "fold_linear": "auto", "ot": "stored", "compile": "auto", "cuda_graphs": "auto"}
    assert re.search(r"precision: fp16\s+\[default: auto\]", (tmp_path / "human" / "opt.txt").read_text())
    tested = parse(TestOptions, ["--checkpoints_dir", str(tmp_path), "--load_from_opt_file", "--gpu_ids", "-1"])
    assert (tested.ngf, tested.ot, tested.precision, tested.fold_linear, tested.compile, tested.cuda_graphs) == \
        (16, "stored", "fp32", "off", "off", "off")


def test_missing_opt_file_is_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="opt.json does not exist"):
        parse(TrainOptions, ["--checkpoints_dir", str(tmp_path), "--load_from_opt_file"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only machine's message")
def test_gpu_requested_without_cuda():
    with pytest.raises(RuntimeError, match="CUDA is not available.*--gpu_ids -1"):
        parse(TrainOptions, ["--gpu_ids", "0"])


def test_several_gpus_without_torchrun_names_the_command():
    with pytest.raises(RuntimeError, match="torchrun --nproc_per_node=2 train.py"):
        parse(TrainOptions, ["--gpu_ids", "0,1"])


def test_cuda_graphs_are_for_inference_on_a_gpu():
    assert parse(TestOptions, ["--gpu_ids", "-1"]).cuda_graphs == "off"
    assert parse(TrainOptions, ["--gpu_ids", "-1"]).cuda_graphs == "off"
    with pytest.raises(ValueError, match="--cuda_graphs on needs a GPU, but this run is on cpu"):
        parse(TestOptions, ["--gpu_ids", "-1", "--cuda_graphs", "on"])
    with pytest.raises(ValueError, match="--cuda_graphs is for inference"):
        parse(TrainOptions, ["--gpu_ids", "-1", "--cuda_graphs", "on"])


@pytest.fixture
def one_visible_gpu(monkeypatch):
    _pretend_one_gpu(monkeypatch)


@pytest.mark.parametrize("options_class, args, cuda_graphs", [
    (TestOptions, [], "on"), (TestOptions, ["--cuda_graphs", "off"], "off"),
    (TestOptions, ["--model", "npt"], "off"), (TestOptions, ["--model", "npt", "--cuda_graphs", "on"], "on"),
    (TrainOptions, [], "off")])
def test_auto_choices_on_a_gpu(one_visible_gpu, options_class, args, cuda_graphs):
    opt = parse(options_class, ["--gpu_ids", "0", *args])
    assert opt.device == "cuda:0" and opt.cuda_graphs == cuda_graphs
    assert opt.compile == ("on" if options_class.isTrain else "off")
    if "npt" not in args:
        assert (opt.precision, opt.fold_linear, opt.ot) == ("fp16", "on", "auto")


@pytest.mark.parametrize("args, message", [
    (["--batchSize", "0"], "--batchSize must be at least 1"),
    (["--niter", "0", "--niter_decay", "0"], "at least one epoch"),
    (["--gpu_ids", "a"], "not a comma-separated list"),
])
def test_bad_values(args, message):
    with pytest.raises(ValueError, match=message):
        parse(TrainOptions, ["--gpu_ids", "-1", *args] if "--gpu_ids" not in args else args)


@pytest.mark.parametrize("args, fold_linear", [([], "off"), (["--precision", "fp16"], "on"),
                                               (["--precision", "bf16"], "on"),
                                               (["--precision", "fp16", "--fold_linear", "off"], "off"),
                                               (["--fold_linear", "on"], "on")])
def test_fold_linear_auto_follows_the_precision(args, fold_linear):
    assert parse(TrainOptions, ["--gpu_ids", "-1", *args]).fold_linear == fold_linear
