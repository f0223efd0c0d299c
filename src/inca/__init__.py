"""inca: composable, parallel adaptation of frozen vision backbones (InCA, NeurIPS 2023).

One forward pass through a frozen backbone yields many layers' activations; small
cross-attention adapters read them, trained in parallel without backpropagating through
the backbone.
"""

from inca._version import __version__
from inca.backbones import Backbone, Preprocessing, create_backbone, from_module, list_backbones
from inca.errors import InCAError

__all__ = [
    "Backbone",
    "InCAError",
    "Preprocessing",
    "__version__",
    "create_backbone",
    "from_module",
    "list_backbones",
]
