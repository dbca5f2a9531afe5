"""Exactly-once evaluation over devices: dataset indices travel with the samples, nothing is padded."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, DistributedSampler


class IndexedDataset(Dataset):
    """Wraps a dataset of `(image, label)` items to yield `(image, label, index)`."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, label = self.dataset[index][:2]
        return image, label, index


class ExactlyOnceSampler(DistributedSampler):
    """The first `num_samples_total` indices split over `num_replicas` ranks, each index on exactly one rank.

    Unlike `DistributedSampler` it never pads ranks to equal length with repeated samples (which would
    count those samples twice in the metrics); rank `r` gets indices `r, r + R, r + 2R, ...`. It subclasses
    `DistributedSampler` only so that Lightning recognises it as distributed and does not replace it.
    """

    def __init__(self, dataset: Dataset, num_samples_total: int, num_replicas: int = 1, rank: int = 0) -> None:
        if not 0 < num_samples_total <= len(dataset):
            raise ValueError(f"num_samples_total must be in [1, {len(dataset)}], got {num_samples_total}.")
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.indices = list(range(rank, num_samples_total, num_replicas))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def sample_seeds(global_seed: int, indices: torch.Tensor) -> torch.Tensor:
    """One noise seed per sample from the global seed and the dataset index (not the batch or the device).

    A multiplicative hash keeps neighbouring indices and neighbouring global seeds from sharing seeds.
    """
    mixed = (int(global_seed) * 0x9E3779B1 + indices.to(torch.int64) * 0x85EBCA77) % (2**31 - 1)
    return mixed
