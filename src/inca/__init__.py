"""inca: composable, parallel adaptation of frozen vision backbones (InCA, NeurIPS 2023).

One forward pass through a frozen backbone yields many layers' activations; small
cross-attention adapters read them, trained in parallel without backpropagating through
the backbone; the best is selected on validation (or the top few ensembled).

Example:
    >>> import inca
    >>> from inca.data import load_dataset
    >>> backbone = inca.create_backbone("dinov2_vits14")  # doctest: +SKIP
    >>> task = inca.fit(backbone, load_dataset("fashion-mnist", limit=1000))  # doctest: +SKIP
    >>> task.predict(["shoe.png"]); task.save("runs/fmnist/task")  # doctest: +SKIP
    >>> task = inca.load_task("runs/fmnist/task")  # doctest: +SKIP
    >>> task.report.to_pandas()  # every adapter's validation accuracy  # doctest: +SKIP
    >>> task.push_to_hub("user/fmnist-inca")  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from inca._version import __version__
from inca.errors import InCAError

if TYPE_CHECKING:  # imported on first use (below), so `import inca` imports no torch
    from inca.backbones import (
        Backbone,
        Preprocessing,
        create_backbone,
        from_module,
        list_backbones,
    )
    from inca.runtime import MultiTaskModel
    from inca.task import FitReport, Task, TaskModule, load_task
    from inca.training import add_classes, fit

# name -> module: the real objects, imported on first access (PEP 562), so `inca.fit` *is*
# inca.training.fit: help() and inspect.signature() show its parameters and docstring.
_LAZY = {
    "Backbone": "inca.backbones",
    "Preprocessing": "inca.backbones",
    "create_backbone": "inca.backbones",
    "from_module": "inca.backbones",
    "list_backbones": "inca.backbones",
    "fit": "inca.training",
    "add_classes": "inca.training",
    "load_task": "inca.task",
    "Task": "inca.task",
    "TaskModule": "inca.task",
    "MultiTaskModel": "inca.runtime",
    "FitReport": "inca.task",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'inca' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "Backbone",
    "FitReport",
    "InCAError",
    "MultiTaskModel",
    "Preprocessing",
    "Task",
    "TaskModule",
    "__version__",
    "add_classes",
    "create_backbone",
    "fit",
    "from_module",
    "list_backbones",
    "load_task",
]
