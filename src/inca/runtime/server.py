"""The HTTP prediction service: every task's top-k from one backbone pass (FastAPI).

Requests arriving close together are batched into one backbone pass (bounded wait,
bounded batch), so throughput grows with load. Bad input gets a 4xx with a clear
message and never takes the server down: the body is cut off as it streams in past
``max_upload_bytes``, every image's size is read from its header and checked (per image
and per request) before any pixel is decoded, and memory freed after large requests is
handed back to the OS.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ctypes
import functools
import json
import re
import secrets
import sys
import threading
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from fastapi import FastAPI, HTTPException, Request
from starlette.datastructures import UploadFile

from inca.data import build_transform
from inca.data.images import ImageError, ImageTooLargeError, check_pixels, image_size, open_image
from inca.errors import InCAError
from inca.runtime.multitask import MultiTaskModel

PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": {
                "type": "object",
                "properties": {
                    "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
                    "tasks": {"type": "string", "description": "comma-separated task names"},
                    "top_k": {"type": "integer", "default": 3},
                },
                "required": ["files"],
            }},
            "application/json": {"schema": {
                "type": "object",
                "properties": {
                    "images": {"type": "array", "items": {"type": "string",
                                                          "format": "base64"}},
                    "tasks": {"type": "array", "items": {"type": "string"}},
                    "top_k": {"type": "integer", "default": 3},
                },
                "required": ["images"],
            }},
        },
    }
}


class ServerConfigError(InCAError):
    """The service's settings are invalid (an empty API key, a non-positive limit, ...)."""


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


@dataclass
class _Job:
    images: torch.Tensor  # (n, 3, S, S)
    future: asyncio.Future = field(repr=False)


class Batcher:
    """Collects requests into batches for one backbone pass each (a single worker)."""

    def __init__(self, model: MultiTaskModel, config: ServerConfig) -> None:
        self.model = model
        self.config = config
        self.queue: asyncio.Queue[_Job] = asyncio.Queue()
        self.lock = threading.Lock()  # one pass at a time: the CPU/GPU is shared anyway
        self.batches_run = 0
        self._worker: asyncio.Task | None = None

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass

    def _infer(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        with self.lock:
            self.batches_run += 1
            return self.model.predict_proba(images, batch_size=max(len(images), 1))

    async def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Probabilities of every task for ``images``, batched with concurrent requests."""
        if not self.config.batching:
            return await asyncio.to_thread(self._infer, images)
        future = asyncio.get_running_loop().create_future()
        await self.queue.put(_Job(images, future))
        return await future

    async def _run(self) -> None:
        wait = self.config.max_wait_ms / 1000
        while True:
            jobs = [await self.queue.get()]
            count = len(jobs[0].images)
            deadline = asyncio.get_running_loop().time() + wait
            while count < self.config.max_batch:
                timeout = deadline - asyncio.get_running_loop().time()
                if timeout <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self.queue.get(), timeout)
                except asyncio.TimeoutError:
                    break
                jobs.append(job)
                count += len(job.images)
            try:
                probs = await asyncio.to_thread(
                    self._infer, torch.cat([j.images for j in jobs]))
            except Exception as e:  # noqa: BLE001 - fail these requests, keep serving
                for j in jobs:
                    if not j.future.done():
                        j.future.set_exception(e)
                continue
            start = 0
            for j in jobs:
                n = len(j.images)
                if not j.future.done():
                    j.future.set_result({k: v[start:start + n] for k, v in probs.items()})
                start += n


def create_app(model: MultiTaskModel, config: ServerConfig | None = None) -> FastAPI:
    """A FastAPI app serving ``model``'s tasks.

    Example:
        >>> model = MultiTaskModel.from_paths(["runs/a/task"])  # doctest: +SKIP
        >>> uvicorn.run(create_app(model), host="127.0.0.1", port=8000)  # doctest: +SKIP
    """
    config = config or ServerConfig()
    batcher = Batcher(model, config)
    transform = build_transform(model.backbone.preprocessing)

    @asynccontextmanager
    async def lifespan(_app):
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="inca", description="InCA task predictions from one shared "
                  "backbone pass", lifespan=lifespan)
    app.state.batcher = batcher
    app.state.memory = memory = MemoryReleaser(config.trim_every_bytes)

    def check_key(request: Request) -> None:
        if config.api_key is None:
            return
        sent = request.headers.get("x-api-key", "").encode("utf-8", "surrogateescape")
        if not secrets.compare_digest(sent, config.api_key.encode()):
            raise HTTPException(401, "missing or wrong API key: send it in the X-API-Key header")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "backbone": model.backbone.name, "tasks": len(model.tasks),
                "batches_run": batcher.batches_run}

    @app.get("/tasks")
    async def tasks(request: Request) -> dict[str, Any]:
        check_key(request)
        return {"backbone": model.backbone.name, "tasks": [
            {"name": name, "classes": t.classes, "layers": t.layers, "members": t.keys,
             "num_parameters": t.num_parameters(), "metrics": t.metrics}
            for name, t in model.tasks.items()]}

    @app.post("/predict", openapi_extra=PREDICT_BODY)
    async def predict(request: Request) -> dict[str, Any]:
        check_key(request)
        raw, names, top_k = await _read_request(request, config)
        wanted = names or list(model.tasks)
        unknown = [_label(n) for n in wanted if n not in model.tasks]
        if unknown:
            shown = ", ".join(unknown[:5]) + (", ..." if len(unknown) > 5 else "")
            raise HTTPException(404, f"unknown task(s): {shown}; tasks: "
                                     f"{', '.join(model.tasks)}")
        if not 1 <= top_k <= 1000:
            raise HTTPException(422, f"top_k must be between 1 and 1000, got {top_k}")
        labels = [label for label, _ in raw]
        images = await asyncio.to_thread(_decode_all, raw, transform, config, memory)
        del raw  # the encoded bytes are no longer needed while the pass runs
        probs = await batcher.predict(images)
        out = []
        for i, label in enumerate(labels):
            per_task = {}
            for name in wanted:
                classes = model.tasks[name].classes
                values, idx = probs[name][i].topk(min(top_k, len(classes)))
                per_task[name] = [{"label": classes[c], "probability": float(v)}
                                  for v, c in zip(values.tolist(), idx.tolist(), strict=True)]
            out.append({"image": label, "tasks": per_task})
        return {"predictions": out}

    return app


class MemoryReleaser:
    """Hands memory freed after large requests back to the OS, at most once per
    ``every_bytes`` of decoded images (small requests never pay for it).

    glibc keeps freed heap pages for reuse, so a process that once decoded a few large
    images stays that large; ``malloc_trim(0)`` returns them. Elsewhere it does nothing.

    Attributes:
        trims: how many times memory was handed back.
    """

    def __init__(self, every_bytes: int) -> None:
        self.every_bytes = every_bytes
        self.trims = 0
        self._pending = 0
        self._lock = threading.Lock()

    def decoded(self, nbytes: int) -> None:
        """Count ``nbytes`` of decoded (and since dropped) pixels; trim once enough were."""
        if self.every_bytes <= 0:
            return
        with self._lock:
            self._pending += nbytes
            if self._pending < self.every_bytes:
                return
            self._pending = 0
            self.trims += 1
        _malloc_trim()


def _malloc_trim() -> bool:
    """glibc's ``malloc_trim(0)``; ``False`` (and nothing done) where there is none."""
    trim = _libc_malloc_trim()
    return bool(trim is not None and trim(0))


@functools.cache
def _libc_malloc_trim() -> Any:
    """glibc's ``malloc_trim`` (looked up once), or ``None`` (not Linux, or musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, read incrementally and cut off with 413 as soon as it passes ``limit``
    (a chunked body has no Content-Length to check first)."""
    length = request.headers.get("content-length")
    # "Connection: close": the server stops reading what the client still sends
    close = {"Connection": "close"}
    if length is not None and length.isdigit() and int(length) > limit:
        raise HTTPException(413, f"request of {int(length)} bytes is over the limit of "
                                 f"{limit} bytes; send fewer or smaller images", close)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"request body is over the limit of {limit} bytes "
                                     f"(stopped reading at {size}); send fewer or smaller "
                                     "images", close)
        chunks.append(chunk)
    return b"".join(chunks)


async def _read_request(request: Request, config: ServerConfig
                        ) -> tuple[list[tuple[str, bytes]], list[str], int]:
    """``([(name, bytes)], task names, top_k)`` from a multipart or JSON request."""
    ctype = request.headers.get("content-type", "")
    if not ctype.startswith(("multipart/form-data", "application/x-www-form-urlencoded",
                             "application/json")):
        raise HTTPException(415, "send multipart/form-data (field 'files') or "
                                 "application/json ({\"images\": [base64, ...]})")
    body = await _read_body(request, config.max_upload_bytes)
    if ctype.startswith("application/json"):
        files, names, top_k = _parse_json(body)
    else:
        files, names, top_k = await _parse_form(request, body)
    if not files:
        raise HTTPException(400, "the request holds no images: send one or more in 'files' "
                                 "(multipart) or 'images' (JSON, base64)")
    if len(files) > config.max_images:
        raise HTTPException(413, f"{len(files)} images in one request; the limit is "
                                 f"{config.max_images}")
    return files, names, top_k


async def _parse_form(request: Request, body: bytes
                      ) -> tuple[list[tuple[str, bytes]], list[str], int]:
    """Multipart (or url-encoded) fields from the buffered ``body``, through Starlette's
    parser fed by a replay of it."""
    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    form = await Request(request.scope, replay).form()
    try:
        files = []
        for i, part in enumerate(form.getlist("files")):
            if not isinstance(part, UploadFile):
                raise HTTPException(422, f"'files' part {i} is a text field; send images as "
                                         "file parts (with a filename)")
            files.append((_label(part.filename or f"file{i}"), await part.read()))
        names = [n.strip() for v in form.getlist("tasks") for n in _text(v, "tasks").split(",")
                 if n.strip()]
        top = form.get("top_k")
        top_k = _int(None if top is None else _text(top, "top_k"), 3)
    finally:
        await form.close()
    return files, names, top_k


def _parse_json(body: bytes) -> tuple[list[tuple[str, bytes]], list[str], int]:
    """``{"images": [base64, ...], "tasks": [...] or "a,b", "top_k": k}``."""
    try:
        payload = json.loads(body)
    except ValueError as e:
        raise HTTPException(400, f"body is not valid JSON: {e}") from None
    except RecursionError:
        raise HTTPException(400, "body is JSON nested too deeply; expected "
                                 '{"images": [...], "tasks": [...], "top_k": k}') from None
    usage = 'expected {"images": [base64 strings], "tasks": [names], "top_k": k}'
    if not isinstance(payload, dict) or not isinstance(payload.get("images", []), list):
        raise HTTPException(422, usage)
    files = []
    for i, b64 in enumerate(payload.get("images", [])):
        if not isinstance(b64, str):
            raise HTTPException(422, f"image {i} is {_describe(b64)}, not a base64 string")
        try:
            files.append((f"image{i}", base64.b64decode(b64, validate=True)))
        except (binascii.Error, ValueError) as e:
            raise HTTPException(400, f"image {i} is not valid base64: {e}") from None
    tasks = payload.get("tasks") or []
    if isinstance(tasks, str):
        tasks = tasks.split(",")
    if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
        raise HTTPException(422, f"tasks must be a list of names; {usage}")
    return files, [t.strip() for t in tasks if t.strip()], _int(payload.get("top_k"), 3)


def _text(value: Any, field_name: str) -> str:
    if not isinstance(value, str):
        raise HTTPException(422, f"'{field_name}' must be a text field, not a file")
    return value


def _int(value: Any, default: int) -> int:
    if value is None or value == "":
        return default
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise HTTPException(422, f"top_k must be an integer, got {_describe(value)}")
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        raise HTTPException(422, f"top_k must be an integer, got {_describe(value)}") from None


def _describe(value: Any) -> str:
    """A client's value for a message: short scalars quoted, anything else by its kind."""
    if isinstance(value, str | int | float | bool) or value is None:
        text = json.dumps(value)
        return text if len(text) <= 40 else text[:37] + "..."
    return {list: "a list", dict: "an object"}.get(type(value), "a value of another kind")


def _label(name: str) -> str:
    """A client-supplied name, safe to echo: no control characters, at most 200 long."""
    name = re.sub(r"[\x00-\x1f\x7f]", "?", name)
    return name if len(name) <= 200 else name[:197] + "..."


def _decode_all(files: list[tuple[str, bytes]], transform, config: ServerConfig,
                memory: MemoryReleaser) -> torch.Tensor:
    """Pixels ``(n, 3, S, S)`` of every image; sizes checked from the headers first (each
    image, then the request's total) so nothing too large is ever decoded."""
    fix = "start the server with a larger --max-image-megapixels"
    total = 0
    try:
        for name, data in files:
            size = image_size(data, name=name)
            check_pixels(size, config.max_image_pixels, name=name, fix=fix)
            total += size[0] * size[1]
        if total > config.max_request_pixels:
            raise HTTPException(
                413, f"the request's images hold {total / 1e6:.3g} megapixels together, over "
                     f"the limit of {config.max_request_pixels / 1e6:.3g} per request; send "
                     "fewer or smaller images")
        tensors, decoded = [], 0
        try:
            for name, data in files:
                image = open_image(data, name=name, max_pixels=config.max_image_pixels)
                decoded += 3 * image.width * image.height
                tensors.append(transform(image))
                del image  # one decoded image alive at a time
        finally:
            memory.decoded(decoded)  # a failed request's decoded images count too
    except ImageTooLargeError as e:
        if e.size is not None:  # our bound, checked from the header
            raise HTTPException(413, str(e)) from None
        # Pillow refused it before its size could be read (over twice its own bound)
        pixels = "too many pixels" if e.pixels is None else f"{e.pixels / 1e6:.3g} megapixels"
        raise HTTPException(413, f"image {e.name} has {pixels}, over this server's limit of "
                                 f"{config.max_image_pixels / 1e6:.3g} megapixels per image (a "
                                 "guard against decompression bombs); shrink the image"
                            ) from None
    except ImageError as e:
        reason = str(e).removeprefix(f"cannot read image {name}: ")
        raise HTTPException(400, f"{name} is not a readable image: {reason}") from None
    return torch.stack(tensors)
