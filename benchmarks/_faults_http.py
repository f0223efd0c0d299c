"""Part 2 of the faults benchmark over HTTP: hostile requests to a real ``inca serve``
(keys, bombs, junk, bad JSON, limits, odd content types), each judged by its status and
JSON ``detail``; the answers checked against ``Task.predict_proba``."""

from __future__ import annotations

import base64
import http.client
import json
import select
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from _faults_bench import HOST, KEY, Bench, short
from _faults_cases import HANDLED, REFUSED, SILENT, UNCLEAR, Case, Inputs, Verdict
from PIL import Image
from tiny import multipart, png

from inca.task import Task


def request(port: int, method: str, path: str, body: bytes = b"",
            headers: dict[str, str] | None = None, timeout: float = 60
            ) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def http_verdict(status: int, body: bytes, expect: int, mention: tuple[str, ...] = ()
                 ) -> Verdict:
    try:
        detail = json.loads(body).get("detail")
    except (ValueError, AttributeError):
        detail = None
    if 200 <= status < 300:
        return Verdict(SILENT, f"HTTP {status}: accepted: {short(body.decode(errors='replace'))}")
    text = detail if isinstance(detail, str) else short(body.decode(errors="replace"), 200)
    problems = []
    if not 400 <= status < 500:
        problems.append(f"HTTP {status}")
    if not isinstance(detail, str) or not detail:
        problems.append("no JSON detail message")
    elif " object at 0x" in detail or "Traceback" in detail:
        problems.append("internals in the message")
    missing = [m for m in mention if isinstance(detail, str) and m.lower() not in detail.lower()]
    if missing:
        problems.append(f"the message does not name {missing}")
    if problems:
        return Verdict(UNCLEAR, "; ".join(problems) + f": {short(text, 200)}")
    note = "" if status == expect else f" (expected {expect})"
    return Verdict(HANDLED, f"HTTP {status}{note}: {short(text, 200)}")


def predicted(body: bytes) -> list[dict[str, Any]]:
    return json.loads(body)["predictions"]


def answer_problem(pred: dict[str, Any], expected: torch.Tensor, classes: list[str],
                   atol: float = 1e-4) -> str | None:
    """What is wrong with one image's answer (``tasks.digits``), or ``None``."""
    top = pred["tasks"]["digits"]
    for entry in top:
        want = float(expected[classes.index(entry["label"])])
        if abs(entry["probability"] - want) > atol:
            return f"{entry['label']}: {entry['probability']:.5f}, expected {want:.5f}"
    values, idx = expected.topk(2)
    if float(values[0] - values[1]) > atol and top[0]["label"] != classes[int(idx[0])]:
        return f"top label {top[0]['label']}, expected {classes[int(idx[0])]}"
    return None


URL = f"http://{HOST}:<port>/predict"  # as the reproductions name the server
WITH_KEY = {"X-API-Key": KEY}


@dataclass
class Client:
    """Requests to the server on ``port``, with the API key unless told otherwise."""

    port: int

    def form(self, files: list[tuple[str, bytes]], fields: dict[str, str] | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        body, ctype = multipart(files, fields)
        return request(self.port, "POST", "/predict", body,
                       {"Content-Type": ctype} | (WITH_KEY if headers is None else headers))

    def json(self, payload: Any, raw: bytes | None = None) -> tuple[int, bytes]:
        body = raw if raw is not None else json.dumps(payload).encode()
        return request(self.port, "POST", "/predict", body,
                       {"Content-Type": "application/json"} | WITH_KEY)


def case(cid: str, what: str, expect: int, send: Callable[[], tuple[int, bytes]],
         mention: tuple[str, ...] = (), how: str = "") -> Case:
    """A request that must be refused clearly (``expect``: the status it should get)."""
    return Case(cid, "http", what, "clear error",
                lambda: http_verdict(*send(), expect, mention), how or f"POST {URL}")


def http_cases(b: Bench, port: int, x: Inputs, task: Task) -> list[Case]:
    c = Client(port)
    b64 = base64.b64encode(x.good[7]).decode()
    return (_key_cases(c, x) + _image_cases(c, x) + _json_cases(c, b64)
            + _count_cases(c, x) + _field_cases(c, x, b64) + _protocol_cases(c)
            + [_chunked_case(port), _deep16_case(c, x, task), _odd_name_case(c, x)])


def _key_cases(c: Client, x: Inputs) -> list[Case]:
    seven = x.good[7]
    return [
        case("http-no-key", "no X-API-Key header", 401,
             lambda: c.form([("x.png", seven)], headers={}), ("API key",)),
        case("http-wrong-key", "a wrong API key", 401,
             lambda: c.form([("x.png", seven)], headers={"X-API-Key": KEY + "x"}),
             ("API key",)),
        case("http-empty-key", "an empty API key", 401,
             lambda: c.form([("x.png", seven)], headers={"X-API-Key": ""}), ("API key",)),
        case("http-latin1-key", "an API key with a non-ASCII byte", 401,
             lambda: c.form([("x.png", seven)], headers={"X-API-Key": KEY + "\xe9"}),
             ("API key",)),
        case("http-tasks-no-key", "GET /tasks without a key", 401,
             lambda: request(c.port, "GET", "/tasks"), ("API key",), "GET /tasks"),
    ]


def _image_cases(c: Client, x: Inputs) -> list[Case]:
    """Bombs, too many megapixels, and images that do not decode."""
    return [
        case("http-bomb", "a 12000x12000 PNG bomb (18 KB)", 413,
             lambda: c.form([("bomb.png", x.bomb)]), ("bomb.png",)),
        case("http-hard-bomb", "a 14000x14000 PNG bomb (over twice Pillow's limit)", 413,
             lambda: c.form([("hard.png", x.hard_bomb)]), ("hard.png",)),
        case("http-bombs-json", "three bombs as base64 JSON", 413,
             lambda: c.json({"images": [base64.b64encode(x.bomb).decode()] * 3})),
        case("http-request-megapixels", "five 6000x6000 images (each under the image limit, "
             "180 megapixels together)", 413,
             lambda: c.form([(f"{i}.png", big) for i, big in enumerate([png(Image.new(
                 "L", (6000, 6000)))] * 5)]), ("megapixels",)),
        case("http-junk-image", "junk bytes after a PNG signature", 400,
             lambda: c.form([("junk.png", x.corrupt)]), ("junk.png",)),
        case("http-truncated-image", "a PNG cut in half", 400,
             lambda: c.form([("half.png", x.truncated)]), ("half.png",)),
        case("http-zero-byte-image", "a zero-byte file", 400,
             lambda: c.form([("empty.png", b"")]), ("empty.png",)),
    ]


def _json_cases(c: Client, b64: str) -> list[Case]:
    """JSON bodies that are malformed, hostile or of the wrong shape."""
    return [
        case("http-bad-json", "a body that is not JSON", 400, lambda: c.json(None, b"{nope")),
        case("http-deep-json", "JSON nested 100,000 levels deep", 400,
             lambda: c.json(None, b"[" * 100_000 + b"]" * 100_000), (),
             "curl -H 'Content-Type: application/json' -H 'X-API-Key: KEY' --data-binary "
             "@deep.json http://127.0.0.1:PORT/predict  # deep.json: python -c \"print('[' * "
             "100000 + ']' * 100000)\" > deep.json"),
        case("http-huge-int-json", "top_k with 5,000 digits", 422,
             lambda: c.json(None, b'{"images": ["' + b64.encode() + b'"], "top_k": '
                            + b"9" * 5000 + b"}")),
        case("http-bad-base64", "an image that is not base64", 400,
             lambda: c.json({"images": ["not base64!"]}), ("base64",)),
        case("http-data-url", "a data: URL instead of base64", 400,
             lambda: c.json({"images": ["data:image/png;base64," + b64]})),
        case("http-images-not-list", '"images" a string', 422,
             lambda: c.json({"images": b64})),
        case("http-image-not-string", "an image given as a number", 422,
             lambda: c.json({"images": [7]})),
        case("http-tasks-number", '"tasks" a number', 422,
             lambda: c.json({"images": [b64], "tasks": 5})),
    ]


def _count_cases(c: Client, x: Inputs) -> list[Case]:
    """No images, or more images or parts than a request may hold."""
    seven = x.good[7]
    return [
        case("http-no-images", "a request without images", 400, lambda: c.json({"images": []})),
        case("http-100k-empty-images", "100,000 empty images in JSON", 413,
             lambda: c.json({"images": [""] * 100_000})),
        case("http-65-images", "65 images (limit 64)", 413,
             lambda: c.form([(f"{i}.png", seven) for i in range(65)])),
        case("http-1001-parts", "1,001 multipart file parts", 400,
             lambda: c.form([(f"{i}.png", b"") for i in range(1001)])),
    ]


def _field_cases(c: Client, x: Inputs, b64: str) -> list[Case]:
    """Bad ``top_k`` values and an unknown task."""
    seven = x.good[7]
    return [
        case("http-top-k-zero", "top_k=0", 422,
             lambda: c.form([("x.png", seven)], {"top_k": "0"}), ("top_k",)),
        case("http-top-k-text", "top_k=abc", 422,
             lambda: c.form([("x.png", seven)], {"top_k": "abc"}), ("top_k",)),
        case("http-top-k-huge", "top_k=1000000000", 422,
             lambda: c.form([("x.png", seven)], {"top_k": "1000000000"}), ("top_k",)),
        case("http-top-k-float", "top_k 2.5 in JSON", 422,
             lambda: c.json({"images": [b64], "top_k": 2.5}), ("top_k",)),
        case("http-unknown-task", "tasks=nope", 404,
             lambda: c.form([("x.png", seven)], {"tasks": "nope"}), ("nope",)),
    ]


def _protocol_cases(c: Client) -> list[Case]:
    """Media types, a form without files, a wrong method, a huge announced length."""
    port = c.port
    return [
        case("http-text-content-type", "Content-Type text/plain", 415,
             lambda: request(port, "POST", "/predict", b"hello",
                             {"Content-Type": "text/plain"} | WITH_KEY)),
        case("http-no-boundary", "multipart/form-data without a boundary", 400,
             lambda: request(port, "POST", "/predict", b"--x\r\n\r\n",
                             {"Content-Type": "multipart/form-data"} | WITH_KEY)),
        case("http-files-as-text", "'files' sent as a text field", 422,
             lambda: c.form([], {"files": "not a file"}), ("files",)),
        case("http-get-predict", "GET /predict", 405,
             lambda: request(port, "GET", "/predict", headers=WITH_KEY), (), f"GET {URL}"),
        case("http-content-length-huge", "Content-Length: 10^9 announced", 413,
             lambda: raw_exchange(port, b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: "
                                  b"application/json\r\nX-API-Key: " + KEY.encode()
                                  + b"\r\nContent-Length: 1000000000\r\n\r\n"), ()),
    ]


def _chunked_case(port: int) -> Case:
    def chunked() -> Verdict:
        limit = 2 * 2**20
        with socket.create_connection((HOST, port), timeout=30) as s:
            s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"X-API-Key: " + KEY.encode() + b"\r\nTransfer-Encoding: chunked\r\n\r\n")
            chunk, sent = b"4000\r\n" + b"x" * 0x4000 + b"\r\n", 0
            try:
                while sent < 20 * limit and not select.select([s], [], [], 0)[0]:
                    s.sendall(chunk)
                    sent += 0x4000
            except OSError:
                pass
            head = read_response(s)
        status, body = head
        v = http_verdict(status, body, 413)
        if sent >= 20 * limit:  # (the bytes sent include what loopback buffers hold)
            return Verdict(UNCLEAR, f"no answer while {sent / 2**20:.0f} MiB were sent: "
                           + v.detail)
        v.detail += f" (answered while the client was sending: {sent / 2**20:.1f} MiB sent)"
        return v
    return Case("http-chunked-oversize", "http", "a chunked body growing past the "
                "2 MiB limit", "clear error", chunked, f"POST {URL} (chunked)")


def _deep16_case(c: Client, x: Inputs, task: Task) -> Case:
    def deep16() -> Verdict:
        status, body = c.form([("deep.png", x.deep)], {"top_k": "3"})
        if status != 200:
            return Verdict(REFUSED, f"HTTP {status}: {short(body.decode(errors='replace'))}")
        want = task.predict_proba([x.deep_twin])[0]
        problem = answer_problem(predicted(body)[0], want, task.classes)
        return Verdict(SILENT, problem) if problem else Verdict(HANDLED, "predicted like the "
                                                                         "8-bit twin")
    return Case("http-16-bit", "http", "a 16-bit PNG: predicted like the 8-bit twin",
                "correct result", deep16, f"POST {URL}")


def _odd_name_case(c: Client, x: Inputs) -> Case:
    def odd_name() -> Verdict:
        name = "a\x01\x1b[31m" + "n" * 500 + ".png"
        status, body = c.form([(name, x.good[7])])
        if status != 200:
            return Verdict(REFUSED, f"HTTP {status}: {short(body.decode(errors='replace'))}")
        label = predicted(body)[0]["image"]
        if len(label) > 200 or any(ord(ch) < 32 for ch in label):
            return Verdict(SILENT, f"echoed the name unsanitised ({len(label)} characters)")
        return Verdict(HANDLED, f"answered; name echoed as {len(label)} safe characters")
    return Case("http-hostile-filename", "http", "a 506-character file name with control "
                "characters", "correct result", odd_name, f"POST {URL}")


def read_response(s: socket.socket, timeout: float = 30) -> tuple[int, bytes]:
    """Status and body of the HTTP response on ``s`` (read until the body is complete or
    the connection closes)."""
    s.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1]) if lines and len(lines[0].split()) > 1 else 0
    length = next((int(ln.split(b":", 1)[1]) for ln in lines[1:]
                   if ln.lower().startswith(b"content-length:")), None)
    while length is not None and len(body) < length:
        try:
            chunk = s.recv(65536)
        except OSError:
            break
        if not chunk:
            break
        body += chunk
    return status, body


def raw_exchange(port: int, head: bytes) -> tuple[int, bytes]:
    with socket.create_connection((HOST, port), timeout=30) as s:
        s.sendall(head)
        return read_response(s)
