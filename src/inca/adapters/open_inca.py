"""Open-InCA: one learned query and one "diagonal" head per class, for adding classes later.

Each class c has its own query q_c, attending to the tokens through shared projections,
and its own head: ``logit_c = <LN(out_c), w_c> + b_c``. A class's logit therefore depends
only on the shared part and on its own ``(q_c, w_c, b_c)``. Once the shared part is frozen
after the first phase, training new classes cannot change an old class's logit.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from inca.adapters._folded import AttentionParams
from inca.adapters.attention import CrossAttentionAdapter
from inca.adapters.base import (
    MAX_CLASS_GROUPS,
    MAX_HEADS,
    AdapterConfig,
    check,
    check_int,
    check_real,
    resolve_num_heads,
)
from inca.adapters.registry import register_adapter


@dataclass(frozen=True)
class OpenInCAConfig(AdapterConfig):
    """Hyper-parameters of :class:`OpenInCAAdapter`.

    Attributes:
        num_heads: attention heads H, a divisor of D; ``None`` chooses as for InCA.
        dropout: dropout rate on each class's normalized feature, before its head.
        init_std: standard deviation of the truncated-normal query init.
        norm_eps: epsilon of the token LayerNorm and of the output LayerNorm.
        class_groups: sizes of the class groups added in successive phases; ``()`` means
            one group of ``num_classes``. :meth:`OpenInCAAdapter.add_classes` extends it;
            it is recorded because each group is a separate parameter tensor, so a saved
            adapter must be rebuilt with the same groups to load its weights.
    """

    num_heads: int | None = None
    dropout: float = 0.0
    init_std: float = 0.02
    norm_eps: float = 1e-6
    class_groups: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.num_heads is not None:
            check_int(self.num_heads, "num_heads (or None)", 1, MAX_HEADS)
        check_real(self.dropout, "dropout", 0.0, 1.0, high_open=True)
        check_real(self.init_std, "init_std", 0.0, 1e3, low_open=True)
        check_real(self.norm_eps, "norm_eps", 0.0, 1.0, low_open=True)
        check(
            isinstance(self.class_groups, (tuple, list))
            and len(self.class_groups) <= MAX_CLASS_GROUPS,
            f"class_groups must be a list of at most {MAX_CLASS_GROUPS} sizes",
        )
        for g in self.class_groups:
            check(
                isinstance(g, numbers.Integral) and not isinstance(g, bool) and g > 0,
                f"class_groups must be positive sizes, got {list(self.class_groups)[:8]}",
            )
        object.__setattr__(self, "class_groups", tuple(int(g) for g in self.class_groups))


@register_adapter("open_inca")
class OpenInCAAdapter(CrossAttentionAdapter):
    """One query and one diagonal head per class, over shared cross-attention (Open-InCA).

    Shared: the token LayerNorm and the attention projections (``in_proj_weight``,
    ``in_proj_bias``, ``out_proj``, in ``nn.MultiheadAttention`` layout). Per class c: a
    query ``q_c`` (D), a head vector ``w_c`` (D) and a bias ``b_c``. The output LayerNorm
    has no affine part: a per-class head would absorb it.

    Class-incremental use: train, then :meth:`add_classes` (which by default freezes the
    shared part and the existing classes), then train again on the new classes. Each
    phase's per-class parameters are separate tensors, and frozen ones get no gradient,
    so even an optimizer given all parameters (with weight decay) leaves old classes'
    logits exactly unchanged. A single tensor with a gradient mask would not: decoupled
    weight decay and momentum would still move the masked rows.

    Cost: C query-heads per token pass, O(N·D·C·H) in all.

    Args:
        embed_dim: token width D.
        num_classes: number of classes C of the first phase (or of all phases, when
            ``config.class_groups`` records them).
        config: hyper-parameters.
        device: where to create the parameters.
        dtype: parameter dtype.

    Example:
        >>> import torch
        >>> from inca.adapters import OpenInCAAdapter
        >>> adapter = OpenInCAAdapter(384, 5)
        >>> _ = adapter.add_classes(3)  # freezes the shared part and classes 0-4
        >>> adapter(torch.randn(2, 65, 384)).shape
        torch.Size([2, 8])
        >>> adapter.config.class_groups
        (5, 3)
    """

    config_class = OpenInCAConfig
    config: OpenInCAConfig

    def __init__(
        self,
        embed_dim: int,
        num_classes: int,
        config: OpenInCAConfig | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        config = OpenInCAConfig() if config is None else config
        super().__init__(embed_dim, num_classes, config)
        groups = config.class_groups or (num_classes,)
        check(
            sum(groups) == num_classes,
            f"class_groups {groups} add up to {sum(groups)}, not num_classes={num_classes}",
        )
        self.config = config.replace(
            num_heads=resolve_num_heads(config.num_heads, embed_dim), class_groups=groups
        )
        self._add_attention(embed_dim, config.norm_eps, device=device, dtype=dtype)
        self.queries = nn.ParameterList()  # one (C_g, D) tensor per class group
        self.class_weights = nn.ParameterList()  # (C_g, D)
        self.class_biases = nn.ParameterList()  # (C_g,)
        for g in groups:
            self._append_group(g)
        self.reset_shared_parameters()

    @torch.no_grad()
    def reset_shared_parameters(self) -> None:
        """Initialize the shared attention as ``nn.MultiheadAttention`` does."""
        self.reset_attention()

    def _append_group(self, n: int) -> None:
        like = self.in_proj_weight
        fk = {"device": like.device, "dtype": like.dtype}
        d = self.embed_dim
        query = torch.empty(n, d, **fk)
        nn.init.trunc_normal_(query, std=self.config.init_std)
        self.queries.append(nn.Parameter(query))
        self.class_weights.append(nn.Parameter(torch.randn(n, d, **fk) * 0.01))
        self.class_biases.append(nn.Parameter(torch.zeros(n, **fk)))

    def shared_parameters(self) -> list[nn.Parameter]:
        """The parameters every class depends on (token LN, attention projections)."""
        return self.attention_parameters()

    def freeze_old_classes(self) -> OpenInCAAdapter:
        """Freeze the shared parameters and every class present now; returns ``self``.

        Build the optimizer afterwards (or keep using one: frozen parameters get no
        gradient, so no optimizer updates them).
        """
        frozen = [*self.shared_parameters(), *self.queries, *self.class_weights,
                  *self.class_biases]
        for p in frozen:
            p.requires_grad_(False)
            p.grad = None  # a stale gradient would still be applied by an optimizer step
        return self

    def add_classes(self, n_new: int, *, freeze_old: bool = True) -> OpenInCAAdapter:
        """Append ``n_new`` classes (new queries and heads, indices after the old ones).

        Args:
            n_new: number of classes to add.
            freeze_old: first freeze the shared part and the existing classes, so that
                training the new ones leaves the old logits unchanged.

        Returns:
            ``self``.
        """
        check(n_new > 0, f"n_new must be positive, got {n_new}")
        if freeze_old:
            self.freeze_old_classes()
        self._append_group(n_new)
        self.num_classes += n_new
        self.config = self.config.replace(class_groups=(*self.config.class_groups, n_new))
        return self

    def attention_params(self) -> AttentionParams:
        """Attention parameters with a leading adapter dimension of 1; one query per class."""
        return self._attention_params(torch.cat(list(self.queries)))  # queries (C, D)

    def attend(
        self, tokens: torch.Tensor, need_weights: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Each class query's attention output ``(B, C, D)`` (and weights ``(B, H, C, N)``)."""
        return self._attend(tokens, self.attention_params(), need_weights)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, C)`` from tokens ``(B, N, D)``."""
        out = self.attend(tokens)  # (B, C, D)
        feat = F.layer_norm(out, (self.embed_dim,), eps=self.config.norm_eps)
        feat = F.dropout(feat, self.config.dropout, self.training)
        weight = torch.cat(list(self.class_weights))  # (C, D)
        bias = torch.cat(list(self.class_biases))  # (C,)
        return torch.einsum("bcd,cd->bc", feat, weight) + bias  # (B, C)
