"""The ``inca`` command line: a thin layer over the typed Python functions."""

from __future__ import annotations

import functools
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Any

import typer

from inca._files import FolderLock, check_writable, storage_error
from inca.errors import InCAError, user_message

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Adapt frozen vision backbones with parallel cross-attention adapters (InCA).",
)


def _print_version(value: bool) -> None:
    if value:
        from inca._version import __version__

        typer.echo(f"inca {__version__}")
        raise typer.Exit()


@app.callback()
def _app(version: Annotated[bool, typer.Option(
        "--version", callback=_print_version, is_eager=True,
        help="print inca's version and exit")] = False) -> None:
    """Adapt frozen vision backbones with parallel cross-attention adapters (InCA)."""


def context():
    """This process's place under torchrun (a group of one otherwise); imports torch."""
    from inca._distributed import context as ctx

    return ctx()


def _friendly(fn):
    """Print user-facing errors as one clear message (exit code 2), not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except InCAError as e:
            typer.secho(f"error: {user_message(e)}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.secho("interrupted; completed work is kept (re-run to resume)", err=True)
            raise typer.Exit(130) from None
        except OSError as e:  # disk full, read-only, permission: say so, no traceback
            err = storage_error(e, e.filename or "the output")
            if err is None:
                raise
            typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from None

    return wrapper


Device = Annotated[str, typer.Option(help="auto (CUDA when available, else cpu), cpu, cuda, "
                                            "cuda:N")]
Precision = Annotated[str, typer.Option(help="auto (bf16-mixed on a GPU, 32 on the CPU), 32, "
                                              "bf16-mixed, 16-mixed")]


BackboneDtype = Annotated[str, typer.Option(
    help="the backbone's weights: float32 (autocast computes in 16 bits), or bfloat16 / "
         "float16 held in 16 bits (frozen, so no float32 copy is needed: faster, half the "
         "memory)")]
NumWorkers = Annotated[
    int | None, typer.Option(help="data-loading workers (default: cores - 1, at most 8)")]
ImageColumn = Annotated[str | None, typer.Option(
    help="the images' column in a Hugging Face set or a manifest (default: the Image "
         "feature, or a column named image / path)")]
LabelColumn = Annotated[str | None, typer.Option(
    help="the labels' column (default: the ClassLabel feature, or a column named label / "
         "class); one class per sample")]
_DATA_HELP = ("fashion-mnist, digits, an image folder, a .csv/.jsonl manifest (path,label), "
              "hf:<folder or hub id>")
_DTYPES = ("float32", "bfloat16", "float16")


def _dtype(name: str):
    import torch

    if name not in _DTYPES:
        raise InCAError(f"unknown --backbone-dtype {name!r}; choose one of {', '.join(_DTYPES)}")
    return getattr(torch, name)


def _backbone_kwargs(input_size: int | None, pretrained: bool,
                     checkpoint: Path | None = None) -> dict:
    """The backbone's creation arguments, checked (cheaply) before any expensive work."""
    kw: dict = {"pretrained": pretrained}
    if input_size is not None:
        if input_size < 1:
            raise InCAError(f"--input-size must be positive, got {input_size}")
        kw["input_size"] = input_size
    if checkpoint is not None:
        if not checkpoint.expanduser().is_file():
            raise InCAError(f"--checkpoint {checkpoint}: no such file")
        kw["checkpoint_path"] = str(checkpoint.expanduser().resolve())
    return kw


Checkpoint = Annotated[Path | None, typer.Option(
    help="local weights file for a timm:/torchvision: backbone (a state_dict, or a "
         "checkpoint holding one), instead of the hub's")]


def _positive(**values: int | None) -> None:
    """Refuse a zero or negative count (``None``: not given) before any work."""
    for name, v in values.items():
        if v is not None and v < 1:
            raise InCAError(f"--{name.replace('_', '-')} must be at least 1, got {v}")


def _check_data(*specs: str | None) -> None:
    """A misspelt built-in data set (``fashion_mnist``) refused with the close match before
    any work; anything else is left to the data loader to read or refuse."""
    from inca._hints import did_you_mean
    from inca.data.builtin import list_datasets

    names = list_datasets()
    for spec in specs:
        if spec is None or spec in names or spec.startswith("hf:") or Path(spec).exists():
            continue
        hint = did_you_mean(spec, names)
        if hint:
            raise InCAError(f"unknown data set {spec!r}{hint}: not a built-in "
                            f"({', '.join(names)}) nor an existing folder or file")


def _choices(option: str, given: list[str], allowed: list[str]) -> None:
    """Refuse an unknown name with the close match and the choices."""
    from inca._hints import did_you_mean

    for name in given:
        if name not in allowed:
            raise InCAError(f"unknown {option} {name!r}{did_you_mean(name, allowed)}; "
                            f"choose from {', '.join(allowed)}")


@app.command("backbones")
@_friendly
def backbones_cmd() -> None:
    """List the bundled backbones and the sources of others."""
    from inca.backbones import list_backbones

    for entry in list_backbones():
        typer.echo(f"{entry['name']:<22} {entry['description']}")


@app.command("extract")
@_friendly
def extract_cmd(
    backbone: Annotated[str, typer.Option(help="e.g. dinov2_vits14, timm:<name>, hf:<path>")],
    data: Annotated[str, typer.Option(help=_DATA_HELP)],
    out: Annotated[Path, typer.Option(help="cache folder to write (resumed if interrupted)")],
    layers: Annotated[str, typer.Option(help="'all', 'last', or comma-separated names")] = "all",
    split: Annotated[str, typer.Option(help="data split: train, val or test")] = "train",
    limit: Annotated[int | None, typer.Option(help="use at most this many samples")] = None,
    batch_size: Annotated[int, typer.Option(help="images per backbone pass")] = 32,
    token_grid: Annotated[
        int | None, typer.Option(help="pool patch tokens to a GRIDxGRID grid (smaller cache)")
    ] = None,
    input_size: Annotated[int | None, typer.Option(help="image side fed to the backbone")] = None,
    dtype: Annotated[str, typer.Option(help="float16 or float32")] = "float16",
    skip_unreadable: Annotated[bool, typer.Option(help="skip unreadable images")] = False,
    image_column: ImageColumn = None,
    label_column: LabelColumn = None,
    pretrained: Annotated[bool, typer.Option(help="load pretrained weights (hub sources)")] = True,
    overwrite: Annotated[bool, typer.Option(help="replace a cache made differently")] = False,
    checkpoint: Checkpoint = None,
    num_workers: NumWorkers = None,
    device: Device = "auto",
    precision: Precision = "auto",
    backbone_dtype: BackboneDtype = "float32",
) -> None:
    """Extract many layers' tokens in one pass into a resumable activation cache."""
    from inca._precision import resolve_device, resolve_precision
    from inca.backbones import create_backbone
    from inca.data import load_dataset
    from inca.features import extract_to_cache

    # Every option checked before the backbone loads or a byte is extracted.
    _positive(limit=limit, batch_size=batch_size, token_grid=token_grid)
    _choices("--dtype", [dtype], ["float16", "float32"])
    _check_data(data)
    ctx = context()  # under torchrun, each rank extracts its shards into the same folder
    dev, bb_dtype = resolve_device(ctx.device(device)), _dtype(backbone_dtype)
    resolve_precision(precision, dev)
    bb_kwargs = _backbone_kwargs(input_size, pretrained, checkpoint)
    ds = load_dataset(data, split=split, limit=limit, skip_unreadable=skip_unreadable,
                      image_column=image_column, label_column=label_column)
    bb = create_backbone(backbone, device=dev, dtype=bb_dtype, **bb_kwargs)
    cache = extract_to_cache(
        bb, ds, out, layers=layers, batch_size=batch_size, token_grid=token_grid, dtype=dtype,
        overwrite=overwrite, num_workers=num_workers, precision=precision,
    )
    if ctx.is_main:
        print_cache_summary(cache)


def _json(text: str | None) -> dict:
    import json

    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise InCAError(f"--adapter-options is not valid JSON ({e}): {text!r}") from None
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise InCAError('--adapter-options must map kinds to settings, e.g. '
                        '{"inca:q4": {"num_queries": 4}}')
    return value


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise InCAError(f"expected comma-separated numbers, got {text!r}") from None


@app.command("fit")
@_friendly
def fit_cmd(
    backbone: Annotated[str, typer.Option(help="e.g. dinov2_vits14, timm:<name>, hf:<path>")],
    data: Annotated[str, typer.Option(help=_DATA_HELP)],
    out: Annotated[Path, typer.Option(help="run folder: task/, report.*, cache/")],
    layers: Annotated[str, typer.Option(help="'all', 'last', or comma-separated names")] = "all",
    kinds: Annotated[str, typer.Option(
        help="adapter kinds in the bank; kind:name is a variant set in --adapter-options")
    ] = "inca,linear",
    adapter_options: Annotated[str | None, typer.Option(
        help='adapter settings as JSON, per kind or variant, e.g. '
             '\'{"inca:q4": {"num_queries": 4}}\'')] = None,
    lrs: Annotated[str, typer.Option(help="learning-rate grid")] = "1e-3,3e-3",
    epochs: Annotated[int, typer.Option(help="passes over the training data")] = 15,
    batch_size: Annotated[int, typer.Option(help="samples per step")] = 64,
    limit: Annotated[int | None, typer.Option(help="use at most this many training samples")]
    = None,
    test_limit: Annotated[
        int | None, typer.Option(help="evaluate on this many test samples (0: none)")
    ] = None,
    val_fraction: Annotated[float, typer.Option(help="share held out for selection")] = 0.15,
    val_data: Annotated[str | None, typer.Option(
        help="validation data for selection (default: the data's val/validation split or "
             "folder, else --val-fraction of the training data)")] = None,
    test_data: Annotated[str | None, typer.Option(
        help="test data, reported only (default: the data's test split, if any)")] = None,
    image_column: ImageColumn = None,
    label_column: LabelColumn = None,
    mode: Annotated[str, typer.Option(
        help="auto (cache when it fits --cache-budget-gb and pays off), cached or streaming")
    ] = "auto",
    augment: Annotated[str, typer.Option(
        help="augmentation of training images (streams): none, crop, or crop-flip (not for "
             "data whose orientation is the label)")] = "none",
    cache_budget_gb: Annotated[float, typer.Option(help="largest cache --mode auto writes")]
    = 64.0,
    ensemble_k: Annotated[int, typer.Option(help="top-k ensemble size")] = 3,
    select_by: Annotated[str, typer.Option(
        help="validation measure that picks epochs and adapters: loss (cross-entropy, "
             "steadier on small validation sets) or accuracy")]
    = "loss",
    soup: Annotated[bool, typer.Option(help="also try weight-averaged soups")] = False,
    token_grid: Annotated[int | None, typer.Option(help="pool patch tokens to a grid")] = None,
    input_size: Annotated[int | None, typer.Option(help="image side fed to the backbone")] = None,
    seed: Annotated[int, typer.Option(help="seed of splits, init and batch order")] = 0,
    patience: Annotated[int, typer.Option(help="early-stopping patience (epochs)")] = 5,
    skip_unreadable: Annotated[bool, typer.Option(help="skip unreadable images")] = False,
    pretrained: Annotated[bool, typer.Option(help="load pretrained weights (hub sources)")] = True,
    overwrite: Annotated[bool, typer.Option(
        help="replace the task and report that an earlier run left in --out (its caches "
             "are reused when they match, replaced when made differently)")] = False,
    checkpoint: Checkpoint = None,
    num_workers: NumWorkers = None,
    device: Device = "auto",
    precision: Precision = "auto",
    backbone_dtype: BackboneDtype = "float32",
) -> None:
    """Train a bank of adapters in parallel, select on validation, save the task and report."""
    from inca.adapters import list_adapters
    from inca.training import FitConfig

    # Every option checked before the backbone loads or a byte is extracted.
    kind_list = [k.strip() for k in kinds.split(",") if k.strip()]
    _choices("--kinds kind", [k.split(":", 1)[0] for k in kind_list],
             [a["name"] for a in list_adapters()])
    _positive(limit=limit, test_limit=None if test_limit == 0 else test_limit)
    _check_data(data, val_data, test_data)
    config = FitConfig(
        layers=layers, kinds=tuple(kind_list),
        lrs=_floats(lrs), epochs=epochs, batch_size=batch_size, val_fraction=val_fraction,
        mode=mode, augment=augment, cache_budget_gb=cache_budget_gb, ensemble_k=ensemble_k,
        soup=soup, token_grid=token_grid, seed=seed, select_by=select_by,
        patience=patience, precision=precision, adapter_options=_json(adapter_options),
    )
    from inca._precision import resolve_device

    ctx = context()  # under torchrun: this rank's place; rank 0 writes the results
    dev, dtype = resolve_device(ctx.device(device)), _dtype(backbone_dtype)  # checked early
    bb_kwargs = _backbone_kwargs(input_size, pretrained, checkpoint)
    _check_no_task(out, overwrite)
    check_writable(out)  # before hours of work whose result could not be saved
    with FolderLock(out, "run folder") if ctx.is_main else nullcontext():
        _fit_into(out, backbone, data, config, dev, dtype, input_size, pretrained, limit,
                  test_limit, val_data, val_fraction, skip_unreadable, seed, num_workers,
                  test_data, {"image_column": image_column, "label_column": label_column},
                  bb_kwargs=bb_kwargs, overwrite=overwrite)


def _fit_replacing(run: Any, cache_root: Path, overwrite: bool) -> Any:
    """``run()``; with --overwrite, a cache in the run folder made differently (another
    backbone, data or layers) is removed and the fit run again (it stops at once, before
    extracting, when it finds one); a cache that matches is reused."""
    from inca.errors import CacheError

    try:
        return run()
    except CacheError as e:
        made_differently = "made differently" in str(e) or "holds no cache" in str(e)
        if not (overwrite and made_differently and cache_root.is_dir()):
            raise
    import shutil

    ctx = context()
    if ctx.is_main:  # one rank removes; the others wait for it
        typer.echo(f"--overwrite: replacing the caches in {cache_root}, made differently")
        shutil.rmtree(cache_root)
    ctx.barrier()
    return run()


def _check_no_task(out: Path, overwrite: bool) -> None:
    """Refuse to replace the task of an earlier, finished run unless asked to
    (--overwrite). A run interrupted before its report was written is not finished: the
    same command completes it."""
    task = out / "task"
    finished = (out / "report.json").is_file()  # the run's last file
    if not overwrite and finished and task.is_dir() and any(task.iterdir()):
        raise InCAError(f"{out} already holds a fitted task ({task}); pass --overwrite to "
                        "replace it, or choose another --out")


def _fit_into(out: Path, backbone: str, data: str, config: Any, dev: Any, dtype: Any,
              input_size: int | None, pretrained: bool, limit: int | None,
              test_limit: int | None, val_data: str | None, val_fraction: float,
              skip_unreadable: bool, seed: int, num_workers: int | None,
              test_data: str | None = None, columns: dict | None = None, *,
              bb_kwargs: dict | None = None, overwrite: bool = False) -> None:
    """``inca fit`` once its run folder is locked."""
    from inca.backbones import create_backbone
    from inca.data import has_split, load_dataset
    from inca.training import fit

    columns = {**(columns or {}), "skip_unreadable": skip_unreadable}
    train = load_dataset(data, split="train", limit=limit, seed=seed, **columns)
    val = None
    if val_data is not None:
        val = load_dataset(val_data, split="val", **columns)
    elif has_split(data, "val"):  # a val/ folder, a validation split
        val = load_dataset(data, split="val", **columns)
    say = typer.echo if context().is_main else (lambda *_: None)
    say(f"validation: {val.name} ({len(val)} images)" if val is not None else
        f"validation: {val_fraction:.0%} of the training data, stratified")
    test = None
    if test_limit != 0 and (test_data is not None or has_split(data, "test")):
        try:
            test = load_dataset(test_data or data, split="test", limit=test_limit, seed=seed,
                                **columns)
        except InCAError as e:
            if test_data is not None:
                raise
            say(f"no test split evaluated ({e})")  # e.g. a hub test split without labels
    elif test_limit != 0:
        say(f"no test split evaluated ({data} has none; pass --test-data)")
    # the data first: a misspelt name or folder costs no backbone download
    bb = create_backbone(backbone, device=dev, dtype=dtype,
                         **(bb_kwargs or _backbone_kwargs(input_size, pretrained)))
    task = _fit_replacing(lambda: fit(bb, train, val, test=test, config=config,
                                      cache_dir=out / "cache", num_workers=num_workers,
                                      device=dev), out / "cache", overwrite)
    if not context().is_main:
        return  # every rank holds the same task; rank 0 writes it
    task.save(out / "task")
    files = task.report.write(out)
    say(task.report.to_markdown())
    say(f"task saved to {out / 'task'}; report: {files['markdown']}, {files['plot']}")


@app.command("predict")
@_friendly
def predict_cmd(
    images: Annotated[list[Path], typer.Argument(help="image files")],
    task: Annotated[list[Path], typer.Option(help="task folder(s) written by inca fit")],
    top_k: Annotated[int, typer.Option(help="labels shown per image")] = 3,
    backbone: Annotated[str | None, typer.Option(
        help="create the backbone from this instead of the tasks' record (e.g. the same "
             "weights elsewhere: hf:<folder>); it must have the weights the tasks were "
             "trained on")] = None,
    checkpoint: Annotated[Path | None, typer.Option(
        help="local weights file for the backbone (timm), instead of the recorded one")]
    = None,
    device: Device = "auto",
    precision: Precision = "auto",
    backbone_dtype: BackboneDtype = "float32",
) -> None:
    """Predict labels and probabilities of images with one or more fitted tasks.

    Several tasks share one backbone pass (they must have been trained on the same
    backbone weights). The backbone is created as the tasks record it (local paths are
    absolute; no download for local or --no-pretrained backbones), or from --backbone.
    """
    from inca.runtime import MultiTaskModel

    model = MultiTaskModel.from_paths(
        list(task), backbone, device=device, precision=precision, dtype=_dtype(backbone_dtype),
        **({"checkpoint_path": str(checkpoint.resolve())} if checkpoint else {}))
    for name, per_image in model.predict([str(p) for p in images], top_k=top_k).items():
        typer.echo(f"task {name}:")
        for img, top in zip(images, per_image, strict=True):
            typer.echo(f"  {img}: " + ", ".join(f"{label} {p:.3f}" for label, p in top))


@app.command("serve")
@_friendly
def serve_cmd(
    task: Annotated[list[Path], typer.Option(help="task folder(s) written by inca fit")],
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 8000,
    max_batch: Annotated[int, typer.Option(help="most images per backbone pass")] = 32,
    max_wait_ms: Annotated[float, typer.Option(help="batching wait for the first request")]
    = 5.0,
    batching: Annotated[bool, typer.Option(help="batch concurrent requests")] = True,
    max_upload_mb: Annotated[float, typer.Option(help="largest request body (413 above)")]
    = 10.0,
    max_images: Annotated[int, typer.Option(help="most images per request (413 above)")] = 64,
    max_image_megapixels: Annotated[float, typer.Option(
        help="largest image, width x height, checked before decoding (413 above: "
             "decompression bombs)")] = 40.0,
    max_request_megapixels: Annotated[float, typer.Option(
        help="most pixels of all images of one request together (413 above)")] = 160.0,
    api_key: Annotated[str | None, typer.Option(
        envvar="INCA_API_KEY", help="require this X-API-Key header (an empty key is refused)")
    ] = None,
    backbone: Annotated[str | None, typer.Option(
        help="create the backbone from this instead of the tasks' record (e.g. the same "
             "weights elsewhere: hf:<folder>); it must have the weights the tasks were "
             "trained on")] = None,
    checkpoint: Annotated[Path | None, typer.Option(
        help="local weights file for the backbone (timm), instead of the recorded one")]
    = None,
    device: Device = "auto",
    precision: Precision = "auto",
    backbone_dtype: BackboneDtype = "float32",
) -> None:
    """Serve tasks over HTTP: POST /predict, GET /tasks, GET /health (docs at /docs)."""
    import os

    from inca._hints import require

    uvicorn = require("uvicorn", purpose="inca serve")
    require("fastapi", purpose="inca serve")
    from inca.runtime import MultiTaskModel
    from inca.runtime.server import ServerConfig, create_app

    if api_key is None and os.environ.get("INCA_API_KEY") is not None:
        # click reads an empty variable as unset: say so rather than serve without a key
        raise InCAError("INCA_API_KEY is set but empty, which would serve without "
                        "authentication; set it to the key, or unset it to serve without one")
    config = ServerConfig(  # checked before the (slow) model loading
        max_batch=max_batch, max_wait_ms=max_wait_ms, batching=batching,
        max_upload_bytes=int(max_upload_mb * 2**20), max_images=max_images,
        max_image_pixels=int(max_image_megapixels * 1e6),
        max_request_pixels=int(max_request_megapixels * 1e6), api_key=api_key)
    model = MultiTaskModel.from_paths(
        list(task), backbone, device=device, precision=precision, dtype=_dtype(backbone_dtype),
        **({"checkpoint_path": str(checkpoint.resolve())} if checkpoint else {}))
    auth = "X-API-Key required" if api_key is not None else "no API key"
    typer.echo(f"serving {', '.join(model.tasks)} on http://{host}:{port} ({auth}; "
               "docs: /docs)")
    _check_port(host, port)
    uvicorn.run(create_app(model, config), host=host, port=port, log_level="warning")


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


@app.command("compare")
@_friendly
def compare_cmd(
    backbone: Annotated[str, typer.Option(help="e.g. dinov2_vits14, timm:<name>, hf:<path>")],
    data: Annotated[str, typer.Option(help="data with train and test splits")],
    out: Annotated[Path, typer.Option(help="folder for compare.{json,md,png}")],
    methods: Annotated[str, typer.Option(help="full,last,lora,linear,multilayer,inca")]
    = "full,last,lora,linear,multilayer,inca",
    epochs: Annotated[int, typer.Option(help="epoch budget of every method")] = 3,
    limit: Annotated[int | None, typer.Option(help="training samples")] = 2000,
    test_limit: Annotated[int | None, typer.Option(help="test samples")] = 1000,
    seeds: Annotated[int, typer.Option(help="seeds of the probes and InCA")] = 3,
    expensive_seeds: Annotated[int, typer.Option(help="seeds of full/last/LoRA")] = 1,
    batch_size: Annotated[int, typer.Option(help="batch size of every method")] = 32,
    lrs: Annotated[str, typer.Option(help="lr grid of the probes and InCA")] = "1e-3,3e-3",
    input_size: Annotated[int | None, typer.Option(help="image side")] = None,
    token_grid: Annotated[int | None, typer.Option(help="pool patch tokens to a grid")] = None,
    equal_time: Annotated[bool, typer.Option(
        help="also give the probes and InCA full fine-tuning's wall time")] = False,
    time_fraction: Annotated[float, typer.Option(
        help="share of full fine-tuning's time an equal-time run gets")] = 1.0,
    max_epochs: Annotated[int, typer.Option(help="most epochs of an equal-time run")] = 30,
    pretrained: Annotated[bool, typer.Option(help="load pretrained weights (hub sources)")] = True,
    checkpoint: Checkpoint = None,
    device: Device = "auto",
    precision: Precision = "auto",
) -> None:
    """Compare InCA with full/last-layer fine-tuning, LoRA and probes: one table, one run.

    A method that fails does not stop the others: the table and compare.json hold what
    finished and list each failure with its error (the exit code is then 1).
    """
    from inca.baselines.compare import CompareConfig, run_compare, to_markdown, write

    checkpoint_path = _backbone_kwargs(None, True, checkpoint).get("checkpoint_path")
    _check_data(data)
    config = CompareConfig(
        backbone=backbone, data=data, methods=tuple(m.strip() for m in methods.split(",")),
        epochs=epochs, limit=limit, test_limit=test_limit, seeds=seeds,
        expensive_seeds=expensive_seeds, batch_size=batch_size, lrs=_floats(lrs),
        input_size=input_size, token_grid=token_grid, device=device, precision=precision,
        equal_time=equal_time, time_fraction=time_fraction, max_epochs=max_epochs,
        checkpoint_path=checkpoint_path, pretrained=pretrained)
    check_writable(out)  # before hours of work whose table could not be saved
    result = run_compare(config)
    files = write(result, out, command=" ".join(["inca", *sys.argv[1:]]))
    typer.echo(to_markdown(result))
    typer.echo(f"wrote {files['markdown']}, {files['json']}, {files['plot']}")
    if result["failures"]:
        failed = sorted({f["method"] for f in result["failures"]})
        typer.secho(f"error: {len(result['failures'])} run(s) failed ({', '.join(failed)}); "
                    f"the others' results are in {files['markdown']}", fg=typer.colors.RED,
                    err=True)
        raise typer.Exit(1)


def print_cache_summary(cache) -> None:
    """A per-layer table of what a cache holds."""
    import numpy as np

    m = cache.manifest
    typer.echo(
        f"\ncache {cache.path}: {len(cache)} samples of {m['dataset_name']} "
        f"({len(cache.classes)} classes) through {m['backbone']} "
        f"[{m['fingerprint']}] at {m['preprocessing']['input_size']} px, {m['dtype']}"
    )
    sample = np.arange(min(len(cache), 64))
    typer.echo(f"{'layer':<16}{'tokens':>8}{'dim':>6}{'KiB/img':>9}{'mean |x|':>10}{'std':>9}")
    for layer in cache.layers:
        n, d = cache.token_shape(layer)
        x = cache.get_numpy(layer, sample).astype(np.float32)
        kib = n * d * np.dtype(m["dtype"]).itemsize / 1024
        typer.echo(
            f"{layer:<16}{n:>8}{d:>6}{kib:>9.1f}{np.abs(x).mean():>10.3f}{x.std():>9.3f}"
        )
    total = cache.nbytes()
    typer.echo(
        f"total {total / 2**20:.1f} MiB on disk, {total / max(len(cache), 1) / 1024:.1f} KiB "
        "per image"
    )


def main() -> None:
    """Console entry point."""
    try:
        app()
    except InCAError as e:  # pragma: no cover - commands catch their own
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        sys.exit(2)


if __name__ == "__main__":  # pragma: no cover
    main()
