"""What every datamodule shares: the base class, the two dataset types, the seeded split and channel statistics."""

from __future__ import annotations

import abc
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from mglightning.data.evaluation import ExactlyOnceSampler, IndexedDataset
from mglightning.data.transforms import to_tensor_transform

Transform = Callable[[object], torch.Tensor]

MAX_IMAGE_PIXELS = 2**26
"""Images with more pixels than this (67,108,864, e.g. 8192 x 8192) are refused before they are decoded.

Below Pillow's own decompression-bomb warning (`PIL.Image.MAX_IMAGE_PIXELS`, 89,478,485), which only warns; decoded
as RGB such an image takes up to 192 MiB in every dataloader worker that reads it."""

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
"""Pillow's modes of single-channel 16-bit images (e.g. 16-bit grayscale PNGs and TIFFs)."""


class DataFileError(ValueError):
    """A data file that does not hold what its format says: the message names the file and what to do."""


def read_rgb_image(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS, size: int | None = None) -> Image.Image:
    """Open an image file once and return it as 8-bit RGB, refusing it before decoding if it is too large.

    Only the header is read before the checks, so an oversized file is never decoded. Single-channel 16-bit
    images (modes `SIXTEEN_BIT_MODES`, and 16-bit PNG or PGM files that Pillow opens as mode `I`) are scaled to
    8 bits by `round(v / 257)`, which maps 0..65535 onto 0..255 (Pillow's own conversion clips them to 255).
    32-bit integer and float images, whose value range is not fixed, are refused. Other modes go through
    `PIL.Image.convert("RGB")` (grayscale is repeated over the channels, alpha dropped, as torchvision does).

    Args:
        path: the image file.
        max_pixels: refuse images with more pixels (width times height) than this.
        size: if given, refuse images that are not `size` x `size` pixels.

    Raises:
        DataFileError: naming the file: not an image or damaged (e.g. a truncated JPEG), larger than `max_pixels`,
            not of `size`, or of a mode with no fixed range.

    Example:
        >>> read_rgb_image("val/n01440764/ILSVRC2012_val_00000293.JPEG").mode  # doctest: +SKIP
        'RGB'
    """
    damaged = "re-extract or re-download it, or remove it from the folder"
    try:
        with warnings.catch_warnings():
            # Pillow warns past its own limit; the check below, against max_pixels, decides instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
    except Image.DecompressionBombError as error:  # past twice Pillow's limit, Pillow refuses it itself
        raise DataFileError(
            f"{path} is too large: {error} The limit here is {max_pixels:,} pixels; it was not decoded. Shrink the "
            "image or remove it from the folder."
        ) from None
    except FileNotFoundError:
        raise
    except (OSError, SyntaxError, ValueError) as error:  # Pillow's errors for files it cannot identify or parse
        raise DataFileError(f"{path} cannot be read as an image ({error}); {damaged}.") from error
    with image:
        width, height = image.size
        if width * height > max_pixels:
            raise DataFileError(
                f"{path} is {width}x{height} = {width * height:,} pixels, more than the limit of {max_pixels:,}; it "
                "was not decoded. Shrink the image or remove it from the folder (or raise max_image_pixels if "
                "the datamodule has it)."
            )
        if size is not None and (width, height) != (size, size):
            raise DataFileError(
                f"{path} is {width}x{height} pixels, but the images of this dataset are {size}x{size}; resize it "
                f"to {size}x{size} or remove it from the folder."
            )
        try:
            return _to_rgb(image, path)
        except DataFileError:
            raise
        except (OSError, SyntaxError, ValueError) as error:  # e.g. "image file is truncated", raised decoding
            raise DataFileError(f"{path} cannot be decoded ({error}); it is damaged: {damaged}.") from error


def _to_rgb(image: Image.Image, path: str | Path) -> Image.Image:
    if image.mode in SIXTEEN_BIT_MODES or (image.mode == "I" and image.format in ("PNG", "PPM")):
        values = np.asarray(image).astype(np.int64)
        if values.min() < 0 or values.max() > 65535:
            raise DataFileError(f"{path} holds values outside 0..65535 in a 16-bit image; it is damaged.")
        # round(v / 257) exactly: 65535 = 255 * 257, and v / 257 is never halfway between two integers.
        gray = ((values + 128) // 257).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if image.mode in ("I", "F"):
        raise DataFileError(
            f"{path} is a {'32-bit integer' if image.mode == 'I' else 'floating-point'} {image.format} image "
            f"(Pillow mode {image.mode}), whose value range is not fixed, so it cannot be converted to 8-bit RGB "
            "unambiguously; convert it to an 8-bit RGB (or 16-bit) PNG or JPEG."
        )
    return image.convert("RGB")


class TensorImageDataset(Dataset):
    """Images held in memory as one `(N, C, H, W)` tensor, each item passed through `transform`.

    Args:
        images: `(N, C, H, W)` uint8 (0..255) or float (already in [0, 1]) images.
        labels: `(N,)` integer class indices.
        transform: maps one `(C, H, W)` image to a float32 tensor in [0, 1].

    Example:
        >>> ds = TensorImageDataset(torch.zeros(4, 3, 8, 8), torch.arange(4), transform=lambda x: x)
        >>> image, label = ds[1]
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Transform) -> None:
        if images.ndim != 4 or len(images) != len(labels):
            raise ValueError(
                f"Expected images (N, C, H, W) and labels (N,), got {tuple(images.shape)} and {tuple(labels.shape)}."
            )
        self.images = images
        self.labels = labels.long()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[index]), int(self.labels[index])


class ImageFileDataset(Dataset):
    """Image files read with `read_rgb_image` (8-bit RGB, so grayscale files get 3 channels), then `transform`.

    Each item opens its file once; a damaged, oversized or (with `image_size`) wrong-sized file raises a
    `DataFileError` naming it, before it is decoded where the header tells.

    Args:
        samples: `(path, class index)` pairs.
        transform: maps one RGB `PIL.Image` to a float32 `(3, H, W)` tensor in [0, 1].
        image_size: if given, every image must be `image_size` x `image_size` pixels.
        max_image_pixels: refuse images with more pixels than this.

    Example:
        >>> ds = ImageFileDataset([("val/n01/a.JPEG", 0)], transform=eval_transform)  # doctest: +SKIP
        >>> image, label = ds[0]  # doctest: +SKIP
    """

    def __init__(
        self,
        samples: Sequence[tuple[str | Path, int]],
        transform: Transform,
        image_size: int | None = None,
        max_image_pixels: int = MAX_IMAGE_PIXELS,
    ) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.image_size = image_size
        self.max_image_pixels = max_image_pixels

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        rgb = read_rgb_image(path, max_pixels=self.max_image_pixels, size=self.image_size)
        return self.transform(rgb), int(label)


def stratified_split(
    labels: Sequence[int] | np.ndarray | torch.Tensor, holdout_fractions: Sequence[float], seed: int
) -> list[np.ndarray]:
    """Seeded, per-class split of `range(len(labels))` into the rest and one part per holdout fraction.

    Each class gives `round(fraction * class size)` of its samples to each holdout, but at least one while at
    least one is left for the rest (so that tiny datasets still get a validation set), drawn from one
    `numpy.random.RandomState(seed)` permutation. RandomState's stream is frozen by NumPy's compatibility
    policy, so a seed gives the same split on every machine and NumPy version.

    Args:
        labels: class index of every sample.
        holdout_fractions: share of each class that goes to each holdout part (e.g. `(0.1, 0.2)` for val, test).
        seed: the split's seed.

    Returns:
        `[rest, holdout_0, holdout_1, ...]`, each a sorted int64 index array; together a partition.

    Example:
        >>> train, val = stratified_split([0, 0, 0, 0, 1, 1, 1, 1], [0.25], seed=0)
        >>> len(train), len(val)
        (6, 2)
    """
    if any(f <= 0 for f in holdout_fractions) or sum(holdout_fractions) >= 1:
        raise ValueError(f"Holdout fractions must be positive and sum to less than 1, got {list(holdout_fractions)}.")
    labels = np.asarray(labels)
    permutation = np.random.RandomState(seed).permutation(len(labels))
    parts: list[list[np.ndarray]] = [[] for _ in range(len(holdout_fractions) + 1)]
    for cls in np.unique(labels):
        members = permutation[labels[permutation] == cls]
        start = 0
        for part, fraction in enumerate(holdout_fractions, start=1):
            count = max(0, min(max(1, int(round(fraction * len(members)))), len(members) - start - 1))
            parts[part].append(members[start : start + count])
            start += count
        parts[0].append(members[start:])
    split = [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
    if any(len(part) == 0 for part in split):
        raise ValueError(
            f"Splitting {len(labels)} samples of {len(np.unique(labels))} classes with holdout fractions "
            f"{list(holdout_fractions)} leaves a part empty (sizes {[len(p) for p in split]}, the rest first); "
            "use more samples or other fractions."
        )
    return split


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) standard deviation of `(N, C, H, W)` images in [0, 1].

    Example:
        >>> channel_stats(torch.ones(2, 3, 4, 4))
        ((1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    """
    per_channel = images.double().transpose(0, 1).reshape(images.shape[1], -1)
    return tuple(per_channel.mean(1).tolist()), tuple(per_channel.std(1, correction=0).tolist())


class ImageDataModule(pl.LightningDataModule, abc.ABC):
    """Base of the image datamodules: per-device batch size, dataloaders and the once-only `setup`.

    `setup` sets `batch_size_per_device` from the attached trainer and fails early if it does not divide.
    Subclasses set `num_classes`, `image_size`, `in_chans`, `mean` and `std` in `__init__` (the CLI links
    them into the model before any `setup`) and implement `_build_fit_datasets` (train and val) and
    `_build_test_dataset`. Every item is `(image, label)`: a float32 `(in_chans, image_size, image_size)`
    tensor in [0, 1], never normalised (the model's first layer normalises with `mean` and `std`), and an int.

    Args:
        batch_size: the GLOBAL batch size; each of the trainer's `world_size` devices loads
            `batch_size // world_size` samples per step.
        num_workers: dataloader worker processes (0 loads in the main process).
        pin_memory: pin host memory for faster copies to an accelerator.
    """

    num_classes: int
    image_size: int
    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __init__(self, batch_size: int, num_workers: int = 0, pin_memory: bool = False) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size}.")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}.")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.batch_size_per_device = batch_size
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self.test_dataset: Dataset | None = None
        self.evaluation_indices: list[int] | None = None

    def setup(self, stage: str | None = None) -> None:
        """Set the per-device batch size and build the datasets the stage needs, each only once.

        `fit` and `validate` build `train_dataset` and `val_dataset`; `test` and `predict` build `test_dataset`;
        `None` builds all three.
        """
        world_size = self.trainer.world_size if self.trainer is not None else 1
        if self.batch_size % world_size != 0:
            raise ValueError(
                f"batch_size={self.batch_size} is the global batch size and must be divisible by the number of "
                f"devices ({world_size}); set --data.batch_size to a multiple of {world_size}."
            )
        self.batch_size_per_device = self.batch_size // world_size
        if stage in (None, "fit", "validate") and self.train_dataset is None:
            self.train_dataset, self.val_dataset = self._build_fit_datasets()
        if stage in (None, "test", "predict") and self.test_dataset is None:
            self.test_dataset = self._build_test_dataset()

    @abc.abstractmethod
    def _build_fit_datasets(self) -> tuple[Dataset, Dataset]:
        """The training dataset (with augmentation) and the validation dataset (deterministic)."""

    @abc.abstractmethod
    def _build_test_dataset(self) -> Dataset:
        """The deterministic, indexable test dataset."""

    def _loader(self, dataset: Dataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before its dataloaders are requested.")
        return DataLoader(
            dataset,
            batch_size=self.batch_size_per_device,
            shuffle=shuffle,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, shuffle=False)

    def evaluate_on(self, indices: Sequence[int] | None) -> None:
        """Make `test_dataloader` serve these test-set indices for an evaluation run (`None`: back to normal).

        The evaluation loader yields `(image, label, dataset index)` batches of `batch_size_per_device` and
        gives every index to exactly one device (`ExactlyOnceSampler`, no padding), so per-sample results can
        be keyed by dataset index and do not depend on the number of devices. `ExplanationEvaluator` calls this
        in its `setup`; `trainer.test(evaluator, datamodule=datamodule)` then uses it.
        """
        self.evaluation_indices = None if indices is None else [int(index) for index in indices]

    def test_dataloader(self) -> DataLoader:
        if self.evaluation_indices is None:
            return self._loader(self.test_dataset, shuffle=False)
        if self.test_dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before its dataloaders are requested.")
        world_size = self.trainer.world_size if self.trainer is not None else 1
        rank = self.trainer.global_rank if self.trainer is not None else 0
        sampler = ExactlyOnceSampler(self.test_dataset, self.evaluation_indices, num_replicas=world_size, rank=rank)
        return DataLoader(
            IndexedDataset(self.test_dataset),
            batch_size=self.batch_size_per_device,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
        )



class InMemoryImageDataModule(ImageDataModule):
    """An `ImageDataModule` whose images all fit in one tensor, split into train/val/test by a seeded stratified split.

    Subclasses make the images in `__init__` and pass them to `_set_data`, which splits them and sets `in_chans`,
    `image_size`, `mean` and `std` (of the training split); they may override `_train_transform`.
    """

    def _set_data(
        self, images: torch.Tensor, labels: torch.Tensor, val_fraction: float, test_fraction: float, seed: int
    ) -> None:
        self.images, self.labels = images, labels
        self.train_indices, self.val_indices, self.test_indices = stratified_split(
            labels, (val_fraction, test_fraction), seed
        )
        self.in_chans, self.image_size = images.shape[1], images.shape[-1]
        self.mean, self.std = channel_stats(images[torch.from_numpy(self.train_indices)])

    def _train_transform(self) -> Transform:
        """Training augmentation; none by default."""
        return to_tensor_transform()

    def _subset(self, indices: np.ndarray, transform: Transform) -> TensorImageDataset:
        index = torch.from_numpy(indices)
        return TensorImageDataset(self.images[index], self.labels[index], transform)

    def _build_fit_datasets(self) -> tuple[Dataset, Dataset]:
        return (
            self._subset(self.train_indices, self._train_transform()),
            self._subset(self.val_indices, to_tensor_transform()),
        )

    def _build_test_dataset(self) -> Dataset:
        return self._subset(self.test_indices, to_tensor_transform())
