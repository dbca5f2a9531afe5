"""tiny-ImageNet-200 in the layout of the official `tiny-imagenet-200.zip`."""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset

from mglightning.data.base import DataFileError, ImageDataModule, ImageFileDataset, Transform, stratified_split
from mglightning.data.transforms import crop_flip_transform, to_tensor_transform

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")

TINYIMAGENET_LAYOUT = """the extracted tiny-imagenet-200.zip (http://cs231n.stanford.edu/tiny-imagenet-200.zip):
  <data_dir>/wnids.txt                      one class id (wnid) per line
  <data_dir>/train/<wnid>/images/*.JPEG     training images, 64x64
  <data_dir>/val/images/*.JPEG              validation images, 64x64
  <data_dir>/val/val_annotations.txt        tab-separated: file name, wnid, bounding box"""


TINYIMAGENET_IMAGE_SIZE = 64


def _image_files(folder: Path) -> list[Path]:
    # Hidden files (e.g. macOS's "._name.JPEG" companions) are not images, whatever their extension.
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.name[0] != ".")


class TinyImageNetDataModule(ImageDataModule):
    """tiny-ImageNet: 64x64 images of 200 classes, 500 per class for training and 50 per class in `val/`.

    The official test images have no labels, so the labelled `val/` set is the test set, and a seeded stratified
    `val_fraction` of the training images is held out for validation. Classes are indexed in the sorted order of
    `wnids.txt`; validation labels come from `val/val_annotations.txt`. Grayscale files are converted to RGB.
    At setup, `wnids.txt` (no duplicates), the annotations (well-formed lines, known wnids, each file once) and the
    class folders (none empty) are checked; every image is checked to be 64x64 when it is read, before it is
    decoded (`read_rgb_image`), and a damaged one is named.
    Training augmentation: random 64x64 crop of the image zero-padded by 8 pixels, and horizontal flips.
    `mean`/`std` are the commonly used per-channel statistics of the training set.

    Args:
        data_dir: the `tiny-imagenet-200` folder (holding `wnids.txt`, `train/` and `val/`).
        batch_size: the GLOBAL batch size, divided among the devices.
        num_workers: dataloader worker processes.
        pin_memory: pin host memory for faster copies to an accelerator.
        num_classes: classes expected in `wnids.txt` (200; smaller only for test fixtures).
        val_fraction: share of each class of the training set held out for validation.
        seed: seed of the train/val split.

    Example:
        >>> dm = TinyImageNetDataModule(data_dir="data/tiny-imagenet-200")  # doctest: +SKIP
        >>> dm.setup("test"); image, label = dm.test_dataset[0]  # doctest: +SKIP
    """

    def __init__(
        self,
        data_dir: str = "data/tiny-imagenet-200",
        batch_size: int = 128,
        num_workers: int = 4,
        pin_memory: bool = False,
        num_classes: int = 200,
        val_fraction: float = 0.1,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory)
        self.save_hyperparameters(logger=False)
        self.data_dir = Path(data_dir)
        self.val_fraction = val_fraction
        self.seed = seed
        self.num_classes = num_classes
        self.image_size = 64
        self.in_chans = 3
        self.mean = (0.4802, 0.4481, 0.3975)
        self.std = (0.2770, 0.2691, 0.2821)

    def _require(self, path: Path) -> None:
        if not path.exists():
            raise FileNotFoundError(
                f"tiny-ImageNet not found: {path} does not exist. Expected {TINYIMAGENET_LAYOUT}\n"
                "tiny-ImageNet cannot be downloaded automatically: download and unzip it, then point "
                "--data.data_dir at the tiny-imagenet-200 folder."
            )

    def _class_ids(self) -> list[str]:
        path = self.data_dir / "wnids.txt"
        self._require(path)
        lines = {}
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            wnid = line.strip()
            if not wnid:
                continue
            if len(wnid.split()) > 1:
                raise DataFileError(f"{path} line {number} is {line!r}; each line must hold one wnid and nothing else.")
            if wnid in lines:
                # A repeated class would shift the index of every class sorted after it.
                raise DataFileError(
                    f"{path} lists {wnid} twice (lines {lines[wnid]} and {number}), which would shift every label "
                    "after it; remove the duplicate line."
                )
            lines[wnid] = number
        wnids = sorted(lines)
        if len(wnids) != self.num_classes:
            raise ValueError(
                f"{self.data_dir / 'wnids.txt'} lists {len(wnids)} classes but num_classes={self.num_classes}; "
                f"set --data.num_classes {len(wnids)} (the model is built with it)."
            )
        return wnids

    def prepare_data(self) -> None:
        """Nothing to download: only check that the data is there, before any training step."""
        self._class_ids()
        self._require(self.data_dir / "train")
        self._require(self.data_dir / "val" / "val_annotations.txt")

    def _build_fit_datasets(self) -> tuple[Dataset, Dataset]:
        samples = []
        for index, wnid in enumerate(self._class_ids()):
            folder = self.data_dir / "train" / wnid / "images"
            self._require(folder)
            files = _image_files(folder)
            if not files:
                raise DataFileError(
                    f"{folder} holds no images ({', '.join(IMAGE_EXTENSIONS)}), so class {wnid} could not be learned; "
                    "re-extract tiny-imagenet-200.zip."
                )
            samples += [(path, index) for path in files]
        train_indices, val_indices = stratified_split([label for _, label in samples], [self.val_fraction], self.seed)
        return (
            self._dataset([samples[i] for i in train_indices], crop_flip_transform(64, padding=8)),
            self._dataset([samples[i] for i in val_indices], to_tensor_transform()),
        )

    @staticmethod
    def _dataset(samples: list[tuple[Path, int]], transform: Transform) -> ImageFileDataset:
        return ImageFileDataset(samples, transform, image_size=TINYIMAGENET_IMAGE_SIZE)

    def _build_test_dataset(self) -> Dataset:
        class_index = {wnid: index for index, wnid in enumerate(self._class_ids())}
        annotations = self.data_dir / "val" / "val_annotations.txt"
        self._require(annotations)
        samples, lines = [], {}
        for number, line in enumerate(annotations.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) < 2 or not fields[0] or not fields[1]:
                raise DataFileError(
                    f"{annotations} line {number} is {line!r}; expected tab-separated fields: file name, wnid and "
                    "the bounding box (x0, y0, x1, y1), as in the official file. Re-extract tiny-imagenet-200.zip "
                    "(an editor or copy may have turned the tabs into spaces)."
                )
            file_name, wnid = fields[0], fields[1]
            if wnid not in class_index:
                raise DataFileError(
                    f"{annotations} line {number} names class {wnid!r}, which is not in "
                    f"{self.data_dir / 'wnids.txt'}; labels must be wnids listed there."
                )
            if file_name in lines:
                raise DataFileError(
                    f"{annotations} lists {file_name} twice (lines {lines[file_name]} and {number}); each "
                    "validation image must have one label. Remove the duplicate line."
                )
            lines[file_name] = number
            path = self.data_dir / "val" / "images" / file_name
            self._require(path)
            samples.append((path, class_index[wnid]))
        # Sorted by file name so that dataset indices do not depend on the annotation file's line order.
        return self._dataset(sorted(samples), to_tensor_transform())
