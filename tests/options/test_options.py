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


def test_cuda_graphs_need_a_gpu_and_one_training_process(monkeypatch):
    assert parse(TestOptions, ["--gpu_ids", "-1"]).cuda_graphs == "off"
    assert parse(TrainOptions, ["--gpu_ids", "-1"]).cuda_graphs == "off"
    for options_class in (TestOptions, TrainOptions):
        with pytest.raises(ValueError, match="--cuda_graphs on needs a GPU, but this run is on cpu"):
            parse(options_class, ["--gpu_ids", "-1", "--cuda_graphs", "on"])
    _pretend_one_gpu(monkeypatch)
    assert parse(TrainOptions, ["--gpu_ids", "0", "--cuda_graphs", "on"]).cuda_graphs == "on"
    for options_class in (TestOptions, TrainOptions):  # auto: 3D-CoreNet on a GPU, NPT stays eager
        assert parse(options_class, ["--gpu_ids", "0"]).cuda_graphs == "on"
        assert parse(options_class, ["--gpu_ids", "0", "--model", "npt"]).cuda_graphs == "off"
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="--cuda_graphs on replays one process's training step"):
        parse(TrainOptions, ["--gpu_ids", "0", "--cuda_graphs", "on"])
    assert parse(TrainOptions, ["--gpu_ids", "0"]).cuda_graphs == "off"  # auto with several processes


@pytest.fixture
def one_visible_gpu(monkeypatch):
    _pretend_one_gpu(monkeypatch)


@pytest.mark.parametrize("options_class, args, cuda_graphs", [
    (TestOptions, [], "on"), (TestOptions, ["--cuda_graphs", "off"], "off"),
    (TestOptions, ["--model", "npt"], "off"), (TestOptions, ["--model", "npt", "--cuda_graphs", "on"], "on"),
    (TrainOptions, [], "on"), (TrainOptions, ["--model", "npt"], "off")])
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


def test_auto_choices_on_the_cpu():
    """The reference path: fp32, no folding, no compilation, no graphs; --ot auto stays auto, which runs the dense
    warp there unless a pair's N x M tensors would not fit in memory (correspondence.py `dense_or_chunked_warp`)."""
    for options_class in (TrainOptions, TestOptions):
        opt = parse(options_class, ["--gpu_ids", "-1"])
        assert (opt.device, opt.precision, opt.fold_linear, opt.ot, opt.compile, opt.cuda_graphs) == (
            "cpu", "fp32", "off", "auto", "off", "off")


@pytest.mark.parametrize("args, fold_linear", [([], "off"), (["--precision", "fp16"], "on"),
                                               (["--precision", "bf16"], "on"),
                                               (["--precision", "fp16", "--fold_linear", "off"], "off"),
                                               (["--fold_linear", "on"], "on")])
def test_fold_linear_auto_follows_the_precision(args, fold_linear):
    assert parse(TrainOptions, ["--gpu_ids", "-1", *args]).fold_linear == fold_linear


@pytest.mark.parametrize("options_class", [TrainOptions, TestOptions])
def test_help_text_formats(options_class):
    """argparse %-formats help texts, so a bare percent sign in one made --help raise TypeError."""
    from options.base_options import build_parser
    assert "38% of the arithmetic" in " ".join(build_parser(options_class).format_help().split())


@pytest.mark.parametrize("args, message", [
    (["--model", "foo"], "error: argument --model: invalid choice: 'foo' (choose from 'ver2ver', 'npt'); see --help"),
    (["--ngf", "abc"], "error: argument --ngf: invalid int value: 'abc'; see --help"),
    (["--no_such_flag"], "error: unrecognized arguments: --no_such_flag; see --help"),
])
def test_usage_errors_are_one_line(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse(TrainOptions, ["--gpu_ids", "-1", *args])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == message + "\n"


def _write_opt_json(tmp_path, content: bytes) -> None:
    (tmp_path / "human").mkdir()
    (tmp_path / "human" / "opt.json").write_bytes(content)


@pytest.mark.parametrize("saved, message", [
    ({"ngf": None}, '"ngf" must be an int, got null'),
    ({"batchSize": 2.5}, '"batchSize" must be an int, got 2.5'),
    ({"ngf": "abc"}, '"ngf" must be an int, got "abc"'),
    ({"ngf": True}, '"ngf" must be an int, got true'),
    ({"model": "foo"}, '"model" must be one of ver2ver, npt, got "foo"'),
    ({"gpu_ids": 0.5}, '"gpu_ids" must be a string, got 0.5'),
    ({"gpu_ids": [0, 1]}, '"gpu_ids" must be a string, got [0, 1]'),
    ({"lr": "fast"}, '"lr" must be a number or null, got "fast"'),
    ({"continue_train": 1}, '"continue_train" must be true or false, got 1'),
])
def test_bad_values_in_opt_file_name_the_file_and_key(tmp_path, saved, message):
    _write_opt_json(tmp_path, json.dumps(saved).encode())
    path = tmp_path / "human" / "opt.json"
    with pytest.raises(ValueError) as error:
        parse(TrainOptions, ["--checkpoints_dir", str(tmp_path), "--load_from_opt_file"])
    assert str(error.value) == f"{path}: {message}; fix or delete the file"


def test_out_of_range_value_from_opt_file_names_the_file(tmp_path):
    """A value of the right type that validation refuses says it came from opt.json; given on the command line
    instead, the same check's message is left as it is."""
    _write_opt_json(tmp_path, json.dumps({"ngf": 0, "batchSize": 4}).encode())
    path = tmp_path / "human" / "opt.json"
    with pytest.raises(ValueError) as error:
        parse(TrainOptions, ["--gpu_ids", "-1", "--checkpoints_dir", str(tmp_path), "--load_from_opt_file"])
    assert str(error.value) == (f"--ngf must be at least 1, got 0 (ngf taken from {path}; fix the file, delete it, "
                                f"or give --ngf on the command line)")
    assert parse(TrainOptions, ["--gpu_ids", "-1", "--checkpoints_dir", str(tmp_path), "--load_from_opt_file",
                                "--ngf", "8"]).batchSize == 4
    with pytest.raises(ValueError) as error:
        parse(TrainOptions, ["--gpu_ids", "-1", "--checkpoints_dir", str(tmp_path), "--load_from_opt_file",
                             "--ngf", "8", "--batchSize", "0"])
    assert str(error.value) == "--batchSize must be at least 1, got 0"


def test_opt_file_values_convert_as_their_flags_do(tmp_path):
    """An int for a string flag (gpu_ids, which_epoch) and the text of a number are unambiguous; null stands for
    the model's published value; --overwrite is consent for one run and never taken from the file."""
    _write_opt_json(tmp_path, json.dumps({"gpu_ids": -1, "which_epoch": 10, "ngf": "16", "lr": None,
                                          "overwrite": True, "unknown_key": 1}).encode())
    opt = parse(TrainOptions, ["--checkpoints_dir", str(tmp_path), "--load_from_opt_file"])
    assert (opt.gpu_ids, opt.which_epoch, opt.ngf, opt.lr, opt.overwrite) == ("-1", "10", 16, 1e-4, False)


def test_opt_file_that_is_not_utf8_is_named(tmp_path):
    _write_opt_json(tmp_path, b'\xff\xfe{"ngf": 8}')
    with pytest.raises(ValueError, match=r"opt\.json is not valid UTF-8 JSON .*; fix or delete the file"):
        parse(TrainOptions, ["--gpu_ids", "-1", "--checkpoints_dir", str(tmp_path), "--load_from_opt_file"])


@pytest.mark.parametrize("args, message", [
    (["--train_identities", "0-100000000000"], "names 100,000,000,001 indices; at most 10,000,000"),
    (["--train_poses", "0-5000000,5000001-10000000"], "names 10,000,001 indices; at most 10,000,000"),
    (["--epoch_size", "100000000001"], "at most 10,000,000 pairs, got 100,000,000,001"),
])
def test_sizes_too_large_to_list_in_memory(args, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse(TrainOptions, ["--gpu_ids", "-1", *args])


def test_overwrite_and_continue_train_together_are_refused():
    with pytest.raises(ValueError, match="--overwrite starts over and --continue_train resumes; pass one of them"):
        parse(TrainOptions, ["--gpu_ids", "-1", "--overwrite", "--continue_train"])


def test_largest_sizes_are_accepted():
    opt = parse(TrainOptions, ["--gpu_ids", "-1", "--train_identities", "5-10000004", "--epoch_size", "10000000"])
    assert opt.epoch_size == 10_000_000
