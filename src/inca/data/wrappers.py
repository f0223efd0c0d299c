"""Foreign data sets as inca data sets: :class:`WrappedDataset` wraps what
:func:`inca.data.as_image_dataset` (the one door) does not load itself.

Accepted there: inca's own data sets; names and paths (through :func:`inca.data.load_dataset`);
Hugging Face ``Dataset`` / ``DatasetDict``; any map-style data set yielding
``(image, label)`` pairs (torchvision's ``ImageFolder``, ``CIFAR10``, ``FakeData``, a
``torch.utils.data.Subset``, your own) or rows ``{"image": ..., "label": ...}``; a plain list
of ``(image, label)`` pairs. Images may be PIL images, paths, bytes, arrays ``(H, W, C)``
or tensors ``(C, H, W)``; labels class names or indices into ``classes``.

The fingerprint, which an activation cache records so that it is reused only for the same
data, comes from what the source already knows where that is cheap:

- Hugging Face sets: their ``_fingerprint`` (see :mod:`inca.data.hf`);
- torchvision folders (``samples``: ``ImageFolder``, ``DatasetFolder``): every file's path,
  size, modification and change time, as for inca's own folders;
- sets holding their pixels in ``data`` (``MNIST``, ``CIFAR10``...): a hash of those bytes;
- a ``Subset``: its parent's fingerprint and the indices;
- anything else, lists included: a hash of every image's pixels, computed on the first
  call (one decoding pass; pass ``fingerprint=`` to name the data yourself instead).

The class name and ``transform`` of the source are part of it.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Subset

from inca.data.base import ImageDataset, _hash, image_from
from inca.data.folders import file_identity
from inca.data.hf import IMAGE_NAMES, LABEL_NAMES
from inca.data.labels import encode_labels
from inca.errors import DataError


def _classes_of(data: Any) -> list[str] | None:
    if isinstance(data, Subset):
        return _classes_of(data.dataset)
    classes = getattr(data, "classes", None)
    if isinstance(classes, Sequence) and not isinstance(classes, str) and len(classes):
        return [str(c) for c in classes]
    return None


def _stored_labels(data: Any) -> list[Any] | None:
    """Labels a data set holds without decoding images (``targets``, ``labels``...)."""
    if isinstance(data, Subset):
        parent = _stored_labels(data.dataset)
        return None if parent is None else [parent[int(i)] for i in data.indices]
    if getattr(data, "target_transform", None) is not None:
        return None  # the stored labels are not what the set yields
    for attr in ("targets", "labels", "_labels"):
        v = getattr(data, attr, None)
        if v is not None and hasattr(v, "__len__") and len(v) == len(data):
            return v.tolist() if hasattr(v, "tolist") else list(v)
    return None


def _source_identity(data: Any) -> str | None:
    """A cheap identity of the source's content, or ``None`` (then pixels are hashed)."""
    if isinstance(data, ImageDataset):
        return data.fingerprint()
    if isinstance(data, Subset):
        parent = _source_identity(data.dataset)
        return None if parent is None else _hash(parent, [int(i) for i in data.indices])
    tag = (type(data).__qualname__, repr(getattr(data, "transform", None)),
           repr(getattr(data, "target_transform", None)))
    samples = getattr(data, "samples", None) or getattr(data, "imgs", None)
    if isinstance(samples, list) and samples and isinstance(samples[0], tuple):
        root = Path(str(getattr(data, "root", "/")))
        return _hash(*tag, file_identity([Path(p) for p, _ in samples], root))
    pixels = getattr(data, "data", None)
    if hasattr(pixels, "tobytes") or hasattr(pixels, "numpy"):
        array = pixels.numpy() if hasattr(pixels, "numpy") else pixels
        return _hash(*tag, getattr(array, "shape", ""), array.tobytes())
    return None


class WrappedDataset(ImageDataset):
    """A map-style data set (or list) of ``(image, label)`` pairs as an inca data set.

    Args:
        data: ``len(data)`` and ``data[i] -> (image, label)`` (or a row mapping).
        name: how messages and reports name it.
        classes: class names that integer labels index (default: ``data.classes``, else
            the sorted distinct labels).
        image_column: the image's key when ``data[i]`` is a mapping (default: ``image``).
        label_column: the label's key when ``data[i]`` is a mapping (default: ``label``).
    """

    def __init__(self, data: Any, name: str, *, classes: Sequence[str] | None = None,
                 image_column: str | None = None, label_column: str | None = None) -> None:
        super().__init__()
        self.data, self.name = data, name
        self.image_column, self.label_column = image_column, label_column
        if not (hasattr(data, "__len__") and hasattr(data, "__getitem__")):
            raise DataError(f"{name}: expected a map-style data set (len(data) and data[i] -> "
                            f"(image, label)) or a list of pairs, got {type(data).__name__}")
        if getattr(data, "transform", None) is not None:
            warnings.warn(f"{name} has a transform ({data.transform!r}); inca applies the "
                          "backbone's own preprocessing to what it yields: give it raw "
                          "images (transform=None)", stacklevel=3)
        raw = _stored_labels(data)
        if raw is None:
            raw = [self._pair(data[i], i)[1] for i in range(len(data))]
        known = list(classes) if classes is not None else _classes_of(data)
        self.targets, self.classes = encode_labels(raw, source=name,
                                                   column=label_column or "label",
                                                   classes=known)
        if classes is None and isinstance(data, Subset) and len(self.targets):
            self._keep_present_classes()
        self._validate()

    def _keep_present_classes(self) -> None:
        """A ``Subset`` names its parent's classes: keep those it holds samples of (a
        class it lacks would be an output never trained), and say which went."""
        present = np.unique(self.targets)
        if len(present) == len(self.classes):
            return
        gone = [c for i, c in enumerate(self.classes) if i not in set(present.tolist())]
        shown = ", ".join(repr(c) for c in gone[:5]) + (" ..." if len(gone) > 5 else "")
        warnings.warn(f"{self.name} holds samples of {len(present)} of its parent's "
                      f"{len(self.classes)} classes: the {len(gone)} it lacks ({shown}) are "
                      "left out of its classes", stacklevel=4)
        self.classes = [self.classes[i] for i in present.tolist()]
        self.targets = np.searchsorted(present, self.targets).astype(np.int64)

    def _pair(self, item: Any, i: int) -> tuple[Any, Any]:
        if isinstance(item, Mapping):
            keys = list(item)
            image_key = self.image_column or next((k for k in IMAGE_NAMES if k in item), None)
            label_key = self.label_column or next((k for k in LABEL_NAMES if k in item), None)
            if image_key not in item or label_key not in item:
                raise DataError(f"{self.name}[{i}] is a row with keys {keys}; pass "
                                "image_column= and label_column= (--image-column, "
                                "--label-column) to name the image and the label")
            return item[image_key], item[label_key]
        if isinstance(item, tuple | list) and len(item) == 2:
            return item[0], item[1]
        what = f"a {type(item).__name__} of {len(item)}" if isinstance(item, tuple | list) \
            else f"a {type(item).__name__}"
        raise DataError(f"{self.name}[{i}] is {what}; inca reads (image, label) pairs "
                        "(single-label classification)")

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        image, _ = self._pair(self.data[int(i)], int(i))
        return image_from(image, f"{self.name}[{i}]"), int(self.targets[i])

    def _identity(self) -> str:
        known = _source_identity(self.data)
        if known is not None:
            return known
        h = hashlib.sha256()  # every image's pixels: one decoding pass, once
        for i in range(len(self)):
            image = self[i][0]
            h.update(f"{image.size}".encode())
            h.update(image.tobytes())
        return h.hexdigest()[:16]


def _name(data: Any) -> str:
    if isinstance(data, list | tuple):
        return f"list of {len(data)} (image, label) pairs"
    root = getattr(data, "root", None)
    return f"{type(data).__name__}({root})" if root else type(data).__name__


def _hf_name(data: Any) -> str:
    first = data if hasattr(data, "info") else next(iter(data.values()), None)
    info = getattr(first, "info", None)
    label = getattr(info, "dataset_name", None) or getattr(info, "builder_name", None)
    return f"hf:{label or type(data).__name__}"
