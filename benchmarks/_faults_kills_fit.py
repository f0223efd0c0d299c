"""Part 1c of the faults benchmark: ``inca fit --out`` killed after each of the run's
moments in turn (plus a random part of the next phase), then the same command run again:
it must finish, keep the cache files recorded before the kill, and give the cache and the
task of an uninterrupted run."""

from __future__ import annotations

import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from _faults_bench import (
    Bench,
    cache_arrays,
    cache_phase,
    changed,
    compare_arrays,
    last_line,
    recorded,
    shard_files,
    stale,
    task_diff,
)
from _faults_kills import kill_after

from inca.errors import InCAError
from inca.task import TASK_JSON, Task, read_task_files


def fit_args(b: Bench, out: Path) -> list[str]:
    return ["fit", *b.cli_backbone, "--data", "digits", "--limit", "512", "--test-limit", "32",
            "--out", str(out), "--mode", "cached", "--kinds", "inca,linear", "--layers",
            ",".join(b.layers[:2]), "--lrs", "3e-3", "--epochs", "1", "--batch-size", "32",
            "--num-workers", "0", "--device", "cpu"]


def fit_state(out: Path) -> str:
    train, test = out / "cache" / "train", out / "cache" / "test"
    if not (train / "manifest.json").exists():
        return "starting (no cache yet)"
    for name, folder in (("train", train), ("test", test)):
        phase = cache_phase(folder)
        if phase != "complete":
            return f"extracting {name}: {phase}"
    if not (out / "task").exists():
        return "training or saving (caches complete, no task yet)"
    if not (out / "report.json").exists():
        return "task saved, report not yet"
    return "finishing (report written)"


def fit_anchors(out: Path) -> list[tuple[str, Callable[[], bool]]]:
    """Moments of an ``inca fit`` run that its folder shows, in order."""
    train, test = out / "cache" / "train", out / "cache" / "test"
    return [
        ("train cache begun", lambda: (train / "manifest.json").exists()),
        ("train shard 0 recorded", lambda: len(recorded(train)) >= 1),
        ("train cache complete", lambda: cache_phase(train) == "complete"),
        ("test cache complete", lambda: cache_phase(test) == "complete"),
        ("task saved", lambda: (out / "task" / TASK_JSON).exists()),
    ]


def kill_fits(b: Bench, kills: int, rng: random.Random) -> tuple[list[dict[str, Any]],
                                                                   dict[str, Any]]:
    """Part 1c: ``inca fit --out`` killed, then run again. Each kill waits for one of the
    run's moments (:func:`fit_anchors`, in turn from a seeded start) and then a random
    part of the time the clean run took from that moment to the next: every phase gets
    kills, whatever the machine's speed."""
    root = b.tmp / "kill-fit"
    root.mkdir()
    ref = root / "clean"
    t0 = time.monotonic()
    log = root / "clean.log"
    seen: dict[str, float] = {}
    with open(log, "wb") as f:
        proc = b.spawn([sys.executable, "-m", "inca.cli", *fit_args(b, ref)],
                       stdout=f, stderr=subprocess.STDOUT, env=b.env())
        try:
            anchors = fit_anchors(ref)
            while proc.poll() is None and time.monotonic() - t0 < 600:
                for name, reached in anchors:
                    if name not in seen and reached():
                        seen[name] = time.monotonic()
                time.sleep(0.005)
            proc.wait(timeout=60)
        finally:
            b.end(proc)
    if proc.returncode != 0 or len(seen) != len(anchors):
        raise RuntimeError(f"the clean fit failed:\n{log.read_text()[-3000:]}")
    ends = [seen[name] for name, _ in anchors[1:]] + [time.monotonic()]
    gaps = [end - seen[name] for (name, _), end in zip(anchors, ends, strict=True)]
    clean = {"seconds": round(time.monotonic() - t0, 2),
             "phases_s": {name: round(g, 2) for (name, _), g in zip(anchors, gaps, strict=True)}}
    ref_task = Task.from_files(read_task_files(ref / "task"))
    ref_caches = {s: cache_arrays(ref / "cache" / s) for s in ("train", "test")}
    rows, attempt, first = [], 0, rng.randrange(len(anchors))
    while len(rows) < kills and attempt < 3 * kills:
        attempt += 1
        out = root / f"run{attempt}"
        k = (first + len(rows)) % len(anchors)
        name, reached = fit_anchors(out)[k]
        delay = rng.uniform(0, gaps[k])
        proc = b.spawn([sys.executable, "-m", "inca.cli", *fit_args(b, out)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=b.env())
        try:
            deadline = time.monotonic() + 300
            while not reached() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.005)
            killed, _ = kill_after(proc, delay)
        finally:
            b.end(proc)
        if killed:
            rows.append(rerun_fit(b, out, f"{name} + {delay:.2f} s", ref_task, ref_caches))
    return rows, clean


def rerun_fit(b: Bench, out: Path, when: str, ref_task: Task,
              ref_caches: dict[str, dict[str, np.ndarray]]) -> dict[str, Any]:
    state = fit_state(out)
    before = {s: shard_files(out / "cache" / s) for s in ("train", "test")}
    row: dict[str, Any] = {"kind": "inca fit", "killed_at": when,
                           "state_at_kill": state,
                           "shard_files_recorded": sum(len(v) for v in before.values())}
    finished = (out / "report.json").is_file()
    r = b.run(fit_args(b, out))
    row.update(rerun_exit=r.rc, rerun_s=round(r.seconds, 2))
    refused = r.rc == 2 and "--overwrite" in r.stderr
    if refused:  # the task was saved: the same command will not replace it unasked
        row["rerun_error"] = b.scrub(last_line(r.stderr))
        r = b.run([*fit_args(b, out), "--overwrite"])  # as the message says
        row["overwrite_exit"] = r.rc
    if r.rc != 0:
        row["rerun_error"] = b.scrub(last_line(r.stderr))
        row.update(data_lost=True, silent_wrong=False, survived=False)
        return row
    rewritten = sum(len(changed(before[s], out / "cache" / s)) for s in before)
    diffs, bitwise = [], True
    try:
        for s, arrays in ref_caches.items():
            same, diff = compare_arrays(cache_arrays(out / "cache" / s), arrays)
            bitwise &= same
            diffs.append(diff)
        tdiff = task_diff(Task.from_files(read_task_files(out / "task")), ref_task)
    except InCAError as e:  # exit 0, yet its files do not read back
        row["read_back_error"] = b.scrub(str(e))
        diffs, bitwise, tdiff = [float("inf")], False, float("inf")
    row.update(recorded_files_rewritten=rewritten, cache_bitwise_equal=bitwise,
               cache_max_abs_diff=max(diffs), task_max_abs_diff=tdiff,
               report_written=(out / "report.json").is_file(),
               stale_tmp_after=len(stale(out)))
    row["data_lost"] = rewritten > 0
    row["silent_wrong"] = not (max(diffs) <= 1e-3 and tdiff <= 1e-4)
    # refusing to replace the task of a finished run protects it; of an unfinished one (no
    # report yet) it means the same command cannot finish the run
    row["survived"] = not (row["data_lost"] or row["silent_wrong"]) and row["report_written"] \
        and not row["stale_tmp_after"] and (finished or not refused)
    return row
