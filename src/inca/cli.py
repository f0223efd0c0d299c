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
_DTYPES = ("float32", "bfloat16", "float16")


def _dtype(name: str):
    import torch

    if name not in _DTYPES:
        raise InCAError(f"unknown --backbone-dtype {name!r}; choose one of {', '.join(_DTYPES)}")
    return getattr(torch, name)


def _backbone_kwargs(input_size: int | None, pretrained: bool) -> dict:
    kw: dict = {"pretrained": pretrained}
    if input_size is not None:
        kw["input_size"] = input_size
    return kw


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
    data: Annotated[str, typer.Option(help="fashion-mnist, digits, an image folder, hf:<path>")],
    out: Annotated[Path, typer.Option(help="cache folder to write (resumed if interrupted)")],
    layers: Annotated[str, typer.Option(help="'all', 'last', or comma-separated names")] = "all",
    split: Annotated[str, typer.Option(help="data split: train or test")] = "train",
    limit: Annotated[int | None, typer.Option(help="use at most this many samples")] = None,
    batch_size: Annotated[int, typer.Option(help="images per backbone pass")] = 32,
    token_grid: Annotated[
        int | None, typer.Option(help="pool patch tokens to a GRIDxGRID grid (smaller cache)")
    ] = None,
    input_size: Annotated[int | None, typer.Option(help="image side fed to the backbone")] = None,
    dtype: Annotated[str, typer.Option(help="float16 or float32")] = "float16",
    skip_unreadable: Annotated[bool, typer.Option(help="skip unreadable images")] = False,
    pretrained: Annotated[bool, typer.Option(help="load pretrained weights (hub sources)")] = True,
    overwrite: Annotated[bool, typer.Option(help="replace a cache made differently")] = False,
    num_workers: NumWorkers = None,
    device: Device = "auto",
    precision: Precision = "auto",
    backbone_dtype: BackboneDtype = "float32",
) -> None:
    """Extract many layers' tokens in one pass into a resumable activation cache."""
    from inca._precision import resolve_device
    from inca.backbones import create_backbone
    from inca.data import load_dataset
    from inca.features import extract_to_cache

    ctx = context()  # under torchrun, each rank extracts its shards into the same folder
    bb = create_backbone(backbone, device=resolve_device(ctx.device(device)),
                         dtype=_dtype(backbone_dtype), **_backbone_kwargs(input_size, pretrained))
    ds = load_dataset(data, split=split, limit=limit, skip_unreadable=skip_unreadable)
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
    data: Annotated[str, typer.Option(help="fashion-mnist, digits, an image folder, hf:<path>")],
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
        help="validation data for selection (default: a val/ folder beside train/, else "
             "--val-fraction of the training data)")] = None,
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
    num_workers: NumWorkers = None,
    device: Device = "auto",
    precision: Precision = "auto",
    backbone_dtype: BackboneDtype = "float32",
) -> None:
    """Train a bank of adapters in parallel, select on validation, save the task and report."""
    from inca.training import FitConfig

    config = FitConfig(
        layers=layers, kinds=tuple(k.strip() for k in kinds.split(",") if k.strip()),
        lrs=_floats(lrs), epochs=epochs, batch_size=batch_size, val_fraction=val_fraction,
        mode=mode, augment=augment, cache_budget_gb=cache_budget_gb, ensemble_k=ensemble_k,
        soup=soup, token_grid=token_grid, seed=seed, select_by=select_by,
        patience=patience, precision=precision, adapter_options=_json(adapter_options),
    )
    from inca._precision import resolve_device

    ctx = context()  # under torchrun: this rank's place; rank 0 writes the results
    dev, dtype = resolve_device(ctx.device(device)), _dtype(backbone_dtype)  # checked early
    check_writable(out)  # before hours of work whose result could not be saved
    with FolderLock(out, "run folder") if ctx.is_main else nullcontext():
        _fit_into(out, backbone, data, config, dev, dtype, input_size, pretrained, limit,
                  test_limit, val_data, val_fraction, skip_unreadable, seed, num_workers)


def _fit_into(out: Path, backbone: str, data: str, config: Any, dev: Any, dtype: Any,
              input_size: int | None, pretrained: bool, limit: int | None,
              test_limit: int | None, val_data: str | None, val_fraction: float,
              skip_unreadable: bool, seed: int, num_workers: int | None) -> None:
    """``inca fit`` once its run folder is locked."""
    from inca.backbones import create_backbone
    from inca.data import load_dataset
    from inca.training import fit

    bb = create_backbone(backbone, device=dev, dtype=dtype,
                         **_backbone_kwargs(input_size, pretrained))
    train = load_dataset(data, split="train", limit=limit, skip_unreadable=skip_unreadable,
                         seed=seed)
    val = None
    if val_data is not None:
        val = load_dataset(val_data, split="val", skip_unreadable=skip_unreadable)
    elif (Path(data) / "val").is_dir() and (Path(data) / "train").is_dir():
        val = load_dataset(data, split="val", skip_unreadable=skip_unreadable)
    say = typer.echo if context().is_main else (lambda *_: None)
    say(f"validation: {val.name} ({len(val)} images)" if val is not None else
        f"validation: {val_fraction:.0%} of the training data, stratified")
    test = None
    if test_limit != 0:
        try:
            test = load_dataset(data, split="test", limit=test_limit,
                                skip_unreadable=skip_unreadable, seed=seed)
        except InCAError as e:
            say(f"no test split evaluated ({e})")
    task = fit(bb, train, val, test=test, config=config, cache_dir=out / "cache",
               num_workers=num_workers, device=dev)
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
    device: Device = "auto",
    precision: Precision = "auto",
    backbone_dtype: BackboneDtype = "float32",
) -> None:
    """Predict labels and probabilities of images with one or more fitted tasks.

    Several tasks share one backbone pass (they must have been trained on the same
    backbone weights).
    """
    from inca.runtime import MultiTaskModel

    model = MultiTaskModel.from_paths(list(task), device=device, precision=precision,
                                      dtype=_dtype(backbone_dtype))
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
    device: Device = "auto",
    precision: Precision = "auto",
    backbone_dtype: BackboneDtype = "float32",
) -> None:
    """Serve tasks over HTTP: POST /predict, GET /tasks, GET /health (docs at /docs)."""
    import os

    import uvicorn

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
    model = MultiTaskModel.from_paths(list(task), device=device, precision=precision,
                                      dtype=_dtype(backbone_dtype))
    auth = "X-API-Key required" if api_key is not None else "no API key"
    typer.echo(f"serving {', '.join(model.tasks)} on http://{host}:{port} ({auth}; "
               "docs: /docs)")
    uvicorn.run(create_app(model, config), host=host, port=port, log_level="warning")


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
    device: Device = "auto",
    precision: Precision = "auto",
) -> None:
    """Compare InCA with full/last-layer fine-tuning, LoRA and probes: one table, one run."""
    from inca.baselines.compare import CompareConfig, run_compare, to_markdown, write

    config = CompareConfig(
        backbone=backbone, data=data, methods=tuple(m.strip() for m in methods.split(",")),
        epochs=epochs, limit=limit, test_limit=test_limit, seeds=seeds,
        expensive_seeds=expensive_seeds, batch_size=batch_size, lrs=_floats(lrs),
        input_size=input_size, token_grid=token_grid, device=device, precision=precision,
        equal_time=equal_time, time_fraction=time_fraction, max_epochs=max_epochs)
    result = run_compare(config)
    files = write(result, out, command=" ".join(["inca", *sys.argv[1:]]))
    typer.echo(to_markdown(result))
    typer.echo(f"wrote {files['markdown']}, {files['json']}, {files['plot']}")


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
