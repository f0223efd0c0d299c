"""timm backbones through ``forward_intermediates`` (ViTs and CNNs alike)."""

from __future__ import annotations

import inspect
import math
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from inca._hints import did_you_mean, require
from inca.backbones._hub import hub_offline, is_hub_error, offline_hint, offline_mode
from inca.backbones.base import Backbone, Preprocessing, seeded_init
from inca.errors import BackboneError


class TimmBackbone(Backbone):
    """A timm model; layers are the modules named in its ``feature_info``.

    ``forward_intermediates(..., stop_early=True)`` runs only up to the deepest index asked
    for. ViT outputs come back as (patch tokens, prefix tokens) and are re-joined as
    ``[prefix, patches]`` (without a copy: both are views of the block's output, see
    :func:`rejoin`) so every layer has the same ``(B, N, D)`` layout as the model's own
    residual stream.

    The token layout is read from the model's output, not assumed: on creation one blank
    image runs through the first layer, and ``num_prefix_tokens`` is the number of prefix
    tokens that output really carries. (A class-attention model such as CaiT or XCiT says
    ``num_prefix_tokens=1``, yet its blocks hold patch tokens only: its class token joins in
    the class-attention blocks after them. Taking its word would make a corner patch the
    "CLS" of a linear probe.) Every extraction checks its outputs against that layout.

    Attributes:
        token_layout: ``{"format", "prefix_tokens", "grid"}``: ``"tokens"`` (prefix tokens,
            then the patch grid row by row) or ``"feature map"`` (a CNN's ``(C, H, W)``,
            laid out as ``H*W`` tokens), the prefix count, and the first layer's patch grid
            ``[h, w]`` (a CNN's later stages are coarser).
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
        self._claimed_prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
        self.num_prefix_tokens = self._claimed_prefix
        params = inspect.signature(model.forward_intermediates).parameters
        self._is_tokens = "return_prefix_tokens" in params
        self.preprocessing = _timm_preprocessing(model, input_size)
        self.freeze()
        self.token_layout = self._probe_layout()
        self.num_prefix_tokens = self.token_layout["prefix_tokens"]

    def _runs_at(self, size: int) -> list[Any] | None:
        """The first and deepest layers' outputs on a blank image of ``size`` px, or
        ``None`` when the model does not run at that size (through every layer: some fail
        only in a late stage, e.g. a window that no longer divides the feature map)."""
        x = torch.zeros(1, 3, size, size, device=self.device, dtype=self.dtype)
        try:
            with torch.no_grad():
                return self._raw(x, sorted({0, len(self.layers) - 1}))
        except Exception:  # noqa: BLE001 - any failure means: not at this size
            return None

    def _probe_layout(self) -> dict[str, Any]:
        """The token layout of the model's real output on a blank image at the input size."""
        s = self.preprocessing.input_size
        outs = self._runs_at(s)
        if outs is None:  # a model built for one size, a window that does not divide ...
            stride = int(self.model.feature_info[-1].get("reduction", 0) or 0) or 16
            tried = sorted({k * stride for k in range(max(1, s // (2 * stride)),
                                                       2 * s // stride + 1)}, key=lambda v:
                           abs(v - s))[:8]
            works = sorted(v for v in tried if v != s and self._runs_at(v) is not None)
            native = _native_size(self.model)
            fix = (f"use --input-size {' or '.join(map(str, works[:4]))} (sizes it runs at "
                   f"here)" if works else
                   f"use --input-size {native} (input_size={native}), the size it was built "
                   "for" if native and native != s else "choose another size or model")
            raise BackboneError(f"{self.name} does not run on {s} px images (tried every "
                                f"layer on a blank image). Fix: {fix}.")
        out = outs[0]
        reduction = int(self.model.feature_info[0].get("reduction", 0) or 0)
        if isinstance(out, tuple):  # (patches (B, L, D), prefix (B, P, D))
            prefix, n = int(out[1].shape[1]), int(out[0].shape[1])
        elif out.ndim == 4:  # (B, C, H, W): a feature map, no prefix tokens
            return {"format": "feature map", "prefix_tokens": 0,
                    "grid": [int(out.shape[2]), int(out.shape[3])]}
        elif out.ndim == 3:  # (B, N, D) with the prefix (if any) inside
            n = int(out.shape[1])
            side = s // reduction if reduction else 0
            prefix = n - side * side if side and n >= side * side else -1
            if prefix < 0 or prefix > 16:
                raise BackboneError(
                    f"{self.name}: cannot tell its {n} tokens per image apart (prefix tokens vs "
                    "a patch grid); wrap it with inca.from_module(...) and give "
                    "num_prefix_tokens")
            n -= prefix
        else:
            raise BackboneError(f"{self.name}: unexpected layer output of shape "
                                f"{tuple(out.shape)}")
        grid = _grid(n, s, reduction)
        return {"format": "tokens", "prefix_tokens": prefix, "grid": grid}

    def _raw(self, x: torch.Tensor, indices: list[int]) -> list[Any]:
        kwargs: dict[str, Any] = dict(indices=indices, stop_early=True, intermediates_only=True)
        if self._is_tokens:
            kwargs.update(return_prefix_tokens=self._claimed_prefix > 0, output_fmt="NLC")
        return self.model.forward_intermediates(x, **kwargs)

    def hub_weights(self) -> tuple[str | None, str | None]:
        """The Hugging Face repo timm's pretrained config names (timm pins no commit)."""
        return (getattr(self.model, "pretrained_cfg", None) or {}).get("hf_hub_id"), None

    def _extract(self, x: torch.Tensor, layers: list[str]) -> dict[str, torch.Tensor]:
        outs = self._raw(x, [self.layers.index(n) for n in layers])
        result = {}
        for name, out in zip(layers, outs, strict=True):
            if isinstance(out, tuple):  # (patches (B, L, D), prefix (B, P, D))
                self._check(name, out[1].shape[1])
                out = rejoin(out[1], out[0])
            elif out.ndim == 4:
                self._check(name, 0)
            result[name] = out
        return result

    def _check(self, layer: str, prefix: int) -> None:
        if prefix != self.num_prefix_tokens:  # never read a patch as CLS, or CLS as a patch
            raise BackboneError(
                f"{self.name}: layer {layer} carries {prefix} prefix token(s), the first layer "
                f"{self.num_prefix_tokens}; inca needs one layout for every layer: ask for "
                "layers of one kind")

    def _forward_plain(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "token_layout": dict(self.token_layout)}


def rejoin(prefix: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
    """``[prefix, patches]`` along the tokens, without a copy when it can.

    timm's ``forward_intermediates`` slices each block's output ``(B, N, D)`` into two views
    of it; when they are the two adjacent views of one tensor, that tensor is returned as
    it is (the very memory, so the very values: no copy, no second layer held). Anything
    else is concatenated, and so is a pass with autograd (fine-tuning): the gradient of
    ``as_strided`` over a view would drop the part outside that view; and so is a traced
    pass (``torch.export``, ``torch.compile``), whose tensors have no storage to compare.
    """
    p, stride = prefix.shape[1], prefix.stride()
    if (not (prefix.requires_grad or patches.requires_grad)
            and not torch.compiler.is_compiling()  # tracing (export, compile): no storage
            and prefix.ndim == patches.ndim == 3 and prefix.dtype == patches.dtype
            and prefix.device == patches.device and stride == patches.stride()
            and prefix.shape[0::2] == patches.shape[0::2]
            and prefix.untyped_storage().data_ptr() == patches.untyped_storage().data_ptr()
            and patches.storage_offset() == prefix.storage_offset() + p * stride[1]):
        b, n, d = patches.shape
        return prefix.as_strided((b, p + n, d), stride, prefix.storage_offset())
    return torch.cat([prefix, patches], dim=1)


def _grid(n: int, size: int, reduction: int) -> list[int]:
    """The patch grid ``[h, w]`` of ``n`` patch tokens of a square image."""
    side = math.isqrt(n)
    if side * side == n:
        return [side, side]
    if reduction and n % max(size // reduction, 1) == 0:
        return [n // max(size // reduction, 1), max(size // reduction, 1)]
    return [n, 1]


def _native_size(model: nn.Module) -> int | None:
    size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size")
    return int(size[-1]) if size else None


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
        pretrained: load the hub weights (needs internet, or a populated HF cache). Offline
            (``HF_HUB_OFFLINE=1``, or the hub does not answer), weights missing from the
            cache fail at once with the fix, instead of after the hub's retries.
        checkpoint_path: load weights from this local file instead of the hub (as timm loads
            its own: a ``state_dict``, or a checkpoint holding one; a classifier is dropped,
            position embeddings are resized to ``input_size``).
        input_size: image side to use. A model whose class takes ``img_size`` (timm says so:
            its constructor's signature) is resized the way timm resizes it
            (``set_input_size``, or built with ``img_size``); others (CNNs) run on any size.
            A model that cannot run at this size is refused with the fix.
        **model_kwargs: passed to ``timm.create_model`` (e.g. ``depth=2`` for tiny tests).

    Example:
        >>> from inca.backbones.timm_source import create_timm_backbone
        >>> bb = create_timm_backbone("resnet10t", pretrained=False, input_size=64)
        >>> bb.layers[-1], bb.num_prefix_tokens, bb.token_layout["format"]
        ('layer4', 0, 'feature map')
    """
    timm = require("timm", purpose="timm backbones")
    if not timm.is_model(model_name) and not model_name.startswith(("hf-hub:", "local-dir:")):
        hint = did_you_mean(model_name, timm.list_models())
        raise BackboneError(f"timm has no model {model_name!r}{hint}; see "
                            "timm.list_models('*pattern*')")
    if checkpoint_path is not None:
        checkpoint_path = str(Path(checkpoint_path).expanduser())
        if not Path(checkpoint_path).is_file():
            raise BackboneError(f"checkpoint file not found: {checkpoint_path}")
    kwargs: dict[str, Any] = dict(num_classes=0, **model_kwargs)
    use_hub = pretrained and checkpoint_path is None
    offline = use_hub and hub_offline()
    model = _create(timm, model_name, use_hub, offline, kwargs)
    if input_size is not None and "img_size" not in model_kwargs:
        model = _resize(timm, model, model_name, input_size, use_hub, offline, kwargs)
    if checkpoint_path is not None:  # into the model built for the size: resampled once
        load_checkpoint_file(model, checkpoint_path, f"timm:{model_name}")
    return TimmBackbone(model, name=f"timm:{model_name}", input_size=input_size)


def _create(timm: Any, name: str, pretrained: bool, offline: bool, kwargs: dict[str, Any]
            ) -> nn.Module:
    """``timm.create_model`` with errors that say what failed: the hub or the build."""
    try:
        with offline_mode(offline), seeded_init(not pretrained):
            return timm.create_model(name, pretrained=pretrained, **kwargs)
    except Exception as e:
        if pretrained and is_hub_error(e):
            raise BackboneError(
                f"could not download the weights of timm:{name}: "
                + offline_hint("pass local weights (--checkpoint PATH, checkpoint_path=...) "
                               "or build it at random (--no-pretrained)", offline)) from e
        raise BackboneError(f"could not build timm:{name} with {kwargs}: {e}") from e


def load_checkpoint_file(model: nn.Module, path: str, name: str) -> None:
    """Load a local weights file into a timm model the way timm loads pretrained weights
    (checkpoint wrappers unwrapped, the model's own ``checkpoint_filter_fn``: old layouts
    converted, position embeddings resampled to the model's size; the classifier dropped),
    but refusing a file that lacks any of the model's weights: timm itself loads non-strictly
    once the classifier is removed, which would leave a wrong file's model at random."""
    import sys

    from timm.models import load_state_dict

    try:
        state = load_state_dict(path)
    except Exception as e:
        raise BackboneError(f"could not read checkpoint {path}: {e}") from e
    fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    try:
        if fn is not None:
            try:
                state = fn(state, model)
            except TypeError:  # filters of one argument
                state = fn(state)
        heads = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
        for head in (heads,) if isinstance(heads, str) else heads:
            state.pop(f"{head}.weight", None)
            state.pop(f"{head}.bias", None)
        result = model.load_state_dict(state, strict=False)
    except Exception as e:
        raise BackboneError(f"could not load {name} from {path}: {e}. Is it a checkpoint of "
                            "this model?") from e
    if result.missing_keys:
        keys = ", ".join(result.missing_keys[:3])
        raise BackboneError(
            f"could not load {name} from {path}: it lacks {len(result.missing_keys)} of the "
            f"model's weights ({keys}, ...). Is it a checkpoint of this model?")
    if result.unexpected_keys:
        warnings.warn(f"{path}: {len(result.unexpected_keys)} entries that {name} does not "
                      f"have were ignored ({', '.join(result.unexpected_keys[:3])}, ...)",
                      stacklevel=3)


def _resize(timm: Any, model: nn.Module, name: str, size: int, pretrained: bool,
            offline: bool, kwargs: dict[str, Any]) -> nn.Module:
    """The model at ``size`` px, by the route timm offers for its class: in place
    (``set_input_size``, resampling the position embeddings once from the weights' own
    size), else built again with ``img_size``; a model of no size of its own (a CNN) as
    it is."""
    if size == _current_size(model):
        return model
    if callable(getattr(model, "set_input_size", None)):
        try:
            model.set_input_size(img_size=size)  # resamples position embeddings in place
            return model
        except Exception:  # noqa: BLE001 - rebuilt with img_size below
            pass
    if takes_img_size(type(model)):
        try:
            return _create(timm, name, pretrained, offline, {**kwargs, "img_size": size})
        except BackboneError:  # timm refuses to build it for this size (twins_svt_small at
            pass  # 112 px): the model as built may still run at it; TimmBackbone checks
    return model  # no size of its own (a CNN): TimmBackbone checks that it runs at this size


def _current_size(model: nn.Module) -> int | None:
    img = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img is not None:
        return int(img[-1] if isinstance(img, tuple | list) else img)
    return _native_size(model)


def takes_img_size(cls: type) -> bool:
    """Whether a timm model class is built for an image size: its constructor (or the
    first one up its hierarchy that it passes ``**kwargs`` to) has an ``img_size``
    parameter. Asked of the class, not guessed from the name."""
    for klass in cls.__mro__:
        if klass is nn.Module or "__init__" not in vars(klass):
            continue
        try:
            params = inspect.signature(klass.__init__).parameters
        except (TypeError, ValueError):
            return False
        if "img_size" in params:
            return True
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return False
    return False
