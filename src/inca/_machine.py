"""What a run ran on and when, for reports: versions, the UTC date and the machine (its
platform, CPU and GPU names; never a host name or a path)."""

from __future__ import annotations

import datetime
import os
import platform
from typing import Any

import torch


def _cpu_name() -> str:
    try:  # Linux names the CPU model here; platform.processor() is often empty there
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device | str | None = None) -> dict[str, Any]:
    """The platform, CPU, core count, Python and torch versions, and the GPU's name when
    ``device`` is a CUDA device."""
    out: dict[str, Any] = {
        "system": platform.system(), "architecture": platform.machine(),
        "cpu": _cpu_name(), "cpu_count": os.cpu_count(),
        "python": platform.python_version(), "torch": torch.__version__,
    }
    device = None if device is None else torch.device(device)
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(device)
    return out


def utc_now() -> str:
    """The current UTC time, ISO 8601 to the second (``2025-01-31T12:00:00+00:00``)."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def command_line(argv: list[str] | None = None) -> str:
    """The ``inca`` command as typed (``sys.argv`` with the program named ``inca``, however
    it was started), quoted as a shell would need it."""
    import shlex
    import sys

    return shlex.join(["inca", *(sys.argv if argv is None else argv)[1:]])
