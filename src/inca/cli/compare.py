"""``inca compare``: InCA against fine-tuning, LoRA and probes, one table, one run.

The options named after :class:`~inca.baselines.compare.CompareConfig`'s fields take their
defaults from it, so a default is written once, in the config.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated

import typer

from inca._progress import hide_library_bars
from inca.baselines.compare_config import METHODS, CompareConfig
from inca.cli._app import app, friendly
from inca.cli._config import config_option, extra_fields
from inca.cli._options import (
    DATA,
    OUTPUT,
    TRAINING,
    BackboneSpec,
    Checkpoint,
    Device,
    InputSize,
    Precision,
    Pretrained,
    Quiet,
    TokenGrid,
    backbone_kwargs,
    check_data,
    config_default,
    floats,
    names,
)

_default = functools.partial(config_default, CompareConfig)
CompareConfigFile = config_option(CompareConfig)
METHODS_PANEL = "Methods"


def run_compare(config: CompareConfig, **kwargs) -> dict:
    """:func:`inca.baselines.compare.run_compare`, imported when run (it imports torch)."""
    from inca.baselines.compare import run_compare as run

    return run(config, **kwargs)


@app.command("compare")
@friendly
def compare_cmd(
    ctx: typer.Context,
    *,  # every option is named, listed in --help in this order, panel by panel
    config_file: CompareConfigFile = None,
    data: Annotated[str, typer.Option(help="data with train and test splits",
                                      rich_help_panel=DATA)],
    limit: Annotated[int | None, typer.Option(help="training samples", rich_help_panel=DATA)]
    = _default("limit"),
    test_limit: Annotated[int | None, typer.Option(help="test samples", rich_help_panel=DATA)]
    = _default("test_limit"),
    backbone: BackboneSpec,
    input_size: InputSize = _default("input_size"),
    token_grid: TokenGrid = _default("token_grid"),
    pretrained: Pretrained = _default("pretrained"),
    checkpoint: Checkpoint = None,
    methods: Annotated[str, typer.Option(
        help=f"methods to compare, comma-separated: {', '.join(METHODS)}", metavar="METHOD,...",
        rich_help_panel=METHODS_PANEL)] = _default("methods"),
    seeds: Annotated[int, typer.Option(help="seeds of the probes and InCA",
                                       rich_help_panel=METHODS_PANEL)] = _default("seeds"),
    expensive_seeds: Annotated[int, typer.Option(help="seeds of full/last/LoRA",
                                                 rich_help_panel=METHODS_PANEL)]
    = _default("expensive_seeds"),
    epochs: Annotated[int, typer.Option(help="epoch budget of every method",
                                        rich_help_panel=TRAINING)] = _default("epochs"),
    batch_size: Annotated[int, typer.Option(help="batch size of every method",
                                            rich_help_panel=TRAINING)] = _default("batch_size"),
    lrs: Annotated[str, typer.Option(help="lr grid of the probes and InCA",
                                     rich_help_panel=TRAINING)] = _default("lrs"),
    equal_time: Annotated[bool, typer.Option(
        help="also give the probes and InCA full fine-tuning's wall time",
        rich_help_panel=TRAINING)] = _default("equal_time"),
    time_fraction: Annotated[float, typer.Option(
        help="share of full fine-tuning's time an equal-time run gets",
        rich_help_panel=TRAINING)] = _default("time_fraction"),
    max_epochs: Annotated[int, typer.Option(help="most epochs of an equal-time run",
                                            rich_help_panel=TRAINING)] = _default("max_epochs"),
    out: Annotated[Path, typer.Option(help="folder for compare.{json,md,png}",
                                      rich_help_panel=OUTPUT)],
    quiet: Quiet = False,
    device: Device = _default("device"),
    precision: Precision = _default("precision"),
) -> None:
    """Compare InCA with full/last-layer fine-tuning, LoRA and probes: one table, one run.

    A method that fails does not stop the others: the table and compare.json hold what
    finished and list each failure with its error (the exit code is then 1).
    """
    from inca._files import check_writable
    from inca.baselines.compare import to_markdown, write

    hide_library_bars(quiet)
    checkpoint_path = backbone_kwargs(None, True, checkpoint).get("checkpoint_path")
    check_data(data)
    extra = extra_fields(ctx)  # --config's fields that no option sets (val_fraction, ...)
    from_file = extra.pop("checkpoint_path", None)
    checkpoint_path = checkpoint_path or from_file  # --checkpoint wins over the file's
    config = CompareConfig(
        backbone=backbone, data=data, methods=names(methods), epochs=epochs, limit=limit,
        test_limit=test_limit, seeds=seeds, expensive_seeds=expensive_seeds,
        batch_size=batch_size, lrs=floats(lrs), input_size=input_size, token_grid=token_grid,
        device=device, precision=precision, equal_time=equal_time,
        time_fraction=time_fraction, max_epochs=max_epochs, checkpoint_path=checkpoint_path,
        pretrained=pretrained, **extra)
    check_writable(out)  # before hours of work whose table could not be saved
    result = run_compare(config, progress=not quiet)
    files = write(result, out, command=" ".join(["inca", *sys.argv[1:]]))
    if not quiet:
        typer.echo(to_markdown(result))
    typer.echo(f"wrote {files['markdown']}, {files['json']}, {files['plot']}")
    if result["failures"]:
        failed = sorted({f["method"] for f in result["failures"]})
        typer.secho(f"error: {len(result['failures'])} run(s) failed ({', '.join(failed)}); "
                    f"the others' results are in {files['markdown']}", fg=typer.colors.RED,
                    err=True)
        raise typer.Exit(1)
