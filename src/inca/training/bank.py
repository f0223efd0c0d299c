"""The adapter bank: K adapters (kinds x layers x learning rates) trained in one loop.

One optimizer holds one parameter group per learning rate and shape; the loss is the sum
of the adapters' losses, so each adapter's gradient is exactly what it would get alone.
Adapters of the same kind and token shape are computed together with stacked weights (one
batched matmul for all of them) rather than a Python loop over K.
"""

from __future__ import annotations

import copy
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from inca.adapters import (
    Adapter,
    StackedInCA,
    StackedLinear,
    adapter_class,
    create_adapter,
)
from inca.adapters.stacked import _Stacked
from inca.errors import InCAError
from inca.training.config import FitConfig
from inca.training.sources import StackedFeats


class TrainingError(InCAError):
    """Training cannot go on (e.g. the loss became NaN)."""


@dataclass(frozen=True)
class MemberSpec:
    """One adapter of the bank: what it is, what it reads, how fast it learns.

    ``kind`` is a registered adapter kind (``"inca"``), or a variant of one
    (``"inca:q4"``) whose settings ``FitConfig.adapter_options`` gives under that name:
    variants are axes of the bank, trained side by side and chosen on validation.
    """

    kind: str
    layers: tuple[str, ...]  # one layer, a window of adjacent layers, or every layer
    lr: float

    @property
    def adapter_kind(self) -> str:
        """The registered kind (``"inca"`` for ``"inca:q4"``)."""
        return self.kind.split(":", 1)[0]

    @property
    def key(self) -> str:
        if len(self.layers) == 1:
            where = self.layers[0]
        elif self.adapter_kind in MULTI_LAYER_KINDS:  # every layer
            where = f"{len(self.layers)}layers"
        else:  # a window of adjacent layers
            where = "+".join(self.layers)
        return f"{self.kind}/{where}/lr={self.lr:g}"

    def seed(self, base: int) -> int:
        """A seed that depends only on the member's kind and layers, not on the bank it sits
        in; members differing only in lr start from the same weights (so soups make sense)."""
        return (base * 1_000_003 + zlib.crc32(self.key.rsplit("/", 1)[0].encode())) % 2**31


MULTI_LAYER_KINDS = ("multilayer_linear",)


def kind_options(kind: str, options: dict[str, dict[str, Any]] | None) -> dict[str, Any]:
    """A kind's or variant's adapter settings: its kind's, changed by its own."""
    options = options or {}
    base = kind.split(":", 1)[0]
    return {**options.get(base, {}), **(options.get(kind, {}) if kind != base else {})}


def plan_members(layers: Sequence[str], config: FitConfig,
                 embed_dims: dict[str, int] | None = None) -> list[MemberSpec]:
    """Every (kind, layer, lr) the configuration asks for, in a stable order.

    A kind reading ``num_layers`` = w > 1 layers gets a member per window of w adjacent
    layers (ending at each layer from the w-th); with ``embed_dims``, windows across a
    change of width (CNN stages) are left out.
    """
    members = []
    for kind in config.kinds:
        multi = kind.split(":", 1)[0] in MULTI_LAYER_KINDS
        w = int(kind_options(kind, config.adapter_options).get("num_layers", 1))
        if w > len(layers):
            raise TrainingError(f"{kind} reads {w} adjacent layers, but only {len(layers)} "
                                "are asked for: lower num_layers or read more layers")
        targets = [tuple(layers)] if multi else \
            [tuple(layers[i - w + 1:i + 1]) for i in range(w - 1, len(layers))]
        if embed_dims is not None:
            targets = [t for t in targets if len({embed_dims[k] for k in t}) == 1]
        for t in targets:
            for lr in config.lrs:
                members.append(MemberSpec(kind, t, lr))
    return members


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
    return max(16, min(a, d - 16))


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


def _inputs(spec: MemberSpec, feats: dict[str, torch.Tensor]) -> Any:
    if len(spec.layers) > 1:  # every layer, or a window of adjacent layers
        return [feats[k] for k in spec.layers]
    return feats[spec.layers[0]]


_STACKS: dict[str, type[_Stacked]] = {"inca": StackedInCA, "linear": StackedLinear}


@dataclass
class _Family:
    """Stacks of one kind and token shape, differing in learning rate: computed together,
    sharing each layer's passes over its tokens."""

    kind: type[_Stacked] | None  # None: a single adapter with no stacked form
    stacks: list[int]  # indices into AdapterBank.stacks
    layers: list[tuple[str, ...]]  # the inputs of its token block (L, B, N, D): layers, or
    # windows of adjacent layers whose tokens are joined
    layer_index: list[list[int]]  # per stack, the input (into ``layers``) of each member


class AdapterBank(nn.Module):
    """K adapters trained together; ``logits(feats)`` returns ``(K, B, C)``.

    Members of one kind, token shape, config and learning rate live in one stacked module
    (:class:`~inca.adapters.StackedInCA`, :class:`~inca.adapters.StackedLinear`) whose
    registered ``(K, ...)`` parameters are exactly what the forward reads and the optimizer
    updates: one parameter group per stack, with that stack's learning rate. Kinds without
    a stacked form (Open-InCA, multi-layer probes) are single adapters. The bank is an
    ordinary module: ``.to(device, dtype)`` may be called at any time.

    Args:
        specs: the members.
        adapters: one adapter per member (same order). Stacked members are copied into
            their stack; an adapter without a stacked form is used as it is.
        token_counts: tokens N of each layer; only layers with equal N can be stacked
            (CNN stages of equal width may differ in resolution).
    """

    def __init__(self, specs: Sequence[MemberSpec], adapters: Sequence[Adapter],
                 token_counts: dict[str, int] | None = None) -> None:
        super().__init__()
        if len(specs) != len(adapters) or not specs:
            raise TrainingError("a bank needs one adapter per member, and at least one")
        self.specs = list(specs)
        counts = token_counts or {}
        groups: dict[tuple, list[int]] = {}
        for i, (s, a) in enumerate(zip(self.specs, adapters, strict=True)):
            if s.adapter_kind in _STACKS and all(k in counts for k in s.layers):
                n_tokens = sum(counts[k] for k in s.layers)
                key: tuple = (s.adapter_kind, a.embed_dim, n_tokens, repr(a.config), s.lr)
            else:
                key = ("single", i)
            groups.setdefault(key, []).append(i)
        self.stacks = nn.ModuleList()
        self.stack_lrs: list[float] = []
        self._place: list[tuple[int, int]] = [(0, 0)] * len(self.specs)  # (stack, position)
        self._stack_members: list[list[int]] = []
        families: dict[tuple, _Family] = {}
        for key, idx in groups.items():
            s = len(self.stacks)
            if key[0] == "single":
                self.stacks.append(adapters[idx[0]])
                families[key] = _Family(None, [s], [], [])
            else:
                self.stacks.append(_STACKS[key[0]].from_adapters([adapters[i] for i in idx]))
                fam = families.setdefault(key[:-1], _Family(_STACKS[key[0]], [], [], []))
                fam.stacks.append(s)
                for i in idx:
                    if self.specs[i].layers not in fam.layers:
                        fam.layers.append(self.specs[i].layers)
                fam.layer_index.append([fam.layers.index(self.specs[i].layers) for i in idx])
            self.stack_lrs.append(self.specs[idx[0]].lr)
            self._stack_members.append(idx)
            for pos, i in enumerate(idx):
                self._place[i] = (s, pos)
        self._families = list(families.values())
        flat = [i for idx in self._stack_members for i in idx]  # members in stack order
        order = None if flat == list(range(len(flat))) else \
            torch.tensor([flat.index(i) for i in range(len(flat))])
        self.register_buffer("_order", order, persistent=False)

    @property
    def keys(self) -> list[str]:
        return [s.key for s in self.specs]

    @property
    def num_classes(self) -> int:
        return int(self.stacks[0].num_classes)

    def forward(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        """:meth:`logits`: the bank is called as a module (e.g. wrapped in DDP)."""
        return self.logits(feats)

    @property
    def layers(self) -> list[str]:
        seen: dict[str, None] = {}
        for s in self.specs:
            seen.update(dict.fromkeys(s.layers))
        return list(seen)

    def logits(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        """Every member's logits ``(K, B, C)`` from one batch of tokens."""
        outs: list[torch.Tensor | None] = [None] * len(self.stacks)
        for fam in self._families:
            if fam.kind is None:
                s = fam.stacks[0]
                spec = self.specs[self._stack_members[s][0]]
                outs[s] = self.stacks[s](_inputs(spec, feats)).unsqueeze(0)
                continue
            tokens = _block(feats, fam.layers)
            stacks = [self.stacks[s] for s in fam.stacks]
            for s, out in zip(fam.stacks, fam.kind.run(tokens, stacks, fam.layer_index),
                              strict=True):
                outs[s] = out
        flat = torch.cat(outs)  # type: ignore[arg-type]  # (K, B, C), members in stack order
        return flat if self._order is None else flat[self._order]

    def param_groups(self) -> list[dict[str, Any]]:
        """One optimizer parameter group per stack, with its members' learning rate."""
        return [
            {"params": [p for p in stack.parameters() if p.requires_grad], "lr": lr,
             "keys": [self.specs[i].key for i in idx]}
            for stack, lr, idx in zip(self.stacks, self.stack_lrs, self._stack_members,
                                      strict=True)
        ]

    def member_state(self, i: int) -> dict[str, torch.Tensor]:
        """Member ``i``'s weights as a standalone adapter's state dict (copies)."""
        s, pos = self._place[i]
        stack = self.stacks[s]
        if isinstance(stack, _Stacked):
            return stack.member_state(pos)
        return {k: v.detach().clone() for k, v in stack.state_dict().items()}

    def load_member(self, i: int, state: dict[str, torch.Tensor]) -> None:
        """Load a standalone adapter's state dict into member ``i``."""
        s, pos = self._place[i]
        stack = self.stacks[s]
        if isinstance(stack, _Stacked):
            stack.load_member(pos, state)
        else:
            stack.load_state_dict(state)

    def member_slices(self, i: int) -> list[tuple[nn.Parameter, int | None]]:
        """Member ``i``'s trainable parameters, each with its row in a stack (``None``: the
        whole parameter is the member's)."""
        s, pos = self._place[i]
        stack = self.stacks[s]
        row = pos if isinstance(stack, _Stacked) else None
        return [(p, row) for p in stack.parameters() if p.requires_grad]

    def export(self, i: int, state: dict[str, torch.Tensor] | None = None) -> Adapter:
        """A standalone copy of member ``i`` in eval mode (with ``state`` loaded if given)."""
        s, pos = self._place[i]
        stack = self.stacks[s]
        adapter = stack.unstack(pos) if isinstance(stack, _Stacked) else copy.deepcopy(stack)
        if state is not None:
            adapter.load_state_dict(state)
        return adapter.eval()


def _block(feats: dict[str, torch.Tensor], inputs: list[tuple[str, ...]]) -> torch.Tensor:
    """The inputs' tokens as one block ``(L, B, N, D)``, without a copy when possible; an
    input of several layers joins their tokens."""
    if all(len(t) == 1 for t in inputs):
        names = [t[0] for t in inputs]
        if isinstance(feats, StackedFeats) and feats.order == names:
            return feats.block
        return torch.stack([feats[k] for k in names])
    return torch.stack([torch.cat([feats[k] for k in t], dim=1) for t in inputs])


class cosine_with_warmup:  # noqa: N801 - used as a function: LambdaLR(opt, cosine_with_warmup(...))
    """Multiplier for LambdaLR: linear warm-up, then cosine decay to zero at
    ``total_steps`` (which a time budget may shorten once the first epoch is timed)."""

    def __init__(self, total_steps: int, warmup_steps: int) -> None:
        self.total_steps, self.warmup_steps = total_steps, warmup_steps

    def __call__(self, step: int) -> float:
        if self.warmup_steps and step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def bank_loss(logits: torch.Tensor, y: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Per-member cross-entropy ``(K,)`` of logits ``(K, B, C)`` against labels ``(B,)``,
    in float32 whatever the logits' precision."""
    k, b, c = logits.shape
    losses = F.cross_entropy(logits.float().reshape(k * b, c), y.repeat(k),
                             label_smoothing=label_smoothing, reduction="none")
    return losses.view(k, b).mean(dim=1)
