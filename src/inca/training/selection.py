"""Choosing on validation: the best adapter, a top-k ensemble, weight-averaged soups."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from inca._precision import Precision
from inca.adapters import member_input
from inca.errors import TrainingError
from inca.task import selection_key
from inca.training.bank import AdapterBank
from inca.training.evaluation import ScoreSums
from inca.training.loop import BankResult, ensemble_members, rank_members


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


def best_member(result: BankResult, select_by: str = "loss") -> Candidate:
    """The single best member on validation."""
    i = rank_members(result.members, select_by)[0]
    m = result.members[i]
    return Candidate("best", [i], m.val_accuracy, m.val_loss)


def top_k_ensemble(result: BankResult, k: int, select_by: str = "loss") -> Candidate:
    """The top-k members on validation, their best-epoch probabilities averaged.

    :func:`~inca.training.loop.train_bank` scored it (for every k up to
    ``config.ensemble_k``, ranked by ``config.select_by``) without keeping any member's
    probabilities."""
    top = ensemble_members(result.members, k, select_by)
    if tuple(top) not in result.ensembles:
        raise TrainingError(
            f"the top-{k} ensemble by {select_by} was not scored during training; train "
            f"with ensemble_k >= {k} and select_by={select_by!r}")
    return Candidate("ensemble", top, *result.ensembles[tuple(top)])


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
        sums = ScoreSums(1, next(bank.parameters()).device)  # batch by batch, all ranks
        # the bank's own device when no precision is given (a default one is on the CPU)
        prec = precision or Precision("32", next(bank.parameters()).device)
        with torch.no_grad(), prec.autocast():
            for feats, y in val.batches(batch_size, part="share"):
                sums.add(adapter(member_input(layers, feats)).float().softmax(-1)[None], y)
        scores = sums.result()
        name = f"soup:{bank.specs[idx[0]].name}"
        out.append(Candidate(name, idx[:1], float(scores.accuracy[0]), float(scores.loss[0]),
                             [avg]))
    return out
