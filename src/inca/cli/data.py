"""``inca backbones`` and ``inca extract``: what can be read, and reading it into a cache."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from inca._choices import DEFAULT_PRECISION, EXTRACT_BATCH_SIZE, EXTRACT_DTYPE, EXTRACT_LAYERS
from inca._files import human_bytes
from inca._progress import hide_library_bars
from inca.cli._app import app, context, friendly
from inca.cli._options import (
    BACKBONE,
    DATA,
    DEVICE,
    OUTPUT,
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
    Quiet,
    SkipUnreadable,
    TokenGrid,
    backbone_kwargs,
    check_choices,
    check_data,
    check_positive,
    choices,
    torch_dtype,
)
from inca.training.config import CACHE_DTYPES

SPLITS = ("train", "val", "test")


@app.command("backbones")
@friendly
def backbones_cmd() -> None:
    """List the bundled backbones and the sources of others."""
    from inca.backbones import list_backbones

    for entry in list_backbones():
        typer.echo(f"{entry['name']:<22} {entry['description']}")


@app.command("layers")
@friendly
def layers_cmd(
    backbone: Annotated[str, typer.Argument(
        help="e.g. dinov2_vits14, timm:<name>, hf:<path>", show_default=False)],
    input_size: InputSize = None,
    token_grid: TokenGrid = None,
    pretrained: Annotated[bool, typer.Option(
        help="load the pretrained weights (the shapes are the same without them: no "
             "download)", rich_help_panel=BACKBONE)] = False,
    checkpoint: Checkpoint = None,
) -> None:
    """List a backbone's layers: the tokens (count x width) each gives an adapter, and what
    caching them costs per image (float16)."""
    from inca.backbones import create_backbone
    from inca.features import token_shapes

    check_positive(token_grid=token_grid)
    bb = create_backbone(backbone, device="cpu",
                         **backbone_kwargs(input_size, pretrained, checkpoint))
    shapes = token_shapes(bb, "all", token_grid)  # one pass of a blank image
    size = bb.preprocessing.input_size
    typer.echo(f"{bb.name} at {size} px: {len(shapes)} layers, {bb.num_prefix_tokens} "
               f"prefix token(s) (CLS, registers) before the patch tokens"
               + (f", tokens pooled to a {token_grid}x{token_grid} grid" if token_grid else ""))
    typer.echo(f"{'layer':<28}{'tokens':>8}{'width':>7}{'KiB/img':>9}")
    total = 0
    for layer, (n, d) in shapes.items():
        total += n * d * 2  # float16, as a cache stores them
        typer.echo(f"{layer:<28}{n:>8}{d:>7}{n * d * 2 / 1024:>9.1f}")
    per_10k = total * 10_000
    typer.echo(f"cache of every layer: {total / 1024:.1f} KiB per image (float16), "
               + human_bytes(per_10k) + " per 10,000 images; --layers and --token-grid make "
               "it smaller")


@app.command("extract")
@friendly
def extract_cmd(
    *,  # every option is named, listed in --help in this order, panel by panel
    data: Data,
    split: Annotated[str, typer.Option(help="data split", metavar=choices(SPLITS),
                                       rich_help_panel=DATA)] = "train",
    limit: Annotated[int | None, typer.Option(help="use at most this many samples",
                                              rich_help_panel=DATA)] = None,
    image_column: ImageColumn = None,
    label_column: LabelColumn = None,
    skip_unreadable: SkipUnreadable = False,
    backbone: BackboneSpec,
    layers: Layers = EXTRACT_LAYERS,
    input_size: InputSize = None,
    token_grid: TokenGrid = None,
    pretrained: Pretrained = True,
    checkpoint: Checkpoint = None,
    out: Annotated[Path, typer.Option(help="cache folder to write (resumed if interrupted)",
                                      rich_help_panel=OUTPUT)],
    dtype: Annotated[str, typer.Option(help="the cache's numbers",
                                       metavar=choices(CACHE_DTYPES), rich_help_panel=OUTPUT)]
    = EXTRACT_DTYPE,
    overwrite: Annotated[bool, typer.Option(help="replace a cache made differently",
                                            rich_help_panel=OUTPUT)] = False,
    quiet: Quiet = False,
    batch_size: Annotated[int, typer.Option(help="images per backbone pass",
                                            rich_help_panel=DEVICE)] = EXTRACT_BATCH_SIZE,
    device: Device = "auto",
    precision: Precision = DEFAULT_PRECISION,
    backbone_dtype: BackboneDtype = "float32",
    num_workers: NumWorkers = None,
) -> None:
    """Extract many layers' tokens in one pass into a resumable activation cache."""
    from inca._precision import resolve_device, resolve_precision
    from inca.backbones import create_backbone
    from inca.data import load_dataset
    from inca.features import extract_to_cache

    hide_library_bars(quiet)
    # Every option checked before the backbone loads or a byte is extracted.
    check_positive(limit=limit, batch_size=batch_size, token_grid=token_grid)
    check_choices("--dtype", [dtype], list(CACHE_DTYPES))
    check_data(data)
    ctx = context()  # under torchrun, each rank extracts its shards into the same folder
    dev, bb_dtype = resolve_device(ctx.device(device)), torch_dtype(backbone_dtype)
    resolve_precision(precision, dev)
    bb_kwargs = backbone_kwargs(input_size, pretrained, checkpoint)
    ds = load_dataset(data, split=split, limit=limit, skip_unreadable=skip_unreadable,
                      image_column=image_column, label_column=label_column)
    bb = create_backbone(backbone, device=dev, dtype=bb_dtype, **bb_kwargs)
    # a cache found again, complete or resumed (shards of an earlier run)
    reused = not overwrite and _manifest_or_none(out) is not None
    cache = extract_to_cache(
        bb, ds, out, layers=layers, batch_size=batch_size, token_grid=token_grid, dtype=dtype,
        overwrite=overwrite, num_workers=num_workers, precision=precision,
        progress=not quiet, desc=f"extract {split}",
    )
    if ctx.is_main:
        # A cache found again (complete, or resumed) is checked, not trusted; one written
        # whole now has just been checksummed (reading it back would double the disk reads).
        checked = (f"{cache.verify()} arrays match the checksums recorded at extraction"
                   if reused else "its arrays checksummed as written")
        if not quiet:
            print_cache_summary(cache)
        typer.echo(f"cache {cache.path}: {len(cache)} samples, {len(cache.layers)} layers, "
                   f"{cache.nbytes() / 2**20:.1f} MiB; {checked}")


def _manifest_or_none(out: Path) -> dict | None:
    """The manifest of a cache at ``out``, or ``None`` (none, or unreadable: the extraction
    then says what is wrong)."""
    from inca.errors import CacheError
    from inca.features.cache import read_manifest

    try:
        return read_manifest(out)
    except CacheError:
        return None


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
