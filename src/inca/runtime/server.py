"""The HTTP prediction service: every task's top-k from one backbone pass (FastAPI).

Requests arriving close together are batched into one backbone pass
(:mod:`~inca.runtime.batcher`). Bad input gets a 4xx with a clear message and never takes
the server down (:mod:`~inca.runtime.request`: the body cut off past ``max_upload_bytes``,
every image's size checked from its header before any pixel is decoded), and memory freed
after large requests is handed back to the OS (:mod:`~inca.runtime.memory`).
"""

from __future__ import annotations

import asyncio
import secrets
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException, Request

from inca.data import build_transform
from inca.runtime.batcher import Batcher
from inca.runtime.config import ServerConfig
from inca.runtime.memory import MemoryReleaser
from inca.runtime.multitask import MultiTaskModel
from inca.runtime.request import PREDICT_BODY, decode_images, read_request, safe_label

__all__ = ["ServerConfig", "create_app"]


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

    @app.exception_handler(MemoryError)
    async def out_of_memory(_request: Request, _error: MemoryError) -> Any:
        # A request that ran short of memory fails alone with an answer (never a 500,
        # whose reset would also fail other requests on the connection); the server goes on.
        from fastapi.responses import JSONResponse

        return JSONResponse({"detail": "the server ran out of memory answering this "
                                       "request; retry later, or send fewer or smaller "
                                       "images"}, 503, headers={"Retry-After": "1"})

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
        raw, names, top_k = await read_request(request, config)
        wanted = names or list(model.tasks)
        unknown = [safe_label(n) for n in wanted if n not in model.tasks]
        if unknown:
            shown = ", ".join(unknown[:5]) + (", ..." if len(unknown) > 5 else "")
            raise HTTPException(404, f"unknown task(s): {shown}; tasks: "
                                     f"{', '.join(model.tasks)}")
        if not 1 <= top_k <= 1000:
            raise HTTPException(422, f"top_k must be between 1 and 1000, got {top_k}")
        labels = [label for label, _ in raw]
        images = await asyncio.to_thread(decode_images, raw, transform, config, memory)
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
