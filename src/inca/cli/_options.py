"""What several commands share: option types, defaults read from the configs, and the
cheap checks every command runs before any expensive work."""

from __future__ import annotations

from dataclasses import MISSING
from pathlib import Path
from typing import Annotated, Any

import typer

from inca._choices import BACKBONE_DTYPES, DEFAULT_PRECISION, PRECISIONS
from inca.errors import InCAError


def config_default(config: type, name: str) -> Any:
    """The default of the dataclass field ``config.name``, written as its option reads it
    (a tuple as comma-separated text): a command's defaults live in its config only.

    Example:
        >>> from inca.training.config import FitConfig
        >>> config_default(FitConfig, "epochs"), config_default(FitConfig, "kinds")
        (15, 'inca,linear')
    """
    field = config.__dataclass_fields__[name]
    value = field.default_factory() if field.default is MISSING else field.default
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value)
    return value


# -- help panels: `inca <command> --help` groups its options under these --------------------

DATA, BACKBONE, ADAPTERS, TRAINING = "Data", "Backbone", "Adapters", "Training"
SELECTION, OUTPUT, DEVICE, TASKS = "Selection", "Output", "Device", "Tasks"


def choices(names: tuple[str, ...] | list[str]) -> str:
    """An option's metavar listing its choices, as click writes them: ``[a|b|c]``."""
    return "[" + "|".join(names) + "]"


# -- option types shared by commands --------------------------------------------------------

BackboneSpec = Annotated[str, typer.Option(
    help="e.g. dinov2_vits14, timm:<name>, hf:<path>", rich_help_panel=BACKBONE)]
Data = Annotated[str, typer.Option(
    help="fashion-mnist, digits, an image folder, a .csv/.jsonl manifest (path,label), "
         "hf:<folder or hub id>", rich_help_panel=DATA)]
Layers = Annotated[str, typer.Option(help="'all', 'last', or comma-separated names "
                                          "(inca layers BACKBONE lists them)",
                                     rich_help_panel=BACKBONE)]
InputSize = Annotated[int | None, typer.Option(help="image side fed to the backbone",
                                               rich_help_panel=BACKBONE)]
TokenGrid = Annotated[int | None, typer.Option(
    help="pool patch tokens to a GRIDxGRID grid (less memory, a smaller cache)",
    rich_help_panel=BACKBONE)]
Lrs = Annotated[str, typer.Option(help="learning-rate grid, comma-separated",
                                  rich_help_panel=TRAINING)]
SkipUnreadable = Annotated[bool, typer.Option(help="skip unreadable images",
                                              rich_help_panel=DATA)]
Pretrained = Annotated[bool, typer.Option(help="load pretrained weights (hub sources)",
                                          rich_help_panel=BACKBONE)]
Checkpoint = Annotated[Path | None, typer.Option(
    help="local weights file for a timm:/torchvision: backbone (a state_dict, or a "
         "checkpoint holding one), instead of the hub's", rich_help_panel=BACKBONE)]
NumWorkers = Annotated[int | None, typer.Option(
    help="data-loading workers (default: cores - 1, at most 8, decoding images; a cache "
         "is read in-process on a CPU, by 2 workers on a GPU)", rich_help_panel=DEVICE)]
ImageColumn = Annotated[str | None, typer.Option(
    help="the images' column in a Hugging Face set or a manifest (default: the Image "
         "feature, or a column named image / path)", rich_help_panel=DATA)]
LabelColumn = Annotated[str | None, typer.Option(
    help="the labels' column (default: the ClassLabel feature, or a column named label / "
         "class); one class per sample", rich_help_panel=DATA)]
Device = Annotated[str, typer.Option(
    help="auto (CUDA when available, else cpu), cpu, cuda, cuda:N",
    metavar="[auto|cpu|cuda|cuda:N]", rich_help_panel=DEVICE)]
Precision = Annotated[str, typer.Option(
    help="auto: bf16-mixed on a GPU, 32 on the CPU",
    metavar=choices((DEFAULT_PRECISION, *PRECISIONS)), rich_help_panel=DEVICE)]
BackboneDtype = Annotated[str, typer.Option(
    help="the backbone's weights: float32 (autocast computes in 16 bits), or bfloat16 / "
         "float16 held in 16 bits (frozen, so no float32 copy is needed: faster, half the "
         "memory)", metavar=choices(BACKBONE_DTYPES), rich_help_panel=DEVICE)]
Quiet = Annotated[bool, typer.Option(
    "--quiet", "-q", help="no progress bars or tables: only errors and the final result line",
    rich_help_panel=OUTPUT)]
# predict and serve: the tasks, and where their backbone comes from
TaskFolders = Annotated[list[Path], typer.Option(help="task folder(s) written by inca fit",
                                                 rich_help_panel=TASKS)]
TaskBackbone = Annotated[str | None, typer.Option(
    help="create the backbone from this instead of the tasks' record (e.g. the same "
         "weights elsewhere: hf:<folder>); it must have the weights the tasks were "
         "trained on", rich_help_panel=TASKS)]
TaskCheckpoint = Annotated[Path | None, typer.Option(
    help="local weights file for the backbone (timm), instead of the recorded one",
    rich_help_panel=TASKS)]


# -- parsing and checking, before any expensive work ---------------------------------------


def torch_dtype(name: str):
    """``--backbone-dtype``'s torch dtype; imports torch."""
    import torch

    if name not in BACKBONE_DTYPES:
        raise InCAError(f"unknown --backbone-dtype {name!r}; choose one of "
                        f"{', '.join(BACKBONE_DTYPES)}")
    return getattr(torch, name)


def floats(text: str) -> tuple[float, ...]:
    """A comma-separated list of numbers (``--lrs``)."""
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise InCAError(f"expected comma-separated numbers, got {text!r}") from None


def names(text: str) -> tuple[str, ...]:
    """A comma-separated list of names (``--kinds``, ``--methods``), blanks dropped."""
    return tuple(v.strip() for v in text.split(",") if v.strip())


def parse_adapter_options(text: str | None) -> dict:
    """``--adapter-options``: JSON mapping kinds (or variants) to settings."""
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


def backbone_kwargs(input_size: int | None, pretrained: bool,
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


def check_positive(**values: int | None) -> None:
    """Refuse a zero or negative count (``None``: not given) before any work."""
    for name, v in values.items():
        if v is not None and v < 1:
            raise InCAError(f"--{name.replace('_', '-')} must be at least 1, got {v}")


def check_data(*specs: str | None) -> None:
    """A misspelt built-in data set (``fashion_mnist``) refused with the close match before
    any work; anything else is left to the data loader to read or refuse."""
    from inca._hints import did_you_mean
    from inca.data.builtin import list_datasets

    known = list_datasets()
    for spec in specs:
        if spec is None or spec in known or spec.startswith("hf:") or Path(spec).exists():
            continue
        hint = did_you_mean(spec, known)
        if hint:
            raise InCAError(f"unknown data set {spec!r}{hint}: not a built-in "
                            f"({', '.join(known)}) nor an existing folder or file")


def check_choices(option: str, given: list[str], allowed: list[str]) -> None:
    """Refuse an unknown name with the close match and the choices."""
    from inca._hints import did_you_mean

    for name in given:
        if name not in allowed:
            raise InCAError(f"unknown {option} {name!r}{did_you_mean(name, allowed)}; "
                            f"choose from {', '.join(allowed)}")
