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


def _stratified_split(targets: np.ndarray, fraction: float, seed: int
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Indices (kept, held out): ``fraction`` of each class held out, seeded, sorted."""
    rng = np.random.default_rng(seed)
    keep, hold = [], []
    for c in np.unique(targets):
        idx = np.nonzero(targets == c)[0]
        rng.shuffle(idx)
        n_hold = int(round(len(idx) * fraction))
        hold.append(idx[:n_hold])
        keep.append(idx[n_hold:])
    return np.sort(np.concatenate(keep)), np.sort(np.concatenate(hold))


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

    Returns:
        ``(train, val)``, each with ``indices`` into ``dataset``.
    """
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    train_idx, val_idx = _stratified_split(np.asarray(dataset.targets), val_fraction, seed)
    counts = np.bincount(np.asarray(dataset.targets)[train_idx], minlength=len(dataset.classes))
    if (counts == 0).any() or len(val_idx) == 0:
        empty = [dataset.classes[i] for i in np.nonzero(counts == 0)[0]]
        raise DataError(f"{dataset.name}: too few samples to split off {val_fraction:.0%} for "
                        f"validation (classes left without training samples: {empty}); use "
                        "more data or pass a validation set")
    tag = f"val={val_fraction},seed={seed}"
    return (SubsetDataset(dataset, train_idx, f"train,{tag}"),
            SubsetDataset(dataset, val_idx, f"val,{tag}"))
