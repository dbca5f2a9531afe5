"""scikit-learn's bundled handwritten digits: real images that need no download, the offline default."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from mglightning.data.base import InMemoryImageDataModule, Transform
from mglightning.data.transforms import crop_flip_transform


def load_digit_images(image_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as `(1797, 3, image_size, image_size)` float32 images in [0, 1], and their labels.

    The 8x8 images (values 0..16) are divided by 16, resized with antialiased bilinear interpolation (the same
    as PIL's bilinear resize) and repeated to 3 channels.

    Example:
        >>> images, labels = load_digit_images(16)
        >>> images.shape, labels.shape
        (torch.Size([1797, 3, 16, 16]), torch.Size([1797]))
    """
    digits = load_digits()
    images = torch.from_numpy(digits.images).float().div(16.0).unsqueeze(1)
    images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
    # Interpolation weights are non-negative and sum to one, so only rounding can leave [0, 1].
    images = images.clamp(0.0, 1.0).expand(-1, 3, -1, -1).contiguous()
    return images, torch.from_numpy(digits.target).long()


class DigitsDataModule(InMemoryImageDataModule):
    """scikit-learn's 1797 handwritten digits (10 classes), resized to `image_size` and repeated to 3 channels.

    The data ships with scikit-learn, so this works offline; loading takes milliseconds. A seeded stratified
    split gives about 70% train, `val_fraction` validation and `test_fraction` test images. Training
    augmentation is a small random translation (zero-padded random crop of `image_size // 16` pixels); no
    flips, as digits are not mirror-symmetric. `mean` and `std` are the training split's statistics.

    Args:
        batch_size: the GLOBAL batch size, divided among the devices.
        num_workers: dataloader worker processes.
        pin_memory: pin host memory for faster copies to an accelerator.
        image_size: side of the square images.
        val_fraction: share of each class held out for validation.
        test_fraction: share of each class held out for testing.
        seed: seed of the train/val/test split (the same split on every machine).

    Example:
        >>> dm = DigitsDataModule(batch_size=64)
        >>> dm.setup("test")
        >>> image, label = dm.test_dataset[0]
        >>> image.shape, dm.num_classes
        (torch.Size([3, 32, 32]), 10)
    """

    def __init__(
        self,
        batch_size: int = 128,
        num_workers: int = 0,
        pin_memory: bool = False,
        image_size: int = 32,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory)
        if image_size < 1:
            raise ValueError(f"image_size must be a positive integer, got {image_size}.")
        self.save_hyperparameters(logger=False)
        self.num_classes = 10
        # Loading takes milliseconds, so it happens here: mean/std must be known before setup (the CLI links them).
        images, labels = load_digit_images(image_size)
        self._set_data(images, labels, val_fraction, test_fraction, seed)

    def _train_transform(self) -> Transform:
        return crop_flip_transform(self.image_size, padding=max(1, self.image_size // 16), flip=False)
