"""Synthetic token sources and banks for tests: three layers of random tokens, the label a
bump on some channels of one layer (``l1`` by default)."""

from __future__ import annotations

import torch

from inca.training import AdapterBank, FitConfig
from inca.training.sources import MemorySource

LAYERS = ["l0", "l1", "l2"]
D, N, C = 16, 9, 4


def token_source(n: int, seed: int, classes: int = C, signal_layer: str = "l1",
                 strength: float = 2.0) -> MemorySource:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    feats = {k: torch.randn(n, N, D, generator=g) for k in LAYERS}
    # the label is a bump on some channels of every token of one layer
    feats[signal_layer][:, :, :classes] += strength * torch.nn.functional.one_hot(
        y, classes)[:, None]
    return MemorySource(feats, y)


def token_bank(config: FitConfig, specs=None) -> AdapterBank:
    """The bank ``config`` plans over the three layers, or one of ``specs``."""
    shapes = dict(embed_dims=dict.fromkeys(LAYERS, D), token_counts=dict.fromkeys(LAYERS, N),
                  num_classes=C, num_prefix_tokens=1)
    if specs is None:
        return AdapterBank.from_plan(LAYERS, config, **shapes)
    return AdapterBank.build(specs, seed=config.seed, options=config.adapter_options, **shapes)
