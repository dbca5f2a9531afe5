"""Tiny fake datasets in the real on-disk formats, for tests: CIFAR-10 pickles, tiny-ImageNet and ImageNet folders.

Every image of class `k` is `class_colour(k)` plus a little uniform noise, so a test can check a label against
the image's mean colour, and a model can learn the labels. Each writer returns the folder to pass as `data_dir`.
Import them from a test as `from fake_datasets import write_fake_cifar10` (pytest puts `tests/` on the path).

Example:
    >>> data_dir = write_fake_cifar10(tmp_path, n_train=50, n_test=20)  # doctest: +SKIP
    >>> CIFAR10DataModule(data_dir=str(data_dir)).setup("test")  # doctest: +SKIP
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from PIL import Image

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def class_colour(index: int) -> tuple[int, int, int]:
    """A distinct RGB colour per class index (0..255 per channel, away from the ends so noise never clips)."""
    return (40 + (67 * index) % 176, 40 + (113 * index + 60) % 176, 40 + (29 * index + 120) % 176)


def _pixels(rng: np.random.RandomState, label: int, height: int, width: int) -> np.ndarray:
    noise = rng.randint(-20, 21, size=(height, width, 3))
    return (np.array(class_colour(label)) + noise).astype(np.uint8)


def wnid(index: int) -> str:
    """A WordNet-id-like class folder name, sorting in index order (`n00000003`)."""
    return f"n{index:08d}"


def write_fake_cifar10(root: str | Path, n_train: int = 50, n_test: int = 20, seed: int = 0) -> Path:
    """Write `root/cifar-10-batches-py/` in torchvision's format: `data_batch_1..5`, `test_batch`, `batches.meta`.

    The pickles have the real files' keys and array layout (`data`: `(n, 3072)` uint8, red plane then green then
    blue, each row-major 32x32; `labels`: list of ints). Their md5 sums differ from the real files', so
    `torchvision.datasets.CIFAR10` refuses them as corrupt; mglightning's reader checks shapes instead.

    Args:
        root: the `data_dir` to create.
        n_train: training images, spread over the five batches (labels cycle through the 10 classes).
        n_test: test images.
        seed: seed of the pixel noise.

    Returns:
        `root`, the folder that holds `cifar-10-batches-py/`.
    """
    rng = np.random.RandomState(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)

    def write_batch(name: str, batch_label: str, labels: list[int]) -> None:
        images = np.stack([_pixels(rng, label, 32, 32) for label in labels]) if labels else np.zeros((0, 32, 32, 3))
        batch = {
            "batch_label": batch_label,
            "labels": labels,
            "data": images.astype(np.uint8).transpose(0, 3, 1, 2).reshape(len(labels), 3072),
            "filenames": [f"fake_{name}_{i}.png" for i in range(len(labels))],
        }
        with open(folder / name, "wb") as file:
            pickle.dump(batch, file, protocol=2)

    train_labels = [i % 10 for i in range(n_train)]
    for number, part in enumerate(np.array_split(np.arange(n_train), 5), start=1):
        write_batch(f"data_batch_{number}", f"training batch {number} of 5", [train_labels[i] for i in part])
    write_batch("test_batch", "testing batch 1 of 1", [i % 10 for i in range(n_test)])
    meta = {"label_names": CIFAR10_CLASSES, "num_cases_per_batch": max(1, n_train // 5), "num_vis": 3072}
    with open(folder / "batches.meta", "wb") as file:
        pickle.dump(meta, file, protocol=2)
    return Path(root)


def write_fake_tinyimagenet(
    root: str | Path, n_classes: int = 3, n_train_per_class: int = 4, n_val_per_class: int = 2, seed: int = 0
) -> Path:
    """Write the layout of the extracted `tiny-imagenet-200.zip` with 64x64 JPEGs into `root`.

    `wnids.txt` (written in reverse order, as the real one is unsorted), `words.txt`,
    `train/<wnid>/images/<wnid>_<i>.JPEG` with `train/<wnid>/<wnid>_boxes.txt`, `val/images/val_<i>.JPEG` with
    `val/val_annotations.txt` (file, wnid, bounding box; tab-separated) and two unlabelled `test/images/`.
    The first training image of class 0 is grayscale, as some real ones are.

    Returns:
        `root`, to pass as `data_dir` with `num_classes=n_classes`.
    """
    rng = np.random.RandomState(seed)
    root = Path(root)
    wnids = [wnid(k) for k in range(n_classes)]
    root.mkdir(parents=True, exist_ok=True)
    (root / "wnids.txt").write_text("".join(f"{w}\n" for w in reversed(wnids)))
    (root / "words.txt").write_text("".join(f"{w}\tfake class {k}\n" for k, w in enumerate(wnids)))
    for k, w in enumerate(wnids):
        images = root / "train" / w / "images"
        images.mkdir(parents=True, exist_ok=True)
        boxes = []
        for i in range(n_train_per_class):
            image = Image.fromarray(_pixels(rng, k, 64, 64))
            if k == 0 and i == 0:
                image = image.convert("L")
            image.save(images / f"{w}_{i}.JPEG", format="JPEG", quality=95)
            boxes.append(f"{w}_{i}.JPEG\t0\t0\t63\t63\n")
        (root / "train" / w / f"{w}_boxes.txt").write_text("".join(boxes))
    (root / "val" / "images").mkdir(parents=True, exist_ok=True)
    annotations = []
    for i in range(n_classes * n_val_per_class):
        k = i % n_classes
        Image.fromarray(_pixels(rng, k, 64, 64)).save(root / "val" / "images" / f"val_{i}.JPEG", quality=95)
        annotations.append(f"val_{i}.JPEG\t{wnids[k]}\t0\t0\t63\t63\n")
    (root / "val" / "val_annotations.txt").write_text("".join(annotations))
    (root / "test" / "images").mkdir(parents=True, exist_ok=True)
    for i in range(2):
        Image.fromarray(_pixels(rng, 0, 64, 64)).save(root / "test" / "images" / f"test_{i}.JPEG", quality=95)
    return root


def write_fake_imagenet(
    root: str | Path,
    n_classes: int = 3,
    n_train_per_class: int = 2,
    n_val_per_class: int = 2,
    with_train: bool = True,
    seed: int = 0,
) -> Path:
    """Write ImageNet as class folders into `root`: `val/<wnid>/ILSVRC2012_val_<n>.JPEG` and `train/<wnid>/*.JPEG`.

    Images have assorted non-square sizes between 40 and 90 pixels (the real ones vary too); the first
    validation image is grayscale.

    Args:
        root: the `data_dir` to create.
        n_classes: class folders (wnids `n00000000`, `n00000001`, ...).
        n_train_per_class: images per class in `train/` (written only if `with_train`).
        n_val_per_class: images per class in `val/`.
        with_train: also write `train/` (evaluation alone needs only `val/`).
        seed: seed of the sizes and pixel noise.

    Returns:
        `root`, to pass as `data_dir` with `num_classes=n_classes`.
    """
    rng = np.random.RandomState(seed)
    root = Path(root)
    splits = {"val": n_val_per_class}
    if with_train:
        splits["train"] = n_train_per_class
    number = 0
    for split, per_class in splits.items():
        for k in range(n_classes):
            folder = root / split / wnid(k)
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                number += 1
                height, width = rng.randint(40, 91, size=2)
                image = Image.fromarray(_pixels(rng, k, height, width))
                if split == "val" and number == 1:
                    image = image.convert("L")
                name = f"ILSVRC2012_val_{number:08d}.JPEG" if split == "val" else f"{wnid(k)}_{i}.JPEG"
                image.save(folder / name, format="JPEG", quality=95)
    return root
