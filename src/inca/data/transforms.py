"""Image transforms built from a backbone's expected preprocessing.

The CPU side (data-loading workers) decodes, resizes, crops and flips, and hands over
``uint8`` pixels: a quarter of float32's bytes to copy to the device. The device side,
:func:`to_model_input`, converts and normalizes there.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from inca.backbones.base import Preprocessing
from inca.data.images import to_rgb
from inca.errors import DataError

AUGMENTATIONS = ("none", "crop", "crop-flip")


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
    """
    policy = augmentation(augment)
    s = preprocessing.input_size
    from torchvision import transforms as T  # here: importing torchvision takes a second

    interp = T.InterpolationMode(preprocessing.interpolation)
    if policy == "none":
        head = [T.Resize(s, interpolation=interp), T.CenterCrop(s)]
    else:
        head = [T.RandomResizedCrop(s, scale=(0.7, 1.0), interpolation=interp)]
        if policy == "crop-flip":
            head.append(T.RandomHorizontalFlip())
    return T.Compose([_to_rgb, *head, T.PILToTensor()])


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
