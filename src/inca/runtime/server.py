"""The HTTP prediction service: every task's top-k from one backbone pass (FastAPI).

Requests arriving close together are batched into one backbone pass (bounded wait,
bounded batch), so throughput grows with load. Bad input gets a 4xx with a clear
message and never takes the server down.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import threading
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from fastapi import FastAPI, HTTPException, Request
from PIL import Image, UnidentifiedImageError

from inca.data import build_transform
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


@dataclass
class ServerConfig:
    """Settings of the service.

    Attributes:
        max_batch: most images in one backbone pass.
        max_wait_ms: how long the first request of a batch waits for others.
        batching: batch concurrent requests (off: each request runs alone).
        max_upload_bytes: largest request body; larger ones get 413.
        max_images: most images in one request.
        api_key: when set, requests must send it in the ``X-API-Key`` header.
    """

    max_batch: int = 32
    max_wait_ms: float = 5.0
    batching: bool = True
    max_upload_bytes: int = 10 * 2**20
    max_images: int = 64
    api_key: str | None = None


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

    def check_key(request: Request) -> None:
        if config.api_key and request.headers.get("x-api-key") != config.api_key:
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
        unknown = [n for n in wanted if n not in model.tasks]
        if unknown:
            raise HTTPException(404, f"unknown task(s) {unknown}; tasks: "
                                     f"{', '.join(model.tasks)}")
        if not 1 <= top_k <= 1000:
            raise HTTPException(422, f"top_k must be between 1 and 1000, got {top_k}")
        images = await asyncio.to_thread(_decode_all, raw, transform)
        probs = await batcher.predict(images)
        out = []
        for i, (label, _) in enumerate(raw):
            per_task = {}
            for name in wanted:
                classes = model.tasks[name].classes
                values, idx = probs[name][i].topk(min(top_k, len(classes)))
                per_task[name] = [{"label": classes[c], "probability": float(v)}
                                  for v, c in zip(values.tolist(), idx.tolist(), strict=True)]
            out.append({"image": label, "tasks": per_task})
        return {"predictions": out}

    return app


async def _read_request(request: Request, config: ServerConfig
                        ) -> tuple[list[tuple[str, bytes]], list[str], int]:
    """``([(name, bytes)], task names, top_k)`` from a multipart or JSON request."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > config.max_upload_bytes:
        raise HTTPException(413, f"request of {int(length)} bytes is over the limit of "
                                 f"{config.max_upload_bytes} bytes")
    body = await request.body()
    if len(body) > config.max_upload_bytes:
        raise HTTPException(413, f"request of {len(body)} bytes is over the limit of "
                                 f"{config.max_upload_bytes} bytes")
    ctype = request.headers.get("content-type", "")
    if ctype.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        form = await request.form()
        files = [(getattr(f, "filename", None) or f"file{i}", await f.read())
                 for i, f in enumerate(form.getlist("files")) if hasattr(f, "read")]
        names = [s.strip() for s in str(form.get("tasks") or "").split(",") if s.strip()]
        top_k = _int(form.get("top_k"), 3)
    elif ctype.startswith("application/json"):
        try:
            payload = await request.json()
        except ValueError as e:
            raise HTTPException(400, f"body is not valid JSON: {e}") from e
        if not isinstance(payload, dict) or not isinstance(payload.get("images", []), list):
            raise HTTPException(422, 'expected {"images": [base64 strings], "tasks": [...], '
                                     '"top_k": k}')
        files = []
        for i, b64 in enumerate(payload.get("images", [])):
            try:
                files.append((f"image{i}", base64.b64decode(str(b64), validate=True)))
            except (binascii.Error, ValueError) as e:
                raise HTTPException(400, f"image {i} is not valid base64: {e}") from e
        names = [str(n) for n in payload.get("tasks") or []]
        top_k = _int(payload.get("top_k"), 3)
    else:
        raise HTTPException(415, "send multipart/form-data (field 'files') or "
                                 "application/json ({\"images\": [base64, ...]})")
    if not files:
        raise HTTPException(400, "the request holds no images: send one or more in 'files' "
                                 "(multipart) or 'images' (JSON, base64)")
    if len(files) > config.max_images:
        raise HTTPException(413, f"{len(files)} images in one request; the limit is "
                                 f"{config.max_images}")
    return files, names, top_k


def _int(value: Any, default: int) -> int:
    if value is None or value == "":
        return default
    try:
        return int(value)
    except (TypeError, ValueError) as e:
        raise HTTPException(422, f"top_k must be an integer, got {value!r}") from e


def _decode_all(files: list[tuple[str, bytes]], transform) -> torch.Tensor:
    tensors = []
    for name, data in files:
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.load()  # decode now: a truncated file fails here, not in the pass
                tensors.append(transform(im.convert("RGB")))
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            raise HTTPException(400, f"{name} is not a readable image: {e}") from e
    return torch.stack(tensors)
