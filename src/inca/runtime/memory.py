"""Memory freed after large requests handed back to the OS (glibc ``malloc_trim``)."""

from __future__ import annotations

import ctypes
import functools
import sys
import threading
from typing import Any


class MemoryReleaser:
    """Hands memory freed after large requests back to the OS, at most once per
    ``every_bytes`` of decoded images (small requests never pay for it).

    glibc keeps freed heap pages for reuse, so a process that once decoded a few large
    images stays that large; ``malloc_trim(0)`` returns them. Elsewhere it does nothing.

    Attributes:
        trims: how many times memory was handed back.
    """

    def __init__(self, every_bytes: int) -> None:
        self.every_bytes = every_bytes
        self.trims = 0
        self._pending = 0
        self._lock = threading.Lock()

    def decoded(self, nbytes: int) -> None:
        """Count ``nbytes`` of decoded (and since dropped) pixels; trim once enough were."""
        if self.every_bytes <= 0:
            return
        with self._lock:
            self._pending += nbytes
            if self._pending < self.every_bytes:
                return
            self._pending = 0
            self.trims += 1
        _malloc_trim()


def _malloc_trim() -> bool:
    """glibc's ``malloc_trim(0)``; ``False`` (and nothing done) where there is none."""
    trim = _libc_malloc_trim()
    return bool(trim is not None and trim(0))


@functools.cache
def _libc_malloc_trim() -> Any:
    """glibc's ``malloc_trim`` (looked up once), or ``None`` (not Linux, or musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn

