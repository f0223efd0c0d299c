"""What every adapter shares: its typed config, the :class:`Adapter` module, parameter counts.

An adapter is a small head over one frozen layer's tokens ``(B, N, D)`` (or, for
multi-layer probes, several layers') that returns class logits ``(B, C)``. It never sees
the backbone, only tensors, so the same adapter trains on live activations and on the
activation cache alike.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from inca.errors import AdapterError

C = TypeVar("C", bound="AdapterConfig")

POOLS = ("cls", "mean", "cls_mean")
# Upper bounds of config fields, far above any real use: a config read from a file must
# not be able to ask for petabytes before its weights are even looked at.
MAX_DIM = 65_536  # token or attention width
MAX_HEADS = 1024
MAX_QUERIES = 1024
MAX_PREFIX_TOKENS = 1024
MAX_LAYERS = 4096  # layers one probe reads
MAX_CLASS_GROUPS = 1024  # Open-InCA phases


def check(condition: bool, message: str) -> None:
    """Raise :class:`AdapterError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise AdapterError(message)


def _shown(value: Any) -> str:
    """``repr(value)``, cut short: configs may come from untrusted JSON."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_int(value: Any, name: str, low: int, high: int) -> None:
    """Refuse anything but an integer (not a bool) in ``[low, high]``."""
    check(
        isinstance(value, numbers.Integral) and not isinstance(value, bool)
        and low <= value <= high,
        f"{name} must be an integer in [{low}, {high}], got {_shown(value)}",
    )


def check_real(value: Any, name: str, low: float, high: float, *, low_open: bool = False,
               high_open: bool = False) -> None:
    """Refuse anything but a finite number (not a bool) between ``low`` and ``high``
    (each bound included unless ``*_open``)."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) \
        and math.isfinite(value) \
        and (low < value if low_open else low <= value) \
        and (value < high if high_open else value <= high)
    check(ok, f"{name} must be a number in {'(' if low_open else '['}{low:g}, {high:g}"
              f"{')' if high_open else ']'}, got {_shown(value)}")


@dataclass(frozen=True)
class AdapterConfig:
    """Base of the typed, JSON-round-trippable configs of adapters.

    Subclasses are frozen dataclasses whose fields are JSON scalars, tuples of them, or
    ``None``; they validate themselves in ``__post_init__``. Width and class count are not
    part of a config: they come from the backbone layer and the task.
    """

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-serializable dict (tuples become lists)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls: type[C], d: Mapping[str, Any]) -> C:
        """Build a config from :meth:`to_dict`'s output; unknown keys are refused."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        check(
            not unknown,
            f"unknown {cls.__name__} field(s) {unknown}; valid fields: {sorted(names)}",
        )
        # JSON has no tuples: every sequence field of a config is a tuple.
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def replace(self: C, **changes: Any) -> C:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def default_num_heads(embed_dim: int) -> int:
    """Heads of at least 64 channels, at most 8: 4 for D=384, 8 for D=768, 2 for D=192.

    In the folded form each head costs one pass over the tokens (O(N·D)), so heads are
    cheap but not free; wide heads also keep each head's attention map meaningful.
    """
    for heads in (8, 4, 2):
        if embed_dim % heads == 0 and embed_dim // heads >= 64:
            return heads
    return 1


def resolve_num_heads(num_heads: int | None, embed_dim: int, what: str = "embed_dim") -> int:
    """``num_heads`` checked against ``embed_dim``, or :func:`default_num_heads` for ``None``."""
    if num_heads is None:
        return default_num_heads(embed_dim)
    check(
        embed_dim % num_heads == 0,
        f"{what} {embed_dim} is not divisible by num_heads {num_heads}; "
        f"choose a divisor of {embed_dim} (or None for {default_num_heads(embed_dim)})",
    )
    return num_heads


def check_pool(pool: str, num_prefix_tokens: int) -> None:
    """Validate a pooling choice against the number of prefix (CLS/register) tokens."""
    check(pool in POOLS, f"pool must be one of {POOLS}, got {pool!r}")
    check(num_prefix_tokens >= 0, f"num_prefix_tokens must be >= 0, got {num_prefix_tokens}")
    check(
        pool == "mean" or num_prefix_tokens >= 1,
        f"pool={pool!r} reads the CLS token at index 0, but num_prefix_tokens is 0 "
        "(a CNN has no CLS token): use pool='mean'",
    )


def pooled_dim(pool: str, embed_dim: int) -> int:
    """Width of the pooled feature: ``2 * D`` for ``"cls_mean"`` (concatenated), else ``D``."""
    return 2 * embed_dim if pool == "cls_mean" else embed_dim


def pool_tokens(tokens: torch.Tensor, pool: str, num_prefix_tokens: int) -> torch.Tensor:
    """Reduce tokens ``(..., N, D)`` to one feature ``(..., F)``.

    Args:
        tokens: tokens whose first ``num_prefix_tokens`` are CLS/register tokens.
        pool: ``"cls"`` (token 0), ``"mean"`` (mean of the patch tokens, prefix skipped),
            or ``"cls_mean"`` (both, concatenated: dinov2's linear-eval feature).
        num_prefix_tokens: leading non-patch tokens.
    """
    if pool == "cls":
        return tokens[..., 0, :]
    n = tokens.shape[-2]
    check(
        n > num_prefix_tokens,
        f"pool={pool!r} needs patch tokens, but got {n} tokens with "
        f"{num_prefix_tokens} prefix tokens",
    )
    mean = tokens[..., num_prefix_tokens:, :].mean(dim=-2)
    if pool == "mean":
        return mean
    return torch.cat([tokens[..., 0, :], mean], dim=-1)


def check_tokens(tokens: torch.Tensor, embed_dim: int, what: str = "tokens") -> None:
    """Refuse anything but tokens ``(B, N, D)`` of the adapter's width."""
    check(
        tokens.ndim == 3 and tokens.shape[-1] == embed_dim and tokens.shape[1] > 0,
        f"{what} must be (B, N, {embed_dim}), got {tuple(tokens.shape)}",
    )


def member_input(layers: Sequence[str], feats: Mapping[str, torch.Tensor]
                 ) -> torch.Tensor | list[torch.Tensor]:
    """What an adapter reading ``layers`` is called with: the one layer's tokens
    ``(B, N, D)``, or the list of its layers' tokens (a window of adjacent layers, or every
    layer for a multi-layer probe). The one rule for training, selection and inference.

    Example:
        >>> feats = {"a": torch.zeros(2, 5, 8), "b": torch.ones(2, 5, 8)}
        >>> member_input(["a"], feats).shape
        torch.Size([2, 5, 8])
        >>> len(member_input(["a", "b"], feats))
        2
    """
    if len(layers) == 1:
        return feats[layers[0]]
    return [feats[k] for k in layers]


def ensemble_proba(members: Iterable[nn.Module], member_layers: Iterable[Sequence[str]],
                   feats: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """A task's output ``(B, C)``: each member's softmax, in float32, averaged over the
    members. The one rule of :meth:`Task.predict_proba <inca.task.Task.predict_proba>` and
    :class:`~inca.task.TaskModule` (the runtime and selection compute the same average
    from batched logits)."""
    probs, n = None, 0
    for member, layers in zip(members, member_layers, strict=True):
        p = member(member_input(layers, feats)).float().softmax(-1)
        probs, n = (p if probs is None else probs + p), n + 1
    if probs is None:
        raise AdapterError("an ensemble needs at least one member")
    return probs / n


class Adapter(nn.Module):
    """A small trainable head from one frozen layer's tokens to class logits.

    Subclasses set :attr:`kind` and :attr:`config_class` and implement :meth:`forward`.
    Tokens are cast to the adapter's dtype on entry, so fp16 cached activations can feed
    an fp32 adapter directly.

    Attributes:
        kind: the registry name, e.g. ``"inca"``.
        config_class: the dataclass holding the kind's hyper-parameters.
        embed_dim: token width ``D`` the adapter reads.
        num_classes: number of logits ``C`` it returns.
        config: the resolved config (``None`` defaults replaced by the chosen values).
    """

    kind: ClassVar[str] = ""
    config_class: ClassVar[type[AdapterConfig]] = AdapterConfig

    def __init__(self, embed_dim: int, num_classes: int, config: AdapterConfig) -> None:
        super().__init__()
        check(embed_dim > 0, f"embed_dim must be positive, got {embed_dim}")
        check(num_classes > 0, f"num_classes must be positive, got {num_classes}")
        check(
            isinstance(config, self.config_class),
            f"{type(self).__name__} needs a {self.config_class.__name__}, "
            f"got {type(config).__name__}",
        )
        self.embed_dim = int(embed_dim)
        self.num_classes = int(num_classes)
        self.config = config

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, C)`` from tokens ``(B, N, D)``."""
        raise NotImplementedError

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Number of parameter elements (only those with ``requires_grad`` if asked)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def spec(self) -> dict[str, Any]:
        """Everything needed to rebuild this adapter's shape, as JSON-serializable data.

        Saved next to the safetensors weights; :func:`inca.adapters.adapter_from_spec`
        rebuilds an adapter whose ``load_state_dict`` accepts them.
        """
        return {
            "kind": self.kind,
            "embed_dim": self.embed_dim,
            "num_classes": self.num_classes,
            "config": self.config.to_dict(),
        }

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, embed_dim={self.embed_dim}, num_classes={self.num_classes}"


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements of any module."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def parameter_report(adapter: nn.Module, backbone_params: int | nn.Module) -> dict[str, Any]:
    """An adapter's size, absolute and as a percentage of the backbone's.

    Args:
        adapter: any adapter (or stacked adapters).
        backbone_params: the backbone's parameter count, or the backbone module itself.

    Returns:
        ``{"kind", "parameters", "trainable_parameters", "backbone_parameters",
        "percent_of_backbone"}``.

    Example:
        >>> from inca.adapters import create_adapter, parameter_report
        >>> a = create_adapter("linear", embed_dim=384, num_classes=10)
        >>> parameter_report(a, 22_000_000)["parameters"]  # (CLS ⊕ mean) 768 x 10 + 10
        7690
    """
    if isinstance(backbone_params, nn.Module):
        backbone_params = count_parameters(backbone_params)
    check(backbone_params > 0, f"backbone_params must be positive, got {backbone_params}")
    total = count_parameters(adapter)
    return {
        "kind": getattr(adapter, "kind", type(adapter).__name__),
        "parameters": total,
        "trainable_parameters": count_parameters(adapter, trainable_only=True),
        "backbone_parameters": int(backbone_params),
        "percent_of_backbone": 100.0 * total / backbone_params,
    }
