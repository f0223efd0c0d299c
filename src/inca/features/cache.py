"""The activation cache: sharded ``.npy`` files per layer plus a self-describing manifest.

Layout of a cache folder::

    manifest.json                 identity, layers, shapes, dtype, shards done, complete flag
    shards/00000/<layer>.npy      (n, N, D) tokens of the shard's samples, fp16 by default
    shards/00000/labels.npy       (n,) int64 labels
    shards/00000/shard.json       the shard's place and the CRC-32 of each array's data

Every file is written to a temporary name and renamed into place; a shard is recorded in
the manifest only after all its files exist, and ``complete`` is set only after the last
shard. An interrupted extraction therefore resumes at the first unrecorded shard and never
serves a partial cache as complete. Each array is checked against its CRC-32 the first time
a process reads it (a cost of about one extra read of the cache per process, against the
many reads of training): a file damaged after extraction is a :class:`CacheError`, never
wrong tokens.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from inca._files import atomic_save_npy, atomic_write_json
from inca.errors import CacheError, CacheMismatchError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
# Keys that must match for a cache to be reused (resumed or read for a given backbone/data).
IDENTITY_KEYS = (
    "format_version",
    "backbone",
    "fingerprint",
    "preprocessing",
    "dataset",
    "layers",
    "token_grid",
    "dtype",
    "shard_size",
    "num_samples",
)


def _layer_file(layer: str) -> str:
    return layer.replace("/", "_") + ".npy"


def data_crc32(array: np.ndarray) -> int:
    """The CRC-32 of an array's data in C order (what a shard records and checks)."""
    return zlib.crc32(np.ascontiguousarray(array).reshape(-1).view(np.uint8))


def read_manifest(path: str | Path) -> dict[str, Any] | None:
    """The manifest of a cache folder, or ``None`` when there is none."""
    f = Path(path) / MANIFEST
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CacheError(f"{f} is not valid JSON ({e}); delete the folder to re-extract") from e


def describe_mismatch(found: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """Identity fields that differ between two manifests, as readable lines."""
    lines = []
    for k in IDENTITY_KEYS:
        if found.get(k) != wanted.get(k):
            lines.append(f"{k}: cache has {found.get(k)!r}, asked for {wanted.get(k)!r}")
    return lines


SHARD_RECORD = "shard.json"


def recorded_shards(root: Path | str, manifest: dict[str, Any] | None = None
                    ) -> list[dict[str, Any]]:
    """The shards of a cache folder written completely, sorted by index: each shard's own
    record (written after its files), and those a manifest lists."""
    root = Path(root)
    found = {s["index"]: s for s in (manifest or {}).get("shards", [])}
    for f in sorted((root / "shards").glob(f"*/{SHARD_RECORD}")):
        try:
            rec = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue  # written atomically: only a foreign file can be unreadable
        found[int(rec["index"])] = {k: int(rec[k]) for k in ("index", "start", "count")}
        if "crc32" in rec:  # caches written before checksums have none
            found[int(rec["index"])]["crc32"] = {k: int(v) for k, v in rec["crc32"].items()}
    return [found[i] for i in sorted(found)]


class CacheWriter:
    """Writes shards of a cache (internal to extraction).

    A shard counts once its record ``shards/<index>/shard.json`` exists, written after its
    files: several processes (the ranks of ``torchrun``) can write shards into one folder
    at once, and :meth:`finish` (one process, after all of them) lists the shards in the
    manifest and marks it complete.
    """

    def __init__(self, root: Path, manifest: dict[str, Any]) -> None:
        self.root = root
        self.manifest = manifest

    def done_shards(self) -> set[int]:
        return {s["index"] for s in recorded_shards(self.root, self.manifest)}

    def write_shard(
        self, index: int, start: int, tokens: dict[str, np.ndarray], labels: np.ndarray
    ) -> None:
        folder = self.root / "shards" / f"{index:05d}"
        arrays = {_layer_file(layer): arr for layer, arr in tokens.items()}
        arrays["labels.npy"] = labels.astype(np.int64)
        for name, arr in arrays.items():
            atomic_save_npy(folder / name, arr)
        # The shard counts only once its record says so: written after its files.
        atomic_write_json(folder / SHARD_RECORD, {
            "index": index, "start": start, "count": len(labels),
            "crc32": {name: data_crc32(arr) for name, arr in arrays.items()}})

    def finish(self) -> None:
        """List every recorded shard in the manifest and mark the cache complete."""
        shards = recorded_shards(self.root, self.manifest)
        counted = sum(s["count"] for s in shards)
        if counted != self.manifest["num_samples"]:
            raise CacheError(
                f"cache {self.root} holds {counted} of {self.manifest['num_samples']} samples; "
                "run the same command again to extract the rest"
            )
        self.manifest["shards"] = shards
        self.manifest["complete"] = True
        atomic_write_json(self.root / MANIFEST, self.manifest)


class ActivationCache:
    """Read a complete activation cache; arrays are memory-mapped, not loaded.

    Args:
        path: the cache folder.
        expect: identity fields the cache must have (e.g. ``{"fingerprint": ...}``); a
            mismatch raises :class:`~inca.errors.CacheError` rather than reusing the cache.

    Example:
        >>> cache = ActivationCache("runs/fmnist/cache/train")  # doctest: +SKIP
        >>> cache.get("blocks.7", [0, 5, 9]).shape  # doctest: +SKIP
        torch.Size([3, 65, 384])
    """

    def __init__(self, path: str | Path, expect: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        manifest = read_manifest(self.path)
        if manifest is None:
            raise CacheError(f"no activation cache at {self.path} (missing {MANIFEST})")
        if not manifest.get("complete"):
            raise CacheError(
                f"the cache at {self.path} is incomplete (an extraction was interrupted); "
                "run the same extract command again to resume it"
            )
        if expect:
            bad = [
                f"{k}: cache has {manifest.get(k)!r}, expected {v!r}"
                for k, v in expect.items()
                if manifest.get(k) != v
            ]
            if bad:
                raise CacheMismatchError(
                    f"the cache at {self.path} was made differently:\n  " + "\n  ".join(bad)
                    + "\nextract again into another folder"
                )
        self.manifest = manifest
        shards = sorted(manifest["shards"], key=lambda s: s["start"])
        self._starts = np.array([s["start"] for s in shards])
        self._folders = [self.path / "shards" / f"{s['index']:05d}" for s in shards]
        self._crcs = [s.get("crc32", {}) for s in shards]
        self._mmaps: dict[tuple[int, str], np.ndarray] = {}
        self.labels = np.concatenate(
            [self._load(i, "labels.npy") for i in range(len(shards))]
        ) if shards else np.zeros(0, dtype=np.int64)

    def _load(self, shard: int, name: str, mmap_mode: str | None = None) -> np.ndarray:
        """One of the cache's arrays, checked against its recorded CRC-32; a missing,
        cut short or changed file is a clear error."""
        path = self._folders[shard] / name
        try:
            arr = np.load(path, mmap_mode=mmap_mode)
        except (OSError, ValueError, EOFError) as e:
            raise CacheError(
                f"the cache at {self.path} is damaged: {path.relative_to(self.path)} is "
                f"missing or cut short ({type(e).__name__}: {e}); delete the folder and "
                "extract again (or run with --overwrite)") from None
        want = self._crcs[shard].get(name)
        if want is not None and data_crc32(arr) != want:
            raise CacheError(
                f"the cache at {self.path} is damaged: {path.relative_to(self.path)} does not "
                "match the checksum recorded when it was extracted (its contents changed "
                "since); delete the folder and extract again (or run with --overwrite)")
        return arr

    def verify(self) -> int:
        """Read every array of the cache once, checking it against its CRC-32 (what a
        process otherwise does on its first read of each). Returns the arrays checked.

        Raises:
            CacheError: a file is missing, cut short or changed since extraction.
        """
        for i in range(len(self._folders)):
            for layer in self.layers:
                self._shard(i, layer)
        return len(self._folders) * (len(self.layers) + 1)

    # -- description -----------------------------------------------------------------
    @property
    def layers(self) -> list[str]:
        return list(self.manifest["layers"])

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["classes"])

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.manifest["num_prefix_tokens"])

    def token_shape(self, layer: str) -> tuple[int, int]:
        n, d = self.manifest["token_shapes"][layer]
        return int(n), int(d)

    def __len__(self) -> int:
        return int(self.manifest["num_samples"])

    def nbytes(self) -> int:
        """Bytes of token arrays on disk."""
        return sum(
            (f / _layer_file(layer)).stat().st_size
            for f in self._folders
            for layer in self.layers
        )

    # -- reading -----------------------------------------------------------------------
    def _shard(self, i: int, layer: str) -> np.ndarray:
        key = (i, layer)
        if key not in self._mmaps:
            if layer not in self.manifest["layers"]:
                raise CacheError(f"layer {layer!r} is not in the cache at {self.path}; "
                                 f"it has {', '.join(self.layers)}")
            self._mmaps[key] = self._load(i, _layer_file(layer), mmap_mode="r")
        return self._mmaps[key]

    def get_numpy(self, layer: str, indices: Sequence[int] | np.ndarray,
                  out: np.ndarray | None = None) -> np.ndarray:
        """Tokens ``(len(indices), N, D)`` of ``layer`` for the given samples, in that order,
        written into ``out`` when given (an array of that shape in the cache's dtype)."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise CacheError(f"sample index out of range for a cache of {len(self)} samples")
        n, d = self.token_shape(layer)
        shape, dtype = (idx.size, n, d), np.dtype(self.manifest["dtype"])
        if out is None:
            out = np.empty(shape, dtype=dtype)
        elif out.shape != shape or out.dtype != dtype:
            raise CacheError(f"out must be {shape} {dtype}, got {out.shape} {out.dtype}")
        shard_of = np.searchsorted(self._starts, idx, side="right") - 1
        for s in np.unique(shard_of):
            sel = np.nonzero(shard_of == s)[0]
            local = idx[sel] - self._starts[s]
            rows = self._shard(int(s), layer)
            if sel[-1] - sel[0] + 1 == sel.size:  # a run of out's rows (sorted indices):
                # read straight into it (mode="clip": unbuffered; the indices are checked)
                np.take(rows, local, axis=0, out=out[sel[0]:sel[-1] + 1], mode="clip")
            else:
                out[sel] = rows[local]  # reads only these rows
        return out

    def get(
        self,
        layer: str,
        indices: Sequence[int] | np.ndarray,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Like :meth:`get_numpy`, as a tensor converted to ``dtype`` for computation."""
        arr = self.get_numpy(layer, indices)
        return torch.from_numpy(arr).to(device=device, dtype=dtype)

    def load(self, layer: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Every sample's tokens of one layer."""
        return self.get(layer, np.arange(len(self)), dtype=dtype)
