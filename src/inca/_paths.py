"""Where inca keeps files it makes for the user (converted weights, downloaded data)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """inca's cache: ``$INCA_CACHE_DIR``, else ``$XDG_CACHE_HOME/inca``, else ``~/.cache/inca``."""
    if os.environ.get("INCA_CACHE_DIR"):
        return Path(os.environ["INCA_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "inca"
