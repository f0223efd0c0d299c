"""Part 2 of the faults benchmark, storage: a full disk (during extraction, and while a task
is saved over an older one), a run killed before its report, a second writer while the
first one's disk stalls, and damaged caches."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _faults_bench import (
    Bench,
    cache_arrays,
    changed,
    compare_arrays,
    last_line,
    shard_files,
    short,
    task_diff,
)
from _faults_cases import (
    HANDLED,
    SILENT,
    UNCLEAR,
    Case,
    Verdict,
    error_verdict,
    result_verdict,
    truncate,
)

from inca.data import load_dataset
from inca.errors import InCAError
from inca.features import extract_to_cache
from inca.features.cache import ActivationCache
from inca.task import Task, read_task_files


def storage_cases(b: Bench, ext: list[str], fit: list[str]) -> list[Case]:
    """A full disk, a slow disk with a second writer, damaged caches."""
    root = b.tmp / "storage"
    layers = ",".join(b.layers[:2])
    return [_disk_full_case(b, ext, root, layers), _save_full_case(b, fit, root),
            _no_report_case(b, fit, root), *_second_writer_cases(b, ext, fit, root, layers),
            *_damaged_cache_cases(b, ext, root, layers)]


def _disk_full_case(b: Bench, ext: list[str], root: Path, layers: str) -> Case:
    """A full disk mid-extraction, then the same command once space is back."""
    full, clean = root / "full", root / "full-clean"
    full_args = [*ext, "--data", "digits", "--limit", "320", "--layers", layers, "--out",
                 str(full), "--batch-size", "32", "--num-workers", "0"]
    patch = "enospc-path:shards/00001"  # shard 0 is written; then the disk is full

    def disk_full() -> Verdict:
        with b.bb_lock:
            extract_to_cache(b.bb, load_dataset("digits", limit=320), clean,
                             layers=b.layers[:2], batch_size=32, num_workers=0, progress=False)
        v = error_verdict(b.run(full_args, patch=patch), ("no space",))
        kept = shard_files(full)
        r = b.run(full_args)  # space is back
        if r.rc != 0:
            return Verdict(UNCLEAR, v.detail + " | the same command once space was back "
                           f"failed: exit {r.rc}: {short(last_line(r.stderr))}", data_lost=True)
        lost = changed(kept, full)
        same, diff = compare_arrays(cache_arrays(full), cache_arrays(clean))
        if lost or diff > 1e-3:
            return Verdict(SILENT if diff > 1e-3 else v.outcome, v.detail + f" | resumed: "
                           f"{len(lost)} of {len(kept)} files written before the disk filled "
                           f"were written again; cache differs from a clean one by {diff:.3g}",
                           data_lost=bool(lost))
        v.detail += (f" | the same command once space was back resumed, keeping the "
                     f"{len(kept)} files of shard 0; cache equals a clean one")
        return v
    return Case("disk-full-extract", "cli", "the disk fills during extraction (fsync "
                "of shard 1's files fails with ENOSPC), then space is freed and the "
                "command re-run", "clear error", disk_full, b.repro(full_args, patch), "own")


def _save_full_case(b: Bench, fit: list[str], root: Path) -> Case:
    """A full disk while fit saves its task over an older one."""
    run = root / "fit-full"
    fargs = [*fit, "--data", "digits", "--limit", "60", "--out", str(run)]
    patch2 = "enospc-path:.task.new-"
    # fit again, another lr: a new task over the old (--overwrite where fit asks for it)
    again = [*fargs, "--lrs", "3e-2"] + (["--overwrite"] if "--overwrite" in
                                         b.cli(["fit", "--help"]).stdout else [])

    def save_full() -> Verdict:
        first = b.cli(fargs)
        if first.rc != 0:
            raise RuntimeError(f"the first fit failed: {first.stderr[-2000:]}")
        old = Task.from_files(read_task_files(run / "task"))
        v = error_verdict(b.run(again, patch=patch2), ("no space",))
        try:
            kept = task_diff(Task.from_files(read_task_files(run / "task")), old) == 0
        except InCAError as e:
            kept = False
            v.detail += f" | the old task no longer loads: {b.scrub(str(e))}"
        left = sorted(p.name for p in run.iterdir() if p.name.startswith(".task."))
        left = [n for n in left if n != ".task.lock"]
        if not kept or left:
            v = Verdict(UNCLEAR if kept else SILENT, v.detail + f" | old task kept: {kept}, "
                        f"left behind: {left}", data_lost=not kept)
        return v
    return Case("disk-full-task-save", "cli", "the disk fills while inca fit saves its "
                "task over an older one (old task must stay intact)", "clear error",
                save_full, b.repro(again, patch2), "own")


def _no_report_case(b: Bench, fit: list[str], root: Path) -> Case:
    """A run killed between saving its task and writing its report, run again."""
    unfinished = root / "fit-unfinished"
    uargs = [*fit, "--data", "digits", "--limit", "60", "--out", str(unfinished)]

    def no_report() -> Verdict:
        first = b.cli(uargs)
        if first.rc != 0:
            raise RuntimeError(f"the first fit failed: {first.stderr[-2000:]}")
        saved = Task.from_files(read_task_files(unfinished / "task"))
        for f in unfinished.glob("report.*"):
            f.unlink()
        r = b.cli(uargs)

        def check() -> str | None:
            if not (unfinished / "report.json").is_file():
                return "exit 0 but no report written"
            diff = task_diff(Task.from_files(read_task_files(unfinished / "task")), saved)
            return None if diff <= 1e-4 else f"the task differs from the first run's by {diff}"
        return result_verdict(r, check)
    return Case("fit-rerun-without-report", "cli", "inca fit run again on its run folder "
                "whose task was saved but whose report was not (a kill between the two): "
                "the same command should finish the run", "correct result", no_report,
                b.repro(uargs), "shared")


def _second_writer_cases(b: Bench, ext: list[str], fit: list[str], root: Path,
                         layers: str) -> list[Case]:
    """A second writer while the first one holds the folder (its disk stalled)."""
    cases = []
    for cid, what, cmd, out in (
            ("second-extract-writer", "a second inca extract into a cache folder another "
             "process is writing", [*ext, "--data", "digits", "--limit", "600", "--layers",
                                    layers, "--batch-size", "32", "--num-workers", "0"],
             root / "shared-cache"),
            ("second-fit-writer", "a second inca fit into a run folder another process is "
             "fitting into", [*fit, "--data", "digits", "--limit", "600"],
             root / "shared-run")):
        args = [*cmd, "--out", str(out)]
        cases.append(Case(cid, "cli", what + " (its disk stalled: fsync waits)",
                          "clear error", lambda args=args, out=out: _second_writer(b, args, out),
                          b.repro(args), "own"))
    return cases


def _second_writer(b: Bench, args: list[str], out: Path) -> Verdict:
    """``inca ARGS`` run while a first writer of the same command holds ``out`` (its fsyncs
    wait): refused clearly, and the first writer then finishes."""
    log, go = out.parent / f"{out.name}-first.log", out.parent / f"{out.name}.go"
    lock = out.parent / f".{out.name}.lock"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as f:
        first = b.spawn([sys.executable, str(b.wrapper), *args], stdout=f,
                        stderr=subprocess.STDOUT,
                        env=b.env({"FAULTS_FSYNC": f"stall:{go}"}))
        try:
            deadline = time.monotonic() + 180
            while first.poll() is None and time.monotonic() < deadline and not (
                    lock.exists() and lock.read_text().strip()):
                time.sleep(0.02)
            holding = first.poll() is None
            r = b.cli(args)  # this process is not the first writer: locks apply
            go.touch()
            first.wait(timeout=300)
        finally:
            go.touch()
            b.end(first)
    if not holding:
        raise RuntimeError("the first writer never held its folder:\n"
                           + log.read_text(errors="replace")[-2000:])
    v = error_verdict(r, ("in use",))
    if first.returncode != 0:
        return Verdict(SILENT, "the first writer failed: "
                       + short(last_line(log.read_text(errors="replace"))),
                       data_lost=True)
    try:  # and what it wrote reads back
        if (out / "manifest.json").exists():
            size = f"{len(ActivationCache(out))} samples"
        else:
            size = f"task of {len(read_task_files(out / 'task').meta['members'])} member(s)"
    except InCAError as e:
        return Verdict(SILENT, f"the first writer's output does not read back: {e}",
                       data_lost=True)
    v.detail += f" | the first writer then finished: exit 0, {size}"
    return v


def _damaged_cache_cases(b: Bench, ext: list[str], root: Path, layers: str) -> list[Case]:
    """Damaged complete caches, extracted into again."""
    def damaged(cid: str, what: str, damage: Callable[[Path], Any]) -> Case:
        folder = root / cid
        args = [*ext, "--data", "digits", "--limit", "40", "--layers", layers, "--out",
                str(folder), "--batch-size", "32", "--num-workers", "0"]

        def go() -> Verdict:
            with b.bb_lock:
                extract_to_cache(b.bb, load_dataset("digits", limit=40), folder,
                                 layers=b.layers[:2], batch_size=32, num_workers=0,
                                 progress=False)
            damage(folder)
            r = b.cli(args)
            if r.rc == 0:  # re-extracting the damaged part is a fine answer too
                try:
                    cache_arrays(folder)
                    return Verdict(HANDLED, "re-extracted: " + short(last_line(r.stdout)))
                except Exception as e:  # noqa: BLE001 - the cache is still damaged
                    return Verdict(SILENT, f"exit 0 but the cache is still damaged: {e}")
            return error_verdict(r, ())
        return Case(cid, "cli", what + " (inca extract into it again)", "clear error", go,
                    b.repro(args), "shared")

    def first_layer(folder: Path) -> Path:
        return folder / "shards" / "00000" / (b.layers[0].replace("/", "_") + ".npy")

    return [
        damaged("cache-manifest-garbage", "a cache whose manifest.json is not JSON",
                lambda f: (f / "manifest.json").write_text("{garbage")),
        damaged("cache-labels-deleted", "a complete cache whose shard 0 labels.npy was deleted",
                lambda f: (f / "shards" / "00000" / "labels.npy").unlink()),
        damaged("cache-shard-truncated", "a complete cache whose shard 0 token file was cut "
                "in half", lambda f: truncate(first_layer(f))),
    ]
