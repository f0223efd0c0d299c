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
stages (random images; per token, worst case).

Cost per layer: three passes over its tokens (score matmul, squared norms, pooling
matmul), shared by every query-head of every adapter reading that layer, plus O(D²) per
query for the value and output projections; instead of O(N·D²) per adapter to project
keys and values.

Every function here takes parameters with a leading adapter dimension K, so one adapter
(K = 1), a stack of K adapters, the several stacks of a training bank and the members of
many tasks at inference run the very same code (:func:`cross_attention`). Adapters that
read the same layer share its passes over the tokens.

Precision: under autocast the matmuls run in 16 bits; the token statistics, scores and
softmax are computed in float32 (float64 stays float64).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from inca.adapters.base import check


class AttentionParams(NamedTuple):
    """K adapters' cross-attention parameters (``nn.MultiheadAttention`` layout), leading K."""

    query: torch.Tensor  # (K, Q, D) learned queries
    norm_weight: torch.Tensor  # (K, D) γ of LN(z)
    norm_bias: torch.Tensor  # (K, D) β of LN(z)
    q_weight: torch.Tensor  # (K, A, D) W_q  } rows of nn.MultiheadAttention's
    k_weight: torch.Tensor  # (K, A, D) W_k  } in_proj_weight; A = D unless the
    v_weight: torch.Tensor  # (K, A, D) W_v  } attention is narrowed (attn_dim)
    in_proj_bias: torch.Tensor  # (K, 3A) [b_q; b_k; b_v]
    out_weight: torch.Tensor  # (K, D, A) W_o
    out_bias: torch.Tensor  # (K, D) b_o


def regular_layers(k: int, n_layers: int) -> list[int]:
    """The default assignment of K adapters to L token tensors: adapter ``i`` reads layer
    ``i // (K // L)`` (a layers × hyper-parameters grid laid out layer-major)."""
    check(n_layers > 0 and k % n_layers == 0,
          f"{k} adapters cannot be split evenly over {n_layers} token tensors")
    return [i // (k // n_layers) for i in range(k)]


def as_layers(tokens: torch.Tensor | list[torch.Tensor] | tuple[torch.Tensor, ...],
              embed_dim: int) -> torch.Tensor:
    """Lay out adapters' input as tokens ``(L, B, N, D)``: a 3-D tensor is one layer
    (L = 1), a sequence of L ``(B, N, D)`` tensors is stacked."""
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
    return tokens


def compute_input(tokens: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Tokens ready for the adapters' matmuls: as they are under autocast (which casts
    per op, without a float32 copy of the tokens), else in the parameters' dtype."""
    if torch.is_autocast_enabled(tokens.device.type):
        return tokens
    return tokens.to(like.dtype)


def _accumulate(dtype: torch.dtype) -> torch.dtype:
    """float32 for 16-bit tensors, their own dtype otherwise (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


def index_tensor(values: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """An index tensor made once per device: a copy from host memory at every step would
    make the host wait for the GPU. Made afresh while traced: ``torch.export`` makes fake
    tensors, which, kept, would be what every later eager pass computes with."""
    if _tracing():
        return _index_tensor.__wrapped__(values, device)
    return _index_tensor(values, device)


@functools.lru_cache(maxsize=512)
def _index_tensor(values: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)


def _tracing() -> bool:
    return bool(torch.compiler.is_exporting() or torch.compiler.is_compiling()
                or torch.jit.is_tracing())


class _Layout(NamedTuple):
    """Where every adapter's query-head rows sit in the per-layer key block ``(L, W, D)``."""

    regular: bool  # every group has one adapter per layer, adapter j on layer j: groups
    # are laid side by side along W, and each group's rows are a view of the block
    width: int  # W, the most rows on one layer
    layer: torch.Tensor  # (R,) per row of every adapter, in order: its layer ...
    slot: torch.Tensor  # (R,) ... and its row within that layer
    skip: torch.Tensor | None  # (L, W, 1) leading tokens each row ignores (None: none do)


@functools.lru_cache(maxsize=512)
def _layout(layer_index: tuple[tuple[int, ...], ...], rows: tuple[int, ...],
            skips: tuple[int, ...], n_layers: int, device: torch.device) -> _Layout:
    """The key block's layout for groups of adapters (``rows``: query-heads per adapter of
    each group; ``skips``: leading tokens each group ignores)."""
    regular = all(idx == tuple(range(n_layers)) for idx in layer_index)
    used = [0] * n_layers
    layer, slot, skip_at = [], [], {}
    for idx, m, sk in zip(layer_index, rows, skips, strict=True):
        for i in idx:
            for _ in range(m):
                layer.append(i)
                slot.append(used[i])
                skip_at[i, used[i]] = sk
                used[i] += 1
    width = max(used)
    skip = None
    if any(skips):
        skip = index_tensor(tuple(skip_at.get((i, w), 0) for i in range(n_layers)
                                  for w in range(width)), device).view(n_layers, width, 1)
    return _Layout(regular, width, index_tensor(tuple(layer), device),
                   index_tensor(tuple(slot), device), skip)


def fold_keys(p: AttentionParams, num_heads: int) -> torch.Tensor:
    """The query and key projections folded into one key vector per query-head,
    ``γ * W_k,hᵀ q_h / sqrt(d)``: ``(K, H*Q, D)``, ordered head-major.

    O(K·Q·D²), independent of the tokens. ``b_k`` is dropped: it cancels in the softmax.
    Both matmuls take the weights as stored, so their gradients come out in the weights'
    own layout (autograd copies a gradient that does not into place, a pass over every
    ``(K, A, D)`` weight).
    """
    k, q_count, d = p.query.shape
    a = p.q_weight.shape[1]  # attention width A (D unless narrowed)
    h, dh = num_heads, a // num_heads
    b_q = p.in_proj_bias[:, :a, None]  # (K, A, 1)
    q_t = torch.baddbmm(b_q, p.q_weight, p.query.transpose(1, 2)) * dh**-0.5  # (K, A, Q)
    keys = torch.bmm(q_t.reshape(k * h, dh, q_count).transpose(1, 2),  # W_k,hᵀ q_h
                     p.k_weight.reshape(k * h, dh, d))  # (K*H, Q, D)
    # fold γ; β·keys is constant over tokens
    return keys.view(k, h * q_count, d) * p.norm_weight[:, None, :]


class _Scores(torch.autograd.Function):
    """``tokens @ keysᵀ`` per layer, ``(L, B*N, D) x (L, W, D) -> (L, B*N, W)``, whose
    backward computes the keys' gradient as ``gᵀ @ tokens``: autograd's own ``tokensᵀ @ g``
    reads the token block across its rows, 2-2.6x slower on CPU (2 cores, shape (a) of
    ``benchmarks/bank.py``)."""

    @staticmethod
    def forward(ctx: Any, tokens: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(tokens, keys)
        return torch.bmm(tokens, keys.transpose(1, 2))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        tokens, keys = ctx.saved_tensors
        grad_tokens = torch.bmm(grad, keys) if ctx.needs_input_grad[0] else None
        grad_keys = torch.bmm(grad.transpose(1, 2), tokens) if ctx.needs_input_grad[1] \
            else None
        return grad_tokens, grad_keys


def _scores(tokens: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``tokens @ keysᵀ`` per layer; with :class:`_Scores`' backward when training eagerly.
    Under autocast both are cast first as ``torch.bmm`` would be (float64 is not), so that
    the backward computes in the dtype autograd's own would."""
    if not (torch.is_grad_enabled() and keys.requires_grad) or _tracing():
        return torch.bmm(tokens, keys.transpose(1, 2))
    device = tokens.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        tokens, keys = (t if t.dtype == torch.float64 else t.to(dtype) for t in (tokens, keys))
        with torch.autocast(device, enabled=False):
            return _Scores.apply(tokens, keys)
    return _Scores.apply(tokens, keys)


def token_inv_std(tokens: torch.Tensor, mean: torch.Tensor, eps: float) -> torch.Tensor:
    """``1 / sqrt(var + eps)`` of each token's channels, as ``F.layer_norm`` computes it.

    One fast pass, ``var = E[z²] - μ²`` (see the module docstring on its accuracy), in
    float32 at least: ``torch.var_mean`` is exact but 20x slower on CPU, and subtracting
    the mean first would materialize the very tensor the folding avoids.

    Args:
        tokens: ``(..., N, D)``.
        mean: the tokens' means over channels ``(..., N)``.
        eps: the LayerNorm's epsilon.
    """
    acc = _accumulate(tokens.dtype)
    norm = torch.linalg.vector_norm(tokens, dim=-1, dtype=acc)
    mean_sq = norm.square() / tokens.shape[-1]  # E[z²]
    return ((mean_sq - mean.to(acc).square()).clamp_min(0.0) + eps).rsqrt()


def cross_attention(
    tokens: torch.Tensor,
    parts: Sequence[AttentionParams],
    layer_index: Sequence[Sequence[int]],
    num_heads: int | Sequence[int],
    eps: float,
    need_weights: bool = False,
    skip_tokens: int | Sequence[int] = 0,
) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """Cross-attention of several groups of adapters to LN(tokens), folded (module docstring).

    Every pass over a layer's tokens is shared by all adapters reading that layer, whatever
    their group, query count, head count or width: one matmul scores every query-head of
    every adapter, one pass gives the tokens' statistics, one matmul pools. Groups differ
    only in what comes after the pooling (their value and output projections).

    Args:
        tokens: ``(L, B, N, D)``.
        parts: groups of adapters' parameters, ``K_p`` adapters each.
        layer_index: for each group, the layer (index into ``tokens``) each adapter reads.
        num_heads: attention heads H, one for every group or one per group.
        eps: epsilon of the token LayerNorm (shared by every group).
        need_weights: also return the attention weights.
        skip_tokens: leading tokens (CLS, registers) that a group's adapters do not attend
            to, one for every group or one per group.

    Returns:
        Per group, ``out (K_p, B, Q_p, D)`` equal to ``nn.MultiheadAttention(q, LN(z),
        LN(z))``; and the weights ``(K_p, B, H_p, Q_p, N - skip_p)`` per group (``None``
        unless asked for).
    """
    n_layers, b, n, d = tokens.shape
    heads = _per_group(num_heads, len(parts))
    skips = _per_group(skip_tokens, len(parts))
    for sk in skips:
        check(n > sk, f"{n} tokens leave none after skipping {sk}")
    sizes = [p.query.shape[0] for p in parts]
    rows = [p.query.shape[1] * h for p, h in zip(parts, heads, strict=True)]  # M_p = Q_p·H_p
    index = tuple(tuple(int(i) for i in idx) for idx in layer_index)
    check(len(index) == len(parts) and all(
        len(idx) == k and all(0 <= i < n_layers for i in idx)
        for idx, k in zip(index, sizes, strict=True)),
        f"each adapter needs one layer in [0, {n_layers}); got {list(layer_index)}")
    layout = _layout.__wrapped__ if _tracing() else _layout  # as index_tensor
    lay = layout(index, tuple(rows), tuple(skips), n_layers, tokens.device)

    keys = [fold_keys(p, h) for p, h in zip(parts, heads, strict=True)]  # (K_p, M_p, D)
    attn, inv_std, mean = _attend(tokens, keys, lay, eps)
    pooled, centred = _pool(tokens, attn, inv_std, mean)
    outs = [_project(p, x, c, h)  # x: (K, M, B, D) with M = H·Q, head-major
            for p, x, c, h in zip(parts, _rows_per_group(pooled, lay, sizes, rows),
                                  _rows_per_group(centred, lay, sizes, rows), heads,
                                  strict=True)]

    weights = None
    if need_weights:  # nn.MultiheadAttention's (B, H, Q, N) layout, per adapter
        weights = []
        for p, w, h, sk in zip(parts, _rows_per_group(attn.transpose(1, 2), lay, sizes, rows),
                               heads, skips, strict=True):  # (K, M, B, N)
            w = w.reshape(w.shape[0], h, p.query.shape[1], b, n).permute(0, 3, 1, 2, 4)
            weights.append(w[..., sk:])  # (K, B, H, Q, N - skip)
    return outs, weights


def _attend(tokens: torch.Tensor, keys: list[torch.Tensor], lay: _Layout, eps: float
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every query-head's softmax over LN(tokens) of its layer, ``(L, B, W, N)``, with the
    tokens' ``1/σ`` ``(L, B, N)`` and means ``(L, B*N, 1)``.

    The keys of every group are laid out per layer, ``(L, W, D)``: one matmul per layer
    scores all of its adapters' query-heads, and an extra row of ``1/D`` yields the tokens'
    means too."""
    n_layers, b, n, d = tokens.shape
    if lay.regular:  # adapter j of every group reads layer j: groups side by side
        u = torch.cat(keys, dim=1) if len(keys) > 1 else keys[0]  # (L, W, D)
    else:  # slots left empty score nothing that is read
        flat = torch.cat([k.reshape(-1, d) for k in keys])  # (R, D)
        u = flat.new_zeros(n_layers, lay.width, d).index_put((lay.layer, lay.slot), flat)
    u_and_mean = torch.cat([u, u.new_full((n_layers, 1, d), 1.0 / d)], dim=1)
    raw = _scores(tokens.reshape(n_layers, b * n, d), u_and_mean)  # (L, B*N, W+1)
    raw, mean = raw[..., :-1], raw[..., -1:]  # (L, B*N, W), (L, B*N, 1)
    inv_std = token_inv_std(tokens, mean.reshape(n_layers, b, n), eps)  # (L, B, N)
    centre = mean * u.sum(-1).unsqueeze(1)  # μ_n Σ_d u_d
    scores = (raw - centre) * inv_std.reshape(n_layers, b * n, 1)  # LN(z)·u, β·u dropped
    scores = scores.view(n_layers, b, n, lay.width).transpose(2, 3)  # (L, B, W, N)
    if lay.skip is not None:  # the rows of adapters that skip leading tokens ignore them
        ignored = torch.arange(n, device=tokens.device) < lay.skip  # (L, W, N)
        scores = scores.masked_fill(ignored.unsqueeze(1), float("-inf"))
    return scores.softmax(dim=-1, dtype=_accumulate(scores.dtype)), inv_std, mean


def _pool(tokens: torch.Tensor, attn: torch.Tensor, inv_std: torch.Tensor, mean: torch.Tensor
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention-weighted raw tokens ``(L, W, B, D)`` and weighted means ``(L, W, B)``.

    Weights on normalized tokens = weights / σ on raw tokens, minus the weighted mean (kept
    apart: subtracting it here would be one more pass over the block)."""
    n_layers, b, n, d = tokens.shape
    width = attn.shape[2]
    a = compute_input(attn * inv_std.unsqueeze(2), tokens).view(n_layers * b, width, n)
    pooled = torch.bmm(a, tokens.reshape(n_layers * b, n, d))  # (L*B, W, D)
    pooled = pooled.view(n_layers, b, width, d).transpose(1, 2)  # (L, W, B, D)
    centred = torch.bmm(a, mean.reshape(n_layers * b, n, 1))  # Σ_n a_n μ_n / σ_n
    return pooled, centred.view(n_layers, b, width).transpose(1, 2)


def _project(p: AttentionParams, x: torch.Tensor, c: torch.Tensor, h: int) -> torch.Tensor:
    """One group's outputs ``(K, B, Q, D)`` from its pooled tokens ``x`` ``(K, M, B, D)``
    and weighted means ``c`` ``(K, M, B)``: LN's affine (the weights sum to 1, so it
    applies after the weighted sum), then the value and output projections, which take
    their weights as stored (gradients in place, as :func:`fold_keys`)."""
    k, _, b, d = x.shape
    q_count, a = p.query.shape[1], p.v_weight.shape[1]  # A: attention width
    x = torch.addcmul(p.norm_bias[:, None, None, :], x - c.unsqueeze(-1),
                      p.norm_weight[:, None, None, :])
    x = x.reshape(k * h, q_count * b, d)  # per head h, its queries' pooled tokens
    v = torch.bmm(p.v_weight.reshape(k * h, a // h, d), x.transpose(1, 2))  # W_v,h x
    v = v.view(k, a, q_count * b) + p.in_proj_bias[:, 2 * a:, None]  # (K, A, Q*B)
    out = torch.baddbmm(p.out_bias[:, :, None], p.out_weight, v)  # (K, D, Q*B)
    return out.view(k, d, q_count, b).permute(0, 3, 2, 1)  # (K, B, Q, D)


def _rows_per_group(x: torch.Tensor, lay: _Layout, sizes: list[int],
                    rows: list[int]) -> list[torch.Tensor]:
    """Each group's rows of a per-layer block ``(L, W, ...)``, as ``(K_p, M_p, ...)``:
    views when the layout is regular, else one gather."""
    if lay.regular:  # group p's rows of layer j belong to its adapter j
        return list(x.split(rows, dim=1)) if len(rows) > 1 else [x]
    cut = [k * m for k, m in zip(sizes, rows, strict=True)]
    gathered = x[lay.layer, lay.slot].split(cut)  # (K_p·M_p, ...) each
    return [g.view(k, m, *g.shape[1:]) for g, k, m in zip(gathered, sizes, rows, strict=True)]


def _per_group(value: int | Sequence[int], groups: int) -> list[int]:
    """One setting for every group, or one per group."""
    if isinstance(value, int):
        return [value] * groups
    check(len(value) == groups, f"got {len(value)} settings for {groups} groups")
    return [int(v) for v in value]


def attend_single(
    tokens: torch.Tensor,
    params: AttentionParams,
    num_heads: int,
    eps: float,
    need_weights: bool,
    skip_tokens: int = 0,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """One adapter's folded attention to tokens ``(B, N, D)``: ``(B, Q, D)`` [, weights]."""
    check(
        tokens.ndim == 3 and tokens.shape[-1] == params.query.shape[-1] and tokens.shape[1] > 0,
        f"tokens must be (B, N, {params.query.shape[-1]}), got {tuple(tokens.shape)}",
    )
    tokens = compute_input(tokens, params.query).unsqueeze(0)  # (1, B, N, D)
    outs, weights = cross_attention(tokens, [params], [[0]], num_heads, eps, need_weights,
                                    skip_tokens)
    return (outs[0][0], weights[0][0]) if weights is not None else outs[0][0]


def stacked_linear(
    features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """K linear heads at once: ``features (K, B, F)``, ``weight (K, C, F)``, ``bias (K, C)``.

    Returns logits ``(K, B, C)``.
    """
    return torch.baddbmm(bias.unsqueeze(1), features, weight.transpose(1, 2))
