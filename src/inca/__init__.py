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
"""

from __future__ import annotations

from typing import Any

from inca._version import __version__
from inca.backbones import Backbone, Preprocessing, create_backbone, from_module, list_backbones
from inca.errors import InCAError


def fit(*args: Any, **kwargs: Any):
    """Train a bank of adapters and return the selected task (see :func:`inca.training.fit`)."""
    from inca.training import fit as _fit

    return _fit(*args, **kwargs)


def load_task(*args: Any, **kwargs: Any):
    """Load a saved task (see :func:`inca.runtime.load_task`)."""
    from inca.runtime import load_task as _load

    return _load(*args, **kwargs)


__all__ = [
    "Backbone",
    "InCAError",
    "Preprocessing",
    "__version__",
    "create_backbone",
    "fit",
    "from_module",
    "list_backbones",
    "load_task",
]
