"""Class-incremental learning with Open-InCA: add classes without touching the old ones."""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

from inca.adapters import OpenInCAAdapter
from inca.errors import TrainingError
from inca.training.bank import AdapterBank
from inca.training.config import FitConfig
from inca.training.loop import train_bank
from inca.training.plan import MemberSpec


def add_classes(
    adapter: OpenInCAAdapter,
    layer: str,
    num_new: int,
    train: Any,
    val: Any,
    config: FitConfig | None = None,
    *,
    progress: bool = False,
) -> OpenInCAAdapter:
    """Extend a trained Open-InCA adapter with ``num_new`` classes, training only them.

    The shared attention and every existing class's query and head are frozen (separate
    tensors with no gradient), so the old classes' logits are exactly what they were.
    Only the new classes' queries and heads learn, from ``train`` (whose labels may cover
    old and new classes: old-class samples teach the new heads what not to fire on).

    Args:
        adapter: the trained adapter (left unchanged; a copy is extended).
        layer: the layer it reads.
        num_new: classes to add; they get labels ``C_old .. C_old + num_new - 1``.
        train: a source of training batches (see :mod:`inca.training.sources`).
        val: a source of validation batches (best epoch kept).
        config: epochs, schedule; the first learning rate of ``config.lrs`` is used.
        progress: show a progress bar.

    Returns:
        The extended adapter, with ``C_old + num_new`` classes.
    """
    if not isinstance(adapter, OpenInCAAdapter):
        raise TrainingError(f"only open_inca adapters can add classes, got {adapter.kind!r}")
    config = config or FitConfig()
    extended = copy.deepcopy(adapter).add_classes(num_new, freeze_old=True)
    spec = MemberSpec("open_inca", (layer,), config.lrs[0])
    bank = AdapterBank([spec], [extended])
    result = train_bank(bank, train, val, replace(config, lrs=(config.lrs[0],)),
                        progress=progress)
    return bank.export(0, result.members[0].state)
