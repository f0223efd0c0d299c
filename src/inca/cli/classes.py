"""``inca add-classes``: an Open-InCA task extended with new classes from images."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated

import typer

from inca._choices import DEFAULT_PRECISION
from inca.cli._app import app, friendly
from inca.cli._options import (
    DATA,
    OUTPUT,
    TASKS,
    TRAINING,
    Data,
    Device,
    ImageColumn,
    LabelColumn,
    Lrs,
    NumWorkers,
    Precision,
    SkipUnreadable,
    TaskBackbone,
    TaskCheckpoint,
    check_data,
    check_positive,
    config_default,
    floats,
)
from inca.errors import InCAError
from inca.training.config import FitConfig

_default = functools.partial(config_default, FitConfig)


@app.command("add-classes")
@friendly
def add_classes_cmd(
    *,
    task: Annotated[Path, typer.Option(help="an Open-InCA task folder (inca fit --kinds "
                                            "open_inca)", rich_help_panel=TASKS)],
    data: Data,
    out: Annotated[Path, typer.Option(help="where the extended task goes (a new folder, or "
                                           "--task itself to replace it)",
                                      rich_help_panel=OUTPUT)],
    val_data: Annotated[str | None, typer.Option(
        help="validation data (default: --val-fraction of --data)", rich_help_panel=DATA)]
    = None,
    val_fraction: Annotated[float, typer.Option(help="share held out for validation",
                                                rich_help_panel=DATA)]
    = _default("val_fraction"),
    epochs: Annotated[int, typer.Option(help="epochs over --data", rich_help_panel=TRAINING)]
    = _default("epochs"),
    lrs: Lrs = _default("lrs"),
    batch_size: Annotated[int, typer.Option(help="images per step", rich_help_panel=TRAINING)]
    = _default("batch_size"),
    seed: Annotated[int, typer.Option(help="seed of the split and training",
                                      rich_help_panel=TRAINING)] = _default("seed"),
    image_column: ImageColumn = None,
    label_column: LabelColumn = None,
    skip_unreadable: SkipUnreadable = False,
    backbone: TaskBackbone = None,
    checkpoint: TaskCheckpoint = None,
    device: Device = "auto",
    precision: Precision = DEFAULT_PRECISION,
    num_workers: NumWorkers = None,
) -> None:
    """Teach an Open-InCA task the classes of --data it lacks. The old classes' logits stay
    bit for bit what they were (their queries, heads and the shared attention are frozen);
    only the new classes' learn, a copy per learning rate, the best chosen on validation."""
    from inca._precision import resolve_device
    from inca.data import load_dataset
    from inca.task import load_task
    from inca.training import add_classes

    check_positive(epochs=epochs, batch_size=batch_size)
    check_data(data, val_data)
    if out.resolve() != task.resolve() and (out / "task.json").exists():  # before any work
        raise InCAError(f"{out} already holds a task; choose another --out, or pass --out "
                        f"{task} to replace the task you extended")
    config = FitConfig(epochs=epochs, lrs=floats(lrs), batch_size=batch_size, seed=seed,
                       val_fraction=val_fraction, precision=precision)
    columns = {"image_column": image_column, "label_column": label_column,
               "skip_unreadable": skip_unreadable}
    train = load_dataset(data, split="train", **columns)
    val = load_dataset(val_data, split="train", **columns) if val_data else None
    kwargs = {"checkpoint_path": str(checkpoint.resolve())} if checkpoint else {}
    before = load_task(task, backbone, device=resolve_device(device), **kwargs)
    extended = add_classes(before, train, val, config, num_workers=num_workers)
    extended.save(out)
    added = extended.metrics["classes_added"][-1]
    scores = ", ".join(f"{m['val_accuracy']:.3f} (lr {m['lr']:g})" for m in added["members"])
    typer.echo(f"added {len(added['classes'])} classes ({', '.join(added['classes'][:10])}"
               f"{' ...' if len(added['classes']) > 10 else ''}) to {len(before.classes)}: "
               f"validation accuracy over all {len(extended.classes)} classes {scores}; "
               f"saved to {out}")
