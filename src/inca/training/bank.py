"""The adapter bank: K adapters (kinds x layers x learning rates) trained in one loop.

One optimizer holds one parameter group per learning rate and shape; the loss
(:func:`~inca.training.loss.bank_loss`) is the sum of the adapters' losses, so each
adapter's gradient is exactly what it would get alone. Adapters of the same kind and token
shape are computed together with stacked weights (one batched matmul for all of them)
rather than a Python loop over K. Which members a bank holds is planned in
:mod:`inca.training.plan`; their adapters are made in :mod:`inca.training.factory`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from inca.adapters import Adapter, StackedInCA, StackedLinear, member_input
from inca.adapters._folded import index_tensor
from inca.adapters.stacked import Stacked
from inca.errors import TrainingError
from inca.training.config import FitConfig
from inca.training.factory import build_adapter
from inca.training.plan import MemberSpec, plan_members
from inca.training.sources import StackedFeats

_STACKS: dict[str, type[Stacked]] = {"inca": StackedInCA, "linear": StackedLinear}


@dataclass
class _Family:
    """Stacks of one kind and token shape that can be computed together (differing in
    learning rate, and for InCA in any setting but the token LayerNorm's epsilon), sharing
    each layer's passes over its tokens."""

    kind: type[Stacked] | None  # None: a single adapter with no stacked form
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
                key: tuple = (s.adapter_kind, a.embed_dim, n_tokens,
                              _STACKS[s.adapter_kind].family_key(a.config), repr(a.config), s.lr)
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
                fam = families.setdefault(key[:4], _Family(_STACKS[key[0]], [], [], []))
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

    @classmethod
    def build(cls, specs: Sequence[MemberSpec], *, embed_dims: dict[str, int],
              token_counts: dict[str, int], num_classes: int, num_prefix_tokens: int,
              options: dict[str, Any] | None = None, seed: int = 0,
              backbone_params: int | None = None) -> AdapterBank:
        """The bank of ``specs`` (a plan, :func:`~inca.training.plan_members`, or part of
        one), each member's adapter built by :func:`~inca.training.factory.build_adapter`
        from its own seed."""
        return cls(specs, [build_adapter(s, embed_dims=embed_dims, num_classes=num_classes,
                                         num_prefix_tokens=num_prefix_tokens, options=options,
                                         seed=seed, backbone_params=backbone_params)
                           for s in specs], token_counts)

    @classmethod
    def from_plan(cls, layers: Sequence[str], config: FitConfig, *, embed_dims: dict[str, int],
                  token_counts: dict[str, int], num_classes: int, num_prefix_tokens: int,
                  backbone_params: int | None = None) -> AdapterBank:
        """The bank ``config`` asks for over ``layers``: its members planned by
        :func:`~inca.training.plan_members` (no window across a change of width), built
        with the config's adapter options and seed. How ``inca.fit``, the benchmarks and the
        tests make one; :meth:`build` takes a plan of one's own."""
        return cls.build(plan_members(layers, config, embed_dims), embed_dims=embed_dims,
                         token_counts=token_counts, num_classes=num_classes,
                         num_prefix_tokens=num_prefix_tokens, options=config.adapter_options,
                         seed=config.seed, backbone_params=backbone_params)

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
                outs[s] = self.stacks[s](member_input(spec.layers, feats)).unsqueeze(0)
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

    @torch.no_grad()
    def mask_grads(self, keep: torch.Tensor) -> None:
        """Zero the gradients of the members where ``keep`` ``(K,)`` is false, on the
        device (no wait for it): their NaN or infinite gradients stay out of the step."""
        for stack, idx in zip(self.stacks, self._stack_members, strict=True):
            mask = keep[index_tensor(tuple(idx), keep.device)]  # (K_s,)
            for p in stack.parameters():
                if p.grad is not None:
                    m = mask.view(-1, *[1] * (p.dim() - 1)) if isinstance(stack, Stacked) \
                        else mask.view([1] * p.dim())
                    p.grad.copy_(torch.where(m, p.grad, 0.0))

    def member_state(self, i: int) -> dict[str, torch.Tensor]:
        """Member ``i``'s weights as a standalone adapter's state dict (copies)."""
        s, pos = self._place[i]
        stack = self.stacks[s]
        if isinstance(stack, Stacked):
            return stack.member_state(pos)
        return {k: v.detach().clone() for k, v in stack.state_dict().items()}

    def load_member(self, i: int, state: dict[str, torch.Tensor]) -> None:
        """Load a standalone adapter's state dict into member ``i``."""
        s, pos = self._place[i]
        stack = self.stacks[s]
        if isinstance(stack, Stacked):
            stack.load_member(pos, state)
        else:
            stack.load_state_dict(state)

    def member_slices(self, i: int) -> list[tuple[nn.Parameter, int | None]]:
        """Member ``i``'s trainable parameters, each with its row in a stack (``None``: the
        whole parameter is the member's)."""
        s, pos = self._place[i]
        stack = self.stacks[s]
        row = pos if isinstance(stack, Stacked) else None
        return [(p, row) for p in stack.parameters() if p.requires_grad]

    def export(self, i: int, state: dict[str, torch.Tensor] | None = None) -> Adapter:
        """A standalone copy of member ``i`` in eval mode (with ``state`` loaded if given)."""
        s, pos = self._place[i]
        stack = self.stacks[s]
        adapter = stack.unstack(pos) if isinstance(stack, Stacked) else copy.deepcopy(stack)
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
