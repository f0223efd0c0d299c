"""``inca backbones`` and ``inca extract``: what can be read, and reading it into a cache."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from inca.cli._app import app, context, friendly
from inca.cli._options import (
    BackboneDtype,
    BackboneSpec,
    Checkpoint,
    Data,
    Device,
    ImageColumn,
    InputSize,
    LabelColumn,
    Layers,
    NumWorkers,
    Precision,
    Pretrained,
    SkipUnreadable,
    TokenGrid,
    backbone_kwargs,
    check_choices,
    check_data,
    check_positive,
    torch_dtype,
)


@app.command("backbones")
@friendly
def backbones_cmd() -> None:
    """List the bundled backbones and the sources of others."""
    from inca.backbones import list_backbones

    for entry in list_backbones():
        typer.echo(f"{entry['name']:<22} {entry['description']}")


@app.command("extract")
@friendly
def extract_cmd(
    backbone: BackboneSpec,
    data: Data,
    out: Annotated[Path, typer.Option(help="cache folder to write (resumed if interrupted)")],
    layers: Layers = "all",
    split: Annotated[str, typer.Option(help="data split: train, val or test")] = "train",
    limit: Annotated[int | None, typer.Option(help="use at most this many samples")] = None,
    batch_size: Annotated[int, typer.Option(help="images per backbone pass")] = 32,
    token_grid: TokenGrid = None,
    input_size: InputSize = None,
    dtype: Annotated[str, typer.Option(help="float16 or float32")] = "float16",
    skip_unreadable: SkipUnreadable = False,
    image_column: ImageColumn = None,
    label_column: LabelColumn = None,
    pretrained: Pretrained = True,
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
    check_positive(limit=limit, batch_size=batch_size, token_grid=token_grid)
    check_choices("--dtype", [dtype], ["float16", "float32"])
    check_data(data)
    ctx = context()  # under torchrun, each rank extracts its shards into the same folder
    dev, bb_dtype = resolve_device(ctx.device(device)), torch_dtype(backbone_dtype)
    resolve_precision(precision, dev)
    bb_kwargs = backbone_kwargs(input_size, pretrained, checkpoint)
    ds = load_dataset(data, split=split, limit=limit, skip_unreadable=skip_unreadable,
                      image_column=image_column, label_column=label_column)
    bb = create_backbone(backbone, device=dev, dtype=bb_dtype, **bb_kwargs)
    cache = extract_to_cache(
        bb, ds, out, layers=layers, batch_size=batch_size, token_grid=token_grid, dtype=dtype,
        overwrite=overwrite, num_workers=num_workers, precision=precision,
    )
    if ctx.is_main:
        checked = cache.verify()  # a complete cache found again is checked, not trusted
        print_cache_summary(cache)
        typer.echo(f"{checked} arrays match the checksums recorded at extraction")


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
