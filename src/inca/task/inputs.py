"""What ``Task.predict`` accepts as images: one or many, as paths, bytes, PIL images, NumPy
arrays or tensors, each opened as 8-bit RGB within the pixel bound."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from PIL import Image

from inca.errors import TaskError


def image_list(images: Any) -> list[Any]:
    """One image, a batch array or a sequence of images, as a list of single images."""
    if isinstance(images, str | os.PathLike | bytes | bytearray | Image.Image):
        return [images]
    if isinstance(images, np.ndarray):
        return list(images) if images.ndim == 4 else [images]
    if isinstance(images, list | tuple):
        return list(images)
    raise TaskError(f"cannot read images from a {type(images).__name__}: pass a path, a PIL "
                    "image, a NumPy array, a tensor, or a list of them")


def _array_image(a: np.ndarray) -> Image.Image:
    """A NumPy image ``(H, W)``, ``(H, W, C)`` or ``(C, H, W)`` (C in 1, 3, 4) as PIL."""
    from inca.data.images import to_uint8

    if a.ndim == 3 and a.shape[-1] not in (1, 3, 4) and a.shape[0] in (1, 3, 4):
        a = np.moveaxis(a, 0, -1)  # channels first, as torchvision lays them out
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
        raise TaskError(f"an image array must be (H, W), (H, W, C) or (C, H, W) with 1, 3 "
                        f"or 4 channels, got shape {a.shape}")
    if a.dtype != np.uint8:  # 16-bit, int or float: scaled, not clipped
        a = to_uint8(a)
    return Image.fromarray(np.ascontiguousarray(a))


def open_one(im: Any) -> Image.Image:
    """A path, bytes or PIL image as RGB through :func:`inca.data.images.open_image` (size
    bounded by ``PIL.Image.MAX_IMAGE_PIXELS`` before decoding, deep images scaled)."""
    from inca.data.images import open_image
    from inca.errors import ImageError

    try:
        return open_image(_array_image(im) if isinstance(im, np.ndarray) else im)
    except ImageError as e:
        raise TaskError(str(e)) from e
