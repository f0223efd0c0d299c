"""The server process: uvicorn with a connection limit, a deadline for request headers,
and a drain on SIGTERM (:func:`serve`), running the app of
:func:`~inca.runtime.server.create_app`."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from inca.runtime.config import ServerConfig

__all__ = ["serve"]


def _raw(status: int, reason: str, detail: str, retry_after: int | None = None) -> bytes:
    """A whole HTTP answer as bytes, for a connection that sent no complete request."""
    body = json.dumps({"detail": detail}).encode()
    retry = f"retry-after: {retry_after}\r\n" if retry_after else ""
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n{retry}\r\n").encode() + body


class _Protocol(H11Protocol):
    """uvicorn's h11 protocol with a connection limit and a deadline for request headers:
    from the connection's opening, and on a kept-alive one from the next request's first
    bytes (idle, it is closed after ``keep_alive_s``)."""

    limits = ServerConfig()
    _timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            transport.write(_raw(503, "Service Unavailable", "too many connections; retry "
                                 "later", self.limits.retry_after_s))
            transport.close()
            return
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._timer = self.loop.call_later(self.limits.header_timeout_s, self._late, self.cycle)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _late(self, cycle: Any) -> None:
        """No new request since ``cycle`` (None: the first): the headers are too slow."""
        self._timer = None
        if (self.cycle is cycle and (cycle is None or cycle.response_complete)
                and not self.transport.is_closing()):
            self.transport.write(_raw(408, "Request Timeout", "the request headers did not "
                                      f"arrive within {self.limits.header_timeout_s:g} s"))
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self._timer is None and (self.cycle is None or self.cycle.response_complete):
            self._arm()  # a new request's first bytes
        super().data_received(data)

    def handle_events(self) -> None:
        before = self.cycle
        super().handle_events()
        if self.cycle is not before:  # a request's headers are in
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


class _DrainingServer(uvicorn.Server):
    """uvicorn's server, marking the app as draining (``/readyz`` 503) on SIGTERM/SIGINT."""

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.config.app.state.draining = True
        super().handle_exit(sig, frame)


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000,
          log_level: str = "warning") -> None:
    """Run ``app`` (from :func:`create_app`) until SIGTERM or SIGINT, with its config's
    limits; then stop accepting, answer what is in flight within ``drain_timeout_s``, and
    return."""
    config: ServerConfig = app.state.config
    _raise_fd_limit(config.max_connections + 256)
    protocol = type("LimitedH11Protocol", (_Protocol,), {"limits": config})
    _DrainingServer(uvicorn.Config(
        app, host=host, port=port, log_level=log_level, http=protocol,
        ws="none",  # no WebSocket routes; an upgraded connection would keep the header timer
        timeout_keep_alive=config.keep_alive_s,  # type: ignore[arg-type] - a float works
        timeout_graceful_shutdown=config.drain_timeout_s)).run()  # type: ignore[arg-type]


def _raise_fd_limit(wanted: int) -> None:
    """Lift the soft limit on open files towards ``wanted`` (within the hard limit)."""
    try:
        import resource
    except ImportError:  # not POSIX
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
