"""Scoring for the report (never for selection): test accuracy of every member and
candidate, and the chosen candidate's confusion matrix."""

from __future__ import annotations

from typing import Any

import torch

from inca._distributed import context
from inca._precision import Precision
from inca.task import Task
from inca.training.bank import AdapterBank
from inca.training.evaluation import count_confusion, evaluate
from inca.training.loop import BankResult
from inca.training.selection import Candidate


def task_confusion(task: Task, source: Any, batch_size: int, num_classes: int
                   ) -> torch.Tensor:
    """The confusion matrix ``(C, C)`` (rows: true class, columns: predicted) of a task on
    a source of extracted tokens (autocast as ``task.precision``)."""
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    for feats, y in source.batches(batch_size, part="share"):
        count_confusion(confusion, y.cpu(), task.proba_from_features(feats).argmax(-1).cpu())
    return context().all_sum(confusion)


def validation_confusion(task: Task, result: BankResult, chosen: Candidate, source: Any,
                         batch_size: int, num_classes: int) -> torch.Tensor:
    """The chosen candidate's confusion matrix on validation: a member's or an ensemble's
    from the predictions that training kept (no other pass over the data, which in
    streaming mode would run the backbone again), a soup's (averaged weights, never scored
    by the bank) from a pass of its own, as :func:`task_confusion`."""
    kept = result.predictions
    matrix = None if chosen.states or kept is None else kept.confusion(
        chosen.member_indices, num_classes)
    return task_confusion(task, source, batch_size, num_classes) if matrix is None else matrix


def accuracy(confusion: torch.Tensor) -> float:
    """The share of the diagonal."""
    return float(confusion.trace()) / max(int(confusion.sum()), 1)


def test_accuracies(bank: AdapterBank, result: BankResult, candidates: list[Candidate],
                    source: Any, batch_size: int, precision: Precision,
                    chosen: Candidate | None = None, num_classes: int = 0
                    ) -> tuple[dict[str, float], list[float], torch.Tensor | None]:
    """Test accuracy of every candidate and of every member at its best epoch, and the
    confusion matrix of ``chosen``, from one :func:`evaluate` pass (soups, whose weights
    are averages, take a pass of their own: their confusion is ``None`` here). For the
    report only, never for selection."""
    for i, m in enumerate(result.members):
        bank.load_member(i, m.state)
    plain = [c for c in candidates if not c.states]
    k = len(result.members)
    row = next((k + j for j, c in enumerate(plain) if c is chosen), None) \
        if num_classes > 0 else None
    scores = evaluate(bank, source, batch_size, precision,
                      [c.member_indices for c in plain], row, num_classes)
    acc = scores.accuracy.tolist()
    return ({c.name: a for c, a in zip(plain, acc[k:], strict=True)}, acc[:k],
            scores.confusion)
