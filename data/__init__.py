"""Data sets and loaders: the layout registry and the one place that builds a DataLoader.

DATASETS maps --dataset_mode to the file layout of the published data sets (SPEC.md, "Data layouts");
its keys are the argparse choices. Every data set yields the same sample dict, so the model never
learns which layout it reads (STYLE.md, "Before and after" 2).
"""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate

from util.mesh_io import read_mesh
from data.pair_dataset import ANIMAL_LAYOUT, HUMAN_LAYOUT, MeshLayout, TestPairDataset, TrainPairDataset

DATASETS = {"human": HUMAN_LAYOUT, "animal": ANIMAL_LAYOUT}

__all__ = ["DATASETS", "FileBatches", "MeshLayout", "TestPairDataset", "TrainPairDataset", "create_dataloader"]


def collate_samples(samples: list[dict]) -> dict:
    """Stack samples into a batch; meshes of different sizes cannot share one, so say which and why."""
    for key in ("identity_points", "pose_points", "identity_faces", "pose_faces"):
        shapes = {tuple(sample[key].shape) for sample in samples}
        if len(shapes) > 1:
            names = ", ".join(sample[key.split("_")[0] + "_name"] for sample in samples)
            raise ValueError(f"the meshes {names} have different sizes ({key} {sorted(shapes)}) and cannot share "
                             f"a batch; use --batchSize 1")
    return default_collate(samples)


class FileBatches:
    """Training batches read from mesh files by DataLoader workers; the same interface as PackedPairSampler."""

    def __init__(self, dataset: TrainPairDataset, batch_size: int, num_workers: int, distributed: bool):
        self.dataset, self.batch_size = dataset, batch_size
        self.num_workers, self.distributed = num_workers, distributed

    def __len__(self) -> int:
        return len(create_dataloader(self.dataset, self.batch_size, 0, distributed=self.distributed))

    def epoch_batches(self, epoch: int, start_batch: int = 0) -> DataLoader:
        """This rank's batches of an epoch from batch start_batch on (resume)."""
        self.dataset.set_epoch(epoch)
        return create_dataloader(self.dataset, self.batch_size, self.num_workers, distributed=self.distributed,
                                 start_batch=start_batch)

    def sample_meshes(self, count: int = 16) -> list[torch.Tensor]:
        """A few training meshes (V, 3), spread over the set, for data statistics."""
        names = [self.dataset.layout.file_name(i, p) for i in self.dataset.identities for p in self.dataset.poses]
        return [torch.from_numpy(read_mesh(self.dataset.root / name)[0])
                for name in names[:: max(1, len(names) // count)][:count]]


def create_dataloader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    shuffle: bool = False,
    distributed: bool = False,
    drop_last: bool = False,
    start_batch: int = 0,
) -> DataLoader:
    """Batch a data set, splitting it across DDP ranks when distributed.

    Samples of one data set share their vertex and face counts, so the default collate stacks them into
    (B, N, 3) / (B, F, 3) tensors and lists of names. TrainPairDataset already draws every index at
    random, so training needs no shuffle; an unshuffled order is also what lets a resumed run skip the
    batches it has done.

    Args:
        dataset: a TrainPairDataset or TestPairDataset.
        batch_size: samples per batch on this rank.
        num_workers: loader processes; 0 reads in the calling process.
        shuffle: visit the samples in random order; when distributed, the caller calls
            loader.sampler.set_epoch(epoch) every epoch.
        distributed: give each rank of the initialised process group a disjoint share (rank r takes
            every world_size-th sample from r on when not shuffled).
        drop_last: drop the last incomplete batch (and, when distributed, the uneven tail).
        start_batch: skip this rank's first start_batch batches (resume mid-epoch); needs shuffle=False.
    Returns:
        the DataLoader.
    """
    if start_batch < 0:
        raise ValueError(f"start_batch must be non-negative, got {start_batch}")
    if start_batch and shuffle:
        raise ValueError(f"start_batch {start_batch} needs shuffle=False, since a shuffled order is not repeatable")
    if shuffle:
        sampler = DistributedSampler(dataset, shuffle=True, drop_last=drop_last) if distributed else None
    else:
        # A fixed order (strided across ranks when distributed), so that a resumed run can skip into it.
        order = DistributedSampler(dataset, shuffle=False, drop_last=drop_last) if distributed else range(len(dataset))
        sampler = list(order)[start_batch * batch_size:]
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=drop_last,
        collate_fn=collate_samples,
        # Workers are re-created every epoch so that they copy the dataset after its set_epoch call.
        persistent_workers=False,
    )
