"""Multi-head cross-attention from a few learned queries to tokens, in the folded form.

For one query q and one head h (head width d = D / H), ``nn.MultiheadAttention(q, x, x)``
with ``x = LN(z)`` computes

    q_h = W_q,h q + b_q,h                                   # (d,)
    s_n = (W_k,h x_n + b_k,h) · q_h / sqrt(d)              # per token n
    o_h = sum_n softmax(s)_n (W_v,h x_n + b_v,h)           # (d,)
    out = W_o [o_1; ...; o_H] + b_o                         # (D,)

Projecting all N tokens to keys and values costs O(N·D²). Instead:

- ``s_n = x_n · u_h / sqrt(d) + b_k,h · q_h / sqrt(d)`` with ``u_h = W_k,hᵀ q_h`` (D,): the
  key projection folds into the query, and the bias term is the same for every token, so
  it cancels in the softmax and is never computed.
- the softmax weights sum to 1, so ``o_h = W_v,h (sum_n a_n x_n) + b_v,h``: the value
  projection is applied once, after the weighted sum.

The LayerNorm folds too. With ``x_n = (z_n - μ_n) / σ_n * γ + β`` (μ_n, σ_n the mean and
standard deviation of token n's channels):

- ``x_n · u = ((z_n · γu) - μ_n Σ_d(γu)_d) / σ_n + β · u``, the last term constant over
  tokens (cancels in the softmax);
- ``sum_n a_n x_n = (sum_n (a_n / σ_n) z_n - sum_n (a_n / σ_n) μ_n) * γ + β``.

So the normalized tokens are never materialized: the score and pooling matmuls read the
raw tokens, the score matmul also yields the means (one more output column), and one
more pass gives ``E[z²]``. That saves writing and re-reading a ``(B, N, D)`` tensor per
layer, and autograd keeps no copy of it. The variance is ``E[z²] - μ²``, whose rounding
grows with ``|μ| / σ``: against float64, float32 outputs are off by about 1e-6 relative at
``|μ| = σ``, 4e-5 at ``10 σ`` and 4e-3 at ``100 σ``. Real activations sit at the low end:
``|μ| / σ`` is at most 0.15 over DINOv2 ViT-S/14's blocks and 1.3 over MobileNetV2's
stages (random images; per token, worst case). Run adapters in float32 or float64.

Cost per layer: three passes over its tokens (score matmul, squared norms, pooling
matmul), shared by every query-head of every adapter reading that layer, plus O(D²) per
query for the value and output projections; instead of O(N·D²) per adapter to project
keys and values.

Every function here takes parameters with a leading adapter dimension K, so one adapter
(K = 1) and a stack of K adapters run the very same code.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from inca.adapters.base import check


class AttentionParams(NamedTuple):
    """K adapters' cross-attention parameters (``nn.MultiheadAttention`` layout), leading K."""

    query: torch.Tensor  # (K, Q, D) learned queries
    norm_weight: torch.Tensor  # (K, D) γ of LN(z)
    norm_bias: torch.Tensor  # (K, D) β of LN(z)
    q_weight: torch.Tensor  # (K, D, D) W_q  } rows of nn.MultiheadAttention's
    k_weight: torch.Tensor  # (K, D, D) W_k  } in_proj_weight (kept apart: stacking
    v_weight: torch.Tensor  # (K, D, D) W_v  } three smaller tensors is cheaper on CPU)
    in_proj_bias: torch.Tensor  # (K, 3D) [b_q; b_k; b_v]
    out_weight: torch.Tensor  # (K, D, D) W_o
    out_bias: torch.Tensor  # (K, D) b_o


class FoldedParams(NamedTuple):
    """K adapters' cross-attention folded for computing from raw tokens, leading K."""

    keys: torch.Tensor  # (K, Q, H, D): γ * W_k,hᵀ q_h / sqrt(d), the folded query-keys
    norm_weight: torch.Tensor  # (K, D) γ
    norm_bias: torch.Tensor  # (K, D) β
    value_weight: torch.Tensor  # (K, D, D) W_v
    value_bias: torch.Tensor  # (K, D) b_v
    out_weight: torch.Tensor  # (K, D, D) W_o
    out_bias: torch.Tensor  # (K, D) b_o


def cat_params(params: Sequence[AttentionParams]) -> AttentionParams:
    """Stack several adapters' parameters (each with K = 1) along K: one copy per field."""
    return AttentionParams(*(torch.cat(field) for field in zip(*params, strict=True)))


def fold_attention(p: AttentionParams, num_heads: int) -> FoldedParams:
    """Fold the query and key projections into one key vector per query-head.

    O(K·Q·D²), independent of the tokens. ``b_k`` is dropped: it cancels in the softmax.
    """
    k, q_count, d = p.query.shape
    h, dh = num_heads, d // num_heads
    b_q, _, b_v = p.in_proj_bias.chunk(3, dim=1)  # (K, D) each
    q = torch.baddbmm(b_q.unsqueeze(1), p.query, p.q_weight.transpose(1, 2))  # (K, Q, D)
    q = q.view(k, q_count, h, dh) * dh**-0.5
    keys = torch.einsum("kqhe,khed->kqhd", q, p.k_weight.reshape(k, h, dh, d))  # W_k,hᵀ q_h
    keys = keys * p.norm_weight[:, None, None, :]  # fold γ; β·keys is constant over tokens
    return FoldedParams(
        keys, p.norm_weight, p.norm_bias, p.v_weight, b_v, p.out_weight, p.out_bias
    )


def as_layers(tokens: torch.Tensor | list[torch.Tensor] | tuple[torch.Tensor, ...],
              k: int, embed_dim: int) -> torch.Tensor:
    """Lay out the input of K stacked adapters as tokens ``(L, B, N, D)``, K a multiple of L.

    A 3-D tensor is one layer read by all K adapters (L = 1); a sequence of L tensors is
    stacked. Adapters are assigned to layers in contiguous blocks: adapter ``i`` reads
    layer ``i // (K // L)`` (a layers × hyper-parameters grid laid out layer-major).
    """
    if isinstance(tokens, (list, tuple)):
        check(len(tokens) > 0, "got an empty sequence of token tensors")
        tokens = torch.stack(list(tokens))
    if tokens.ndim == 3:
        tokens = tokens.unsqueeze(0)
    check(
        tokens.ndim == 4 and tokens.shape[-1] == embed_dim and tokens.shape[2] > 0,
        f"tokens must be (B, N, {embed_dim}) or (L, B, N, {embed_dim}), "
        f"got {tuple(tokens.shape)}",
    )
    check(
        k % tokens.shape[0] == 0,
        f"{k} adapters cannot be split evenly over {tokens.shape[0]} token tensors",
    )
    return tokens


def token_inv_std(tokens: torch.Tensor, mean: torch.Tensor, eps: float) -> torch.Tensor:
    """``1 / sqrt(var + eps)`` of each token's channels, as ``F.layer_norm`` computes it.

    One fast pass, ``var = E[z²] - μ²`` (see the module docstring on its accuracy):
    ``torch.var_mean`` is exact but 20x slower on CPU, and subtracting the mean first
    would materialize the very tensor the folding avoids.

    Args:
        tokens: ``(..., N, D)``.
        mean: the tokens' means over channels ``(..., N)``.
        eps: the LayerNorm's epsilon.
    """
    mean_sq = torch.linalg.vector_norm(tokens, dim=-1).square() / tokens.shape[-1]  # E[z²]
    return ((mean_sq - mean.square()).clamp_min(0.0) + eps).rsqrt()


def folded_cross_attention(
    tokens: torch.Tensor, p: FoldedParams, eps: float, need_weights: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Cross-attention of K adapters' queries to LN(tokens), folded (see module docstring).

    Args:
        tokens: ``(L, B, N, D)``; adapter ``i`` reads ``tokens[i // (K // L)]``.
        p: the K adapters' folded parameters.
        eps: epsilon of the token LayerNorm.
        need_weights: also return the attention weights.

    Returns:
        ``out`` ``(K, B, Q, D)``, equal to ``nn.MultiheadAttention(q, LN(z), LN(z))``, and
        the weights ``(K, B, H, Q, N)`` (``None`` unless asked for).
    """
    n_layers, b, n, d = tokens.shape
    k, q_count, h, _ = p.keys.shape
    r = k // n_layers  # adapters per layer
    m = q_count * h  # query-heads per adapter
    # One matmul per layer scores all of that layer's adapters' query-heads at once; an
    # extra row of 1/D makes the same pass over the tokens yield their means.
    u = p.keys.reshape(n_layers, r * m, d)  # (L, R*M, D)
    u_and_mean = torch.cat([u, u.new_full((n_layers, 1, d), 1.0 / d)], dim=1)
    raw = torch.bmm(tokens.reshape(n_layers, b * n, d), u_and_mean.transpose(1, 2))
    raw, mean = raw[..., :-1], raw[..., -1:]  # (L, B*N, R*M), (L, B*N, 1)
    inv_std = token_inv_std(tokens, mean.view(n_layers, b, n), eps)  # (L, B, N)
    centre = mean * u.sum(-1).unsqueeze(1)  # μ_n Σ_d u_d
    scores = (raw - centre) * inv_std.reshape(n_layers, b * n, 1)  # LN(z)·u, β·u dropped
    scores = scores.view(n_layers, b, n, r, m).permute(0, 3, 1, 4, 2)  # (L, R, B, M, N)
    attn = scores.reshape(k, b, m, n).softmax(dim=-1)  # (K, B, M, N)

    # Weights on normalized tokens = weights / σ on raw tokens, minus the weighted mean.
    a = attn.view(n_layers, r, b, m, n) * inv_std.view(n_layers, 1, b, 1, n)
    a = a.transpose(1, 2).reshape(n_layers * b, r * m, n)  # (L*B, R*M, N)
    pooled = torch.bmm(a, tokens.reshape(n_layers * b, n, d))  # (L*B, R*M, D)
    pooled = pooled - torch.bmm(a, mean.reshape(n_layers * b, n, 1))  # Σ_n a_n μ_n / σ_n
    pooled = pooled.view(n_layers, b, r, m, d).transpose(1, 2).reshape(k, b, m, d)
    # The weights sum to 1, so LN's affine applies after the weighted sum.
    pooled = pooled * p.norm_weight[:, None, None, :] + p.norm_bias[:, None, None, :]

    heads = torch.einsum(  # per head, W_v,h after the weighted sum: (K, B, Q, H, d)
        "kbqhd,khed->kbqhe", pooled.view(k, b, q_count, h, d),
        p.value_weight.reshape(k, h, d // h, d),
    )
    heads = heads.reshape(k, b * q_count, d) + p.value_bias.unsqueeze(1)  # (K, B*Q, D)
    out = torch.baddbmm(p.out_bias.unsqueeze(1), heads, p.out_weight.transpose(1, 2))
    out = out.view(k, b, q_count, d)  # (K, B, Q, D)

    weights = None
    if need_weights:  # nn.MultiheadAttention's (B, H, Q, N) layout, per adapter
        weights = attn.view(k, b, q_count, h, n).transpose(2, 3)  # (K, B, H, Q, N)
    return out, weights


def attend_single(
    tokens: torch.Tensor,
    params: AttentionParams,
    num_heads: int,
    eps: float,
    need_weights: bool,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """One adapter's folded attention to tokens ``(B, N, D)``: ``(B, Q, D)`` [, weights]."""
    check(
        tokens.ndim == 3 and tokens.shape[-1] == params.query.shape[-1] and tokens.shape[1] > 0,
        f"tokens must be (B, N, {params.query.shape[-1]}), got {tuple(tokens.shape)}",
    )
    tokens = tokens.to(params.query.dtype).unsqueeze(0)  # (1, B, N, D); caches store fp16
    out, weights = folded_cross_attention(
        tokens, fold_attention(params, num_heads), eps, need_weights
    )
    return (out[0], weights[0]) if need_weights else out[0]


def stacked_linear(
    features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """K linear heads at once: ``features (K, B, F)``, ``weight (K, C, F)``, ``bias (K, C)``.

    Returns logits ``(K, B, C)``.
    """
    return torch.baddbmm(bias.unsqueeze(1), features, weight.transpose(1, 2))


def expand_layers(x: torch.Tensor, k: int) -> torch.Tensor:
    """``(L, ...) -> (K, ...)``: block ``i`` of K // L adapters gets layer ``i``'s slice."""
    r = k // x.shape[0]
    return x if r == 1 else x.repeat_interleave(r, dim=0)
