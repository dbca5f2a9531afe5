"""PhotoPatchesDataModule: the offline testbed cut from the photographs bundled with scikit-image and scikit-learn."""

import sys

import pytest
import torch

from mglightning.data.base import channel_stats
from mglightning.data.photo_patches import PHOTOGRAPHS, PhotoPatchesDataModule, load_photo_patches


@pytest.fixture(scope="module")
def datamodule():
    dm = PhotoPatchesDataModule(batch_size=32)
    dm.setup()
    return dm


def test_patches_are_rgb_in_unit_range_with_ten_classes():
    train_x, train_y, test_x, test_y = load_photo_patches()
    assert train_x.shape[1:] == test_x.shape[1:] == (3, 32, 32)
    assert train_x.dtype == torch.float32 and 0 <= train_x.min() and train_x.max() <= 1
    assert sorted(train_y.unique().tolist()) == sorted(test_y.unique().tolist()) == list(range(len(PHOTOGRAPHS)))


def test_test_region_is_the_right_quarter_and_shares_no_pixel_with_training():
    # With patches as wide as the stride, patches are the image's pixel blocks: for the 512x512 photographs
    # (astronaut, immunohistochemistry) resized to 64x64, 8 x 8 blocks, the test region is the right-most
    # quarter of the block columns and the training columns end one block before it.
    _, train_y, _, test_y = load_photo_patches(patch_size=8, stride=8, short_side=64)
    for label in (PHOTOGRAPHS.index("astronaut"), PHOTOGRAPHS.index("immunohistochemistry")):
        assert int((test_y == label).sum()) == 8 * 2  # columns 6 and 7
        assert int((train_y == label).sum()) == 8 * 5  # columns 0 to 4; column 5 is the gap


def test_splits_are_disjoint_and_statistics_come_from_training(datamodule):
    train, val, test = (set(part.tolist()) for part in
                        (datamodule.train_indices, datamodule.val_indices, datamodule.test_indices))
    assert not (train & val) and not (train & test) and not (val & test)
    assert len(test) == 1054 and len(train) + len(val) == 2142
    mean, std = channel_stats(datamodule.images[torch.from_numpy(datamodule.train_indices)])
    assert datamodule.mean == pytest.approx(mean) and datamodule.std == pytest.approx(std)
    assert datamodule.num_classes == 10 and datamodule.in_chans == 3 and datamodule.image_size == 32


def test_first_test_samples_mix_the_photographs(datamodule):
    first = [datamodule.test_dataset[i][1] for i in range(16)]
    assert len(set(first)) >= 5
    again = PhotoPatchesDataModule(batch_size=32, seed=3)  # the validation seed does not change the test order
    again.setup("test")
    assert [again.test_dataset[i][1] for i in range(16)] == first


def test_training_batches_are_shifted_copies(datamodule):
    torch.manual_seed(0)
    images, labels = next(iter(datamodule.train_dataloader()))
    assert images.shape == (32, 3, 32, 32) and labels.shape == (32,)
    assert 0 <= images.min() and images.max() <= 1


def test_missing_scikit_image_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "skimage", None)
    with pytest.raises(ModuleNotFoundError, match=r"mglightning\[patches\]"):
        load_photo_patches()


def test_bad_test_share_is_refused():
    with pytest.raises(ValueError, match="test_share"):
        load_photo_patches(test_share=1.0)
