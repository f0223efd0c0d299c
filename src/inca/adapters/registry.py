"""One factory and string registry for every adapter kind (like timm's ``create_model``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch

from inca.adapters.base import Adapter, AdapterConfig, AdapterError

A = TypeVar("A", bound=type[Adapter])

_REGISTRY: dict[str, type[Adapter]] = {}


def register_adapter(kind: str) -> Callable[[A], A]:
    """Class decorator registering an :class:`Adapter` subclass under ``kind``."""

    def decorate(cls: A) -> A:
        if kind in _REGISTRY and _REGISTRY[kind] is not cls:
            raise AdapterError(f"adapter kind {kind!r} is already registered")
        cls.kind = kind
        _REGISTRY[kind] = cls
        return cls

    return decorate


def list_adapters() -> list[dict[str, Any]]:
    """Registered kinds (sorted), each with a one-line description and its config's defaults."""
    return [
        {
            "name": kind,
            "description": next(iter((cls.__doc__ or "").strip().splitlines()), ""),
            "config": _defaults(cls.config_class),
        }
        for kind, cls in sorted(_REGISTRY.items())
    ]


def _defaults(config_class: type[AdapterConfig]) -> dict[str, Any] | None:
    try:
        return config_class().to_dict()
    except (AdapterError, TypeError):  # a kind with required fields (multilayer_linear)
        return None


def adapter_class(kind: str) -> type[Adapter]:
    """The class registered under ``kind``."""
    if kind not in _REGISTRY:
        raise AdapterError(
            f"unknown adapter kind {kind!r}; choose one of: {', '.join(_REGISTRY)}"
        )
    return _REGISTRY[kind]


def create_adapter(
    kind: str,
    *,
    embed_dim: int,
    num_classes: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **cfg: Any,
) -> Adapter:
    """Create an adapter from its kind name and config fields.

    Args:
        kind: a registered kind: ``"inca"``, ``"open_inca"``, ``"linear"``,
            ``"multilayer_linear"`` (see :func:`list_adapters`).
        embed_dim: width ``D`` of the tokens it reads.
        num_classes: number of logits ``C``.
        device: where to create its parameters (CPU by default).
        dtype: its parameter dtype (float32 by default).
        **cfg: fields of the kind's config (e.g. :class:`~inca.adapters.InCAConfig`),
            or ``config=`` a ready config object.

    Example:
        >>> import torch
        >>> from inca.adapters import create_adapter
        >>> adapter = create_adapter("inca", embed_dim=384, num_classes=10)
        >>> adapter.config.num_heads
        4
        >>> adapter(torch.randn(2, 65, 384)).shape
        torch.Size([2, 10])
    """
    cls = adapter_class(kind)
    config = cfg.pop("config", None)
    if config is None:
        config = cls.config_class.from_dict(cfg)
    elif cfg:
        raise AdapterError("give either config= or config fields, not both")
    elif isinstance(config, Mapping):
        config = cls.config_class.from_dict(config)
    return cls(embed_dim, num_classes, config, device=device, dtype=dtype)


def adapter_from_spec(
    spec: Mapping[str, Any],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Adapter:
    """Rebuild an adapter (freshly initialized) from :meth:`Adapter.spec`'s output.

    Load the saved weights into it with ``load_state_dict``.
    """
    missing = {"kind", "embed_dim", "num_classes", "config"} - set(spec)
    if missing:
        raise AdapterError(f"adapter spec lacks {sorted(missing)}")
    return create_adapter(
        spec["kind"],
        embed_dim=int(spec["embed_dim"]),
        num_classes=int(spec["num_classes"]),
        device=device,
        dtype=dtype,
        config=dict(spec["config"]),
    )
