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
