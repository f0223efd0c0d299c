"""Token reduction at write time: keep prefix tokens, average-pool patch tokens to a grid."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from inca.errors import CacheError


def reduce_tokens(tokens: torch.Tensor, num_prefix_tokens: int, grid: int | None) -> torch.Tensor:
    """Bound a layer's token count: prefix tokens + patch tokens pooled to ``grid x grid``.

    Args:
        tokens: ``(B, N, D)`` with ``num_prefix_tokens`` leading tokens, then a square grid of
            patch tokens in row-major order.
        num_prefix_tokens: CLS/register tokens kept as they are.
        grid: side of the pooled patch grid; ``None`` keeps every token.

    Returns:
        ``(B, num_prefix_tokens + grid**2, D)``, or ``tokens`` unchanged when the patch grid
        is already no larger than ``grid``.
    """
    if grid is None:
        return tokens
    b, n, d = tokens.shape
    prefix, patches = tokens[:, :num_prefix_tokens], tokens[:, num_prefix_tokens:]
    side = math.isqrt(patches.shape[1])
    if side * side != patches.shape[1]:
        raise CacheError(
            f"cannot pool {patches.shape[1]} patch tokens to a grid: not a square number"
        )
    if side <= grid:
        return tokens
    maps = patches.transpose(1, 2).reshape(b, d, side, side)  # (B, D, h, w)
    pooled = F.adaptive_avg_pool2d(maps, grid).flatten(2).transpose(1, 2)  # (B, g*g, D)
    return torch.cat([prefix, pooled], dim=1)
