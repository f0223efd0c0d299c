"""Serving as production servers do. In-process (the ASGI app): a bounded batch queue and a
bounded decode pool answering 503 with Retry-After, a request deadline, bodies parsed off
the event loop, /livez and /readyz, Prometheus /metrics, no local paths in answers. Against
a real ``inca serve`` process on loopback (the end of this file): the connection limit,
slowloris headers and trickled bodies cut off, the probes and metrics, the drain on
SIGTERM."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image
from tiny import recv_all, start_serve, stop_serve

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")
from fastapi.testclient import TestClient  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from inca.errors import ServerConfigError  # noqa: E402
from inca.runtime import MultiTaskModel  # noqa: E402
from inca.runtime import server as server_module  # noqa: E402
from inca.runtime import transport as transport  # noqa: E402
from inca.runtime.server import ServerConfig, create_app, public_name  # noqa: E402


def png(value: int = 128, size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (size, size), value).save(buf, format="PNG")
    return buf.getvalue()


def files(i: int = 0) -> dict:
    return {"files": [("files", (f"{i}.png", png(20 * i)))]}


def wait_ready(c: TestClient, **kw) -> None:
    deadline = time.monotonic() + 30
    while c.get("/readyz", **kw).status_code != 200:
        assert time.monotonic() < deadline, "never ready"
        time.sleep(0.02)


class Gate:
    """Wraps a function so that calls block until opened (and records them)."""

    def __init__(self, fn) -> None:
        self.fn, self.open, self.entered = fn, threading.Event(), threading.Event()
        self.threads: list[str] = []
        self.running = self.most = 0
        self.lock = threading.Lock()

    def __call__(self, *args, **kwargs):
        with self.lock:
            self.threads.append(threading.current_thread().name)
            self.running += 1
            self.most = max(self.most, self.running)
        self.entered.set()
        try:
            assert self.open.wait(20), "gate never opened"
            return self.fn(*args, **kwargs)
        finally:
            with self.lock:
                self.running -= 1


@pytest.fixture()
def make_client(two_tasks):  # noqa: F811
    """``make(**config) -> (client, app, model)``; every client is closed at the end."""
    bb, a, b = two_tasks
    opened = []

    def make(**kwargs):
        model = MultiTaskModel(bb, {"a": a, "b": b})
        app = create_app(model, ServerConfig(**{"max_wait_ms": 1, **kwargs}))
        c = TestClient(app)
        c.__enter__()
        opened.append(c)
        wait_ready(c, headers={"X-API-Key": kwargs.get("api_key") or ""})
        return c, app, model

    yield make
    for c in opened:
        c.__exit__(None, None, None)


def test_a_full_queue_answers_503_with_retry_after_at_once(make_client):
    c, app, model = make_client(max_images=2, max_queue_images=3, retry_after_s=7)
    gate = Gate(model.predict_proba)
    model.predict_proba = gate
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(c.post, "/predict", **{"files": [
            ("files", ("x.png", png(10))), ("files", ("y.png", png(90)))]})
        assert gate.entered.wait(10)
        assert app.state.batcher.pending == 2
        second = pool.submit(c.post, "/predict", **{"files": [
            ("files", ("x.png", png(10))), ("files", ("y.png", png(90)))]})
        try:
            r = second.result(timeout=5)  # answered while the pass is still blocked
        finally:
            gate.open.set()
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"] == "7"
        assert "2 images are waiting" in r.json()["detail"]
        assert first.result().status_code == 200
    assert app.state.batcher.pending == 0
    assert c.post("/predict", **files(1)).status_code == 200  # room again
    with pytest.raises(ServerConfigError, match="max_queue_images"):
        ServerConfig(max_images=8, max_queue_images=4)


def test_a_request_past_its_deadline_gets_503_and_its_job_is_dropped(make_client):
    c, app, model = make_client(request_timeout_s=0.5, max_wait_ms=0)  # one job a pass
    gate = Gate(model.predict_proba)
    model.predict_proba = gate
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(c.post, "/predict", **files(1))
        assert gate.entered.wait(10)
        start = time.monotonic()
        second = pool.submit(c.post, "/predict", **files(2))  # queued behind the pass
        try:
            late = [f.result(timeout=5) for f in (first, second)]
            runs = app.state.batcher.batches_run  # the blocked pass included
        finally:
            gate.open.set()
    assert time.monotonic() - start < 5
    assert [r.status_code for r in late] == [503, 503]
    assert late[1].headers["retry-after"] == "1"
    assert "not answered within 0.5 s" in late[1].json()["detail"]
    assert c.post("/predict", **files(3)).status_code == 200
    assert app.state.batcher.batches_run == runs + 1  # the timed-out second job never ran
    assert app.state.batcher.pending == 0


def test_decoding_runs_on_a_bounded_pool_with_back_pressure(make_client, monkeypatch):
    gate = Gate(server_module.decode_images)
    monkeypatch.setattr(server_module, "decode_images", gate)
    c, app, _ = make_client(decode_threads=1, max_decode_waiting=1)
    with ThreadPoolExecutor(3) as pool:
        running = pool.submit(c.post, "/predict", **files(1))
        assert gate.entered.wait(10)
        waiting = pool.submit(c.post, "/predict", **files(2))
        deadline = time.monotonic() + 10
        while app.state.decoder.pending < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        try:
            refused = pool.submit(c.post, "/predict", **files(3)).result(timeout=5)
        finally:
            gate.open.set()
        assert refused.status_code == 503, refused.text
        assert refused.headers["retry-after"] == "1"
        assert "decoding or waiting" in refused.json()["detail"]
        assert running.result().status_code == waiting.result().status_code == 200
    assert gate.most == 1  # one decode thread: never two images decoding at once
    assert all(name.startswith("inca-decode") for name in gate.threads)
    assert app.state.decoder.pending == 0


def test_cheap_requests_never_queue_behind_expensive_ones(make_client, monkeypatch):
    """A request of few pixels (from the headers) is decoded on a thread of its own while
    every other decode thread is busy, and those threads run at a lower CPU priority (so
    40 MP images or thin strips cannot hold up a normal request: issue 20's load figure)."""
    import os
    import sys

    decode, release, seen = server_module.decode_images, threading.Event(), {}

    def blocking(raw, *args):
        me = threading.current_thread()
        seen[raw[0][0]] = (me.name, os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        if raw[0][0] == "big.png":
            assert release.wait(20)
        return decode(raw, *args)

    monkeypatch.setattr(server_module, "decode_images", blocking)
    c, _, _ = make_client(decode_threads=1, max_decode_waiting=0, cheap_pixels=100)

    def post(name: str, size: int):
        return c.post("/predict", files=[("files", (name, png(size=size)))])

    with ThreadPoolExecutor(3) as pool:
        big = pool.submit(post, "big.png", 16)  # 256 pixels: expensive here
        deadline = time.monotonic() + 10
        while "big.png" not in seen:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        try:
            small = pool.submit(post, "small.png", 8).result(timeout=10)  # 64 pixels
            refused = pool.submit(post, "big2.png", 16).result(timeout=10)
        finally:
            release.set()
        assert small.status_code == 200, small.text
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert big.result().status_code == 200
    assert seen["small.png"][0].startswith("inca-decode-cheap_")
    assert seen["big.png"][0].startswith("inca-decode_")
    if sys.platform.startswith("linux"):  # per-thread priorities (elsewhere left alone)
        assert seen["big.png"][1] == min(seen["small.png"][1] + 10, 19)


def test_a_large_json_body_is_parsed_off_the_event_loop(make_client, monkeypatch):
    import inca.runtime.request as request

    gate = Gate(request._parse_json)
    monkeypatch.setattr(request, "_parse_json", gate)
    c, _, _ = make_client()
    body = {"images": [base64.b64encode(png()).decode()], "tasks": ["a"]}
    with ThreadPoolExecutor(2) as pool:
        parsing = pool.submit(c.post, "/predict", json=body)
        assert gate.entered.wait(10)
        try:  # while the body is being parsed, the loop answers other requests
            live = pool.submit(c.get, "/livez").result(timeout=5)
        finally:
            gate.open.set()
        assert live.status_code == 200
        assert parsing.result().status_code == 200


def test_many_unknown_task_names_are_answered_briefly(make_client):
    c, _, _ = make_client(max_upload_bytes=20 * 2**20)
    names = [f"t{i}" for i in range(200_000)] + ["x"] * 200_000
    r = c.post("/predict", content=json.dumps({"images": [base64.b64encode(png()).decode()],
                                               "tasks": names}),
               headers={"content-type": "application/json"})
    assert r.status_code == 404
    assert r.json()["detail"] == "unknown task(s): t0, t1, t2, t3, t4, ...; tasks: a, b"


@pytest.mark.parametrize("unknown, shown", [
    (5, "unknown task(s): u0, u1, u2, u3, u4; tasks: a, b"),
    (6, "unknown task(s): u0, u1, u2, u3, u4, ...; tasks: a, b"),
])
def test_unknown_task_names_past_five_are_cut_short(unknown, shown, make_client):
    c, _, _ = make_client()
    r = c.post("/predict", json={"images": [base64.b64encode(png()).decode()],
                                 "tasks": ["a", *(f"u{i}" for i in range(unknown))]})
    assert r.status_code == 404 and r.json()["detail"] == shown


def test_readyz_waits_for_the_warm_up_and_fails_while_draining(two_tasks):  # noqa: F811
    bb, a, _ = two_tasks
    app = create_app(MultiTaskModel(bb, {"a": a}), ServerConfig())
    gate = Gate(app.state.batcher.warm_up)
    app.state.batcher.warm_up = gate
    with TestClient(app) as c:
        assert gate.entered.wait(10)
        try:
            warming = c.get("/readyz")
            live = c.get("/livez")
        finally:
            gate.open.set()
        assert (warming.status_code, warming.json()["status"]) == (503, "warming up")
        assert warming.headers["retry-after"] == "1"
        assert live.status_code == 200 and live.json() == {"status": "ok"}
        wait_ready(c)
        assert gate.threads and c.get("/readyz").json() == {"status": "ready"}
        app.state.draining = True  # what SIGTERM sets (serve's server)
        r = c.get("/readyz")
        assert (r.status_code, r.json()["status"]) == (503, "draining")
        assert c.get("/livez").status_code == 200


def test_sigterm_marks_the_app_draining():
    import signal

    import uvicorn

    app = server_module.FastAPI()
    app.state.draining = False
    server = transport._DrainingServer(uvicorn.Config(app))
    server.handle_exit(signal.SIGTERM, None)
    assert app.state.draining and server.should_exit


def metric(text: str, name: str, **labels) -> float:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    raise KeyError(f"{name} {labels} not in the metrics")


def test_metrics_count_requests_tasks_batches_and_images(make_client):
    c, _, _ = make_client(max_upload_bytes=4096, api_key="k")
    key = {"X-API-Key": "k"}
    started = time.monotonic()
    for i in range(3):
        assert c.post("/predict", **files(i), headers=key).status_code == 200
    two = {"files": [("files", ("x.png", png(1))), ("files", ("y.png", png(2)))],
           "data": {"tasks": "b"}}
    assert c.post("/predict", **two, headers=key).status_code == 200
    assert c.post("/predict", json={"images": [base64.b64encode(png()).decode()],
                                    "tasks": ["zz"]}, headers=key).status_code == 404
    assert c.post("/predict", content=b"x" * 5000, headers={
        **key, "content-type": "application/json"}).status_code == 413
    assert c.get("/metrics").status_code == 401  # behind the key
    r = c.get("/metrics", headers=key)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert metric(text, "inca_http_requests_total", path="/predict", status="200") == 4
    assert metric(text, "inca_http_requests_total", path="/predict", status="404") == 1
    assert metric(text, "inca_http_requests_total", path="/predict", status="413") == 1
    elapsed = time.monotonic() - started
    assert metric(text, "inca_http_requests_total", path="/metrics", status="401") == 1
    assert 0 < metric(text, "inca_http_request_duration_seconds_sum", path="/predict") < elapsed
    assert metric(text, "inca_task_requests_total", task="a", status="200") == 3
    assert metric(text, "inca_task_requests_total", task="b", status="200") == 4
    assert metric(text, "inca_images_decoded_total") == 5
    assert metric(text, "inca_batch_images_count") == 4  # one pass per request here
    assert metric(text, "inca_batch_images_sum") == 5
    assert metric(text, "inca_batch_images_bucket", le="1.0") == 3  # powers of two
    assert metric(text, "inca_batch_images_bucket", le="2.0") == 4
    assert metric(text, "inca_batch_images_bucket", le="4.0") == 4
    assert metric(text, "inca_http_request_duration_seconds_count", path="/predict") == 6
    assert metric(text, "inca_queue_images") == 0
    assert metric(text, "inca_decode_requests") == 0
    assert metric(text, "inca_ready") == 1
    assert "zz" not in text  # a client's unknown task name is never a label


@pytest.mark.parametrize("name, shown", [
    ("hf:/home/someone/models/vit-small", "hf:vit-small"),
    ("hf:./runs/../vit/", "hf:vit"),
    ("hf:~/vit", "hf:vit"),
    ("/srv/models/dino", "dino"),
    ("hf:facebook/dinov2-small", "hf:facebook/dinov2-small"),
    ("timm:vit_small_patch14_dinov2", "timm:vit_small_patch14_dinov2"),
])
def test_answers_show_no_local_paths(name, shown, two_tasks, make_client,  # noqa: F811
                                    tmp_path, monkeypatch):
    assert public_name(name) == shown
    monkeypatch.chdir(tmp_path)
    (tmp_path / "local").mkdir()
    assert public_name("hf:local") == "hf:local"  # a relative folder: only its name anyway
    monkeypatch.setattr(two_tasks[0], "name", f"hf:{tmp_path}/secret-folder")
    c, _, _ = make_client()
    for path in ("/health", "/tasks"):
        text = c.get(path).text
        assert str(tmp_path) not in text and "hf:secret-folder" in text, text


# -- a real `inca serve` process on loopback ------------------------------------------------
KEY = "k3y"


def start_server(folder, tmp_path, *args: str):
    """``(process, port)`` of ``inca serve`` with ``args``, once /readyz answers 200."""
    return start_serve(folder, tmp_path / "serve.log", *args, key=KEY)


def get(port: int, path: str, key: str | None = None) -> tuple[int, str, dict]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers={"X-API-Key": key} if key else {})
        r = conn.getresponse()
        return r.status, r.read().decode(), dict(r.getheaders())
    finally:
        conn.close()


def digit_png() -> tuple[Image.Image, bytes]:
    digit = Image.new("L", (8, 8), 0)
    digit.paste(255, (2, 1, 6, 7))
    buf = io.BytesIO()
    digit.save(buf, format="PNG")
    return digit, buf.getvalue()


def predict_request(data: bytes) -> bytes:
    """A whole multipart POST /predict of one image, as bytes."""
    b = "b0undary"
    body = (f'--{b}\r\nContent-Disposition: form-data; name="files"; filename="d.png"\r\n'
            "Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{b}--\r\n".encode()
    return (f"POST /predict HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEY}\r\n"
            "Connection: close\r\nContent-Type: "
            f"multipart/form-data; boundary={b}\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode() + body


def check_prediction(answer: bytes, task, digit: Image.Image) -> None:
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
    top = json.loads(answer.split(b"\r\n\r\n", 1)[1])["predictions"][0]["tasks"]["digits"]
    probs = task.predict_proba([digit.convert("RGB")])[0]
    assert top[0]["label"] == task.classes[int(probs.argmax())]
    assert top[0]["probability"] == pytest.approx(float(probs.max()), abs=1e-4)


@pytest.fixture(scope="module")
def limited(digits_task, tmp_path_factory):
    """``(port, task)``: a server with 8 connections, 3 s for headers, 2 s for a body."""
    folder, task = digits_task
    proc, port = start_server(folder, tmp_path_factory.mktemp("limited"), "--max-connections",
                              "8", "--header-timeout", "3", "--body-timeout", "2")
    try:
        yield port, task
    finally:
        stop_serve(proc)


def test_slowloris_is_cut_off_and_connections_are_capped(limited):
    import socket

    port, task = limited
    digit, data = digit_png()
    stop_trickle = threading.Event()

    def open_slow() -> tuple[socket.socket, float]:
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n")
        return s, time.monotonic()

    def trickle(socks) -> None:  # one more header line every 0.3 s, as slowloris does
        while not stop_trickle.wait(0.3):
            for s, _ in socks:
                try:
                    s.sendall(b"X-a: b\r\n")
                except OSError:
                    pass

    slow = [open_slow() for _ in range(6)]
    feeder = threading.Thread(target=trickle, args=(slow,), daemon=True)
    feeder.start()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as ok:
            started = time.monotonic()
            ok.sendall(predict_request(data))  # served while six slow clients hang
            answer = recv_all(ok, 10)
            assert time.monotonic() - started < 5
        check_prediction(answer, task, digit)
        slow += [open_slow() for _ in range(2)]  # 8 open: the limit
        time.sleep(0.3)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as extra:
            refused = recv_all(extra, 2)  # answered at once, without waiting for a request
        assert refused.startswith(b"HTTP/1.1 503"), refused
        assert b"retry-after: 1" in refused.lower() and b"too many connections" in refused
        for s, opened in slow:  # each cut off with 408 once its 3 s for headers are over
            got = recv_all(s, 8)
            assert got.startswith(b"HTTP/1.1 408"), got
            assert b"did not arrive within 3 s" in got
            assert time.monotonic() - opened < 3 + 3
    finally:
        stop_trickle.set()
        for s, _ in slow:
            s.close()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as ok:
        ok.sendall(predict_request(data))
        check_prediction(recv_all(ok, 10), task, digit)


def test_a_trickled_body_gets_408_and_is_closed(limited):
    import socket

    port, _ = limited
    stop_trickle = threading.Event()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"POST /predict HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEY}\r\nContent-Type: "
                  "application/json\r\nContent-Length: 1000\r\n\r\n{".encode())
        started = time.monotonic()

        def trickle() -> None:  # a byte every 0.2 s: 200 s for the whole body
            while not stop_trickle.wait(0.2):
                try:
                    s.sendall(b" ")
                except OSError:
                    return

        threading.Thread(target=trickle, daemon=True).start()
        try:
            got = recv_all(s, 10)
        finally:
            stop_trickle.set()
    assert got.startswith(b"HTTP/1.1 408"), got
    assert b"connection: close" in got.lower() and b"within 2 s" in got
    assert time.monotonic() - started < 2 + 3


def test_probes_and_metrics_of_a_real_server(limited, digits_task):
    port, _ = limited
    folder, _ = digits_task
    assert get(port, "/livez")[:2] == (200, '{"status":"ok"}')  # no key needed
    for path in ("/readyz", "/metrics", "/health", "/tasks"):
        assert get(port, path)[0] == 401, path
    assert get(port, "/readyz", KEY)[:2] == (200, '{"status":"ready"}')
    code, text, headers = get(port, "/metrics", KEY)
    assert code == 200 and headers["content-type"].startswith("text/plain")
    assert metric(text, "inca_ready") == 1
    assert metric(text, "inca_http_requests_total", path="/readyz", status="200") >= 1
    for path in ("/health", "/tasks"):
        code, text, _ = get(port, path, KEY)
        assert code == 200 and str(folder.parent) not in text, text  # no local paths
        assert '"backbone":"hf:vit"' in text


def test_sigterm_drains_what_is_in_flight_then_exits(digits_task, tmp_path):
    import signal
    import socket

    folder, task = digits_task
    proc, port = start_server(folder, tmp_path, "--drain-timeout", "2", "--body-timeout",
                              "60", "--request-timeout", "60")
    digit, data = digit_png()
    whole = predict_request(data)
    try:
        inflight = socket.create_connection(("127.0.0.1", port), timeout=10)
        inflight.sendall(whole[:-40])  # its headers and most of its body
        stalled = socket.create_connection(("127.0.0.1", port), timeout=10)
        stalled.sendall(f"POST /predict HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEY}\r\n"
                        "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"
                        .encode())  # a body that never comes
        time.sleep(0.5)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(OSError):  # it stopped accepting
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        inflight.sendall(whole[-40:])
        check_prediction(recv_all(inflight, 10), task, digit)  # answered while draining
        # uvicorn re-raises the signal once drained: the exit status says "SIGTERM"
        assert proc.wait(timeout=20) in (0, -signal.SIGTERM)
        assert time.monotonic() - signalled < 2 + 3  # the stalled body did not hold it
    finally:
        inflight.close()
        stalled.close()
        if proc.poll() is None:
            stop_serve(proc)


def test_a_client_that_leaves_mid_body_is_counted_not_answered(make_client):
    """A disconnect while the body is read: nothing is sent (nobody is listening), no
    error escapes, and /metrics counts it as 499 (nginx's 'client closed request')."""
    import asyncio

    c, app, _ = make_client()
    messages = iter([{"type": "http.request", "body": b"--x\r\n", "more_body": True},
                     {"type": "http.disconnect"}])
    sent: list[dict] = []

    async def receive() -> dict:
        return next(messages)

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/predict", "raw_path": b"/predict",
             "query_string": b"", "root_path": "", "client": ("127.0.0.1", 9),
             "server": ("127.0.0.1", 80),
             "headers": [(b"content-type", b"multipart/form-data; boundary=x")]}
    asyncio.run(app(scope, receive, send))
    assert sent == []
    text = c.get("/metrics").text
    assert metric(text, "inca_http_requests_total", path="/predict", status="499") == 1


def test_metrics_say_what_they_measure(make_client):
    c, _, _ = make_client()
    docs = {f.name: f.documentation
            for f in text_string_to_metric_families(c.get("/metrics").text)}
    assert docs["inca_queue_images"] == ("images admitted for a backbone pass and not yet "
                                         "answered")
    assert docs["inca_decode_requests"] == "requests decoding or waiting for a decode thread"
    assert docs["inca_ready"] == "1 when /readyz answers 200"


def test_once_the_body_is_in_the_body_deadline_no_longer_applies():
    """A last body message may leave ``more_body`` out (ASGI: then false). After it the app
    only listens for a disconnect, and a slow answer is not cut off as a slow body."""
    import asyncio

    async def app(scope, receive, send) -> None:
        assert await receive() == {"type": "http.request", "body": b"{}"}
        listener = asyncio.ensure_future(receive())  # a disconnect, should one come
        await asyncio.sleep(0.3)  # working past the body deadline
        listener.cancel()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"done"})

    messages = [{"type": "http.request", "body": b"{}"}]
    sent: list[dict] = []

    async def receive() -> dict:
        if messages:
            return messages.pop(0)
        await asyncio.Event().wait()  # the client stays, sending nothing more
        raise AssertionError("unreachable")

    async def send(message: dict) -> None:
        sent.append(message)

    guard = server_module._Guard(app, config=ServerConfig(body_timeout_s=0.1),
                                 metrics=server_module._Metrics())
    asyncio.run(guard({"type": "http", "path": "/x", "headers": []}, receive, send))
    assert [m.get("status") for m in sent] == [200, None] and sent[1]["body"] == b"done"


def test_expensive_images_get_half_the_cores_by_default(monkeypatch):
    """The decode pool for expensive images defaults to half the cores the process may run
    on (at least one), leaving the backbone pass the rest; `inca serve` shows that default."""
    import os

    from inca.cli.predict import _serve_default
    from inca.runtime.config import ServerConfig

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert ServerConfig().decode_threads == 8 == _serve_default("decode_threads")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert ServerConfig().decode_threads == 1
    assert ServerConfig(decode_threads=3).decode_threads == 3  # asked for: kept
