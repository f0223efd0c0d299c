"""Latency of a normal request to `inca serve`, alone and under attack, in one run.

Usage: python benchmarks/serve_load.py [--backbone dinov2_vits14] [--input-size 112]
           [--requests 300] [--rounds 5] [--clients 1] [--slowloris 200] [--strips 2]
           [--big 2] [--big-per-request 1] [--settle 8] [--server-option=--OPTION=VALUE]
           [--name serve-load]

``inca serve`` (its default limits, batching on) of the two tasks of
``benchmarks/serve.py`` (untrained InCA heads on the bundled DINOv2 ViT-S/14 at 112 px) runs
on 127.0.0.1. ``--clients`` threads send normal requests (one 28x28 PNG each, random
pixels, the next as soon as the last is answered), ``--requests`` of them per phase, in
``--rounds`` alternations of two phases: alone, and while another process
(``benchmarks/_attacks.py``) runs these attacks at once: ``--slowloris`` connections whose
headers never end (half trickled byte by byte, half stalled; each reopened when the
server closes it), ``--strips`` threads posting thin strips (4 x 1,000,000 and
40,000,000 x 1 px PNGs) and ``--big`` threads posting ``--big-per-request`` 6300 x 6300
1-bit PNGs (40 MP each, just under the limit) a request, every thread without pause. The
attacks start ``--settle`` seconds before the measured requests. Every answer is checked
against the library's own prediction of the same image.

Target: p99 under attack at most 2 x p99 alone. The clients, the attackers and the server
share the machine's CPUs (its load average is recorded).
Results: benchmarks/results/<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import torch
from _common import cpu_seconds, make_backbone, pct, publish
from PIL import Image
from serve import HOST, Server, make_tasks, png_images

import inca

TARGET = 2.0  # p99 under attack / p99 alone
ATTACKER = Path(__file__).with_name("_attacks.py")


def expected_answers(tasks: list[Path], images: list[bytes], args: argparse.Namespace
                     ) -> dict[str, torch.Tensor]:
    """Every task's probabilities for ``images``, from the library in this process."""
    bb = make_backbone(args.backbone, input_size=args.input_size, device=torch.device("cpu"))
    pictures = [Image.open(io.BytesIO(data)).convert("RGB") for data in images]
    return {p.name: inca.load_task(p, backbone=bb).predict_proba(pictures) for p in tasks}


def measure(url: str, images: list[bytes], expected: dict[str, torch.Tensor], *,
            requests: int, clients: int, timeout: float) -> dict[str, Any]:
    """``requests`` normal requests from ``clients`` threads: latencies of the 200s, the
    other answers, and the answers that differ from the library's."""
    lock = threading.Lock()
    todo = iter(range(requests))
    out: dict[str, Any] = {"latencies_s": [], "status": {}, "wrong": [], "errors": []}

    def client() -> None:
        with httpx.Client(timeout=timeout) as c:
            while True:
                with lock:
                    i = next(todo, None)
                if i is None:
                    return
                k = i % len(images)
                t = time.perf_counter()
                try:
                    r = c.post(f"{url}/predict", files=[("files", (f"{k}.png", images[k],
                                                                  "image/png"))])
                    status, dt = str(r.status_code), time.perf_counter() - t
                    tops = r.json()["predictions"][0]["tasks"] if r.status_code == 200 else {}
                except httpx.HTTPError as e:
                    status, dt, tops = type(e).__name__, time.perf_counter() - t, {}
                wrong = [f"image {k} task {name}: {top[0]}" for name, top in tops.items()
                         if abs(top[0]["probability"] - float(expected[name][k].max())) > 1e-3]
                with lock:
                    out["status"][status] = out["status"].get(status, 0) + 1
                    if status == "200":
                        out["latencies_s"].append(dt)
                    out["wrong"] += wrong

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return out


def attacked(server: Server, args: argparse.Namespace, run) -> tuple[Any, dict[str, Any]]:
    """``run()`` while the attack process runs; ``(its result, what the attacks got)``."""
    cfg = {"port": server.port, "key": "none", "slowloris": args.slowloris,
           "strips": args.strips, "big": args.big, "big_per_request": args.big_per_request,
           "timeout": args.timeout}
    proc = subprocess.Popen([sys.executable, str(ATTACKER), json.dumps(cfg)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the attack process did not start")
        time.sleep(args.settle)
        cpu = cpu_seconds(proc.pid)
        result = run()
        result["attacker_cpu_s"] = cpu_seconds(proc.pid) - cpu  # while measured
        out, _ = proc.communicate("stop\n", timeout=args.timeout + 30)
        return result, json.loads(out.strip().splitlines()[-1])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def merge(phases: list[dict[str, Any]]) -> dict[str, Any]:
    lat = [x for p in phases for x in p["latencies_s"]]
    status: dict[str, int] = {}
    for p in phases:
        for k, v in p["status"].items():
            status[k] = status.get(k, 0) + v
    return {"requests": sum(status.values()), "status": status, "ok": len(lat),
            "wrong_answers": sum(len(p["wrong"]) for p in phases),
            "wrong_examples": [w for p in phases for w in p["wrong"]][:3],
            "latency_ms": {"p50": pct(lat, 50), "p90": pct(lat, 90), "p99": pct(lat, 99),
                           "max": pct(lat, 100)},
            "server_cpu_s": sum(p["server_cpu_s"] for p in phases),
            "client_cpu_s": sum(p["client_cpu_s"] for p in phases),
            "attacker_cpu_s": sum(p.get("attacker_cpu_s", 0.0) for p in phases),
            "wall_s": sum(p["wall_s"] for p in phases), "latencies_s": lat}


def merge_attacks(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for run in runs:
        for kind, res in run.items():
            if not res["count"] and not res["open_at_end_s"]:
                continue
            o = out.setdefault(kind, {"count": 0, "status": {}, "latencies_s": [],
                                      "open_at_end": 0})
            o["count"] += res["count"]
            o["open_at_end"] += len(res["open_at_end_s"])
            o["oldest_open_s"] = max([o.get("oldest_open_s", 0.0), *res["open_at_end_s"]])
            o["latencies_s"] += res["latencies_s"]
            for k, v in res["status"].items():
                o["status"][k] = o["status"].get(k, 0) + v
    for o in out.values():
        o["latency_ms"] = {"p50": pct(o["latencies_s"], 50), "max": pct(o["latencies_s"], 100)}
        del o["latencies_s"]
    return out


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="dinov2_vits14")
    ap.add_argument("--input-size", type=int, default=112)
    ap.add_argument("--requests", type=int, default=300, help="per phase, all rounds")
    ap.add_argument("--rounds", type=int, default=5, help="alternations alone / attacked")
    ap.add_argument("--clients", type=int, default=1, help="threads sending normal requests")
    ap.add_argument("--slowloris", type=int, default=200)
    ap.add_argument("--strips", type=int, default=2)
    ap.add_argument("--big", type=int, default=2)
    ap.add_argument("--big-per-request", type=int, default=1)
    ap.add_argument("--settle", type=float, default=8.0,
                    help="seconds the attacks run before the measured requests (the 10 s for "
                         "headers then end within the measurement: the cut-off and reconnection "
                         "are measured too)")
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--server-option", action="append", default=[],
                    help="passed to inca serve (repeat; e.g. --server-option=--decode-threads=1)")
    ap.add_argument("--name", default="serve-load", help="results file name")
    return ap


def main() -> None:
    args = parser().parse_args()
    images = png_images(32)
    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tasks = make_tasks(tmp / "tasks", args.backbone, args.input_size)
        expected = expected_answers(tasks, images, args)
        with Server(tasks, args.server_option, tmp / "server.log", 180) as server:
            phases, attacks = run_rounds(server, images, expected, args, load)
            alive = server.proc.poll() is None
            peak_rss = server.peak_rss_mib()
            log = server.log_tail(100_000)
    fields = summarize(phases, attacks, args, load, alive, peak_rss, log)
    md = markdown(fields, args)
    print("\n".join(md))
    publish(args.name, fields, md)


def run_rounds(server: Server, images: list[bytes], expected: dict[str, torch.Tensor],
               args: argparse.Namespace, load: list[float]
               ) -> tuple[dict[str, list[dict[str, Any]]], list[dict[str, Any]]]:
    """A warm-up, then ``args.rounds`` alternations of a phase alone and one attacked:
    each phase's measurements, and what each attack got (``load``: the 1-min load average
    after each phase, appended)."""
    common = dict(images=images, expected=expected, clients=args.clients,
                  timeout=args.timeout)
    measure(server.url, requests=10, **common)  # warm-up
    phases: dict[str, list[dict[str, Any]]] = {"alone": [], "attacked": []}
    attacks = []
    per_round = max(1, args.requests // args.rounds)
    for r in range(args.rounds):
        for phase in ("alone", "attacked"):
            cpu, t = cpu_seconds(server.proc.pid), time.perf_counter()
            client = time.process_time()

            def run():
                return measure(server.url, requests=per_round, **common)

            if phase == "alone":
                res = run()
            else:
                res, got = attacked(server, args, run)
                attacks.append(got)
            res["wall_s"] = time.perf_counter() - t
            res["server_cpu_s"] = cpu_seconds(server.proc.pid) - cpu
            res["client_cpu_s"] = time.process_time() - client
            phases[phase].append(res)
            load.append(os.getloadavg()[0])
            print(f"round {r + 1} {phase}: p50 {pct(res['latencies_s'], 50):.0f} ms, "
                  f"p99 {pct(res['latencies_s'], 99):.0f} ms, {res['status']}, "
                  f"{len(res['wrong'])} wrong", flush=True)
    return phases, attacks


def summarize(phases: dict[str, list[dict[str, Any]]], attacks: list[dict[str, Any]],
              args: argparse.Namespace, load: list[float], alive: bool,
              peak_rss: float | None, log: str) -> dict[str, Any]:
    """The fields of <name>.json: each phase merged over the rounds, their ratio, the
    attacks, and the server's state at the end."""
    result = {name: merge(runs) for name, runs in phases.items()}
    alone, under = result["alone"]["latency_ms"], result["attacked"]["latency_ms"]
    ratio = {q: under[q] / alone[q] for q in ("p50", "p99")}
    return {
        "backbone": args.backbone, "input_size": args.input_size, "clients": args.clients,
        "requests_per_phase": args.requests, "rounds": args.rounds,
        "request": "one 28x28 grayscale PNG, random pixels, multipart field 'files'",
        "attacks": {"slowloris_connections": args.slowloris, "strip_threads": args.strips,
                    "big_threads": args.big, "big_images_per_request": args.big_per_request,
                    "big_image": "6300x6300 1-bit PNG (39.7 MP)",
                    "strips": "4x1000000 and 40000000x1 PNGs"},
        "server_options": args.server_option, "address": HOST,
        "load_average_1min": load, "ratio": ratio, "target_p99_ratio": TARGET,
        "target_met": ratio["p99"] <= TARGET, "server_alive": alive,
        "server_peak_rss_mib": peak_rss, "server_log_tracebacks": log.count("Traceback"),
        "phases": result, "attacks_got": merge_attacks(attacks),
    }


def _ms(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.0f}"


def markdown(f: dict[str, Any], args: argparse.Namespace) -> list[str]:
    from _common import command_line, environment

    env = environment()
    load = f["load_average_1min"]
    return [
        f"# Serving under attack: a normal request alone and under slowloris + thin strips "
        f"+ 40 MP images, {args.backbone} at {args.input_size} px, {env['device']}",
        "",
        f"Command: `{command_line()}`  ",
        f"{env['machine']}, {os.cpu_count()} cores, torch {env['torch']}; `inca serve` with "
        f"its default limits{' and ' + ' '.join(args.server_option) if args.server_option else ''}"
        f"; {args.clients} client(s) sending one 28x28 PNG a request, {args.requests} "
        f"requests a phase in {args.rounds} alternations; attacks at once: "
        f"{args.slowloris} slowloris connections, {args.strips} threads posting thin strips, "
        f"{args.big} posting {args.big_per_request} x 6300x6300 1-bit PNG(s). The machine's "
        f"cores were shared with other work (1-min load average {min(load):.1f} to "
        f"{max(load):.1f}). Server, client and attack process share the machine's cores "
        f"(CPU seconds per second of each phase below).",
        "",
        "| phase | requests | 200 | other answers | wrong answers | p50 ms | p90 ms | p99 ms "
        "| max ms | server CPU s/s | client CPU s/s | attack process CPU s/s |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        *_phase_rows(f["phases"]),
        "",
        f"- p99 under attack / alone: **{f['ratio']['p99']:.2f}** (target at most "
        f"{TARGET:g}: {'met' if f['target_met'] else 'not met'}); p50: "
        f"{f['ratio']['p50']:.2f}.",
        f"- server alive at the end: {f['server_alive']}; tracebacks in its log: "
        f"{f['server_log_tracebacks']}; peak RSS {_ms(f['server_peak_rss_mib'])} MiB.",
        "",
        "Attacks during the attacked phases (a slow connection's time runs from its "
        "opening to the server's answer; those still open when a phase ended are counted "
        "apart):",
        "",
        "| attack | requests or connections ended | answers | p50 ms | max ms | still open "
        "at the end | the oldest of those, s |",
        "|---|---:|---|---:|---:|---:|---:|",
        *[f"| {kind} | {a['count']} | {a['status'] or '-'} | {_ms(a['latency_ms']['p50'])} | "
          f"{_ms(a['latency_ms']['max'])} | {a['open_at_end']} | "
          f"{a['oldest_open_s']:.1f} |" for kind, a in f["attacks_got"].items()],
    ]


def _phase_rows(phases: dict[str, Any]) -> list[str]:
    """A table row per phase: answers, latency percentiles, the CPU of server, client and
    attack process."""
    rows = []
    for name, label in (("alone", "alone"), ("attacked", "under attack")):
        p = phases[name]
        lat = p["latency_ms"]
        other = {k: v for k, v in p["status"].items() if k != "200"} or "none"
        rows.append(f"| {label} | {p['requests']} | {p['ok']} | {other} | "
                    f"{p['wrong_answers']} | {_ms(lat['p50'])} | {_ms(lat['p90'])} | "
                    f"{_ms(lat['p99'])} | {_ms(lat['max'])} | "
                    f"{p['server_cpu_s'] / p['wall_s']:.2f} | "
                    f"{p['client_cpu_s'] / p['wall_s']:.2f} | "
                    f"{p['attacker_cpu_s'] / p['wall_s']:.2f} |")
    return rows


if __name__ == "__main__":
    main()
