"""The backbone of a task: created again from the record in ``task.json``, and checked.

A task records its backbone's weights fingerprint and preprocessing, and how to create it
again (its spec with local paths absolute, or hub id and revision; whether pretrained
weights or a local checkpoint were used). :func:`task_backbone` creates it (reading only
local files when the record says so) and :func:`check_backbone` refuses other weights.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

from inca._precision import resolve_device
from inca.backbones.base import Backbone
from inca.errors import BackboneError
from inca.task.schema import MAX_INPUT_SIZE, TaskError

# What a task file may pass to create_backbone (a task may come from anywhere: an open-ended
# argument let an edited task.json build a 100,000-block model before any check). Each
# argument is (kind, low, high). The arguments inca records itself come first; the model
# arguments of a source are those its tiny test models use, each bounded by the largest
# real models.
_ARGS: dict[str, tuple[type, float, float]] = {
    "pretrained": (bool, 0, 1), "input_size": (int, 1, MAX_INPUT_SIZE),
    "checkpoint_path": (str, 1, 4096), "revision": (str, 1, 256)}
_MODEL_ARGS: dict[str, dict[str, tuple[type, float, float]]] = {
    "timm": {"patch_size": (int, 1, 64), "embed_dim": (int, 1, 4096), "depth": (int, 1, 64),
             "num_heads": (int, 1, 128), "img_size": (int, 1, MAX_INPUT_SIZE),
             "mlp_ratio": (float, 0, 16), "reg_tokens": (int, 0, 64),
             "class_token": (bool, 0, 1), "global_pool": (str, 0, 16)},
    "torchvision": {"width_mult": (float, 0, 4)},
}


def check_backbone(info: dict[str, Any], backbone: Backbone, what: str) -> None:
    """Refuse a backbone whose weights or preprocessing differ from ``info``'s."""
    problems = []
    if info.get("fingerprint") != backbone.fingerprint():
        problems.append(f"weights fingerprint {backbone.fingerprint()} != "
                        f"{info.get('fingerprint')} it was trained with")
    if info.get("preprocessing") and info["preprocessing"] != backbone.preprocessing.to_dict():
        problems.append(f"preprocessing {backbone.preprocessing.to_dict()} != "
                        f"{info['preprocessing']}")
    if problems:
        # what the records say of the weights' origin, where they differ
        was, now = info.get("source") or {}, backbone.describe().get("source") or {}
        problems += [f"{key} {now.get(key)!r} != {was.get(key)!r} it was trained with"
                     for key in ("pretrained", "checkpoint_path", "revision", "hub_id")
                     if was and now and was.get(key) != now.get(key)]
        name = info.get("name")
        head = (f"{what} does not fit backbone {name!r} as it is now (trained on other "
                "weights of the same name)" if name == backbone.name else
                f"{what} was trained on backbone {name!r} and does not fit {backbone.name!r}")
        raise TaskError(f"{head}: " + "; ".join(problems)
                        + f". Load it with the backbone it was trained on ({name}).")


def task_backbone(info: dict[str, Any], backbone: Backbone | str | None = None, *,
                  device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                  what: str = "this task", **backbone_kwargs: Any) -> Backbone:
    """The backbone for a task recorded as ``info`` (``TaskFiles.backbone_info``), checked.

    A given ``backbone`` is checked, then moved to ``device``/``dtype`` when given. A spec
    (a string) is created at the task's input size; without one, the backbone recorded in
    ``info`` is created again (see :func:`inca.load_task`). Either goes to ``device``
    (``"auto"`` by default) and is checked at once, before anything uses it.

    Raises:
        TaskError: it cannot be created, or its weights fingerprint or preprocessing differ
            from ``info``'s.
    """
    if isinstance(backbone, Backbone):
        check_backbone(info, backbone, what=what)
        if device is not None or dtype is not None:
            backbone.to(device=None if device is None else resolve_device(device),
                        dtype=dtype)
        return backbone
    if isinstance(backbone, str):
        spec, offline = backbone, False
        backbone_kwargs.setdefault("input_size", info["preprocessing"]["input_size"])
    else:
        spec, offline, backbone_kwargs = _recorded(info, what, backbone_kwargs)
    from inca.backbones import create_backbone
    from inca.backbones._hub import offline_mode

    # Offline as recorded: timm and transformers read their local cache only, never the
    # network (without huggingface_hub installed, nothing could download anyway).
    offline = offline and importlib.util.find_spec("huggingface_hub") is not None
    try:
        with offline_mode(offline):
            created = create_backbone(spec, device=resolve_device(device), dtype=dtype,
                                      **backbone_kwargs)
    except BackboneError as e:
        how = " (from local files only, as recorded)" if offline else ""
        raise TaskError(f"{what}: cannot create its backbone {spec!r}{how}: {e}. Pass the "
                        "backbone it was trained on (backbone=..., or --backbone)") from e
    check_backbone(info, created, what=what)
    return created


def _recorded(info: dict[str, Any], what: str, overrides: dict[str, Any]
              ) -> tuple[str, bool, dict[str, Any]]:
    """``(spec, offline, kwargs)`` that create the backbone ``info`` records."""
    source = info.get("source")
    if source is None:  # saved before inca recorded sources, or a module it cannot rebuild
        return info["name"], False, {
            "input_size": info["preprocessing"]["input_size"], **overrides}
    if source.get("unrecorded") and not overrides:
        raise TaskError(
            f"{what}: its backbone {info['name']!r} was created with arguments a task file "
            f"cannot hold ({', '.join(map(str, source['unrecorded']))}); pass the backbone "
            "(backbone=..., or --backbone)")
    _check_kwargs(source["spec"], source["kwargs"], overrides, what)
    spec, kwargs = source["spec"], {**source["kwargs"], **overrides}
    missing = [str(p) for p in (spec.partition(":")[2], kwargs.get("checkpoint_path"))
               if p and Path(str(p)).is_absolute() and not Path(str(p)).exists()]
    if missing:
        raise TaskError(
            f"{what}: its backbone was created from {missing[0]}, which does not exist on "
            "this machine; pass the same weights from where they are here (backbone="
            "'hf:<folder>' or a Backbone; --backbone, --checkpoint)")
    return spec, bool(source.get("offline")), kwargs


def _check_kwargs(spec: str, kwargs: dict[str, Any], overrides: dict[str, Any],
                  what: str) -> None:
    """Refuse, before anything is created, a recorded argument that is not allowed (or out
    of its bounds) for the spec's source; the caller's own ``overrides`` are trusted."""
    allowed = {**_ARGS, **_MODEL_ARGS.get(spec.partition(":")[0], {})}
    fix = ("remove it from task.json, pass it yourself (load_task(path, {key}=...)), or "
           "pass the backbone it was trained on (backbone=..., or --backbone)")
    for key, value in kwargs.items():
        if key in overrides:
            continue
        field = f"backbone.source.kwargs.{key}"
        if key not in allowed:
            raise TaskError(
                f"{what}: task.json's {field} is not an argument a task file may pass to "
                f"create backbone {spec!r} (allowed: {', '.join(sorted(allowed))}); "
                + fix.format(key=key))
        kind, low, high = allowed[key]
        size = len(value) if isinstance(value, str) else value
        fits = (isinstance(value, kind) or (kind is float and isinstance(value, int))) and (
            kind is bool or not isinstance(value, bool)) and (
            kind is bool or low <= size <= high)
        if not fits:
            bound = ("true or false" if kind is bool else
                     f"a string of {low:g} to {high:g} characters" if kind is str else
                     f"{'an integer' if kind is int else 'a number'} in [{low:g}, {high:g}]")
            raise TaskError(f"{what}: task.json's {field} must be {bound}, got "
                            f"{str(value)[:40]!r}; " + fix.format(key=key))
