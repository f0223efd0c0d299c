"""The contract every inca data set keeps: ``(PIL RGB image, int label)`` pairs with
``name``, ``classes``, ``targets`` and a stable ``fingerprint()`` (caches record it, so a
cache is never reused for other data)."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from inca.data.images import open_image
from inca.data.labels import CLASS_NAME_RULE, class_name_problem, shown_name
from inca.errors import DataError


def _hash(*parts: Any) -> str:
    """16 hex digits of a SHA-256 over ``parts`` (bytes as they are, the rest as text)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes | memoryview) else str(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


class ImageDataset(Dataset):
    """Base of inca's data sets: ``(image, label)`` pairs with class names.

    Attributes:
        name: where the data came from (``fashion-mnist``, a folder path, ...).
        classes: class names; label ``i`` is ``classes[i]``.
        targets: labels of every sample, ``(len,)`` int64.
        skipped: unreadable files left out (when asked to skip them).
    """

    name: str
    classes: list[str]
    targets: np.ndarray

    def __init__(self) -> None:
        self.skipped: list[str] = []
        self._fingerprint: str | None = None

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        raise NotImplementedError

    def _identity(self) -> str:
        raise NotImplementedError

    def fingerprint(self) -> str:
        """A stable hash of the samples and labels (equal across processes for equal data)."""
        if self._fingerprint is None:
            self._fingerprint = _hash(type(self).__name__, self._identity(), self.classes,
                                      self.targets.astype(np.int64).tobytes())
        return self._fingerprint

    def _validate(self) -> None:
        if len(self.classes) < 2:
            raise DataError(f"{self.name}: a classification data set needs at least 2 classes, "
                            f"found {len(self.classes)} ({self.classes})")
        for c in self.classes:
            problem = class_name_problem(c)
            if problem:
                raise DataError(f"{self.name}: class {shown_name(c)} {problem}; "
                                f"{CLASS_NAME_RULE}: rename the class (its folder or label)")
        if len(self.targets) == 0:
            raise DataError(f"{self.name}: no samples")
        bad = np.nonzero((self.targets < 0) | (self.targets >= len(self.classes)))[0]
        if bad.size:
            i = int(bad[0])
            raise DataError(f"{self.name}: sample {i} has label {int(self.targets[i])}, outside "
                            f"the {len(self.classes)} classes 0..{len(self.classes) - 1}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {len(self)} samples, " \
               f"{len(self.classes)} classes)"


def image_from(value: Any, name: str) -> Image.Image:
    """What a foreign data set yields as its image, as 8-bit RGB through
    :func:`~inca.data.images.open_image` (size-checked, deep images scaled).

    Accepted: a PIL image; a path or the file's bytes; a Hugging Face image left
    undecoded (``{"bytes": ..., "path": ...}``); a numpy array ``(H, W)`` or
    ``(H, W, C)``; a torch tensor ``(C, H, W)`` (torchvision's layout). Float pixels are
    taken as 0..1.
    """
    if isinstance(value, dict) and ("bytes" in value or "path" in value):
        value = value.get("bytes") or value.get("path")
    if hasattr(value, "detach") and hasattr(value, "permute"):  # torch.Tensor, (C, H, W)
        value = value.detach().cpu()
        value = (value.permute(1, 2, 0) if value.ndim == 3 else value).numpy()
    if isinstance(value, np.ndarray):
        value = _array_image(value, name)
    if value is None or isinstance(value, int | float | list | tuple):
        raise DataError(f"{name}: expected an image (a PIL image, a path, bytes, an array or "
                        f"a tensor), got {type(value).__name__}")
    return open_image(value, name=name)


def _array_image(a: np.ndarray, name: str) -> Image.Image:
    """``(H, W)``, ``(H, W, 1|3|4)`` pixels (uint8, or floats in 0..1) as a PIL image."""
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
        raise DataError(f"{name}: an image array must be (H, W) or (H, W, 1|3|4), got shape "
                        f"{a.shape}")
    if a.dtype.kind == "f":
        a = np.clip(np.rint(np.nan_to_num(a) * 255), 0, 255)
    elif a.dtype.kind == "b":
        a = a * 255
    elif a.dtype != np.uint8 and a.ndim == 2:  # deep grey: open_image scales it, not clips
        return Image.fromarray(a.astype(np.int32))
    elif a.dtype != np.uint8:
        a = np.clip(a, 0, 255)
    return Image.fromarray(np.ascontiguousarray(a, dtype=np.uint8))
