"""Subsets and splits of a data set: stratified train/validation, class-balanced limits,
labels matched to another class list, and the names a validation split goes by."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from inca.data.base import ImageDataset, _hash
from inca.errors import DataError

#: Names a split goes by, first the canonical one (Hugging Face sets and folders use all).
SPLIT_NAMES = {
    "train": ("train",),
    "val": ("val", "validation", "valid", "dev"),
    "test": ("test",),
}


def split_aliases(split: str) -> tuple[str, ...]:
    """Names that ``split`` may go by (``"val"``: val, validation, valid, dev)."""
    for names in SPLIT_NAMES.values():
        if split in names:
            return names
    return (split,)


def resolve_split(available: Sequence[str], split: str) -> str | None:
    """The name in ``available`` that stands for ``split``, or ``None``."""
    return next((n for n in split_aliases(split) if n in available), None)


def _stratified_split(targets: np.ndarray, fraction: float, seed: int, name: str
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Indices (kept, held out), seeded and sorted: ``fraction`` of the whole data set held
    out, shared among the classes in proportion to their size (largest remainders first,
    ties drawn at random), every class keeping at least one sample for training.

    So 300 classes of 3 images give 135 validation images at 15%, one from 135 classes,
    where rounding each class's share (0.45) would hold out none.
    """
    rng = np.random.default_rng(seed)
    classes = np.unique(targets)
    members = []
    for c in classes:
        idx = np.nonzero(targets == c)[0]
        rng.shuffle(idx)
        members.append(idx)
    counts = np.array([len(m) for m in members])
    spare = counts - 1  # a class with one sample keeps it for training
    n_hold = max(1, int(round(len(targets) * fraction)))
    if n_hold > spare.sum():
        raise _too_few(name, fraction, counts, n_hold, int(spare.sum()))
    share = n_hold * counts / len(targets)
    take = np.minimum(np.floor(share).astype(np.int64), spare)
    order = np.lexsort((rng.random(len(classes)), take - share))  # largest remainder first
    left = n_hold - int(take.sum())
    while left > 0:  # ends: n_hold <= spare.sum()
        for k in order:
            if left and take[k] < spare[k]:
                take[k] += 1
                left -= 1
    keep = [m[t:] for m, t in zip(members, take, strict=True)]
    hold = [m[:t] for m, t in zip(members, take, strict=True)]
    return np.sort(np.concatenate(keep)), np.sort(np.concatenate(hold))


def _too_few(name: str, fraction: float, counts: np.ndarray, n_hold: int, spare: int
             ) -> DataError:
    """The error of a split that cannot hold out ``n_hold`` samples and leave every class
    one: how many images per class it needs, and how to give a validation set instead."""
    # m images in each class leave room for round(m * fraction) when m - 1 >= m * fraction
    need = max(2, int(np.ceil(1 / (1 - fraction) - 1e-9)))
    single = int((counts == 1).sum())
    sizes = (f"{counts.min()} images each" if counts.min() == counts.max()
             else f"{counts.min()} to {counts.max()} images")
    why = (f"{single} of its {len(counts)} classes have a single image" if single
           else f"{len(counts)} classes of {sizes}")
    lower = "lower --val-fraction (val_fraction=), " if spare else ""
    return DataError(
        f"{name}: too few samples to split off {fraction * 100:g}% for validation: {n_hold} "
        f"validation image(s) are needed, but only {spare} can be held out while every class "
        f"keeps a training image ({why}); a split of this share needs at least {need} images "
        f"per class. Add images, {lower}or pass a validation set with "
        "--val-data (the val argument of inca.fit)")


class SubsetDataset(ImageDataset):
    """Some samples of a parent data set; ``indices`` index the parent."""

    def __init__(self, parent: ImageDataset, indices: Sequence[int], tag: str) -> None:
        super().__init__()
        self.parent = parent
        self.indices = np.asarray(indices, dtype=np.int64)
        self.classes = list(parent.classes)
        self.targets = np.asarray(parent.targets)[self.indices]
        self.name = f"{parent.name}[{tag}]"
        self.skipped = list(parent.skipped)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return self.parent[int(self.indices[i])]

    def _identity(self) -> str:
        return _hash(self.parent.fingerprint(), self.indices.tobytes())


class ClassAlignedDataset(ImageDataset):
    """A data set whose labels index another class list, matched by name (a test folder
    may lack some of the training classes, or list them in another order)."""

    def __init__(self, parent: ImageDataset, classes: Sequence[str]) -> None:
        super().__init__()
        classes = list(classes)
        unknown = [c for c in parent.classes if c not in classes]
        if unknown:
            raise DataError(f"{parent.name} has classes the training data does not: "
                            f"{unknown}; training knows {classes}. Remove those samples or "
                            "train with them")
        self.parent = parent
        self.map = np.array([classes.index(c) for c in parent.classes], dtype=np.int64)
        self.classes = classes
        self.targets = self.map[np.asarray(parent.targets, dtype=np.int64)]
        self.name = parent.name
        self.skipped = list(getattr(parent, "skipped", []))

    def __len__(self) -> int:
        return len(self.parent)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        image, label = self.parent[i]
        return image, int(self.map[label])

    def _identity(self) -> str:
        return _hash(self.parent.fingerprint(), self.map.tobytes())


def align_classes(dataset: ImageDataset, classes: Sequence[str]) -> ImageDataset:
    """``dataset`` with labels indexing ``classes`` (by name); itself when they already do.

    Raises:
        DataError: ``dataset`` has a class that ``classes`` lacks.
    """
    if list(dataset.classes) == list(classes):
        return dataset
    return ClassAlignedDataset(dataset, classes)


def limit_dataset(dataset: ImageDataset, limit: int, seed: int = 0) -> ImageDataset:
    """At most ``limit`` samples, every class represented (round robin over classes after a
    seeded shuffle), in the parent's order."""
    if limit <= 0:
        raise DataError(f"limit must be positive, got {limit}")
    if limit >= len(dataset):
        return dataset
    rng = np.random.default_rng(seed)
    per_class = []
    for c in range(len(dataset.classes)):
        idx = np.nonzero(dataset.targets == c)[0]
        rng.shuffle(idx)
        per_class.append(list(idx))
    chosen: list[int] = []
    depth = 0
    while len(chosen) < limit:
        for idx in per_class:
            if depth < len(idx) and len(chosen) < limit:
                chosen.append(idx[depth])
        depth += 1
    return SubsetDataset(dataset, sorted(chosen), f"limit={limit},seed={seed}")


def split_train_val(dataset: ImageDataset, val_fraction: float = 0.1, seed: int = 0
                    ) -> tuple[SubsetDataset, SubsetDataset]:
    """A deterministic, seeded, stratified train/validation split.

    ``round(val_fraction * len(dataset))`` samples (at least one) are held out, shared among
    the classes in proportion to their size; every class keeps at least one training
    sample, and a class of one sample stays in training.

    Returns:
        ``(train, val)``, each with ``indices`` into ``dataset``.

    Raises:
        DataError: ``val_fraction`` outside (0, 1), or too few samples to hold out that
            share (the message says how many images per class it needs).
    """
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    train_idx, val_idx = _stratified_split(np.asarray(dataset.targets), val_fraction, seed,
                                         dataset.name)
    tag = f"val={val_fraction},seed={seed}"
    return (SubsetDataset(dataset, train_idx, f"train,{tag}"),
            SubsetDataset(dataset, val_idx, f"val,{tag}"))
