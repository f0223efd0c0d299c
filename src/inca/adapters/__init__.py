"""Small heads over frozen layers' tokens: InCA, Open-InCA, linear probes; one registry.

Every adapter maps tokens ``(B, N, D)`` (several layers' for ``multilayer_linear``) to
logits ``(B, C)``, is created by :func:`create_adapter` from a kind name and typed config
fields, and saves as safetensors weights plus :meth:`Adapter.spec` JSON.
:class:`StackedInCA` and :class:`StackedLinear` run K adapters as one batched computation.

Example:
    >>> import torch
    >>> from inca.adapters import create_adapter, list_adapters
    >>> [a["name"] for a in list_adapters()]
    ['inca', 'linear', 'multilayer_linear', 'open_inca']
    >>> adapter = create_adapter("inca", embed_dim=384, num_classes=10, num_queries=1)
    >>> adapter(torch.randn(2, 257, 384)).shape
    torch.Size([2, 10])
"""

from inca.adapters.base import (
    Adapter,
    AdapterConfig,
    AdapterError,
    default_num_heads,
    ensemble_proba,
    member_input,
    parameter_report,
    pool_tokens,
)
from inca.adapters.inca import InCAAdapter, InCAConfig
from inca.adapters.linear import (
    LinearConfig,
    LinearProbe,
    MultiLayerLinearConfig,
    MultiLayerLinearProbe,
)
from inca.adapters.open_inca import OpenInCAAdapter, OpenInCAConfig
from inca.adapters.registry import (
    adapter_class,
    adapter_from_spec,
    create_adapter,
    list_adapters,
    register_adapter,
)
from inca.adapters.stacked import StackedInCA, StackedLinear

__all__ = [
    "Adapter",
    "AdapterConfig",
    "AdapterError",
    "InCAAdapter",
    "InCAConfig",
    "LinearConfig",
    "LinearProbe",
    "MultiLayerLinearConfig",
    "MultiLayerLinearProbe",
    "OpenInCAAdapter",
    "OpenInCAConfig",
    "StackedInCA",
    "StackedLinear",
    "adapter_class",
    "adapter_from_spec",
    "create_adapter",
    "default_num_heads",
    "ensemble_proba",
    "list_adapters",
    "member_input",
    "parameter_report",
    "pool_tokens",
    "register_adapter",
]
