"""Image files on disk: ``root/<class>/<image>`` folders (and ``root/{train,val,test}/``
layouts), and the file identity that fingerprints any list of image files."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from inca.data.base import ImageDataset, _hash
from inca.data.images import ImageError, open_image
from inca.data.splits import SPLIT_NAMES, resolve_split
from inca.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def file_identity(files: Sequence[Path], root: Path) -> str:
    """A hash of the files' paths (relative to ``root``), sizes, modification and change
    times.

    The change time (ctime) moves on every write and cannot be set back (unlike the
    modification time, which cp -p, rsync -t or touch -r restore): an edited image never
    reuses stale features. A copied folder is extracted again.
    """
    parts = []
    for f in files:
        st = f.stat()
        rel = f.relative_to(root) if f.is_relative_to(root) else f
        parts.append(f"{rel}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}")
    return _hash(*parts)


def read_image(path: Path) -> Image.Image:
    """The file as RGB through :func:`open_image` (bounded size, deep images scaled); a bad,
    truncated or too large file raises :class:`ImageError` (a ``DataError``), so
    ``skip_unreadable`` leaves it out."""
    try:
        return open_image(path, name=str(path))
    except ImageError as e:
        raise e.with_hint("Fix or remove the file, or pass skip_unreadable=True "
                          "(--skip-unreadable) to leave such files out") from None


def keep_readable(files: list[Path], targets: list[int], where: object
                  ) -> tuple[list[Path], list[int], list[str]]:
    """Open and verify every file; ``(files, targets, skipped)`` without the bad ones."""
    keep, skipped = [], []
    for f, t in zip(files, targets, strict=True):
        try:
            read_image(f)
            keep.append((f, t))
        except DataError:
            skipped.append(str(f))
    if skipped:
        warnings.warn(f"{where}: skipped {len(skipped)} unreadable image(s), "
                      f"e.g. {skipped[0]}", stacklevel=3)
    return [f for f, _ in keep], [t for _, t in keep], skipped


def _hidden(relative: Path) -> bool:
    """Whether a path inside a class folder is hidden (``.DS_Store``, files under
    ``.ipynb_checkpoints/``): never a training image."""
    return any(part.startswith(".") for part in relative.parts)


def images_under(folder: Path) -> list[Path]:
    """The image files under ``folder`` (any depth), sorted; hidden files and folders left
    out."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS
                  and not _hidden(p.relative_to(folder)) and p.is_file())


class ImageFolderDataset(ImageDataset):
    """``root/<class>/<image>`` files; classes sorted by folder name.

    Hidden files and folders (names starting with ``.``, e.g. ``.ipynb_checkpoints/``)
    are ignored. Files are checked when read, and a bad one raises :class:`DataError`
    naming it. With ``skip_unreadable=True`` every file is opened and verified up front
    instead, the unreadable ones are left out and listed in ``skipped`` (a cost of one
    open per file). The fingerprint is :func:`file_identity` of the files.
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
            found = images_under(d)
            if not found:
                raise DataError(f"class folder {d} holds no images "
                                f"({', '.join(IMAGE_EXTENSIONS)}); remove it or add images")
            files += found
            targets += [label] * len(found)
        if skip_unreadable:
            files, targets, self.skipped = keep_readable(files, targets, self.root)
        self.files = files
        self.targets = np.asarray(targets, dtype=np.int64)
        self._validate()

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return read_image(self.files[i]), int(self.targets[i])

    def _identity(self) -> str:
        return file_identity(self.files, self.root)


def folder_splits(root: Path) -> list[str]:
    """The split subfolders of ``root`` (``train/``, ``val/`` or ``validation/``, ...)."""
    names = [n for names in SPLIT_NAMES.values() for n in names]
    return [n for n in names if (root / n).is_dir()]


def load_folder(root: Path, split: str, skip_unreadable: bool) -> ImageFolderDataset:
    """``root/<split>/`` when ``root`` has split subfolders, else ``root`` itself (one
    split: whichever was asked for)."""
    sub = folder_splits(root)
    if sub:
        name = resolve_split(sub, split)
        if name is None:
            raise DataError(f"{root} has splits {sub}, not {split!r}")
        root = root / name
    return ImageFolderDataset(root, skip_unreadable=skip_unreadable)
