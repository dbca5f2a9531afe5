"""Patches of the ten natural photographs bundled with scikit-image and scikit-learn: which photograph is a patch from?

An offline testbed of real RGB images on which the simple gradient of a small softplus network is fragile and the
paper's robustness ordering shows (docs/background/testbed.md): a softplus ResNet-18 of base width 16 (softplus `beta=5`)
trained for a few CPU minutes. Each photograph is resized (antialiased) so that its short side is 160 pixels and
cut into 32x32 patches with stride 8; the class is the photograph. The right quarter of every photograph is the test
region and the patches of the rest, kept one patch width away so that no test pixel is seen in training, are the
training pool (a stratified `val_fraction` of it is the validation set).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from mglightning.data.base import InMemoryImageDataModule, Transform, channel_stats, stratified_split
from mglightning.data.transforms import crop_flip_transform

PHOTOGRAPHS = (
    "astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
    "motorcycle", "china", "flower",
)
"""The class names: eight scikit-image photographs (`skimage.data`) and scikit-learn's two sample images."""


def _photographs() -> list[np.ndarray]:
    """The ten RGB photographs as `(H, W, 3)` uint8 arrays, in `PHOTOGRAPHS` order (all bundled: no download)."""
    try:
        from skimage import data as skimage_data
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            "PhotoPatchesDataModule cuts its patches from photographs bundled with scikit-image, which is not "
            "installed: pip install 'mglightning[patches]' (or pip install scikit-image)."
        ) from error
    from sklearn.datasets import load_sample_images

    photos = [
        skimage_data.astronaut(), skimage_data.chelsea(), skimage_data.coffee(), skimage_data.rocket(),
        skimage_data.hubble_deep_field(), skimage_data.immunohistochemistry(), skimage_data.retina(),
        skimage_data.stereo_motorcycle()[0],
    ]
    return photos + list(load_sample_images().images)  # china, flower


def load_photo_patches(
    patch_size: int = 32, stride: int = 8, short_side: int = 160, test_share: float = 0.25
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training-region and test-region patches of the ten photographs, float32 in [0, 1], and their classes.

    Args:
        patch_size: side of the square patches.
        stride: step between neighbouring patches.
        short_side: each photograph's short side after resizing.
        test_share: the share of each photograph's patch columns, on its right, that form the test region.

    Returns:
        `(train_images, train_labels, test_images, test_labels)`, images `(N, 3, patch_size, patch_size)`.

    Example:
        >>> train_x, train_y, test_x, test_y = load_photo_patches()
        >>> train_x.shape, test_x.shape
        (torch.Size([2142, 3, 32, 32]), torch.Size([1054, 3, 32, 32]))
    """
    if not 0 < test_share < 1:
        raise ValueError(f"test_share must be in (0, 1), got {test_share}.")
    parts: dict[str, tuple[list, list]] = {"train": ([], []), "test": ([], [])}
    for label, photo in enumerate(_photographs()):
        image = torch.from_numpy(np.array(photo[..., :3])).permute(2, 0, 1).float().div(255)
        scale = short_side / min(image.shape[1:])
        image = F.interpolate(image[None], scale_factor=scale, mode="bilinear", antialias=True)[0].clamp(0, 1)
        patches = image.unfold(1, patch_size, stride).unfold(2, patch_size, stride)  # (3, rows, cols, p, p)
        columns = patches.shape[2]
        first_test = int(columns * (1 - test_share))
        # The training columns end one patch width before the test region: no pixel is in both.
        regions = {"train": range(0, first_test - patch_size // stride), "test": range(first_test, columns)}
        for part, region in regions.items():
            chosen = patches[:, :, list(region)].permute(1, 2, 0, 3, 4).reshape(-1, 3, patch_size, patch_size)
            parts[part][0].append(chosen)
            parts[part][1].append(torch.full((len(chosen),), label, dtype=torch.long))
    train, test = parts["train"], parts["test"]
    return torch.cat(train[0]), torch.cat(train[1]), torch.cat(test[0]), torch.cat(test[1])


class PhotoPatchesDataModule(InMemoryImageDataModule):
    """32x32 RGB patches of ten bundled natural photographs, 10 classes (the source photograph), offline.

    Needs scikit-image (`pip install 'mglightning[patches]'`; the `dev` extra installs it too). The test set is the
    right quarter of every photograph (1,054 patches); the training pool is the rest, one patch width away
    (2,142 patches), of which a stratified `val_fraction` is held out for validation (those overlap their
    training neighbours, so validation accuracy is optimistic; the test set does not). Training augmentation is
    a random shift of up to 2 pixels (the testbed's measured recipe; no flips). `mean` and `std` are the training
    split's. Patches are
    ordered photograph by photograph; an evaluation of the first `max_samples` test patches therefore sees the
    first photographs only, so the test set is served in a fixed shuffled order.

    Args:
        batch_size: the GLOBAL batch size, divided among the devices.
        num_workers: dataloader worker processes.
        pin_memory: pin host memory for faster copies to an accelerator.
        val_fraction: share of each class's training pool held out for validation.
        seed: seed of the validation split.

    Example:
        >>> dm = PhotoPatchesDataModule(batch_size=64)
        >>> dm.setup("test")
        >>> image, label = dm.test_dataset[0]
        >>> image.shape, len(dm.test_dataset), dm.class_names[label]
        (torch.Size([3, 32, 32]), 1054, 'coffee')
    """

    class_names = PHOTOGRAPHS

    def __init__(
        self,
        batch_size: int = 128,
        num_workers: int = 0,
        pin_memory: bool = False,
        val_fraction: float = 0.1,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory)
        self.save_hyperparameters(logger=False)
        self.num_classes = len(PHOTOGRAPHS)
        # Cutting the patches takes about a second, so it happens here: the CLI links mean/std before setup.
        train_images, train_labels, test_images, test_labels = load_photo_patches()
        train_part, val_part = stratified_split(train_labels, (val_fraction,), seed)
        test_order = np.random.RandomState(0).permutation(len(test_labels))
        self.images = torch.cat([train_images, test_images])
        self.labels = torch.cat([train_labels, test_labels])
        self.train_indices, self.val_indices = train_part, val_part
        self.test_indices = (len(train_labels) + test_order).astype(np.int64)
        self.in_chans, self.image_size = 3, train_images.shape[-1]
        self.mean, self.std = channel_stats(train_images[torch.from_numpy(train_part)])

    def _train_transform(self) -> Transform:
        return crop_flip_transform(self.image_size, padding=2, flip=False)
