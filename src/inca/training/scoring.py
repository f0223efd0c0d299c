"""Scoring for the report (never for selection): test accuracy of every member and
candidate, and the chosen candidate's confusion matrix."""

from __future__ import annotations

from typing import Any

import torch

from inca._distributed import context
from inca._precision import Precision
from inca.task import Task
from inca.training.bank import AdapterBank
from inca.training.loop import BankResult
from inca.training.selection import Candidate


def _count(confusion: torch.Tensor, y: torch.Tensor, pred: torch.Tensor) -> None:
    """Add a batch's (true, predicted) pairs to ``confusion`` ``(C, C)``, rows true."""
    c = confusion.shape[0]
    confusion += torch.bincount(y * c + pred, minlength=c * c).view(c, c).to(confusion)


def task_confusion(task: Task, source: Any, batch_size: int, num_classes: int
                   ) -> torch.Tensor:
    """The confusion matrix ``(C, C)`` (rows: true class, columns: predicted) of a task on
    a source of extracted tokens (autocast as ``task.precision``)."""
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    for feats, y in source.batches(batch_size, part="share"):
        _count(confusion, y.cpu(), task.proba_from_features(feats).argmax(-1).cpu())
    return context().all_sum(confusion)


def accuracy(confusion: torch.Tensor) -> float:
    """The share of the diagonal."""
    return float(confusion.trace()) / max(int(confusion.sum()), 1)


@torch.no_grad()
def test_accuracies(bank: AdapterBank, result: BankResult, candidates: list[Candidate],
                    source: Any, batch_size: int, precision: Precision,
                    chosen: Candidate | None = None, num_classes: int = 0
                    ) -> tuple[dict[str, float], list[float], torch.Tensor | None]:
    """Test accuracy of every candidate and of every member at its best epoch, and the
    confusion matrix of ``chosen``, from one pass with the counts kept on the device
    (soups, whose weights are averages, take a pass of their own: their confusion is
    ``None`` here). For the report only, never for selection."""
    for i, m in enumerate(result.members):
        bank.load_member(i, m.state)
    bank.eval()
    plain = [c for c in candidates if not c.states]
    device = next(bank.parameters()).device
    hits = torch.zeros(len(result.members) + len(plain), dtype=torch.long, device=device)
    tracked = chosen is not None and not chosen.states and num_classes > 0
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
    total = 0
    for feats, y in source.batches(batch_size, part="share"):
        with precision.autocast():
            probs = bank.logits(feats).float().softmax(-1)  # (K, B, C)
        batch = torch.cat([(probs.argmax(-1) == y).sum(-1), *(
            (probs[c.member_indices].mean(0).argmax(-1) == y).sum().view(1) for c in plain)])
        hits += batch
        total += len(y)
        if tracked:
            _count(confusion, y, probs[chosen.member_indices].mean(0).argmax(-1))
    ctx = context()
    hits, total = ctx.all_sum(hits).cpu(), int(ctx.all_sum(torch.tensor(total)))
    acc = (hits.double() / max(total, 1)).tolist()
    k = len(result.members)
    confusion = ctx.all_sum(confusion).cpu() if tracked else None
    return {c.name: a for c, a in zip(plain, acc[k:], strict=True)}, acc[:k], confusion
