"""Serving: many tasks on one backbone pass (:class:`MultiTaskModel`), and the HTTP service.

The task itself (``Task``, ``load_task``, its folder format) is :mod:`inca.task`; the names
below it are re-exported here for code written before it moved. They load on first use
(``inca.runtime.config`` imports no torch, so ``inca serve --help`` stays quick).
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "MultiTaskModel": "inca.runtime.multitask",
    "Task": "inca.task",  # compatibility
    "TaskError": "inca.task",
    "TaskModule": "inca.task",
    "load_task": "inca.task",
}

__all__ = ["MultiTaskModel"]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'inca.runtime' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)


def __dir__() -> list[str]:
    return sorted(_WHERE)
