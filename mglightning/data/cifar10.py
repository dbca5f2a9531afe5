"""CIFAR-10 in torchvision's on-disk format (the extracted `cifar-10-python.tar.gz`)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from mglightning.data.base import ImageDataModule, TensorImageDataset, stratified_split
from mglightning.data.transforms import crop_flip_transform, to_tensor_transform

CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch"
CIFAR10_META_FILE = "batches.meta"


def read_cifar10_batches(folder: str | Path, names: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Read CIFAR-10 batch pickles into `(N, 3, 32, 32)` uint8 images and `(N,)` int64 labels.

    Each file is a pickled dict whose `data` is an `(n, 3072)` uint8 array (1024 red, then 1024 green, then 1024
    blue values, each a row-major 32x32 plane) and whose `labels` is a list of n ints. The files' md5 sums are not
    checked (torchvision checks them when it downloads); the array shapes are.

    Example:
        >>> images, labels = read_cifar10_batches("data/cifar-10-batches-py", ("test_batch",))  # doctest: +SKIP
    """
    images, labels = [], []
    for name in names:
        path = Path(folder) / name
        with open(path, "rb") as file:
            # The files are Python 2 pickles; latin1 decodes their byte strings as the format intends.
            batch = pickle.load(file, encoding="latin1")
        data = np.asarray(batch["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(batch["labels"]) != len(data):
            raise ValueError(
                f"{path} is not a CIFAR-10 batch: expected 'data' of shape (n, 3072) and n 'labels', got "
                f"{data.shape} and {len(batch['labels'])}. Delete the folder and download it again."
            )
        images.append(torch.from_numpy(data.reshape(-1, 3, 32, 32)))
        labels.append(torch.as_tensor(batch["labels"], dtype=torch.long))
    return torch.cat(images), torch.cat(labels)


class CIFAR10DataModule(ImageDataModule):
    """CIFAR-10: 50,000 training and 10,000 test images of 32x32 pixels in 10 classes.

    `data_dir` is the folder that holds `cifar-10-batches-py/` (torchvision's layout). A seeded stratified
    `val_fraction` of the training set is held out for validation; the official test batch is the test set.
    Training augmentation: random 32x32 crop of the image zero-padded by 4 pixels, and horizontal flips.
    `mean`/`std` are the training set's per-channel statistics.

    Args:
        data_dir: folder containing (or to receive) `cifar-10-batches-py/`.
        download: download and extract the archive into `data_dir` if the files are missing (needs internet).
        batch_size: the GLOBAL batch size, divided among the devices.
        num_workers: dataloader worker processes.
        pin_memory: pin host memory for faster copies to an accelerator.
        val_fraction: share of each class of the training set held out for validation.
        seed: seed of the train/val split.

    Example:
        >>> dm = CIFAR10DataModule(data_dir="data", download=True)  # doctest: +SKIP
        >>> dm.prepare_data(); dm.setup("fit")  # doctest: +SKIP
    """

    def __init__(
        self,
        data_dir: str = "data",
        download: bool = False,
        batch_size: int = 128,
        num_workers: int = 4,
        pin_memory: bool = False,
        val_fraction: float = 0.1,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory)
        self.save_hyperparameters(logger=False)
        self.data_dir = Path(data_dir)
        self.download = download
        self.val_fraction = val_fraction
        self.seed = seed
        self.num_classes = 10
        self.image_size = 32
        self.in_chans = 3
        # Per-channel mean and standard deviation of the 50,000 training images in [0, 1].
        self.mean = (0.4914, 0.4822, 0.4465)
        self.std = (0.2470, 0.2435, 0.2616)

    @property
    def folder(self) -> Path:
        """Where the batch files are: `<data_dir>/cifar-10-batches-py`."""
        return self.data_dir / CIFAR10_FOLDER

    def _missing_files(self) -> list[str]:
        expected = (*CIFAR10_TRAIN_FILES, CIFAR10_TEST_FILE, CIFAR10_META_FILE)
        return [name for name in expected if not (self.folder / name).is_file()]

    def _check_files(self) -> None:
        missing = self._missing_files()
        if missing:
            raise FileNotFoundError(
                f"CIFAR-10 not found: {self.folder} lacks {', '.join(missing)}. Expected torchvision's layout, "
                f"{self.folder}/{{data_batch_1..5, test_batch, batches.meta}} (the extracted cifar-10-python.tar.gz "
                "from https://www.cs.toronto.edu/~kriz/cifar.html). Set --data.download true to download it, or "
                "point --data.data_dir at the folder that contains cifar-10-batches-py/."
            )

    def prepare_data(self) -> None:
        """Download CIFAR-10 with torchvision if `download` is set and the files are missing; else check them."""
        if self.download and self._missing_files():
            from torchvision.datasets import CIFAR10  # only needed for the download, which also checks md5 sums

            CIFAR10(root=str(self.data_dir), train=True, download=True)
        self._check_files()

    def _build_fit_datasets(self) -> tuple[Dataset, Dataset]:
        self._check_files()
        images, labels = read_cifar10_batches(self.folder, CIFAR10_TRAIN_FILES)
        split = stratified_split(labels, [self.val_fraction], self.seed)
        train_indices, val_indices = (torch.from_numpy(indices) for indices in split)
        return (
            TensorImageDataset(images[train_indices], labels[train_indices], crop_flip_transform(32, padding=4)),
            TensorImageDataset(images[val_indices], labels[val_indices], to_tensor_transform()),
        )

    def _build_test_dataset(self) -> Dataset:
        self._check_files()
        images, labels = read_cifar10_batches(self.folder, (CIFAR10_TEST_FILE,))
        return TensorImageDataset(images, labels, to_tensor_transform())
