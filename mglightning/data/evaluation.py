"""Exactly-once evaluation over devices: dataset indices travel with the samples, nothing is padded."""

from __future__ import annotations

from typing import Sequence

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
    """Given dataset indices split over `num_replicas` ranks, each index on exactly one rank.

    Unlike `DistributedSampler` it never pads ranks to equal length with repeated samples (which would
    count those samples twice in the metrics); rank `r` gets `indices[r], indices[r + R], ...`, so a rank may
    get one sample fewer than another, or none. It subclasses `DistributedSampler` only so that Lightning
    recognises it as distributed and does not replace it.

    Args:
        dataset: the dataset the indices point into.
        indices: the dataset indices to visit (e.g. the first N, less those a resumed run already recorded).
        num_replicas: the number of ranks.
        rank: this process's rank.

    Example:
        >>> list(ExactlyOnceSampler(range(10), [0, 1, 2, 4, 5], num_replicas=2, rank=1))
        [1, 4]
    """

    def __init__(self, dataset: Dataset, indices: Sequence[int], num_replicas: int = 1, rank: int = 0) -> None:
        indices = [int(index) for index in indices]
        if any(not 0 <= index < len(dataset) for index in indices):
            raise ValueError(f"indices must lie in [0, {len(dataset)}), the dataset's range.")
        if len(set(indices)) != len(indices):
            raise ValueError("indices must not repeat: each sample is evaluated exactly once.")
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.indices = indices[rank::num_replicas]

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
