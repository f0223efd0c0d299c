"""The Typer application, its error printing and the console entry point."""

from __future__ import annotations

import functools
import sys
from typing import Annotated

import typer

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


def friendly(fn):
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
            from inca._files import storage_error

            err = storage_error(e, e.filename or "the output")
            if err is None:
                raise
            typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from None

    return wrapper


def main() -> None:
    """Console entry point."""
    try:
        app()
    except InCAError as e:  # pragma: no cover - commands catch their own
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        sys.exit(2)
