"""Training options: the published train flags on top of BaseOptions.

Frequencies (--print_freq, --display_freq, --save_latest_freq) count training pairs seen, summed over
all processes, as the published iteration counter does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from data.split import index_ranges
from models import MODELS
from options.base_options import BaseOptions, option

# Far beyond any real data set (the published ones: 15 x 400 and 40 x 400 meshes, 4000 and 11600 pairs an
# epoch), and low enough that the lists training builds from them fit in memory: index lists, the training
# meshes (identities x poses) and the epoch's sample order are all expanded in full.
MAX_INDICES = 10_000_000
MAX_EPOCH_SIZE = 10_000_000


@dataclass(frozen=True)
class TrainOptions(BaseOptions):
    isTrain: ClassVar[bool] = True
    display_freq: int = option(2000, "write training meshes (identity, pose, warp, output) every this many pairs")
    print_freq: int = option(100, "log losses every this many pairs")
    save_latest_freq: int = option(5000, "save the 'latest' checkpoint every this many pairs")
    save_epoch_freq: int = option(10, "also keep <epoch>_net_*.pth every this many epochs")
    continue_train: bool = option(False, "resume from the checkpoint --which_epoch: networks, optimizer, "
                                  "learning rate, epoch and iteration")
    which_epoch: str = option("latest", "checkpoint to resume from with --continue_train")
    niter: int = option(100, "epochs at the initial learning rate")
    niter_decay: int = option(100, "epochs over which the learning rate decays linearly to zero")
    beta1: float = option(None, "Adam beta1 (default: the model's published value, 0 for ver2ver, 0.9 for npt)",
                          type=float)
    beta2: float = option(None, "Adam beta2 (default: 0.9 for ver2ver, 0.999 for npt)", type=float)
    lr: float = option(None, "initial learning rate for Adam (default: 1e-4 for ver2ver, 5e-5 for npt, which "
                       "keeps it constant)", type=float)
    lambda_edge: float = option(None, "weight of the edge loss (default: 0.5 for ver2ver, 0.0005 for npt)",
                                type=float)
    lambda_rec: float = option(None, "weight of the reconstruction loss (default: 1000 for ver2ver, 1 for npt)",
                               type=float)
    train_identities: str = option("", "identity indices to train on, e.g. '0-14' (default: the data folder's "
                                   "split.json, else the published range of --dataset_mode)")
    train_poses: str = option("", "pose indices to train on, e.g. '200-599' (default as --train_identities)")
    epoch_size: int = option(0, "random pairs per epoch (0: split.json, else published 4000 human / 11600 animal)")
    loader: str = option("auto", "training data: files (OBJ/PLY via loader workers), packed (<dataroot>/packed, "
                         "drawn on the device; make it with python -m data.packed), auto = packed when it exists",
                         choices=("auto", "files", "packed"))
    output_dir: str = option("./output", "training meshes go to <output_dir>/<dataset_mode>")
    overwrite: bool = option(False, "start over in a <checkpoints_dir>/<dataset_mode> that already holds a trained "
                             "model; its files are moved into a replaced_<time> folder there (without this flag or "
                             "--continue_train, train.py refuses)")

    def published_defaults(self) -> dict:
        """Values for the flags left at None: the chosen model's published settings."""
        model_class = MODELS[self.model]
        beta1, beta2 = model_class.OPTIMIZER["betas"]
        return {"lr": model_class.OPTIMIZER["lr"], "beta1": beta1, "beta2": beta2, **model_class.LOSS_WEIGHTS}

    def validate(self) -> None:
        super().validate()
        if self.overwrite and self.continue_train:
            raise ValueError("--overwrite starts over and --continue_train resumes; pass one of them")
        for name in ("display_freq", "print_freq", "save_latest_freq", "save_epoch_freq"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.niter < 0 or self.niter_decay < 0 or self.niter + self.niter_decay < 1:
            raise ValueError(f"--niter {self.niter} and --niter_decay {self.niter_decay} must be non-negative "
                             f"and give at least one epoch")
        if not 0 <= self.epoch_size <= MAX_EPOCH_SIZE:
            raise ValueError(f"--epoch_size must be 0 (default) or positive, at most {MAX_EPOCH_SIZE:,} pairs, "
                             f"got {self.epoch_size:,}")
        for name in ("train_identities", "train_poses"):
            if not getattr(self, name):
                continue
            size = sum(end - start + 1 for start, end in index_ranges(getattr(self, name)))  # at most: with repeats
            if size > MAX_INDICES:
                raise ValueError(f"--{name} {getattr(self, name)} names {size:,} indices; at most {MAX_INDICES:,} "
                                 f"are supported")
