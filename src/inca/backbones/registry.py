"""One factory and string registry for every backbone source (like timm's create_model)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
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
        if kwargs.get("checkpoint_path") is not None:
            raise BackboneError(f"{spec} loads its own bundled weights; a checkpoint "
                                "(--checkpoint) is for timm:<name> and torchvision:<name>")
        backbone = _REGISTRY[spec].factory(**kwargs)
    else:
        from inca._hints import did_you_mean

        names = ", ".join(e["name"] for e in list_backbones())
        hint = did_you_mean(spec, [n for n, e in _REGISTRY.items() if not e.prefix]) or (
            sep and did_you_mean(f"{prefix}:", [f"{n}:" for n, e in _REGISTRY.items()
                                                  if e.prefix]))
        raise BackboneError(f"unknown backbone {spec!r}{hint}; choose one of: {names}")
    backbone.source = source_record(spec, kwargs, backbone)
    if device is not None or dtype is not None:
        backbone.to(device=device, dtype=dtype)
    return backbone


def source_record(spec: str, kwargs: dict[str, Any], backbone: Backbone) -> dict[str, Any]:
    """How to create ``backbone`` again on another machine or from another folder, recorded
    in task files: ``create_backbone(record["spec"], **record["kwargs"])``.

    Local paths (an ``hf:`` folder, ``checkpoint_path``) are made absolute. ``offline`` says
    whether creating it again reads local files only (a bundled backbone, a local folder or
    checkpoint, or ``pretrained=False``); ``revision`` is the hub commit of transformers
    weights when known, and pins them on re-creation. Arguments that are not JSON are
    listed in ``unrecorded`` (such a backbone must be given to load the task).
    """
    prefix, sep, rest = spec.partition(":")
    local = not sep  # a bundled name: weights from an installed package
    if sep and Path(rest).expanduser().exists():
        rest, local = str(Path(rest).expanduser().resolve()), True
    kwargs = {k: str(Path(v).expanduser().resolve()) if _is_path(k, v) else v
              for k, v in kwargs.items()}
    if sep:
        kwargs.setdefault("pretrained", True)  # every source's default, recorded explicitly
    pretrained = bool(kwargs.get("pretrained", True))
    hub_id = revision = None
    if sep and pretrained and not local and not kwargs.get("checkpoint_path"):
        hub_id, revision = backbone.hub_weights()  # each source knows its own
        revision = kwargs.get("revision") or revision
        if revision:
            kwargs["revision"] = revision
    recorded = {k: v for k, v in kwargs.items() if _is_json(v)}
    return {
        "spec": f"{prefix}:{rest}" if sep else spec,
        "kwargs": recorded,
        "pretrained": pretrained,
        "checkpoint_path": kwargs.get("checkpoint_path"),
        "offline": local or not pretrained or bool(kwargs.get("checkpoint_path")),
        "hub_id": hub_id,
        "revision": revision,
        "unrecorded": sorted(set(kwargs) - set(recorded)),
    }


def _is_path(key: str, value: Any) -> bool:
    return isinstance(value, os.PathLike) or (
        isinstance(value, str) and key.endswith(("_path", "_dir")))


def _is_json(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True
