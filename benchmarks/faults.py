"""Faults at scale: repeated kill -9, a catalogue of bad inputs, `inca serve` under bombs.

Usage: python benchmarks/faults.py [--kills 8] [--fit-kills 4] [--seed 0] [--jobs 2]
           [--threads 1] [--requests 400] [--rounds 4] [--clients 4] [--bomb-clients 2]
           [--bombs-per-request 3] [--parts kills,inputs,load] [--backbone auto]
           [--quick] [--results-dir DIR]

The heavier, repeated version of the fault tests (tests/test_faults_*.py), on a small
backbone (the bundled DINOv2 ViT-S/14 at 28 px, or a tiny random Hugging Face ViT where
its weights are not installed) and scikit-learn's digits. About 4 minutes on 2 busy cores.

1. Kills (``--parts extract,save,fit``). Subprocesses get SIGKILL at seeded random
   moments. ``extract_to_cache`` (``--kills`` times, a moment within the time an
   uninterrupted worker took): resumed here, the cache must equal the uninterrupted one
   and no shard recorded before the kill may be extracted again. ``Task.save`` rotating
   three tasks into one folder (``--kills`` times): the folder must load as exactly the
   last finished save or the one in progress, and the next save must leave nothing
   behind. ``inca fit --out`` (``--fit-kills`` times, each after one of the run's moments
   in turn, plus a random part of the next phase): the same command run again must
   succeed, keep the cache files recorded before the kill, and give the cache and the task
   of an uninterrupted run. Workers start one ahead and wait for ``go``, so start-up costs
   neither time nor kill moments.
2. Bad inputs (``--parts library,cli,http``). Bad images and folders, tampered task files,
   bad options, a full and a stalled disk, a second writer, damaged caches, ``inca serve``
   refusing to start, hostile HTTP requests to a real ``inca serve``, and the cases of an
   outside attack (``_faults_attack.py`` and ``_faults_attack_http.py``: thin strips, a
   hub classifier checkpoint, a cache overwritten in place, 2 million task names, odd
   manifests, edited task files, EXIF orientation, media types, /docs). Handled clearly: a
   4xx with a JSON ``detail``; exit code 2 with one ``error: ...`` line on stderr (only
   progress-bar redraws after it) and no traceback; or the correct result where one is
   expected (16-bit images scaled, hidden files ignored). A bad input accepted, or a valid
   one answered wrongly, is a silent wrong result. CLI cases that need a process of their
   own (patched disks, second writers, data-loading workers, serve) get one, ``--jobs``
   at a time; the others run through typer's runner in this process.
3. Load with bombs (``--parts load``). ``inca serve`` (batching on, an API key) answers
   one-image requests from ``--clients`` threads, alone and while ``--bomb-clients``
   threads post decompression bombs (12000x12000 PNGs, ``--bombs-per-request`` each)
   without pause, in alternating rounds. Every answer is checked against in-process
   ``Task.predict_proba`` of the same bytes. The bombers are a process of their own;
   clients, bombers and server share the CPUs.

``--quick`` runs the library cases only (a smoke test). Every subprocess is ended in
``finally`` blocks; everything is written to a temporary folder.
Results: benchmarks/results/faults.{json,md}.

This module runs the parts and writes the results (``_faults_report.py`` makes them); each
part is a module of its own (``_faults_kills.py``, ``_faults_kills_fit.py``,
``_faults_inputs.py``, ``_faults_cli.py``, ``_faults_storage.py``, ``_faults_http.py``,
``_faults_attack.py``, ``_faults_attack_http.py``, ``_faults_load.py``), on the run's
workspace (``_faults_bench.py``) and cases (``_faults_cases.py``). The helpers
the fault tests share (task tampers, request bodies, tiny models, free ports) come from
``tests/tiny.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _faults_attack as attack
import _faults_attack_http as attack_http
import torch
from _common import write_results
from _faults_bench import CLASSES, KEY, Bench
from _faults_cases import Inputs, run_cases
from _faults_cli import option_cases, serve_cases, task_cases
from _faults_http import http_cases
from _faults_inputs import folder_cases, library_cases, split_cases
from _faults_kills import kill_extractions, kill_saves
from _faults_kills_fit import kill_fits
from _faults_load import run_load
from _faults_report import summarize, to_markdown
from _faults_storage import storage_cases
from tiny import make_task

import inca
from inca.data import load_dataset
from inca.task import Task, load_task


@contextlib.contextmanager
def timer(into: dict[str, float], name: str) -> Iterator[None]:
    """Add the seconds the block takes to ``into[name]``."""
    t = time.perf_counter()
    try:
        yield
    finally:
        into[name] = into.get(name, 0.0) + time.perf_counter() - t


def serve_task(b: Bench, folder: Path) -> Task:
    """A task trained briefly on digits (so its answers are worth checking), saved."""
    task = inca.fit(b.bb, load_dataset("digits", limit=300), kinds=("inca", "linear"),
                    layers=b.layers[:2], lrs=(3e-3,), epochs=3, progress=False,
                    num_workers=0, device="cpu")
    task.save(folder)
    return load_task(folder, backbone=b.bb)


PARTS = {"kills": ("extract", "save", "fit"), "inputs": ("library", "cli", "http")}
ALL_PARTS = "extract,save,fit,library,cli,http,load"


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=8, help="kills of extraction and of saving")
    ap.add_argument("--fit-kills", type=int, default=4, help="kills of `inca fit`")
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    ap.add_argument("--jobs", type=int, default=2, help="CLI cases run side by side")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads of every process (on few busy cores more threads "
                         "spin-wait: 2 made extraction 10x slower here)")
    ap.add_argument("--requests", type=int, default=400, help="per load phase")
    ap.add_argument("--rounds", type=int, default=4, help="alternations alone / with bombs")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--bomb-clients", type=int, default=2)
    ap.add_argument("--bombs-per-request", type=int, default=3)
    ap.add_argument("--parts", default=ALL_PARTS,
                    help=f"some of {ALL_PARTS} ('kills' and 'inputs' name three each)")
    ap.add_argument("--backbone", default="auto", choices=("auto", "dinov2", "tiny-hf"))
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: the library cases only (no subprocess, seconds)")
    ap.add_argument("--results-dir", type=Path, default=None)
    return ap


def parse_args() -> tuple[argparse.Namespace, set[str]]:
    """The options, and the parts to run (``args.parts`` rewritten as their sorted list)."""
    args = parser().parse_args()
    parts = {q for p in args.parts.split(",") for q in PARTS.get(p, (p,))}
    if args.quick:
        parts = {"library"}
    args.parts = ",".join(sorted(parts))
    return args, parts


@dataclass
class Found:
    """What the parts found, and the seconds each took."""

    kills: list[dict[str, Any]] = field(default_factory=list)
    cases: list[dict[str, Any]] = field(default_factory=list)
    load: dict[str, Any] | None = None
    fit_clean: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def main() -> None:
    args, parts = parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # children, and the server
    torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)
    found = Found()
    with tempfile.TemporaryDirectory(prefix="inca-faults-") as tmp, \
            timer(found.seconds, "total"):
        b = Bench(Path(tmp), args.backbone, args.threads)
        backbone = b.scrub(" ".join(b.cli_backbone[1:]).replace("--input-size ", "at ")
                           + (" px" if b.kwargs else ""))
        try:
            run_kills(b, args, parts, rng, found)
            run_inputs_and_load(b, args, parts, found)
        finally:
            b.end_all()
    payload = summarize(found.kills, found.cases, found.load, found.fit_clean, args,
                        found.seconds, backbone)
    md = to_markdown(payload)
    folder = args.results_dir or Path(__file__).parent / "results"
    path = write_results("faults", payload, md, folder)
    print(md)
    print(f"wrote {path}")


def run_kills(b: Bench, args: argparse.Namespace, parts: set[str], rng: random.Random,
              found: Found) -> None:
    """Part 1: extraction, saving and ``inca fit`` killed."""
    seconds = found.seconds
    if "extract" in parts:
        print(f"1a. extract_to_cache killed {args.kills} times", flush=True)
        with timer(seconds, "extract"):
            found.kills += kill_extractions(b, args.kills, rng)
    if "save" in parts:
        print(f"1b. Task.save killed {args.kills} times", flush=True)
        with timer(seconds, "save"):
            found.kills += kill_saves(b, args.kills, rng)
    if "fit" in parts and args.fit_kills:
        print(f"1c. inca fit killed {args.fit_kills} times", flush=True)
        with timer(seconds, "fit"):
            rows, found.fit_clean = kill_fits(b, args.fit_kills, rng)
        found.kills += rows


def run_inputs_and_load(b: Bench, args: argparse.Namespace, parts: set[str],
                        found: Found) -> None:
    """Parts 2 and 3: the bad inputs (library, CLI, HTTP), and the load with bombs."""
    x = Inputs()
    if "library" in parts:
        print("2. bad inputs: library", flush=True)
        lib_task = make_task(b.bb, "inca", b.layers[0], 5, CLASSES).attach(b.bb)
        found.cases += run_cases(library_cases(b, x, lib_task) + attack.library_cases(b),
                                 1, b.scrub)
    if not parts & {"cli", "http", "load"}:
        return
    task_dir = b.tmp / "tasks" / "digits"
    task = serve_task(b, task_dir)
    if "cli" in parts:
        run_cli(b, x, task_dir, args.jobs, found)
    if parts & {"http", "load"}:
        run_served(b, x, task_dir, task, args, parts, found)


def run_cli(b: Bench, x: Inputs, task_dir: Path, jobs: int, found: Found) -> None:
    """The CLI's bad inputs, ``jobs`` at a time."""
    make_task(b.bb, "inca", b.layers[0], 99, CLASSES).save(b.tmp / "tasks" / "other")
    ext = ["extract", *b.cli_backbone, "--device", "cpu", "--batch-size", "8"]
    fit = ["fit", *b.cli_backbone, "--device", "cpu", "--num-workers", "0",
           "--kinds", "linear", "--layers", "last", "--lrs", "1e-2", "--epochs",
           "1", "--batch-size", "16", "--mode", "cached"]
    print("2. bad inputs: CLI", flush=True)
    catalogue = (folder_cases(b, x, ext) + split_cases(b, x, fit)
                 + task_cases(b, x, task_dir) + serve_cases(b, task_dir)
                 + option_cases(b, fit) + storage_cases(b, ext, fit)
                 + attack.cli_cases(b, x, ext, fit, task_dir))
    with timer(found.seconds, "cli"):
        found.cases += run_cases(catalogue, jobs, b.scrub)


def run_served(b: Bench, x: Inputs, task_dir: Path, task: Task, args: argparse.Namespace,
               parts: set[str], found: Found) -> None:
    """Hostile requests and the load with bombs against one ``inca serve`` (2 MiB
    limit), then the attack's HTTP cases against one of default limits."""
    from serve import Server

    seconds = found.seconds
    options = ["--api-key", KEY, "--device", "cpu", "--max-upload-mb", "2",
               "--max-batch", "32", "--max-wait-ms", "5", "--batching"]
    with Server([task_dir], options, b.tmp / "server.log", 180) as server:
        if "http" in parts:
            print("2. bad inputs: HTTP", flush=True)
            with timer(seconds, "http"):
                found.cases += run_cases(http_cases(b, server.port, x, task), 1, b.scrub)
        if "load" in parts:
            print("3. load with bombs", flush=True)
            with timer(seconds, "load"):
                found.load = run_load(b, server, task, args)
            found.load["server_log_tail"] = b.scrub(server.log_tail(1500))
    if "http" in parts:  # the attack's cases, on a server of default limits
        with timer(seconds, "http"):
            found.cases += attack_http.http_rows(b, x, task_dir, task)


if __name__ == "__main__":
    main()
