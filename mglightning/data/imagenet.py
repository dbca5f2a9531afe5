"""ImageNet (ILSVRC-2012) as class folders, read like torchvision's `ImageFolder`."""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from mglightning.data.base import (
    MAX_IMAGE_PIXELS,
    DataFileError,
    ImageDataModule,
    ImageFileDataset,
    Transform,
    stratified_split,
)
from mglightning.data.transforms import resize_center_crop_transform, resized_crop_flip_transform

IMAGENET_LAYOUT = """one folder per class, named by its wnid, as torchvision's ImageFolder reads them:
  <data_dir>/val/<wnid>/*.JPEG      the 50,000 validation images (the test set here)
  <data_dir>/train/<wnid>/*.JPEG    the training images (only needed to fit)
The official ILSVRC2012_img_val.tar is flat: sort its images into wnid folders first (e.g. with the widely used
valprep.sh script). ImageNet cannot be downloaded automatically: get it from https://image-net.org.
Hidden folders and files (names starting with ".", e.g. .ipynb_checkpoints) are ignored."""


def _hidden(name: str) -> bool:
    return name.startswith(".")


class VisibleImageFolder(ImageFolder):
    """torchvision's `ImageFolder` without hidden folders and files (names starting with "."), which are not data.

    A `.ipynb_checkpoints` folder that Jupyter leaves, or macOS's `._name.JPEG` companion files, would otherwise
    be a class or an undecodable image.

    Example:
        >>> VisibleImageFolder("/datasets/imagenet/val").classes[:2]  # doctest: +SKIP
        ['n01440764', 'n01443537']
    """

    def __init__(self, root: str | Path) -> None:
        root = str(root)

        def is_valid_file(path: str) -> bool:
            # Paths are os.path.join(root, ...), so a hidden part below root shows as "/." after it. A string test:
            # pathlib's relative_to costs 20 times as much, which adds up over ImageNet's 1.28M training images.
            return has_file_allowed_extension(path, IMG_EXTENSIONS) and os.sep + "." not in path[len(root) :]

        super().__init__(root, is_valid_file=is_valid_file)

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        classes = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not _hidden(e.name))
        if not classes:
            raise FileNotFoundError(f"{directory} holds no class folders.")
        return classes, {name: index for index, name in enumerate(classes)}


class ImageNetDataModule(ImageDataModule):
    """ImageNet: `ImageFolder` on `<data_dir>/val` as the test set, and on `<data_dir>/train` for fitting.

    Classes are the sorted wnid folder names, which is the class order of torchvision's and timm's pretrained
    ImageNet models. Evaluation images are resized (shorter side `image_size / crop_fraction`) and center-cropped
    to `image_size`; training uses random resized crops and horizontal flips. A seeded stratified `val_fraction` of
    the training images is held out for validation. `mean`/`std` are the standard ImageNet statistics.

    Args:
        data_dir: folder holding `val/` (and `train/` to fit).
        batch_size: the GLOBAL batch size, divided among the devices.
        num_workers: dataloader worker processes.
        pin_memory: pin host memory for faster copies to an accelerator.
        image_size: side of the square images the model sees.
        crop_fraction: share of the resized image kept by the evaluation center crop.
        num_classes: class folders expected (1000; smaller only for test fixtures).
        max_image_pixels: images with more pixels are refused (naming the file) before they are decoded, in place
            of Pillow's warning; at most twice `PIL.Image.MAX_IMAGE_PIXELS`, past which Pillow refuses on its own.
        val_fraction: share of each class of the training set held out for validation.
        seed: seed of the train/val split.

    Example:
        >>> dm = ImageNetDataModule(data_dir="/datasets/imagenet", batch_size=64)  # doctest: +SKIP
        >>> dm.setup("test"); image, label = dm.test_dataset[0]  # doctest: +SKIP
    """

    def __init__(
        self,
        data_dir: str = "data/imagenet",
        batch_size: int = 256,
        num_workers: int = 8,
        pin_memory: bool = False,
        image_size: int = 224,
        crop_fraction: float = 0.875,
        num_classes: int = 1000,
        val_fraction: float = 0.01,
        seed: int = 0,
        max_image_pixels: int = MAX_IMAGE_PIXELS,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory)
        if image_size < 1:
            raise ValueError(f"image_size must be a positive integer, got {image_size}.")
        if max_image_pixels < 1:
            raise ValueError(f"max_image_pixels must be a positive integer, got {max_image_pixels}.")
        if Image.MAX_IMAGE_PIXELS and max_image_pixels > 2 * Image.MAX_IMAGE_PIXELS:
            raise ValueError(
                f"max_image_pixels={max_image_pixels:,} is past {2 * Image.MAX_IMAGE_PIXELS:,} pixels, where Pillow "
                "refuses images on its own (twice PIL.Image.MAX_IMAGE_PIXELS); raise that first, or lower it."
            )
        self.max_image_pixels = max_image_pixels
        self.save_hyperparameters(logger=False)
        self.data_dir = Path(data_dir)
        self.crop_fraction = crop_fraction
        self.val_fraction = val_fraction
        self.seed = seed
        self.num_classes = num_classes
        self.image_size = image_size
        self.in_chans = 3
        self.mean = (0.485, 0.456, 0.406)
        self.std = (0.229, 0.224, 0.225)
        self.eval_transform = resize_center_crop_transform(image_size, crop_fraction)

    def _split_folder(self, split: str) -> Path:
        folder = self.data_dir / split
        if not folder.is_dir():
            raise FileNotFoundError(f"ImageNet not found: {folder} does not exist. Expected {IMAGENET_LAYOUT}")
        return folder

    def _image_folder(self, split: str) -> ImageFolder:
        """The split's `VisibleImageFolder`, after checking its class folders against `num_classes`."""
        folder = self._split_folder(split)
        entries = list(os.scandir(folder))
        classes = sorted(e.name for e in entries if e.is_dir() and not _hidden(e.name))
        if not classes:
            flat = any(e.is_file() and has_file_allowed_extension(e.name, IMG_EXTENSIONS) for e in entries)
            raise DataFileError(
                f"{folder} holds no class folders"
                + (", but images directly: the flat layout of the official archive. " if flat else ". ")
                + f"Expected {IMAGENET_LAYOUT}"
            )
        if len(classes) != self.num_classes:
            inner = folder / classes[0]
            inner_classes = [e.name for e in os.scandir(inner) if e.is_dir() and not _hidden(e.name)]
            if len(classes) == 1 and inner_classes:
                raise DataFileError(
                    f"{folder} holds one folder, {inner}, which holds {len(inner_classes)} folders itself: the class "
                    f"folders are nested one level too deep (as unpacking into a folder of the same name does). Move "
                    f"the folders of {inner} up into {folder}; num_classes is not the problem."
                )
            raise ValueError(
                f"{folder} has {len(classes)} class folders but num_classes={self.num_classes}; "
                f"set --data.num_classes {len(classes)} (the model is built with it) or fix the folder."
            )
        try:
            return VisibleImageFolder(folder)
        except FileNotFoundError as error:  # a class folder without images
            raise DataFileError(f"{folder}: {error} Every class folder needs its images.") from error

    def prepare_data(self) -> None:
        """Nothing to download: only check that `val/` is there, before any step (`train/` is checked to fit)."""
        self._split_folder("val")

    def _build_fit_datasets(self) -> tuple[Dataset, Dataset]:
        folder = self._image_folder("train")
        val_folder = self.data_dir / "val"
        if val_folder.is_dir() and folder.find_classes(str(val_folder))[0] != folder.classes:
            raise ValueError(
                f"{self.data_dir / 'train'} and {val_folder} hold different class folders, so their labels would "
                "not agree; both need the same wnid folders."
            )
        train_indices, val_indices = stratified_split(folder.targets, [self.val_fraction], self.seed)
        return (
            self._dataset([folder.samples[i] for i in train_indices], resized_crop_flip_transform(self.image_size)),
            self._dataset([folder.samples[i] for i in val_indices], self.eval_transform),
        )

    def _build_test_dataset(self) -> Dataset:
        return self._dataset(self._image_folder("val").samples, self.eval_transform)

    def _dataset(self, samples: list[tuple[str, int]], transform: Transform) -> ImageFileDataset:
        return ImageFileDataset(samples, transform, max_image_pixels=self.max_image_pixels)
