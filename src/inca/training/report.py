"""Building the fit report from a bank's results (the report itself: :mod:`inca.task.report`,
since it is saved with the task)."""

from __future__ import annotations

from inca._machine import machine, utc_now
from inca._version import __version__
from inca.task.report import FitReport, selection_key

__all__ = ["FitReport", "build_report"]


def build_report(*, backbone, config, specs, result, params, candidates, chosen, baseline,
                 tests, extract_seconds, num_train, num_val, classes, task_parameters,
                 mode=None, member_tests=None, probe=None, per_class=None, num_test=None,
                 device=None) -> FitReport:
    """The report of a fit: every member's row (bank order), the candidates, the choice and
    how a tie was broken, the baselines, the chosen task's confusion matrix, timings, data
    sizes, and when, with which inca and on what machine (``device``: the one used) it ran.
    The command is ``"python API"``; the CLI replaces it with its command line."""
    rows = [
        {
            "key": s.key, "kind": s.kind, "layers": list(s.layers), "lr": s.lr,
            "val_accuracy": m.val_accuracy, "val_loss": m.val_loss,
            "best_epoch": m.best_epoch + 1, "diverged_epoch": m.diverged_epoch,
            "parameters": p["parameters"],
            "percent_of_backbone": p["percent_of_backbone"],
        }
        for s, m, p in zip(specs, result.members, params, strict=True)
    ]
    if member_tests is not None:  # reported, never used for selection
        for row, acc in zip(rows, member_tests, strict=True):
            row["test_accuracy"] = acc
    ranked = sorted(rows, key=lambda r: selection_key(r["val_accuracy"], r["val_loss"],
                                                     config.select_by))
    tie = ""
    if (config.select_by == "accuracy" and len(ranked) > 1
            and ranked[0]["val_accuracy"] == ranked[1]["val_accuracy"]):
        tied = [r for r in ranked if r["val_accuracy"] == ranked[0]["val_accuracy"]]
        tie = (f"{len(tied)} adapters share the best validation accuracy "
               f"({ranked[0]['val_accuracy']:.4f}); the lowest validation loss chose "
               f"{ranked[0]['key']} ({ranked[0]['val_loss']:.4f} against "
               f"{ranked[1]['val_loss']:.4f} for {ranked[1]['key']})")
    keys = [s.key for s in specs]
    lp = None
    if baseline is not None:
        m = result.members[baseline]
        lp = {"key": keys[baseline], "val_accuracy": m.val_accuracy, "val_loss": m.val_loss}
    return FitReport(
        backbone=backbone, config=config.to_dict(), rows=rows,
        candidates=[{"name": c.name, "members": [keys[i] for i in c.member_indices],
                     "val_accuracy": c.val_accuracy, "val_loss": c.val_loss}
                    for c in candidates],
        chosen=chosen.name, chosen_members=[keys[i] for i in chosen.member_indices],
        val_accuracy=chosen.val_accuracy, linear_probe=lp, test_accuracy=dict(tests),
        timings={"extract_seconds": extract_seconds, "train_seconds": result.train_seconds,
                 "epochs_run": result.epochs_run},
        data={"num_train": num_train, "num_val": num_val,
              **({} if num_test is None else {"num_test": num_test}), "classes": list(classes)},
        task_parameters=task_parameters, history=result.history, mode=dict(mode or {}),
        tie=tie, probe=dict(probe or {}), per_class=dict(per_class or {}),
        inca_version=__version__, command="python API", date=utc_now(),
        machine=machine(device),
    )
