"""``python -m inca.cli``: the same as the ``inca`` command."""

from inca.cli import main

main()
