"""``inca predict`` and ``inca serve``: fitted tasks sharing one backbone pass."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated

import typer

from inca._choices import DEFAULT_PRECISION
from inca.cli._app import app, friendly
from inca.cli._config import config_option, extra_fields
from inca.cli._options import (
    OUTPUT,
    BackboneDtype,
    Device,
    Precision,
    TaskBackbone,
    TaskCheckpoint,
    TaskFolders,
    config_default,
    torch_dtype,
)
from inca.errors import InCAError
from inca.runtime.config import ServerConfig

_serve_default = functools.partial(config_default, ServerConfig)  # defaults live there
ServerConfigFile = config_option(ServerConfig)
# ServerConfig's fields that a serve option sets under another name, and how many of the
# field's units make one of the option's; the other options are named as their fields. A
# --config file may set either; an option given on the command line wins over both.
_RENAMED = {"max_upload_bytes": ("max_upload_mb", 2**20),
            "max_image_pixels": ("max_image_megapixels", 10**6),
            "max_request_pixels": ("max_request_megapixels", 10**6),
            "header_timeout_s": ("header_timeout", 1), "body_timeout_s": ("body_timeout", 1),
            "request_timeout_s": ("request_timeout", 1), "drain_timeout_s": ("drain_timeout", 1)}


def _option_default(field: str) -> float:
    """The default of the option that sets ``field`` (:data:`_RENAMED`), in its units."""
    return _serve_default(field) / _RENAMED[field][1]


SERVER, BATCHING, LIMITS, TIMEOUTS = "Server", "Batching", "Request limits", "Timeouts"


def _model(task: list[Path], backbone: str | None, checkpoint: Path | None, device: str,
           precision: str, backbone_dtype: str):
    """The tasks' multi-task model, its backbone as they record it or from ``backbone``."""
    from inca.runtime import MultiTaskModel

    return MultiTaskModel.from_paths(
        list(task), backbone, device=device, precision=precision,
        dtype=torch_dtype(backbone_dtype),
        **({"checkpoint_path": str(checkpoint.resolve())} if checkpoint else {}))


def image_files(paths: list[Path]) -> list[Path]:
    """The files given, each folder replaced by the images under it (sorted, hidden files
    and folders left out, as data sets read them)."""
    from inca.data.folders import images_under

    return [f for p in paths for f in (images_under(p) if p.is_dir() else [p])]


_PREDICT_CHUNK = 64  # images opened and predicted at a time: a large folder streams


@app.command("predict")
@friendly
def predict_cmd(
    images: Annotated[list[Path], typer.Argument(help="image files or folders of images")],
    task: TaskFolders,
    top_k: Annotated[int, typer.Option(help="labels shown per image", rich_help_panel=OUTPUT)] = 3,
    json_lines: Annotated[bool, typer.Option(
        "--json", help="one JSON object per image: {image, tasks: {task: [{label, "
        "probability}]}} or {image, error}", rich_help_panel=OUTPUT)] = False,
    backbone: TaskBackbone = None,
    checkpoint: TaskCheckpoint = None,
    device: Device = "auto",
    precision: Precision = DEFAULT_PRECISION,
    backbone_dtype: BackboneDtype = "float32",
) -> None:
    """Predict labels and probabilities of images with one or more fitted tasks.

    Several tasks share one backbone pass (they must have been trained on the same
    backbone weights). The backbone is created as the tasks record it (local paths are
    absolute; no download for local or --no-pretrained backbones), or from --backbone.
    An image that cannot be read is reported and the others are predicted; the exit code
    is then 1.
    """
    import json

    from inca.task.inputs import open_one

    files = image_files(images)
    if not files:
        raise InCAError(f"no images in {', '.join(map(str, images))}: give image files or "
                        "folders holding them")
    model = _model(task, backbone, checkpoint, device, precision, backbone_dtype)
    failed = 0
    for start in range(0, len(files), _PREDICT_CHUNK):
        opened, errors = [], {}
        for f in files[start:start + _PREDICT_CHUNK]:
            try:
                opened.append((f, open_one(str(f))))
            except InCAError as e:
                errors[f] = str(e)
        answers = model.predict([im for _, im in opened], top_k=top_k) if opened else {}
        good = {f: i for i, (f, _) in enumerate(opened)}
        for f in files[start:start + _PREDICT_CHUNK]:
            if f in errors:
                failed += 1
                if json_lines:
                    typer.echo(json.dumps({"image": str(f), "error": errors[f]}))
                else:
                    typer.echo(f"error: {errors[f]}", err=True)
                continue
            per_task = {name: per_image[good[f]] for name, per_image in answers.items()}
            if json_lines:
                typer.echo(json.dumps({"image": str(f), "tasks": {
                    name: [{"label": label, "probability": p} for label, p in top]
                    for name, top in per_task.items()}}))
            else:
                for name, top in per_task.items():  # the task named when there are several
                    typer.echo(f"{f}: " + (f"[{name}] " if len(per_task) > 1 else "")
                               + ", ".join(f"{label} {p:.3f}" for label, p in top))
    if failed:
        typer.echo(f"{failed} of {len(files)} images could not be read", err=True)
        raise typer.Exit(1)


@app.command("serve")
@friendly
def serve_cmd(
    ctx: typer.Context,
    *,
    config_file: ServerConfigFile = None,
    task: TaskFolders,
    host: Annotated[str, typer.Option(help="address to listen on",
                                      rich_help_panel=SERVER)] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on", rich_help_panel=SERVER)] = 8000,
    max_batch: Annotated[int, typer.Option(help="most images per backbone pass",
                                           rich_help_panel=BATCHING)]
    = _serve_default("max_batch"),
    max_wait_ms: Annotated[float, typer.Option(help="batching wait for the first request",
                                               rich_help_panel=BATCHING)]
    = _serve_default("max_wait_ms"),
    batching: Annotated[bool, typer.Option(help="batch concurrent requests",
                                           rich_help_panel=BATCHING)]
    = _serve_default("batching"),
    max_upload_mb: Annotated[float, typer.Option(help="largest request body (413 above)",
                                                 rich_help_panel=LIMITS)]
    = _option_default("max_upload_bytes"),
    max_images: Annotated[int, typer.Option(help="most images per request (413 above)",
                                            rich_help_panel=LIMITS)]
    = _serve_default("max_images"),
    max_image_megapixels: Annotated[float, typer.Option(
        help="largest image, width x height, checked before decoding (413 above: "
             "decompression bombs)", rich_help_panel=LIMITS)]
    = _option_default("max_image_pixels"),
    max_request_megapixels: Annotated[float, typer.Option(
        help="most pixels of all images of one request together (413 above)",
        rich_help_panel=LIMITS)]
    = _option_default("max_request_pixels"),
    api_key: Annotated[str | None, typer.Option(
        envvar="INCA_API_KEY", help="require this X-API-Key header on everything but /livez "
        "(an empty key is refused)", rich_help_panel=SERVER)] = None,
    max_connections: Annotated[int, typer.Option(
        help="most open connections (503 and closed past it)", rich_help_panel=SERVER)]
    = _serve_default("max_connections"),
    header_timeout: Annotated[float, typer.Option(
        help="seconds for a request's headers to arrive (408 and closed after)",
        rich_help_panel=TIMEOUTS)]
    = _option_default("header_timeout_s"),
    body_timeout: Annotated[float, typer.Option(
        help="seconds for a request's body to arrive after its headers (408 after)",
        rich_help_panel=TIMEOUTS)]
    = _option_default("body_timeout_s"),
    request_timeout: Annotated[float, typer.Option(
        help="seconds to answer a request after its headers (503 after)", rich_help_panel=TIMEOUTS)]
    = _option_default("request_timeout_s"),
    drain_timeout: Annotated[float, typer.Option(
        help="on SIGTERM, seconds to answer requests in flight before exiting",
        rich_help_panel=TIMEOUTS)]
    = _option_default("drain_timeout_s"),
    max_queue_images: Annotated[int, typer.Option(
        help="most images waiting for the model (503 with Retry-After past it)",
        rich_help_panel=BATCHING)]
    = _serve_default("max_queue_images"),
    decode_threads: Annotated[int, typer.Option(help="threads decoding images",
                                                rich_help_panel=BATCHING)]
    = _serve_default("decode_threads"),
    backbone: TaskBackbone = None,
    checkpoint: TaskCheckpoint = None,
    device: Device = "auto",
    precision: Precision = DEFAULT_PRECISION,
    backbone_dtype: BackboneDtype = "float32",
) -> None:
    """Serve tasks over HTTP: POST /predict, GET /tasks, /health, /livez, /readyz, /metrics
    (docs at /docs). SIGTERM drains: in-flight requests are answered, then it exits."""
    import os

    from inca._hints import require

    for module in ("uvicorn", "fastapi", "prometheus_client"):
        require(module, "serve", purpose="inca serve")
    from inca.runtime.server import ServerConfig, create_app
    from inca.runtime.transport import serve

    if api_key is None and os.environ.get("INCA_API_KEY") is not None:
        # click reads an empty variable as unset: say so rather than serve without a key
        raise InCAError("INCA_API_KEY is set but empty, which would serve without "
                        "authentication; set it to the key, or unset it to serve without one")
    fields = ServerConfig.__dataclass_fields__
    settings = {k: v for k, v in ctx.params.items() if k in fields}  # options named as fields
    for field, (option, unit) in _RENAMED.items():
        value = ctx.params[option] * unit
        settings[field] = int(value) if type(fields[field].default) is int else value
    for name, value in extra_fields(ctx).items():  # --config's fields (cheap_pixels, ...)
        option = _RENAMED[name][0] if name in _RENAMED else None
        # (by name: typer carries its own copy of click's ParameterSource)
        if option is None or ctx.get_parameter_source(option).name == "DEFAULT":
            settings[name] = value
    config = ServerConfig(**settings)  # checked before the (slow) model loading
    model = _model(task, backbone, checkpoint, device, precision, backbone_dtype)
    auth = "X-API-Key required" if api_key is not None else "no API key"
    typer.echo(f"serving {', '.join(model.tasks)} on http://{host}:{port} ({auth}; "
               "docs: /docs)")
    _check_port(host, port)
    serve(create_app(model, config), host=host, port=port)


def _check_port(host: str, port: int) -> None:
    """Refuse a port another program listens on, with the fix (uvicorn would log an error
    and exit)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise InCAError(f"cannot resolve --host {host!r}: {e}") from None
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            raise InCAError(f"cannot listen on {host}:{port} ({e.strerror}): another program "
                            "uses that port; choose another --port or stop it") from None
