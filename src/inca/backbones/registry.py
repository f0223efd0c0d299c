"""One factory and string registry for every backbone source (like timm's create_model)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from inca.backbones.base import Backbone
from inca.errors import BackboneError


@dataclass(frozen=True)
class _Entry:
    factory: Callable[..., Backbone]
    description: str
    prefix: bool  # a source taking "<prefix>:<name>" rather than one fixed model


_REGISTRY: dict[str, _Entry] = {}


def register_backbone(
    name: str, factory: Callable[..., Backbone], description: str = "", *, prefix: bool = False
) -> None:
    """Register a bundled backbone (``name``) or a source of many (``prefix=True``)."""
    _REGISTRY[name] = _Entry(factory, description, prefix)


def list_backbones() -> list[dict[str, Any]]:
    """Registered names and sources, each with a description and whether it needs internet."""
    return [
        {"name": f"{n}:<name>" if e.prefix else n, "description": e.description}
        for n, e in _REGISTRY.items()
    ]


def create_backbone(
    spec: str,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **kwargs: Any,
) -> Backbone:
    """Create a frozen backbone from a string.

    Args:
        spec: a bundled name (``"dinov2_vits14"``, ``"mobilenet_v2"``) or
            ``"timm:<name>"``, ``"hf:<id-or-path>"``, ``"torchvision:<name>"``.
        device: where to put it (CPU by default).
        dtype: its parameter dtype (float32 by default).
        **kwargs: passed to the source (``pretrained``, ``input_size``, model arguments).

    Example:
        >>> import inca
        >>> bb = inca.create_backbone("timm:vit_tiny_patch16_224", pretrained=False,
        ...                           input_size=32, patch_size=8, depth=2)
        >>> bb.layers
        ['blocks.0', 'blocks.1']
    """
    prefix, sep, rest = spec.partition(":")
    if sep and prefix in _REGISTRY and _REGISTRY[prefix].prefix:
        if not rest:
            raise BackboneError(f"{spec!r}: give a model name after '{prefix}:'")
        backbone = _REGISTRY[prefix].factory(rest, **kwargs)
    elif spec in _REGISTRY and not _REGISTRY[spec].prefix:
        kwargs.pop("pretrained", None)  # bundled weights are always loaded
        backbone = _REGISTRY[spec].factory(**kwargs)
    else:
        names = ", ".join(e["name"] for e in list_backbones())
        raise BackboneError(f"unknown backbone {spec!r}; choose one of: {names}")
    if device is not None or dtype is not None:
        backbone.to(device=device, dtype=dtype)
    return backbone
