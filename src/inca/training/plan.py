"""Planning a bank: which members (kind x layers x learning rate) it holds, and who they are.

A member's identity is a typed :class:`MemberSpec`; its display key
(``inca/blocks.7/lr=0.001``) is for people and reports, and nothing is parsed back out of
it: the seed that initialises a member is derived from the spec's fields.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from inca.errors import TrainingError
from inca.training.config import FitConfig

MULTI_LAYER_KINDS = ("multilayer_linear",)  # kinds that read every layer asked for


@dataclass(frozen=True)
class MemberSpec:
    """One adapter of the bank: what it is, what it reads, how fast it learns.

    ``kind`` is a registered adapter kind (``"inca"``), or a variant of one
    (``"inca:q4"``) whose settings ``FitConfig.adapter_options`` gives under that name:
    variants are axes of the bank, trained side by side and chosen on validation.

    Example:
        >>> spec = MemberSpec("inca", ("blocks.7",), 1e-3)
        >>> spec.key, spec.name
        ('inca/blocks.7/lr=0.001', 'inca/blocks.7')
        >>> spec.seed(0) == MemberSpec("inca", ("blocks.7",), 1e-2).seed(0)  # lr aside
        True
    """

    kind: str
    layers: tuple[str, ...]  # one layer, a window of adjacent layers, or every layer
    lr: float

    @property
    def adapter_kind(self) -> str:
        """The registered kind (``"inca"`` for ``"inca:q4"``)."""
        return self.kind.split(":", 1)[0]

    @property
    def reads(self) -> tuple[str, ...] | int:
        """What the member reads, as its identity knows it: its layers, or their number
        for a kind that reads every layer (whose weights do not depend on their names)."""
        if len(self.layers) > 1 and self.adapter_kind in MULTI_LAYER_KINDS:
            return len(self.layers)
        return self.layers

    @property
    def name(self) -> str:
        """The member without its learning rate, for display (``inca/blocks.7``;
        ``multilayer_linear/12layers``; ``inca/blocks.6+blocks.7`` for a window)."""
        reads = self.reads
        where = f"{reads}layers" if isinstance(reads, int) else "+".join(reads)
        return f"{self.kind}/{where}"

    @property
    def key(self) -> str:
        """The member's display key, ``<name>/lr=<lr>``."""
        return f"{self.name}/lr={self.lr:g}"

    def seed(self, base: int) -> int:
        """A seed that depends only on the member's kind and what it reads, not on the bank
        it sits in; members differing only in lr start from the same weights (so soups
        make sense).

        The hashed text is built from the fields here, not from :attr:`name` or
        :attr:`key`, so changing how members are displayed never changes a seed. It is
        frozen: changing it changes every trained result.
        """
        reads = self.reads
        text = f"{self.kind}/{reads}layers" if isinstance(reads, int) \
            else f"{self.kind}/{'+'.join(reads)}"
        return (base * 1_000_003 + zlib.crc32(text.encode())) % 2**31


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
