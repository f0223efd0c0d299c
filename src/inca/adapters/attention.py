"""The cross-attention block InCA and Open-InCA share: token LayerNorm and projections.

Both adapters attend from learned queries to one layer's normalized tokens through
``nn.MultiheadAttention``-shaped projections; they differ in their queries (a few for
InCA, one per class for Open-InCA) and in their heads. :class:`CrossAttentionAdapter`
holds the shared part once: its parameters, their initialisation, and the folded
attention (:mod:`inca.adapters._folded`) over them.

The parameters are registered on the adapter itself, not on a submodule, under the names
``nn.MultiheadAttention`` uses (``token_norm``, ``in_proj_weight``, ``in_proj_bias``,
``out_proj``): saved tasks' state-dict keys, and weight copies from or to
``nn.MultiheadAttention``, depend on them.
"""

from __future__ import annotations

import torch
from torch import nn

from inca.adapters._folded import AttentionParams, attend_single
from inca.adapters.base import Adapter


def attention_params(query: torch.Tensor, token_norm_weight: torch.Tensor,
                     token_norm_bias: torch.Tensor, in_proj_weight: torch.Tensor,
                     in_proj_bias: torch.Tensor, out_weight: torch.Tensor,
                     out_bias: torch.Tensor) -> AttentionParams:
    """:class:`AttentionParams` (views, no copies) from tensors in ``nn.MultiheadAttention``
    layout with a leading adapter dimension K: ``in_proj_weight`` ``(K, 3A, D)`` is split
    into W_q, W_k, W_v."""
    return AttentionParams(query, token_norm_weight, token_norm_bias,
                           *in_proj_weight.chunk(3, dim=1), in_proj_bias, out_weight, out_bias)


class CrossAttentionAdapter(Adapter):
    """An adapter whose queries cross-attend to LN(tokens) through shared projections.

    Subclasses call :meth:`_add_attention` in their constructor (where the parameters'
    registration order should place them), :meth:`reset_attention` when they initialise,
    and :meth:`_attend` with their queries. Their config has ``num_heads`` and
    ``norm_eps``.
    """

    token_norm: nn.LayerNorm
    in_proj_weight: nn.Parameter
    in_proj_bias: nn.Parameter
    out_proj: nn.Linear

    def _add_attention(self, attn_dim: int, norm_eps: float, *,
                       device: torch.device | str | None = None,
                       dtype: torch.dtype | None = None) -> None:
        """Register the token LayerNorm and the projections (uninitialised)."""
        fk = {"device": device, "dtype": dtype}
        d, a = self.embed_dim, attn_dim
        self.token_norm = nn.LayerNorm(d, eps=norm_eps, **fk)
        self.in_proj_weight = nn.Parameter(torch.empty(3 * a, d, **fk))  # [W_q; W_k; W_v]
        self.in_proj_bias = nn.Parameter(torch.empty(3 * a, **fk))
        self.out_proj = nn.Linear(a, d, **fk)

    @torch.no_grad()
    def reset_attention(self) -> None:
        """Initialize the token LayerNorm and projections as ``nn.MultiheadAttention``
        does."""
        self.token_norm.reset_parameters()
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        self.out_proj.reset_parameters()
        nn.init.zeros_(self.out_proj.bias)

    def attention_parameters(self) -> list[nn.Parameter]:
        """The shared attention's parameters (token LayerNorm, projections)."""
        return [*self.token_norm.parameters(), self.in_proj_weight, self.in_proj_bias,
                *self.out_proj.parameters()]

    def _attention_params(self, query: torch.Tensor) -> AttentionParams:
        """The attention parameters for queries ``(Q, D)``, with a leading adapter
        dimension of 1 (views)."""
        return attention_params(
            query.unsqueeze(0),
            self.token_norm.weight.unsqueeze(0),
            self.token_norm.bias.unsqueeze(0),
            self.in_proj_weight.unsqueeze(0),
            self.in_proj_bias.unsqueeze(0),
            self.out_proj.weight.unsqueeze(0),
            self.out_proj.bias.unsqueeze(0),
        )

    def _attend(self, tokens: torch.Tensor, params: AttentionParams, need_weights: bool,
                skip_tokens: int = 0) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Outputs ``(B, Q, D)`` (and weights ``(B, H, Q, N)``) of the folded attention."""
        config = self.config
        return attend_single(tokens, params, config.num_heads,  # type: ignore[attr-defined]
                             config.norm_eps, need_weights,  # type: ignore[attr-defined]
                             skip_tokens)
