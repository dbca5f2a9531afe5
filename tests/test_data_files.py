"""Data files that run nothing and are checked: hostile, damaged and malformed CIFAR-10, tiny-ImageNet and ImageNet.

Every malformed file must be refused with a `DataFileError` that names it; nothing read from a file may run code.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from fake_datasets import write_fake_cifar10, write_fake_imagenet, write_fake_tinyimagenet, wnid
from PIL import Image

from mglightning.data import (
    MAX_IMAGE_PIXELS,
    CIFAR10DataModule,
    DataFileError,
    ImageNetDataModule,
    TinyImageNetDataModule,
    read_rgb_image,
)
from mglightning.data.cifar10 import CIFAR10Unpickler

# ------------------------------------------------------------------------------------- CIFAR-10: hostile pickles


class _WritesMarker:
    """Unpickling this calls `os.system` (as a hostile batch file would), which creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _OpensMarker:
    """Unpickling this calls the builtin `open`, which creates the marker file, without any shell."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _cifar10(tmp_path: Path) -> Path:
    return write_fake_cifar10(tmp_path / "data", n_train=20, n_test=10) / "cifar-10-batches-py"


def _rewrite(path: Path, batch: object, protocol: int = 2) -> None:
    path.write_bytes(pickle.dumps(batch, protocol=protocol))


def _batch(path: Path) -> dict:
    with open(path, "rb") as file:
        return pickle.load(file, encoding="latin1")


@pytest.mark.parametrize("payload", [_WritesMarker, _OpensMarker])
def test_cifar10_pickle_that_runs_code_is_refused_and_nothing_runs(tmp_path, payload):
    folder = _cifar10(tmp_path)
    marker = tmp_path / "marker"
    hostile = {**_batch(folder / "data_batch_1"), "batch_label": payload(marker)}
    _rewrite(folder / "data_batch_1", hostile)
    with pytest.raises(DataFileError) as error:
        CIFAR10DataModule(data_dir=str(tmp_path / "data")).setup("fit")
    assert not marker.exists()
    message = str(error.value)
    assert str(folder / "data_batch_1") in message and "refused" in message and "Nothing it names was run" in message
    assert ("posix.system" if payload is _WritesMarker else "io.open") in message
    assert "--data.download true" in message
    # The file is really hostile: plain pickle runs it.
    pickle.loads((folder / "data_batch_1").read_bytes(), encoding="latin1")
    assert marker.exists()


def test_cifar10_unpickler_admits_latin1_bytes_only():
    # How Python 3 writes b"x" into a protocol-2 pickle, then the same call with another codec.
    assert CIFAR10Unpickler(io.BytesIO(pickle.dumps(b"\xffx", protocol=2))).load() == b"\xffx"
    assert CIFAR10Unpickler(io.BytesIO(pickle.dumps(b"", protocol=2))).load() == b""
    rot13 = b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00xX\x05\x00\x00\x00rot13\x86R."
    assert pickle.loads(rot13) == "k"  # the call is real ...
    with pytest.raises(pickle.UnpicklingError, match="rot13"):  # ... and refused
        CIFAR10Unpickler(io.BytesIO(rot13)).load()
    for name in (b"builtins\neval", b"numpy\nload", b"numpy.testing\nrundocs", b"copyreg\n_reconstructor"):
        with pytest.raises(pickle.UnpicklingError, match=name.decode().replace("\n", ".")):
            CIFAR10Unpickler(io.BytesIO(b"\x80\x02c" + name + b"\n.")).load()


# -------------------------------------------------------------------------------- CIFAR-10: real format variants


def _python2_batch_pickle(data: np.ndarray, labels: list[int]) -> bytes:
    """The opcodes of an official (Python 2, NumPy 1) batch: byte-string keys and pixels, numpy.core globals."""

    def string(raw: bytes) -> bytes:  # Python 2 str: SHORT_BINSTRING or BINSTRING
        return b"U" + bytes([len(raw)]) + raw if len(raw) < 256 else b"T" + struct.pack("<I", len(raw)) + raw

    def integer(value: int) -> bytes:
        return b"J" + struct.pack("<i", value)

    dtype = b"cnumpy\ndtype\n" + string(b"u1") + integer(0) + integer(1) + b"\x87R"
    dtype += b"(" + integer(3) + string(b"|") + b"NNN" + integer(-1) + integer(-1) + integer(0) + b"tb"
    array = b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + integer(0) + b"\x85" + string(b"b") + b"\x87R"
    array += b"(" + integer(1) + integer(data.shape[0]) + integer(data.shape[1]) + b"\x86" + dtype
    array += b"\x89" + string(data.tobytes()) + b"tb"
    label_list = b"](" + b"".join(integer(label) for label in labels) + b"e"
    body = string(b"batch_label") + string(b"testing batch 1 of 1") + string(b"labels") + label_list
    return b"\x80\x02}(" + body + string(b"data") + array + b"u."


def _variants(data: np.ndarray, labels: list[int]) -> dict[str, bytes]:
    base = {"batch_label": "testing batch 1 of 1", "data": data, "filenames": ["a.png"] * len(labels)}
    return {
        "python2": _python2_batch_pickle(data, labels),
        "torchvision protocol 2": pickle.dumps({**base, "labels": labels}, protocol=2),
        "protocol 4": pickle.dumps({**base, "labels": labels}, protocol=4),
        "protocol 5": pickle.dumps({**base, "labels": labels}, protocol=5),
        "bytes keys": pickle.dumps({b"data": data, b"labels": labels}, protocol=2),
        "numpy labels": pickle.dumps({**base, "labels": np.array(labels, dtype=np.int64)}, protocol=2),
        "numpy scalar labels": pickle.dumps({**base, "labels": [np.int64(v) for v in labels]}, protocol=2),
    }


@pytest.mark.parametrize("variant", list(_variants(np.zeros((1, 3072), np.uint8), [0])))
def test_cifar10_real_format_variants_load(tmp_path, variant):
    folder = _cifar10(tmp_path)
    rng = np.random.RandomState(1)
    data = rng.randint(0, 256, size=(7, 3072)).astype(np.uint8)
    labels = [int(v) for v in rng.randint(0, 10, size=7)]
    raw = _variants(data, labels)[variant]
    # An independent reader of the same bytes: plain pickle, as torchvision reads the files.
    reference = pickle.loads(raw, encoding="latin1")
    assert np.array_equal(reference["data" if "data" in reference else b"data"], data)
    (folder / "test_batch").write_bytes(raw)
    dm = CIFAR10DataModule(data_dir=str(tmp_path / "data"))
    dm.setup("test")
    assert torch.equal(dm.test_dataset.images, torch.from_numpy(data).reshape(7, 3, 32, 32))
    assert dm.test_dataset.labels.tolist() == labels


# --------------------------------------------------------------------------------- CIFAR-10: malformed contents


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        ([0, 1, 10, 3], "1 labels outside 0..9"),
        ([0, -1, 2, 3], "the first is label 1 = -1"),
        ([0, "cat", 2, 3], "label 1 is 'cat' (str)"),
        ([0, 1.0, 2, 3], "label 1 is 1.0 (float)"),
        ([True, 1, 2, 3], "label 0 is True (bool)"),
        (np.array([0.0, 1.0, 2.0, 3.0]), "array of dtype float64"),
        (np.array(["a", "b", "c", "d"]), "array of dtype <U1"),
        ({"a": 1}, "'labels' is a dict"),
        ([0, 1, 2], "4 images but 3 labels"),
    ],
)
def test_cifar10_bad_labels_are_refused_naming_the_file(tmp_path, labels, expected):
    folder = _cifar10(tmp_path)
    batch = _batch(folder / "test_batch")
    _rewrite(folder / "test_batch", {**batch, "data": batch["data"][:4], "labels": labels})
    with pytest.raises(DataFileError) as error:
        CIFAR10DataModule(data_dir=str(tmp_path / "data")).setup("test")
    assert str(folder / "test_batch") in str(error.value) and expected in str(error.value)


def test_cifar10_labels_out_of_range_are_caught_in_training_files_too(tmp_path):
    folder = _cifar10(tmp_path)
    batch = _batch(folder / "data_batch_4")
    _rewrite(folder / "data_batch_4", {**batch, "labels": [10] * len(batch["labels"])})
    with pytest.raises(DataFileError, match=f"{folder / 'data_batch_4'} has 4 labels outside 0..9"):
        CIFAR10DataModule(data_dir=str(tmp_path / "data")).setup("fit")


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (np.random.RandomState(0).rand(4, 3072), "np.round(data * 255).astype(np.uint8)"),
        (np.full((4, 3072), 7, np.int64), "dtype int64, but CIFAR-10 pixels are uint8"),
        (np.zeros((4, 3, 32, 32), np.uint8), "got (4, 3, 32, 32)"),
        (np.zeros((4, 3000), np.uint8), "got (4, 3000)"),
        ([[0] * 3072] * 4, "'data' is a list"),
    ],
)
def test_cifar10_pixels_that_are_not_uint8_rows_are_refused_not_cast(tmp_path, data, expected):
    folder = _cifar10(tmp_path)
    _rewrite(folder / "test_batch", {"data": data, "labels": [0, 1, 2, 3]})
    with pytest.raises(DataFileError) as error:
        CIFAR10DataModule(data_dir=str(tmp_path / "data")).setup("test")
    assert str(folder / "test_batch") in str(error.value) and expected in str(error.value)


@pytest.mark.parametrize(
    ("batch", "expected"),
    [([1, 2], "holds a list, not a CIFAR-10 batch"), ({"data": np.zeros((1, 3072), np.uint8)}, "lacks 'labels'")],
)
def test_cifar10_pickles_of_other_things_are_refused(tmp_path, batch, expected):
    folder = _cifar10(tmp_path)
    _rewrite(folder / "test_batch", batch)
    with pytest.raises(DataFileError, match=expected):
        CIFAR10DataModule(data_dir=str(tmp_path / "data")).setup("test")


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda raw: b"", "is empty (0 bytes)"),
        (lambda raw: raw[: len(raw) // 2], "pickle data was truncated"),
        (lambda raw: raw[:1], "truncated or damaged"),
        (lambda raw: b"<html>404 Not Found</html>", "truncated or damaged"),
    ],
)
def test_cifar10_truncated_or_empty_batch_names_the_file(tmp_path, damage, expected):
    folder = _cifar10(tmp_path)
    path = folder / "data_batch_3"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(DataFileError) as error:
        CIFAR10DataModule(data_dir=str(tmp_path / "data")).setup("fit")
    message = str(error.value)
    assert str(path) in message and expected in message
    assert "download CIFAR-10 again" in message


# ----------------------------------------------------------------------------------------- images: 16-bit files


def _sixteen_bit_values() -> np.ndarray:
    # All the edges: 0, 65535, multiples of 257 and the rounding boundaries next to them.
    edges = np.array([0, 1, 128, 129, 256, 257, 385, 386, 32767, 32768, 65406, 65407, 65534, 65535])
    spread = np.random.RandomState(0).randint(0, 65536, size=64 * 64 - len(edges))
    return np.concatenate([edges, spread]).reshape(64, 64).astype(np.uint16)


@pytest.mark.parametrize(
    ("fmt", "mode"), [("PNG", "I;16"), ("TIFF", "I;16B"), ("TIFF", "I;16"), ("PPM", "I;16")]
)
def test_16bit_images_are_scaled_not_saturated(tmp_path, fmt, mode):
    values = _sixteen_bit_values()
    big_endian = Image.frombytes("I;16B", (64, 64), values.astype(">u2").tobytes())
    image = Image.fromarray(values) if mode == "I;16" else big_endian
    path = tmp_path / f"image.{fmt.lower()}"
    image.save(path, format=fmt)
    rgb = np.asarray(read_rgb_image(path))
    # Closed form: v * 255 / 65535 = v / 257, rounded (v / 257 is never halfway between integers).
    expected = np.round(values / 257.0).astype(np.uint8)
    assert rgb.shape == (64, 64, 3) and rgb.dtype == np.uint8
    for channel in range(3):
        assert np.array_equal(rgb[..., channel], expected)
    assert rgb[0, [13, 5, 3, 2], 0].tolist() == [255, 1, 1, 0]  # 65535, 257, 129, 128
    assert (rgb == 255).mean() < 0.01  # Pillow's own convert("RGB") makes 99.6% of these pixels 255


def test_16bit_png_in_tinyimagenet_reaches_the_model_scaled(tmp_path):
    data_dir = write_fake_tinyimagenet(tmp_path, n_classes=2, n_train_per_class=2, n_val_per_class=1)
    values = _sixteen_bit_values()
    Image.fromarray(values).save(data_dir / "val" / "images" / "val_0.png")
    annotations = data_dir / "val" / "val_annotations.txt"
    annotations.write_text(annotations.read_text().replace("val_0.JPEG", "val_0.png"))
    dm = TinyImageNetDataModule(data_dir=str(data_dir), num_classes=2)
    dm.setup("test")
    index = [path.name for path, _ in dm.test_dataset.samples].index("val_0.png")
    image, _ = dm.test_dataset[index]
    expected = torch.from_numpy(np.round(values / 257.0)).float() / 255
    torch.testing.assert_close(image, expected.expand(3, 64, 64), atol=1e-7, rtol=0)


@pytest.mark.parametrize(("mode", "kind"), [("I", "32-bit integer"), ("F", "floating-point")])
def test_images_without_a_fixed_range_are_refused(tmp_path, mode, kind):
    path = tmp_path / "wide.tiff"
    Image.fromarray(_sixteen_bit_values()).convert(mode).save(path)
    with pytest.raises(DataFileError, match=f"{path} is a {kind} TIFF image"):
        read_rgb_image(path)


# -------------------------------------------------------------------------------------- images: size and damage


def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims `width` x `height` pixels and holds no pixel data: only its header can be read."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [8193, 10_000, 20_000])
def test_images_past_the_pixel_limit_fail_before_decoding_not_warn(tmp_path, side):
    # 8193^2 is just past MAX_IMAGE_PIXELS; 10,000^2 is where Pillow only warns; 20,000^2 where Pillow refuses.
    assert MAX_IMAGE_PIXELS == 2**26
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header(side, side))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(DataFileError) as error:
            read_rgb_image(path)
    message = str(error.value)
    assert str(path) in message and "67,108,864" in message and "was not decoded" in message


def test_image_at_the_pixel_limit_is_read_and_one_pixel_more_is_not(tmp_path):
    path = tmp_path / "wide.png"
    Image.new("L", (40, 30), 7).save(path)
    rgb = read_rgb_image(path, max_pixels=1200)
    assert rgb.size == (40, 30) and rgb.getpixel((5, 5)) == (7, 7, 7)
    with pytest.raises(DataFileError, match="40x30 = 1,200 pixels, more than the limit of 1,199"):
        read_rgb_image(path, max_pixels=1199)


def test_imagenet_pixel_limit_is_configurable_and_checked(tmp_path):
    data_dir = write_fake_imagenet(tmp_path, n_classes=2, n_val_per_class=1, with_train=False)
    dm = ImageNetDataModule(data_dir=str(data_dir), num_classes=2, image_size=16, max_image_pixels=1000)
    dm.setup("test")
    with pytest.raises(DataFileError, match=r"ILSVRC2012_val_00000001.JPEG is \d+x\d+ = [\d,]+ pixels, more than"):
        dm.test_dataset[0]
    for bad in (0, 2**40):
        with pytest.raises(ValueError, match="max_image_pixels"):
            ImageNetDataModule(data_dir=str(data_dir), max_image_pixels=bad)


@pytest.mark.parametrize("dataset", ["tinyimagenet", "imagenet"])
@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda raw: raw[: len(raw) // 2], "image file is truncated"),
        (lambda raw: raw[:20], "cannot be read as an image"),
        (lambda raw: b"not an image at all", "cannot be read as an image"),
    ],
)
def test_damaged_images_are_named(tmp_path, dataset, damage, expected):
    if dataset == "tinyimagenet":
        data_dir = write_fake_tinyimagenet(tmp_path, n_classes=2, n_train_per_class=2, n_val_per_class=1)
        dm = TinyImageNetDataModule(data_dir=str(data_dir), num_classes=2)
    else:
        data_dir = write_fake_imagenet(tmp_path, n_classes=2, n_val_per_class=1, with_train=False)
        dm = ImageNetDataModule(data_dir=str(data_dir), num_classes=2, image_size=16)
    dm.setup("test")
    path = Path(dm.test_dataset.samples[1][0])
    path.write_bytes(damage(path.read_bytes()))
    dm.test_dataset[0]  # the others still load
    with pytest.raises(DataFileError) as error:
        dm.test_dataset[1]
    assert str(path) in str(error.value) and expected in str(error.value)


def test_wrong_size_tinyimagenet_image_is_named_with_the_expected_size(tmp_path):
    data_dir = write_fake_tinyimagenet(tmp_path, n_classes=2, n_train_per_class=3, n_val_per_class=2)
    path = data_dir / "val" / "images" / "val_1.JPEG"
    Image.new("RGB", (64, 48), (10, 20, 30)).save(path, format="JPEG")
    dm = TinyImageNetDataModule(data_dir=str(data_dir), num_classes=2, batch_size=4, num_workers=0)
    dm.setup("test")
    with pytest.raises(DataFileError, match=f"{path} is 64x48 pixels, but the images of this dataset are 64x64"):
        next(iter(dm.test_dataloader()))


# ------------------------------------------------------------------------------------- tiny-ImageNet: text files


def test_duplicate_wnid_is_refused_naming_it(tmp_path):
    data_dir = write_fake_tinyimagenet(tmp_path, n_classes=3, n_train_per_class=2, n_val_per_class=1)
    wnids = data_dir / "wnids.txt"
    wnids.write_text(wnids.read_text() + f"{wnid(0)}\n")
    for step in ("prepare", "fit", "test"):
        dm = TinyImageNetDataModule(data_dir=str(data_dir), num_classes=3)
        with pytest.raises(DataFileError) as error:
            dm.prepare_data() if step == "prepare" else dm.setup(step)
        assert f"{wnids} lists {wnid(0)} twice (lines 3 and 4)" in str(error.value)
    wnids.write_text(f"{wnid(0)} goldfish\n{wnid(1)}\n{wnid(2)}\n")
    with pytest.raises(DataFileError, match="line 1 is 'n00000000 goldfish'; each line must hold one wnid"):
        TinyImageNetDataModule(data_dir=str(data_dir), num_classes=3).setup("test")


def test_malformed_val_annotations_name_the_file_and_line(tmp_path):
    data_dir = write_fake_tinyimagenet(tmp_path, n_classes=2, n_train_per_class=2, n_val_per_class=2)
    annotations = data_dir / "val" / "val_annotations.txt"
    original = annotations.read_text()
    cases = {
        original.replace("\t", " "): "line 1 is 'val_0.JPEG n00000000 0 0 63 63'; expected tab-separated",
        original.replace(f"val_2.JPEG\t{wnid(0)}", "val_2.JPEG\tgoldfish"): "line 3 names class 'goldfish'",
        original.replace(f"val_2.JPEG\t{wnid(0)}", "val_2.JPEG\t0"): "line 3 names class '0'",
        original + f"val_0.JPEG\t{wnid(1)}\t0\t0\t63\t63\n": "lists val_0.JPEG twice (lines 1 and 5)",
    }
    for text, expected in cases.items():
        annotations.write_text(text)
        with pytest.raises(DataFileError) as error:
            TinyImageNetDataModule(data_dir=str(data_dir), num_classes=2).setup("test")
        assert str(annotations) in str(error.value) and expected in str(error.value)


def test_tinyimagenet_empty_class_folder_and_hidden_files(tmp_path):
    data_dir = write_fake_tinyimagenet(tmp_path, n_classes=2, n_train_per_class=3, n_val_per_class=1)
    images = data_dir / "train" / wnid(1) / "images"
    (images / f"._{wnid(1)}_0.JPEG").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")  # not an image
    dm = TinyImageNetDataModule(data_dir=str(data_dir), num_classes=2, val_fraction=0.3)
    dm.setup("fit")
    names = [path.name for path, _ in dm.train_dataset.samples + dm.val_dataset.samples]
    assert len(names) == 6 and not any(name.startswith(".") for name in names)
    for path in images.glob("*.JPEG"):
        path.unlink()
    with pytest.raises(DataFileError, match=f"{images} holds no images"):
        TinyImageNetDataModule(data_dir=str(data_dir), num_classes=2).setup("fit")


# -------------------------------------------------------------------------------------- ImageNet: folder layout


def test_imagenet_ignores_hidden_folders_and_files(tmp_path):
    data_dir = write_fake_imagenet(tmp_path, n_classes=3, n_train_per_class=2, n_val_per_class=2)
    for split in ("val", "train"):
        hidden = data_dir / split / ".ipynb_checkpoints"
        hidden.mkdir()
        Image.new("RGB", (40, 40)).save(hidden / "copy.JPEG")
        (data_dir / split / wnid(0) / "._copy.JPEG").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
        (data_dir / split / wnid(1) / ".ipynb_checkpoints").mkdir()
        Image.new("RGB", (40, 40)).save(data_dir / split / wnid(1) / ".ipynb_checkpoints" / "x.JPEG")
    dm = ImageNetDataModule(data_dir=str(data_dir), num_classes=3, image_size=16, val_fraction=0.5)
    dm.setup("fit")
    dm.setup("test")
    samples = dm.train_dataset.samples + dm.val_dataset.samples + dm.test_dataset.samples
    assert len(samples) == 12 and not any("/." in str(path) for path, _ in samples)
    for index in range(len(dm.test_dataset)):
        dm.test_dataset[index]


def test_imagenet_nested_folder_is_named_not_blamed_on_num_classes(tmp_path):
    data_dir = write_fake_imagenet(tmp_path, n_classes=3, n_val_per_class=1, with_train=False)
    inner = data_dir / "val" / "val"
    inner.mkdir()
    for k in range(3):
        (data_dir / "val" / wnid(k)).rename(inner / wnid(k))
    with pytest.raises(DataFileError) as error:
        ImageNetDataModule(data_dir=str(data_dir), num_classes=3).setup("test")
    message = str(error.value)
    assert f"{data_dir / 'val'} holds one folder, {inner}, which holds 3 folders itself" in message
    assert "nested one level too deep" in message and "--data.num_classes" not in message


def test_imagenet_flat_folder_says_to_sort_it(tmp_path):
    data_dir = write_fake_imagenet(tmp_path, n_classes=2, n_val_per_class=1, with_train=False)
    for path in list((data_dir / "val").rglob("*.JPEG")):
        path.rename(data_dir / "val" / path.name)
        path.parent.rmdir()
    with pytest.raises(DataFileError, match="holds no class folders, but images directly: the flat layout"):
        ImageNetDataModule(data_dir=str(data_dir), num_classes=2).setup("test")


def test_imagenet_empty_class_folder_is_named(tmp_path):
    data_dir = write_fake_imagenet(tmp_path, n_classes=2, n_val_per_class=1, with_train=False)
    for path in (data_dir / "val" / wnid(1)).iterdir():
        path.unlink()
    with pytest.raises(DataFileError, match=f"{data_dir / 'val'}: .*{wnid(1)}.*Every class folder needs its images"):
        ImageNetDataModule(data_dir=str(data_dir), num_classes=2).setup("test")
