"""``python -m inca``: the CLI, also as ``torchrun --nproc-per-node N -m inca fit ...``."""

from inca.cli import main

main()
