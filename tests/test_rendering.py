"""What users read, pinned: the fit report's Markdown, the model card of a task folder, and
what the per-layer plot draws, each rendered from hand-written reports that reach every
branch, compared with the snapshots in ``__snapshots__/test_rendering.ambr`` (syrupy).

A wanted change to a text is one command: ``pytest tests/test_rendering.py
--snapshot-update``, then read the snapshot's diff before committing it.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from inca.adapters import create_adapter
from inca.task import FitReport, Task
from inca.task.hub import model_card
from inca.task.report_render import layer_series, per_class_metrics

LAYERS = ["blocks.0", "blocks.1", "blocks.2", "blocks.3"]
CLASSES = ["cat", "dog", "bird"]


def _row(key: str, kind: str, layers: list[str], lr: float, acc: float, loss: float,
         **extra: Any) -> dict[str, Any]:
    return {"key": key, "kind": kind, "layers": layers, "lr": lr, "val_accuracy": acc,
            "val_loss": loss, "best_epoch": 3, "diverged_epoch": None, "parameters": 12_345,
            "percent_of_backbone": 0.0125, **extra}


def full_report(**changes: Any) -> dict[str, Any]:
    """A report with every part: a test split, both probe rows, the bank's linear member,
    an ensemble, a diverged member, a tie, per-class metrics and the run's provenance."""
    rows = [
        _row("inca/blocks.2/lr=0.001", "inca", ["blocks.2"], 1e-3, 0.91, 0.31,
             test_accuracy=0.905),
        _row("inca/blocks.3/lr=0.001", "inca", ["blocks.3"], 1e-3, 0.93, 0.25,
             test_accuracy=0.92),
        _row("inca/blocks.3/lr=0.01", "inca", ["blocks.3"], 1e-2, 0.12, 9.5, test_accuracy=0.1,
             diverged_epoch=2),
        _row("linear/blocks.3/lr=0.01", "linear", ["blocks.3"], 1e-2, 0.85, 0.48,
             test_accuracy=0.84),
        _row("linear/blocks.1/lr=0.01", "linear", ["blocks.1"], 1e-2, 0.80, 0.55,
             test_accuracy=0.79),
        _row("multilayer_linear/blocks.0+blocks.3/lr=0.01", "multilayer_linear",
             ["blocks.0", "blocks.3"], 1e-2, 0.88, 0.40, test_accuracy=0.87),
    ]
    report = {
        "backbone": {"name": "dinov2_vits14", "fingerprint": "ab12cd34", "layers": LAYERS},
        "config": {"select_by": "accuracy", "augment": "flip", "epochs": 4},
        "rows": rows,
        "candidates": [
            {"name": "best", "val_accuracy": 0.93, "val_loss": 0.25,
             "members": ["inca/blocks.3/lr=0.001"]},
            {"name": "ensemble", "val_accuracy": 0.94, "val_loss": 0.22,
             "members": ["inca/blocks.3/lr=0.001", "inca/blocks.2/lr=0.001"]},
        ],
        "chosen": "ensemble",
        "chosen_members": ["inca/blocks.3/lr=0.001", "inca/blocks.2/lr=0.001"],
        "val_accuracy": 0.94,
        "linear_probe": {"key": "linear/blocks.3/lr=0.01", "val_accuracy": 0.85,
                         "val_loss": 0.48},
        "test_accuracy": {"best": 0.92, "ensemble": 0.935, "linear_probe": 0.84},
        "timings": {"extract_seconds": 12.34, "train_seconds": 56.78, "epochs_run": 4},
        "data": {"num_train": 900, "num_val": 100, "num_test": 200, "classes": CLASSES},
        "task_parameters": 24_690,
        "mode": {"mode": "cached", "reason": "the cache fits on disk"},
        "tie": "two candidates at 0.9400: the lower validation loss chose",
        "probe": {
            "method": "logistic regression (L-BFGS)", "pool": "cls_mean",
            "l2_grid": [1e-4, 1e-2, 1.0], "max_iter": 500, "train_samples": 900,
            "val_samples": 100, "seconds": 1.25,
            "last_layer": {"layer": "blocks.3", "l2": 1e-2, "val_accuracy": 0.86,
                           "val_loss": 0.45, "test_accuracy": 0.85},
            "best_layer": {"layer": "blocks.2", "l2": 1e-4, "val_accuracy": 0.89,
                           "val_loss": 0.37, "test_accuracy": 0.875},
            "per_layer": [{"layer": n, "l2": 1e-2, "val_accuracy": a, "val_loss": lo}
                          for n, a, lo in (("blocks.1", 0.7, 0.9), ("blocks.2", 0.89, 0.37),
                                           ("blocks.3", 0.86, 0.45))],
        },
        "per_class": {"split": "test", "confusion": [[60, 5, 0], [3, 70, 2], [0, 3, 57]]},
        "inca_version": "1.2.3", "command": "inca fit --data pets --out runs/pets",
        "date": "2026-12-05T12:00:00Z", "machine": {"platform": "Linux", "cpu": "x86_64"},
    }
    report.update(changes)
    return report


def bare_report() -> dict[str, Any]:
    """No test split, the probe skipped, selection by loss, the last layer chosen alone,
    per-class metrics on validation, no linear member, no provenance."""
    r = full_report(
        config={"select_by": "loss"}, chosen="best", chosen_members=["inca/blocks.3/lr=0.001"],
        val_accuracy=0.93, linear_probe=None, test_accuracy={},
        data={"num_train": 900, "num_val": 100, "classes": CLASSES}, mode={}, tie="",
        probe={"skipped": "fewer than 2 samples of a class in validation"},
        per_class={"split": "validation", "confusion": [[30, 2, 0], [1, 35, 0], [0, 0, 0]]},
        inca_version="", command="", date="", machine={},
        candidates=[{"name": "best", "val_accuracy": 0.93, "val_loss": 0.25,
                     "members": ["inca/blocks.3/lr=0.001"]}])
    for row in r["rows"]:
        row.pop("test_accuracy")
    return r


def test_report_markdown_with_every_part(snapshot):
    assert FitReport.from_dict(full_report()).to_markdown() == snapshot


def test_report_markdown_without_a_test_split(snapshot):
    assert FitReport.from_dict(bare_report()).to_markdown() == snapshot


def test_report_markdown_when_the_last_layer_is_the_best_probe_and_no_count(snapshot):
    """One probe row says both; a test accuracy without a recorded count says so."""
    r = full_report(data={"num_train": 900, "num_val": 100, "classes": CLASSES})
    r["probe"]["best_layer"] = r["probe"]["last_layer"]
    r["linear_probe"] = {"key": "linear", "val_accuracy": 0.85}  # no layer in the key
    assert FitReport.from_dict(r).to_markdown() == snapshot


def _task(report: dict[str, Any] | None, *, n_classes: int = 3, **info: Any) -> Task:
    classes = CLASSES if n_classes == 3 else [f"class {i}" for i in range(n_classes)]
    members = [create_adapter("inca", embed_dim=32, num_classes=len(classes), num_heads=2),
               create_adapter("linear", embed_dim=32, num_classes=len(classes), pool="mean")]
    backbone = {"name": "dinov2_vits14", "fingerprint": "ab12cd34", "layers": LAYERS, **info}
    metrics = {"chosen": "ensemble", "val_accuracy": 0.94,
               "test_accuracy": {"best": 0.92, "ensemble": 0.935, "linear_probe": None}}
    task = Task(members, [["blocks.3"], ["blocks.2"]], classes, backbone,
                metrics=metrics if report else None,
                keys=["inca/blocks.3/lr=0.001", "linear/blocks.2/lr=0.01"])
    if report is not None:
        task.report = FitReport.from_dict(report)
    return task


def test_model_card_of_a_fitted_task(snapshot):
    task = _task(full_report(), source={"spec": "dinov2_vits14", "pretrained": True,
                                        "kwargs": {"input_size": 112}},
                 preprocessing={"input_size": 112, "mean": [0.485, 0.456, 0.406],
                                "std": [0.229, 0.224, 0.225], "interpolation": "bilinear"})
    task.license = "apache-2.0"
    task.metrics["classes_added"] = [{"classes": ["fox|wolf"], "train_samples": 40,
                                      "members": [{"val_accuracy": 0.9},
                                                  {"val_accuracy": 0.875}]}]
    assert model_card(task) == snapshot


def test_model_card_of_a_hub_backbone_with_many_classes_and_no_metrics(snapshot):
    """The hub id, revision and local checkpoint are named; classes past the hundredth are
    counted; names that would break a table or a code span are escaped; no license and no
    metrics are said to be missing; the default resize is bicubic."""
    task = _task(None, n_classes=103,
                 source={"spec": "hf:org/vit-tiny", "pretrained": True, "hub_id": "org/vit",
                         "revision": "v2", "checkpoint_path": "ckpt/model.safetensors",
                         "kwargs": {}},
                 preprocessing={"input_size": 224, "mean": [0.5], "std": [0.5]})
    task.classes[0] = "a|b `c`\nd"
    assert model_card(task) == snapshot


def test_model_card_of_a_bundled_backbone_without_weights(snapshot):
    """Random weights: no base model is claimed."""
    task = _task(None, source={"spec": "dinov2_vits14", "pretrained": False, "kwargs": {}})
    assert model_card(task) == snapshot


def test_model_card_says_what_was_not_recorded_without_printing_none():
    """A backbone record without its fingerprint, metrics without the chosen candidate's
    name, a step of added classes without its image count: "?" and "chosen" stand in.
    Kills hub _backbone_section mutant 21 and _metric_lines mutants 9 and 53 (each
    planted and seen to fail)."""
    task = _task(None, source={"spec": "dinov2_vits14", "pretrained": False, "kwargs": {}})
    del task.backbone_info["fingerprint"]
    task.metrics = {"val_accuracy": 0.5,
                    "classes_added": [{"classes": ["fox"], "members": [{"val_accuracy": 0.75}]},
                                      {"classes": ["owl"], "train_samples": 8}]}
    card = model_card(task)
    assert "- weights fingerprint: `?`\n" in card
    assert "- validation accuracy (chosen): 0.5000\n" in card
    assert ("- classes added after the fit: fox (? training images; validation accuracy over "
            "every class: 0.7500)\n") in card
    assert "- classes added after the fit: owl (8 training images; " in card  # no members
    assert "None" not in card


def test_layer_series_is_what_the_plot_draws():
    accuracy = layer_series(FitReport.from_dict(full_report()))
    assert accuracy == {
        "metric": "val_accuracy",
        "kinds": {"inca": {2: 0.91, 3: 0.93}, "linear": {1: 0.80, 3: 0.85}},
        "flat": {"multilayer_linear": 0.88},
        "chosen": [(2, 0.91, "inca/blocks.2/lr=0.001"), (3, 0.93, "inca/blocks.3/lr=0.001")],
        "probe": {1: 0.7, 2: 0.89, 3: 0.86}, "ensemble": 0.94}
    r = full_report(config={"select_by": "loss"})
    r["rows"][4]["val_loss"] = None  # a member never scored is left out ...
    r["probe"]["per_layer"].append({"layer": "blocks.0", "val_accuracy": 0.5, "val_loss": None})
    loss = layer_series(FitReport.from_dict(r))  # ... and the lowest loss is the best
    assert loss["metric"] == "val_loss" and loss["ensemble"] == 0.22
    assert loss["kinds"] == {"inca": {2: 0.31, 3: 0.25}, "linear": {3: 0.48}}
    assert loss["flat"] == {"multilayer_linear": 0.40}
    assert loss["probe"] == {1: 0.9, 2: 0.37, 3: 0.45}
    assert loss["chosen"] == [(2, 0.31, "inca/blocks.2/lr=0.001"),
                              (3, 0.25, "inca/blocks.3/lr=0.001")]


def test_per_class_metrics_of_a_confusion_matrix():
    rows = per_class_metrics([[8, 2, 0], [1, 9, 0], [0, 0, 0]], CLASSES)
    assert [r["class"] for r in rows] == CLASSES
    assert [r["support"] for r in rows] == [10, 10, 0]
    assert [r["precision"] for r in rows[:2]] == [pytest.approx(8 / 9), pytest.approx(9 / 11)]
    assert [r["recall"] for r in rows[:2]] == [0.8, 0.9]
    assert math.isnan(rows[2]["precision"]) and math.isnan(rows[2]["recall"])


def _drawn(fig: Any) -> dict[str, Any]:
    """What a figure shows, in words and numbers (not pixels, which vary with
    matplotlib's version)."""
    import numpy as np

    ax = fig.axes[0]
    legend = ax.get_legend()
    return {
        "title": ax.get_title(), "xlabel": ax.get_xlabel(), "ylabel": ax.get_ylabel(),
        "xticks": [t.get_text() for t in ax.get_xticklabels()],
        "yticks": [t.get_text() for t in ax.get_yticklabels()] if ax.images else None,
        "legend": [t.get_text() for t in legend.get_texts()] if legend else [],
        "lines": [(line.get_linestyle(), np.round(line.get_xdata(), 4).tolist(),
                   np.round(line.get_ydata(), 4).tolist()) for line in ax.get_lines()],
        "points": [np.round(c.get_offsets(), 4).tolist() for c in ax.collections
                   if hasattr(c, "get_offsets") and len(c.get_offsets())],
        "cells": [t.get_text() for t in ax.texts],
        "image": np.round(ax.images[0].get_array(), 4).tolist() if ax.images else None,
        "colorbar": [a.get_ylabel() for a in fig.axes[1:]],
    }


@pytest.mark.parametrize("which", ["every_part", "by_loss_without_test"])
def test_plots_draw_what_the_report_holds(which, snapshot, monkeypatch, tmp_path):
    """The per-layer plot (each kind's best per layer, the all-layer member as a line, the
    probe dashed, the ensemble, the chosen members starred) and the confusion matrix
    (rows normalized, counts in the cells), as drawn, before they are written."""
    from inca.task import report_render

    drawn = []
    save = report_render._save
    monkeypatch.setattr(report_render, "_save",
                        lambda fig, path: (drawn.append(_drawn(fig)), save(fig, path))[1])
    report = FitReport.from_dict(full_report() if which == "every_part" else bare_report())
    paths = report.write(tmp_path)
    assert paths["plot"].stat().st_size > 0 and paths["confusion"].stat().st_size > 0
    assert drawn == snapshot


@pytest.mark.parametrize("change, message", [
    (lambda r: 5, "a report is a JSON object, not int"),
    (lambda r: r.pop("rows") and r, "the report lacks rows"),
    (lambda r: r.pop("rows") and r.pop("chosen") and r, "the report lacks rows, chosen"),
    (lambda r: r.update(rows={"a": 1}) or r, "the report's rows must be a list of objects"),
    (lambda r: r.update(history=[1]) or r, "the report's history must be a list of objects"),
    (lambda r: r.update(timings=[]) or r, "the report's timings must be an object"),
    (lambda r: r.update(probe=[]) or r, "the report's probe must be an object"),
    (lambda r: r.update(per_class=5) or r, "the report's per_class must be an object"),
    (lambda r: r.update(machine="x") or r, "the report's machine must be an object"),
])
def test_a_report_that_is_not_one_is_refused_clearly(change, message):
    with pytest.raises(ValueError) as info:
        FitReport.from_dict(change(full_report()))
    assert str(info.value) == message


def test_summary_table_and_files_of_a_report(tmp_path):
    report = FitReport.from_dict(full_report(history=[{"epoch": 1}]))
    assert report.history == [{"epoch": 1}]
    assert report.summary() == {
        "chosen": "ensemble", "members": ["inca/blocks.3/lr=0.001", "inca/blocks.2/lr=0.001"],
        "val_accuracy": 0.94, "test_accuracy": {"best": 0.92, "ensemble": 0.935,
                                                "linear_probe": 0.84},
        "linear_probe": {"key": "linear/blocks.3/lr=0.01", "val_accuracy": 0.85,
                         "val_loss": 0.48}}
    assert [m["class"] for m in report.per_class_metrics()] == CLASSES
    assert FitReport.from_dict(full_report(per_class={})).per_class_metrics() == []
    table = report.to_pandas()
    assert table["layers"].tolist()[-1] == "blocks.0, blocks.3"
    assert table["chosen"].tolist() == [True, True, False, False, False, False]
    bare = FitReport.from_dict(full_report(per_class={}))
    paths = bare.write(tmp_path)
    assert sorted(paths) == ["json", "markdown", "plot"]  # no confusion matrix to draw
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "accuracy_per_layer.png", "report.json", "report.md"]
    assert FitReport.from_dict(json.loads((tmp_path / "report.json").read_text())) == bare


def test_report_markdown_of_an_older_config_and_a_probe_without_a_best_layer():
    """A config without ``select_by`` or ``augment`` (older reports): the adapters ranked
    by validation accuracy, augmentation "none"; a probe without a best-layer record: the
    last layer's row says both. Kills report to_markdown mutants 39 and 119 and
    report_render baselines mutants 12 and 13 (each planted and seen to fail)."""
    r = full_report(config={"epochs": 4})
    r["rows"][4]["val_loss"] = 0.1  # the lowest loss, but the fifth accuracy
    del r["probe"]["best_layer"]
    text = FitReport.from_dict(r).to_markdown()
    assert "augmentation: none." in text and "Selection on validation accuracy." in text
    table = text.split("## Every adapter")[1]
    keys = [row["key"] for row in r["rows"]]
    assert sorted(keys, key=lambda k: table.index(f"| {k} ")) == [
        "inca/blocks.3/lr=0.001", "inca/blocks.2/lr=0.001",
        "multilayer_linear/blocks.0+blocks.3/lr=0.01", "linear/blocks.3/lr=0.01",
        "linear/blocks.1/lr=0.01", "inca/blocks.3/lr=0.01"]
    assert ("| last-layer linear probe: logistic regression (also the best layer) | "
            "blocks.3 | 0.01 | 0.8600 | 0.4500 | 0.8500 |") in text
    assert "best-layer linear probe" not in text


def test_null_scores_of_the_probes_layers_come_back_as_nan():
    """Kills report from_dict mutants 78 and 80 (each planted and seen to fail)."""
    r = full_report()
    r["probe"]["per_layer"][0].update(val_loss=None, val_accuracy=None)
    per_layer = FitReport.from_dict(r).probe["per_layer"]
    assert math.isnan(per_layer[0]["val_loss"]) and math.isnan(per_layer[0]["val_accuracy"])
    assert per_layer[0]["layer"] == "blocks.1" and per_layer[1:] == r["probe"]["per_layer"][1:]
    r["rows"][0]["percent_of_backbone"] = None  # an adapter's share of a backbone of 0
    assert math.isnan(FitReport.from_dict(r).rows[0]["percent_of_backbone"])


def test_a_chosen_member_that_diverged_later_is_marked_both():
    """A member dropped after its best epoch keeps that epoch, and may be chosen."""
    r = full_report()
    r["rows"][1]["diverged_epoch"] = 4  # inca/blocks.3/lr=0.001, in the chosen ensemble
    text = FitReport.from_dict(r).to_markdown()
    assert ("| inca/blocks.3/lr=0.001 **(in the chosen ensemble)** (dropped: diverged in "
            "epoch 4) | 0.9300 |") in text


def test_ties_on_the_selection_measure_are_broken_by_the_other():
    from inca.task import selection_key

    by = {m: sorted([(0.8, 0.3), (0.9, 0.3), (0.9, 0.2)], key=lambda s: selection_key(*s, m))
          for m in ("loss", "accuracy")}
    assert by == {"loss": [(0.9, 0.2), (0.9, 0.3), (0.8, 0.3)],
                  "accuracy": [(0.9, 0.2), (0.9, 0.3), (0.8, 0.3)]}


def _figures(report: FitReport, monkeypatch: Any, tmp_path: Any) -> list[Any]:
    """The figures :meth:`FitReport.write` draws (per layer, then confusion), as drawn."""
    from inca.task import report_render

    figures: list[Any] = []
    save = report_render._save
    monkeypatch.setattr(report_render, "_save",
                        lambda fig, path: (figures.append(fig), save(fig, path))[1])
    report.write(tmp_path)
    return figures


def test_per_layer_plot_greys_the_baseline_stars_on_top_and_slants_the_layer_names(
        monkeypatch, tmp_path):
    """The probe's line is a grey dashed baseline (not a kind's colour), the chosen members'
    stars are drawn over every line, and the layer names are slanted 45 degrees, each ending
    at its tick, in 8-point type. Kills report_render plot_layers mutants 49, 93, 124, 130
    and 131 (each planted and seen to fail). The stars are gold."""
    from matplotlib.colors import to_rgba

    ax = _figures(FitReport.from_dict(full_report()), monkeypatch, tmp_path)[0].axes[0]
    probe = {line.get_label(): line for line in ax.get_lines()}[
        "logistic regression (baseline)"]
    assert (probe.get_color(), probe.get_linestyle()) == ("gray", "--")
    (stars,) = ax.collections
    assert stars.get_zorder() > max(line.get_zorder() for line in ax.get_lines())
    assert [tuple(c) for c in stars.get_facecolor()] == [to_rgba("gold")]
    ticks = ax.get_xticklabels()
    assert [t.get_text() for t in ticks] == LAYERS[1:]
    assert {(t.get_rotation(), t.get_ha(), t.get_fontsize()) for t in ticks} == {
        (45.0, "right", 8.0)}


def test_confusion_plot_is_sized_to_its_classes_and_writes_counts_readably(monkeypatch,
                                                                            tmp_path):
    """The figure grows with the class count (3 + 0.35 inch a class, 0.85 as tall as wide)
    beside a slim colour bar; class names in 7-point type on both axes; a count is white
    only on a cell past half its row's share (exactly half: black). Kills report_render
    plot_confusion mutants 39, 43, 68, 84 and 119 (each planted and seen to fail). The
    bar is as tall as the matrix, and its scale is 0 to 1 whatever the largest share (3/4
    here); a matrix of an older report, which did not say its split, is of the test
    split."""
    confusion = [[1, 1, 0], [0, 3, 1], [0, 1, 2]]
    report = FitReport.from_dict(full_report(per_class={"confusion": confusion}))
    fig = _figures(report, monkeypatch, tmp_path)[1]
    size = 3 + 0.35 * len(CLASSES)
    assert tuple(fig.get_size_inches()) == pytest.approx((size, size * 0.85))
    ax, bar = fig.axes
    assert bar.get_position().width < 0.1 * ax.get_position().width
    assert bar.get_position().height == pytest.approx(ax.get_position().height, rel=1e-3)
    assert ax.images[0].get_clim() == (0, 1)
    assert ax.get_title() == "confusion on test (ensemble)"
    assert [t.get_text() for t in ax.get_xticklabels()] == CLASSES
    assert {t.get_fontsize() for t in [*ax.get_xticklabels(), *ax.get_yticklabels()]} == {7.0}
    assert [(t.get_text(), t.get_color()) for t in ax.texts] == [
        ("1", "black"), ("1", "black"), ("3", "white"), ("1", "black"), ("1", "black"),
        ("2", "white")]


def test_the_decision_reads_an_old_config_and_a_chosen_task_without_a_test_score():
    """A config from before ``select_by`` was selection on accuracy; with no test score of
    the chosen task (though the probe has one), the margin is on validation."""
    from inca.task.report_render import decision

    config = {"augment": "flip", "epochs": 4}
    lines = decision(FitReport.from_dict(full_report(config=config, test_accuracy={})))
    assert "; selected on validation accuracy (validation accuracy 94.0% on 100 " in lines[0]
    assert lines[2] == ("Margin over the strongest baseline (logistic regression on `blocks.2`, "
                        "the best layer by validation): +5.0 points of validation accuracy "
                        "(94.0% against 89.0%).  ")
