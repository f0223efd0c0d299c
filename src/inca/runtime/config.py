"""The HTTP service's settings, checked when made."""

from __future__ import annotations

from dataclasses import dataclass

from inca.errors import ServerConfigError


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
        api_key: when set, requests must send it in the ``X-API-Key`` header. An empty key
            is refused (it would turn authentication off without a word).
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

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_upload_bytes", "max_images", "max_image_pixels",
                     "max_request_pixels"):
            if getattr(self, name) < 1:
                raise ServerConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_wait_ms", "trim_every_bytes"):
            if getattr(self, name) < 0:
                raise ServerConfigError(f"{name} must not be negative, got {getattr(self, name)}")
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
