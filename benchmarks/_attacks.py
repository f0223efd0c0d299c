"""Attacks on a running ``inca serve`` over loopback, in a process of their own.

Usage: python benchmarks/_attacks.py CONFIG_JSON

Used by ``benchmarks/serve_load.py`` (the latency figure) and by
``tests/test_serving_load.py`` (the load test), which start it while their own clients send
valid requests. The config names the server (``port``, ``key``) and how many of each attack
run at once (0: none):

- ``slowloris``: connections whose headers never end, half sent byte by byte (one byte
  every ``trickle_s``), half stalled after the first two lines. Each is reopened as soon
  as the server closes it, so the count stays up.
- ``slow_bodies``: complete headers, then a body of 100,000 bytes trickled a byte every
  ``trickle_s``; reopened when closed.
- ``strips``: threads posting thin strips, 4 x 1,000,000 px and 40,000,000 x 1 px PNGs (a
  few KB each; H1 of the attack report) on alternate threads, one image a request
  (reported as ``strip-4x1000000`` and ``strip-40000000x1``).
- ``big``: threads posting ``big_per_request`` 6300 x 6300 1-bit PNGs (39.7 MP, 5 KB each,
  just under the 40 MP limit; M3) a request.
- ``tasklist``: threads posting a JSON body of one image and ``task_names`` unknown task
  names (9.5 MiB for 2,000,000; M2).
- ``livez``: one thread asking ``GET /livez`` every 0.1 s (does the event loop answer?).

Every thread sends its next request as soon as the last one is answered. The process prints
``ready`` once every attack has started, runs until a line (or EOF) on stdin, and prints one
JSON line: per attack, the answers by status, their latencies, the 503s that came without
Retry-After, the distinct first predictions of its 200s, and for the slow connections the
ages of those still open at the end.
"""

from __future__ import annotations

import http.client
import io
import json
import select
import socket
import sys
import threading
import time
from typing import Any

from PIL import Image

HOST = "127.0.0.1"
SLOW_HEAD = b"POST /predict HTTP/1.1\r\nHost: x\r\n"


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG", optimize=True)
    return buf.getvalue()


def multipart(files: list[tuple[str, bytes]], **fields: str) -> tuple[bytes, str]:
    """A multipart/form-data body of ``files`` (field ``files``) and text ``fields``, and
    its content type."""
    b = "inca-attack-boundary"
    parts = [f'--{b}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    parts += [f'--{b}\r\nContent-Disposition: form-data; name="files"; filename="{name}"'
              '\r\nContent-Type: image/png\r\n\r\n'.encode() + data + b"\r\n"
              for name, data in files]
    return b"".join(parts) + f"--{b}--\r\n".encode(), f"multipart/form-data; boundary={b}"


def strip_images() -> dict[str, Image.Image]:
    return {"strip-4x1000000": Image.new("L", (4, 1_000_000), 40),
            "strip-40000000x1": Image.new("L", (40_000_000, 1), 220)}


def big_image() -> Image.Image:
    return Image.new("1", (6300, 6300), 0)


class Record:
    """What one attack got: statuses, latencies, answers (thread-safe)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.status: dict[str, int] = {}
        self.latencies: list[float] = []
        self.no_retry_after = 0
        self.answers: list[Any] = []
        self.open_at_end: list[float] = []

    def add(self, status: str, seconds: float, retry_after: bool = True,
            answer: Any = None) -> None:
        with self.lock:
            self.status[status] = self.status.get(status, 0) + 1
            self.latencies.append(seconds)
            self.no_retry_after += status == "503" and not retry_after
            if answer is not None and answer not in self.answers and len(self.answers) < 5:
                self.answers.append(answer)

    def summary(self) -> dict[str, Any]:
        return {"count": len(self.latencies), "status": self.status,
                "latencies_s": self.latencies, "max_s": max(self.latencies, default=0.0),
                "no_retry_after": self.no_retry_after, "answers": self.answers,
                "open_at_end_s": self.open_at_end}


def poster(port: int, key: str, body: bytes, ctype: str, rec: Record, stop: threading.Event,
           timeout: float) -> None:
    """POST ``body`` to /predict again and again until ``stop``."""
    while not stop.is_set():
        conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
        t = time.perf_counter()
        try:
            conn.request("POST", "/predict", body=body,
                         headers={"Content-Type": ctype, "X-API-Key": key})
            r = conn.getresponse()
            data = r.read()
            status = str(r.status)
            answer = (json.loads(data)["predictions"][0]["tasks"] if r.status == 200 else None)
            rec.add(status, time.perf_counter() - t, r.getheader("retry-after") is not None,
                    answer)
        except Exception as e:  # noqa: BLE001 - a reset or timeout is an outcome to report
            rec.add(type(e).__name__, time.perf_counter() - t)
            stop.wait(0.1)
        finally:
            conn.close()


def prober(port: int, rec: Record, stop: threading.Event) -> None:
    while not stop.wait(0.1):
        conn = http.client.HTTPConnection(HOST, port, timeout=30)
        t = time.perf_counter()
        try:
            conn.request("GET", "/livez")
            r = conn.getresponse()
            r.read()
            rec.add(str(r.status), time.perf_counter() - t)
        except Exception as e:  # noqa: BLE001
            rec.add(type(e).__name__, time.perf_counter() - t)
        finally:
            conn.close()


def slow_connections(port: int, n: int, head: bytes, stalled: int, rec: Record,
                     stop: threading.Event, trickle_s: float) -> None:
    """Keep ``n`` connections open that send ``head`` and then one byte every ``trickle_s``
    (the first ``stalled`` send nothing more); record how and when the server ends each
    (its status line, or ``closed`` without one), timed from the end of ``head``."""
    feed = b"X-a: b\r\n" if head.endswith(b"\r\n") and b"\r\n\r\n" not in head else b" "
    conns: dict[socket.socket, tuple[float, bool, int]] = {}  # sock: (since, trickles, sent)

    def open_one(trickles: bool) -> None:
        try:
            s = socket.create_connection((HOST, port), timeout=10)
            s.sendall(head)
            conns[s] = (time.monotonic(), trickles, 0)
        except OSError as e:
            rec.add(type(e).__name__, 0.0)
            stop.wait(0.1)

    for i in range(n):
        open_one(i >= stalled)
    while not stop.is_set():
        readable = select.select(list(conns), [], [], trickle_s)[0] if conns else []
        for s in readable:
            since, trickles = conns.pop(s)[:2]
            try:
                s.settimeout(2)
                got = s.recv(4096)
            except OSError:
                got = b""
            s.close()
            rec.add(got.split(b" ", 2)[1].decode() if got.startswith(b"HTTP/1.1 ")
                    else "closed", time.monotonic() - since)
            if not stop.is_set():
                open_one(trickles)
        for s, (since, trickles, sent) in list(conns.items()):
            if trickles:
                try:
                    s.send(feed[sent % len(feed):sent % len(feed) + 1])
                    conns[s] = (since, trickles, sent + 1)
                except OSError:
                    pass  # closed by the server: select reports it next
    now = time.monotonic()
    rec.open_at_end = [now - since for since, _, _ in conns.values()]
    for s in conns:
        s.close()


def start(cfg: dict[str, Any], stop: threading.Event) -> tuple[dict[str, Record],
                                                               list[threading.Thread]]:
    """Every attack of ``cfg`` on a thread of its own; ``(records by attack, threads)``."""
    port, key, timeout = cfg["port"], cfg["key"], cfg.get("timeout", 120.0)
    trickle = cfg.get("trickle_s", 0.2)
    records = {k: Record() for k in ("slowloris", "slow_bodies", *strip_images(), "big",
                                     "tasklist", "livez")}
    threads = []

    def run(fn, *args) -> None:
        threads.append(threading.Thread(target=fn, args=args, daemon=True))

    if cfg.get("slowloris"):
        n = cfg["slowloris"]
        run(slow_connections, port, n, SLOW_HEAD, n // 2, records["slowloris"], stop, trickle)
    if cfg.get("slow_bodies"):
        head = (f"POST /predict HTTP/1.1\r\nHost: x\r\nX-API-Key: {key}\r\nContent-Type: "
                "application/json\r\nContent-Length: 100000\r\n\r\n{").encode()
        run(slow_connections, port, cfg["slow_bodies"], head, 0, records["slow_bodies"], stop,
            trickle)
    strips = [(name, multipart([(f"{name}.png", png(im))]))
              for name, im in strip_images().items()] if cfg.get("strips") else []
    for i in range(cfg.get("strips", 0)):  # one kind of strip per thread, in turn
        name, body = strips[i % len(strips)]
        run(poster, port, key, *body, records[name], stop, timeout)
    if cfg.get("big"):
        data = png(big_image())
        body = multipart([(f"big{k}.png", data) for k in range(cfg.get("big_per_request", 1))])
        for _ in range(cfg["big"]):
            run(poster, port, key, *body, records["big"], stop, timeout)
    if cfg.get("tasklist"):
        import base64

        one = base64.b64encode(png(Image.new("L", (8, 8), 128))).decode()
        body = json.dumps({"images": [one], "tasks": ["x"] * cfg.get("task_names", 2_000_000)})
        for _ in range(cfg["tasklist"]):
            run(poster, port, key, body.encode(), "application/json", records["tasklist"],
                stop, timeout)
    if cfg.get("livez"):
        run(prober, port, records["livez"], stop)
    for th in threads:
        th.start()
    return records, threads


def main() -> None:
    cfg = json.loads(sys.argv[1])
    stop = threading.Event()
    records, threads = start(cfg, stop)
    print("ready", flush=True)
    sys.stdin.readline()
    stop.set()
    for th in threads:
        th.join(timeout=cfg.get("timeout", 120.0) + 5)
    print(json.dumps({k: r.summary() for k, r in records.items()}), flush=True)


if __name__ == "__main__":
    main()
