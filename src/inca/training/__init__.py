"""Parallel training of adapter banks, selection on validation, ensembling.

The names load on first use (``inca.training.FitConfig`` does not import the trainer).
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "AdapterBank": "inca.training.bank",
    "ConfigError": "inca.errors",
    "FitConfig": "inca.training.config",
    "FitReport": "inca.task",
    "MemberSpec": "inca.training.plan",
    "TrainingError": "inca.errors",
    "add_classes": "inca.training.incremental",
    "fit": "inca.training.fitting",
    "plan_members": "inca.training.plan",
    "train_bank": "inca.training.loop",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'inca.training' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)


def __dir__() -> list[str]:
    return __all__
