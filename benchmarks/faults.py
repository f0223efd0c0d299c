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
   outside attack (``_faults_attack.py``: thin strips, a hub classifier checkpoint, a cache
   overwritten in place, 2 million task names, odd manifests, edited task files, EXIF
   orientation, media types, /docs). Handled clearly: a
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

This module runs the parts and writes the results; each part is a module of its own
(``_faults_kills.py``, ``_faults_kills_fit.py``, ``_faults_inputs.py``, ``_faults_cli.py``,
``_faults_storage.py``, ``_faults_http.py``, ``_faults_attack.py``, ``_faults_load.py``),
on the run's workspace (``_faults_bench.py``) and cases (``_faults_cases.py``). The helpers
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
from pathlib import Path
from typing import Any

import _faults_attack as attack
import torch
from _common import command_line, environment, write_results
from _faults_bench import CLASSES, KEY, Bench, short, source_info
from _faults_cases import HANDLED, SILENT, Inputs, run_cases
from _faults_cli import option_cases, serve_cases, task_cases
from _faults_http import http_cases
from _faults_inputs import folder_cases, library_cases, split_cases
from _faults_kills import kill_extractions, kill_saves
from _faults_kills_fit import kill_fits
from _faults_load import run_load
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


def main() -> None:
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
    args = ap.parse_args()
    parts = {q for p in args.parts.split(",") for q in PARTS.get(p, (p,))}
    if args.quick:
        parts = {"library"}
    args.parts = ",".join(sorted(parts))
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # children, and the server
    torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)
    kills: list[dict[str, Any]] = []
    cases: list[dict[str, Any]] = []
    load: dict[str, Any] | None = None
    fit_clean: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="inca-faults-") as tmp, \
            timer(seconds, "total"):
        b = Bench(Path(tmp), args.backbone, args.threads)
        backbone = b.scrub(" ".join(b.cli_backbone[1:]).replace("--input-size ", "at ")
                           + (" px" if b.kwargs else ""))
        try:
            if "extract" in parts:
                print(f"1a. extract_to_cache killed {args.kills} times", flush=True)
                with timer(seconds, "extract"):
                    kills += kill_extractions(b, args.kills, rng)
            if "save" in parts:
                print(f"1b. Task.save killed {args.kills} times", flush=True)
                with timer(seconds, "save"):
                    kills += kill_saves(b, args.kills, rng)
            if "fit" in parts and args.fit_kills:
                print(f"1c. inca fit killed {args.fit_kills} times", flush=True)
                with timer(seconds, "fit"):
                    rows, fit_clean = kill_fits(b, args.fit_kills, rng)
                kills += rows
            x = Inputs()
            if "library" in parts:
                print("2. bad inputs: library", flush=True)
                lib_task = make_task(b.bb, "inca", b.layers[0], 5, CLASSES).attach(b.bb)
                cases += run_cases(library_cases(b, x, lib_task) + attack.library_cases(b),
                                   1, b.scrub)
            if parts & {"cli", "http", "load"}:
                task_dir = b.tmp / "tasks" / "digits"
                task = serve_task(b, task_dir)
            if "cli" in parts:
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
                with timer(seconds, "cli"):
                    cases += run_cases(catalogue, args.jobs, b.scrub)
            if parts & {"http", "load"}:
                from serve import Server

                options = ["--api-key", KEY, "--device", "cpu", "--max-upload-mb", "2",
                           "--max-batch", "32", "--max-wait-ms", "5", "--batching"]
                with Server([task_dir], options, b.tmp / "server.log", 180) as server:
                    if "http" in parts:
                        print("2. bad inputs: HTTP", flush=True)
                        with timer(seconds, "http"):
                            cases += run_cases(http_cases(b, server.port, x, task), 1, b.scrub)
                    if "load" in parts:
                        print("3. load with bombs", flush=True)
                        with timer(seconds, "load"):
                            load = run_load(b, server, task, args)
                        load["server_log_tail"] = b.scrub(server.log_tail(1500))
                if "http" in parts:  # the attack's cases, on a server of default limits
                    with timer(seconds, "http"):
                        cases += attack.http_rows(b, x, task_dir, task)
        finally:
            b.end_all()
    payload = summarize(kills, cases, load, fit_clean, args, seconds, backbone)
    md = to_markdown(payload)
    folder = args.results_dir or Path(__file__).parent / "results"
    path = write_results("faults", payload, md, folder)
    print(md)
    print(f"wrote {path}")


def summarize(kills: list[dict[str, Any]], cases: list[dict[str, Any]],
              load: dict[str, Any] | None, fit_clean: dict[str, Any],
              args: argparse.Namespace, seconds: dict[str, float], backbone: str
              ) -> dict[str, Any]:
    counted = [c for c in cases if c["outcome"] != "harness error"]
    phases = (load or {}).get("phases", {})
    alone, bombs = phases.get("alone", {}), phases.get("bombs", {})
    p99a = alone.get("latency_ms", {}).get("p99")
    p99b = bombs.get("latency_ms", {}).get("p99")
    return {
        "faults_injected": len(kills),
        "faults_survived": sum(k["survived"] for k in kills),
        "bad_inputs_tried": len(counted),
        "bad_inputs_handled_clearly": sum(c["outcome"] == HANDLED for c in counted),
        "silent_wrong_results": sum(k["silent_wrong"] for k in kills)
        + sum(c["outcome"] == SILENT for c in counted),
        "data_lost_events": sum(k["data_lost"] for k in kills)
        + sum(bool(c["data_lost"]) for c in counted),
        "load": {
            "requests": alone.get("requests", 0) + bombs.get("requests", 0),
            "errors": alone.get("errors", 0) + bombs.get("errors", 0),
            "wrong_answers": alone.get("wrong_answers", 0) + bombs.get("wrong_answers", 0),
            "p99_ms_normal": p99a,
            "p99_ms_normal_under_bombs": p99b,
        },
        "benchmark": "faults", "command": command_line(), "environment": environment(),
        "runtime_s": round(seconds["total"], 1),
        "part_seconds": {k: round(v, 1) for k, v in seconds.items() if k != "total"},
        "backbone": backbone, "inca_source": source_info(),
        "settings": {k: v for k, v in vars(args).items() if k != "results_dir"},
        "p99_under_bombs_over_alone": p99b / p99a if p99a and p99b else None,
        "kills": kills, "fit_clean_run": fit_clean, "bad_inputs": cases,
        "harness_errors": [c for c in cases if c["outcome"] == "harness error"],
        "load_detail": load,
    }


def to_markdown(p: dict[str, Any]) -> str:
    env, load = p["environment"], p["load"]

    def cell(text: Any, n: int = 160) -> str:
        return short(str(text), n).replace("|", "\\|")

    def ms(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.0f}"

    md = [
        "# Faults: repeated kill -9, bad inputs, `inca serve` under decompression bombs",
        "",
        f"Command: `{p['command']}`  ",
        f"{env['device']}, torch {env['torch']}, {env['cpu_threads']} thread(s) per process; "
        f"backbone {p['backbone']}; runtime {p['runtime_s']:.0f} s; inca at commit "
        f"{p['inca_source']['commit']}"
        + (" with uncommitted changes" if p["inca_source"]["uncommitted_changes_in_src"]
           else "") + ".  ",
        "Seconds per part: " + ", ".join(f"{k} {v:.1f}" for k, v in p["part_seconds"].items())
        + " (the machine's 2 cores were shared with other work).",
        "",
        "| measure | value |",
        "|---|---:|",
        f"| faults injected (SIGKILL) | {p['faults_injected']} |",
        f"| faults survived | {p['faults_survived']} |",
        f"| bad inputs tried | {p['bad_inputs_tried']} |",
        f"| bad inputs handled clearly | {p['bad_inputs_handled_clearly']} |",
        f"| silent wrong results | {p['silent_wrong_results']} |",
        f"| data-lost events | {p['data_lost_events']} |",
        f"| load: normal requests / errors / wrong answers | {load['requests']} / "
        f"{load['errors']} / {load['wrong_answers']} |",
        f"| load: p99 ms alone / under bombs | {ms(load['p99_ms_normal'])} / "
        f"{ms(load['p99_ms_normal_under_bombs'])} |",
        "",
    ]
    if p["kills"]:
        md += ["## Kills", "",
               "| kind | injected | survived | data lost | silent wrong | states hit at the "
               "kill |", "|---|---:|---:|---:|---:|---|"]
        for kind in dict.fromkeys(k["kind"] for k in p["kills"]):
            rows = [k for k in p["kills"] if k["kind"] == kind]
            states = sorted({str(r.get("state_at_kill") or r.get("loaded_as")) for r in rows})
            md.append(f"| {kind} | {len(rows)} | {sum(r['survived'] for r in rows)} | "
                      f"{sum(r['data_lost'] for r in rows)} | "
                      f"{sum(r['silent_wrong'] for r in rows)} | {cell('; '.join(states), 300)} |")
        md += ["", "Survived: `extract_to_cache` resumed in-process to a cache equal to an "
               "uninterrupted one, with no recorded shard extracted again; `Task.save` left "
               "the last finished save or the one in progress, and the next save left nothing "
               "behind; `inca fit` run again exited 0, kept every recorded shard file, and gave "
               "the clean run's cache and task weights (a run killed after its report was "
               "written may instead be refused clearly, as a finished run, and is then fitted "
               "again with `--overwrite`). Data lost: a resume that failed or wrote a recorded "
               "shard again. Each kill's details are in faults.json (`kills`).", ""]
        not_survived = [k for k in p["kills"] if not k["survived"]]
        if not_survived:
            why = [k.get("rerun_error") or k.get("resume_error") or k.get("loaded_as")
                   for k in not_survived]
            md += ["Not survived:", ""] + [
                f"- {k['kind']}, killed at {k.get('killed_at') or k.get('kill_after_s')} "
                f"({k.get('state_at_kill')}): {cell(w, 300)}"
                for k, w in zip(not_survived, why, strict=True)] + [""]
    if p["bad_inputs"]:
        md += ["## Bad inputs", "",
               "Handled clearly: a 4xx with a JSON `detail`; exit code 2 with one `error: ...` "
               "line on stderr and no traceback (`inca predict`, which reads on past an "
               "unreadable image: exit 1, one `error:` line naming it, the good image "
               "predicted); or the correct result where one is expected. "
               "Silent wrong: a bad input accepted, or a valid one answered wrongly. CLI cases "
               "run in their own process (`own`: kills, patched disks, second writers, data "
               "workers, serve) or through typer's runner in this process (`shared`: the same "
               "command and error handling, without 2-4 s of interpreter start-up each). "
               "An input starting H1 ... L10 is a case of the outside attack (its report's "
               "numbering; benchmarks/_faults_attack.py); its HTTP cases run against a server "
               "of default limits (10 MB bodies), the others against a 2 MiB one.", "",
               "| id | area | input | expected | outcome | what happened |",
               "|---|---|---|---|---|---|"]
        for c in p["bad_inputs"]:
            mark = c["outcome"] if c["outcome"] == HANDLED else f"**{c['outcome']}**"
            area = f"{c['area']} ({c['process']})" if c["process"] else c["area"]
            md.append(f"| {c['id']} | {area} | {cell(c['input'], 120)} | {c['expect']} | "
                      f"{mark} | {cell(c['detail'])} |")
        bad = [c for c in p["bad_inputs"] if c["outcome"] != HANDLED]
        if bad:
            md += ["", "Not handled clearly, with a reproduction (`$TMP` is the script's "
                   "temporary folder; see the case's input for how the file was made):", ""]
            md += [f"- `{c['id']}`: {cell(c['detail'], 400)}  \n  `{c['reproduce']}`"
                   for c in bad]
        md.append("")
    detail = p.get("load_detail")
    if detail:
        md += ["## Load with bombs", "",
               f"`inca serve` (batching on, max batch 32, wait 5 ms, API key), one 8x8 PNG per "
               f"request from {p['settings']['clients']} client threads; bombs: "
               f"{detail['bomb']} from {p['settings']['bomb_clients']} threads of another "
               f"process, without pause; {p['settings']['rounds']} alternating rounds of "
               f"{p['settings']['requests'] // p['settings']['rounds']} requests. Server, "
               "clients and bombers share the machine's 2 cores; every answer is checked "
               "against in-process `Task.predict_proba` (probabilities within 1e-4).", "",
               "| phase | requests | errors | wrong | p50 ms | p90 ms | p99 ms | max ms | "
               "bomb requests (status) | bomb p50 ms |",
               "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
        for name, ph in detail["phases"].items():
            lat = ph["latency_ms"]
            status = ", ".join(f"{k}: {v}" for k, v in sorted(ph["bomb_status"].items()))
            md.append(f"| {name} | {ph['requests']} | {ph['errors']} | {ph['wrong_answers']} | "
                      f"{ms(lat['p50'])} | {ms(lat['p90'])} | {ms(lat['p99'])} | "
                      f"{ms(lat['max'])} | {ph['bomb_requests']} ({status or '-'}) | "
                      f"{ms(ph['bomb_latency_ms']['p50'])} |")
        ratio = p["p99_under_bombs_over_alone"]
        alone, bombs = detail["phases"]["alone"], detail["phases"]["bombs"]
        per_bomb = ((bombs["server_cpu_s"] - alone["server_cpu_s"]) / bombs["bomb_requests"]
                    * 1000 if bombs["bomb_requests"] else None)
        md += ["", f"- p99 under bombs / alone: **{ratio:.2f}** (target: at most 2)"
               if ratio else "- p99 ratio: n/a",
               f"- server CPU: {alone['server_cpu_s']:.1f} s in {alone['wall_s']:.1f} s alone, "
               f"{bombs['server_cpu_s']:.1f} s in {bombs['wall_s']:.1f} s under bombs: about "
               f"{ms(per_bomb)} ms per rejected bomb request (parsing the body, reading the "
               "headers); the bombs cost CPU time, not memory",
               f"- server peak RSS: {ms(detail['server_peak_rss_mib_before'])} MiB before the "
               f"load, {ms(detail['server_peak_rss_mib_after'])} MiB after (a decoded bomb "
               "would add 430 MiB)", ""]
    return "\n".join(md)


if __name__ == "__main__":
    main()
