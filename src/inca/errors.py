"""Exceptions raised for user-facing failures.

Every error a user can cause derives from :class:`InCAError`; its message names the cause
and the fix. The CLI prints the message without a traceback.
"""

from __future__ import annotations


class InCAError(Exception):
    """Base class of inca's user-facing errors."""


class BackboneError(InCAError):
    """A backbone cannot be created, or a request to it is invalid."""


class DataError(InCAError):
    """A data set cannot be read, or its contents are invalid."""


class CacheError(InCAError):
    """An activation cache is missing, incomplete, or made by another backbone/preprocessing."""


class AdapterError(InCAError):
    """An adapter cannot be created, or its config or input is invalid."""


class AssetError(InCAError):
    """An offline asset (bundled weights or data) is not installed."""


class StorageError(InCAError):
    """A file cannot be written (disk full, read-only, permission) or a folder is in use."""


def user_message(error: BaseException) -> str:
    """The text to show for ``error``: its message, without the traceback that a PyTorch
    DataLoader worker wraps around an error raised while it reads data."""
    text = str(error)
    if text.startswith("Caught ") and "Original Traceback" in text:
        lines = text.rstrip().splitlines()
        head = f"{type(error).__module__}.{type(error).__qualname__}: "
        for i in range(len(lines) - 1, -1, -1):  # the original error is the last entry
            if lines[i].startswith(head):
                return "\n".join(lines[i:])[len(head):]
    return text
