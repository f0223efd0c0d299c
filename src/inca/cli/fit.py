"""``inca fit``: train a bank of adapters, select on validation, save the task and report.

The options named after :class:`~inca.training.config.FitConfig`'s fields take their
defaults from it, so a default is written once, in the config.
"""

from __future__ import annotations

import functools
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Any

import typer

from inca._choices import ADAPTER_KINDS, AUGMENTATIONS
from inca._files import folder_bytes, human_bytes
from inca._progress import hide_library_bars
from inca.cli._app import app, context, friendly
from inca.cli._config import config_option, extra_fields
from inca.cli._options import (
    ADAPTERS,
    DATA,
    OUTPUT,
    SELECTION,
    TRAINING,
    BackboneDtype,
    BackboneSpec,
    Checkpoint,
    Data,
    Device,
    ImageColumn,
    InputSize,
    LabelColumn,
    Layers,
    Lrs,
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
    config_default,
    floats,
    names,
    parse_adapter_options,
    torch_dtype,
)
from inca.errors import InCAError
from inca.training.config import MODES, SELECT_BY, FitConfig

_default = functools.partial(config_default, FitConfig)
FitConfigFile = config_option(FitConfig)


@app.command("fit")
@friendly
def fit_cmd(
    ctx: typer.Context,
    *,  # every option is named, listed in --help in this order, panel by panel
    config_file: FitConfigFile = None,
    data: Data,
    val_data: Annotated[str | None, typer.Option(
        help="validation data for selection (default: the data's val/validation split or "
             "folder, else --val-fraction of the training data)", rich_help_panel=DATA)]
    = None,
    test_data: Annotated[str | None, typer.Option(
        help="test data, reported only (default: the data's test split, if any)",
        rich_help_panel=DATA)] = None,
    limit: Annotated[int | None, typer.Option(help="use at most this many training samples",
                                              rich_help_panel=DATA)] = None,
    test_limit: Annotated[int | None, typer.Option(
        help="evaluate on this many test samples (0: none)", rich_help_panel=DATA)] = None,
    val_fraction: Annotated[float, typer.Option(help="share held out for selection",
                                                rich_help_panel=DATA)]
    = _default("val_fraction"),
    image_column: ImageColumn = None,
    label_column: LabelColumn = None,
    skip_unreadable: SkipUnreadable = False,
    backbone: BackboneSpec,
    layers: Layers = _default("layers"),
    input_size: InputSize = None,
    token_grid: TokenGrid = _default("token_grid"),
    pretrained: Pretrained = True,
    checkpoint: Checkpoint = None,
    kinds: Annotated[str, typer.Option(
        help=f"adapter kinds in the bank, comma-separated: {', '.join(ADAPTER_KINDS)}; "
             "kind:name is a variant set in --adapter-options", metavar="KIND,...",
        rich_help_panel=ADAPTERS)] = _default("kinds"),
    adapter_options: Annotated[str | None, typer.Option(
        help='adapter settings as JSON, per kind or variant, e.g. '
             '\'{"inca:q4": {"num_queries": 4}}\'', metavar="JSON",
        rich_help_panel=ADAPTERS)] = None,
    lrs: Lrs = _default("lrs"),
    epochs: Annotated[int, typer.Option(help="passes over the training data",
                                        rich_help_panel=TRAINING)] = _default("epochs"),
    batch_size: Annotated[int, typer.Option(help="samples per step", rich_help_panel=TRAINING)]
    = _default("batch_size"),
    mode: Annotated[str, typer.Option(
        help="auto: cache when it fits --cache-budget-gb and pays off", metavar=choices(MODES),
        rich_help_panel=TRAINING)] = _default("mode"),
    augment: Annotated[str, typer.Option(
        help="augmentation of training images (streams); crop-flip is not for data whose "
             "orientation is the label", metavar=choices(AUGMENTATIONS),
        rich_help_panel=TRAINING)] = _default("augment"),
    cache_budget_gb: Annotated[float, typer.Option(help="largest cache --mode auto writes",
                                                   rich_help_panel=TRAINING)]
    = _default("cache_budget_gb"),
    seed: Annotated[int, typer.Option(help="seed of splits, init and batch order",
                                      rich_help_panel=TRAINING)] = _default("seed"),
    select_by: Annotated[str, typer.Option(
        help="validation measure that picks epochs and adapters: loss (cross-entropy, "
             "steadier on small validation sets) or accuracy", metavar=choices(SELECT_BY),
        rich_help_panel=SELECTION)] = _default("select_by"),
    ensemble_k: Annotated[int, typer.Option(help="top-k ensemble size",
                                            rich_help_panel=SELECTION)]
    = _default("ensemble_k"),
    soup: Annotated[bool, typer.Option(help="also try weight-averaged soups",
                                       rich_help_panel=SELECTION)] = _default("soup"),
    patience: Annotated[int, typer.Option(help="early-stopping patience (epochs)",
                                          rich_help_panel=SELECTION)] = _default("patience"),
    out: Annotated[Path, typer.Option(help="run folder: task/, report.*, cache/",
                                      rich_help_panel=OUTPUT)],
    overwrite: Annotated[bool, typer.Option(
        help="replace the task and report that an earlier run left in --out (its caches "
             "are reused when they match, replaced when made differently)",
        rich_help_panel=OUTPUT)] = False,
    drop_cache: Annotated[bool, typer.Option(
        help="delete the run's activation cache (--out/cache) once the task is saved; kept "
             "by default, so that a refit of the same data skips the backbone",
        rich_help_panel=OUTPUT)] = False,
    quiet: Quiet = False,
    device: Device = "auto",
    precision: Precision = _default("precision"),
    backbone_dtype: BackboneDtype = "float32",
    num_workers: NumWorkers = None,
) -> None:
    """Train a bank of adapters in parallel, select on validation, save the task and report."""
    from inca._files import FolderLock, check_writable
    from inca._precision import resolve_device
    from inca.adapters import list_adapters

    hide_library_bars(quiet)
    # Every option checked before the backbone loads or a byte is extracted.
    kind_list = names(kinds)
    check_choices("--kinds kind", [k.split(":", 1)[0] for k in kind_list],
                  [a["name"] for a in list_adapters()])
    check_positive(limit=limit, test_limit=None if test_limit == 0 else test_limit)
    check_data(data, val_data, test_data)
    config = FitConfig(
        layers=layers, kinds=kind_list, lrs=floats(lrs), epochs=epochs,
        batch_size=batch_size, val_fraction=val_fraction, mode=mode, augment=augment,
        cache_budget_gb=cache_budget_gb, ensemble_k=ensemble_k, soup=soup,
        token_grid=token_grid, seed=seed, select_by=select_by, patience=patience,
        precision=precision, adapter_options=parse_adapter_options(adapter_options),
        **extra_fields(ctx),  # --config's fields that no option sets (weight_decay, ...)
    )
    ctx = context()  # under torchrun: this rank's place; rank 0 writes the results
    dev, dtype = resolve_device(ctx.device(device)), torch_dtype(backbone_dtype)  # checked early
    bb_kwargs = backbone_kwargs(input_size, pretrained, checkpoint)
    _check_no_task(out, overwrite)
    created = not out.exists()
    check_writable(out)  # before hours of work whose result could not be saved
    try:
        with FolderLock(out, "run folder") if ctx.is_main else nullcontext():
            _fit_into(out, backbone, data, config, dev, dtype, bb_kwargs=bb_kwargs,
                      limit=limit, test_limit=test_limit, val_data=val_data,
                      test_data=test_data,
                      columns={"image_column": image_column, "label_column": label_column,
                               "skip_unreadable": skip_unreadable},
                      num_workers=num_workers, overwrite=overwrite, drop_cache=drop_cache,
                  quiet=quiet)
    except BaseException:
        if created and ctx.is_main and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # a run that failed before writing anything leaves no empty --out
        raise


def _check_no_task(out: Path, overwrite: bool) -> None:
    """Refuse to replace the task of an earlier, finished run unless asked to
    (--overwrite). A run interrupted before its report was written is not finished: the
    same command completes it."""
    task = out / "task"
    finished = (out / "report.json").is_file()  # the run's last file
    if not overwrite and finished and task.is_dir() and any(task.iterdir()):
        raise InCAError(f"{out} already holds a fitted task ({task}); pass --overwrite to "
                        "replace it, or choose another --out")


def _fit_replacing(run: Any, cache_root: Path, overwrite: bool) -> Any:
    """``run()``; with --overwrite, a cache in the run folder made differently (another
    backbone, data or layers) is removed and the fit run again (it stops at once, before
    extracting, when it finds one); a cache that matches is reused."""
    from inca.errors import CacheMismatchError

    try:
        return run()
    except CacheMismatchError:
        if not (overwrite and cache_root.is_dir()):
            raise
    import shutil

    ctx = context()
    if ctx.is_main:  # one rank removes; the others wait for it
        typer.echo(f"--overwrite: replacing the caches in {cache_root}, made differently")
        shutil.rmtree(cache_root)
    ctx.barrier()
    return run()


def _splits(data: str, val_data: str | None, test_data: str | None, config: FitConfig, *,
            limit: int | None, test_limit: int | None, columns: dict, say: Any
            ) -> tuple[Any, Any, Any]:
    """The training, validation and test data sets ``inca fit`` reads (validation and test
    ``None`` when there are none), each named on the way."""
    from inca.data import has_split, load_dataset

    train = load_dataset(data, split="train", limit=limit, seed=config.seed, **columns)
    val = None
    if val_data is not None:
        val = load_dataset(val_data, split="val", **columns)
    elif has_split(data, "val"):  # a val/ folder, a validation split
        val = load_dataset(data, split="val", **columns)
    say(f"validation: {val.name} ({len(val)} images)" if val is not None else
        f"validation: {config.val_fraction:.0%} of the training data, stratified")
    test = None
    if test_limit != 0 and (test_data is not None or has_split(data, "test")):
        try:
            test = load_dataset(test_data or data, split="test", limit=test_limit,
                                seed=config.seed, **columns)
        except InCAError as e:
            if test_data is not None:
                raise
            say(f"no test split evaluated ({e})")  # e.g. a hub test split without labels
    elif test_limit != 0:
        say(f"no test split evaluated ({data} has none; pass --test-data)")
    return train, val, test


def _fit_into(out: Path, backbone: str, data: str, config: FitConfig, dev: Any, dtype: Any,
              *, bb_kwargs: dict, limit: int | None, test_limit: int | None,
              val_data: str | None, test_data: str | None, columns: dict,
              num_workers: int | None, overwrite: bool, drop_cache: bool = False,
              quiet: bool = False) -> None:
    """``inca fit`` once its run folder is locked; ``quiet``: the final line only."""
    from inca.backbones import create_backbone
    from inca.training import fit

    say = typer.echo if context().is_main and not quiet else (lambda *_: None)
    train, val, test = _splits(data, val_data, test_data, config, limit=limit,
                               test_limit=test_limit, columns=columns, say=say)
    held = folder_bytes(out / "cache")
    if held:
        say(f"activation cache: {out / 'cache'} holds {human_bytes(held)} from an earlier run; "
            "reused where it matches this run's backbone, data and layers")
    # the data first: a misspelt name or folder costs no backbone download
    bb = create_backbone(backbone, device=dev, dtype=dtype, **bb_kwargs)
    task = _fit_replacing(lambda: fit(bb, train, val, test=test, config=config,
                                      cache_dir=out / "cache", num_workers=num_workers,
                                      device=dev, progress=not quiet),
                            out / "cache", overwrite)
    if not context().is_main:
        return  # every rank holds the same task; rank 0 writes it
    from inca._machine import command_line

    task.report.command = command_line()  # recorded in report.json (the API's: "python API")
    task.save(out / "task")
    files = task.report.write(out)
    say(task.report.to_markdown())
    # the result line, --quiet or not
    typer.echo(f"task saved to {out / 'task'}; report: {files['markdown']}, {files['plot']}")
    cache = out / "cache"
    size = folder_bytes(cache)
    if size and drop_cache:
        import shutil

        shutil.rmtree(cache)
        say(f"activation cache: {human_bytes(size)} deleted (--drop-cache)")
    elif size:
        say(f"activation cache: {human_bytes(size)} kept in {cache} (a refit of the same data "
            "skips the backbone); delete it, or pass --drop-cache, to free the disk")


