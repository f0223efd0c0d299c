"""Images held in memory as arrays, and the built-in sets made of them: Fashion-MNIST
(idx files, installed or fetched by torchvision) and scikit-learn's digits."""

from __future__ import annotations

import gzip
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from inca._hints import require
from inca._paths import cache_dir
from inca.data.base import ImageDataset, _hash
from inca.errors import AssetError, DataError

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)


class ArrayDataset(ImageDataset):
    """Images held in memory as a uint8 array ``(N, H, W)`` or ``(N, H, W, 3)``."""

    def __init__(self, images: np.ndarray, targets: Sequence[int], classes: Sequence[str],
                 name: str) -> None:
        super().__init__()
        self.images = np.ascontiguousarray(images, dtype=np.uint8)
        self.targets = np.asarray(targets, dtype=np.int64)
        self.classes = list(classes)
        self.name = name
        if len(self.images) != len(self.targets):
            raise DataError(f"{name}: {len(self.images)} images but {len(self.targets)} labels")
        self._validate()

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        img = Image.fromarray(self.images[i])
        return img.convert("RGB"), int(self.targets[i])

    def _identity(self) -> str:
        return _hash(self.name, self.images.shape, self.images.tobytes())


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_mnist_dir() -> Path:
    """The folder holding Fashion-MNIST's idx ``.gz`` files, fetched when possible."""
    names = ("train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz")
    candidates = [os.environ.get("INCA_FASHION_MNIST_DIR"), *FASHION_MNIST_DIRS,
                  str(cache_dir() / "FashionMNIST" / "raw")]
    for c in candidates:
        if c and all((Path(c) / n).is_file() for n in names):
            return Path(c)
    try:  # online fallback: torchvision's downloader into inca's cache folder
        import torchvision

        torchvision.datasets.FashionMNIST(str(cache_dir()), download=True)
        return cache_dir() / "FashionMNIST" / "raw"
    except Exception as e:  # noqa: BLE001 - any download failure means: not available
        raise AssetError(
            "Fashion-MNIST is not installed. Install it with `sudo apt-get install "
            "dataset-fashion-mnist` (or `make assets`), or set INCA_FASHION_MNIST_DIR to a "
            f"folder with the four idx .gz files (download attempt failed: {e})"
        ) from e


def _fashion_mnist(split: str) -> ArrayDataset:
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise DataError(f"fashion-mnist has splits 'train' and 'test', not {split!r}")
    d = fashion_mnist_dir()
    images = _read_idx(d / f"{prefix}-images-idx3-ubyte.gz")
    labels = _read_idx(d / f"{prefix}-labels-idx1-ubyte.gz")
    return ArrayDataset(images, labels, FASHION_MNIST_CLASSES, f"fashion-mnist/{split}")


def _digits(split: str) -> ArrayDataset:
    load_digits = require("sklearn.datasets", purpose="the digits data set").load_digits

    if split not in ("train", "test"):
        raise DataError(f"digits has splits 'train' and 'test', not {split!r}")
    d = load_digits()
    images = np.round(d.images * (255 / 16)).astype(np.uint8)  # 0..16 -> 0..255
    idx = _digits_split(d.target, split == "train")
    return ArrayDataset(images[idx], d.target[idx], [str(i) for i in range(10)],
                        f"digits/{split}")


def _digits_split(targets: np.ndarray, train: bool) -> np.ndarray:
    """No official split: a fixed, stratified 80/20 one (each class's 20% rounded, seeded).
    It defines the data set, so it never follows changes to validation splits."""
    rng = np.random.default_rng(0)
    keep, hold = [], []
    for c in np.unique(targets):
        idx = np.nonzero(targets == c)[0]
        rng.shuffle(idx)
        n_hold = int(round(len(idx) * 0.2))
        hold.append(idx[:n_hold])
        keep.append(idx[n_hold:])
    return np.sort(np.concatenate(keep if train else hold))


BUILTINS = {"fashion-mnist": _fashion_mnist, "digits": _digits}
BUILTIN_SPLITS = {"fashion-mnist": ("train", "test"), "digits": ("train", "test")}


def list_datasets() -> list[str]:
    """Names of the built-in data sets."""
    return list(BUILTINS)
