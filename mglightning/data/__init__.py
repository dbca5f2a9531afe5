"""LightningDataModules: images in [0, 1], normalisation left to the model's first layer (docs/reference/semantics.md section 1).

`num_classes`, `image_size`, `in_chans`, `mean` and `std` are set by `__init__`, so the CLI can link them into
the model before any data is read. `batch_size` is global: each device loads `batch_size // world_size`.
"""

from mglightning.data.base import (
    MAX_IMAGE_PIXELS,
    DataFileError,
    ImageDataModule,
    ImageFileDataset,
    InMemoryImageDataModule,
    TensorImageDataset,
    channel_stats,
    read_rgb_image,
    stratified_split,
)
from mglightning.data.cifar10 import CIFAR10DataModule
from mglightning.data.digits import DigitsDataModule
from mglightning.data.imagenet import ImageNetDataModule
from mglightning.data.photo_patches import PhotoPatchesDataModule
from mglightning.data.synthetic import SyntheticDataModule
from mglightning.data.tinyimagenet import TinyImageNetDataModule

__all__ = [
    "MAX_IMAGE_PIXELS",
    "CIFAR10DataModule",
    "DataFileError",
    "DigitsDataModule",
    "ImageDataModule",
    "ImageFileDataset",
    "ImageNetDataModule",
    "InMemoryImageDataModule",
    "PhotoPatchesDataModule",
    "SyntheticDataModule",
    "TensorImageDataset",
    "TinyImageNetDataModule",
    "channel_stats",
    "read_rgb_image",
    "stratified_split",
]
