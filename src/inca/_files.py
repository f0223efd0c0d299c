"""Files inca writes: atomic replacement, strict JSON, folder locks, clear disk errors.

Every file is written to a hidden temporary name beside its target, flushed to disk and
renamed into place, so a reader (or a process resuming after a kill) sees the old file or
the new one, never half of one; it gets the mode of an ordinary new file (0666 less the
umask, so 0644 usually). A temporary file left by a kill is removed by the next
writer that holds the folder's lock. Disk-full, read-only and permission errors become a
:class:`~inca.errors.StorageError` naming the path and the fix instead of a raw ``OSError``.
"""

from __future__ import annotations

import errno
import json
import math
import os
import secrets
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from inca.errors import StorageError

if TYPE_CHECKING:
    import numpy as np

TMP_SUFFIX = ".tmp"
_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def human_bytes(n: float) -> str:
    """A size as people read it: ``512 B``, ``3.5 KiB``, ``97.0 MiB``, ``31.2 GiB``.

    Example:
        >>> human_bytes(97 * 2**20), human_bytes(31.2 * 2**30), human_bytes(512)
        ('97.0 MiB', '31.2 GiB', '512 B')
    """
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def folder_bytes(folder: Path | str) -> int:
    """Bytes of the files under ``folder`` (0 when it does not exist)."""
    folder = Path(folder)
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) \
        if folder.is_dir() else 0


def storage_error(e: OSError, path: Path | str) -> StorageError | None:
    """The :class:`StorageError` an ``OSError`` stands for, or ``None`` for other errors."""
    # numpy's tofile reports a short write as "N requested and M written", without errno
    short_write = e.errno is None and "requested and" in str(e) and "written" in str(e)
    if e.errno in _FULL or short_write:
        return StorageError(f"no space left on the device holding {path}: free some space "
                            "or write to another folder")
    if e.errno == errno.EROFS:
        return StorageError(f"{path} is on a read-only file system: write to another folder")
    if e.errno in (errno.ENOTDIR, errno.EEXIST):
        return StorageError(f"{path} cannot be created: part of it is a file, not a folder; "
                            "choose another folder")
    if e.errno in (errno.EACCES, errno.EPERM):
        return StorageError(f"permission denied writing {path}: make it writable or write "
                            "to another folder")
    return None


@contextmanager
def disk_errors(path: Path | str) -> Iterator[None]:
    """Turn disk-full, read-only and permission errors inside into a :class:`StorageError`."""
    try:
        yield
    except OSError as e:
        err = storage_error(e, path)
        if err is None:
            raise
        raise err from e


def atomic_write(path: Path | str, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` through ``write(file)`` so that readers see the old file or the new.

    Raises:
        StorageError: the disk is full, read-only, or the folder is not writable.
    """
    path = Path(path)
    with disk_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
        try:
            with os.fdopen(fd, "wb") as f:
                # mkstemp makes it 0600, a mode the rename would carry to `path`, hiding it
                # from other users: give it an ordinary new file's mode (0666 less umask)
                os.chmod(tmp, 0o666 & ~_umask())
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise


def _umask() -> int:
    """The process's umask, read without changing it where the OS shows it (Linux)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and put back at once
    os.umask(mask)
    return mask


def make_new_dir(parent: Path | str, prefix: str) -> Path:
    """A new folder ``<parent>/<prefix><random>`` with the mode of an ordinary new folder
    (0777 less the umask: 0755 usually), where ``tempfile.mkdtemp`` would make it 0700."""
    for _ in range(100):
        folder = Path(parent) / f"{prefix}{secrets.token_hex(6)}"
        try:
            folder.mkdir(mode=0o777)
            return folder
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no unused temporary folder name", str(parent))


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda f: f.write(data))


def strict_json(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float replaced by ``None``: valid JSON, which has
    no NaN (Python's ``json`` would write a bare ``NaN`` that other readers reject)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def atomic_write_json(path: Path | str, obj: Any) -> None:
    """Write ``obj`` as strict JSON (non-finite floats as ``null``) atomically."""
    text = json.dumps(strict_json(obj), indent=2, allow_nan=False) + "\n"
    atomic_write_bytes(path, text.encode())


def atomic_save_npy(path: Path | str, array: np.ndarray) -> None:
    """``np.save`` atomically (see :func:`atomic_write`)."""
    import numpy as np  # here: the CLI imports this module to start fast

    atomic_write(path, lambda f: np.save(f, array))


def remove_stale_tmp(folder: Path | str) -> int:
    """Delete the temporary files an interrupted writer left under ``folder``; call it only
    while holding the folder's :class:`FolderLock`. Returns how many were removed."""
    removed = 0
    for p in Path(folder).rglob(f".*{TMP_SUFFIX}"):
        if p.is_file():
            p.unlink(missing_ok=True)
            removed += 1
    return removed


def check_writable(folder: Path | str) -> None:
    """Create ``folder`` if needed and check that a file can be written there, before any
    long computation whose result would go there.

    Raises:
        StorageError: the folder cannot be created or written.
    """
    folder = Path(folder)
    with disk_errors(folder):
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".inca-write-check.", suffix=TMP_SUFFIX)
        os.close(fd)
        os.unlink(tmp)


class FolderLock:
    """An exclusive lock on a folder, held by one process at a time (``with`` block).

    The lock is a file beside the folder (``.<name>.lock``), so it survives the folder
    being deleted and re-created under it. It is an OS lock: a process killed with
    ``kill -9`` releases it, and no stale lock ever needs deleting by hand.

    Raises:
        StorageError: another process holds the lock (its PID is named).
    """

    def __init__(self, folder: Path | str, what: str = "folder") -> None:
        self.folder = Path(folder)
        self.path = self.folder.parent / f".{self.folder.name}.lock"
        self.what = what
        self._fd: int | None = None

    def __enter__(self) -> FolderLock:
        with disk_errors(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            _lock(fd)
        except OSError as e:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StorageError(
                f"the {self.what} {self.folder} is in use by another inca process (pid "
                f"{holder}): wait for it to finish, or use another folder") from e
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            _unlock(self._fd)
            os.close(self._fd)
            self._fd = None


try:
    import fcntl

    # POSIX record locks, not flock: forked children (data-loading workers) don't
    # inherit them, so a writer killed with kill -9 frees its folder at once.
    def _lock(fd: int) -> None:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def _unlock(fd: int) -> None:
        fcntl.lockf(fd, fcntl.LOCK_UN)

except ImportError:  # Windows
    import msvcrt

    def _lock(fd: int) -> None:
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)  # type: ignore[attr-defined]

    def _unlock(fd: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)  # type: ignore[attr-defined]
