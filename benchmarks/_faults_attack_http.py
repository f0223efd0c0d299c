"""The outside attack's HTTP cases (issue 20; its report's H1, M2, L4, L9) as bad inputs of
``benchmarks/faults.py``; its library and CLI cases are in ``_faults_attack.py``.

``http_rows`` starts an ``inca serve`` of its own with the default request limits (a 10 MB
body, 40 MP an image: the 2 MiB limit of faults.py's server would refuse the 9.5 MiB task
list before it is parsed) and runs the HTTP cases against it.
"""

from __future__ import annotations

import base64
import json
import re
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _faults_bench import HOST, KEY, Bench, short
from _faults_cases import HANDLED, REFUSED, SILENT, UNCLEAR, Case, Inputs, Verdict, run_cases
from _faults_http import answer_problem, http_verdict, predicted, raw_exchange, request
from PIL import Image
from tiny import multipart, png

URL = f"http://{HOST}:<port>"  # as the reproductions name the server
WITH_KEY = {"X-API-Key": KEY}


def http_cases(b: Bench, port: int, x: Inputs, task: Any) -> list[Case]:
    seven, b64 = x.good[7], base64.b64encode(x.good[7]).decode()
    body, ctype = multipart([("x.png", seven)])

    def two_keys(first: str, second: str) -> tuple[int, bytes]:
        return raw_exchange(
            port, f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\nX-API-Key: "
            f"{first}\r\nX-API-Key: {second}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n".encode() + body)

    return [
        Case("http-strip-4x1000000", "http", "H1: a 4 x 1,000,000 px PNG (4 MP, 4 KB)",
             "correct result", _strip(port, task, (4, 1_000_000), 40), f"POST {URL}/predict"),
        Case("http-strip-40000000x1", "http", "H1: a 40,000,000 x 1 px PNG (40 MP, 38 KB; a "
             "500 before the fix)", "correct result", _strip(port, task, (40_000_000, 1), 220),
             f"POST {URL}/predict"),
        Case("http-task-names-2M", "http", "M2: a 9.5 MiB JSON body naming 2,000,000 tasks, "
             "/livez asked meanwhile", "clear error", lambda: _task_list(port, b64),
             f"POST {URL}/predict"),
        Case("http-content-type-upper", "http", "L9: Content-Type APPLICATION/JSON",
             "correct result", lambda: _upper_json(port, task, seven, b64),
             f"POST {URL}/predict"),
        _case("http-content-type-jsonx", "L9: Content-Type application/jsonx", 415,
              lambda: request(port, "POST", "/predict", json.dumps({"images": [b64]}).encode(),
                              {"Content-Type": "application/jsonx"} | WITH_KEY)),
        _case("http-two-keys-right-wrong", "L9: X-API-Key sent twice, the right key first", 401,
              lambda: two_keys(KEY, KEY + "x"), ("API key",)),
        _case("http-two-keys-wrong-right", "L9: X-API-Key sent twice, the right key second",
              401, lambda: two_keys(KEY + "x", KEY), ("API key",)),
        _case("http-two-keys-same", "L9: X-API-Key sent twice, the right key both times", 401,
              lambda: two_keys(KEY, KEY), ("API key",)),
        *[_case(f"http-{p.strip('/').replace('/', '-')}-no-key", f"L4: GET {p} without the "
                "key (the server has one)", 401, lambda p=p: request(port, "GET", p),
                ("API key",), f"GET {URL}{p}")
          for p in ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect", "/health")],
        Case("http-docs-offline", "http", "L4: GET /docs with the key: no script from a CDN, "
             "each script it names answers", "correct result", lambda: _docs(port),
             f"GET {URL}/docs"),
    ]


def _case(cid: str, what: str, expect: int, send: Callable[[], tuple[int, bytes]],
          mention: tuple[str, ...] = (), how: str = "") -> Case:
    return Case(cid, "http", what, "clear error",
                lambda: http_verdict(*send(), expect, mention), how or f"POST {URL}/predict")


def _answered(task: Any, status: int, body: bytes, want: Any, seconds: float,
              bound: float) -> Verdict:
    """200 with ``want``'s probabilities, or a clear 4xx; never a 5xx; within ``bound``."""
    if status == 200:
        problem = answer_problem(predicted(body)[0], want, task.classes)
        v = Verdict(SILENT, problem) if problem else Verdict(HANDLED, "HTTP 200, "
                                                             "answered right")
    else:
        v = http_verdict(status, body, 413)
    v.detail += f" in {seconds:.1f} s"
    if v.outcome == HANDLED and seconds > bound:
        return Verdict(UNCLEAR, f"over {bound:.0f} s: " + v.detail)
    return v


def _strip(port: int, task: Any, size: tuple[int, int], value: int) -> Callable[[], Verdict]:
    """H1: a thin strip of ``size`` px, answered right (or refused clearly) within 20 s."""
    def go() -> Verdict:
        data = png(Image.new("L", size, value))
        body, ctype = multipart([("strip.png", data)])
        t = time.perf_counter()
        status, answer = request(port, "POST", "/predict", body,
                                 {"Content-Type": ctype} | WITH_KEY, timeout=120)
        seconds = time.perf_counter() - t
        want = task.predict_proba([data])[0] if status == 200 else None
        return _answered(task, status, answer, want, seconds, 20)
    return go


def _task_list(port: int, b64: str) -> Verdict:
    """M2: 2,000,000 task names refused clearly, /livez answering meanwhile."""
    body = json.dumps({"images": [b64], "tasks": ["x"] * 2_000_000}).encode()
    gaps, stop = [], threading.Event()

    def probe() -> None:
        while not stop.is_set():
            t = time.perf_counter()
            try:
                request(port, "GET", "/livez", timeout=30)
            except OSError:
                pass
            gaps.append(time.perf_counter() - t)
            time.sleep(0.05)
    th = threading.Thread(target=probe, daemon=True)
    th.start()
    try:
        time.sleep(0.3)
        t = time.perf_counter()
        status, answer = request(port, "POST", "/predict", body,
                                 {"Content-Type": "application/json"} | WITH_KEY, timeout=120)
        seconds = time.perf_counter() - t
    finally:
        stop.set()
        th.join(timeout=35)
    v = http_verdict(status, answer, 404)
    v.detail += (f" ({len(body) / 2**20:.1f} MiB answered in {seconds:.1f} s; /livez "
                 f"asked {len(gaps)} times meanwhile, slowest {max(gaps) * 1000:.0f} ms)")
    if v.outcome == HANDLED and max(gaps) > 2:
        return Verdict(UNCLEAR, "/livez stalled: " + v.detail)
    return v


def _upper_json(port: int, task: Any, seven: bytes, b64: str) -> Verdict:
    """L9: a media type in capitals is still JSON."""
    status, answer = request(port, "POST", "/predict", json.dumps({"images": [b64]}).encode(),
                             {"Content-Type": "APPLICATION/JSON"} | WITH_KEY)
    return _answered(task, status, answer, task.predict_proba([seven])[0], 0, 60) \
        if status == 200 else Verdict(REFUSED, f"HTTP {status}: {short(answer.decode())}")


def _docs(port: int) -> Verdict:
    """L4: /docs served whole by inca itself (no script from elsewhere)."""
    status, page = request(port, "GET", "/docs", headers=WITH_KEY)
    if status != 200:
        return Verdict(REFUSED, f"HTTP {status} with the key")
    text = page.decode(errors="replace")
    scripts = re.findall(r'<script[^>]*src="([^"]+)"', text)
    outside = [s for s in scripts if "://" in s or s.startswith("//")]
    if outside or "cdn" in text.lower():
        return Verdict(SILENT, f"the page loads scripts from elsewhere: {outside}")
    fetched = [request(port, "GET", s, headers=WITH_KEY)[0] for s in scripts]
    if not scripts or any(s != 200 for s in fetched):
        return Verdict(SILENT, f"its scripts {scripts} answer {fetched}")
    return Verdict(HANDLED, f"{len(scripts)} script(s) served by inca itself, each HTTP 200")


def http_rows(b: Bench, x: Inputs, task_dir: Path, task: Any) -> list[dict[str, Any]]:
    """The HTTP cases against an ``inca serve`` with the default request limits."""
    from serve import Server

    with Server([task_dir], ["--api-key", KEY, "--device", "cpu"], b.tmp / "server-attack.log",
                180) as server:
        try:
            return run_cases(http_cases(b, server.port, x, task), 1, b.scrub)
        finally:
            if server.proc.poll() is not None:
                print(b.scrub(server.log_tail(1500)), file=sys.stderr)
