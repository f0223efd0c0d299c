"""Reports a user can trust at a glance (issue 21, point 5): the baseline probe at its
strongest, the decision first with its interval and test count, per-class metrics, where
and how the run was made, and a per-layer plot of the selection's own measure."""

from __future__ import annotations

import datetime
import json
import math
import platform

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from planted import planted_backbone, planted_data

import inca
from inca.task import FitReport
from inca.task.report_render import layer_series, wilson_interval
from inca.training.probe import L2_GRID, fit_layer, fit_logistic

CLASSES = 4


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    test = planted_data(120, 1)
    task = inca.fit(planted_backbone(), planted_data(240, 0), test=test, layers="all",
                    kinds=("inca", "linear"), lrs=(1e-2,), epochs=4, batch_size=32,
                    patience=0, cache_dtype="float32", progress=False, num_workers=0,
                    cache_dir=tmp_path_factory.mktemp("cache"))
    return task, test


def _separable(n: int, d: int, c: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = (x @ torch.randn(d, c, generator=g) + 2 * torch.randn(n, c, generator=g)).argmax(-1)
    return x, y


@pytest.mark.parametrize("l2", [1e-1, 1e-3])
def test_probe_reaches_the_optimum_scikit_learn_finds(l2):
    """The probe is fitted to convergence: its objective equals the optimum of
    scikit-learn's LogisticRegression (C = 1 / (l2 n)) on the same features."""
    sklearn = pytest.importorskip("sklearn.linear_model")
    x, y = _separable(300, 24, CLASSES, 0)

    def objective(w, b):
        return float(F.cross_entropy(x @ w + b, y) + 0.5 * l2 * w.pow(2).sum())

    w, b, _ = fit_logistic(x, y, CLASSES, l2)
    ref = sklearn.LogisticRegression(C=1 / (l2 * len(y)), tol=1e-10, max_iter=10_000)
    ref.fit(x.double().numpy(), y.numpy())
    best = objective(torch.tensor(ref.coef_.T, dtype=torch.float32),
                     torch.tensor(ref.intercept_, dtype=torch.float32))
    assert objective(w, b) == pytest.approx(best, rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("scale", [1.0, 0.01])
def test_probe_penalty_is_the_one_validation_prefers(scale):
    """On standardized features (per feature, from the training samples), whatever the
    features' own scale."""
    x, y = _separable(400, 16, CLASSES, 1)
    x = x * scale
    fit = fit_layer(x[:300], y[:300], x[300:], y[300:], CLASSES, "loss")
    mu, sd = x[:300].mean(0), x[:300].std(0)
    losses = {}
    for l2 in L2_GRID:
        w, b, _ = fit_logistic((x[:300] - mu) / sd, y[:300], CLASSES, l2)
        losses[l2] = float(F.cross_entropy((x[300:] - mu) / sd @ w + b, y[300:]))
    assert fit["l2"] == min(losses, key=losses.get)
    assert fit["val_loss"] == pytest.approx(losses[fit["l2"]], rel=1e-3)


def test_report_has_probe_rows_for_the_last_and_the_best_layer(fitted):
    task, _ = fitted
    probe = task.report.probe
    assert probe["last_layer"]["layer"] == "block3"
    assert probe["best_layer"]["layer"] in {"stem", "block1"}  # where the label is linear
    assert probe["best_layer"]["val_accuracy"] > 0.75
    assert probe["last_layer"]["val_accuracy"] < 0.6  # the label is washed out there
    assert {p["layer"] for p in probe["per_layer"]} == {"stem", "block1", "wash", "block3"}
    assert 0 <= probe["best_layer"]["test_accuracy"] <= 1
    text = task.report.to_markdown()
    assert "last-layer linear probe: logistic regression" in text
    assert "best-layer linear probe: logistic regression" in text


def test_wilson_interval_matches_known_values():
    lo, hi = wilson_interval(0.9, 100)  # Wilson's interval for 90/100
    assert (lo, hi) == (pytest.approx(0.8256, abs=1e-4), pytest.approx(0.9448, abs=1e-4))
    lo, hi = wilson_interval(1.0, 20)  # never past 1, and not of width 0 at 20/20
    assert hi == 1.0 and lo == pytest.approx(0.8389, abs=1e-4)
    assert all(math.isnan(v) for v in wilson_interval(0.5, 0))


def test_report_leads_with_the_decision_its_interval_and_the_test_count(fitted):
    task, test = fitted
    report = task.report
    assert report.data["num_test"] == len(test)
    acc = report.test_accuracy[report.chosen]
    lo, hi = report.test_interval()
    assert (lo, hi) == wilson_interval(acc, len(test)) and lo < acc < hi
    text = report.to_markdown()
    head = text.split("## ")[0]  # what comes before the first section
    assert f"Chosen: {report.chosen}" in head
    assert all(f"`{k}`" in head for k in report.chosen_members)
    assert f"{100 * acc:.1f}%" in head and f"on **{len(test)} test images**" in head
    assert f"95% interval {100 * lo:.1f}% to {100 * hi:.1f}%" in head
    assert "Cost: extraction" in head and "Margin over the strongest baseline" in head
    order = [text.index(s) for s in ("## Baselines", "## Per class", "## Every adapter")]
    assert order == sorted(order)


def test_per_class_metrics_are_the_chosen_tasks_on_the_test_set(fitted):
    task, test = fitted
    images, labels = zip(*(test[i] for i in range(len(test))), strict=True)
    pred = task.predict_proba(list(images)).argmax(-1).numpy()
    expected = np.zeros((CLASSES, CLASSES), dtype=int)
    np.add.at(expected, (np.asarray(labels), pred), 1)  # rows: true class
    assert task.report.per_class["split"] == "test"
    assert np.array_equal(np.asarray(task.report.per_class["confusion"]), expected)
    metrics = task.report.per_class_metrics()
    for i, m in enumerate(metrics):
        assert m["support"] == expected[i].sum()
        assert m["recall"] == pytest.approx(expected[i, i] / expected[i].sum())
        assert m["precision"] == pytest.approx(expected[i, i] / max(expected[:, i].sum(), 1))
    assert f"| c0 | {expected[0].sum()} |" in task.report.to_markdown()


def test_without_a_test_set_per_class_metrics_are_the_chosen_tasks_on_validation(tmp_path):
    val = planted_data(80, 2)
    task = inca.fit(planted_backbone(), planted_data(160, 0), val=val, layers="all",
                    kinds=("inca",), lrs=(1e-2,), epochs=2, batch_size=32, patience=0,
                    cache_dtype="float32", progress=False, num_workers=0, cache_dir=tmp_path)
    images, labels = zip(*(val[i] for i in range(len(val))), strict=True)
    pred = task.predict_proba(list(images)).argmax(-1).numpy()
    expected = np.zeros((CLASSES, CLASSES), dtype=int)
    np.add.at(expected, (np.asarray(labels), pred), 1)
    assert task.report.per_class["split"] == "validation"
    assert np.array_equal(np.asarray(task.report.per_class["confusion"]), expected)


def test_report_json_says_which_inca_how_when_and_on_what(fitted, tmp_path):
    task, _ = fitted
    files = task.report.write(tmp_path)
    raw = files["json"].read_text()
    saved = json.loads(raw)
    assert saved["inca_version"] == inca.__version__
    assert saved["command"] == "python API"
    when = datetime.datetime.fromisoformat(saved["date"])
    assert when.utcoffset() == datetime.timedelta(0)
    assert abs(datetime.datetime.now(datetime.timezone.utc) - when) < datetime.timedelta(
        hours=1)
    assert saved["machine"]["system"] == platform.system() and saved["machine"]["cpu"]
    assert platform.node() not in raw  # no host name
    assert files["confusion"].read_bytes()[:4] == b"\x89PNG"


def test_per_layer_plot_draws_the_selection_measure_and_stars_the_chosen(fitted):
    task, _ = fitted
    report = task.report
    layers = report.backbone["layers"]
    assert report.config["select_by"] == "loss"
    series = layer_series(report)
    assert series["metric"] == "val_loss"
    for kind, per in series["kinds"].items():
        for i, v in per.items():
            assert v == min(r["val_loss"] for r in report.rows
                            if r["kind"] == kind and r["layers"] == [layers[i]])
    rows = {r["key"]: r for r in report.rows}
    assert sorted(series["chosen"]) == sorted(
        (layers.index(rows[k]["layers"][-1]), rows[k]["val_loss"], k)
        for k in report.chosen_members)
    by_acc = FitReport.from_dict({**report.to_dict(),
                                  "config": {**report.config, "select_by": "accuracy"}})
    assert layer_series(by_acc)["metric"] == "val_accuracy"


def test_reports_written_before_these_fields_still_load_and_render(fitted):
    task, _ = fitted
    old = json.loads(json.dumps(task.report.to_dict()))
    for key in ("probe", "per_class", "inca_version", "command", "date", "machine"):
        del old[key]
    del old["data"]["num_test"]
    report = FitReport.from_dict(old)
    assert report.probe == {} and report.test_interval() is None
    assert report.per_class_metrics() == []
    text = report.to_markdown()
    assert "Test accuracy" in text and "## Every adapter" in text
    # NaN (saved as null) in the probe comes back as NaN
    new = json.loads(json.dumps(task.report.to_dict()))
    new["probe"]["best_layer"]["val_loss"] = None
    assert math.isnan(FitReport.from_dict(new).probe["best_layer"]["val_loss"])


def _built(*, num_test: int | None, baseline: int | None = 1):
    """A report built from stand-in bank results: two members tied on validation accuracy
    (``b`` has the lower loss), selection by accuracy."""
    from types import SimpleNamespace as NS

    from inca.training.report import build_report

    specs = [NS(key=k, kind="linear", layers=["block3"], lr=1e-2) for k in ("a", "b")]
    members = [NS(val_accuracy=0.9, val_loss=loss, best_epoch=1, diverged_epoch=None)
               for loss in (0.3, 0.2)]
    result = NS(members=members, train_seconds=1.5, epochs_run=2, history=[])
    best = NS(name="best", member_indices=[1], val_accuracy=0.9, val_loss=0.2)
    config = NS(select_by="accuracy", to_dict=lambda: {"select_by": "accuracy"})
    return build_report(
        backbone={"name": "planted", "fingerprint": "ab12"}, config=config, specs=specs,
        result=result, params=[{"parameters": 68, "percent_of_backbone": 4.25}] * 2,
        candidates=[best], chosen=best, baseline=baseline, tests={"best": 0.8}, extract_seconds=0.5,
        num_train=240, num_val=60, classes=["c0", "c1"], task_parameters=68,
        num_test=num_test)


def test_build_report_says_how_a_tie_was_broken_and_what_the_baseline_scored():
    """Built in the test itself (not in a shared fixture), so that every field is checked
    on the report this call made. Kills training.report build_report mutants 102 and 113
    (checked by planting each)."""
    report = _built(num_test=None)
    assert report.tie == ("2 adapters share the best validation accuracy (0.9000); the "
                          "lowest validation loss chose b (0.2000 against 0.3000 for a)")
    assert report.linear_probe == {"key": "b", "val_accuracy": 0.9, "val_loss": 0.2}
    assert report.chosen == "best" and report.chosen_members == ["b"]
    assert _built(num_test=None, baseline=None).linear_probe is None


def test_build_report_records_the_test_count_only_with_a_test_set_and_the_provenance():
    """No test set: no ``num_test`` key at all (not null). Every report says which inca
    made it, that it was the Python API, and when (UTC, now). Kills build_report mutants
    134, 153, 176 and 192 (checked by planting each)."""
    report = _built(num_test=None)
    assert report.data == {"num_train": 240, "num_val": 60, "classes": ["c0", "c1"]}
    assert report.test_interval() is None
    assert _built(num_test=50).data["num_test"] == 50
    assert report.inca_version == inca.__version__
    assert report.command == "python API"
    when = datetime.datetime.fromisoformat(report.date)
    assert when.utcoffset() == datetime.timedelta(0)
    assert abs(datetime.datetime.now(datetime.timezone.utc) - when) < datetime.timedelta(
        minutes=5)
    assert f"inca {inca.__version__}, {report.date}: `python API`." in report.to_markdown()
