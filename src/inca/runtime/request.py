"""A ``/predict`` request read within limits: its body, its fields (multipart or JSON) and
its images decoded.

Bad input gets a 4xx with a clear message (an ``HTTPException``) and never takes the server
down: the body is cut off as it streams in past ``max_upload_bytes``, and every image's size
is read from its header and checked (per image and per request) before any pixel is decoded.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from typing import Any

import torch
from fastapi import HTTPException, Request
from starlette.datastructures import UploadFile

from inca.data.images import check_pixels, image_size, open_image
from inca.errors import ImageError, ImageTooLargeError
from inca.runtime.config import ServerConfig
from inca.runtime.memory import MemoryReleaser

# The OpenAPI description of a /predict body (the endpoint reads the raw body itself).
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


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, read incrementally and cut off with 413 as soon as it passes ``limit``
    (a chunked body has no Content-Length to check first)."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise HTTPException(413, f"request of {int(length)} bytes is over the limit of "
                                 f"{limit} bytes; send fewer or smaller images")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"request body is over the limit of {limit} bytes "
                                     f"(stopped reading at {size}); send fewer or smaller "
                                     "images")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_request(request: Request, config: ServerConfig
                        ) -> tuple[list[tuple[str, bytes]], list[str], int]:
    """``([(name, bytes)], task names, top_k)`` from a multipart or JSON request."""
    # the media type alone, compared case-insensitively (RFC 9110): "APPLICATION/JSON" is
    # JSON, "application/jsonx" is not
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media not in ("multipart/form-data", "application/x-www-form-urlencoded",
                     "application/json"):
        raise HTTPException(415, "send multipart/form-data (field 'files') or "
                                 "application/json ({\"images\": [base64, ...]})")
    body = await _read_body(request, config.max_upload_bytes)
    if media == "application/json":
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
            files.append((safe_label(part.filename or f"file{i}"), await part.read()))
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


def safe_label(name: str) -> str:
    """A client-supplied name, safe to echo: no control characters, at most 200 long."""
    name = re.sub(r"[\x00-\x1f\x7f]", "?", name)
    return name if len(name) <= 200 else name[:197] + "..."


def header_pixels(files: list[tuple[str, bytes]]) -> float:
    """The images' pixels together, from their headers (no pixel decoded); infinite when
    one cannot be read (:func:`decode_images` then says why)."""
    total = 0
    for name, data in files:
        try:
            width, height = image_size(data, name=name)
        except ImageError:
            return math.inf
        total += width * height
    return total


def decode_images(files: list[tuple[str, bytes]], transform, config: ServerConfig,
                memory: MemoryReleaser) -> torch.Tensor:
    """Pixels ``(n, 3, S, S)`` of every image; sizes checked from the headers first (each
    image, then the request's total) so nothing too large is ever decoded."""
    fix = "start the server with a larger --max-image-megapixels"
    total, tensors = 0, []
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
        decoded = 0
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
    except MemoryError:
        # Every image is within the pixel limits, but memory ran short (other requests,
        # other processes): this request fails alone, answered, and the server goes on.
        tensors.clear()
        raise HTTPException(503, f"the server ran out of memory decoding {name}; retry "
                                 "later, or send fewer or smaller images",
                            headers={"Retry-After": "1"}) from None
    return torch.stack(tensors)
