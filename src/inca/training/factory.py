"""Creating a member's adapter: its settings, its own seed, and a width that fits the backbone."""

from __future__ import annotations

from typing import Any

import torch

from inca.adapters import Adapter, adapter_class, create_adapter
from inca.training.plan import MULTI_LAYER_KINDS, MemberSpec, kind_options

MAX_ADAPTER_SHARE = 0.03  # an adapter holds at most 3% of its backbone's parameters


def narrow_attention(embed_dim: int, num_classes: int, num_queries: int,
                     backbone_params: int) -> int | None:
    """The attention width that keeps an InCA adapter within :data:`MAX_ADAPTER_SHARE` of
    the backbone: ``None`` (full width) when it fits, else the widest multiple of 16 that
    does (16 at least)."""
    d = embed_dim

    def size(a: int) -> int:  # query, 2 LayerNorms, in/out projections, classifier
        return num_queries * d + 4 * d + 3 * a * d + 3 * a + d * a + d + d * num_classes \
            + num_classes

    budget = MAX_ADAPTER_SHARE * backbone_params
    if size(d) <= budget:
        return None
    a = int((budget - size(0)) // (4 * d + 3)) // 16 * 16
    return max(16, a)  # a < d already: size(d) > budget


def build_adapter(
    spec: MemberSpec,
    *,
    embed_dims: dict[str, int],
    num_prefix_tokens: int,
    num_classes: int,
    options: dict[str, Any] | None = None,
    seed: int = 0,
    backbone_params: int | None = None,
) -> Adapter:
    """Create one member's adapter, initialised from the member's own seed.

    With ``backbone_params``, an InCA adapter whose full-width attention would exceed
    :data:`MAX_ADAPTER_SHARE` of the backbone gets a narrower one (``attn_dim``, unless the
    options set it): a wide layer of a small backbone (MobileNetV2's 1,280 channels) would
    otherwise hold an adapter larger than the backbone itself.
    """
    base = spec.adapter_kind
    opts = kind_options(spec.kind, options)
    if base == "inca" and backbone_params and "attn_dim" not in opts:
        opts["attn_dim"] = narrow_attention(embed_dims[spec.layers[0]], num_classes,
                                            opts.get("num_queries", 1), backbone_params)
    fields = adapter_class(base).config_class.__dataclass_fields__
    if "num_prefix_tokens" in fields:
        opts.setdefault("num_prefix_tokens", num_prefix_tokens)
    if "pool" in fields and num_prefix_tokens == 0:
        opts.setdefault("pool", "mean")  # no CLS token to read (CNN layers)
    if base in MULTI_LAYER_KINDS:
        opts.update(layers=list(spec.layers), layer_dims=[embed_dims[k] for k in spec.layers])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed(seed))
        return create_adapter(base, embed_dim=embed_dims[spec.layers[0]],
                              num_classes=num_classes, **opts)
