"""Loading a data set by name, path or object: :func:`load_dataset` and :func:`has_split`.

Every source yields ``(PIL.Image RGB, int label)`` and carries ``classes``, ``targets`` and
a ``fingerprint()`` that caches record, so a cache is never reused for other data. The
sources live one job per module: :mod:`~inca.data.folders` (image folders),
:mod:`~inca.data.builtin` (arrays, Fashion-MNIST, digits), :mod:`~inca.data.hf` (Hugging
Face), :mod:`~inca.data.manifests` (CSV / JSON lines), :mod:`~inca.data.wrappers`
(torchvision sets, lists of pairs), :mod:`~inca.data.splits` (subsets and splits);
:func:`as_image_dataset`, here, is the one door for objects.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import IterableDataset

from inca._hints import did_you_mean
from inca.data.base import ImageDataset, _hash
from inca.data.builtin import (  # noqa: F401 - names older code imports from here
    BUILTIN_SPLITS,
    BUILTINS,
    FASHION_MNIST_CLASSES,
    ArrayDataset,
    fashion_mnist_dir,
    list_datasets,
)
from inca.data.folders import ImageFolderDataset, folder_splits, load_folder  # noqa: F401
from inca.data.hf import from_hf, has_hf_split, is_hf, is_saved_folder, load_hf, open_hf
from inca.data.manifests import ManifestDataset, is_manifest
from inca.data.splits import (  # noqa: F401
    ClassAlignedDataset,
    SubsetDataset,
    align_classes,
    limit_dataset,
    resolve_split,
    split_train_val,
)
from inca.data.wrappers import WrappedDataset, _hf_name, _name
from inca.errors import DataError


def load_dataset(spec: Any, split: str = "train", *, image_column: str | None = None,
                 label_column: str | None = None, skip_unreadable: bool = False,
                 limit: int | None = None, seed: int = 0) -> ImageDataset:
    """Load a data set by name, path or object.

    Args:
        spec: ``"fashion-mnist"``, ``"digits"``; an image folder (``class/xxx.jpg``; a
            folder with ``train/``, ``val/`` (or ``validation/``...) and ``test/``
            subfolders picks ``split``); a CSV / TSV / JSON-lines manifest of ``path,label``
            rows; ``"hf:<folder>"`` (saved with ``save_to_disk``, or data files ``datasets``
            reads) or ``"hf:<hub id>"`` (online); a folder saved with ``save_to_disk`` also
            without ``hf:``. Or an object :func:`~inca.data.as_image_dataset` takes: a
            Hugging Face ``Dataset``/``DatasetDict``, a torchvision data set, a list of
            ``(image, label)`` pairs.
        split: ``"train"``, ``"val"`` or ``"test"`` for sources that hold splits
            (``"val"`` also finds ``validation``, ``valid`` and ``dev``). A source of one
            split (a plain folder, a manifest, one ``Dataset``) is that data whatever the
            split: ask :func:`has_split` whether a source holds a separate one.
        image_column: the images' column (Hugging Face, manifests); default: found.
        label_column: the labels' column; default: found.
        skip_unreadable: leave out unreadable images (listed in ``skipped``) instead of
            failing on the first (folders and manifests).
        limit: at most this many samples, every class represented; seeded.
        seed: seed of the ``limit`` subset.

    Raises:
        DataError: unknown source or split, unreadable data, multi-label or regression
            labels (single-label classification only).

    Example:
        >>> from inca.data import load_dataset
        >>> ds = load_dataset("digits", limit=100)
        >>> len(ds), ds.classes[:3]
        (100, ['0', '1', '2'])
    """
    columns = {"image_column": image_column, "label_column": label_column}
    if not isinstance(spec, str | Path):
        ds = as_image_dataset(spec, split=split, **columns)
    elif str(spec) in BUILTINS:
        ds = BUILTINS[str(spec)](split)
    elif str(spec).startswith("hf:"):
        ds = load_hf(str(spec)[3:], split, **columns)
    else:
        path = Path(spec)
        if is_manifest(path):
            ds = ManifestDataset(path, skip_unreadable=skip_unreadable, **columns)
        elif path.is_dir() and is_saved_folder(path):
            ds = load_hf(str(path), split, **columns)
        elif path.is_dir():
            ds = load_folder(path, split, skip_unreadable)
        else:
            raise DataError(f"unknown data set {str(spec)!r}{did_you_mean(str(spec), BUILTINS)}: "
                            "not a built-in "
                            f"({', '.join(BUILTINS)}), not an image folder or a manifest "
                            "(.csv, .tsv, .jsonl), not hf:<folder or hub id>")
    if limit is not None:
        ds = limit_dataset(ds, limit, seed)
    return ds


def has_split(spec: Any, split: str) -> bool:
    """Whether ``spec`` holds a ``split`` of its own (``"val"`` also finds ``validation``,
    ``valid`` and ``dev``): a folder with that subfolder, a ``DatasetDict`` with that split,
    a built-in's ``test``. A source of one split (a plain folder, a manifest) holds only
    ``"train"``. Callers use it to read ``validation`` and ``test`` splits when present."""
    if not isinstance(spec, str | Path):
        if is_hf(spec):
            return has_hf_split(spec, split)
        return split == "train"
    text = str(spec)
    if text in BUILTINS:
        return split in BUILTIN_SPLITS[text]
    if text.startswith("hf:"):
        return has_hf_split(open_hf(text[3:]), split)
    path = Path(text)
    if path.is_dir() and is_saved_folder(path):
        return has_hf_split(open_hf(text), split)
    if path.is_dir():
        sub = folder_splits(path)
        return resolve_split(sub, split) is not None if sub else split == "train"
    return split == "train"


def as_image_dataset(data: Any, *, split: str = "train", image_column: str | None = None,
                     label_column: str | None = None, classes: Sequence[str] | None = None,
                     fingerprint: str | None = None, name: str | None = None
                     ) -> ImageDataset:
    """Any image classification data as an :class:`~inca.data.ImageDataset`, which every
    part of inca reads (splits, limits, caches, ``inca.fit``).

    Args:
        data: an inca data set (returned as it is); a name or path (see
            :func:`~inca.data.load_dataset`); a Hugging Face ``Dataset`` or
            ``DatasetDict``; a map-style data set yielding ``(image, label)`` (torchvision's
            ``ImageFolder``, ``CIFAR10``, ``FakeData`` ...); a list of ``(image, label)``.
        split: the split to take from a ``DatasetDict`` or a path (``"val"`` also finds
            ``validation``, ``valid`` and ``dev``).
        image_column: the images' column (Hugging Face, manifests, rows); default: found.
        label_column: the labels' column; default: found.
        classes: class names: integer labels index them, and the result's labels are
            matched to them by name (as validation data is matched to training classes).
        fingerprint: your own name for the data's content, used by caches instead of
            hashing images (for sets inca cannot fingerprint cheaply; see the module).
        name: how messages and reports name the data.

    Raises:
        DataError: not single-label classification data (a list of labels per sample,
            fractional labels), no image or label column found, a streaming data set.

    Example:
        >>> from PIL import Image
        >>> from inca.data import as_image_dataset
        >>> pairs = [(Image.new("RGB", (8, 8), c), c) for c in ("red", "blue", "red")]
        >>> ds = as_image_dataset(pairs)
        >>> ds.classes, ds.targets.tolist()
        (['blue', 'red'], [1, 0, 1])
    """
    if isinstance(data, ImageDataset):
        return data if classes is None else align_classes(data, classes)
    columns = {"image_column": image_column, "label_column": label_column}
    if isinstance(data, str | os.PathLike):
        ds: ImageDataset = load_dataset(os.fspath(data), split, **columns)
    elif is_hf(data):
        ds = from_hf(data, split, name or _hf_name(data), classes=classes and list(classes),
                     **columns)
    elif isinstance(data, IterableDataset):
        raise DataError(f"{type(data).__name__} is an iterable (streaming) data set; inca "
                        "needs a map-style one (len(data) and data[i])")
    else:
        ds = WrappedDataset(data, name or _name(data), classes=classes, **columns)
    if fingerprint is not None:
        ds._fingerprint = _hash("given", fingerprint, ds.classes, ds.targets.tobytes())
    return ds if classes is None else align_classes(ds, classes)
