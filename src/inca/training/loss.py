"""The loss of a bank: every member's cross-entropy from one batch, in float32."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bank_loss(logits: torch.Tensor, y: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Per-member cross-entropy ``(K,)`` of logits ``(K, B, C)`` against labels ``(B,)``,
    in float32 whatever the logits' precision.

    Summed over members, each member's gradient is exactly what it would get alone.
    """
    k, b, c = logits.shape
    losses = F.cross_entropy(logits.float().reshape(k * b, c), y.repeat(k),
                             label_smoothing=label_smoothing, reduction="none")
    return losses.view(k, b).mean(dim=1)
