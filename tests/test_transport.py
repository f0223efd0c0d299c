"""The server process's transport in-process: answers written before any request
(``_raw``), the open-file limit, how :func:`serve` sets uvicorn up, and the connection limit
and header deadline of a real uvicorn server on a loopback port, run in a thread (the
tests against an ``inca serve`` process are in test_serving_limits.py)."""

from __future__ import annotations

import json
import socket
import threading
import time
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
from tiny import recv_all

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
from fastapi import FastAPI  # noqa: E402

from inca.runtime import transport  # noqa: E402
from inca.runtime.config import ServerConfig  # noqa: E402


def parse(answer: bytes) -> tuple[str, dict[str, str], bytes]:
    """``(status line, headers (names lower-cased), body)`` of one HTTP answer."""
    head, _, body = answer.partition(b"\r\n\r\n")
    status, *lines = head.decode().split("\r\n")
    headers = {k.lower(): v for k, _, v in (line.partition(": ") for line in lines)}
    return status, headers, body


def test_a_raw_answer_is_a_whole_json_http_response():
    got = transport._raw(503, "Service Unavailable", "go away", 7)
    assert got == (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
                   b"content-length: 21\r\nconnection: close\r\nretry-after: 7\r\n\r\n"
                   b'{"detail": "go away"}')
    status, headers, body = parse(transport._raw(408, "Request Timeout", "late"))
    assert status == "HTTP/1.1 408 Request Timeout" and "retry-after" not in headers
    assert json.loads(body) == {"detail": "late"} and headers["content-length"] == str(len(body))


INF = "unlimited"


@pytest.mark.parametrize("soft, hard, wanted, new", [
    (1024, 4096, 2000, 2000), (1024, 4096, 9000, 4096), (1024, INF, 9000, 9000),
    (4096, 4096, 2000, None), (INF, INF, 2000, None), (2000, 4096, 2000, None)])
def test_the_open_file_limit_is_raised_towards_wanted_within_the_hard_limit(
        monkeypatch, soft, hard, wanted, new):
    resource = pytest.importorskip("resource")
    soft, hard = (resource.RLIM_INFINITY if v == INF else v for v in (soft, hard))
    calls = []
    monkeypatch.setattr(resource, "getrlimit", lambda which: (soft, hard))
    monkeypatch.setattr(resource, "setrlimit", lambda which, limits: calls.append((which,
                                                                                   limits)))
    transport._raise_fd_limit(wanted)
    assert calls == ([] if new is None else [(resource.RLIMIT_NOFILE, (new, hard))])


def test_serve_runs_uvicorn_with_the_configs_limits(monkeypatch):
    seen = {}
    monkeypatch.setattr(transport._DrainingServer, "run", lambda self: seen.update(
        config=self.config))
    monkeypatch.setattr(transport, "_raise_fd_limit", lambda n: seen.update(fds=n))
    app = FastAPI()
    app.state.config = config = ServerConfig(max_connections=10, keep_alive_s=3,
                                             drain_timeout_s=7)
    transport.serve(app, host="127.0.0.2", port=1234)
    c = seen["config"]
    assert seen["fds"] == 10 + 256  # the connections and some to spare
    assert (c.host, c.port, c.timeout_keep_alive, c.timeout_graceful_shutdown) == (
        "127.0.0.2", 1234, 3, 7)
    assert issubclass(c.http, transport._Protocol) and c.http.limits is config
    assert c.ws == "none"  # no WebSocket upgrade: _Protocol's header deadline stays valid


# -- a real uvicorn server with the limits, in a thread -----------------------------------
@contextmanager
def running(config: ServerConfig):
    """The port of a uvicorn server (``/hi`` answers) with ``config``'s limits."""
    app = FastAPI()
    app.state.draining = False

    @app.get("/hi")
    async def hi() -> dict:
        return {"hi": 1}

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    protocol = type("LimitedH11Protocol", (transport._Protocol,), {"limits": config})
    server = transport._DrainingServer(uvicorn.Config(
        app, http=protocol, lifespan="off", log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "never started"
            time.sleep(0.01)
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


GET = b"GET /hi HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


def test_a_connection_past_the_limit_is_answered_503_at_once_and_closed():
    with running(ServerConfig(max_connections=1, retry_after_s=4)) as port:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as first:
            time.sleep(0.2)  # accepted: the one connection allowed
            with socket.create_connection(("127.0.0.1", port), timeout=5) as extra:
                started = time.monotonic()
                status, headers, body = parse(recv_all(extra, 5))  # sent no request
                assert time.monotonic() - started < 4  # at once, not at recv's 5 s
            assert status == "HTTP/1.1 503 Service Unavailable"
            assert headers["retry-after"] == "4" and headers["connection"] == "close"
            assert json.loads(body) == {"detail": "too many connections; retry later"}
            first.sendall(GET)  # the first is served all the while
            status, _, body = parse(recv_all(first, 5))
        assert status == "HTTP/1.1 200 OK" and json.loads(body) == {"hi": 1}


def test_headers_trickled_past_the_deadline_get_408_and_the_connection_is_closed():
    """The deadline runs from the connection's opening: headers that keep coming, a line
    at a time (slowloris), do not push it back."""
    stop = threading.Event()
    with running(ServerConfig(header_timeout_s=0.5)) as port:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            opened = time.monotonic()
            s.sendall(b"GET /hi HTTP/1.1\r\nHost: x\r\n")

            def trickle() -> None:  # a header line every 0.1 s, for up to 4 s
                for _ in range(40):
                    if stop.wait(0.1):
                        return
                    try:
                        s.sendall(b"X-a: b\r\n")
                    except OSError:
                        return

            threading.Thread(target=trickle, daemon=True).start()
            try:
                answer = recv_all(s, 6)
                took = time.monotonic() - opened
            finally:
                stop.set()
        with socket.create_connection(("127.0.0.1", port), timeout=5) as ok:
            ok.sendall(GET)  # a prompt request is served
            assert parse(recv_all(ok, 5))[0] == "HTTP/1.1 200 OK"
    status, headers, body = parse(answer)
    assert status == "HTTP/1.1 408 Request Timeout" and headers["connection"] == "close"
    assert json.loads(body) == {"detail": "the request headers did not arrive within 0.5 s"}
    assert 0.4 < took < 3.5  # the trickle, 4 s long, did not push the deadline back


class _Transport:
    def __init__(self, closing: bool) -> None:
        self.closing, self.written, self.closed = closing, b"", False

    def is_closing(self) -> bool:
        return self.closing

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize("now, armed, closing, late", [
    (None, None, False, True),  # the first request's headers never came
    ("done", "done", False, True),  # nor the next one's, after an answer
    ("running", "done", False, False),  # a new request came in: its headers were in time
    ("running", "running", False, False),  # still answering: no request is awaited
    (None, None, True, False),  # the connection is closing already
])
def test_the_header_deadline_answers_only_a_connection_still_awaiting_headers(
        now, armed, closing, late):
    cycles = {None: None, "done": SimpleNamespace(response_complete=True),
              "running": SimpleNamespace(response_complete=False)}
    protocol = object.__new__(transport._Protocol)  # its state alone, without a server
    protocol.limits = ServerConfig(header_timeout_s=2)
    protocol.cycle, protocol.transport = cycles[now], _Transport(closing)
    protocol._late(cycles[armed])
    assert protocol.transport.closed is late
    assert protocol.transport.written == (transport._raw(
        408, "Request Timeout", "the request headers did not arrive within 2 s") if late
        else b"")
