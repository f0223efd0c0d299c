"""Loopback load test of `inca serve`: latency percentiles and throughput, batching on and off.

Usage: python benchmarks/serve.py [--backbone dinov2_vits14] [--input-size 112]
           [--requests 96] [--clients 8] [--images-per-request 1] [--max-batch 32]
           [--max-wait-ms 5] [--time-limit 240]

Two small task folders (untrained InCA heads on the bundled backbone: serving cost does not
depend on their weights) are written to a temporary folder. Then, once with batching and
once with ``--no-batching``, ``inca serve`` is started as a subprocess on 127.0.0.1 (a free
port), and a fixed number of requests, each one 28x28 PNG (Fashion-MNIST-like, random
pixels) posted as multipart ``files``, is sent by several concurrent clients (threads with
``httpx.Client``). Bounded in count and time; the server is always terminated. The client
threads run on the same machine as the server, so they share its CPUs.

Results: benchmarks/results/serve.{json,md}.
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from _common import command_line, environment, make_backbone, pct, write_results
from PIL import Image

from inca.adapters import create_adapter
from inca.data.datasets import FASHION_MNIST_CLASSES
from inca.task import Task

HOST = "127.0.0.1"  # loopback only


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def make_tasks(folder: Path, backbone: str, input_size: int) -> list[Path]:
    """Two task folders with untrained heads on different layers of the backbone."""
    bb = make_backbone(backbone, input_size=input_size, device=torch.device("cpu"))
    info = bb.describe()
    blocks = [ly for ly in bb.layers if ly.startswith("blocks.")] or list(bb.layers)
    torch.manual_seed(0)
    paths = []
    for name, layer in (("fmnist_a", blocks[-1]), ("fmnist_b", blocks[2 * len(blocks) // 3])):
        head = create_adapter("inca", embed_dim=bb.embed_dims[layer],
                              num_classes=len(FASHION_MNIST_CLASSES))
        task = Task([head], [[layer]], FASHION_MNIST_CLASSES, info, keys=[f"inca/{layer}"])
        paths.append(task.save(folder / name))
    return paths


def png_images(n: int, seed: int = 0) -> list[bytes]:
    """``n`` distinct 28x28 grayscale PNGs of random pixels."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), "L").save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def inca_command() -> list[str]:
    script = Path(sys.executable).parent / "inca"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from inca.cli import main; sys.exit(main())"]


class Server:
    """``inca serve`` in a subprocess; a context manager that always terminates it."""

    def __init__(self, tasks: list[Path], options: list[str], log: Path,
                 startup_timeout: float) -> None:
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.cmd = [*inca_command(), "serve", *[a for t in tasks for a in ("--task", str(t))],
                    "--host", HOST, "--port", str(self.port), *options]
        self.log = log
        self.startup_timeout = startup_timeout
        # every path but /livez needs the key where the server has one
        key = options[options.index("--api-key") + 1] if "--api-key" in options else None
        self.headers = {"X-API-Key": key} if key else {}

    def __enter__(self) -> Server:
        env = {k: v for k, v in os.environ.items() if k != "INCA_API_KEY"}
        self._log = open(self.log, "wb")  # noqa: SIM115 - closed in __exit__
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=env)
        try:
            self._wait_healthy()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        with httpx.Client(timeout=5, headers=self.headers) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited with {self.proc.returncode}:\n"
                                       + self.log_tail())
                try:
                    if client.get(f"{self.url}/health").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.25)
        raise RuntimeError(f"server not healthy after {self.startup_timeout} s:\n"
                           + self.log_tail())

    def health(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/health", headers=self.headers, timeout=10).json()

    def peak_rss_mib(self) -> float | None:
        """The server process's peak resident memory (Linux ``VmHWM``)."""
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return None

    def log_tail(self, chars: int = 3000) -> str:
        self._log.flush()
        return self.log.read_text(errors="replace")[-chars:]

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        self._log.close()


def load(url: str, images: list[bytes], *, requests: int, clients: int, per_request: int,
         top_k: int, timeout: float, time_limit: float) -> dict[str, Any]:
    """Send ``requests`` POST /predict from ``clients`` threads; latency of each."""
    lock = threading.Lock()
    next_index = iter(range(requests))
    latencies: list[float] = []
    errors: list[str] = []
    deadline = time.monotonic() + time_limit

    def take() -> int | None:
        with lock:
            if time.monotonic() > deadline:
                return None
            return next(next_index, None)

    def client_loop() -> None:
        with httpx.Client(timeout=timeout) as client:
            while (i := take()) is not None:
                files = [("files", (f"img{i}_{j}.png", images[(i * per_request + j) % len(images)],
                                    "image/png")) for j in range(per_request)]
                t = time.perf_counter()
                try:
                    r = client.post(f"{url}/predict", files=files, data={"top_k": str(top_k)})
                    ok = r.status_code == 200 and len(r.json()["predictions"]) == per_request
                    problem = None if ok else f"HTTP {r.status_code}: {r.text[:200]}"
                except httpx.HTTPError as e:
                    problem = f"{type(e).__name__}: {e}"
                dt = time.perf_counter() - t
                with lock:
                    if problem is None:
                        latencies.append(dt)
                    else:
                        errors.append(problem)

    threads = [threading.Thread(target=client_loop, daemon=True) for _ in range(clients)]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=max(1.0, deadline - time.monotonic() + timeout + 5))
    wall = time.perf_counter() - t0
    lat = sorted(latencies)

    return {
        "requests_sent": len(lat) + len(errors), "ok": len(lat), "errors": len(errors),
        "error_examples": errors[:3], "wall_s": wall,
        "requests_per_s": len(lat) / wall if wall > 0 else 0.0,
        "images_per_s": len(lat) * per_request / wall if wall > 0 else 0.0,
        "latency_ms": {"p50": pct(lat, 50), "p90": pct(lat, 90), "p99": pct(lat, 99),
                       "mean": statistics.fmean(lat) * 1000 if lat else None,
                       "max": lat[-1] * 1000 if lat else None},
        "hit_time_limit": time.monotonic() > deadline,
    }


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="dinov2_vits14",
                    help="a backbone `inca serve` can re-create offline from its name")
    ap.add_argument("--input-size", type=int, default=112)
    ap.add_argument("--requests", type=int, default=96)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--images-per-request", type=int, default=1)
    ap.add_argument("--top-k", type=int, default=3)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--warmup", type=int, default=8, help="requests before measuring")
    ap.add_argument("--timeout", type=float, default=60.0, help="per request, seconds")
    ap.add_argument("--time-limit", type=float, default=240.0,
                    help="stop sending new requests after this many seconds per run")
    ap.add_argument("--startup-timeout", type=float, default=180.0)
    return ap


def main() -> None:
    args = parser().parse_args()
    images = png_images(32)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tasks = make_tasks(tmp / "tasks", args.backbone, args.input_size)
        for batching in (True, False):
            runs.append(serve_and_load(tasks, images, args, batching, tmp))
    payload = summarize(tasks, runs, args)
    md = to_markdown(payload, args)
    path = write_results("serve", payload, "\n".join(md))
    print("\n".join(md))
    print(f"wrote {path}")


def serve_and_load(tasks: list[Path], images: list[bytes], args: argparse.Namespace,
                   batching: bool, tmp: Path) -> dict[str, Any]:
    """One server (batching on or off): warm-up requests, then the measured load."""
    options = ["--max-batch", str(args.max_batch), "--max-wait-ms",
               str(args.max_wait_ms), "--batching" if batching else "--no-batching"]
    label = "on" if batching else "off"
    print(f"batching {label}: starting the server", flush=True)
    with Server(tasks, options, tmp / f"server-{label}.log",
                args.startup_timeout) as server:
        common = dict(per_request=args.images_per_request, top_k=args.top_k,
                      timeout=args.timeout, time_limit=args.time_limit)
        warm = load(server.url, images, requests=args.warmup,
                    clients=min(args.clients, args.warmup), **common)
        before = server.health()["batches_run"]
        result = load(server.url, images, requests=args.requests,
                      clients=args.clients, **common)
        passes = server.health()["batches_run"] - before
        peak_rss = server.peak_rss_mib()
    result.update({
        "batching": batching, "server_options": options,
        "warmup_errors": warm["errors"], "backbone_passes": passes,
        "server_peak_rss_mib": peak_rss,
        "mean_images_per_pass": (result["ok"] * args.images_per_request / passes
                                 if passes else None),
    })
    lat = result["latency_ms"]
    print(f"batching {label}: {result['requests_per_s']:.1f} req/s, p50 "
          f"{lat['p50']:.0f} ms, p99 {lat['p99']:.0f} ms, {result['errors']} errors",
          flush=True)
    return result


def summarize(tasks: list[Path], runs: list[dict[str, Any]], args: argparse.Namespace
              ) -> dict[str, Any]:
    """serve.json's payload: the two runs and batching's speed-up."""
    on, off = runs
    speedup = on["requests_per_s"] / off["requests_per_s"] if off["requests_per_s"] else None
    return {
        "benchmark": "serve", "command": command_line(), "environment": environment(),
        "backbone": args.backbone, "input_size": args.input_size,
        "tasks": [p.name for p in tasks], "requests": args.requests, "clients": args.clients,
        "images_per_request": args.images_per_request, "top_k": args.top_k,
        "image": "28x28 grayscale PNG, random pixels, multipart field 'files'",
        "address": HOST, "batching_speedup_requests_per_s": speedup, "runs": runs,
    }


def _ms(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.0f}"


def to_markdown(payload: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """serve.md's lines (``args``: the warm-up and the server's batching options)."""
    env, runs = payload["environment"], payload["runs"]
    speedup = payload["batching_speedup_requests_per_s"]
    return [
        f"# Serving: `inca serve` on loopback, {args.backbone} at {args.input_size} px, "
        f"{env['device']}",
        "",
        f"Command: `{payload['command']}`  ",
        f"torch {env['torch']}, {env['cpu_threads']} threads; 2 tasks (untrained InCA heads) "
        f"on one backbone pass; {args.requests} requests of {args.images_per_request} 28x28 "
        f"PNG from {args.clients} concurrent clients (threads on the same machine), after "
        f"{args.warmup} warm-up requests; max batch {args.max_batch}, max wait "
        f"{args.max_wait_ms:g} ms.",
        "",
        "| batching | requests/s | images/s | p50 ms | p90 ms | p99 ms | max ms | backbone "
        "passes | images/pass | errors | server peak RSS MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *[f"| {'on' if r['batching'] else 'off'} | {r['requests_per_s']:.1f} | "
          f"{r['images_per_s']:.1f} | {_ms(r['latency_ms']['p50'])} | "
          f"{_ms(r['latency_ms']['p90'])} | {_ms(r['latency_ms']['p99'])} | "
          f"{_ms(r['latency_ms']['max'])} | {r['backbone_passes']} | "
          f"{(r['mean_images_per_pass'] or 0):.1f} | {r['errors']} | "
          f"{_ms(r['server_peak_rss_mib'])} |" for r in runs],
        "",
        f"- batching on / off, requests/s: **{speedup:.2f}**" if speedup else
        "- batching on / off: n/a",
        "",
    ]


if __name__ == "__main__":
    main()
