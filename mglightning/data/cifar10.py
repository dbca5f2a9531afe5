"""CIFAR-10 in torchvision's on-disk format (the extracted `cifar-10-python.tar.gz`), read without running its pickles.

The batch files are pickles, and unpickling can call any Python function the file names. They are read with a
restricted unpickler (`CIFAR10Unpickler`) that admits only what the format holds: dicts, lists, strings, bytes,
numbers and NumPy arrays. Every other global is refused before it can run, with an error naming the file. What
loads is then checked: uint8 pixels of shape `(n, 3072)`, and n integer labels in 0..9.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from mglightning.data.base import DataFileError, ImageDataModule, TensorImageDataset, stratified_split
from mglightning.data.transforms import crop_flip_transform, to_tensor_transform

try:  # NumPy >= 2 keeps the array reconstructors in numpy._core; NumPy 1 in numpy.core.
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:  # pragma: no cover - NumPy 1
    from numpy.core import multiarray as _multiarray  # type: ignore[no-redef]
    from numpy.core import numeric as _numeric  # type: ignore[no-redef]

CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch"
CIFAR10_META_FILE = "batches.meta"
CIFAR10_NUM_CLASSES = 10
CIFAR10_PIXELS = 3 * 32 * 32


class _RefusedGlobal(pickle.UnpicklingError):
    """A pickle asked for a global (function or class) outside the CIFAR-10 format; `name` says which."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def _latin1_encode(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    # Python 3 writes bytes into protocol-2 pickles as `_codecs.encode(text, "latin1")`; that use, and no other
    # codec, is admitted.
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise _RefusedGlobal(f"_codecs.encode(..., {encoding!r})")
    return text.encode("latin1")


_CIFAR10_GLOBALS: dict[tuple[str, str], Any] = {
    # NumPy arrays: protocols 2-4 rebuild them with _reconstruct (module numpy.core in files written with NumPy 1,
    # numpy._core with NumPy 2), protocol 5 with _frombuffer; dtype and scalar rebuild dtypes and NumPy numbers.
    **{
        (f"{package}.multiarray", name): getattr(_multiarray, name)
        for package in ("numpy.core", "numpy._core")
        for name in ("_reconstruct", "scalar")
    },
    **{(f"{package}.numeric", "_frombuffer"): _numeric._frombuffer for package in ("numpy.core", "numpy._core")},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    # Bytes in protocol-2 pickles written by Python 3: b"" as bytes(), other bytes through _codecs.encode.
    ("__builtin__", "bytes"): bytes,
    ("builtins", "bytes"): bytes,
    ("_codecs", "encode"): _latin1_encode,
}


class CIFAR10Unpickler(pickle.Unpickler):
    """An unpickler that admits only the globals a CIFAR-10 batch holds; it refuses every other one.

    Dicts, lists, tuples, strings, numbers, booleans and `None` need no globals; admitted are NumPy's array,
    dtype and scalar reconstructors, `bytes`, and `_codecs.encode` with the latin-1 codec only (how Python 3 writes
    bytes into protocol-2 pickles). Any other global (`os.system`, `builtins.eval`, any class) raises
    `pickle.UnpicklingError` naming it, before it is called. Pass `encoding="latin1"` for the Python 2 pickles of
    the official files, as torchvision does.

    Example:
        >>> import io
        >>> CIFAR10Unpickler(io.BytesIO(pickle.dumps({"labels": [3]}))).load()
        {'labels': [3]}
    """

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _CIFAR10_GLOBALS[(module, name)]
        except KeyError:
            raise _RefusedGlobal(f"{module}.{name}") from None


def _redownload(folder: Path) -> str:
    return (
        f"Delete {folder} and download CIFAR-10 again (--data.download true fetches it from the authors' site and "
        "checks its md5 sums), or write the file again if you made it yourself."
    )


def load_cifar10_batch(path: str | Path) -> dict[str, Any]:
    """Unpickle one CIFAR-10 batch file with `CIFAR10Unpickler`; every failure names the file and what to do.

    Keys written as bytes (a batch re-pickled after loading with `encoding="bytes"`) are decoded to strings.

    Raises:
        DataFileError: the file is empty, truncated or not a pickle, asks for a global the format never holds
            (nothing in it is run), or does not hold a dict.

    Example:
        >>> batch = load_cifar10_batch("data/cifar-10-batches-py/test_batch")  # doctest: +SKIP
        >>> batch["data"].shape  # doctest: +SKIP
        (10000, 3072)
    """
    path = Path(path)
    if path.stat().st_size == 0:
        raise DataFileError(
            f"{path} is empty (0 bytes), as an interrupted download or copy leaves it. {_redownload(path.parent)}"
        )
    try:
        with open(path, "rb") as file:
            # The official files are Python 2 pickles; latin1 decodes their byte strings as the format intends.
            batch = CIFAR10Unpickler(file, encoding="latin1").load()
    except _RefusedGlobal as error:
        raise DataFileError(
            f"{path} was refused: its pickle asks for {error.name}, which a CIFAR-10 batch never holds (only a dict "
            "of lists, strings, numbers and NumPy arrays), and unpickling it could run code. Nothing it names was "
            f"run. Do not use this copy. {_redownload(path.parent)}"
        ) from None
    except Exception as error:  # unpickling a damaged file fails in many ways (EOFError, UnpicklingError, ...)
        raise DataFileError(
            f"{path} cannot be read as a CIFAR-10 batch ({type(error).__name__}: {error}); it is truncated or "
            f"damaged. {_redownload(path.parent)}"
        ) from error
    if not isinstance(batch, dict):
        raise DataFileError(
            f"{path} holds a {type(batch).__name__}, not a CIFAR-10 batch (a dict with 'data' and 'labels'). "
            f"{_redownload(path.parent)}"
        )
    return {key.decode("latin1") if isinstance(key, bytes) else key: value for key, value in batch.items()}


def check_cifar10_batch(path: str | Path, batch: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Check a loaded batch against the format; return its `(n, 3072)` uint8 pixels and `(n,)` int64 labels.

    Nothing is cast: pixels must be uint8 already (float images in [0, 1] cast to uint8 would come out black),
    and labels must be integers in 0..9, as many as images.

    Raises:
        DataFileError: naming `path`, the key at fault and what to do.

    Example:
        >>> data, labels = check_cifar10_batch("b", {"data": np.zeros((2, 3072), np.uint8), "labels": [0, 9]})
        >>> data.shape, labels.tolist()
        ((2, 3072), [0, 9])
    """
    path = Path(path)
    missing = [key for key in ("data", "labels") if key not in batch]
    if missing:
        raise DataFileError(
            f"{path} is not a CIFAR-10 batch: it lacks {', '.join(map(repr, missing))} (its keys: "
            f"{', '.join(map(repr, batch))}). {_redownload(path.parent)}"
        )
    data = batch["data"]
    if not isinstance(data, np.ndarray):
        raise DataFileError(f"{path}: 'data' is a {type(data).__name__}, not a NumPy uint8 array of shape (n, 3072).")
    if data.dtype != np.uint8:
        advice = ""
        if data.dtype.kind == "f":
            advice = (
                " Images stored as floats in [0, 1] would come out black if cast: write "
                "np.round(data * 255).astype(np.uint8) instead (np.round(data).astype(np.uint8) for floats in 0..255)."
            )
        raise DataFileError(
            f"{path}: 'data' has dtype {data.dtype}, but CIFAR-10 pixels are uint8 (0..255); it was not cast, since "
            f"that can change the images silently.{advice}"
        )
    if data.ndim != 2 or data.shape[1] != CIFAR10_PIXELS:
        raise DataFileError(
            f"{path} is not a CIFAR-10 batch: expected 'data' of shape (n, 3072) (each row the 1024 red, 1024 green "
            f"and 1024 blue values of a 32x32 image), got {data.shape}. {_redownload(path.parent)}"
        )
    labels = _check_labels(path, batch["labels"])
    if len(labels) != len(data):
        raise DataFileError(
            f"{path} is not a CIFAR-10 batch: it holds {len(data)} images but {len(labels)} labels. "
            f"{_redownload(path.parent)}"
        )
    return data, labels


def _check_labels(path: Path, labels: Any) -> np.ndarray:
    """`labels` as int64 if it is a list, tuple or 1-D integer array of class indices in 0..9; else DataFileError."""
    what = "CIFAR-10 labels are class indices, integers 0..9"
    if isinstance(labels, np.ndarray):
        if labels.ndim != 1 or labels.dtype.kind not in "iu":
            raise DataFileError(
                f"{path}: 'labels' is an array of dtype {labels.dtype} and shape {labels.shape}; {what}."
            )
        values = [int(value) for value in labels]
    elif isinstance(labels, (list, tuple)):
        for index, value in enumerate(labels):
            # bool is an int subclass, but True as a class index is a mistake, not a label.
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise DataFileError(
                    f"{path}: label {index} is {value!r} ({type(value).__name__}); {what} (the class names are "
                    "in batches.meta). Write the labels as their class indices."
                )
        values = [int(value) for value in labels]
    else:
        raise DataFileError(f"{path}: 'labels' is a {type(labels).__name__}, not a list; {what}.")
    outside = [index for index, value in enumerate(values) if not 0 <= value < CIFAR10_NUM_CLASSES]
    if outside:
        raise DataFileError(
            f"{path} has {len(outside)} labels outside 0..{CIFAR10_NUM_CLASSES - 1} (CIFAR-10 has "
            f"{CIFAR10_NUM_CLASSES} classes), the first is label {outside[0]} = {values[outside[0]]}. They would "
            "count as wrong answers in evaluation and stop training mid-epoch; write the labels again as class "
            f"indices 0..{CIFAR10_NUM_CLASSES - 1}."
        )
    return np.asarray(values, dtype=np.int64)


def read_cifar10_batches(folder: str | Path, names: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Read CIFAR-10 batch files into `(N, 3, 32, 32)` uint8 images and `(N,)` int64 labels, checking each.

    Each file is a pickled dict whose `data` is an `(n, 3072)` uint8 array (1024 red, then 1024 green, then 1024
    blue values, each a row-major 32x32 plane) and whose `labels` is a list of n ints in 0..9. Files are read
    with `load_cifar10_batch` (nothing in them is run) and checked with `check_cifar10_batch`. The files' md5 sums
    are not checked (torchvision checks them when it downloads).

    Raises:
        DataFileError: a file is damaged, refused or not in the format; the message names it.

    Example:
        >>> images, labels = read_cifar10_batches("data/cifar-10-batches-py", ("test_batch",))  # doctest: +SKIP
    """
    images, labels = [], []
    for name in names:
        path = Path(folder) / name
        data, batch_labels = check_cifar10_batch(path, load_cifar10_batch(path))
        # Arrays unpickled from protocol 5 are read-only views of the file's bytes; torch wants writable memory.
        writable = data if data.flags.writeable else data.copy()
        images.append(torch.from_numpy(writable.reshape(-1, 3, 32, 32)))
        labels.append(torch.from_numpy(batch_labels))
    return torch.cat(images), torch.cat(labels)


class CIFAR10DataModule(ImageDataModule):
    """CIFAR-10: 50,000 training and 10,000 test images of 32x32 pixels in 10 classes.

    `data_dir` is the folder that holds `cifar-10-batches-py/` (torchvision's layout). A seeded stratified
    `val_fraction` of the training set is held out for validation; the official test batch is the test set.
    Training augmentation: random 32x32 crop of the image zero-padded by 4 pixels, and horizontal flips.
    `mean`/`std` are the training set's per-channel statistics.

    Args:
        data_dir: folder containing (or to receive) `cifar-10-batches-py/`.
        download: download and extract the archive into `data_dir` if the files are missing (needs internet).
        batch_size: the GLOBAL batch size, divided among the devices.
        num_workers: dataloader worker processes.
        pin_memory: pin host memory for faster copies to an accelerator.
        val_fraction: share of each class of the training set held out for validation.
        seed: seed of the train/val split.

    Example:
        >>> dm = CIFAR10DataModule(data_dir="data", download=True)  # doctest: +SKIP
        >>> dm.prepare_data(); dm.setup("fit")  # doctest: +SKIP
    """

    def __init__(
        self,
        data_dir: str = "data",
        download: bool = False,
        batch_size: int = 128,
        num_workers: int = 4,
        pin_memory: bool = False,
        val_fraction: float = 0.1,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory)
        self.save_hyperparameters(logger=False)
        self.data_dir = Path(data_dir)
        self.download = download
        self.val_fraction = val_fraction
        self.seed = seed
        self.num_classes = 10
        self.image_size = 32
        self.in_chans = 3
        # Per-channel mean and standard deviation of the 50,000 training images in [0, 1].
        self.mean = (0.4914, 0.4822, 0.4465)
        self.std = (0.2470, 0.2435, 0.2616)

    @property
    def folder(self) -> Path:
        """Where the batch files are: `<data_dir>/cifar-10-batches-py`."""
        return self.data_dir / CIFAR10_FOLDER

    def _missing_files(self) -> list[str]:
        expected = (*CIFAR10_TRAIN_FILES, CIFAR10_TEST_FILE, CIFAR10_META_FILE)
        return [name for name in expected if not (self.folder / name).is_file()]

    def _check_files(self) -> None:
        missing = self._missing_files()
        if missing:
            raise FileNotFoundError(
                f"CIFAR-10 not found: {self.folder} lacks {', '.join(missing)}. Expected torchvision's layout, "
                f"{self.folder}/{{data_batch_1..5, test_batch, batches.meta}} (the extracted cifar-10-python.tar.gz "
                "from https://www.cs.toronto.edu/~kriz/cifar.html). Set --data.download true to download it, or "
                "point --data.data_dir at the folder that contains cifar-10-batches-py/."
            )

    def prepare_data(self) -> None:
        """Download CIFAR-10 with torchvision if `download` is set and the files are missing; else check them."""
        if self.download and self._missing_files():
            from torchvision.datasets import CIFAR10  # only needed for the download, which also checks md5 sums

            CIFAR10(root=str(self.data_dir), train=True, download=True)
        self._check_files()

    def _build_fit_datasets(self) -> tuple[Dataset, Dataset]:
        self._check_files()
        images, labels = read_cifar10_batches(self.folder, CIFAR10_TRAIN_FILES)
        split = stratified_split(labels, [self.val_fraction], self.seed)
        train_indices, val_indices = (torch.from_numpy(indices) for indices in split)
        return (
            TensorImageDataset(images[train_indices], labels[train_indices], crop_flip_transform(32, padding=4)),
            TensorImageDataset(images[val_indices], labels[val_indices], to_tensor_transform()),
        )

    def _build_test_dataset(self) -> Dataset:
        self._check_files()
        images, labels = read_cifar10_batches(self.folder, (CIFAR10_TEST_FILE,))
        return TensorImageDataset(images, labels, to_tensor_transform())
