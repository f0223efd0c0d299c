"""A real ``inca serve`` process under hostile requests over loopback.

Decompression bombs (one over Pillow's hard limit), a chunked body past the upload limit,
missing, wrong and empty API keys: each gets a clear 4xx, and the same keep-alive
connection then serves a normal request with the right predictions. One server for the
whole file (its start is most of the runtime); it is always terminated.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import select
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image
from tiny import multipart, png, start_serve, stop_serve

pytest.importorskip("fastapi")

KEY = "k3y-for-tests"


@pytest.fixture(scope="module")
def server(digits_task, tmp_path_factory):
    """``(port, task)``: ``inca serve`` of a tiny digits task, API key required."""
    folder, task = digits_task
    proc, port = start_serve(
        folder, tmp_path_factory.mktemp("faults") / "serve.log", "--max-upload-mb", "0.1",
        "--max-image-megapixels", "1", "--max-request-megapixels", "2", key=KEY)
    try:
        yield port, task
    finally:
        stop_serve(proc)


def post(conn: http.client.HTTPConnection, files: list[tuple[str, bytes]],
         key: str | None = KEY, **fields: str) -> tuple[int, dict, str | None]:
    """``(status, JSON body, Connection header)`` of a multipart POST /predict."""
    body, ctype = multipart(files, fields)
    headers = {"Content-Type": ctype} | ({"X-API-Key": key} if key is not None else {})
    conn.request("POST", "/predict", body=body, headers=headers)
    r = conn.getresponse()
    return r.status, json.loads(r.read()), r.getheader("connection")


def test_hostile_requests_get_4xx_and_the_connection_keeps_serving(server):
    port, task = server
    digit = Image.new("L", (8, 8), 0)
    digit.paste(255, (2, 1, 6, 7))
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.connect()
        local = conn.sock.getsockname()
        cases = [
            ([("x.png", png(digit))], None, 401, "API key"),
            ([("x.png", png(digit))], "", 401, "API key"),
            ([("x.png", png(digit))], KEY + "x", 401, "API key"),
            ([("bomb.png", png(Image.new("1", (12000, 12000))))], KEY, 413,
             "bomb.png is 12000x12000 = 144 megapixels, over the limit of 1 megapixels"),
            ([("hard.png", png(Image.new("1", (14000, 14000))))], KEY, 413,
             "hard.png has 196 megapixels"),
            ([("a.png", png(Image.new("L", (1000, 1000))))] * 3, KEY, 413,
             "3 megapixels together"),
            ([("junk.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 99)], KEY, 400,
             "junk.png is not a readable image"),
        ]
        for files, key, status, message in cases:
            code, body, connection = post(conn, files, key)
            assert (code, connection) == (status, None), body
            assert message in body["detail"]
            assert "object at 0x" not in body["detail"]
        code, body, _ = post(conn, [("seven.png", png(digit))], top_k="2")
        assert code == 200, body
        assert conn.sock.getsockname() == local  # one keep-alive connection throughout
    finally:
        conn.close()
    top = body["predictions"][0]["tasks"]["digits"]
    probs = task.predict_proba([digit.convert("RGB")])[0]
    assert [t["label"] for t in top] == [task.classes[i] for i in probs.topk(2).indices]
    assert top[0]["probability"] == pytest.approx(float(probs.max()), abs=1e-4)


def test_chunked_body_past_the_limit_is_cut_off(server):
    port, _ = server
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"X-API-Key: " + KEY.encode() + b"\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk, sent = b"4000\r\n" + b"x" * 0x4000 + b"\r\n", 0  # 16 KiB chunks
        while sent < 60 * 2**20 and not select.select([s], [], [], 0)[0]:
            s.sendall(chunk)
            sent += 0x4000
        head = s.recv(4096)
        while b"}" not in head and (more := s.recv(4096)):  # the body may come separately
            head += more
    assert head.startswith(b"HTTP/1.1 413"), head
    assert b"over the limit of 104857 bytes" in head
    assert sent < 16 * 2**20  # answered long before the 60 MiB were sent
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:  # and the server serves the next client
        body = json.dumps({"images": [base64.b64encode(png(Image.new("L", (8, 8)))).decode()]})
        conn.request("POST", "/predict", body=body, headers={
            "Content-Type": "application/json", "X-API-Key": KEY})
        assert conn.getresponse().status == 200
    finally:
        conn.close()


def test_concurrent_clients_and_plain_errors(server):
    port, task = server

    def one(i: int) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            return post(conn, [(f"{i}.png", png(Image.new("L", (8, 8), i * 30)))])[0]
        finally:
            conn.close()

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(one, range(6))) == [200] * 6
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", "/predict", body=b"x" * 200_000, headers={
            "Content-Type": "application/json", "X-API-Key": KEY})
        assert conn.getresponse().status == 413
        conn.close()
        conn.request("GET", "/livez")  # liveness: the one path without the key
        assert json.loads(conn.getresponse().read())["status"] == "ok"
    finally:
        conn.close()


@pytest.mark.slow
@pytest.mark.parametrize("args, env", [(["--api-key", ""], {}), ([], {"INCA_API_KEY": ""})])
def test_serve_refuses_an_empty_api_key_at_startup(tmp_path, args, env):
    r = subprocess.run([sys.executable, "-m", "inca.cli", "serve", "--task", str(tmp_path),
                        *args], env={**os.environ, **env}, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2
    assert "empty" in r.stderr and "authentication" in r.stderr and "Traceback" not in r.stderr


def test_thin_strips_are_answered_like_any_image(server):
    """A strip within the pixel limit (4 x 100,000 or 1 x 1,000,000: 1 MP, a few hundred
    bytes) was resized to 32 x 32,000,000 px before its center crop: seconds of CPU and
    gigabytes per request, or a MemoryError answered 500 that reset the connection. Each
    is now answered at once, like the library's prediction for it, on one connection."""
    port, task = server
    strips = {"tall.png": Image.new("L", (4, 100_000), 200),
              "wide.png": Image.new("L", (100_000, 4), 30),
              "thread.png": Image.new("L", (1, 1_000_000), 255)}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.connect()
        local = conn.sock.getsockname()
        for name, strip in strips.items():
            data = png(strip)
            assert len(data) < 5000
            start = time.monotonic()
            code, body, connection = post(conn, [(name, data)], top_k="1")
            assert (code, connection) == (200, None), body
            assert time.monotonic() - start < 10, name
            probs = task.predict_proba([strip.convert("RGB")])[0]
            top = body["predictions"][0]["tasks"]["digits"][0]
            assert top["label"] == task.classes[int(probs.argmax())]
            assert top["probability"] == pytest.approx(float(probs.max()), abs=1e-4)
        assert conn.sock.getsockname() == local  # one keep-alive connection throughout
    finally:
        conn.close()


def test_running_out_of_memory_is_503_and_the_server_goes_on(server, monkeypatch):
    """A MemoryError (decoding, or in the backbone pass) is that request's 503 with
    Retry-After, never a 500; the next request is served."""
    from fastapi.testclient import TestClient

    import inca.runtime.request as request
    from inca.runtime import MultiTaskModel
    from inca.runtime.server import ServerConfig, create_app

    _, task = server
    app = create_app(MultiTaskModel(task.backbone, {"digits": task}), ServerConfig())
    opened = request.open_image

    def short_of_memory(data, *, name, **kwargs):
        if name == "big.png":
            raise MemoryError
        return opened(data, name=name, **kwargs)

    monkeypatch.setattr(request, "open_image", short_of_memory)
    digit = png(Image.new("L", (8, 8), 255))
    with TestClient(app) as c:
        r = c.post("/predict", files=[("files", ("big.png", digit))])
        assert r.status_code == 503, r.text
        assert "ran out of memory decoding big.png" in r.json()["detail"]
        assert int(r.headers["retry-after"]) >= 1
        assert c.post("/predict", files=[("files", ("ok.png", digit))]).status_code == 200
        predict = app.state.batcher.predict

        async def pass_short_of_memory(images):
            raise MemoryError

        app.state.batcher.predict = pass_short_of_memory
        r = c.post("/predict", files=[("files", ("ok.png", digit))])
        assert r.status_code == 503, r.text
        assert "ran out of memory" in r.json()["detail"] and r.headers["retry-after"]
        app.state.batcher.predict = predict
        assert c.post("/predict", files=[("files", ("ok.png", digit))]).status_code == 200
