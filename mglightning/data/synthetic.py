"""Random images whose labels can be learnt: for tests and smoke runs."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mglightning.data.base import InMemoryImageDataModule


def make_synthetic_images(
    num_samples: int, num_classes: int, image_size: int, in_chans: int, noise_std: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded images in [0, 1]: a smooth random pattern per class plus per-pixel Gaussian noise, clamped.

    Each class's pattern is uniform noise on a 4x4 grid, upsampled bilinearly to `image_size`, so classes differ
    in large blobs that a small CNN (or a nearest-class-mean rule) tells apart. Labels cycle through the classes,
    so every class has `num_samples // num_classes` or one more samples.

    Example:
        >>> images, labels = make_synthetic_images(20, 4, 8, 3, noise_std=0.1, seed=0)
        >>> images.shape, labels[:5].tolist()
        (torch.Size([20, 3, 8, 8]), [0, 1, 2, 3, 0])
    """
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(num_classes, in_chans, 4, 4, generator=generator)
    patterns = F.interpolate(coarse, size=(image_size, image_size), mode="bilinear", align_corners=False)
    labels = torch.arange(num_samples) % num_classes
    noise = noise_std * torch.randn(num_samples, in_chans, image_size, image_size, generator=generator)
    return (patterns[labels] + noise).clamp(0.0, 1.0), labels


class SyntheticDataModule(InMemoryImageDataModule):
    """Synthetic classification data (see `make_synthetic_images`), seeded, split like the digits.

    Args:
        batch_size: the GLOBAL batch size, divided among the devices.
        num_workers: dataloader worker processes.
        pin_memory: pin host memory for faster copies to an accelerator.
        num_samples: images in all three splits together.
        num_classes: number of classes.
        image_size: side of the square images.
        in_chans: channels per image.
        noise_std: standard deviation of the per-pixel noise around each class's pattern.
        val_fraction: share of each class held out for validation.
        test_fraction: share of each class held out for testing.
        seed: seed of the images and of the split.

    Example:
        >>> dm = SyntheticDataModule(batch_size=8, num_samples=100, num_classes=4, image_size=16)
        >>> dm.setup("fit")
        >>> dm.train_dataset[0][0].shape
        torch.Size([3, 16, 16])
    """

    def __init__(
        self,
        batch_size: int = 32,
        num_workers: int = 0,
        pin_memory: bool = False,
        num_samples: int = 512,
        num_classes: int = 10,
        image_size: int = 32,
        in_chans: int = 3,
        noise_std: float = 0.1,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory)
        for name, value in (("num_samples", num_samples), ("num_classes", num_classes),
                            ("image_size", image_size), ("in_chans", in_chans)):
            if value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}.")
        if noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std}.")
        self.save_hyperparameters(logger=False)
        self.num_classes = num_classes
        images, labels = make_synthetic_images(num_samples, num_classes, image_size, in_chans, noise_std, seed)
        self._set_data(images, labels, val_fraction, test_fraction, seed)
