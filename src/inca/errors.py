"""Exceptions raised for user-facing failures, all of them in this one module.

Every error a user can cause derives from :class:`InCAError`; its message names the cause
and the fix. The CLI prints the message without a traceback.
"""

from __future__ import annotations

import copy


class InCAError(Exception):
    """Base class of inca's user-facing errors."""


class BackboneError(InCAError):
    """A backbone cannot be created, or a request to it is invalid."""


class DataError(InCAError):
    """A data set cannot be read, or its contents are invalid."""


class CacheError(InCAError):
    """An activation cache is missing, incomplete, or made by another backbone/preprocessing."""


class CacheMismatchError(CacheError):
    """A folder holds a cache made differently (another backbone, data, layers, ...) or
    files that are not a cache: what ``overwrite=True`` (``--overwrite``) replaces."""


class AdapterError(InCAError):
    """An adapter cannot be created, or its config or input is invalid."""


class AssetError(InCAError):
    """An offline asset (bundled weights or data) is not installed."""


class StorageError(InCAError):
    """A file cannot be written (disk full, read-only, permission) or a folder is in use."""


class ConfigError(InCAError):
    """A configuration value is invalid (of a fit, a comparison, a server)."""


class TrainingError(InCAError):
    """Training cannot go on (e.g. the loss became NaN)."""


class DistributedError(InCAError):
    """The process group cannot be joined, or a rank failed."""


class ServerConfigError(ConfigError):
    """The service's settings are invalid (an empty API key, a non-positive limit, ...)."""


class MissingDependencyError(InCAError, ImportError):
    """An optional dependency is not installed; the message names the install command.

    Also an :class:`ImportError`, so code that falls back when a module is missing keeps
    working.
    """


class ImageError(DataError):
    """An image cannot be read: not an image, truncated, corrupt, or too large."""

    def with_hint(self, hint: str) -> ImageError:
        """The same error (same type and attributes) whose message ends with ``hint``."""
        new = copy.copy(self)
        new.args = (f"{self}. {hint}",)
        return new


class ImageTooLargeError(ImageError):
    """An image has more pixels than allowed (a guard against decompression bombs).

    Attributes:
        name: the image (file name or label).
        size: ``(width, height)`` from its header; ``None`` when Pillow refused it first.
        pixels: its pixel count (``None`` when unknown).
        limit: the bound it is over.
    """

    def __init__(self, message: str, *, name: str = "", size: tuple[int, int] | None = None,
                 pixels: int | None = None, limit: int | None = None) -> None:
        super().__init__(message)
        self.name, self.size, self.pixels, self.limit = name, size, pixels, limit


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


class TaskError(InCAError):
    """A task file is missing, malformed, or does not fit the backbone."""
