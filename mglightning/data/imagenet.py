"""ImageNet (ILSVRC-2012) as class folders, read like torchvision's `ImageFolder`."""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder

from mglightning.data.base import ImageDataModule, ImageFileDataset, stratified_split
from mglightning.data.transforms import resize_center_crop_transform, resized_crop_flip_transform

IMAGENET_LAYOUT = """one folder per class, named by its wnid, as torchvision's ImageFolder reads them:
  <data_dir>/val/<wnid>/*.JPEG      the 50,000 validation images (the test set here)
  <data_dir>/train/<wnid>/*.JPEG    the training images (only needed to fit)
The official ILSVRC2012_img_val.tar is flat: sort its images into wnid folders first (e.g. with the widely used
valprep.sh script). ImageNet cannot be downloaded automatically: get it from https://image-net.org."""


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
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory)
        if image_size < 1:
            raise ValueError(f"image_size must be a positive integer, got {image_size}.")
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
        folder = self._split_folder(split)
        dataset = ImageFolder(str(folder))
        if len(dataset.classes) != self.num_classes:
            raise ValueError(
                f"{folder} has {len(dataset.classes)} class folders but num_classes={self.num_classes}; "
                f"set --data.num_classes {len(dataset.classes)} (the model is built with it) or fix the folder."
            )
        return dataset

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
            ImageFileDataset([folder.samples[i] for i in train_indices], resized_crop_flip_transform(self.image_size)),
            ImageFileDataset([folder.samples[i] for i in val_indices], self.eval_transform),
        )

    def _build_test_dataset(self) -> Dataset:
        return ImageFileDataset(self._image_folder("val").samples, self.eval_transform)
