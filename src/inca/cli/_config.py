"""``--config FILE``: a command's settings from a JSON, TOML or YAML file, as defaults that
the options given on the command line override.

A file's keys are the command's options (``data``, ``out``, ...) and the fields of its
config dataclass (e.g. :class:`~inca.training.config.FitConfig`), including fields that no
option sets (``weight_decay``); each is declared once, there. Unknown keys are refused
with the close match.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from inca.errors import InCAError

#: ``ctx.meta`` key of the config fields a file sets that are not options of the command
EXTRA_FIELDS = "inca.config_fields"


def read_settings(path: Path) -> dict[str, Any]:
    """The mapping a ``.json``, ``.toml`` or ``.yaml``/``.yml`` file holds."""
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise InCAError(f"{path}: cannot read it ({e.strerror})") from None
    try:
        if suffix == ".json":
            value = json.loads(text)
        elif suffix == ".toml":
            import tomllib

            value = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise InCAError(f"{path}: reading YAML needs PyYAML (pip install "
                                "pyyaml); or write the file as .json or .toml") from None
            value = yaml.safe_load(text)
        else:
            raise InCAError(f"{path}: write it as .json, .toml or .yaml")
    except InCAError:
        raise
    except Exception as e:  # noqa: BLE001 - each parser has its own error class
        raise InCAError(f"{path} is not valid {suffix[1:].upper()}: {e}") from None
    if not isinstance(value, dict):
        raise InCAError(f"{path} must hold a mapping of settings to values, e.g. "
                        '{"epochs": 5}')
    return {str(k).replace("-", "_"): v for k, v in value.items()}


def _as_option(value: Any) -> Any:
    """A file's value written as its option reads it: lists comma-separated, mappings as
    JSON (``adapter_options``)."""
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value)
    return value


def config_option(config_class: type) -> Any:
    """The ``--config FILE`` option of a command whose settings build ``config_class``.

    Its values become the command's defaults (click's ``default_map``), so an option
    given on the command line wins; fields of ``config_class`` that are no option of the command
    go to ``ctx.meta[EXTRA_FIELDS]``.
    """

    def load(ctx: typer.Context, param: Any, value: Path | None) -> Path | None:
        if value is None or ctx.resilient_parsing:
            return value
        from inca._hints import did_you_mean

        try:
            settings = read_settings(value)
        except InCAError as e:
            raise typer.BadParameter(str(e), ctx, param) from None
        options = {p.name for p in ctx.command.params} - {param.name, "help"}
        fields = set(config_class.__dataclass_fields__)
        known = sorted(options | fields)
        for key in settings:
            if key not in known:
                raise typer.BadParameter(
                    f"{value}: unknown setting {key!r}{did_you_mean(key, known)}; the "
                    f"settings are {', '.join(known)}", ctx, param)
        ctx.default_map = {**(ctx.default_map or {}),
                           **{k: _as_option(v) for k, v in settings.items() if k in options}}
        ctx.meta[EXTRA_FIELDS] = {k: v for k, v in settings.items() if k not in options}
        return value

    return Annotated[Path | None, typer.Option(
        "--config", metavar="FILE", is_eager=True, callback=load,
        help=f"settings from a .json, .toml or .yaml file: the options below and "
             f"{config_class.__name__}'s fields; options given here override them")]


def extra_fields(ctx: typer.Context) -> dict[str, Any]:
    """The config fields ``--config`` set that are not options of the command."""
    return dict(ctx.meta.get(EXTRA_FIELDS, {}))
