"""The HTTP service's settings, checked when made."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from inca.errors import ServerConfigError


def half_the_cores() -> int:
    """Half the cores this process may run on (its CPU affinity where the system has one),
    at least one."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity on this system
        cores = os.cpu_count() or 2
    return max(1, cores // 2)


@dataclass
class ServerConfig:
    """Settings of the service.

    Attributes:
        max_batch: most images in one backbone pass.
        max_wait_ms: how long the first request of a batch waits for others.
        batching: batch concurrent requests (off: each request runs alone).
        max_upload_bytes: largest request body; larger ones get 413 (a chunked body is cut
            off as soon as it passes the limit).
        max_images: most images in one request.
        max_image_pixels: largest image (width x height), checked from its header before
            decoding; larger ones get 413 (decompression bombs: an 18 KB PNG can claim
            12000 x 12000 pixels, 0.4 GB decoded).
        max_request_pixels: most pixels of all images of one request together (413 above).
        trim_every_bytes: after this many bytes of decoded images, freed memory is handed
            back to the OS (glibc ``malloc_trim``; a no-op elsewhere); 0 never does.
        api_key: when set, every request but ``GET /livez`` must send it in the
            ``X-API-Key`` header. An empty key is refused (it would turn authentication off
            without a word).
        max_connections: most open connections; one past it is answered 503 (with
            ``Retry-After``) and closed at once, so idle or slow clients cannot use up the
            process's file descriptors.
        header_timeout_s: a connection must send a request's complete headers within this
            many seconds of opening (or of its previous answer); else 408 and closed
            (slowloris).
        body_timeout_s: a request's body must arrive within this many seconds of its
            headers; else 408 and closed (a body trickled byte by byte).
        request_timeout_s: a request not answered within this many seconds of its headers
            gets 503 (with ``Retry-After``).
        keep_alive_s: an idle keep-alive connection is closed after this many seconds.
        drain_timeout_s: on SIGTERM the server stops accepting, answers what is in flight
            for at most this many seconds, then exits.
        max_queue_images: most images admitted for a backbone pass (waiting or running);
            a request that would pass it gets 503 with ``Retry-After`` instead of waiting
            without bound. At least ``max_images``.
        decode_threads: threads that decode expensive images (a bounded pool, so they
            cannot take every core from the backbone pass); by default half the cores this
            process may run on, at least one (on 2 cores, 2 threads let a normal request's
            p99 under attack grow to 2.97x its p99 alone, 1 thread to 2.2-2.3x:
            ``benchmarks/serve_load.py``).
        max_decode_waiting: most requests waiting for a decode thread (in each of the two
            lanes); more get 503 with ``Retry-After`` (back-pressure).
        cheap_pixels: a request whose images hold at most this many pixels together (read
            from their headers) is decoded on a thread of its own, never queued behind
            expensive images (thin strips, 40 MP images).
        decode_nice: how much lower the CPU priority of the ``decode_threads`` (which
            decode the other requests) is than the backbone pass's (Linux; 0: the same).
        retry_after_s: the ``Retry-After`` seconds sent with every 503.
    """

    max_batch: int = 32
    max_wait_ms: float = 5.0
    batching: bool = True
    max_upload_bytes: int = 10 * 2**20
    max_images: int = 64
    max_image_pixels: int = 40_000_000
    max_request_pixels: int = 160_000_000
    trim_every_bytes: int = 256 * 2**20
    api_key: str | None = None
    max_connections: int = 512
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    request_timeout_s: float = 60.0
    keep_alive_s: float = 5.0
    drain_timeout_s: float = 30.0
    max_queue_images: int = 256
    decode_threads: int = field(default_factory=half_the_cores)
    max_decode_waiting: int = 16
    cheap_pixels: int = 1_000_000
    decode_nice: int = 10
    retry_after_s: int = 1

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_upload_bytes", "max_images", "max_image_pixels",
                     "max_request_pixels", "max_connections", "max_queue_images",
                     "decode_threads", "retry_after_s"):
            if getattr(self, name) < 1:
                raise ServerConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_wait_ms", "trim_every_bytes", "max_decode_waiting", "cheap_pixels",
                     "decode_nice"):
            if getattr(self, name) < 0:
                raise ServerConfigError(f"{name} must not be negative, got {getattr(self, name)}")
        for name in ("header_timeout_s", "body_timeout_s", "request_timeout_s",
                     "keep_alive_s", "drain_timeout_s"):
            if not 0 < getattr(self, name) < float("inf"):  # NaN fails too
                raise ServerConfigError(f"{name} must be a positive number of seconds, got "
                                        f"{getattr(self, name)}")
        if self.max_queue_images < self.max_images:
            raise ServerConfigError(
                f"max_queue_images ({self.max_queue_images}) must be at least max_images "
                f"({self.max_images}), or a full request could never be admitted")
        key = self.api_key
        if key is None:
            return
        if not key.strip():
            raise ServerConfigError(
                "the API key is empty, which would serve without authentication; give a real "
                "key (--api-key or INCA_API_KEY), or leave it unset to serve without one")
        if key != key.strip() or not (key.isascii() and key.isprintable()):
            raise ServerConfigError(
                "the API key must be printable ASCII without leading or trailing spaces (HTTP "
                "headers cannot carry anything else, so no client could send it); choose "
                "another key, e.g. python -c 'import secrets; print(secrets.token_urlsafe())'")
