"""Image classification data sets: image folders, built-ins, Hugging Face sets on disk.

Every source yields ``(PIL.Image RGB, int label)`` and carries ``classes``, ``targets`` and
a ``fingerprint()`` that caches record, so a cache is never reused for other data.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from inca._paths import cache_dir
from inca.data.images import ImageError, open_image
from inca.errors import AssetError, DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)


def _hash(*parts: Any) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else str(p).encode())
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


class ImageFolderDataset(ImageDataset):
    """``root/<class>/<image>`` files; classes sorted by folder name.

    Hidden files and folders (names starting with ``.``, e.g. ``.ipynb_checkpoints/``)
    are ignored. Files are checked when read, and a bad one raises :class:`DataError`
    naming it. With ``skip_unreadable=True`` every file is opened and verified up front
    instead, the unreadable ones are left out and listed in ``skipped`` (a cost of one
    open per file).
    """

    def __init__(self, root: str | Path, *, skip_unreadable: bool = False) -> None:
        super().__init__()
        self.root = Path(root)
        self.name = str(root)
        if not self.root.is_dir():
            raise DataError(f"data folder {self.root} does not exist")
        class_dirs = sorted(p for p in self.root.iterdir() if p.is_dir()
                            and not p.name.startswith("."))
        if not class_dirs:
            raise DataError(f"{self.root} has no class subfolders; expected "
                            f"{self.root}/<class_name>/<image files>")
        self.classes = [p.name for p in class_dirs]
        files: list[Path] = []
        targets: list[int] = []
        for label, d in enumerate(class_dirs):
            found = sorted(p for p in d.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS
                           and not _hidden(p.relative_to(d)) and p.is_file())
            if not found:
                raise DataError(f"class folder {d} holds no images "
                                f"({', '.join(IMAGE_EXTENSIONS)}); remove it or add images")
            files += found
            targets += [label] * len(found)
        if skip_unreadable:
            keep = []
            for f, t in zip(files, targets, strict=True):
                try:
                    _read_image(f)
                    keep.append((f, t))
                except DataError:
                    self.skipped.append(str(f))
            if self.skipped:
                warnings.warn(f"{self.root}: skipped {len(self.skipped)} unreadable image(s), "
                              f"e.g. {self.skipped[0]}", stacklevel=2)
            files, targets = [f for f, _ in keep], [t for _, t in keep]
        self.files = files
        self.targets = np.asarray(targets, dtype=np.int64)
        self._validate()

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return _read_image(self.files[i]), int(self.targets[i])

    def _identity(self) -> str:
        # The change time (ctime) moves on every write and cannot be set back (unlike the
        # modification time, which cp -p, rsync -t or touch -r restore): an edited image
        # never reuses stale features. A copied folder is extracted again.
        parts = []
        for f in self.files:
            st = f.stat()
            parts.append(f"{f.relative_to(self.root)}:{st.st_size}:{st.st_mtime_ns}:"
                         f"{st.st_ctime_ns}")
        return _hash(*parts)


def _hidden(relative: Path) -> bool:
    """Whether a path inside a class folder is hidden (``.DS_Store``, files under
    ``.ipynb_checkpoints/``): never a training image."""
    return any(part.startswith(".") for part in relative.parts)


def _read_image(path: Path) -> Image.Image:
    """The file as RGB through :func:`open_image` (bounded size, deep images scaled); a bad,
    truncated or too large file raises :class:`ImageError` (a ``DataError``), so
    ``skip_unreadable`` leaves it out."""
    try:
        return open_image(path, name=str(path))
    except ImageError as e:
        raise e.with_hint("Fix or remove the file, or pass skip_unreadable=True "
                          "(--skip-unreadable) to leave such files out") from None


class HFDiskDataset(ImageDataset):
    """A Hugging Face ``datasets`` set saved with ``save_to_disk``."""

    def __init__(self, path: str | Path, split: str = "train") -> None:
        super().__init__()
        try:
            import datasets
        except ImportError as e:  # pragma: no cover - optional extra
            raise DataError("hf: data sets need `datasets`: pip install 'inca[hf]'") from e
        self.name = f"hf:{path}"
        try:
            ds = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as e:
            raise DataError(f"cannot load a Hugging Face data set from {path}: {e}") from e
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"{path} has splits {list(ds)}, not {split!r}")
            ds = ds[split]
        self.image_column = _pick_column(ds, datasets.Image, ("image", "img"), path, "image")
        self.label_column = _pick_column(ds, datasets.ClassLabel, ("label", "labels"), path,
                                         "label")
        feature = ds.features[self.label_column]
        labels = np.asarray(ds[self.label_column], dtype=np.int64)
        if isinstance(feature, datasets.ClassLabel):
            self.classes = list(feature.names)
        else:
            self.classes = [str(v) for v in range(int(labels.max()) + 1)] if labels.size else []
        self.ds = ds
        self.targets = labels
        self._validate()

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        im = self.ds[int(i)][self.image_column]
        if not isinstance(im, Image.Image):
            raise DataError(f"{self.name}: sample {i} column {self.image_column!r} is not an image")
        return open_image(im, name=f"{self.name}[{i}]"), int(self.targets[i])

    def _identity(self) -> str:
        return _hash(self.name, getattr(self.ds, "_fingerprint", ""), len(self.ds))


def _pick_column(ds: Any, feature_type: type, names: Sequence[str], path: Any,
                 what: str) -> str:
    for col, feat in ds.features.items():
        if isinstance(feat, feature_type):
            return col
    for n in names:
        if n in ds.features:
            return n
    raise DataError(f"{path}: no {what} column (looked for a {feature_type.__name__} feature "
                    f"or a column named {', '.join(names)}); columns: {list(ds.features)}")


# -- built-ins -----------------------------------------------------------------------
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
    from sklearn.datasets import load_digits

    if split not in ("train", "test"):
        raise DataError(f"digits has splits 'train' and 'test', not {split!r}")
    d = load_digits()
    images = np.round(d.images * (255 / 16)).astype(np.uint8)  # 0..16 -> 0..255
    # No official split: a fixed, stratified 80/20 one.
    train_idx, test_idx = _stratified_split(d.target, 0.2, seed=0)
    idx = train_idx if split == "train" else test_idx
    return ArrayDataset(images[idx], d.target[idx], [str(i) for i in range(10)],
                        f"digits/{split}")


BUILTINS = {"fashion-mnist": _fashion_mnist, "digits": _digits}


def list_datasets() -> list[str]:
    """Names of the built-in data sets."""
    return list(BUILTINS)


# -- subsets and splits ----------------------------------------------------------------
def _stratified_split(targets: np.ndarray, fraction: float, seed: int
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Indices (kept, held out): ``fraction`` of each class held out, seeded, sorted."""
    rng = np.random.default_rng(seed)
    keep, hold = [], []
    for c in np.unique(targets):
        idx = np.nonzero(targets == c)[0]
        rng.shuffle(idx)
        n_hold = int(round(len(idx) * fraction))
        hold.append(idx[:n_hold])
        keep.append(idx[n_hold:])
    return np.sort(np.concatenate(keep)), np.sort(np.concatenate(hold))


class SubsetDataset(ImageDataset):
    """Some samples of a parent data set; ``indices`` index the parent."""

    def __init__(self, parent: ImageDataset, indices: Sequence[int], tag: str) -> None:
        super().__init__()
        self.parent = parent
        self.indices = np.asarray(indices, dtype=np.int64)
        self.classes = list(parent.classes)
        self.targets = np.asarray(parent.targets)[self.indices]
        self.name = f"{parent.name}[{tag}]"
        self.skipped = list(parent.skipped)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return self.parent[int(self.indices[i])]

    def _identity(self) -> str:
        return _hash(self.parent.fingerprint(), self.indices.tobytes())


class ClassAlignedDataset(ImageDataset):
    """A data set whose labels index another class list, matched by name (a test folder
    may lack some of the training classes, or list them in another order)."""

    def __init__(self, parent: ImageDataset, classes: Sequence[str]) -> None:
        super().__init__()
        classes = list(classes)
        unknown = [c for c in parent.classes if c not in classes]
        if unknown:
            raise DataError(f"{parent.name} has classes the training data does not: "
                            f"{unknown}; training knows {classes}. Remove those samples or "
                            "train with them")
        self.parent = parent
        self.map = np.array([classes.index(c) for c in parent.classes], dtype=np.int64)
        self.classes = classes
        self.targets = self.map[np.asarray(parent.targets, dtype=np.int64)]
        self.name = parent.name
        self.skipped = list(getattr(parent, "skipped", []))

    def __len__(self) -> int:
        return len(self.parent)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        image, label = self.parent[i]
        return image, int(self.map[label])

    def _identity(self) -> str:
        return _hash(self.parent.fingerprint(), self.map.tobytes())


def align_classes(dataset: ImageDataset, classes: Sequence[str]) -> ImageDataset:
    """``dataset`` with labels indexing ``classes`` (by name); itself when they already do.

    Raises:
        DataError: ``dataset`` has a class that ``classes`` lacks.
    """
    if list(dataset.classes) == list(classes):
        return dataset
    return ClassAlignedDataset(dataset, classes)


def limit_dataset(dataset: ImageDataset, limit: int, seed: int = 0) -> ImageDataset:
    """At most ``limit`` samples, every class represented (round robin over classes after a
    seeded shuffle), in the parent's order."""
    if limit <= 0:
        raise DataError(f"limit must be positive, got {limit}")
    if limit >= len(dataset):
        return dataset
    rng = np.random.default_rng(seed)
    per_class = []
    for c in range(len(dataset.classes)):
        idx = np.nonzero(dataset.targets == c)[0]
        rng.shuffle(idx)
        per_class.append(list(idx))
    chosen: list[int] = []
    depth = 0
    while len(chosen) < limit:
        for idx in per_class:
            if depth < len(idx) and len(chosen) < limit:
                chosen.append(idx[depth])
        depth += 1
    return SubsetDataset(dataset, sorted(chosen), f"limit={limit},seed={seed}")


def split_train_val(dataset: ImageDataset, val_fraction: float = 0.1, seed: int = 0
                    ) -> tuple[SubsetDataset, SubsetDataset]:
    """A deterministic, seeded, stratified train/validation split.

    Returns:
        ``(train, val)``, each with ``indices`` into ``dataset``.
    """
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    train_idx, val_idx = _stratified_split(np.asarray(dataset.targets), val_fraction, seed)
    counts = np.bincount(np.asarray(dataset.targets)[train_idx], minlength=len(dataset.classes))
    if (counts == 0).any() or len(val_idx) == 0:
        empty = [dataset.classes[i] for i in np.nonzero(counts == 0)[0]]
        raise DataError(f"{dataset.name}: too few samples to split off {val_fraction:.0%} for "
                        f"validation (classes left without training samples: {empty}); use "
                        "more data or pass a validation set")
    tag = f"val={val_fraction},seed={seed}"
    return (SubsetDataset(dataset, train_idx, f"train,{tag}"),
            SubsetDataset(dataset, val_idx, f"val,{tag}"))


def load_dataset(spec: str, split: str = "train", *, skip_unreadable: bool = False,
                 limit: int | None = None, seed: int = 0) -> ImageDataset:
    """Load a data set by name or path.

    Args:
        spec: ``"fashion-mnist"``, ``"digits"``, an image folder (``class/xxx.jpg``; a
            folder with ``train/`` and ``test/`` or ``val/`` subfolders picks ``split``),
            or ``"hf:<folder>"`` (a Hugging Face data set saved with ``save_to_disk``).
        split: ``"train"`` or ``"test"`` (``"val"`` for folders that have one).
        skip_unreadable: leave out unreadable images (listed in ``skipped``) instead of
            failing on the first.
        limit: at most this many samples, every class represented; seeded.
        seed: seed of the ``limit`` subset.

    Example:
        >>> from inca.data import load_dataset
        >>> ds = load_dataset("digits", limit=100)
        >>> len(ds), ds.classes[:3]
        (100, ['0', '1', '2'])
    """
    if spec in BUILTINS:
        ds: ImageDataset = BUILTINS[spec](split)
    elif spec.startswith("hf:"):
        ds = HFDiskDataset(spec[3:], split)
    else:
        root = Path(spec)
        if not root.exists():
            raise DataError(f"unknown data set {spec!r}: not a built-in "
                            f"({', '.join(BUILTINS)}), not hf:<folder>, and no such folder")
        sub = [d for d in ("train", "val", "test") if (root / d).is_dir()]
        if sub:
            if split not in sub:
                raise DataError(f"{root} has splits {sub}, not {split!r}")
            root = root / split
        ds = ImageFolderDataset(root, skip_unreadable=skip_unreadable)
    if limit is not None:
        ds = limit_dataset(ds, limit, seed)
    return ds
