"""The image transforms of the datamodules: all end in a plain float32 `(C, H, W)` tensor in [0, 1], never normalised.

They accept a `PIL.Image` or a `(C, H, W)` tensor (uint8 in 0..255 or float in [0, 1]). Random transforms draw from
torch's global generator, which Lightning's `seed_everything` and the dataloader's per-worker seeding control.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2


def _to_float_image() -> list[v2.Transform]:
    # ToDtype(scale=True) maps uint8 0..255 to [0, 1] and leaves float images unchanged; ToPureTensor drops the
    # tv_tensors.Image wrapper so that items are plain tensors.
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.ToPureTensor()]


def to_tensor_transform() -> v2.Compose:
    """No augmentation: only the conversion to a float32 tensor in [0, 1].

    Example:
        >>> to_tensor_transform()(torch.full((3, 2, 2), 255, dtype=torch.uint8)).max()
        tensor(1.)
    """
    return v2.Compose(_to_float_image())


def crop_flip_transform(image_size: int, padding: int, flip: bool = True) -> v2.Compose:
    """Training augmentation of CIFAR-style datasets: zero-padded random crop, then (optionally) a horizontal flip.

    Args:
        image_size: side of the (square) crop, the input's own size.
        padding: zero pixels added on every side before cropping, i.e. the largest shift.
        flip: flip horizontally with probability 1/2 (off for digits, which are not mirror-symmetric).

    Example:
        >>> crop_flip_transform(32, padding=4)(torch.rand(3, 32, 32)).shape
        torch.Size([3, 32, 32])
    """
    steps: list[v2.Transform] = [v2.ToImage(), v2.RandomCrop(image_size, padding=padding)]
    if flip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps + _to_float_image())


def resized_crop_flip_transform(image_size: int) -> v2.Compose:
    """ImageNet training augmentation: random resized crop (scale 0.08..1, antialiased) and a horizontal flip.

    Example:
        >>> resized_crop_flip_transform(8)(torch.rand(3, 20, 30)).shape
        torch.Size([3, 8, 8])
    """
    return v2.Compose(
        [v2.ToImage(), v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip()]
        + _to_float_image()
    )


def resize_center_crop_transform(image_size: int, crop_fraction: float = 0.875) -> v2.Compose:
    """ImageNet evaluation transform: resize the shorter side to `image_size / crop_fraction`, then center-crop.

    Args:
        image_size: side of the output.
        crop_fraction: share of the resized image the crop keeps (0.875: 256 -> 224).

    Example:
        >>> resize_center_crop_transform(224)(torch.rand(3, 300, 400)).shape
        torch.Size([3, 224, 224])
    """
    if not 0 < crop_fraction <= 1:
        raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}.")
    resize_size = int(round(image_size / crop_fraction))
    return v2.Compose(
        [v2.ToImage(), v2.Resize(resize_size, antialias=True), v2.CenterCrop(image_size)] + _to_float_image()
    )
