"""Options shared by train.py and test.py, with the published flag spellings and defaults.

Each option is one dataclass field carrying its default and help; the argparse parser is built from the
fields, so a flag is declared in exactly one place. `parse` returns a frozen instance with the derived
values (device, distributed rank and world size) computed once. Options are saved as opt.txt (the values
the run used, non-defaults marked) and opt.json (as given: an "auto" stays auto); `--load_from_opt_file`
reads that JSON back, each value checked by its flag's own type and choices. Nothing is pickled.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch

from data import DATASETS
from models import MODELS
from models.networks import GENERATORS, INIT_TYPES
from models.networks.npt import NPT_VARIANTS
from models.networks.correspondence import WARPS
from models.base_model import PRECISIONS
from util.atomic import atomic_write_text
from util.cli import OneLineErrorParser


def option(default: Any, help: str, **argparse_kwargs: Any) -> Any:
    """A dataclass field that is also a command-line flag --<name>."""
    return field(default=default, metadata={"help": help, "argparse": argparse_kwargs})


def derived() -> Any:
    """A field computed by `parse`, not settable from the command line."""
    return field(default=None, metadata={"derived": True})


@dataclass(frozen=True)
class BaseOptions:
    gpu_ids: str = option("auto", "GPU ids such as 0 or 0,1, or -1 for the CPU. Published default 0,1,2,3; "
                          "here 'auto' means GPU 0 when CUDA is available, else the CPU. Several GPUs need "
                          "torchrun (see README).")
    checkpoints_dir: str = option("./checkpoints", "models are saved in <checkpoints_dir>/<dataset_mode>")
    batchSize: int = option(8, "input batch size (per process under torchrun)")
    model: str = option("ver2ver", "which model: ver2ver (3D-CoreNet) or npt (the NPT baseline)",
                        choices=tuple(MODELS))
    npt_variant: str = option("original", "NPT variant: original (per-vertex pose features; needs equal vertex "
                              "counts) or maxpool (any counts)", choices=NPT_VARIANTS)
    dataroot: str = option("./npt-data", "folder holding the mesh files")
    dataset_mode: str = option("human", "data layout: human (id{i}_{p}.obj) or animal (toy_{i}_{p}.ply)",
                               choices=tuple(DATASETS))
    nThreads: int = option(min(4, os.cpu_count() or 1),
                           "data loader worker processes (published default 16; here min(4, CPU count))")
    netG: str = option("elain", "generator architecture", choices=tuple(GENERATORS))
    ngf: int = option(64, "feature width of the networks (the published checkpoints use 64)")
    init_type: str = option("xavier", "network initialisation", choices=INIT_TYPES)
    init_variance: float = option(0.02, "gain (or std) of the initialisation")
    seed: int = option(0, "random seed for pair sampling and vertex permutations")
    precision: str = option("auto", "generator arithmetic: fp32 (the published reference), fp16 or bf16 "
                            "autocast (bf16 rounds coarser: output 1.4e-2 from the reference on the golden fixture, "
                            "fp16 1.8e-3); auto = fp16 on a GPU, fp32 on the CPU and for --model npt. The "
                            "correspondence network's forward always runs in fp32, its backward products in fp16/bf16 "
                            "with those; --model npt autocasts its whole network",
                            choices=("auto", *PRECISIONS))
    ot: str = option("auto", "optimal-transport warp: dense (published), stored (C kept once, compiled "
                     "log-domain passes), chunked (memory linear in the vertex count); auto = stored or, when C "
                     "would not fit, chunked on a GPU; dense on the CPU or, for a pair whose N x M tensors would not "
                     "fit in the memory available, chunked (the same values)", choices=tuple(WARPS))
    fold_linear: str = option("auto", "compose the generator's consecutive affine layers into one: the same function "
                              "with 38%% of the arithmetic, other rounding; auto = on with --precision fp16 or "
                              "bf16, off with fp32 (the published arithmetic)", choices=("auto", "on", "off"))
    compile: str = option("auto", "torch.compile the generator and the correspondence network: on, off, or "
                          "auto (on for GPU training)",
                          choices=("auto", "on", "off"))
    cuda_graphs: str = option("auto", "replay from CUDA graphs, which removes most kernel-launch cost: inference "
                              "(test.py, transfer.py) per input shape met before, and train.py's whole training "
                              "step in one process; auto = on for 3D-CoreNet on a GPU (training in one process), "
                              "off otherwise",
                              choices=("auto", "on", "off"))
    load_from_opt_file: bool = option(False, "take option defaults from <checkpoints_dir>/<dataset_mode>/opt.json; "
                                      "flags given on the command line still win")
    isTrain: ClassVar[bool] = False
    device: str = derived()
    rank: int = derived()
    local_rank: int = derived()
    world_size: int = derived()
    # The AUTO_CHOICES as given, before "auto" was resolved for this machine: what opt.json keeps.
    choices_as_given: dict = derived()

    def published_defaults(self) -> dict:
        """Values for flags left at None, which depend on --model; none here."""
        return {}

    def validate(self) -> None:
        """Reject values no run can use, with one line each."""
        for name in ("batchSize", "ngf"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.nThreads < 0:
            raise ValueError(f"--nThreads must be 0 or more, got {self.nThreads}")
        if self.cuda_graphs == "on" and self.isTrain and self.world_size > 1:
            raise ValueError("--cuda_graphs on replays one process's training step; with several processes "
                             "(torchrun) drop the flag")
        if self.cuda_graphs == "on" and not self.device.startswith("cuda"):
            raise ValueError(f"--cuda_graphs on needs a GPU, but this run is on {self.device}; "
                             f"drop the flag or choose a GPU with --gpu_ids")

    @property
    def checkpoint_dir(self) -> Path:
        """<checkpoints_dir>/<dataset_mode>, where the published code keeps its files."""
        return Path(self.checkpoints_dir) / self.dataset_mode

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


OptionsT = TypeVar("OptionsT", bound=BaseOptions)


def _user_fields(options_class: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(options_class) if not f.metadata.get("derived")]


def _flag_type(f: dataclasses.Field) -> type:
    """The type argparse converts the flag's text with: the one given, else the default's (str for None)."""
    return f.metadata["argparse"].get("type", type(f.default) if f.default is not None else str)


def build_parser(options_class: type) -> argparse.ArgumentParser:
    """An argparse parser with one --flag per user field of options_class; usage errors are one line."""
    parser = OneLineErrorParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in _user_fields(options_class):
        if isinstance(f.default, bool):
            parser.add_argument(f"--{f.name}", action="store_true", help=f.metadata["help"])
            continue
        kwargs = {**f.metadata["argparse"], "type": _flag_type(f)}
        parser.add_argument(f"--{f.name}", default=f.default, help=f.metadata["help"], **kwargs)
    return parser


def _resolve_device(gpu_ids: str, local_rank: int) -> str:
    """Turn --gpu_ids into one torch device string for this process."""
    if gpu_ids == "auto":
        return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    try:
        ids = [int(part) for part in gpu_ids.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--gpu_ids {gpu_ids!r} is not a comma-separated list of integers") from None
    if not ids or ids == [-1]:
        return "cpu"
    if not torch.cuda.is_available():
        raise RuntimeError(f"--gpu_ids {gpu_ids} asks for a GPU but CUDA is not available on this machine; "
                           f"use --gpu_ids -1 to run on the CPU")
    if local_rank >= len(ids):
        raise ValueError(f"--gpu_ids {gpu_ids} names {len(ids)} GPUs but torchrun started process "
                         f"{local_rank}; give one GPU id per process")
    if ids[local_rank] >= torch.cuda.device_count():
        raise RuntimeError(f"--gpu_ids {gpu_ids} asks for GPU {ids[local_rank]} but only "
                           f"{torch.cuda.device_count()} are visible")
    return f"cuda:{ids[local_rank]}"


def _check_launch(gpu_ids: str, world_size: int, script: str) -> None:
    """Several GPUs without torchrun: tell the user the command instead of silently using one."""
    ids = [part for part in gpu_ids.split(",") if part.strip()]
    if world_size == 1 and len(ids) > 1 and gpu_ids != "auto":
        raise RuntimeError(
            f"--gpu_ids {gpu_ids} asks for {len(ids)} GPUs; start one process per GPU with "
            f"'torchrun --nproc_per_node={len(ids)} {script} ...' (same flags)")


# Flags that consent to something for one invocation (replacing files, reading opt.json): never taken from
# opt.json, so that a saved run cannot give the consent on the user's behalf.
PER_INVOCATION_FLAGS = ("load_from_opt_file", "overwrite")

# Options whose "auto" is resolved for the machine a run is on. opt.json keeps them as given, so that a
# run loading it (--load_from_opt_file) on another machine resolves them for its own.
AUTO_CHOICES = ("precision", "fold_linear", "ot", "compile", "cuda_graphs")


def parse(options_class: type[OptionsT], args: list[str] | None = None, script: str = "train.py") -> OptionsT:
    """Parse the command line into a frozen options_class instance.

    Args:
        options_class: BaseOptions or a subclass (TrainOptions, TestOptions).
        args: the arguments (default sys.argv[1:]).
        script: the program name, used in the torchrun hint.
    """
    parser = build_parser(options_class)
    parsed = parser.parse_args(args)
    opt_file, from_opt_file = None, set()
    if parsed.load_from_opt_file:
        opt_file = Path(parsed.checkpoints_dir) / parsed.dataset_mode / "opt.json"
        saved = opt_file_defaults(options_class, opt_file)
        parser.set_defaults(**saved)
        command_line = vars(parsed)
        parsed = parser.parse_args(args)
        from_opt_file = {name for name, value in saved.items()
                         if getattr(parsed, name) == value and command_line[name] != value}
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    _check_launch(parsed.gpu_ids, world_size, script)
    values = vars(parsed)
    device = _resolve_device(parsed.gpu_ids, local_rank)
    on_gpu = device.startswith("cuda")
    values.update(rank=rank, local_rank=local_rank, world_size=world_size, device=device,
                  choices_as_given={name: values[name] for name in AUTO_CHOICES})
    # "auto" picks the fast path on a GPU and the reference path on the CPU, once, here (--ot auto chooses per pair,
    # by its size: models/networks/correspondence.py auto_warp).
    if values["precision"] == "auto":
        # NPT keeps its published fp32 unless asked: its mixed-precision training is not checked on a GPU yet.
        values["precision"] = "fp16" if on_gpu and values["model"] != "npt" else "fp32"
    if values["fold_linear"] == "auto":
        values["fold_linear"] = "off" if values["precision"] == "fp32" else "on"
    if values["compile"] == "auto":
        values["compile"] = "on" if on_gpu and options_class.isTrain else "off"
    if values["cuda_graphs"] == "auto":
        # NPT has not been replayed from a graph on a GPU yet, so it stays eager unless asked; a graphed training step
        # is one process's (DistributedDataParallel's communication is not captured).
        one_process = not options_class.isTrain or world_size == 1
        values["cuda_graphs"] = "on" if on_gpu and one_process and values["model"] == "ver2ver" else "off"
    options = options_class(**values)
    unset = {name: value for name, value in options.published_defaults().items() if getattr(options, name) is None}
    if unset:
        options = dataclasses.replace(options, **unset)
    try:
        options.validate()
    except ValueError as err:
        raise _naming_opt_file(err, from_opt_file, opt_file) from None
    return options


def _naming_opt_file(err: ValueError, from_opt_file: set[str], opt_file: Path | None) -> ValueError:
    """err, with the opt.json it came from named when the flag it names (--name) took its value from that file."""
    named = [name for name in re.findall(r"--(\w+)", str(err)) if name in from_opt_file]
    if not named:
        return err
    return ValueError(f"{err} ({', '.join(named)} taken from {opt_file}; fix the file, delete it, or give "
                      f"--{named[0]} on the command line)")


def read_options_json(path: Path) -> dict[str, Any]:
    """Read a saved opt.json; FileNotFoundError/ValueError with one line when missing or malformed."""
    if not path.is_file():
        raise FileNotFoundError(f"--load_from_opt_file: {path} does not exist; train first or drop the flag")
    try:
        values = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid UTF-8 JSON ({err}); fix or delete the file") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a JSON object of option values")
    return values


def opt_file_defaults(options_class: type, path: Path) -> dict[str, Any]:
    """The flag defaults that opt.json at path gives: its keys that name a flag of options_class (others, such as
    a newer version's, are ignored), each value checked as that flag would check it on the command line, so a
    hand-edited file fails here with one line naming the file and key rather than later with a traceback."""
    saved = read_options_json(path)
    fields = {f.name: f for f in _user_fields(options_class) if f.name not in PER_INVOCATION_FLAGS}
    return {name: _saved_value(fields[name], value, path) for name, value in saved.items() if name in fields}


def _saved_value(f: dataclasses.Field, value: Any, path: Path) -> Any:
    """value of opt.json's key f.name converted as the flag converts its text; ValueError naming file and key."""
    try:
        return _convert_saved(f, value)
    except ValueError:
        raise ValueError(f'{path}: "{f.name}" must be {_expected(f)}, got {json.dumps(value)}; '
                         f'fix or delete the file') from None


def _convert_saved(f: dataclasses.Field, value: Any) -> Any:
    """A JSON value through the flag's type and choices. A store_true flag takes true/false; null only stands
    for a flag whose default is None (the model's published value); a number also for a string flag when it is
    an int, whose text is unambiguous (gpu_ids -1, which_epoch 10)."""
    flag_type, choices = _flag_type(f), f.metadata["argparse"].get("choices")
    if isinstance(f.default, bool) != isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, bool) or (value is None and f.default is None):
        return value
    if not isinstance(value, (str, int, float)) or (flag_type is str and isinstance(value, float)):
        raise ValueError(value)
    converted = flag_type(str(value))
    if choices is not None and converted not in choices:
        raise ValueError(value)
    return converted


def _expected(f: dataclasses.Field) -> str:
    """What a flag's value must be, in words, for the messages of _saved_value."""
    if isinstance(f.default, bool):
        return "true or false"
    choices = f.metadata["argparse"].get("choices")
    kind = (f"one of {', '.join(map(str, choices))}" if choices is not None
            else {int: "an int", float: "a number"}.get(_flag_type(f), "a string"))
    return f"{kind} or null" if f.default is None else kind


def options_text(options: BaseOptions) -> str:
    """One line per option, '[default: x]' after every value that differs from its default."""
    defaults = {f.name: f.default for f in _user_fields(type(options))}
    defaults.update(options.published_defaults())  # flags whose default is the model's published value
    lines = ["----------------- Options ---------------"]
    for f in _user_fields(type(options)):
        value = getattr(options, f.name)
        mark = f"\t[default: {defaults[f.name]}]" if value != defaults[f.name] else ""
        lines.append(f"{f.name:>25}: {value!s:<30}{mark}")
    lines.append("----------------- End -------------------")
    return "\n".join(lines)


def options_dict(options: BaseOptions) -> dict[str, Any]:
    """The user-settable options as a JSON-ready dict (what opt.json holds); AUTO_CHOICES as given."""
    as_given = options.choices_as_given or {}
    return {f.name: as_given.get(f.name, getattr(options, f.name)) for f in _user_fields(type(options))}


def save_options(options: BaseOptions, directory: Path) -> None:
    """Write opt.txt and opt.json (user options only) into directory."""
    atomic_write_text(options_text(options) + "\n", directory / "opt.txt")
    atomic_write_text(json.dumps(options_dict(options), indent=1) + "\n", directory / "opt.json")
