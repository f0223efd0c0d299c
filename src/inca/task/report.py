"""The fit report: every adapter's validation accuracy, the choice, baselines; JSON/MD/PNG.

Saved with a task (``report.json``, its sha256 in ``task.json``) and read back by
:func:`inca.load_task`, so it is part of the task format; :mod:`inca.training.report` builds
it from a bank's results.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from inca._files import atomic_write_bytes, atomic_write_json

if TYPE_CHECKING:
    import pandas


def selection_key(accuracy: float, loss: float, select_by: str) -> tuple[float, float]:
    """Sort key of a validation score, smaller is better: by ``select_by``, the other
    measure breaking ties."""
    return (-accuracy, loss) if select_by == "accuracy" else (loss, -accuracy)


@dataclass
class FitReport:
    """What a fit measured. Built by :func:`inca.training.report.build_report`; written with
    :meth:`write`, and with its task (:meth:`inca.Task.save`)."""

    backbone: dict[str, Any]
    config: dict[str, Any]
    rows: list[dict[str, Any]]
    candidates: list[dict[str, Any]]
    chosen: str
    chosen_members: list[str]
    val_accuracy: float
    linear_probe: dict[str, Any] | None
    test_accuracy: dict[str, float]
    timings: dict[str, float]
    data: dict[str, Any]
    task_parameters: int
    history: list[dict[str, Any]] = field(default_factory=list)
    mode: dict[str, Any] = field(default_factory=dict)  # cached or streaming, and why
    tie: str = ""  # how a tie for the best validation accuracy was broken

    def summary(self) -> dict[str, Any]:
        """The few numbers stored in the task file."""
        return {"chosen": self.chosen, "members": self.chosen_members,
                "val_accuracy": self.val_accuracy, "test_accuracy": self.test_accuracy,
                "linear_probe": self.linear_probe}

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FitReport:
        """The report :meth:`to_dict` described (as ``report.json`` holds it). Keys this
        version does not know are ignored; NaN, saved as ``null``, comes back as NaN.

        Raises:
            ValueError: ``d`` is not a report (a field is missing or of the wrong type).
        """
        if not isinstance(d, dict):
            raise ValueError(f"a report is a JSON object, not {type(d).__name__}")
        known = {f.name: f for f in fields(cls)}
        missing = [n for n, f in known.items() if n not in d
                   and f.default is MISSING and f.default_factory is MISSING]
        if missing:
            raise ValueError(f"the report lacks {', '.join(missing)}")
        kwargs = {k: v for k, v in d.items() if k in known}
        for key in ("rows", "candidates", "history"):
            value = kwargs.get(key, [])
            if not isinstance(value, list) or not all(isinstance(r, dict) for r in value):
                raise ValueError(f"the report's {key} must be a list of objects")
        for key in ("backbone", "config", "test_accuracy", "timings", "data"):
            if not isinstance(kwargs[key], dict):
                raise ValueError(f"the report's {key} must be an object")
        numbers = ("val_accuracy", "val_loss", "test_accuracy", "percent_of_backbone")
        kwargs["rows"] = [_nan_for_null(r, numbers) for r in kwargs["rows"]]
        kwargs["candidates"] = [_nan_for_null(c, numbers) for c in kwargs["candidates"]]
        if isinstance(kwargs["linear_probe"], dict):
            kwargs["linear_probe"] = _nan_for_null(kwargs["linear_probe"], numbers)
        return cls(**_nan_for_null(kwargs, ("val_accuracy",)))

    def to_pandas(self) -> pandas.DataFrame:
        """Every adapter of the bank, one row each, in bank order: ``key``, ``kind``,
        ``layers`` (comma-joined), ``lr``, ``val_accuracy``, ``val_loss``, ``best_epoch``,
        ``diverged_epoch``, ``parameters``, ``percent_of_backbone``, ``test_accuracy``
        (when a test set was given; never used to choose) and ``chosen``.

        Example:
            >>> task.report.to_pandas().sort_values("val_accuracy").tail(3)  # doctest: +SKIP

        Raises:
            ModuleNotFoundError: pandas is not installed (the message says how to).
        """
        try:
            import pandas
        except ImportError as e:
            raise ModuleNotFoundError("FitReport.to_pandas needs pandas: pip install pandas",
                                      name="pandas") from e
        rows = [{**r, "layers": ", ".join(r.get("layers", [])),
                 "chosen": r.get("key") in self.chosen_members} for r in self.rows]
        return pandas.DataFrame(rows)

    def to_markdown(self) -> str:
        bb = self.backbone
        lines = [
            f"# inca fit: {bb['name']} [{bb['fingerprint']}]",
            "",
            f"{self.data['num_train']} training / {self.data['num_val']} validation samples, "
            f"{len(self.data['classes'])} classes; extraction {self.timings['extract_seconds']:.1f}"
            f" s, training {self.timings['train_seconds']:.1f} s "
            f"({self.timings['epochs_run']} epochs, {len(self.rows)} adapters in one bank).",
            *([f"Mode: {self.mode['mode']} ({self.mode['reason']}); augmentation: "
               f"{self.config.get('augment', 'none')}."] if self.mode else []),
            f"Selection on validation {self.config.get('select_by', 'accuracy')}.",
            *([f"Tie: {self.tie}."] if self.tie else []),
            "",
        ]
        has_test = any("test_accuracy" in r for r in self.rows)
        lines += [
            "| adapter | val acc | val loss | best epoch | params | % of backbone |"
            + (" test acc (not used to choose) |" if has_test else ""),
            "|---|---:|---:|---:|---:|---:|" + ("---:|" if has_test else ""),
        ]
        select_by = self.config.get("select_by", "accuracy")
        for r in sorted(self.rows, key=lambda r: selection_key(r["val_accuracy"], r["val_loss"],
                                                               select_by)):
            mark = " **(chosen)**" if r["key"] in self.chosen_members and \
                self.chosen == "best" else ""
            test = f" {r['test_accuracy']:.4f} |" if has_test else ""
            if r.get("diverged_epoch"):
                mark += f" (dropped: diverged in epoch {r['diverged_epoch']})"
            lines.append(f"| {r['key']}{mark} | {r['val_accuracy']:.4f} | {r['val_loss']:.4f} | "
                         f"{r['best_epoch']} | {r['parameters']:,} | "
                         f"{r['percent_of_backbone']:.3f} |{test}")
        lines += ["", "| candidate | val acc | val loss | test acc | members |",
                  "|---|---:|---:|---:|---|"]
        for c in self.candidates:
            test = self.test_accuracy.get(c["name"])
            lines.append(f"| {c['name']}{' (chosen)' if c['name'] == self.chosen else ''} | "
                         f"{c['val_accuracy']:.4f} | {c.get('val_loss', float('nan')):.4f} | "
                         f"{'' if test is None else f'{test:.4f}'} | {', '.join(c['members'])} |")
        if self.linear_probe:
            test = self.test_accuracy.get("linear_probe")
            lines.append(f"| last-layer linear probe (baseline) | "
                         f"{self.linear_probe['val_accuracy']:.4f} | "
                         f"{self.linear_probe.get('val_loss', float('nan')):.4f} | "
                         f"{'' if test is None else f'{test:.4f}'} | {self.linear_probe['key']} |")
        lines += ["", f"Task file: {self.task_parameters:,} trained parameters.", ""]
        return "\n".join(lines)

    def plot(self, path: str | Path) -> Path:
        """A PNG of the best validation accuracy per layer (over the lr grid), per kind."""
        import matplotlib

        matplotlib.use("Agg")
        import io

        import matplotlib.pyplot as plt

        layers = self.backbone["layers"]
        fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
        kinds = sorted({r["kind"] for r in self.rows})
        for kind in kinds:
            best: dict[str, float] = {}
            for r in self.rows:
                if r["kind"] == kind and len(r["layers"]) == 1:
                    best[r["layers"][0]] = max(best.get(r["layers"][0], 0.0), r["val_accuracy"])
            if best:
                xs = [layers.index(k) for k in best]
                ax.plot(xs, list(best.values()), marker="o", label=kind)
            else:  # a multi-layer probe reads every layer: a horizontal line
                acc = max(r["val_accuracy"] for r in self.rows if r["kind"] == kind)
                ax.axhline(acc, linestyle=":", color="gray", label=f"{kind} (all layers)")
        for c in self.candidates:
            if c["name"] == "ensemble":
                ax.axhline(c["val_accuracy"], linestyle="--", color="black",
                           label=f"top-{len(c['members'])} ensemble")
        used = sorted({layers.index(r["layers"][0]) for r in self.rows if len(r["layers"]) == 1})
        ax.set_xticks(used, [layers[i] for i in used], rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("validation accuracy")
        ax.set_title(f"{self.backbone['name']}: accuracy per layer per adapter kind")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
        atomic_write_bytes(Path(path), buf.getvalue())
        return Path(path)

    def write(self, folder: str | Path) -> dict[str, Path]:
        """Write ``report.md``, ``accuracy_per_layer.png`` and, last (a finished run is
        one whose ``report.json`` exists), ``report.json``."""
        folder = Path(folder)
        atomic_write_bytes(folder / "report.md", self.to_markdown().encode())
        plot = self.plot(folder / "accuracy_per_layer.png")
        atomic_write_json(folder / "report.json", self.to_dict())
        return {"json": folder / "report.json", "markdown": folder / "report.md", "plot": plot}


def _nan_for_null(d: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """``d`` with the ``null`` (strict JSON's NaN) of these number fields back to NaN."""
    return {k: float("nan") if k in keys and v is None else v for k, v in d.items()}
