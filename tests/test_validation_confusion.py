"""The chosen task's confusion matrix on validation (no test split) without another pass.

Training keeps every member's argmax predictions at its best epoch, and those of the top-j
ensembles from the pass that scored them; a chosen member's or ensemble's matrix is counted
from them. It must equal what the chosen task's own pass over validation counts
(:func:`~inca.training.scoring.task_confusion`, the way it was counted before), and in
streaming mode, where every pass runs the backbone again, no such pass is made unless a soup
(averaged weights, never scored by the bank) is chosen.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from planted import CLASSES, planted_backbone, planted_data
from tokens import LAYERS, C, token_bank, token_source

import inca
import inca.training.fitting as fitting
import inca.training.loop as loop
from inca._precision import Precision
from inca.training import FitConfig, train_bank
from inca.training.scoring import task_confusion, validation_confusion
from inca.training.selection import Candidate

# a stand-in for the backbone: tasks built on tokens need its description and device only
_TOKENS = SimpleNamespace(describe=lambda: {"name": "tokens", "layers": LAYERS},
                          device=torch.device("cpu"))


@pytest.mark.parametrize(("lrs", "epochs", "select_by", "final_pass"), [
    ((3e-3, 1e-2), 3, "loss", False),  # the top members peak in the last epoch: its pass
    ((0.3, 1.0), 4, "loss", True),  # some peak earlier: one more pass from the best states
    ((0.3, 1.0), 4, "accuracy", True),
])
def test_kept_predictions_count_each_members_and_candidates_own_task_confusion(
        monkeypatch, lrs, epochs, select_by, final_pass):
    """Every member's matrix from its kept predictions, and every candidate's (the best
    member, the top-k ensemble, each soup) from :func:`validation_confusion`, equal the
    matrix of its task's own pass over validation."""
    calls, real = [], loop.evaluate
    monkeypatch.setattr(loop, "evaluate", lambda *a, **k: calls.append(a) or real(*a, **k))
    config = FitConfig(layers=LAYERS, kinds=("inca", "linear"), lrs=lrs, epochs=epochs,
                       batch_size=32, patience=0, select_by=select_by, ensemble_k=3,
                       soup=True, precision="32")
    # a weak signal: members disagree, and the ensemble with each of them
    bank, val = token_bank(config), token_source(64, 1, strength=0.5)
    res = train_bank(bank, token_source(128, 0, strength=0.5), val, config, progress=False)
    assert len(calls) == res.epochs_run + final_pass  # the path this case is meant to take
    if final_pass:  # members whose best epoch is not the last: their rows are not its
        assert {m.best_epoch for m in res.members} > {res.epochs_run - 1}
    classes = [f"c{i}" for i in range(C)]

    def own_pass(candidate: Candidate) -> tuple[torch.Tensor, torch.Tensor]:
        task = fitting._task_from(candidate, bank, res, classes, _TOKENS, config)
        return task, task_confusion(task, val, 16, C)

    matrices = []
    for i, m in enumerate(res.members):
        _, expected = own_pass(Candidate("best", [i], m.val_accuracy, m.val_loss))
        assert torch.equal(res.predictions.confusion([i], C), expected), m.key
        matrices.append(expected.tolist())
    assert len({str(x) for x in matrices}) > len(matrices) // 2  # members told apart
    candidates = fitting._candidates(bank, res, val, config, Precision("32", "cpu"))
    assert [c.name for c in candidates][:2] == ["best", "ensemble"] and len(candidates) > 2
    assert len(candidates[1].member_indices) == 3
    for c in candidates:
        task, expected = own_pass(c)
        assert torch.equal(validation_confusion(task, res, c, val, 16, C), expected), c.name
    ensemble = res.predictions.confusion(candidates[1].member_indices, C)
    assert ensemble.tolist() not in matrices  # the ensemble's own predictions, no member's


class _Counting(fitting.StreamingSource):
    """A streaming source counting its passes (each one a backbone pass over its images)."""

    made: list[_Counting] = []

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.passes = 0
        _Counting.made.append(self)

    def batches(self, *args, **kwargs):
        self.passes += 1
        return super().batches(*args, **kwargs)


@pytest.mark.parametrize("chosen", ["best", "ensemble", "soup"])
def test_streaming_fit_counts_the_chosen_validation_confusion_without_another_pass(
        monkeypatch, chosen):
    """``inca.fit`` in streaming mode without a test split: after training, validation is
    read only to score the soups, and once more only when a soup is chosen (here made the
    best on validation); the report's matrix is the chosen task's on validation."""
    monkeypatch.setattr(_Counting, "made", [])
    monkeypatch.setattr(fitting, "StreamingSource", _Counting)
    after_training = []

    def train(bank, train_src, val_src, *a, **k):
        result = loop.train_bank(bank, train_src, val_src, *a, **k)
        after_training.append(val_src.passes)
        return result

    def winning(make):  # the candidate(s) ``make`` returns, scored best on validation
        def wrapped(*a, **k):
            got = make(*a, **k)
            won = [Candidate(c.name, c.member_indices, 1.0, 0.0, c.states)
                   for c in (got if isinstance(got, list) else [got])]
            return won if isinstance(got, list) else won[0]
        return wrapped

    monkeypatch.setattr(fitting, "train_bank", train)
    name = {"best": "best_member", "ensemble": "top_k_ensemble", "soup": "soups"}[chosen]
    monkeypatch.setattr(fitting, name, winning(getattr(fitting, name)))
    task = inca.fit(planted_backbone(), planted_data(96, 0), layers=["stem", "block1"],
                    kinds=("inca", "linear"), lrs=(3e-3, 1e-2), epochs=2, batch_size=16,
                    patience=0, ensemble_k=3, soup=True, mode="streaming", augment=False,
                    progress=False, num_workers=0)
    report = task.report
    assert report.chosen.startswith(chosen) and report.per_class["split"] == "validation"
    assert len(task.members) == (3 if chosen == "ensemble" else 1)
    train_src, val_src = _Counting.made
    soups = [c for c in report.candidates if c["name"].startswith("soup:")]
    assert len(soups) == 4  # (inca, linear) x (stem, block1), each over the 2 lrs
    assert val_src.passes - after_training[0] == len(soups) + (chosen == "soup")
    expected = task_confusion(task, val_src, 16, CLASSES)
    assert report.per_class["confusion"] == expected.tolist()
    assert int(expected.sum()) == report.data["num_val"]
