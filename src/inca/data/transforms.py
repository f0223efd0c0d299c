"""Image transforms built from a backbone's expected preprocessing.

The CPU side (data-loading workers) decodes, resizes, crops and flips, and hands over
``uint8`` pixels: a quarter of float32's bytes to copy to the device. The device side,
:func:`to_model_input`, converts and normalizes there.
"""

from __future__ import annotations

import functools
import math
import os
import sys
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from inca._choices import AUGMENTATIONS
from inca.backbones.base import Preprocessing
from inca.data.images import to_rgb
from inca.errors import DataError

#: Beyond this ratio of the longer side to the shorter one, ``"none"`` resizes only the
#: part of the image that its center crop keeps (a 4 x 100,000 strip would otherwise be
#: resized to S x 25,000 S pixels before being cropped: gigabytes for one image).
MAX_RESIZE_RATIO = 4


def augmentation(value: bool | str) -> str:
    """An augmentation policy from :data:`AUGMENTATIONS` (``True`` is ``"crop-flip"``,
    ``False`` ``"none"``)."""
    if isinstance(value, bool):
        return "crop-flip" if value else "none"
    if value not in AUGMENTATIONS:
        raise DataError(f"unknown augmentation {value!r}; choose one of "
                        f"{', '.join(AUGMENTATIONS)} (crop: no flips, for data whose "
                        "orientation carries the label)")
    return value


def build_transform(preprocessing: Preprocessing, augment: bool | str = "none"
                    ) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image -> ``uint8`` pixels ``(3, S, S)``; :func:`to_model_input` normalizes them.

    ``"none"``: resize the shorter side to S, center-crop S (a plain resize for square
    images). ``"crop"``: a random resized crop (70-100% of the area) instead.
    ``"crop-flip"``: that and a random horizontal flip (not for data whose orientation
    is the label).

    Every policy's work is bounded by S x S and the decoded image, whatever its aspect
    ratio: ``"none"`` resizes only the central part that the crop keeps when the resized
    image would be over :data:`MAX_RESIZE_RATIO` squares of S (see :class:`ResizeCenterCrop`),
    and the random crops cut before they resize.
    """
    policy = augmentation(augment)
    s = preprocessing.input_size
    from torchvision import transforms as T  # here: importing torchvision takes a second

    interp = T.InterpolationMode(preprocessing.interpolation)
    if policy == "none":
        head = [ResizeCenterCrop(s, interp)]
    else:
        head = [T.RandomResizedCrop(s, scale=(0.7, 1.0), interpolation=interp)]
        if policy == "crop-flip":
            head.append(T.RandomHorizontalFlip())
    return T.Compose([_to_rgb, *head, T.PILToTensor()])


class ResizeCenterCrop:
    """torchvision's ``Resize(size)`` then ``CenterCrop(size)``, with its work bounded by
    ``size`` and the decoded image whatever the image's aspect ratio.

    Up to :data:`MAX_RESIZE_RATIO` it is exactly those two transforms. Beyond, the resized
    image is never made: the band the crop keeps (and the filter's reach around it) is cut
    at native resolution, and Pillow resamples it with the full resize's scale and pixel
    centres (``Image.resize(box=...)``), short side first as Pillow does. The pixels are
    those of the full resize up to rounding (a level or so; more only where Pillow would
    have run its two passes in the other order), at ``size`` x (short side) cost instead of
    ``size`` x ``size`` x the aspect ratio.
    """

    def __init__(self, size: int, interpolation: Any) -> None:
        from torchvision import transforms as T

        self.size = size
        self.interpolation = interpolation
        self._resize = T.Resize(size, interpolation=interpolation)
        self._crop = T.CenterCrop(size)

    def __call__(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        short, long = min(w, h), max(w, h)
        s = self.size
        new_long = int(s * long / short)  # torchvision's size for the longer side
        if new_long <= MAX_RESIZE_RATIO * s:
            return self._crop(self._resize(img))
        from torchvision.transforms.functional import pil_modes_mapping

        resample = pil_modes_mapping[self.interpolation]
        start = int(round((new_long - s) / 2.0))  # CenterCrop's offset in the resized image
        scale = long / new_long
        lo, hi = start * scale, (start + s) * scale  # the kept band, in source pixels
        reach = 3 * max(scale, 1.0) + 2  # the widest filter's support (bicubic: 2), and more
        a, b = max(0, math.floor(lo - reach)), min(long, math.ceil(hi + reach))
        if resample == Image.Resampling.NEAREST:  # one pass: no order to follow
            band, box = ((img.crop((0, a, w, b)), (0, lo - a, w, hi - a)) if w <= h
                         else (img.crop((a, 0, b, h)), (lo - a, 0, hi - a, h)))
            return band.resize((s, s), resample, box=box)
        if w <= h:  # tall: the rows a..b, their width resized, then the kept band
            band = img.crop((0, a, w, b)).resize((s, b - a), resample)
            return band.resize((s, s), resample, box=(0, lo - a, s, hi - a))
        band = img.crop((a, 0, b, h)).resize((s, h), resample, box=(lo - a, 0, hi - a, h))
        return band.resize((s, s), resample)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(size={self.size}, "
                f"interpolation={self.interpolation.value})")


def default_num_workers() -> int:
    """Data-loading workers when none are asked for: the cores but one, at most 8."""
    return min(8, max(0, (os.cpu_count() or 1) - 1))


def loader_options(num_workers: int | None, device: torch.device,
                   prefetch_factor: int = 4) -> dict[str, Any]:
    """DataLoader settings that keep a device busy: workers (default
    :func:`default_num_workers`), kept across epochs, pinned batches for a GPU, and forked
    workers on Linux (a process started by ``spawn``, as ``inca compare``'s are, would
    otherwise spawn its workers too: seconds each)."""
    workers = default_num_workers() if num_workers is None else num_workers
    opts: dict[str, Any] = {"num_workers": workers, "pin_memory": device.type == "cuda"}
    if workers > 0:
        opts.update(persistent_workers=True, prefetch_factor=prefetch_factor)
        if sys.platform.startswith("linux"):  # PyTorch's own default there; not macOS
            opts["multiprocessing_context"] = "fork"
    return opts


@functools.lru_cache(maxsize=64)
def _affine(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
            ) -> tuple[torch.Tensor, torch.Tensor]:
    # Made once per device: a host-to-device copy per batch would make the host wait.
    scale = torch.tensor([1 / (255 * s) for s in std], device=device).view(1, 3, 1, 1)
    shift = torch.tensor([-m / s for m, s in zip(mean, std, strict=True)],
                         device=device).view(1, 3, 1, 1)
    return scale, shift


def to_model_input(images: torch.Tensor, preprocessing: Preprocessing,
                   device: torch.device | str, dtype: torch.dtype = torch.float32
                   ) -> torch.Tensor:
    """A batch ready for the backbone, on ``device`` in ``dtype``.

    ``uint8`` pixels ``(B, 3, H, W)`` (what :func:`build_transform` makes) are copied as
    they are (without waiting, when pinned) and normalized on the device:
    ``(x / 255 - mean) / std``. Floating-point images are taken as already normalized.

    Example:
        >>> from inca.backbones import Preprocessing
        >>> x = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
        >>> y = to_model_input(x, Preprocessing(mean=(0.5,) * 3, std=(0.25,) * 3), "cpu")
        >>> y[0, 0].round(decimals=4).tolist()  # (1 - 0.5) / 0.25
        [[2.0, 2.0], [2.0, 2.0]]
    """
    device = torch.device(device)
    x = images.to(device, non_blocking=True)
    if x.dtype == torch.uint8:
        scale, shift = _affine(preprocessing.mean, preprocessing.std, device)
        x = torch.addcmul(shift, x.float(), scale)  # x * scale + shift, one kernel
    return x.to(dtype)


def _to_rgb(img: Image.Image) -> Image.Image:
    return img if img.mode == "RGB" else to_rgb(img)


class TransformedDataset(Dataset):
    """``(transform(image), label)`` pairs from a data set of ``(image, label)``."""

    def __init__(self, dataset: Any, transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image, label = self.dataset[i]
        return self.transform(image), label
