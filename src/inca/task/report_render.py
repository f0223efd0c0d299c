"""How a :class:`~inca.task.report.FitReport` reads: Markdown that leads with the decision,
the per-layer plot of the selection's own measure, the confusion matrix, and the
statistics they quote (Wilson intervals, per-class precision and recall)."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from inca._files import atomic_write_bytes

if TYPE_CHECKING:
    from inca.task.report import FitReport

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson_interval(accuracy: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval (95% by default) of an accuracy measured on ``n`` samples;
    ``(nan, nan)`` without samples."""
    if not n or accuracy is None or math.isnan(accuracy):
        return (math.nan, math.nan)
    z2n = z * z / n
    center = (accuracy + z2n / 2) / (1 + z2n)
    half = z * math.sqrt(accuracy * (1 - accuracy) / n + z2n / (4 * n)) / (1 + z2n)
    return (max(0.0, center - half), min(1.0, center + half))


def per_class_metrics(confusion: list[list[int]], classes: list[str]) -> list[dict[str, Any]]:
    """``class``, ``support`` (true samples), ``precision`` and ``recall`` per class from a
    confusion matrix (rows: true class, columns: predicted); NaN where undefined."""
    out = []
    for i, name in enumerate(classes):
        support, predicted = sum(confusion[i]), sum(row[i] for row in confusion)
        hit = confusion[i][i]
        out.append({"class": name, "support": support,
                    "precision": hit / predicted if predicted else math.nan,
                    "recall": hit / support if support else math.nan})
    return out


def _pct(x: float | None) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{100 * x:.1f}%"


def score_text(x: float | None) -> str:
    """A score to four places; "n/a" where none was measured (None, NaN)."""
    return "n/a" if x is None or math.isnan(x) else f"{x:.4f}"


def _chosen_share(r: FitReport) -> float:
    return sum(row.get("percent_of_backbone", 0.0) for row in r.rows
               if row["key"] in r.chosen_members)


def decision(r: FitReport) -> list[str]:
    """The first lines: the choice, its test accuracy with its interval and count, the
    margin over the strongest baseline, and the cost."""
    layers = {row["key"]: ", ".join(row["layers"]) for row in r.rows}
    members = ", ".join(f"`{k}` ({layers.get(k, '?')})" for k in r.chosen_members)
    select_by = r.config.get("select_by", "accuracy")
    lines = [f"**Chosen: {r.chosen}**: {members}; selected on validation {select_by} "
             f"(validation accuracy {_pct(r.val_accuracy)} on {r.data.get('num_val', '?')} "
             "images)."]
    test, n = r.test_accuracy.get(r.chosen), r.data.get("num_test")
    if test is not None and n:
        lo, hi = wilson_interval(test, n)
        lines.append(f"**Test accuracy: {_pct(test)}** (95% interval {_pct(lo)} to "
                     f"{_pct(hi)}, Wilson) on **{n} test images**, never used to choose.")
    elif test is not None:
        lines.append(f"**Test accuracy: {_pct(test)}** (number of test images not recorded).")
    else:
        lines.append("No test set: the validation accuracy above chose the task, so it is "
                     "an optimistic estimate.")
    best = r.probe.get("best_layer") if r.probe else None
    if best:
        key = "test_accuracy" if test is not None and "test_accuracy" in best else \
            "val_accuracy"
        mine = test if key == "test_accuracy" else r.val_accuracy
        split = "test" if key == "test_accuracy" else "validation"
        lines.append(f"Margin over the strongest baseline (logistic regression on "
                     f"`{best['layer']}`, the best layer by validation): "
                     f"{100 * (mine - best[key]):+.1f} points of {split} accuracy "
                     f"({_pct(mine)} against {_pct(best[key])}).")
    t = r.timings
    lines.append(f"Cost: extraction {t['extract_seconds']:.1f} s, training "
                 f"{t['train_seconds']:.1f} s ({t['epochs_run']} epochs, {len(r.rows)} "
                 f"adapters in one bank); the task holds {r.task_parameters:,} trained "
                 f"parameters ({_chosen_share(r):.3f}% of the backbone).")
    return [line + "  " for line in lines[:-1]] + lines[-1:]


def baselines(r: FitReport) -> list[str]:
    """The baseline table: the logistic regression on the last and on the best layer, and
    the bank's own last-layer linear member."""
    rows = []
    if r.probe.get("last_layer"):
        last, best = r.probe["last_layer"], r.probe.get("best_layer") or r.probe["last_layer"]
        for name, rec in (("last-layer linear probe: logistic regression", last),
                          ("best-layer linear probe: logistic regression", best)):
            if name.startswith("best") and rec["layer"] == last["layer"]:
                continue  # the last layer is the best: one row says both
            rows.append((name + (" (also the best layer)" if name.startswith("last")
                                 and best["layer"] == last["layer"] else ""),
                         rec["layer"], f"{rec['l2']:g}", rec["val_accuracy"],
                         rec["val_loss"], rec.get("test_accuracy")))
    if r.linear_probe:
        lp = r.linear_probe
        rows.append(("bank's last-layer linear member (SGD, the bank's epochs)",
                     lp["key"].split("/")[1] if lp["key"].count("/") >= 2 else "",
                     "", lp["val_accuracy"], lp.get("val_loss", math.nan),
                     r.test_accuracy.get("linear_probe")))
    if not rows and not r.probe:
        return []
    lines = ["## Baselines", ""]
    if r.probe.get("skipped"):
        lines += [f"Logistic-regression probe not fitted: {r.probe['skipped']}.", ""]
    elif r.probe:
        lines += [f"{r.probe['method']} (grid {', '.join(f'{v:g}' for v in r.probe['l2_grid'])}"
                  f", at most {r.probe['max_iter']} iterations each), on the {r.probe['pool']} "
                  f"feature of {r.probe['train_samples']} training and "
                  f"{r.probe['val_samples']} validation samples "
                  f"({r.probe['seconds']:.1f} s for {len(r.probe['per_layer'])} layers).", ""]
    if rows:
        lines += ["| baseline | layer | L2 | val acc | val loss | test acc |",
                  "|---|---|---:|---:|---:|---:|"]
        lines += [f"| {n} | {layer} | {l2} | {va:.4f} | {score_text(vl)} | "
                  f"{'' if te is None else f'{te:.4f}'} |" for n, layer, l2, va, vl, te in rows]
        lines.append("")
    return lines


def per_class(r: FitReport) -> list[str]:
    if not r.per_class.get("confusion"):
        return []
    split = r.per_class.get("split", "test")
    note = ", used for selection: optimistic" if split == "validation" else ""
    lines = [f"## Per class ({split}{note}; chosen: {r.chosen})", "",
             "| class | images | precision | recall |", "|---|---:|---:|---:|"]
    for m in per_class_metrics(r.per_class["confusion"], r.data["classes"]):
        lines.append(f"| {m['class']} | {m['support']} | {_pct(m['precision'])} | "
                     f"{_pct(m['recall'])} |")
    return [*lines, ""]


def layer_series(r: FitReport) -> dict[str, Any]:
    """What the per-layer plot draws: the selection's measure (``metric``), each kind's
    best value per layer over the lr grid (``kinds``), the chosen members as
    ``(layer index, value, key)`` (``chosen``), the probe's per-layer value (``probe``) and
    the ensemble's value (``ensemble``, or ``None``)."""
    metric = "val_loss" if r.config.get("select_by", "accuracy") == "loss" else "val_accuracy"
    better = min if metric == "val_loss" else max
    layers = r.backbone["layers"]

    def value(x: dict) -> float:
        v = x.get(metric)
        return math.nan if v is None else float(v)

    kinds: dict[str, dict[int, float]] = {}
    flat: dict[str, float] = {}
    for row in r.rows:
        v = value(row)
        if math.isnan(v):
            continue
        if len(row["layers"]) == 1:
            per = kinds.setdefault(row["kind"], {})
            i = layers.index(row["layers"][0])
            per[i] = better(per.get(i, v), v)
        else:  # a multi-layer member reads every layer: a horizontal line
            flat[row["kind"]] = better(flat.get(row["kind"], v), v)
    chosen = [(layers.index(row["layers"][-1]), value(row), row["key"])
              for row in r.rows if row["key"] in r.chosen_members]
    probe = {layers.index(p["layer"]): value(p) for p in r.probe.get("per_layer", [])
             if not math.isnan(value(p)) and p["layer"] in layers}  # null in JSON: NaN
    ens = next((value(c) for c in r.candidates if c["name"] == "ensemble"), None)
    return {"metric": metric, "kinds": {k: dict(sorted(v.items())) for k, v in kinds.items()},
            "flat": flat, "chosen": chosen, "probe": dict(sorted(probe.items())),
            "ensemble": ens}


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def plot_layers(r: FitReport, path: Path) -> Path:
    """A PNG of the selection's measure per layer (best over the lr grid) per kind, the
    chosen members starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, layers = layer_series(r), r.backbone["layers"]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for kind, per in s["kinds"].items():
        ax.plot(list(per), list(per.values()), marker="o", label=kind)
    for kind, v in s["flat"].items():
        ax.axhline(v, linestyle=":", color="gray", label=f"{kind} (all layers)")
    if s["probe"]:
        ax.plot(list(s["probe"]), list(s["probe"].values()), linestyle="--", color="gray",
                label="logistic regression (baseline)")
    if s["ensemble"] is not None:
        ax.axhline(s["ensemble"], linestyle="--", color="black", label="top-k ensemble")
    if s["chosen"]:
        ax.scatter([c[0] for c in s["chosen"]], [c[1] for c in s["chosen"]], marker="*",
                   s=260, color="gold", edgecolors="black", zorder=5,
                   label=f"chosen ({r.chosen})")
    used = sorted({i for per in (*s["kinds"].values(), s["probe"]) for i in per})
    ax.set_xticks(used, [layers[i] for i in used], rotation=45, ha="right", fontsize=8)
    name = "validation loss (lower is better)" if s["metric"] == "val_loss" else \
        "validation accuracy"
    ax.set_ylabel(name)
    ax.set_title(f"{r.backbone['name']}: {name.split(' (')[0]} per layer (selection's measure)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, Path(path))


def plot_confusion(r: FitReport, path: Path) -> Path:
    """A PNG of the chosen task's confusion matrix, rows normalized (recall on the
    diagonal), with counts written in the cells when there are few classes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    m = np.asarray(r.per_class["confusion"], dtype=float)
    classes = r.data["classes"]
    share = m / np.maximum(m.sum(1, keepdims=True), 1)
    size = min(14.0, 3 + 0.35 * len(classes))
    fig, ax = plt.subplots(figsize=(size, size * 0.85), dpi=110)
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, label="share of the true class")
    if len(classes) <= 40:
        ticks = range(len(classes))
        ax.set_xticks(ticks, classes, rotation=90, fontsize=7)
        ax.set_yticks(ticks, classes, fontsize=7)
    if len(classes) <= 20:
        for (i, j), v in np.ndenumerate(m):
            if v:
                ax.text(j, i, f"{int(v)}", ha="center", va="center", fontsize=7,
                        color="white" if share[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"confusion on {r.per_class.get('split', 'test')} ({r.chosen})")
    fig.tight_layout()
    return _save(fig, Path(path))
