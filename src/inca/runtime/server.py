"""The HTTP prediction service: every task's top-k from one backbone pass (FastAPI).

Requests arriving close together are batched into one backbone pass
(:mod:`~inca.runtime.batcher`). Bad input gets a 4xx with a clear message and never takes
the server down (:mod:`~inca.runtime.request`: the body cut off past ``max_upload_bytes``,
every image's size checked from its header before any pixel is decoded), and memory freed
after large requests is handed back to the OS (:mod:`~inca.runtime.memory`).

Served as production servers are (:func:`~inca.runtime.transport.serve`): a connection
limit and deadlines on headers, bodies and whole requests; a bounded batch queue and a
bounded decode pool that answer 503 with ``Retry-After`` when full; bodies parsed off the
event loop; ``/livez``, ``/readyz`` and Prometheus ``/metrics``; a drain on SIGTERM. With
an API key, everything but ``/livez`` needs it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import time
from contextlib import asynccontextmanager
from typing import Any

import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from fastapi_offline import FastAPIOffline
from PIL import Image
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.requests import ClientDisconnect

from inca.data import build_transform
from inca.runtime.batcher import Batcher, DecodePool
from inca.runtime.config import ServerConfig
from inca.runtime.memory import MemoryReleaser
from inca.runtime.multitask import MultiTaskModel
from inca.runtime.request import (
    PREDICT_BODY,
    _read_body,
    decode_images,
    header_pixels,
    read_request,
    safe_label,
)

__all__ = ["ServerConfig", "create_app"]

log = logging.getLogger("uvicorn.error")
_PATHS = ("/predict", "/tasks", "/health", "/livez", "/readyz", "/metrics")


def create_app(model: MultiTaskModel, config: ServerConfig | None = None) -> FastAPI:
    """A FastAPI app serving ``model``'s tasks (run it with
    :func:`~inca.runtime.transport.serve` for the limits on connections and headers, and
    the drain on SIGTERM).

    Example:
        >>> model = MultiTaskModel.from_paths(["runs/a/task"])  # doctest: +SKIP
        >>> from inca.runtime.transport import serve
        >>> serve(create_app(model), host="127.0.0.1", port=8000)  # doctest: +SKIP
    """
    config = config or ServerConfig()
    metrics = _Metrics()
    batcher = Batcher(model, config, on_batch=metrics.batch.observe)
    decoder = DecodePool(config)
    transform = build_transform(model.backbone.preprocessing)
    backbone = public_name(model.backbone.name)

    async def warm_up() -> None:
        try:
            sample = transform(Image.new("RGB", (32, 32)))[None]
            await asyncio.to_thread(batcher.warm_up, sample)
            app.state.warm = True
        except Exception:  # noqa: BLE001 - stay unready (and say why), keep serving probes
            log.exception("the warm-up pass failed; /readyz answers 503")

    @asynccontextmanager
    async def lifespan(_app):
        batcher.start()
        warming = asyncio.get_running_loop().create_task(warm_up())
        yield
        warming.cancel()
        await batcher.stop()
        decoder.close()

    # FastAPIOffline serves the /docs and /redoc pages' scripts itself: FastAPI's load them
    # from a CDN, so behind a firewall /docs was blank
    app = FastAPIOffline(title="inca", description="InCA task predictions from one shared "
                         "backbone pass", lifespan=lifespan)
    app.state.config, app.state.batcher, app.state.decoder = config, batcher, decoder
    app.state.memory = MemoryReleaser(config.trim_every_bytes)
    app.state.warm = app.state.draining = False
    metrics.gauges(batcher, decoder, app.state)
    app.add_middleware(_Guard, config=config, metrics=metrics)

    @app.exception_handler(MemoryError)
    async def out_of_memory(_request: Request, _error: MemoryError) -> Any:
        # A request that ran short of memory fails alone with an answer (never a 500,
        # whose reset would also fail other requests on the connection); the server goes on.
        return JSONResponse({"detail": "the server ran out of memory answering this "
                                       "request; retry later, or send fewer or smaller "
                                       "images"}, 503,
                            headers={"Retry-After": str(config.retry_after_s)})

    _add_probes(app, model, batcher, metrics, config, backbone)
    _add_predict(app, model, config, batcher, decoder, metrics, transform)
    return app


def _add_predict(app: FastAPI, model: MultiTaskModel, config: ServerConfig, batcher: Batcher,
                 decoder: DecodePool, metrics: _Metrics, transform: Any) -> None:
    """The ``/predict`` route: read, parse and decode off the event loop, then one batched
    pass."""

    @app.post("/predict", openapi_extra=PREDICT_BODY)
    async def predict(request: Request) -> dict[str, Any]:
        body = await _read_body(request, config.max_upload_bytes)
        # parsing (a 10 MiB JSON, a multipart of many parts) runs on a thread: the event
        # loop keeps answering /livez and other clients meanwhile
        raw, wanted, top_k, pixels = await asyncio.to_thread(
            _parse, request.scope, body, config, list(model.tasks))
        del body
        request.scope["inca.tasks"] = wanted
        labels = [label for label, _ in raw]
        images = await decoder.run(decode_images, raw, transform, config, app.state.memory,
                                   pixels=pixels)  # its lane: cheap or expensive
        del raw  # the encoded bytes are no longer needed while the pass runs
        metrics.images.inc(len(images))
        probs = await batcher.predict(images)
        return {"predictions": _top_k(model, probs, labels, wanted, top_k)}


def _add_probes(app: FastAPI, model: MultiTaskModel, batcher: Batcher, metrics: _Metrics,
                config: ServerConfig, backbone: str) -> None:
    """The liveness, readiness, health, metrics and task-listing routes."""

    @app.get("/livez")
    async def livez() -> dict[str, Any]:
        """The process answers (never needs the API key)."""
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> Response:
        """200 once the tasks are loaded and the warm-up pass ran, until draining."""
        status = ("draining" if app.state.draining else "warming up" if not app.state.warm
                  else "no tasks" if not model.tasks else "ready")
        return JSONResponse({"status": status}, 200 if status == "ready" else 503,
                            headers={} if status == "ready" else {
                                "Retry-After": str(config.retry_after_s)})

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "backbone": backbone, "tasks": len(model.tasks),
                "batches_run": batcher.batches_run}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/tasks")
    async def tasks() -> dict[str, Any]:
        return {"backbone": backbone, "tasks": [
            {"name": name, "classes": t.classes, "layers": t.layers, "members": t.keys,
             "num_parameters": t.num_parameters(), "metrics": t.metrics}
            for name, t in model.tasks.items()]}


def _top_k(model: MultiTaskModel, probs: dict[str, torch.Tensor], labels: list[str],
           wanted: list[str], top_k: int) -> list[dict[str, Any]]:
    """Each image's ``top_k`` classes and probabilities for every task asked for."""
    ranked = model.ranked({name: probs[name] for name in wanted}, top_k)
    return [{"image": label, "tasks": {
        name: [{"label": c, "probability": p} for c, p in ranked[name][i]] for name in wanted}}
        for i, label in enumerate(labels)]


def _parse(scope: dict, body: bytes, config: ServerConfig, tasks: list[str]
           ) -> tuple[list[tuple[str, bytes]], list[str], int, float]:
    """``(images, wanted tasks, top_k, their pixels from the headers)`` of a read body, on
    a worker thread (its own loop)."""
    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def parse():
        raw, names, top_k = await read_request(Request(scope, replay), config)
        wanted = list(dict.fromkeys(names)) or tasks
        known = set(tasks)
        unknown = [n for n in wanted if n not in known]
        if unknown:
            shown = ", ".join(map(safe_label, unknown[:5])) + (", ..." if len(unknown) > 5
                                                               else "")
            raise HTTPException(404, f"unknown task(s): {shown}; tasks: {', '.join(tasks)}")
        if not 1 <= top_k <= 1000:
            raise HTTPException(422, f"top_k must be between 1 and 1000, got {top_k}")
        return raw, wanted, top_k, header_pixels(raw)

    return asyncio.run(parse())


def public_name(name: str) -> str:
    """A backbone's name without the server's folders: ``hf:/home/u/vit`` -> ``hf:vit``."""
    kind, sep, rest = name.partition(":")
    if not sep:
        kind, rest = "", kind
    if os.path.isabs(rest) or rest.startswith(("~", ".")) or os.path.exists(rest):
        rest = os.path.basename(os.path.normpath(rest))
    return f"{kind}{sep}{rest}"


class _Metrics:
    """The Prometheus metrics of one app (its own registry: apps in one process stay apart)."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("inca_http_requests", "HTTP requests answered, by path and "
                                "status", ["path", "status"], registry=r)
        self.task_requests = Counter("inca_task_requests", "prediction requests by task "
                                     "and status", ["task", "status"], registry=r)
        self.latency = Histogram("inca_http_request_duration_seconds", "time from a "
                                 "request's headers to its answer", ["path"], registry=r,
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10,
                                          30, 60))
        self.batch = Histogram("inca_batch_images", "images per backbone pass", registry=r,
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
        self.images = Counter("inca_images_decoded", "images decoded", registry=r)

    def gauges(self, batcher: Batcher, decoder: DecodePool, state: Any) -> None:
        r = self.registry
        Gauge("inca_queue_images", "images admitted for a backbone pass and not yet "
              "answered", registry=r).set_function(lambda: batcher.pending)
        Gauge("inca_decode_requests", "requests decoding or waiting for a decode thread",
              registry=r).set_function(lambda: decoder.pending)
        Gauge("inca_ready", "1 when /readyz answers 200", registry=r).set_function(
            lambda: float(state.warm and not state.draining))


class _Guard:
    """Around every HTTP request: the API key, the body and request deadlines, metrics,
    and a client that left (or was cut off) ending its request quietly, without a
    traceback in the log."""

    def __init__(self, app: Any, config: ServerConfig, metrics: _Metrics) -> None:
        self.app, self.config, self.metrics = app, config, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        config, path = self.config, scope["path"]
        started, state = time.monotonic(), {"status": None, "ours": False, "body": True}

        async def guarded_send(message: dict) -> None:
            if state["ours"]:  # we answered already (a deadline passed): drop the app's
                return
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
            await send(message)

        async def answer(status: int, detail: str, close: bool = True) -> None:
            if state["status"] is None:
                await _send_json(send, status, detail, config, close)
                state["status"], state["ours"] = status, True

        async def guarded_receive() -> dict:
            if not state["body"]:  # the body is in: the app only listens for a disconnect
                return await receive()
            try:
                message = await asyncio.wait_for(
                    receive(), max(started + config.body_timeout_s - time.monotonic(), 0))
            except asyncio.TimeoutError:
                await answer(408, "the request body did not arrive within "
                                  f"{config.body_timeout_s:g} s; send it at once")
                return {"type": "http.disconnect"}
            state["body"] = message.get("more_body", False)
            return message

        scope["inca.tasks"] = []
        try:
            if config.api_key is not None and path != "/livez" and not _key_ok(scope, config):
                await answer(401, "missing or wrong API key: send it in the X-API-Key header",
                             close=False)
                return
            await asyncio.wait_for(self.app(scope, guarded_receive, guarded_send),
                                   config.request_timeout_s)
        except asyncio.TimeoutError:
            await answer(503, f"the request was not answered within "
                              f"{config.request_timeout_s:g} s; retry later")
        except ClientDisconnect:
            state["status"] = state["status"] or 499  # the client left: nothing to answer
        except BaseException:
            state["status"] = state["status"] or 500
            raise
        finally:
            self._count(path, state["status"] or 499, time.monotonic() - started,
                        scope["inca.tasks"])

    def _count(self, path: str, status: int, seconds: float, tasks: list[str]) -> None:
        """A request in the metrics: by path and status, its latency, and per task."""
        label = path if path in _PATHS else "other"
        self.metrics.requests.labels(label, str(status)).inc()
        self.metrics.latency.labels(label).observe(seconds)
        for task in tasks:
            self.metrics.task_requests.labels(task, str(status)).inc()


def _key_ok(scope: dict, config: ServerConfig) -> bool:
    sent = [v for k, v in scope["headers"] if k == b"x-api-key"]
    # one key, sent once: with two, which one a proxy or the server reads differs
    return len(sent) == 1 and secrets.compare_digest(sent[0], config.api_key.encode())


async def _send_json(send: Any, status: int, detail: str, config: ServerConfig,
                     close: bool) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    if status == 503:
        headers.append((b"retry-after", str(config.retry_after_s).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
