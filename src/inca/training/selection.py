"""Choosing on validation: the best adapter, a top-k ensemble, weight-averaged soups."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from inca._precision import Precision
from inca.training.bank import AdapterBank, MemberSpec
from inca.training.loop import BankResult, MemberResult


@dataclass
class Candidate:
    """A way to predict that was scored on validation."""

    name: str  # "best", "ensemble", "soup:<kind>/<layer>"
    member_indices: list[int]
    val_accuracy: float
    states: list[dict[str, torch.Tensor]] | None = None  # set for soups (averaged weights)


def rank_members(members: list[MemberResult]) -> list[int]:
    """Member indices from best to worst: validation accuracy, then lower validation loss."""
    return sorted(range(len(members)),
                  key=lambda i: (-members[i].val_accuracy, members[i].val_loss, i))


def ensemble_accuracy(result: BankResult, indices: list[int]) -> float:
    """Validation accuracy of averaging the members' best-epoch probabilities."""
    probs = torch.stack([result.members[i].val_probs for i in indices]).mean(0)
    return float((probs.argmax(-1) == result.val_labels).float().mean())


def top_k_ensemble(result: BankResult, k: int) -> Candidate:
    """The top-k members by validation accuracy, probabilities averaged."""
    top = rank_members(result.members)[:k]
    return Candidate("ensemble", top, ensemble_accuracy(result, top))


def soups(bank: AdapterBank, result: BankResult, val, batch_size: int,
          precision: Precision | None = None) -> list[Candidate]:
    """Weight averages of the same-(kind, layer) members over the learning-rate grid.

    Members of one (kind, layer) start from the same initialisation (their seed ignores
    the lr), the setting where weight averaging works; each soup is still scored on
    validation like any other candidate rather than assumed good.
    """
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, s in enumerate(bank.specs):
        groups[(s.kind, s.layers)].append(i)
    out = []
    for (kind, layers), idx in groups.items():
        if len(idx) < 2:
            continue
        states = [result.members[i].state for i in idx]
        avg = {k: torch.stack([s[k].float() for s in states]).mean(0).to(states[0][k].dtype)
               for k in states[0]}
        adapter = bank.export(idx[0], avg)
        correct = total = 0
        with torch.no_grad(), (precision or Precision("32")).autocast():
            for feats, y in val.batches(batch_size):
                x = feats[layers[0]] if len(layers) == 1 else [feats[k] for k in layers]
                correct += int((adapter(x).argmax(-1) == y).sum())
                total += len(y)
        name = f"soup:{MemberSpec(kind, layers, 0).key.rsplit('/', 1)[0]}"
        out.append(Candidate(name, idx[:1], correct / max(total, 1), [avg]))
    return out
