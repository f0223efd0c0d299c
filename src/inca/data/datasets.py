"""Loading a data set by name, path or object: :func:`load_dataset` and :func:`has_split`.

Every source yields ``(PIL.Image RGB, int label)`` and carries ``classes``, ``targets`` and
a ``fingerprint()`` that caches record, so a cache is never reused for other data. The
sources live one job per module: :mod:`~inca.data.folders` (image folders),
:mod:`~inca.data.builtin` (arrays, Fashion-MNIST, digits), :mod:`~inca.data.hf` (Hugging
Face), :mod:`~inca.data.manifests` (CSV / JSON lines), :mod:`~inca.data.adapters`
(torchvision sets, lists of pairs), :mod:`~inca.data.splits` (subsets and splits).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from inca._hints import did_you_mean
from inca.data.adapters import as_image_dataset
from inca.data.base import ImageDataset
from inca.data.builtin import (  # noqa: F401 - names older code imports from here
    BUILTIN_SPLITS,
    BUILTINS,
    FASHION_MNIST_CLASSES,
    ArrayDataset,
    fashion_mnist_dir,
    list_datasets,
)
from inca.data.folders import ImageFolderDataset, folder_splits, load_folder  # noqa: F401
from inca.data.hf import has_hf_split, is_hf, is_saved_folder, load_hf, open_hf
from inca.data.manifests import ManifestDataset, is_manifest
from inca.data.splits import (  # noqa: F401
    ClassAlignedDataset,
    SubsetDataset,
    align_classes,
    limit_dataset,
    resolve_split,
    split_train_val,
)
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
