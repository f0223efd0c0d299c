"""The ``inca`` command line: a thin layer over the typed Python functions.

One module per command group (:mod:`~inca.cli.data`: backbones, extract;
:mod:`~inca.cli.fit`; :mod:`~inca.cli.predict`: predict, serve; :mod:`~inca.cli.compare`;
:mod:`~inca.cli.classes`: add-classes; :mod:`~inca.cli.export`),
each registering its commands on the one Typer :data:`app`. Options named after a config's
fields take their defaults from the config (:func:`~inca.cli._options.config_default`).
"""

from inca.cli._app import app, main

# isort: off
# Each registers its commands; imported in the order `inca --help` lists them.
from inca.cli import data, fit, classes, predict, compare, export  # noqa: E402, F401
# isort: on

__all__ = ["app", "main"]
