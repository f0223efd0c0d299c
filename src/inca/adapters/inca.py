"""The InCA adapter: learned queries cross-attend to one layer's tokens, then classify.

Dukler et al., "Your representations are in the network" (NeurIPS 2023). The attention is
computed in the folded form of :mod:`inca.adapters._folded`, O(N·D) per query-head.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from inca.adapters._folded import AttentionParams, stacked_linear
from inca.adapters.attention import CrossAttentionAdapter
from inca.adapters.base import (
    MAX_DIM,
    MAX_HEADS,
    MAX_LAYERS,
    MAX_PREFIX_TOKENS,
    MAX_QUERIES,
    AdapterConfig,
    check,
    check_int,
    check_real,
    resolve_num_heads,
)
from inca.adapters.registry import register_adapter

QUERY_REDUCE = ("mean", "concat")


@dataclass(frozen=True)
class InCAConfig(AdapterConfig):
    """Hyper-parameters of :class:`InCAAdapter`.

    Attributes:
        num_heads: attention heads H, a divisor of D. ``None`` picks heads of at least 64
            channels, at most 8 (4 for D=384, 8 for D=768); the adapter's ``config``
            records the value chosen.
        num_queries: learned queries Q. The paper uses one.
        query_reduce: how Q query outputs become one feature after the LayerNorm:
            ``"mean"`` averages them (feature D, classifier size independent of Q),
            ``"concat"`` concatenates them (feature Q·D).
        dropout: dropout rate on the normalized feature, before the classifier.
        init_std: standard deviation of the truncated-normal query init. Small queries
            give near-uniform attention, so a fresh adapter starts close to mean pooling.
        norm_eps: epsilon of the token LayerNorm and of the output LayerNorm.
        attn_dim: width A of the queries, keys and values (``None``: the token width D,
            as ``nn.MultiheadAttention``). The projections hold ``4·A·D`` numbers instead
            of ``4·D²``: a narrower attention keeps an adapter over a wide layer small
            (MobileNetV2's 1,280 channels made a full-width adapter 188% of the backbone).
        head_hidden: ``None`` (the paper's linear classifier), or the width of a two-layer
            MLP head (Linear, GELU, Linear) after the output LayerNorm.
        attend_prefix: attend to the prefix tokens (CLS, registers) as well as the patch
            tokens (the default), or to the patch tokens only.
        num_prefix_tokens: leading CLS/register tokens of the layer (the bank sets the
            backbone's); only read when ``attend_prefix`` is off.
        num_layers: adjacent layers read at once: the adapter attends to their tokens
            together (a list of ``num_layers`` token tensors, joined along the tokens).
    """

    num_heads: int | None = None
    num_queries: int = 1
    query_reduce: str = "mean"
    dropout: float = 0.0
    init_std: float = 0.02
    norm_eps: float = 1e-6
    attn_dim: int | None = None
    head_hidden: int | None = None
    attend_prefix: bool = True
    num_prefix_tokens: int = 0
    num_layers: int = 1

    @property
    def skip_tokens(self) -> int:
        """Leading tokens the attention ignores."""
        return 0 if self.attend_prefix else self.num_prefix_tokens

    def __post_init__(self) -> None:
        if self.num_heads is not None:
            check_int(self.num_heads, "num_heads (or None)", 1, MAX_HEADS)
        if self.attn_dim is not None:
            check_int(self.attn_dim, "attn_dim (or None)", 1, MAX_DIM)
        check_int(self.num_queries, "num_queries", 1, MAX_QUERIES)
        check(
            isinstance(self.query_reduce, str) and self.query_reduce in QUERY_REDUCE,
            f"query_reduce must be one of {QUERY_REDUCE}, got {self.query_reduce!r}",
        )
        check_real(self.dropout, "dropout", 0.0, 1.0, high_open=True)
        check_real(self.init_std, "init_std", 0.0, 1e3, low_open=True)
        check_real(self.norm_eps, "norm_eps", 0.0, 1.0, low_open=True)
        if self.head_hidden is not None:
            check_int(self.head_hidden, "head_hidden (or None)", 1, MAX_DIM)
        check(isinstance(self.attend_prefix, bool),
              f"attend_prefix must be true or false, got {self.attend_prefix!r}")
        check_int(self.num_prefix_tokens, "num_prefix_tokens", 0, MAX_PREFIX_TOKENS)
        check_int(self.num_layers, "num_layers", 1, MAX_LAYERS)
        check(self.num_layers == 1 or self.attend_prefix,
              "attend_prefix=False reads one layer: it cannot be combined with num_layers > 1")


class HeadParams(NamedTuple):
    """Output LayerNorm and classifier of K adapters, stacked along a leading dimension."""

    norm_weight: torch.Tensor  # (K, D)
    norm_bias: torch.Tensor  # (K, D)
    weight: torch.Tensor  # (K, C, F) classifier; F is the MLP's width with an MLP head
    bias: torch.Tensor  # (K, C)
    hidden_weight: torch.Tensor | None = None  # (K, F, D·) first layer of an MLP head
    hidden_bias: torch.Tensor | None = None  # (K, F)


def inca_head(
    out: torch.Tensor, p: HeadParams, config: InCAConfig, training: bool
) -> torch.Tensor:
    """Logits ``(K, B, C)`` from K adapters' attention outputs ``out (K, B, Q, D)``."""
    d = out.shape[-1]
    feat = F.layer_norm(out, (d,), eps=config.norm_eps)  # (K, B, Q, D)
    feat = feat * p.norm_weight[:, None, None, :] + p.norm_bias[:, None, None, :]
    feat = feat.mean(dim=2) if config.query_reduce == "mean" else feat.flatten(2)  # (K, B, F)
    feat = F.dropout(feat, config.dropout, training)
    if p.hidden_weight is not None:  # an MLP head
        feat = F.gelu(stacked_linear(feat, p.hidden_weight, p.hidden_bias))
    return stacked_linear(feat, p.weight, p.bias)


@register_adapter("inca")
class InCAAdapter(CrossAttentionAdapter):
    """Learned queries cross-attend to a layer's tokens; LayerNorm; linear classifier (InCA).

    ``logits = Linear(LN(MHA(q, LN(z), LN(z))))``, with the attention folded so that keys
    and values of the N tokens are never formed. Parameters are laid out as in
    ``nn.MultiheadAttention`` (``in_proj_weight`` ``(3D, D)``, ``in_proj_bias``,
    ``out_proj``), so weights copy across in either direction.

    Args:
        embed_dim: token width D.
        num_classes: number of logits C.
        config: hyper-parameters (defaults: one query, heads from D).
        device: where to create the parameters.
        dtype: parameter dtype.

    Example:
        >>> import torch
        >>> from inca.adapters import InCAAdapter, InCAConfig
        >>> adapter = InCAAdapter(384, 10, InCAConfig(num_queries=2))
        >>> tokens = torch.randn(8, 65, 384)  # (B, N, D) from one frozen layer
        >>> adapter(tokens).shape
        torch.Size([8, 10])
        >>> out, weights = adapter.attend(tokens, need_weights=True)
        >>> tuple(out.shape), tuple(weights.shape)  # (B, Q, D), (B, H, Q, N)
        ((8, 2, 384), (8, 4, 2, 65))
    """

    config_class = InCAConfig
    config: InCAConfig

    def __init__(
        self,
        embed_dim: int,
        num_classes: int,
        config: InCAConfig | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        config = InCAConfig() if config is None else config
        super().__init__(embed_dim, num_classes, config)
        a = config.attn_dim or embed_dim
        self.config = config.replace(attn_dim=a, num_heads=resolve_num_heads(
            config.num_heads, a, "attn_dim" if config.attn_dim else "embed_dim"))
        fk = {"device": device, "dtype": dtype}
        d, q = embed_dim, self.config.num_queries
        feat_dim = d if self.config.query_reduce == "mean" else q * d
        self.query = nn.Parameter(torch.empty(q, d, **fk))  # (Q, D)
        self._add_attention(a, self.config.norm_eps, **fk)  # token_norm, in_proj_*, out_proj
        self.norm = nn.LayerNorm(d, eps=self.config.norm_eps, **fk)
        hidden = self.config.head_hidden
        self.hidden = None if hidden is None else nn.Linear(feat_dim, hidden, **fk)
        self.head = nn.Linear(hidden or feat_dim, num_classes, **fk)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialize as ``nn.MultiheadAttention`` does; small queries; a near-zero head."""
        nn.init.trunc_normal_(self.query, std=self.config.init_std)
        self.reset_attention()
        self.norm.reset_parameters()
        if self.hidden is not None:
            self.hidden.reset_parameters()
        nn.init.normal_(self.head.weight, std=0.01)  # as dinov2's linear heads
        nn.init.zeros_(self.head.bias)

    def attention_params(self) -> AttentionParams:
        """The attention parameters as views with a leading adapter dimension of 1."""
        return self._attention_params(self.query)

    def head_params(self) -> HeadParams:
        """The output LayerNorm and classifier as views with a leading dimension of 1."""
        return HeadParams(
            self.norm.weight.unsqueeze(0),
            self.norm.bias.unsqueeze(0),
            self.head.weight.unsqueeze(0),
            self.head.bias.unsqueeze(0),
            *((self.hidden.weight.unsqueeze(0), self.hidden.bias.unsqueeze(0))
              if self.hidden is not None else ()),
        )

    def join(self, tokens: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """The tokens the adapter attends to, ``(B, N, D)``: one layer's, or the
        ``num_layers`` layers' of a list joined along the tokens."""
        n = self.config.num_layers
        if isinstance(tokens, (list, tuple)):
            check(len(tokens) == n, f"this adapter reads {n} layer(s), got {len(tokens)}")
            return tokens[0] if n == 1 else torch.cat(list(tokens), dim=1)
        check(n == 1, f"this adapter reads {n} layers: pass a list of their tokens")
        return tokens

    def attend(
        self, tokens: torch.Tensor | Sequence[torch.Tensor], need_weights: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The attention output, equal to ``nn.MultiheadAttention(q, LN(z), LN(z))``.

        Args:
            tokens: ``(B, N, D)``, or a list of ``num_layers`` such tensors (see
                :meth:`join`).
            need_weights: also return the attention weights ``(B, H, Q, N)`` (per head,
                as ``nn.MultiheadAttention(..., average_attn_weights=False)``).

        Returns:
            ``(B, Q, D)``, or that and the weights.
        """
        return self._attend(self.join(tokens), self.attention_params(), need_weights,
                            self.config.skip_tokens)

    def forward(self, tokens: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """Logits ``(B, C)`` from tokens ``(B, N, D)`` (a list of them: :meth:`join`)."""
        out = self.attend(tokens).unsqueeze(0)  # (1, B, Q, D)
        return inca_head(out, self.head_params(), self.config, self.training)[0]
