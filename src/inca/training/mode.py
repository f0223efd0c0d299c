"""Cache or stream: the choice ``inca fit --mode auto`` makes, from the cost of each.

A cache costs disk (images × layers × tokens × width × bytes) and one extraction pass;
it pays off when it is read more than once (several epochs, no augmentation, which would
change the images every epoch) and when reading it is cheaper than running the backbone
again: from memory always, from disk on a CPU (whose forward pass is slow), but not from
disk on a GPU, whose forward pass outruns a disk.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from inca._files import human_bytes
from inca.errors import InCAError
from inca.training.config import FitConfig

GRIDS = (8, 6, 4, 2)  # --token-grid values suggested when a cache would be too large


@dataclass(frozen=True)
class ModeChoice:
    """The mode a fit runs in, why, and what a cache of its inputs would take."""

    mode: str  # "cached" or "streaming"
    reason: str
    cache_bytes: int


def available_memory() -> int:
    """Bytes of memory available without swapping (``MemAvailable``), 0 if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def free_disk(folder: Path) -> int:
    """Free bytes on the file system that holds (or will hold) ``folder``."""
    path = Path(folder).resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def cache_bytes(shapes: dict[str, tuple[int, int]], num_images: int, dtype: str) -> int:
    """Bytes of a cache of ``num_images`` samples of tokens of ``shapes`` (``{layer: (N, D)}``)."""
    per_image = sum(n * d for n, d in shapes.values()) * np.dtype(dtype).itemsize
    return int(per_image * num_images)


def _pooled(shapes: dict[str, tuple[int, int]], prefix: int, grid: int
            ) -> dict[str, tuple[int, int]]:
    out = {}
    for k, (n, d) in shapes.items():
        side = math.isqrt(max(n - prefix, 0))
        out[k] = (prefix + grid * grid, d) if side * side == n - prefix and side > grid \
            else (n, d)
    return out


def grid_hint(shapes: dict[str, tuple[int, int]], prefix: int, num_images: int, dtype: str,
              budget: int) -> str:
    """A ``--token-grid`` that would make the cache fit ``budget``, or ``""``."""
    for g in GRIDS:
        size = cache_bytes(_pooled(shapes, prefix, g), num_images, dtype)
        if size <= budget and size < cache_bytes(shapes, num_images, dtype):
            return f"; --token-grid {g} would make it {human_bytes(size)}"
    return ""


def choose_mode(config: FitConfig, shapes: dict[str, tuple[int, int]], prefix: int,
                num_images: int, cache_dir: Path, device: torch.device) -> ModeChoice:
    """Decide between ``"cached"`` and ``"streaming"`` for ``config.mode`` (``"auto"``).

    Args:
        config: the fit's config (mode, epochs, augmentation, cache dtype and budget).
        shapes: ``{layer: (N, D)}`` of the tokens the adapters read (after ``token_grid``).
        prefix: the backbone's prefix tokens (for the ``--token-grid`` hint).
        num_images: images a cache would hold (every split).
        cache_dir: where a cache would go.
        device: where the backbone runs.

    Raises:
        InCAError: ``--mode cached`` was asked for and the cache cannot fit on the disk.
    """
    size = cache_bytes(shapes, num_images, config.cache_dtype)
    disk = free_disk(cache_dir)
    budget = min(int(config.cache_budget_gb * 2**30), int(0.9 * disk))
    hint = grid_hint(shapes, prefix, num_images, config.cache_dtype, budget)
    what = f"a cache of {num_images} images would take {human_bytes(size)}"
    if config.mode == "cached":
        if size > 0.95 * disk:
            raise InCAError(f"{what}, but only {human_bytes(disk)} is free at {cache_dir}: use "
                            f"--mode streaming (or auto), or free space{hint}")
        return ModeChoice("cached", f"asked for; {what}", size)
    if config.mode == "streaming":
        return ModeChoice("streaming", "asked for", size)
    if config.augment != "none":
        return ModeChoice("streaming", f"augmentation ({config.augment}) changes the images "
                          "every epoch", size)
    if config.epochs <= 1:
        return ModeChoice("streaming", "one epoch reads each image once: a cache would not "
                          "be read again", size)
    if size > budget:
        return ModeChoice("streaming", f"{what}, over the budget of {human_bytes(budget)} "
                          f"(--cache-budget-gb, and 90% of the free disk){hint}", size)
    memory = available_memory()
    if device.type == "cuda" and size > 0.5 * memory:
        return ModeChoice("streaming", f"{what}, more than half the free memory "
                          f"({human_bytes(memory)}): read back from disk it would be slower than "
                          f"the GPU's forward pass{hint}", size)
    return ModeChoice("cached", f"{what}, within the budget, read for up to "
                      f"{config.epochs} epochs", size)
