"""A task as one plain ``nn.Module`` (backbone + heads), for autograd, ``torch.export`` and ONNX.

:meth:`Backbone.extract <inca.backbones.Backbone.extract>` and :meth:`Task.predict_proba
<inca.task.Task.predict_proba>` run under ``torch.no_grad`` and move data between
devices; :class:`TaskModule` does neither: its forward is tensor in, tensor out, in whatever
autograd mode the caller runs it (its weights are frozen, so nothing is recorded unless the
input requires a gradient).

Which backbones export: those whose layers are read by a truncated forward (timm models
through ``forward_intermediates``, the bundled DINOv2) export as they run, stopping after
the deepest layer read. Hook-based backbones (transformers, torchvision,
:func:`inca.from_module`, the bundled MobileNetV2) stop their pass early by raising an
exception from a hook, which tracing cannot follow; while traced (``torch.export``,
``torch.jit.trace``, ``torch.compile``) they run the model's whole forward with hooks that
only record, so the graph also holds the unused rest of the model (dead code: its outputs
reach nothing; ``torch.export``'s graph keeps it, ONNX exporters drop it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from inca.adapters import ensemble_proba
from inca.backbones.base import Backbone
from inca.errors import BackboneError
from inca.features.tokens import reduce_tokens


class TaskModule(nn.Module):
    """Images to class probabilities: one backbone pass, every member, their average.

    Made by :meth:`Task.to_module <inca.task.Task.to_module>`; it holds the task's
    backbone and members themselves (no copies: ``copy.deepcopy`` it for an independent
    one).

    Args:
        backbone: the frozen backbone.
        members: the task's adapters.
        member_layers: the layer(s) each member reads.
        token_grid: patch tokens pooled to this grid side before the members (as in
            training); ``None`` keeps them all.

    Example:
        >>> module = task.to_module()  # doctest: +SKIP
        >>> pixels = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)
        >>> probs = module(pixels)  # doctest: +SKIP
        >>> program = torch.export.export(module, (pixels,))  # doctest: +SKIP
    """

    def __init__(self, backbone: Backbone, members: nn.ModuleList,
                 member_layers: Sequence[Sequence[str]], *,
                 token_grid: int | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.members = members
        self.member_layers = [list(ls) for ls in member_layers]
        wanted = {ly for ls in self.member_layers for ly in ls}
        self.layers = [ly for ly in backbone.layers if ly in wanted]
        self.token_grid = token_grid
        prep = backbone.preprocessing
        # (1, 3, 1, 1), for uint8 pixels; not saved in a state dict (they are preprocessing)
        self.register_buffer("mean", torch.tensor(prep.mean).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(prep.std).view(1, 3, 1, 1), persistent=False)
        self.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Probabilities ``(B, C)`` (float32) of images ``(B, 3, H, W)``: ``uint8`` pixels
        (scaled and normalized here), or floats already normalized (as the backbone's
        preprocessing makes them)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise BackboneError(f"expected images of shape (B, 3, H, W), got "
                                f"{tuple(images.shape)}")
        x = images
        if x.dtype == torch.uint8:
            mean, std = self.mean.to(x.device), self.std.to(x.device)  # no-ops once moved
            x = (x.to(mean.dtype) / 255 - mean) / std
        x = x.to(self.backbone.dtype)
        feats = {k: reduce_tokens(v, self.backbone.num_prefix_tokens, self.token_grid)
                 for k, v in layer_tokens(self.backbone, x, self.layers).items()}
        return ensemble_proba(self.members, self.member_layers, feats)


def layer_tokens(backbone: Backbone, x: torch.Tensor, layers: list[str]
                 ) -> dict[str, torch.Tensor]:
    """``{layer: tokens (B, N, D)}`` of ``layers`` (in forward order) from one pass, in the
    caller's autograd mode; traceable (see the module's notes on hook-based backbones)."""
    return backbone.forward_layers(x, layers, grad=True, stop_early=not _tracing())


def _tracing() -> bool:
    return bool(torch.compiler.is_exporting() or torch.compiler.is_compiling()
                or torch.jit.is_tracing())
