"""timm backbones through ``forward_intermediates`` (ViTs and CNNs alike)."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from inca.backbones.base import Backbone, Preprocessing
from inca.errors import BackboneError


class TimmBackbone(Backbone):
    """A timm model; layers are the modules named in its ``feature_info``.

    ``forward_intermediates(..., stop_early=True)`` runs only up to the deepest index asked
    for. ViT outputs come back as (patch tokens, prefix tokens) and are re-joined as
    ``[prefix, patches]`` so every layer has the same ``(B, N, D)`` layout as the model's
    own residual stream.
    """

    def __init__(self, model: nn.Module, *, name: str, input_size: int | None = None) -> None:
        super().__init__()
        if not hasattr(model, "forward_intermediates"):
            raise BackboneError(
                f"{name}: this timm model has no forward_intermediates(); "
                "use a model that has it or wrap it with inca.from_module(...)"
            )
        self.model = model
        self.name = name
        self.layers = [fi["module"] for fi in model.feature_info]
        self.embed_dims = {fi["module"]: int(fi["num_chs"]) for fi in model.feature_info}
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0) or 0)
        params = inspect.signature(model.forward_intermediates).parameters
        self._is_tokens = "return_prefix_tokens" in params
        self.preprocessing = _timm_preprocessing(model, input_size)
        self.freeze()

    def _extract(self, x: torch.Tensor, layers: list[str]) -> dict[str, torch.Tensor]:
        indices = [self.layers.index(n) for n in layers]
        kwargs: dict[str, Any] = dict(indices=indices, stop_early=True, intermediates_only=True)
        if self._is_tokens:
            kwargs.update(return_prefix_tokens=self.num_prefix_tokens > 0, output_fmt="NLC")
        outs = self.model.forward_intermediates(x, **kwargs)
        result = {}
        for name, out in zip(layers, outs, strict=True):
            if isinstance(out, tuple):  # (patches (B, L, D), prefix (B, P, D))
                out = torch.cat([out[1], out[0]], dim=1)
            result[name] = out
        return result

    def _forward_plain(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _timm_preprocessing(model: nn.Module, input_size: int | None) -> Preprocessing:
    import timm.data

    cfg = timm.data.resolve_data_config({}, model=model)
    size = input_size or int(cfg["input_size"][-1])
    interp = cfg.get("interpolation", "bicubic")
    return Preprocessing(
        input_size=size,
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        interpolation=interp if interp in ("bilinear", "bicubic", "nearest") else "bicubic",
    )


def create_timm_backbone(
    model_name: str,
    *,
    pretrained: bool = True,
    checkpoint_path: str | None = None,
    input_size: int | None = None,
    **model_kwargs: Any,
) -> TimmBackbone:
    """Create a timm model without its classifier and wrap it.

    Args:
        model_name: any name from ``timm.list_models()``.
        pretrained: load the hub weights (needs internet, or a populated HF cache).
        checkpoint_path: load weights from this local file instead of the hub.
        input_size: image side to use; ViTs are built for it (``img_size``).
        **model_kwargs: passed to ``timm.create_model`` (e.g. ``depth=2`` for tiny tests).
    """
    try:
        import timm
    except ImportError as e:  # pragma: no cover - optional extra
        raise BackboneError("timm backbones need timm: pip install 'inca[timm]'") from e
    if model_name not in timm.list_models() and not timm.is_model(model_name):
        raise BackboneError(
            f"timm has no model {model_name!r}; see timm.list_models('*pattern*')"
        )
    kwargs: dict[str, Any] = dict(num_classes=0, **model_kwargs)
    if input_size is not None and _accepts_img_size(model_name):
        kwargs.setdefault("img_size", input_size)
    use_hub = pretrained and checkpoint_path is None
    try:
        model = timm.create_model(model_name, pretrained=use_hub, **kwargs)
    except Exception as e:  # network, hub or shape failures all surface here
        raise BackboneError(
            f"could not create timm:{model_name} (pretrained={use_hub}): {e}. Offline? pass "
            "checkpoint_path=<local file>, or use a bundled backbone (inca backbones)."
        ) from e
    if checkpoint_path is not None:
        _load_checkpoint(model, checkpoint_path)
    return TimmBackbone(model, name=f"timm:{model_name}", input_size=input_size)


def _accepts_img_size(model_name: str) -> bool:
    import timm

    return any(k in model_name for k in ("vit", "deit", "eva", "beit", "dinov2")) and bool(
        timm.is_model(model_name)
    )


def _load_checkpoint(model: nn.Module, path: str) -> None:
    from timm.models import load_checkpoint

    try:
        load_checkpoint(model, path, strict=False)
    except FileNotFoundError as e:
        raise BackboneError(f"checkpoint file not found: {path}") from e
    except Exception as e:
        raise BackboneError(f"could not load checkpoint {path}: {e}") from e
