"""Train 3D-CoreNet on a folder of meshes (human or animal layout), on the CPU, one GPU or, under
torchrun, several GPUs with DistributedDataParallel.

    python train.py --dataset_mode human --dataroot DATA --gpu_ids 0
    torchrun --nproc_per_node=4 train.py --dataset_mode human --dataroot DATA --gpu_ids 0,1,2,3

Files follow the published layout in <checkpoints_dir>/<dataset_mode> (util/checkpoint.py), and
--continue_train resumes exactly where the last 'latest' save stopped; a folder that already holds a trained
model is replaced only with --overwrite.
"""
from __future__ import annotations

import functools
import itertools
import json
import math
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from data import DATASETS, FileBatches, TrainPairDataset
from data.packed import PackedPairSampler, has_packed
from data.split import parse_index_list, read_split_file
from models import create_model
from models.train_step import GraphedTrainingStep, training_step
from options.base_options import options_dict, parse, save_options
from options.train_options import MAX_EPOCH_SIZE, MAX_INDICES, TrainOptions
from util import checkpoint
from util.atomic import atomic_write_text
from util.cli import run_main
from util.distributed import barrier, cleanup, init_distributed, is_main_process, mean_over_processes
from util.logger import TrainingLogger
from util.mesh_io import write_mesh


# What a training run writes into <checkpoints_dir>/<dataset_mode>: the files --overwrite sets aside.
RUN_FILE_PATTERNS = ("*_net_*.pth", "*_resume.pth", "optimizer.pth", "iter.txt", "opt.json", "opt.txt",
                     "data_stats.json", "loss_log.txt", "tensorboard")


def holds_trained_model(directory: Path) -> bool:
    return any(directory.glob("*_net_*.pth")) or any(directory.glob("*_resume.pth"))


def refuse_to_replace_a_trained_model(opt: TrainOptions) -> None:
    """A fresh run writes the same file names as the one before it, so starting one in a folder that holds a
    trained model would silently replace that model; ask for --continue_train or --overwrite instead."""
    if opt.continue_train or opt.overwrite:
        return
    if holds_trained_model(opt.checkpoint_dir):
        raise FileExistsError(f"{opt.checkpoint_dir} already holds a trained model; pass --continue_train to resume "
                              f"it or --overwrite to start over (its files are moved into a replaced_<time> folder)")


def set_aside_previous_run(directory: Path) -> Path | None:
    """Move the files of the run a --overwrite replaces into <directory>/replaced_<time>, so that the folder holds
    the new run alone (no epoch file of the old one is mistaken for the new one's) and nothing is deleted.

    Returns:
        the folder they went to, or None when the directory holds no trained model.
    """
    if not holds_trained_model(directory):
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    names = itertools.chain([f"replaced_{stamp}"], (f"replaced_{stamp}_{count}" for count in itertools.count(2)))
    aside = next(directory / name for name in names if not (directory / name).exists())
    aside.mkdir()
    for pattern in RUN_FILE_PATTERNS:
        for path in directory.glob(pattern):
            path.rename(aside / path.name)
    return aside


def training_split(opt: TrainOptions) -> tuple[list[int], list[int], int]:
    """Identities, poses and pairs per epoch: from the flags, else <dataroot>/split.json, else the published
    layout; refused when the meshes they name or the epoch are too many to list in memory."""
    layout = DATASETS[opt.dataset_mode]
    split = read_split_file(opt.dataroot)
    if split is not None and split["dataset_mode"] != opt.dataset_mode:
        raise ValueError(f"{opt.dataroot}/split.json is for dataset_mode {split['dataset_mode']!r} but "
                         f"--dataset_mode is {opt.dataset_mode!r}")
    defaults = split or {"train_identities": layout.train_identities, "train_poses": layout.train_poses,
                         "epoch_size": layout.epoch_size}
    identities = parse_index_list(opt.train_identities) if opt.train_identities else list(defaults["train_identities"])
    poses = parse_index_list(opt.train_poses) if opt.train_poses else list(defaults["train_poses"])
    if len(identities) * len(poses) > MAX_INDICES:
        raise ValueError(f"training on {len(identities):,} identities x {len(poses):,} poses names more than "
                         f"{MAX_INDICES:,} meshes, the most supported; narrow --train_identities or --train_poses")
    epoch_size = opt.epoch_size or defaults["epoch_size"]
    if epoch_size > MAX_EPOCH_SIZE:  # --epoch_size is checked with the options; this one is split.json's
        raise ValueError(f"{opt.dataroot}/split.json asks for epoch_size {epoch_size:,}; at most {MAX_EPOCH_SIZE:,} "
                         f"pairs per epoch are supported: lower it there or give --epoch_size")
    return identities, poses, epoch_size


def build_training_batches(opt: TrainOptions, device: torch.device) -> FileBatches | PackedPairSampler:
    """The training pairs of training_split, drawn on the device from <dataroot>/packed when it exists
    (--loader auto), else read from the files."""
    layout = DATASETS[opt.dataset_mode]
    identities, poses, epoch_size = training_split(opt)
    if opt.loader == "packed" or (opt.loader == "auto" and has_packed(opt.dataroot)):
        if not has_packed(opt.dataroot):
            raise FileNotFoundError(f"--loader packed needs {opt.dataroot}/packed; make it with 'python -m "
                                    f"data.packed --dataroot {opt.dataroot} --dataset_mode {opt.dataset_mode}'")
        return PackedPairSampler(opt.dataroot, layout, identities, poses, epoch_size, opt.batchSize, opt.seed, device,
                                 rank=opt.rank, world_size=opt.world_size)
    dataset = TrainPairDataset(opt.dataroot, layout, identities, poses, epoch_size, seed=opt.seed)
    return FileBatches(dataset, opt.batchSize, opt.nThreads, opt.distributed)


def training_data_stats(meshes: list[torch.Tensor]) -> dict:
    """Mean bounding-box size of some training meshes (V, 3), so transfer.py can warn about far-off scales."""
    extents = torch.stack([mesh.amax(dim=0) - mesh.amin(dim=0) for mesh in meshes]).mean(dim=0)
    return {"bbox_size": [round(value, 6) for value in extents.tolist()], "num_vertices": meshes[0].shape[0],
            "meshes_measured": len(meshes)}


def learning_rate(opt: TrainOptions, epoch: int, decay: bool = True) -> float:
    """lr for a 1-based epoch: constant for niter epochs, then down by lr/niter_decay after each epoch
    (SPEC.md); constant throughout when decay is off (NPT's schedule)."""
    if not decay or not opt.niter_decay:
        return opt.lr
    return opt.lr - opt.lr / opt.niter_decay * max(0, epoch - opt.niter - 1)


def crossed(samples_seen: int, step: int, every: int) -> bool:
    """True when the last step of `step` pairs passed a multiple of `every`."""
    return samples_seen // every > (samples_seen - step) // every


def write_training_meshes(directory: Path, prefix: str, batch: dict, outputs: dict) -> None:
    """Identity, pose, warp (3D-CoreNet only) and output of the first pair of a batch, as OBJ files."""
    identity_faces = batch["identity_faces"][0].cpu().numpy()
    meshes = {"id": (batch["identity_points"][0], identity_faces),
              "pose": (batch["pose_points"][0], batch["pose_faces"][0].cpu().numpy()),
              "out": (outputs["fake_points"][0], identity_faces)}
    if "warp_out" in outputs:
        meshes["warp"] = (outputs["warp_out"][0], identity_faces)
    for suffix, (points, faces) in meshes.items():
        write_mesh(directory / f"{prefix}_{suffix}.obj", points.detach().float().cpu().numpy(), faces)


def save_checkpoint(opt: TrainOptions, model, optimizer, scaler, lr: float, epoch: int, iteration: int,
                    samples_seen: int, options_json: dict, label: str = "latest") -> None:
    """Rank 0 writes the published files (networks under label; for "latest" also optimizer.pth, iter.txt and
    the resume file); every rank waits for it."""
    if is_main_process():
        directory = opt.checkpoint_dir
        checkpoint.save_networks(model, directory, label)
        if label == "latest":
            checkpoint.atomic_save({"G": optimizer.state_dict(), "lr": lr}, directory / "optimizer.pth")
            atomic_write_text(f"{epoch},{iteration * opt.batchSize * opt.world_size}\n", directory / "iter.txt")
            checkpoint.save_training_state(directory / "latest_resume.pth", model, optimizer, scaler, lr, epoch,
                                           iteration, samples_seen, options_json)
    barrier()


def resume_point(opt: TrainOptions, model, optimizer, scaler) -> tuple[int, int, int]:
    """First epoch, iteration within it and pairs seen so far: (1, 0, 0), or with --continue_train the saved
    training state, loaded into model, optimizer and scaler."""
    if not opt.continue_train:
        return 1, 0, 0
    resume_file = opt.checkpoint_dir / f"{opt.which_epoch}_resume.pth"
    if opt.which_epoch != "latest" and not resume_file.is_file():
        raise FileNotFoundError(f"--continue_train --which_epoch {opt.which_epoch}: only the latest save keeps the "
                                f"optimizer and training state (latest_resume.pth); epoch {opt.which_epoch}'s files "
                                f"hold the weights alone. Drop --which_epoch to resume from the latest save")
    state = checkpoint.load_training_state(resume_file, model, optimizer, scaler)
    return state["epoch"], state["iteration"], state["samples_seen"]


def main(opt: TrainOptions) -> None:
    refuse_to_replace_a_trained_model(opt)
    init_distributed(opt.device, opt.world_size)
    torch.manual_seed(opt.seed + opt.rank)
    device = torch.device(opt.device)
    batches = build_training_batches(opt, device)
    model = create_model(opt).to(device)
    # fused: one kernel for the whole update on a GPU (same arithmetic as the default implementation);
    # capturable: its step count on the GPU, as a CUDA graph of the training step needs.
    graphed = opt.cuda_graphs == "on"
    optimizer = torch.optim.Adam(model.parameters(), lr=opt.lr, betas=(opt.beta1, opt.beta2),
                                 eps=model.OPTIMIZER["eps"], fused=device.type == "cuda", capturable=graphed)
    # Loss scaling only for fp16; bf16 and fp32 need none (nanoGPT's rule).
    scaler = torch.amp.GradScaler(device.type, enabled=opt.precision == "fp16")
    options_json = options_dict(opt)
    total_epochs = opt.niter + opt.niter_decay

    first_epoch, start_iteration, samples_seen = resume_point(opt, model, optimizer, scaler)
    if first_epoch > total_epochs:
        if is_main_process():
            print(f"training already finished at epoch {first_epoch - 1} (--niter {opt.niter} + --niter_decay "
                  f"{opt.niter_decay}); to train more, raise --niter or --niter_decay and --continue_train again")
        cleanup()
        return
    if is_main_process():
        print(f"training on {opt.device} x {opt.world_size}, {len(batches)} batches per epoch from {opt.dataroot} "
              f"({type(batches).__name__}), epochs {first_epoch}..{total_epochs}")
        # Options are written once the data and the model are set up, so a run that fails before keeps the last.
        stats = {"model": opt.model, "dataset_mode": opt.dataset_mode, **training_data_stats(batches.sample_meshes())}
        aside = set_aside_previous_run(opt.checkpoint_dir) if opt.overwrite else None
        if aside is not None:
            print(f"--overwrite: the previous run's files were moved to {aside}")
        save_options(opt, opt.checkpoint_dir)
        atomic_write_text(json.dumps(stats, indent=1) + "\n", opt.checkpoint_dir / "data_stats.json")
    network = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if opt.distributed else model
    step = GraphedTrainingStep(network, optimizer, scaler) if graphed else \
        functools.partial(training_step, network, optimizer, scaler)
    logger = TrainingLogger(opt.checkpoint_dir)
    mesh_dir = Path(opt.output_dir) / opt.dataset_mode
    global_batch = opt.batchSize * opt.world_size

    for epoch in range(first_epoch, total_epochs + 1):
        lr = learning_rate(opt, epoch, decay=model.LR_DECAY)
        for group in optimizer.param_groups:
            group["lr"] = lr
        progress = tqdm(batches.epoch_batches(epoch, start_iteration), desc=f"epoch {epoch}/{total_epochs}",
                        initial=start_iteration, total=len(batches), disable=not is_main_process(),
                        dynamic_ncols=True)
        started = time.perf_counter()
        for iteration, batch in enumerate(progress, start=start_iteration + 1):
            outputs, losses = step(batch)
            samples_seen += global_batch

            if crossed(samples_seen, global_batch, opt.print_freq):
                values = mean_over_processes(losses)
                if not all(math.isfinite(value) for value in values.values()):
                    raise RuntimeError(f"the loss became non-finite at epoch {epoch}, iteration {iteration} "
                                       f"({values}); lower --lr or check the data")
                seconds = (time.perf_counter() - started) / ((iteration - start_iteration) * opt.batchSize)
                line = logger.losses(epoch, iteration * global_batch, samples_seen, seconds, values, lr)
                if line:
                    progress.write(line)
            if crossed(samples_seen, global_batch, opt.display_freq) and is_main_process():
                write_training_meshes(mesh_dir, f"{epoch}_{samples_seen}", batch, outputs)
            if crossed(samples_seen, global_batch, opt.save_latest_freq):
                save_checkpoint(opt, model, optimizer, scaler, lr, epoch, iteration, samples_seen, options_json)
        start_iteration = 0
        save_checkpoint(opt, model, optimizer, scaler, lr, epoch + 1, 0, samples_seen, options_json)
        if epoch % opt.save_epoch_freq == 0 or epoch == total_epochs:
            save_checkpoint(opt, model, optimizer, scaler, lr, epoch + 1, 0, samples_seen, options_json,
                            label=str(epoch))
    logger.close()
    cleanup()


if __name__ == "__main__":
    run_main(lambda: main(parse(TrainOptions, script="train.py")))
