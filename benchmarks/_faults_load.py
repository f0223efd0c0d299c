"""Part 3 of the faults benchmark: ``inca serve`` answering one-image requests alone and
while another process posts decompression bombs, in alternating rounds; every answer
checked against ``Task.predict_proba``."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from _common import cpu_seconds, pct
from _faults_bench import HOST, KEY, Bench, wait_line
from _faults_cases import digit_images
from _faults_http import answer_problem
from PIL import Image
from tiny import multipart, png

from inca.task import Task

# Posts decompression bombs from several threads until told "stop" (part 3): a process of
# its own, as an attacker is, so its threads hold no lock the measured clients need.
BOMBER = '''
import json, sys, threading, time
import httpx
cfg = json.loads(sys.argv[1])
body = open(cfg["body"], "rb").read()
stop, lock = threading.Event(), threading.Lock()
stats = {"sent": 0, "status": {}, "latency": []}

def bomb():
    headers = {"X-API-Key": cfg["key"], "Content-Type": cfg["ctype"]}
    with httpx.Client(timeout=cfg["timeout"], headers=headers) as c:
        while not stop.is_set():
            t = time.perf_counter()
            try:
                status = str(c.post(cfg["url"], content=body).status_code)
            except Exception as e:
                status = type(e).__name__
            with lock:
                stats["sent"] += 1
                stats["status"][status] = stats["status"].get(status, 0) + 1
                stats["latency"].append(time.perf_counter() - t)

threads = [threading.Thread(target=bomb, daemon=True) for _ in range(cfg["threads"])]
for th in threads:
    th.start()
while stats["sent"] < cfg["threads"]:
    time.sleep(0.01)
print("ready", flush=True)
sys.stdin.readline()
stop.set()
for th in threads:
    th.join(timeout=cfg["timeout"] + 5)
print(json.dumps(stats), flush=True)
'''


@dataclass
class Tally:
    """The requests a phase has left to send, and what their answers were."""

    todo: Iterator[int]
    lock: threading.Lock = field(default_factory=threading.Lock)
    lat: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)

    def take(self) -> int | None:
        with self.lock:
            return next(self.todo, None)


def client(tally: Tally, url: str, images: list[bytes], expected: torch.Tensor,
           classes: list[str], timeout: float) -> None:
    """One client thread: one-image requests until none is left, each answer checked."""
    import httpx

    with httpx.Client(timeout=timeout, headers={"X-API-Key": KEY}) as c:
        while (i := tally.take()) is not None:
            k = i % len(images)
            t = time.perf_counter()
            try:
                r = c.post(url, files=[("files", (f"{k}.png", images[k], "image/png"))],
                           data={"top_k": "3"})
                dt = time.perf_counter() - t
                problem = None if r.status_code == 200 else \
                    f"HTTP {r.status_code}: {r.text[:200]}"
                answer = None if problem else answer_problem(r.json()["predictions"][0],
                                                             expected[k], classes)
            except Exception as e:  # noqa: BLE001 - counted as an error
                dt, problem, answer = time.perf_counter() - t, f"{type(e).__name__}: {e}", None
            with tally.lock:
                if problem:
                    tally.errors.append(problem)
                else:
                    tally.lat.append(dt)
                    if answer:
                        tally.wrong.append(f"image {k}: {answer}")


def load_phase(b: Bench, port: int, images: list[bytes], expected: torch.Tensor,
               classes: list[str], *, requests: int, clients: int, bomb_clients: int,
               bomb_file: Path, bomb_ctype: str, timeout: float) -> dict[str, Any]:
    """``requests`` one-image POSTs from ``clients`` threads (with ``bomb_clients`` threads
    of another process posting bombs meanwhile); latency of each, errors, wrong answers."""
    url = f"http://{HOST}:{port}/predict"
    tally = Tally(iter(range(requests)))
    bomber = None
    if bomb_clients:  # the bombs are flowing before the measured requests start
        cfg = {"body": str(bomb_file), "ctype": bomb_ctype, "url": url, "key": KEY,
               "threads": bomb_clients, "timeout": timeout}
        bomber = b.spawn([sys.executable, "-c", BOMBER, json.dumps(cfg)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, env=b.env())
    try:
        if bomber is not None and wait_line(bomber, b"ready", 60) is None:
            raise RuntimeError("the bomber did not start")
        threads = [threading.Thread(target=client, daemon=True,
                                    args=(tally, url, images, expected, classes, timeout))
                   for _ in range(clients)]
        t0 = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=requests * timeout)
        wall = time.perf_counter() - t0
        stats: dict[str, Any] = {"sent": 0, "status": {}, "latency": []}
        if bomber is not None:
            out, _ = bomber.communicate(b"stop\n", timeout=timeout + 30)
            stats = json.loads(out.decode().strip().splitlines()[-1])
    finally:
        if bomber is not None:
            b.end(bomber)
    lat, errors, wrong = tally.lat, tally.errors, tally.wrong
    return {"requests": requests, "ok": len(lat), "errors": len(errors),
            "wrong_answers": len(wrong), "error_examples": errors[:3],
            "wrong_examples": wrong[:3], "wall_s": wall, "latencies_s": lat,
            "bomb_requests": stats["sent"], "bomb_status": stats["status"],
            "bomb_latencies_s": stats["latency"]}


def run_load(b: Bench, server: Any, task: Task, args: argparse.Namespace) -> dict[str, Any]:
    imgs = digit_images(64, scale=1)  # 8x8 grey, as small as requests get
    images = [png(im) for im in imgs]
    expected = task.predict_proba(images)
    bomb = png(Image.new("1", (12000, 12000)))
    body, ctype = multipart([(f"bomb{i}.png", bomb) for i in range(args.bombs_per_request)])
    bomb_file = b.tmp / "bombs.multipart"
    bomb_file.write_bytes(body)
    common = dict(b=b, port=server.port, images=images, expected=expected,
                  classes=task.classes, clients=args.clients, bomb_file=bomb_file,
                  bomb_ctype=ctype, timeout=60.0)
    load_phase(requests=16, bomb_clients=0, **common)  # warm-up
    rss_before = server.peak_rss_mib()
    rounds: dict[str, list[dict[str, Any]]] = {"alone": [], "bombs": []}
    per_round = max(1, args.requests // args.rounds)
    for r in range(args.rounds):
        for phase in ("alone", "bombs"):
            cpu = cpu_seconds(server.proc.pid)
            res = load_phase(requests=per_round, bomb_clients=args.bomb_clients if
                             phase == "bombs" else 0, **common)
            res["server_cpu_s"] = cpu_seconds(server.proc.pid) - cpu
            rounds[phase].append(res)
            print(f"  round {r + 1} {phase}: p99 {pct(res['latencies_s'], 99) or 0:.0f} ms, "
                  f"{res['errors']} errors, {res['wrong_answers']} wrong, "
                  f"{res['bomb_requests']} bomb requests", flush=True)
    phases = {}
    for phase, runs in rounds.items():
        lat = [x for r in runs for x in r["latencies_s"]]
        blat = [x for r in runs for x in r["bomb_latencies_s"]]
        status: dict[str, int] = {}
        for r in runs:
            for k, v in r["bomb_status"].items():
                status[k] = status.get(k, 0) + v
        phases[phase] = {
            "requests": sum(r["requests"] for r in runs), "ok": len(lat),
            "errors": sum(r["errors"] for r in runs),
            "wrong_answers": sum(r["wrong_answers"] for r in runs),
            "error_examples": [e for r in runs for e in r["error_examples"]][:3],
            "wrong_examples": [e for r in runs for e in r["wrong_examples"]][:3],
            "latency_ms": {q: pct(lat, float(q[1:])) for q in ("p50", "p90", "p99")}
            | {"max": max(lat) * 1000 if lat else None},
            "requests_per_s": len(lat) / sum(r["wall_s"] for r in runs),
            "bomb_requests": sum(r["bomb_requests"] for r in runs), "bomb_status": status,
            "bomb_latency_ms": {"p50": pct(blat, 50), "p99": pct(blat, 99)},
            "server_cpu_s": sum(r["server_cpu_s"] for r in runs),
            "wall_s": sum(r["wall_s"] for r in runs),
        }
    return {"phases": phases, "server_peak_rss_mib_before": rss_before,
            "server_peak_rss_mib_after": server.peak_rss_mib(),
            "bomb": f"{args.bombs_per_request} x 12000x12000 1-bit PNG ({len(bomb)} bytes "
                    "each) per request"}
