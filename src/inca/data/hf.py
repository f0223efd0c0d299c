"""Hugging Face ``datasets``: a ``Dataset`` or ``DatasetDict`` in memory, a folder written
by ``save_to_disk``, a folder of data files, or a hub id (online), all read by ``datasets``
itself; the image and label columns named or found by their features.

Columns are found when that is unambiguous: the one ``Image`` feature (else a column named
``image`` or ``img``) and the one ``ClassLabel`` feature (else a column named ``label``,
``labels``, ...). Splits go by their usual names: ``val`` finds ``validation``, ``valid``
or ``dev``. The fingerprint is the set's own ``_fingerprint`` (``datasets`` derives it from
the content or from the files and transforms that made it) with the columns read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

from inca._hints import require
from inca.data.base import ImageDataset, _hash, image_from
from inca.data.labels import encode_labels, refuse
from inca.data.splits import resolve_split
from inca.errors import DataError

IMAGE_NAMES = ("image", "img")
LABEL_NAMES = ("label", "labels", "fine_label", "target", "class", "category")
IMAGE_HINT = "pass --image-column (image_column=)"
LABEL_HINT = "pass --label-column (label_column=)"


def _datasets() -> Any:
    return require("datasets", purpose="Hugging Face data sets")


def is_hf(obj: Any) -> bool:
    """Whether ``obj`` is a ``datasets`` object (checked without importing ``datasets``)."""
    return type(obj).__module__.split(".")[0] == "datasets"


def is_saved_folder(path: Path) -> bool:
    """Whether ``path`` was written by ``Dataset(Dict).save_to_disk``."""
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def open_hf(spec: str) -> Any:
    """A ``Dataset`` or ``DatasetDict``: ``load_from_disk`` for a saved folder,
    ``datasets.load_dataset`` for another folder (parquet, csv, image files ...) or a hub
    id (which needs the network, or the hub's local cache with ``HF_DATASETS_OFFLINE=1``)."""
    datasets = _datasets()
    path = Path(spec)
    if path.exists() and is_saved_folder(path):
        try:
            return datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as e:
            raise DataError(f"cannot load a Hugging Face data set from {path}: {e}") from e
    try:
        return datasets.load_dataset(spec)
    except Exception as e:  # noqa: BLE001 - not found, offline, bad files: one message
        where = "folder" if path.exists() else "hub id"
        raise DataError(
            f"cannot load the Hugging Face data set {spec!r} ({where}): {e}. A hub id needs "
            "the network once: load it online and save_to_disk() it, then pass hf:<folder>"
        ) from e


def split_names(obj: Any) -> list[str] | None:
    """A ``DatasetDict``'s splits; ``None`` for one ``Dataset``."""
    return list(obj) if hasattr(obj, "keys") and not hasattr(obj, "features") else None


def has_hf_split(obj: Any, split: str) -> bool:
    """Whether ``obj`` holds ``split`` (a lone ``Dataset`` is a training split only)."""
    names = split_names(obj)
    return split == "train" if names is None else resolve_split(names, split) is not None


def pick_split(obj: Any, split: str, source: str) -> tuple[Any, str]:
    """``(the Dataset of split, its name)``; a lone ``Dataset`` is returned as it is."""
    names = split_names(obj)
    if names is None:
        return obj, source
    name = resolve_split(names, split)
    if name is None:
        raise DataError(f"{source} has splits {names}, not {split!r}")
    return obj[name], f"{source}/{name}"


def _is_list(feature: Any) -> bool:
    return isinstance(feature, list | tuple) or \
        type(feature).__name__ in ("Sequence", "List", "LargeList")


def _inner(feature: Any) -> Any:
    return feature[0] if isinstance(feature, list | tuple) else getattr(feature, "feature", None)


def _column(features: Any, given: str | None, kind: type, names: tuple[str, ...],
            source: str, what: str, hint: str, exclude: str | None = None) -> str:
    columns = list(features)
    if given is not None:
        if given not in features:
            raise DataError(f"{source}: no column {given!r}; columns: {columns}")
        return given
    found = [c for c, f in features.items() if isinstance(f, kind) and c != exclude]
    if len(found) > 1:
        raise DataError(f"{source}: several {kind.__name__} columns {found}; {hint} to "
                        f"choose the {what}")
    if found:
        return found[0]
    named = [n for n in names if n in features and n != exclude]
    if named:
        return named[0]
    if what == "labels":
        multi = [c for c, f in features.items() if _is_list(f) and isinstance(_inner(f), kind)]
        if multi:
            raise refuse(source, multi[0], "a list of labels per sample (multi-label data)")
    raise DataError(f"{source}: no {what} column found (looked for a {kind.__name__} feature "
                    f"or a column named {', '.join(names)}); columns: {columns}; {hint}")


def _check_label_feature(feature: Any, column: str, source: str) -> None:
    datasets = _datasets()
    if _is_list(feature):
        raise refuse(source, column, f"a list of labels per sample ({feature}): multi-label "
                                     "data")
    if isinstance(feature, dict):
        raise refuse(source, column, f"structured values ({sorted(feature)})")
    if isinstance(feature, datasets.Image):
        raise refuse(source, column, "images")
    if isinstance(feature, datasets.Value) and feature.dtype.startswith(("float", "double")):
        raise refuse(source, column, f"floating-point numbers ({feature.dtype}), which look "
                                     "like regression targets")


class HFDataset(ImageDataset):
    """A Hugging Face ``datasets.Dataset`` (one split) as an inca data set.

    Args:
        ds: the ``Dataset``.
        name: how messages and reports name it.
        image_column: the images' column (default: found, see the module's notes).
        label_column: the labels' column (default: found).
        classes: class names that integer labels index, when the column has none.
    """

    def __init__(self, ds: Any, name: str, *, image_column: str | None = None,
                 label_column: str | None = None, classes: list[str] | None = None) -> None:
        super().__init__()
        datasets = _datasets()
        self.name = name
        if isinstance(ds, datasets.IterableDataset):
            raise DataError(f"{name}: a streaming (iterable) data set has no length or "
                            "random access; load it without streaming=True")
        features = ds.features
        self.image_column = _column(features, image_column, datasets.Image, IMAGE_NAMES, name,
                                    "images", IMAGE_HINT)
        self.label_column = _column(features, label_column, datasets.ClassLabel, LABEL_NAMES,
                                    name, "labels", LABEL_HINT, exclude=self.image_column)
        feature = features[self.label_column]
        _check_label_feature(feature, self.label_column, name)
        if isinstance(feature, datasets.ClassLabel):
            classes = list(feature.names)
        table = ds.with_format("arrow", columns=[self.label_column])[:]  # no image decoded
        self.targets, self.classes = encode_labels(
            table.column(self.label_column).to_pylist(), source=name,
            column=self.label_column, classes=classes)
        self.ds = ds
        # Only the image column, as Python objects, whatever format the caller had set.
        self._images = ds.select_columns([self.image_column]).with_format(None)
        self._validate()

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        value = self._images[int(i)][self.image_column]
        return image_from(value, f"{self.name}[{i}]"), int(self.targets[i])

    def _identity(self) -> str:
        return _hash(getattr(self.ds, "_fingerprint", ""), len(self.ds), self.image_column,
                     self.label_column)


def from_hf(obj: Any, split: str, source: str, **columns: Any) -> HFDataset:
    """The ``split`` of a ``Dataset`` / ``DatasetDict`` as an :class:`HFDataset`."""
    ds, name = pick_split(obj, split, source)
    return HFDataset(ds, name, **columns)


def load_hf(spec: str, split: str = "train", **columns: Any) -> HFDataset:
    """``hf:<spec>``: a saved folder, a data-file folder or a hub id (see :func:`open_hf`)."""
    return from_hf(open_hf(spec), split, f"hf:{spec}", **columns)
