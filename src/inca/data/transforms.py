"""Image transforms built from a backbone's expected preprocessing."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T

from inca.backbones.base import Preprocessing

_INTERPOLATION = {
    "bilinear": T.InterpolationMode.BILINEAR,
    "bicubic": T.InterpolationMode.BICUBIC,
    "nearest": T.InterpolationMode.NEAREST,
}


def build_transform(preprocessing: Preprocessing, train: bool = False
                    ) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image -> normalized tensor ``(3, S, S)`` as the backbone expects.

    Evaluation: resize the shorter side to S, center-crop S (a plain resize for square
    images), scale to [0, 1], normalize. Training adds light augmentation: a random
    resized crop (70-100% of the area) and a horizontal flip.
    """
    s = preprocessing.input_size
    interp = _INTERPOLATION[preprocessing.interpolation]
    tail = [T.ToTensor(), T.Normalize(preprocessing.mean, preprocessing.std)]
    if train:
        head = [T.RandomResizedCrop(s, scale=(0.7, 1.0), interpolation=interp),
                T.RandomHorizontalFlip()]
    else:
        head = [T.Resize(s, interpolation=interp), T.CenterCrop(s)]
    return T.Compose([_to_rgb, *head, *tail])


def _to_rgb(img: Image.Image) -> Image.Image:
    return img if img.mode == "RGB" else img.convert("RGB")


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
