"""The command line as it reads: quick help (no torch imported), options grouped in
panels with their choices listed, --quiet, plain progress in logs, ``inca layers`` and
``--config``."""

from __future__ import annotations

import subprocess
import sys

from typer.testing import CliRunner

from inca.cli import app


def run(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args], terminal_width=200)


# -- quick: help and version import no torch -----------------------------------------------

HELP_WITHOUT_TORCH = """
import sys
from typer.testing import CliRunner
import inca
assert "torch" not in sys.modules, "import inca imported torch"
from inca.cli import app
for args in (["--help"], ["--version"], ["fit", "--help"], ["extract", "--help"],
             ["compare", "--help"], ["predict", "--help"], ["serve", "--help"]):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, (args, result.output)
    assert "torch" not in sys.modules, f"inca {' '.join(args)} imported torch"
print("ok")
"""


def test_help_and_version_import_no_torch():
    out = subprocess.run([sys.executable, "-c", HELP_WITHOUT_TORCH], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
