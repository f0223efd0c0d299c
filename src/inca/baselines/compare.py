"""``inca compare``: InCA against fine-tuning, LoRA and probes, side by side, on one split.

Every method runs in its own child process (spawned), so that its peak resident memory is
measured the same way for all: sampled during its training phase. Every method sees the
same backbone, data, split (seed 0), preprocessing and epoch budget; seeds vary the
initialisation and batch order. Costs are counted honestly: the probes and InCA share one
extraction pass (run once, in its own process, into one cache of every layer), and its
wall time and peak memory are added to each of them; fine-tuning's cost includes every
epoch's forward and backward pass.

This module runs the comparison; :mod:`~inca.baselines.compare_config` says what it
runs, :mod:`~inca.baselines.compare_runs` what each child process does and
:mod:`~inca.baselines.compare_report` what is reported.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from inca.baselines.compare_config import EXPENSIVE, METHODS, CompareConfig
from inca.baselines.compare_report import (
    method_settings,
    plot,
    summarise,
    to_markdown,
    write,
)
from inca.baselines.compare_runs import (
    Extraction,
    Job,
    Run,
    backbone_for,
    error_text,
    run_in_child,
)
from inca.errors import DataError

__all__ = ["EXPENSIVE", "METHODS", "CompareConfig", "Extraction", "Job", "Run", "plot",
           "run_compare", "summarise", "to_markdown", "write"]


def run_compare(config: CompareConfig, progress: bool = True) -> dict[str, Any]:
    """Run every method (each in a fresh child process) and summarise.

    A method that fails does not stop the others: its error is recorded under
    ``"failures"`` (the methods that needed it, such as the probes after a failed shared
    extraction, too) and the table holds what finished.

    Returns:
        ``{"config", "runs", "failures", "summary", "backbone", ...}`` (what ``compare.json``
        holds); see :func:`to_markdown`.
    """
    backbone_info = _check_inputs(config)
    runs: list[Run] = []
    failures: list[dict[str, Any]] = []

    def failed(job: Job, error: str) -> None:
        failures.append({"method": job.label, "seed": job.seed, "error": error})
        if progress:
            print(f"  {job.label} seed {job.seed} failed: {error}", flush=True)

    with tempfile.TemporaryDirectory(prefix="inca-compare-") as tmp:
        root = Path(config.workdir or tmp) / "cache"
        cheap = [m for m in config.methods if m not in EXPENSIVE]
        extraction, extraction_error = _shared_extraction(Job(config, "extract", 0, root),
                                                          cheap, progress)
        jobs = _jobs(config, root, extraction, cheap)
        for i, job in enumerate(jobs):
            if progress:
                print(f"[{i + 1}/{len(jobs)}] {job.method} seed {job.seed}"
                      + (" (full's time)" if job.equal_time else ""), flush=True)
            if extraction_error and job.method in cheap:
                failed(job, extraction_error)
                continue
            if job.equal_time:
                full = min((r for r in runs if r.method == "full"), key=lambda r: r.seed,
                           default=None)
                if full is None:
                    failed(job, "needs full fine-tuning's wall time, and full fine-tuning "
                                "failed")
                    continue
                job = replace(job, time_budget_s=config.time_fraction * full.train_seconds)
            try:
                runs += run_in_child(job)
            except Exception as e:  # noqa: BLE001 - one method's failure is reported, not fatal
                failed(job, error_text(e))
    rows = [asdict(r) for r in runs]
    return {"config": asdict(config), "runs": rows, "failures": failures,
            "extraction": asdict(extraction) if extraction else {},
            "settings": method_settings(config),
            "time_budget_s": next((config.time_fraction * r.train_seconds for r in runs
                                   if r.method == "full" and r.seed == 0), None),
            "backbone": backbone_info,
            "summary": summarise(rows, backbone_info["bytes"])}


def _shared_extraction(job: Job, cheap: list[str], progress: bool
                       ) -> tuple[Extraction | None, str | None]:
    """Every layer extracted once, in a child process, for the methods that read a cache
    (``cheap``); what it cost, or ``None`` and why it failed."""
    if not cheap:
        return None, None
    if progress:
        print("extracting every layer once for " + ", ".join(cheap), flush=True)
    try:
        return run_in_child(job), None
    except Exception as e:  # noqa: BLE001 - recorded against every method needing it
        error = f"the shared extraction failed: {error_text(e)}"
        if progress:
            print(f"  {error}", flush=True)
        return None, error


def _check_inputs(config: CompareConfig) -> dict[str, Any]:
    """Fail now, before any child process starts, on a backbone that cannot be created or
    data that cannot be read or has no test split; the backbone's description and size."""
    backbone = backbone_for(config, device="cpu")  # once, on the CPU
    info = {**backbone.describe(),
            "bytes": sum(p.numel() * p.element_size() for p in backbone.parameters())}
    del backbone
    from inca.data import has_split, load_dataset

    if not has_split(config.data, "test"):
        raise DataError(f"{config.data} has no test split of its own: compare scores every "
                        "method on held-out test data (a test/ folder beside train/, or a "
                        "data set with a test split)")
    for split, limit in (("train", config.limit), ("test", config.test_limit)):
        load_dataset(config.data, split=split, limit=limit, seed=0)  # read, or refused, now
    return info


def _jobs(config: CompareConfig, root: Path, extraction: Extraction | None,
          cheap: list[str]) -> list[Job]:
    """Every child's job: full fine-tuning first, each method at each of its seeds, then
    the cheap methods again given full's wall time (``equal_time``)."""
    jobs = []
    for method in sorted(config.methods, key=lambda m: m != "full"):
        n = config.expensive_seeds if method in EXPENSIVE else config.seeds
        jobs += [Job(config, method, s, root, extraction if method in cheap else None)
                 for s in range(n)]
    if config.equal_time:  # after full, whose wall time they are given
        jobs += [replace(job, equal_time=True) for job in jobs if job.method in cheap]
    return jobs
