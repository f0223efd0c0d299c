"""The fit report: the choice, its test accuracy, baselines, every adapter; JSON/MD/PNG.

Saved with a task (``report.json``, its sha256 in ``task.json``) and read back by
:func:`inca.load_task`, so it is part of the task format; :mod:`inca.training.report` builds
it from a bank's results.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from inca._files import atomic_write_bytes, atomic_write_json
from inca.task import report_render
from inca.task.report_render import per_class_metrics, score_text, wilson_interval

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
    # the logistic-regression baseline (inca.training.probe): {} in reports before it
    probe: dict[str, Any] = field(default_factory=dict)
    # the chosen task's confusion matrix: {"split": "test" | "validation", "confusion": ...}
    per_class: dict[str, Any] = field(default_factory=dict)
    inca_version: str = ""
    command: str = ""  # the command line, or "python API"
    date: str = ""  # UTC, ISO 8601
    machine: dict[str, Any] = field(default_factory=dict)  # platform, CPU, GPU (no host name)

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
        for key in ("probe", "per_class", "machine"):
            if not isinstance(kwargs.get(key, {}), dict):
                raise ValueError(f"the report's {key} must be an object")
        numbers = ("val_accuracy", "val_loss", "test_accuracy", "percent_of_backbone")
        probe = dict(kwargs.get("probe") or {})
        for part in ("last_layer", "best_layer"):
            if isinstance(probe.get(part), dict):
                probe[part] = _nan_for_null(probe[part], numbers)
        if isinstance(probe.get("per_layer"), list):
            probe["per_layer"] = [_nan_for_null(p, numbers) if isinstance(p, dict) else p
                                  for p in probe["per_layer"]]
        kwargs["probe"] = probe
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

    def test_interval(self) -> tuple[float, float] | None:
        """The 95% Wilson interval of the chosen task's test accuracy, or ``None`` without
        a test set (or a test count: reports before it)."""
        test, n = self.test_accuracy.get(self.chosen), self.data.get("num_test")
        return None if test is None or not n else wilson_interval(test, n)

    def per_class_metrics(self) -> list[dict[str, Any]]:
        """``class``, ``support``, ``precision`` and ``recall`` of the chosen task per
        class, on the split ``per_class["split"]`` names ([] in reports before it)."""
        if not self.per_class.get("confusion"):
            return []
        return per_class_metrics(self.per_class["confusion"], self.data["classes"])

    def to_markdown(self) -> str:
        """The decision first (chosen members, test accuracy with its 95% interval and
        the number of test images, margin over the strongest baseline, cost), then the
        baselines, per-class precision and recall, the candidates and every adapter."""
        bb = self.backbone
        lines = [f"# inca fit: {bb['name']} [{bb['fingerprint']}]", "",
                 *report_render.decision(self), "",
                 *report_render.baselines(self), *report_render.per_class(self),
                 "## Details", "",
                 f"{self.data['num_train']} training / {self.data['num_val']} validation"
                 + (f" / {self.data['num_test']} test" if self.data.get("num_test") else "")
                 + f" samples, {len(self.data['classes'])} classes.",
                 *([f"Mode: {self.mode['mode']} ({self.mode['reason']}); augmentation: "
                    f"{self.config.get('augment', 'none')}."] if self.mode else []),
                 f"Selection on validation {self.config.get('select_by', 'accuracy')}.",
                 *([f"Tie: {self.tie}."] if self.tie else []),
                 *([f"inca {self.inca_version}, {self.date}: `{self.command}`."]
                   if self.inca_version else []),
                 "", "| candidate | val acc | val loss | test acc | members |",
                 "|---|---:|---:|---:|---|"]
        for c in self.candidates:
            test = self.test_accuracy.get(c["name"])
            lines.append(f"| {c['name']}{' (chosen)' if c['name'] == self.chosen else ''} | "
                         f"{c['val_accuracy']:.4f} | {score_text(c.get('val_loss'))} | "
                         f"{'' if test is None else f'{test:.4f}'} | {', '.join(c['members'])} |")
        has_test = any("test_accuracy" in r for r in self.rows)
        lines += [
            "", "## Every adapter", "",
            "| adapter | val acc | val loss | best epoch | params | % of backbone |"
            + (" test acc (not used to choose) |" if has_test else ""),
            "|---|---:|---:|---:|---:|---:|" + ("---:|" if has_test else ""),
        ]
        select_by = self.config.get("select_by", "accuracy")
        for r in sorted(self.rows, key=lambda r: selection_key(r["val_accuracy"], r["val_loss"],
                                                               select_by)):
            mark = "" if r["key"] not in self.chosen_members else \
                " **(chosen)**" if self.chosen == "best" else f" **(in the chosen {self.chosen})**"
            test = f" {r['test_accuracy']:.4f} |" if has_test else ""
            if r.get("diverged_epoch"):
                mark += f" (dropped: diverged in epoch {r['diverged_epoch']})"
            lines.append(f"| {r['key']}{mark} | {r['val_accuracy']:.4f} | {r['val_loss']:.4f} | "
                         f"{r['best_epoch']} | {r['parameters']:,} | "
                         f"{r['percent_of_backbone']:.3f} |{test}")
        lines += ["", f"Task file: {self.task_parameters:,} trained parameters.", ""]
        return "\n".join(lines)

    def plot(self, path: str | Path) -> Path:
        """A PNG of the selection's measure (validation loss or accuracy, as ``select_by``)
        per layer, best over the lr grid, per kind; the chosen members starred, the
        logistic-regression baseline dashed."""
        return report_render.plot_layers(self, Path(path))

    def plot_confusion(self, path: str | Path) -> Path | None:
        """A PNG of the chosen task's confusion matrix (``None`` when the report has none)."""
        if not self.per_class.get("confusion"):
            return None
        return report_render.plot_confusion(self, Path(path))

    def write(self, folder: str | Path) -> dict[str, Path]:
        """Write ``report.md``, ``accuracy_per_layer.png``, ``confusion_matrix.png`` (when
        the report has a confusion matrix) and, last (a finished run is
        one whose ``report.json`` exists), ``report.json``."""
        folder = Path(folder)
        atomic_write_bytes(folder / "report.md", self.to_markdown().encode())
        plot = self.plot(folder / "accuracy_per_layer.png")
        confusion = self.plot_confusion(folder / "confusion_matrix.png")
        atomic_write_json(folder / "report.json", self.to_dict())
        return {"json": folder / "report.json", "markdown": folder / "report.md", "plot": plot,
                **({"confusion": confusion} if confusion else {})}


def _nan_for_null(d: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """``d`` with the ``null`` (strict JSON's NaN) of these number fields back to NaN."""
    return {k: float("nan") if k in keys and v is None else v for k, v in d.items()}
