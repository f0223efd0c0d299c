"""Scoring passes over a source: every member of a bank and the ensembles asked for, summed
batch by batch (:func:`evaluate`), and the argmax predictions that a validation pass may keep
(:class:`Predictions`) so that a chosen member's or ensemble's confusion matrix needs no
other pass."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from inca._distributed import context
from inca._precision import Precision
from inca.training.bank import AdapterBank
from inca.training.sources import batch_order


@dataclass
class ValScores:
    """Scores from one validation pass: each member's, then each ensemble's asked for."""

    accuracy: torch.Tensor  # (R,) float32: correct / seen, as a float32 mean of hits
    loss: torch.Tensor  # (R,) float64: mean cross-entropy of the probabilities
    seen: int
    confusion: torch.Tensor | None = None  # (C, C) long, rows true, of the row asked for
    # with keep_predictions: every row's argmax (R, N) int32 on this rank's share, in the
    # pass's order, and the labels (N,) int32 in that order
    predictions: torch.Tensor | None = None
    labels: torch.Tensor | None = None


def count_confusion(confusion: torch.Tensor, y: torch.Tensor, pred: torch.Tensor) -> None:
    """Add a batch's (true, predicted) pairs to ``confusion`` ``(C, C)``, rows true."""
    c = confusion.shape[0]
    confusion += torch.bincount(y * c + pred, minlength=c * c).view(c, c).to(confusion)


def bank_precision(bank: AdapterBank, precision: str | Precision | None) -> Precision:
    """``precision`` for the device the bank is on."""
    return Precision.of(precision, next(bank.parameters()).device)


@dataclass
class Predictions:
    """Argmax predictions on this rank's share of validation, with its labels: each
    member's at its best epoch ``(K, N)`` and each top-j ensemble's ``(N,)`` from the pass
    that scored it, all int32 on the bank's device (never probabilities: 100 members x
    50,000 images hold 20 MB).

    Every validation pass reads the same positions in the same order (``part="share"``,
    never shuffled: :func:`~inca.training.sources.batch_order`), so predictions kept from
    different passes line up with one set of labels."""

    labels: torch.Tensor  # (N,)
    members: torch.Tensor  # (K, N)
    ensembles: dict[tuple[int, ...], torch.Tensor] = field(default_factory=dict)

    @classmethod
    def of_pass(cls, scores: ValScores, k: int, groups: list[list[int]]) -> Predictions | None:
        """The predictions of a pass that kept them (rows: ``k`` members, then ``groups``)."""
        if scores.predictions is None or scores.labels is None:
            return None
        return cls(scores.labels, scores.predictions[:k],
                   {tuple(g): scores.predictions[k + j] for j, g in enumerate(groups)})

    def confusion(self, member_indices: list[int], num_classes: int) -> torch.Tensor | None:
        """The confusion matrix ``(C, C)`` (rows true) over every rank's share of a member
        (one index) or of the ensemble of ``member_indices``; ``None`` for an ensemble
        whose predictions were not kept."""
        pred = (self.members[member_indices[0]] if len(member_indices) == 1
                else self.ensembles.get(tuple(member_indices)))
        if pred is None:
            return None
        confusion = torch.zeros(num_classes, num_classes, dtype=torch.long, device=pred.device)
        count_confusion(confusion, self.labels.long(), pred.long())
        return context().all_sum(confusion).cpu()


class ScoreSums:
    """Hits and summed cross-entropy of rows of probabilities, accumulated batch by batch
    on the device (nothing that grows with the data is kept, and no wait for the device),
    summed over the ranks at the end."""

    def __init__(self, rows: int, device: torch.device | str,
                 confusion_row: int | None = None, num_classes: int = 0) -> None:
        self.hits = torch.zeros(rows, dtype=torch.long, device=device)
        self.nll = torch.zeros(rows, dtype=torch.float64, device=device)
        self.seen = 0
        self.row = confusion_row  # whose confusion matrix is counted too
        self.confusion = None if confusion_row is None else torch.zeros(
            num_classes, num_classes, dtype=torch.long, device=device)

    def add(self, probs: torch.Tensor, y: torch.Tensor, first: int = 0) -> torch.Tensor:
        """One batch: probabilities ``(R, B, C)`` (float32) of rows ``first..first + R``,
        and the labels ``(B,)``; the samples count once, with the batch's first rows.
        Returns the rows' predictions ``(R, B)``."""
        y = y.to(probs.device).long()
        rows = slice(first, first + probs.shape[0])
        pred = probs.argmax(-1)
        self.hits[rows] += (pred == y).sum(-1)
        if self.confusion is not None and rows.start <= self.row < rows.stop:
            count_confusion(self.confusion, y, pred[self.row - first])
        p = probs.gather(-1, y.expand(probs.shape[0], -1).unsqueeze(-1)).squeeze(-1)
        self.nll[rows] -= p.clamp_min(1e-12).log().double().sum(-1)
        self.seen += len(y) if first == 0 else 0
        return pred

    def result(self) -> ValScores:
        """Accuracy and mean cross-entropy over every rank's share (one wait for the device)."""
        sums = context().all_sum(torch.cat([
            self.hits.double(), self.nll,
            torch.tensor([self.seen], dtype=torch.float64, device=self.nll.device)])).cpu()
        rows = len(self.hits)
        seen = int(sums[-1])
        # the float32 mean of 0/1 hits, as the accuracy always was; the loss in float64
        acc = sums[:rows].float() / max(seen, 1)
        confusion = None if self.confusion is None else context().all_sum(self.confusion).cpu()
        return ValScores(acc, sums[rows:2 * rows] / max(seen, 1), seen, confusion)


@torch.no_grad()
def evaluate(bank: AdapterBank, source: Any, batch_size: int,
             precision: str | Precision | None,
             ensembles: list[list[int]] | tuple = (), confusion_row: int | None = None,
             num_classes: int = 0, keep_predictions: bool = False) -> ValScores:
    """Every member's accuracy and cross-entropy on a source, then those of each ensemble
    in ``ensembles`` (member indices; their probabilities averaged), from one pass; with
    ``confusion_row`` (an index into those rows), that row's confusion matrix too; with
    ``keep_predictions``, every row's argmax on this rank's share, and the labels.

    Scores are summed batch by batch: memory does not grow with the source, the members or
    the classes beyond one batch of probabilities ``(K, B, C)`` (and, when kept, the
    predictions: one int32 per row and sample). Under ``torchrun`` each rank scores a share
    and the sums are added over the ranks."""
    prec = bank_precision(bank, precision)
    was_training = bank.training
    bank.eval()
    groups = [list(g) for g in ensembles]
    k = len(bank.keys)
    device = next(bank.parameters()).device
    sums = ScoreSums(k + len(groups), device, confusion_row, num_classes)
    kept = _PassPredictions(k + len(groups), source, batch_size, device) \
        if keep_predictions else None
    for feats, y in source.batches(batch_size, part="share"):
        with prec.autocast():
            logits = bank.logits(feats)
        probs = logits.float().softmax(-1)  # (K, B, C)
        del logits
        rows = [sums.add(probs, y)]
        if groups:
            rows.append(sums.add(torch.stack([probs[g].mean(0) for g in groups]), y, first=k))
        if kept is not None:
            kept.add(torch.cat(rows), y)
    bank.train(was_training)
    scores = sums.result()
    if kept is not None:
        scores.predictions, scores.labels = kept.result()
    return scores


class _PassPredictions:
    """A pass's predictions ``(R, N)`` and labels ``(N,)`` (int32), written batch by batch
    into tensors of this rank's share's size, allocated once. Kept as a list of one small
    tensor per batch, living between each batch's large ones, they made the selection's
    peak resident memory grow 0.56 GB from 2,000 to 20,000 validation samples at 100
    members x 1,000 classes (``tests/test_selection_memory.py``); allocated once, 16 MB."""

    def __init__(self, rows: int, source: Any, batch_size: int, device: torch.device) -> None:
        n = sum(len(b) for b in batch_order(len(source), batch_size, part="share"))
        self.predictions = torch.empty(rows, n, dtype=torch.int32, device=device)
        self.labels = torch.empty(n, dtype=torch.int32, device=device)
        self.seen = 0

    def add(self, pred: torch.Tensor, y: torch.Tensor) -> None:
        at, self.seen = self.seen, self.seen + len(y)
        self.predictions[:, at:self.seen] = pred
        self.labels[at:self.seen] = y

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.predictions[:, :self.seen], self.labels[:self.seen]
