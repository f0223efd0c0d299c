"""Choosing on validation: the best adapter, a top-k ensemble, weight-averaged soups."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from inca._distributed import context
from inca._precision import Precision
from inca.adapters import member_input
from inca.task import selection_key
from inca.training.bank import AdapterBank
from inca.training.loop import BankResult, MemberResult


@dataclass
class Candidate:
    """A way to predict that was scored on validation."""

    name: str  # "best", "ensemble", "soup:<kind>/<layer>"
    member_indices: list[int]
    val_accuracy: float
    val_loss: float
    states: list[dict[str, torch.Tensor]] | None = None  # set for soups (averaged weights)

    def key(self, select_by: str) -> tuple:
        """Sort key, smaller is better; at equal scores the single adapter wins."""
        return (*selection_key(self.val_accuracy, self.val_loss, select_by), self.name != "best")


def rank_members(members: list[MemberResult], select_by: str = "loss") -> list[int]:
    """Member indices from best to worst on validation (see ``FitConfig.select_by``)."""
    return sorted(range(len(members)), key=lambda i: (
        *selection_key(members[i].val_accuracy, members[i].val_loss, select_by), i))


def scores(probs: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Accuracy and mean cross-entropy of probabilities ``(N, C)`` against ``labels``."""
    acc = float((probs.argmax(-1) == labels).float().mean())
    nll = float(-probs.clamp_min(1e-12).log().gather(-1, labels[:, None]).mean())
    return acc, nll


def best_member(result: BankResult, select_by: str = "loss") -> Candidate:
    """The single best member on validation."""
    i = rank_members(result.members, select_by)[0]
    m = result.members[i]
    return Candidate("best", [i], m.val_accuracy, m.val_loss)


def top_k_ensemble(result: BankResult, k: int, select_by: str = "loss") -> Candidate:
    """The top-k members on validation, their best-epoch probabilities averaged."""
    top = rank_members(result.members, select_by)[:k]
    probs = torch.stack([result.members[i].val_probs for i in top]).mean(0)
    return Candidate("ensemble", top, *scores(probs, result.val_labels))


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
    for (_, layers), idx in groups.items():
        if len(idx) < 2:
            continue
        states = [result.members[i].state for i in idx]
        avg = {k: torch.stack([s[k].float() for s in states]).mean(0).to(states[0][k].dtype)
               for k in states[0]}
        adapter = bank.export(idx[0], avg)
        probs, labels = [], []
        with torch.no_grad(), (precision or Precision("32")).autocast():
            for feats, y in val.batches(batch_size, part="share"):
                probs.append(adapter(member_input(layers, feats)).float().softmax(-1).cpu())
                labels.append(y.cpu().long())
        ctx = context()  # under torchrun: every rank's share, in order
        p = ctx.gather_rows(torch.cat(probs) if probs else torch.zeros(0, bank.num_classes))
        y = ctx.gather_rows(torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long))
        name = f"soup:{bank.specs[idx[0]].name}"
        out.append(Candidate(name, idx[:1], *scores(p, y), [avg]))
    return out
