"""CSV and JSON-lines manifests: one row per image with its path and its label.

``path,label`` rows by default (other header names through ``image_column`` /
``label_column``; a header-less two-column CSV reads as ``path,label``). Relative paths are
resolved against the manifest's folder. The file must be UTF-8 (a byte that is not is a
clear error naming its line: guessing Latin-1 or cp1252 would silently rename classes).

Class names are the sorted distinct labels. A CSV label is text, kept exactly as written
(``01`` and ``1`` are two classes; ``nan`` is a name): plain integers are sorted by value
unless one number is spelt two ways, everything else as text
(:func:`~inca.data.labels.encode_text_labels`). A validation or test manifest is matched to
the training classes by name when fitting.

An image listed twice with the same label is used once (with a warning), so it cannot land
on both sides of a validation split; with two labels it is an error (multi-label data).
The fingerprint is the files' identity (:func:`~inca.data.folders.file_identity`) with the
labels.
"""

from __future__ import annotations

import csv
import io
import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from inca.data.base import ImageDataset, _hash
from inca.data.folders import IMAGE_EXTENSIONS, file_identity, keep_readable, read_image
from inca.data.labels import encode_labels, encode_text_labels, refuse
from inca.errors import DataError

MANIFEST_SUFFIXES = (".csv", ".tsv", ".jsonl", ".ndjson", ".json")
PATH_NAMES = ("path", "image", "file", "filename", "filepath", "image_path", "img")
LABEL_NAMES = ("label", "labels", "class", "target", "category")


def is_manifest(spec: str | Path) -> bool:
    """Whether ``spec`` names a manifest file (by its suffix)."""
    p = Path(spec)
    return p.suffix.lower() in MANIFEST_SUFFIXES and p.is_file()


def _read_text(path: Path) -> str:
    """The file as UTF-8 text (a byte-order mark dropped), or an error naming the first
    byte that is not UTF-8, its line and the fix."""
    data = path.read_bytes()
    bom = 3 if data.startswith(b"\xef\xbb\xbf") else 0
    try:
        return data[bom:].decode("utf-8")
    except UnicodeDecodeError as e:
        at = bom + e.start
        line = data.count(b"\n", 0, at) + 1
        raise DataError(f"{path}: not UTF-8 text: byte 0x{data[at]:02x} on line {line} (byte "
                        f"offset {at}) is not UTF-8, so its labels and paths cannot be read "
                        "reliably (Latin-1? cp1252?); save the file as UTF-8 (a spreadsheet's "
                        f"'CSV UTF-8', or iconv -f latin1 -t utf-8 {path.name} -o "
                        f"utf8-{path.name})") from None


def _read_csv(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    text = io.StringIO(_read_text(path), newline="")
    lines = [r for r in csv.reader(text, delimiter=delimiter) if any(c.strip() for c in r)]
    if not lines:
        return [], []
    header = [c.strip() for c in lines[0]]
    if header[0].lower().endswith(IMAGE_EXTENSIONS):  # no header: path,label rows
        header, body = ["path", "label"], lines
    else:
        body = lines[1:]
    return [dict(zip(header, (c.strip() for c in r), strict=False)) for r in body], header


def _read_json(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    text = _read_text(path)
    try:
        rows = json.loads(text) if path.suffix.lower() == ".json" else None
    except json.JSONDecodeError:
        rows = None  # a .json file of JSON lines
    if rows is None:
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n}: not a JSON object ({e})") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise DataError(f"{path}: expected one JSON object per line (or a JSON list of "
                        'objects), e.g. {"path": "cat/1.jpg", "label": "cat"}')
    columns = list(dict.fromkeys(k for r in rows for k in r))
    return rows, columns


def _pick(columns: list[str], given: str | None, names: tuple[str, ...], position: int,
          source: str, what: str, option: str) -> str:
    if given is not None:
        if given not in columns:
            raise DataError(f"{source}: no column {given!r}; columns: {columns}")
        return given
    found = next((n for n in names if n in columns), None)
    if found is None and len(columns) == 2:
        found = columns[position]  # two columns: path, label
    if found is None:
        raise DataError(f"{source}: no {what} column (looked for {', '.join(names)}); "
                        f"columns: {columns}; pass {option}")
    return found


class ManifestDataset(ImageDataset):
    """Images listed in a CSV / TSV / JSON-lines file with their labels.

    Args:
        path: the manifest.
        image_column: the paths' column (default: ``path``, ``image``, ``file``, ...).
        label_column: the labels' column (default: ``label``, ``class``, ...).
        classes: class names that integer labels index (default: the labels found).
        skip_unreadable: open every image up front and leave out the unreadable ones.
    """

    def __init__(self, path: str | Path, *, image_column: str | None = None,
                 label_column: str | None = None, classes: list[str] | None = None,
                 skip_unreadable: bool = False) -> None:
        super().__init__()
        self.path = Path(path)
        self.root = self.path.parent.resolve()
        self.name = str(path)
        is_csv = self.path.suffix.lower() in (".csv", ".tsv")
        rows, columns = (_read_csv if is_csv else _read_json)(self.path)
        if not rows:
            raise DataError(f"{self.path}: no rows; expected a header and path,label rows")
        self.image_column = _pick(columns, image_column, PATH_NAMES, 0, self.name,
                                  "image path", "--image-column (image_column=)")
        self.label_column = _pick(columns, label_column, LABEL_NAMES, 1, self.name, "label",
                                  "--label-column (label_column=)")
        files = [self._resolve(r.get(self.image_column), n) for n, r in enumerate(rows)]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise DataError(f"{self.path}: {len(missing)} listed image(s) not found, e.g. "
                            f"{missing[0]} (relative paths are read from {self.root})")
        labels = [r.get(self.label_column) for r in rows]
        encode = encode_text_labels if is_csv else encode_labels
        targets, self.classes = encode(labels, source=self.name, column=self.label_column,
                                       classes=classes)
        files, targets = _drop_repeated(files, targets, self.classes, self.name,
                                        self.label_column)
        if skip_unreadable:
            files, kept, self.skipped = keep_readable(files, targets.tolist(), self.path)
            targets = np.asarray(kept, dtype=np.int64)
        self.files = files
        self.targets = targets
        self._validate()

    def _resolve(self, value: Any, row: int) -> Path:
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{self.path}: row {row + 1} has no image path in column "
                            f"{self.image_column!r}")
        if "://" in value:
            raise DataError(f"{self.path}: row {row + 1} names a URL ({value}); download the "
                            "images and list their local paths")
        p = Path(value).expanduser()
        return p if p.is_absolute() else self.root / p

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return read_image(self.files[i]), int(self.targets[i])

    def _identity(self) -> str:
        return _hash(file_identity(self.files, self.root))


def _drop_repeated(files: list[Path], targets: np.ndarray, classes: list[str], source: str,
                   column: str) -> tuple[list[Path], np.ndarray]:
    """Each image once (the same file however its path is spelt): a repeated row with the
    same label is left out with a warning (it could straddle a validation split); one
    with another label is multi-label data in long form, refused."""
    first: dict[str, int] = {}
    keep: list[int] = []
    for i, f in enumerate(files):
        j = first.setdefault(os.path.realpath(f), i)
        if j == i:
            keep.append(i)
        elif targets[j] != targets[i]:
            raise refuse(source, column, f"two labels for one image ({f}: "
                                         f"{classes[targets[j]]!r} and "
                                         f"{classes[targets[i]]!r}): multi-label data")
    if len(keep) < len(files):
        dropped = sorted(set(range(len(files))) - set(keep))
        warnings.warn(f"{source}: {len(dropped)} duplicate row(s) (an image listed again with "
                      f"the same label) left out, e.g. row {dropped[0] + 1} ({files[dropped[0]]}); "
                      "each image is used once", stacklevel=3)
    return [files[i] for i in keep], targets[keep]
