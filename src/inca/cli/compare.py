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

from inca.baselines.compare_config import CompareConfig
from inca.cli._app import app, friendly
from inca.cli._options import (
    BackboneSpec,
    Checkpoint,
    Device,
    InputSize,
    Precision,
    Pretrained,
    TokenGrid,
    backbone_kwargs,
    check_data,
    config_default,
    floats,
    names,
)

_default = functools.partial(config_default, CompareConfig)


def run_compare(config: CompareConfig, **kwargs) -> dict:
    """:func:`inca.baselines.compare.run_compare`, imported when run (it imports torch)."""
    from inca.baselines.compare import run_compare as run

    return run(config, **kwargs)


@app.command("compare")
@friendly
def compare_cmd(
    backbone: BackboneSpec,
    data: Annotated[str, typer.Option(help="data with train and test splits")],
    out: Annotated[Path, typer.Option(help="folder for compare.{json,md,png}")],
    methods: Annotated[str, typer.Option(help="methods to compare, comma-separated")]
    = _default("methods"),
    epochs: Annotated[int, typer.Option(help="epoch budget of every method")]
    = _default("epochs"),
    limit: Annotated[int | None, typer.Option(help="training samples")] = _default("limit"),
    test_limit: Annotated[int | None, typer.Option(help="test samples")]
    = _default("test_limit"),
    seeds: Annotated[int, typer.Option(help="seeds of the probes and InCA")]
    = _default("seeds"),
    expensive_seeds: Annotated[int, typer.Option(help="seeds of full/last/LoRA")]
    = _default("expensive_seeds"),
    batch_size: Annotated[int, typer.Option(help="batch size of every method")]
    = _default("batch_size"),
    lrs: Annotated[str, typer.Option(help="lr grid of the probes and InCA")] = _default("lrs"),
    input_size: InputSize = _default("input_size"),
    token_grid: TokenGrid = _default("token_grid"),
    equal_time: Annotated[bool, typer.Option(
        help="also give the probes and InCA full fine-tuning's wall time")]
    = _default("equal_time"),
    time_fraction: Annotated[float, typer.Option(
        help="share of full fine-tuning's time an equal-time run gets")]
    = _default("time_fraction"),
    max_epochs: Annotated[int, typer.Option(help="most epochs of an equal-time run")]
    = _default("max_epochs"),
    pretrained: Pretrained = _default("pretrained"),
    checkpoint: Checkpoint = None,
    device: Device = _default("device"),
    precision: Precision = _default("precision"),
) -> None:
    """Compare InCA with full/last-layer fine-tuning, LoRA and probes: one table, one run.

    A method that fails does not stop the others: the table and compare.json hold what
    finished and list each failure with its error (the exit code is then 1).
    """
    from inca._files import check_writable
    from inca.baselines.compare import to_markdown, write

    checkpoint_path = backbone_kwargs(None, True, checkpoint).get("checkpoint_path")
    check_data(data)
    config = CompareConfig(
        backbone=backbone, data=data, methods=names(methods), epochs=epochs, limit=limit,
        test_limit=test_limit, seeds=seeds, expensive_seeds=expensive_seeds,
        batch_size=batch_size, lrs=floats(lrs), input_size=input_size, token_grid=token_grid,
        device=device, precision=precision, equal_time=equal_time,
        time_fraction=time_fraction, max_epochs=max_epochs, checkpoint_path=checkpoint_path,
        pretrained=pretrained)
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
