"""Hints for user-facing errors: the install command of a missing optional extra, and the
close match of a misspelt name.

Every import of an optional dependency goes through :func:`require`, so a missing one says
which ``pip install "inca[<extra>]"`` brings it, instead of a bare ``ModuleNotFoundError``.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Iterable
from types import ModuleType

from inca.errors import MissingDependencyError

# The extra of pyproject.toml that installs each optional top-level module.
EXTRAS: dict[str, str] = {
    "timm": "timm",
    "transformers": "hf",
    "datasets": "hf",
    "fastapi": "serve",
    "uvicorn": "serve",
    "multipart": "serve",
    "python_multipart": "serve",
    "httpx": "serve",
    "peft": "baselines",
    "sklearn": "offline",
    "onnx": "offline",
    "onnxruntime": "offline",
    "onnxscript": "export",
}


def install_hint(module: str, extra: str | None = None) -> str:
    """``pip install "inca[<extra>]"`` for ``module`` (its top-level package)."""
    extra = extra or EXTRAS.get(module.split(".")[0])
    return f'pip install "inca[{extra}]"' if extra else f"pip install {module.split('.')[0]}"


def require(module: str, extra: str | None = None, *, purpose: str | None = None) -> ModuleType:
    """Import ``module``, or raise :class:`MissingDependencyError` naming the install command.

    Args:
        module: the module to import, e.g. ``"timm"`` or ``"transformers"``.
        extra: the inca extra that installs it (default: looked up in :data:`EXTRAS`).
        purpose: what needs it, for the message (``"timm backbones"``).

    Example:
        >>> from inca._hints import require
        >>> require("json").__name__
        'json'
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        top = module.split(".")[0]
        if e.name is not None and e.name.split(".")[0] not in (top, module):
            raise  # the module is there but one of its own imports failed: not ours to name
        why = f" (needed for {purpose})" if purpose else ""
        raise MissingDependencyError(
            f"{top} is not installed{why}: {install_hint(module, extra)}"
        ) from e


def did_you_mean(name: str, choices: Iterable[str], n: int = 3) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices`` to ``name``, or ``""``.

    Matching ignores case and treats ``-`` and ``_`` alike, so ``fashion_mnist`` finds
    ``fashion-mnist`` and ``dinov2_vits16`` finds ``dinov2_vits14``.

    Example:
        >>> did_you_mean("fashion_mnist", ["digits", "fashion-mnist"])
        " (did you mean 'fashion-mnist'?)"
    """
    choices = [str(c) for c in choices]
    by_key: dict[str, str] = {}
    for c in choices:
        by_key.setdefault(_key(c), c)
    found = difflib.get_close_matches(_key(name), list(by_key), n=n, cutoff=0.75)
    if not found:
        return ""
    names = " or ".join(repr(by_key[f]) for f in found)
    return f" (did you mean {names}?)"


def _key(text: str) -> str:
    return text.lower().replace("-", "_")


__all__ = ["EXTRAS", "MissingDependencyError", "did_you_mean", "install_hint", "require"]
