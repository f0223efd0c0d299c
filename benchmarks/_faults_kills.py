"""Part 1 of the faults benchmark: kills. ``extract_to_cache`` and ``Task.save`` get SIGKILL
at seeded random moments; what each left must resume to what an uninterrupted run gives,
or load as a whole task (``benchmarks/faults.py`` describes each). ``inca fit`` killed:
``_faults_kills_fit.py``."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _faults_bench import (
    CLASSES,
    Bench,
    cache_arrays,
    cache_phase,
    changed,
    compare_arrays,
    drain,
    recorded,
    shard_files,
    stale,
    task_diff,
    wait_line,
)
from tiny import TESTS, make_task

from inca.data import load_dataset
from inca.features import extract_to_cache
from inca.task import Task, load_task

# Extracts digits into a cache until killed (part 1a); starts on "go" (stdin), once warm.
EXTRACT_WORKER = '''
import json, sys
cfg = json.loads(sys.argv[1])
import inca
from inca.data import load_dataset
from inca.features import extract_to_cache
bb = inca.create_backbone(cfg["spec"], device="cpu", **cfg["kwargs"])
ds = load_dataset("digits", limit=cfg["n"])
bb.fingerprint()
print("ready", flush=True)
sys.stdin.readline()
extract_to_cache(bb, ds, cfg["out"], layers=cfg["layers"], batch_size=cfg["batch_size"],
                 shard_size=cfg["shard_size"], num_workers=0, progress=False)
print("done", flush=True)
'''


# Saves three tasks into one folder in turn, printing the count of finished saves (1b);
# starts on "go" (stdin).
SAVE_WORKER = '''
import json, sys, types
cfg = json.loads(sys.argv[1])
sys.path.insert(0, cfg["tests"])
from tiny import make_task
info = json.loads(open(cfg["info"]).read())
bb = types.SimpleNamespace(embed_dims={cfg["layer"]: cfg["embed_dim"]}, describe=lambda: info)
tasks = [make_task(bb, "inca", cfg["layer"], s, cfg["classes"]) for s in cfg["seeds"]]
print("ready", flush=True)
sys.stdin.readline()
i = 0
while True:
    tasks[i % len(tasks)].save(cfg["folder"])
    i += 1
    print(i, flush=True)
'''


class Warm:
    """Worker processes started one ahead (:meth:`prepare`): the next one imports torch
    while this process checks the last kill, and works only once told ``go`` (so kill
    moments count from the work, not from a start-up whose length varies with the load)."""

    def __init__(self, b: Bench, code: str, cfg: Callable[[int], dict[str, Any]],
                 log: Callable[[int], Path]) -> None:
        self.b, self.code, self.cfg, self.log = b, code, cfg, log
        self.next: tuple[int, subprocess.Popen] | None = None

    def _spawn(self, i: int) -> subprocess.Popen:
        with open(self.log(i), "wb") as f:
            return self.b.spawn([sys.executable, "-c", self.code, json.dumps(self.cfg(i))],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=f,
                                env=self.b.env())

    def prepare(self, i: int) -> None:
        """Start worker ``i``'s start-up now."""
        self.close()
        self.next = (i, self._spawn(i))

    def start(self, i: int) -> subprocess.Popen:
        """Worker ``i``, ready and told to go."""
        if self.next and self.next[0] == i:
            proc = self.next[1]
        else:
            self.close()
            proc = self._spawn(i)
        self.next = None
        if wait_line(proc, b"ready", 300) is None:
            self.b.end(proc)
            raise RuntimeError(f"worker {i} failed:\n"
                               + self.log(i).read_text(errors="replace")[-2000:])
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        return proc

    def close(self) -> None:
        if self.next:
            self.b.end(self.next[1])
            self.next = None


def kill_after(proc: subprocess.Popen, delay: float) -> tuple[bool, bytes]:
    """SIGKILL ``proc`` ``delay`` s from now. ``(killed while running, its stdout)``."""
    time.sleep(delay)
    if proc.poll() is not None:
        return False, drain(proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    return True, drain(proc)


def kill_extractions(b: Bench, kills: int, rng: random.Random) -> list[dict[str, Any]]:
    """Part 1a: ``extract_to_cache`` killed, resumed here, compared with a clean run."""
    root = b.tmp / "kill-extract"
    root.mkdir()
    n, params = 480, {"layers": b.layers, "batch_size": 16, "shard_size": 32}
    ds = load_dataset("digits", limit=n)
    warm = Warm(b, EXTRACT_WORKER, lambda i: {"spec": b.spec, "kwargs": b.kwargs, "n": n,
                                              "out": str(root / f"run{i}"), **params},
                lambda i: root / f"run{i}.log")
    rows = []
    try:
        # worker 0 runs uninterrupted: the reference cache, and how long extraction takes
        proc = warm.start(0)
        t = time.monotonic()
        ok = wait_line(proc, b"done", 600) is not None
        window = time.monotonic() - t
        b.end(proc)
        warm.prepare(1)
        if not ok:
            raise RuntimeError("extraction worker failed:\n"
                               + (root / "run0.log").read_text(errors="replace")[-2000:])
        clean = cache_arrays(root / "run0")
        attempt = 0
        while len(rows) < kills and attempt < 3 * kills:
            attempt += 1
            delay = rng.uniform(0, window)
            proc = warm.start(attempt)
            try:
                killed, _ = kill_after(proc, delay)
            finally:
                b.end(proc)
            warm.prepare(attempt + 1)
            if killed:
                rows.append(resume_extraction(b, ds, root / f"run{attempt}", params, clean,
                                              delay, window))
    finally:
        warm.close()
    return rows


def resume_extraction(b: Bench, ds: Any, out: Path, params: dict[str, Any],
                      clean: dict[str, np.ndarray], delay: float, window: float
                      ) -> dict[str, Any]:
    phase, before = cache_phase(out), shard_files(out)
    done = sum(s["count"] for s in recorded(out))
    row: dict[str, Any] = {"kind": "extract_to_cache", "kill_after_s": round(delay, 3),
                           "clean_extraction_s": round(window, 3),
                           "state_at_kill": phase, "stale_tmp_at_kill": len(stale(out)),
                           "samples_recorded": done}
    seen: list[int] = []
    real = b.bb.extract

    def counting(x: torch.Tensor, layers: Any = None) -> dict[str, torch.Tensor]:
        seen.append(len(x))
        return real(x, layers)

    b.bb.extract = counting
    try:
        extract_to_cache(b.bb, ds, out, num_workers=0, progress=False, **params)
        error = None
    except Exception as e:  # noqa: BLE001 - recorded: the resume failed
        error = f"{type(e).__name__}: {e}"
    finally:
        del b.bb.extract
    row["resume_error"] = b.scrub(error) if error else None
    extracted = max(sum(seen) - 1, 0)  # one image is the shape probe
    rewritten = changed(before, out)
    row.update(images_extracted_on_resume=extracted, expected=len(ds) - done,
               recorded_files_rewritten=len(rewritten), stale_tmp_after=len(stale(out)))
    bitwise, diff = (False, float("inf"))
    if error is None:
        bitwise, diff = compare_arrays(cache_arrays(out), clean)
    row.update(bitwise_equal=bitwise, max_abs_diff=diff)
    row["data_lost"] = error is not None or bool(rewritten) or extracted > len(ds) - done
    row["silent_wrong"] = error is None and not (diff <= 1e-3)
    row["survived"] = not (row["data_lost"] or row["silent_wrong"] or row["stale_tmp_after"])
    return row


def kill_saves(b: Bench, kills: int, rng: random.Random) -> list[dict[str, Any]]:
    """Part 1b: ``Task.save`` rotating three tasks into one folder, killed; the folder
    must load as the last finished save or the one in progress."""
    root = b.tmp / "kill-save"
    root.mkdir()
    layer = b.layers[0]
    seeds = [11, 12, 13]
    # the same construction as SAVE_WORKER's (tests/tiny.py's), so copies are told apart
    tasks = [make_task(b.bb, "inca", layer, s, CLASSES) for s in seeds]
    first, recovery = (make_task(b.bb, "inca", layer, s, CLASSES) for s in (10, 14))
    info = root / "backbone.json"
    info.write_text(json.dumps(b.bb.describe()))
    warm = Warm(b, SAVE_WORKER, lambda i: {
        "info": str(info), "embed_dim": b.bb.embed_dims[layer], "layer": layer,
        "classes": CLASSES, "seeds": seeds, "folder": str(root / f"run{i}" / "task"),
        "tests": TESTS},
        lambda i: root / f"run{i}.log")
    try:
        return [kill_save(b, warm, i, rng.uniform(0.02, 1.0), first, tasks, recovery)
                for i in range(kills)]
    finally:
        warm.close()


def kill_save(b: Bench, warm: Warm, i: int, delay: float, first: Task, tasks: list[Task],
              recovery: Task) -> dict[str, Any]:
    """Worker ``i`` saving ``tasks`` in turn over ``first``, killed after ``delay`` s."""
    folder = Path(warm.cfg(i)["folder"])
    first.save(folder)
    proc = warm.start(i)
    try:
        killed, out = kill_after(proc, delay)
    finally:
        b.end(proc)
    warm.prepare(i + 1)
    if not killed:
        raise RuntimeError("the save worker ended on its own:\n"
                           + warm.log(i).read_text(errors="replace")[-2000:])
    lines = out.split()
    done = int(lines[-1]) if lines and lines[-1].isdigit() else 0
    # saves finished: `done`; on disk must be the last finished one or the next
    last = first if done == 0 else tasks[(done - 1) % 3]
    nxt = tasks[done % 3]
    siblings = sorted(p.name for p in folder.parent.iterdir() if p.name != ".task.lock")
    row: dict[str, Any] = {"kind": "Task.save", "kill_after_s": round(delay, 3),
                           "saves_finished": done, "folder_at_kill": siblings,
                           "state_at_kill": save_state(siblings)}
    try:
        loaded = load_task(folder, backbone=b.bb)
        found = "last finished save" if task_diff(loaded, last) == 0 else \
            "save in progress" if task_diff(loaded, nxt) == 0 else "another task"
    except Exception as e:  # noqa: BLE001 - recorded: the folder did not load
        found = f"unloadable: {type(e).__name__}: {b.scrub(str(e))}"
    row["loaded_as"] = found
    try:
        recovery.save(folder)
        recovered = task_diff(load_task(folder, backbone=b.bb), recovery) == 0
        left = sorted(p.name for p in folder.parent.iterdir()
                      if p.name not in ("task", ".task.lock"))
    except Exception as e:  # noqa: BLE001 - recorded
        recovered, left = False, [f"{type(e).__name__}: {b.scrub(str(e))}"]
    row.update(next_save_ok=recovered, left_behind=left)
    row["data_lost"] = found.startswith("unloadable")
    row["silent_wrong"] = found == "another task"
    row["survived"] = found in ("last finished save", "save in progress") and recovered \
        and not left
    return row


def save_state(siblings: list[str]) -> str:
    """Where a kill caught ``Task.save``, from what it left beside the folder."""
    new, old, task = (any(n.startswith(".task.new-") for n in siblings),
                      ".task.old" in siblings, "task" in siblings)
    if old and not task:
        return "between the two renames (old task aside, no task folder)"
    if old:
        return "after the swap (old copy not yet removed)"
    if new:
        return "writing the new copy"
    return "between saves"
