"""Data sets at the edges (issue 20): many small classes split, manifests read as their
authors wrote them (encoding, label text, duplicate rows), images as cameras store them
(EXIF orientation), class names that cannot spoof the output."""

from __future__ import annotations

import numpy as np
import pytest

from inca.data import ImageDataset, split_train_val
from inca.errors import DataError


class _Labels(ImageDataset):
    """Labels only (splits never open an image)."""

    def __init__(self, counts: list[int]) -> None:
        super().__init__()
        self.name = "tiny"
        self.classes = [f"c{i:04d}" for i in range(len(counts))]
        self.targets = np.repeat(np.arange(len(counts)), counts).astype(np.int64)
        self._validate()

    def _identity(self) -> str:
        return "labels"


# -- M6: a validation share allocated over the whole data set --------------------------
@pytest.mark.parametrize(("counts", "fraction", "num_val"), [
    ([3] * 300, 0.15, 135),  # 3 x 0.15 rounds to 0 in every class
    ([2] * 50 + [1] * 20, 0.1, 12),  # singletons stay in training
    ([40] * 5 + [3] * 100, 0.001, 1),  # a tiny share is still one image
])
def test_many_small_classes_split_with_every_class_in_training(counts, fraction, num_val):
    ds = _Labels(counts)
    train, val = split_train_val(ds, fraction, seed=3)
    assert len(val) == num_val and len(train) + len(val) == len(ds)
    assert not set(train.indices) & set(val.indices)
    assert set(train.targets.tolist()) == set(range(len(counts)))  # every class trains
    again = split_train_val(ds, fraction, seed=3)[1]
    assert np.array_equal(val.indices, again.indices)


def test_a_split_share_is_stratified_as_far_as_counts_allow():
    ds = _Labels([100, 50, 10, 3, 3, 1])
    val = split_train_val(ds, 0.2, seed=0)[1]
    held = np.bincount(val.targets, minlength=6)
    assert held[:3].tolist() == [20, 10, 2] and held[5] == 0 and held.sum() == 33


@pytest.mark.parametrize(("counts", "fraction", "needed"), [
    ([1] * 2000, 0.15, 2),  # one image per class: none can be held out
    ([2] * 30, 0.6, 3),  # 36 to hold out, but only 30 can go while each class trains
])
def test_an_impossible_split_says_how_many_images_per_class_and_names_val_data(
        counts, fraction, needed):
    with pytest.raises(DataError) as info:
        split_train_val(_Labels(counts), fraction)
    text = str(info.value)
    assert f"at least {needed} images per class" in text and "--val-data" in text
    assert "[]" not in text
