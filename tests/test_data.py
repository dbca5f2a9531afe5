"""Datamodules: shapes, ranges, seeded splits, the real on-disk formats, clear errors and per-device batches."""

from __future__ import annotations

import pickle
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from fake_datasets import (
    class_colour,
    write_fake_cifar10,
    write_fake_imagenet,
    write_fake_tinyimagenet,
)
from jsonargparse import ArgumentParser
from PIL import Image
from sklearn.datasets import load_digits

from mglightning.data import (
    CIFAR10DataModule,
    DigitsDataModule,
    ImageNetDataModule,
    SyntheticDataModule,
    TinyImageNetDataModule,
    channel_stats,
    stratified_split,
)
from mglightning.data.digits import load_digit_images

COLOURS = torch.tensor([class_colour(k) for k in range(10)], dtype=torch.float32) / 255


def assert_valid_item(item, in_chans: int, image_size: int, num_classes: int) -> None:
    image, label = item
    assert type(image) is torch.Tensor and image.dtype == torch.float32
    assert image.shape == (in_chans, image_size, image_size)
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert isinstance(label, int) and 0 <= label < num_classes


def colour_class(image: torch.Tensor) -> int:
    """The fake datasets' class whose colour is nearest the image's mean colour."""
    return int(torch.cdist(image.mean((1, 2))[None], COLOURS).argmin())


def is_gray(image: torch.Tensor) -> bool:
    return bool((image[0] == image[1]).all() and (image[1] == image[2]).all())


# --------------------------------------------------------------------------------------------- shared helpers


def test_stratified_split_is_a_per_class_partition():
    labels = np.repeat(np.arange(4), [10, 20, 7, 33])
    rest, val, test = stratified_split(labels, (0.1, 0.2), seed=3)
    assert np.array_equal(np.sort(np.concatenate([rest, val, test])), np.arange(len(labels)))
    for cls, size in enumerate([10, 20, 7, 33]):
        assert (labels[val] == cls).sum() == round(0.1 * size)
        assert (labels[test] == cls).sum() == round(0.2 * size)
    assert all(np.array_equal(part, np.sort(part)) for part in (rest, val, test))


def test_stratified_split_is_seeded():
    labels = np.arange(200) % 5
    first, again, other = (stratified_split(labels, (0.25,), seed) for seed in (0, 0, 1))
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not np.array_equal(first[1], other[1])


def test_stratified_split_holds_out_one_of_small_classes_and_rejects_empty_parts():
    rest, val, test = stratified_split(np.repeat(np.arange(3), 3), (0.1, 0.2), seed=0)
    assert len(rest) == len(val) == len(test) == 3
    with pytest.raises(ValueError, match="leaves a part empty \\(sizes \\[3, 3, 0\\]"):
        stratified_split(np.repeat(np.arange(3), 2), (0.1, 0.2), seed=0)


@pytest.mark.parametrize("fractions", [(0.0,), (0.5, 0.5), (-0.1,)])
def test_stratified_split_rejects_bad_fractions(fractions):
    with pytest.raises(ValueError, match="positive and sum to less than 1"):
        stratified_split(np.zeros(10), fractions, seed=0)


def test_channel_stats_match_numpy():
    images = torch.rand(5, 3, 4, 6)
    mean, std = channel_stats(images)
    array = images.numpy().astype(np.float64)
    np.testing.assert_allclose(mean, array.mean(axis=(0, 2, 3)))
    np.testing.assert_allclose(std, array.std(axis=(0, 2, 3)))


# ---------------------------------------------------------------------- every datamodule, before any data is read


ALL_DATAMODULES = [
    (DigitsDataModule, {}, (10, 32)),
    (SyntheticDataModule, {"num_classes": 7, "image_size": 16}, (7, 16)),
    (CIFAR10DataModule, {"data_dir": "/nonexistent"}, (10, 32)),
    (TinyImageNetDataModule, {"data_dir": "/nonexistent"}, (200, 64)),
    (ImageNetDataModule, {"data_dir": "/nonexistent"}, (1000, 224)),
]


@pytest.mark.parametrize(("cls", "kwargs", "expected"), ALL_DATAMODULES, ids=lambda v: getattr(v, "__name__", ""))
def test_model_facing_attributes_exist_right_after_init(cls, kwargs, expected):
    dm = cls(**kwargs)  # for the real datasets the folder does not exist: __init__ must not read it
    assert (dm.num_classes, dm.image_size) == expected
    assert dm.in_chans == len(dm.mean) == len(dm.std) == 3
    assert all(0 < m < 1 for m in dm.mean) and all(0 < s < 0.5 for s in dm.std)
    assert all(type(v) is float for v in dm.mean + dm.std)


@pytest.mark.parametrize("cls", [entry[0] for entry in ALL_DATAMODULES], ids=lambda c: c.__name__)
def test_cli_can_build_options_from_the_signature(cls):
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, "data")
    config = parser.parse_args(["--data.batch_size", "16"])
    assert config.data.batch_size == 16
    assert "GLOBAL batch size" in parser.format_help()


# --------------------------------------------------------------------------------------------------- digits


def test_digits_items_splits_and_loader():
    dm = DigitsDataModule(batch_size=64)
    dm.setup()
    sizes = [len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)]
    assert sum(sizes) == 1797 and sizes == [1259, 179, 359]
    indices = np.concatenate([dm.train_indices, dm.val_indices, dm.test_indices])
    assert np.array_equal(np.sort(indices), np.arange(1797))
    for dataset in (dm.train_dataset, dm.val_dataset, dm.test_dataset):
        assert_valid_item(dataset[0], 3, 32, 10)
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (64, 3, 32, 32) and labels.dtype == torch.int64
    np.testing.assert_allclose(dm.mean, channel_stats(dm.images[torch.from_numpy(dm.train_indices)])[0])


def test_digits_split_is_seeded_and_machine_independent():
    first, again, other = DigitsDataModule(seed=0), DigitsDataModule(seed=0), DigitsDataModule(seed=1)
    assert np.array_equal(first.test_indices, again.test_indices)
    assert not np.array_equal(first.test_indices, other.test_indices)
    # Pinned: a change of this split (by a code change, or a platform) must be noticed.
    assert first.test_indices[:8].tolist() == [1, 2, 4, 5, 9, 17, 19, 22]
    assert first.val_indices[:5].tolist() == [6, 14, 18, 34, 37]


def test_digits_test_item_is_the_scaled_digit(tmp_path):
    dm = DigitsDataModule()
    dm.setup("test")
    raw = load_digits()
    index = int(dm.test_indices[3])
    image, label = dm.test_dataset[3]
    assert label == raw.target[index]
    assert torch.equal(image[0], image[2])
    # Against PIL's bilinear resize of the 8x8 digit scaled by 1/16.
    pil = Image.fromarray((raw.images[index] / 16).astype(np.float32), mode="F").resize((32, 32), Image.BILINEAR)
    np.testing.assert_allclose(image[0].numpy(), np.asarray(pil), atol=1e-5)


@pytest.mark.parametrize("image_size", [5, 12, 32])
def test_digit_resize_matches_pil_bilinear(image_size):
    images, _ = load_digit_images(image_size)
    raw = load_digits().images[:20] / 16
    for image, digit in zip(images, raw):
        pil = Image.fromarray(digit.astype(np.float32), mode="F").resize((image_size, image_size), Image.BILINEAR)
        np.testing.assert_allclose(image[1].numpy(), np.clip(np.asarray(pil), 0, 1), atol=1e-5)


def test_digits_augmentation_only_translates():
    dm = DigitsDataModule(image_size=32)
    dm.setup("fit")
    pad = 2  # image_size // 16
    base = dm.train_dataset.images[0]
    padded = torch.nn.functional.pad(base, (pad, pad, pad, pad))
    shifts = {(dy, dx): padded[:, dy : dy + 32, dx : dx + 32] for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)}
    torch.manual_seed(0)
    seen = set()
    for _ in range(40):
        image, _ = dm.train_dataset[0]
        matches = [shift for shift, view in shifts.items() if torch.equal(view, image)]
        assert matches, "a training digit is not a translate of the digit (a flip or other change)"
        seen.update(matches)
    assert len(seen) > 3


# ------------------------------------------------------------------------------------------------ synthetic


def test_synthetic_items_are_seeded_and_learnable():
    kwargs = dict(num_samples=300, num_classes=5, image_size=16, noise_std=0.2)
    dm, same, other = (SyntheticDataModule(seed=seed, **kwargs) for seed in (0, 0, 1))
    assert torch.equal(dm.images, same.images) and not torch.equal(dm.images, other.images)
    dm.setup()
    assert_valid_item(dm.train_dataset[0], 3, 16, 5)
    assert_valid_item(dm.test_dataset[0], 3, 16, 5)
    # Learnable: a nearest-class-mean rule fitted on the train split classifies the test split.
    train, test = dm.train_dataset, dm.test_dataset
    centroids = torch.stack([train.images[train.labels == c].flatten(1).mean(0) for c in range(5)])
    predicted = torch.cdist(test.images.flatten(1), centroids).argmin(1)
    assert (predicted == test.labels).float().mean() > 0.9


def test_synthetic_channels_and_empty_split():
    dm = SyntheticDataModule(in_chans=1, num_samples=40, num_classes=2, image_size=8)
    dm.setup("test")
    assert_valid_item(dm.test_dataset[0], 1, 8, 2)
    assert dm.in_chans == len(dm.mean) == 1
    with pytest.raises(ValueError, match="leaves a part empty"):
        SyntheticDataModule(num_samples=10, num_classes=10)


# -------------------------------------------------------------------------------------------------- CIFAR-10


def test_cifar10_fake_pickles_load(tmp_path):
    data_dir = write_fake_cifar10(tmp_path / "data", n_train=60, n_test=20)
    dm = CIFAR10DataModule(data_dir=str(data_dir), batch_size=8, num_workers=0, val_fraction=0.2)
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (50, 10, 20)
    for dataset in (dm.train_dataset, dm.val_dataset, dm.test_dataset):
        assert_valid_item(dataset[0], 3, 32, 10)
    for index in range(len(dm.test_dataset)):
        image, label = dm.test_dataset[index]
        assert colour_class(image) == label
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (8, 3, 32, 32)


def test_cifar10_reads_what_torchvision_reads(tmp_path, monkeypatch):
    import torchvision.datasets.cifar
    from torchvision.datasets import CIFAR10

    data_dir = write_fake_cifar10(tmp_path, n_train=10, n_test=10)
    # The fake files cannot match the real files' md5 sums, so torchvision rejects them ...
    with pytest.raises(RuntimeError, match="not found or corrupted"):
        CIFAR10(str(data_dir), train=False)
    # ... and reads them once its md5 check is bypassed: an independent reader of the same format.
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: True)
    reference = CIFAR10(str(data_dir), train=False)
    dm = CIFAR10DataModule(data_dir=str(data_dir))
    dm.setup("test")
    for index in range(10):
        pil, label = reference[index]
        image, our_label = dm.test_dataset[index]
        assert our_label == label
        torch.testing.assert_close(image, torch.from_numpy(np.array(pil)).permute(2, 0, 1).float() / 255)


def test_cifar10_missing_folder_says_where_and_how(tmp_path):
    dm = CIFAR10DataModule(data_dir=str(tmp_path / "nowhere"))
    for step in (dm.prepare_data, lambda: dm.setup("fit"), lambda: dm.setup("test")):
        with pytest.raises(FileNotFoundError) as error:
            step()
        message = str(error.value)
        assert str(tmp_path / "nowhere" / "cifar-10-batches-py") in message
        assert "data_batch_1" in message and "--data.download true" in message


def test_cifar10_download_only_when_missing(tmp_path, monkeypatch):
    import torchvision.datasets

    calls = []

    def fake_download(root, train, download):
        calls.append((root, train, download))
        write_fake_cifar10(root, n_train=10, n_test=10)

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", fake_download)
    CIFAR10DataModule(data_dir=str(tmp_path), download=True).prepare_data()
    assert calls == [(str(tmp_path), True, True)]
    CIFAR10DataModule(data_dir=str(tmp_path), download=True).prepare_data()  # present now: no second download
    assert len(calls) == 1


def test_cifar10_corrupt_batch_is_named(tmp_path):
    data_dir = write_fake_cifar10(tmp_path, n_train=10, n_test=10)
    with open(data_dir / "cifar-10-batches-py" / "test_batch", "wb") as file:
        pickle.dump({"data": np.zeros((4, 100), np.uint8), "labels": [0] * 4}, file)
    with pytest.raises(ValueError, match="test_batch is not a CIFAR-10 batch"):
        CIFAR10DataModule(data_dir=str(data_dir)).setup("test")


# ---------------------------------------------------------------------------------------------- tiny-ImageNet


def test_tinyimagenet_fake_folder_loads(tmp_path):
    data_dir = write_fake_tinyimagenet(tmp_path / "tiny-imagenet-200", n_classes=3, n_train_per_class=10)
    dm = TinyImageNetDataModule(data_dir=str(data_dir), num_classes=3, batch_size=4, num_workers=0, val_fraction=0.2)
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (24, 6, 6)
    for dataset in (dm.train_dataset, dm.val_dataset, dm.test_dataset):
        for index in range(len(dataset)):
            assert_valid_item(dataset[index], 3, 64, 3)
    # Labels follow val_annotations.txt and the sorted wnids (wnids.txt is written in reverse order).
    for index in range(len(dm.test_dataset)):
        image, label = dm.test_dataset[index]
        assert colour_class(image) == label
    gray = [path for path, _ in dm.train_dataset.samples + dm.val_dataset.samples if path.name == "n00000000_0.JPEG"]
    assert len(gray) == 1 and Image.open(gray[0]).mode == "L"
    images, _ = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 64, 64)


def test_tinyimagenet_errors(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        TinyImageNetDataModule(data_dir=str(tmp_path / "nowhere")).prepare_data()
    message = str(error.value)
    assert "wnids.txt" in message and "val_annotations.txt" in message and "train/<wnid>/images" in message
    assert "cannot be downloaded" in message
    data_dir = write_fake_tinyimagenet(tmp_path / "tiny", n_classes=2, n_train_per_class=2, n_val_per_class=1)
    with pytest.raises(ValueError, match="--data.num_classes 2"):
        TinyImageNetDataModule(data_dir=str(data_dir)).setup("test")
    (data_dir / "val" / "images" / "val_0.JPEG").unlink()
    with pytest.raises(FileNotFoundError, match="val_0.JPEG does not exist"):
        TinyImageNetDataModule(data_dir=str(data_dir), num_classes=2).setup("test")


# --------------------------------------------------------------------------------------------------- ImageNet


def test_imagenet_fake_folders_load(tmp_path):
    data_dir = write_fake_imagenet(tmp_path, n_classes=3, n_train_per_class=6, n_val_per_class=3)
    dm = ImageNetDataModule(
        data_dir=str(data_dir), num_classes=3, image_size=32, batch_size=4, num_workers=0, val_fraction=0.34
    )
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (12, 6, 9)
    for dataset in (dm.train_dataset, dm.val_dataset, dm.test_dataset):
        for index in range(len(dataset)):
            assert_valid_item(dataset[index], 3, 32, 3)
    for index in range(len(dm.test_dataset)):
        image, label = dm.test_dataset[index]
        assert is_gray(image) or colour_class(image) == label
    assert is_gray(dm.test_dataset[0][0])  # the grayscale file came out with 3 channels
    assert torch.equal(dm.test_dataset[4][0], dm.test_dataset[4][0])  # evaluation is deterministic
    images, _ = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 32, 32)


def test_imagenet_evaluates_without_train_folder(tmp_path):
    data_dir = write_fake_imagenet(tmp_path, n_classes=2, n_val_per_class=2, with_train=False)
    dm = ImageNetDataModule(data_dir=str(data_dir), num_classes=2, image_size=16)
    dm.prepare_data()
    dm.setup("test")
    assert len(dm.test_dataset) == 4
    with pytest.raises(FileNotFoundError, match="train does not exist"):
        dm.setup("fit")


def test_imagenet_errors(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        ImageNetDataModule(data_dir=str(tmp_path / "nowhere")).prepare_data()
    message = str(error.value)
    assert str(tmp_path / "nowhere" / "val") in message and "<data_dir>/val/<wnid>/*.JPEG" in message
    assert "cannot be downloaded" in message
    data_dir = write_fake_imagenet(tmp_path / "a", n_classes=2, n_train_per_class=1, n_val_per_class=1)
    with pytest.raises(ValueError, match="--data.num_classes 2"):
        ImageNetDataModule(data_dir=str(data_dir)).setup("test")
    (data_dir / "train" / "n00000001").rename(data_dir / "train" / "n00000009")
    with pytest.raises(ValueError, match="different class folders"):
        ImageNetDataModule(data_dir=str(data_dir), num_classes=2).setup("fit")


# ------------------------------------------------------------------------------------ devices and a real Trainer


@pytest.mark.parametrize(("world_size", "per_device"), [(1, 32), (2, 16), (4, 8)])
def test_batch_size_is_global(world_size, per_device):
    dm = SyntheticDataModule(batch_size=32, num_samples=200)
    dm.trainer = SimpleNamespace(world_size=world_size)
    dm.setup("fit")
    assert dm.batch_size_per_device == per_device
    assert dm.train_dataloader().batch_size == per_device
    assert len(next(iter(dm.val_dataloader()))[0]) == min(per_device, len(dm.val_dataset))


def test_indivisible_batch_size_fails_before_reading_data(tmp_path):
    dm = CIFAR10DataModule(data_dir=str(tmp_path / "nowhere"), batch_size=64)
    dm.trainer = SimpleNamespace(world_size=3)
    with pytest.raises(ValueError, match="divisible by the number of devices \\(3\\).*multiple of 3"):
        dm.setup("fit")


def test_dataloader_before_setup_is_a_clear_error():
    with pytest.raises(RuntimeError, match="setup\\(\\) must run"):
        DigitsDataModule().test_dataloader()


class TinyClassifier(pl.LightningModule):
    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.layer = torch.nn.Linear(in_features, num_classes)

    def training_step(self, batch, batch_idx):
        images, labels = batch
        return torch.nn.functional.cross_entropy(self.layer(images.flatten(1)), labels)

    def validation_step(self, batch, batch_idx):
        self.training_step(batch, batch_idx)

    def test_step(self, batch, batch_idx):
        self.training_step(batch, batch_idx)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_trainer_fits_and_tests_on_digits(tmp_path):
    dm = DigitsDataModule(batch_size=16, image_size=8)
    model = TinyClassifier(3 * 8 * 8, dm.num_classes)
    trainer = pl.Trainer(
        fast_dev_run=2, accelerator="cpu", default_root_dir=tmp_path, logger=False, enable_progress_bar=False
    )
    trainer.fit(model, datamodule=dm)
    trainer.test(model, datamodule=dm, verbose=False)
    assert dm.batch_size_per_device == 16 and dm.test_dataset is not None
