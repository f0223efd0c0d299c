"""Shared plumbing for benchmark scripts: environment record and result files."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results"


def environment() -> dict[str, Any]:
    """What the numbers were measured on."""
    import inca

    env = {
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "inca": inca.__version__,
        "device": "cpu",
    }
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name(0)
    return env


def command_line() -> str:
    return "python " + " ".join([Path(sys.argv[0]).as_posix().split("/benchmarks/")[-1]
                                 if "/benchmarks/" in sys.argv[0] else sys.argv[0],
                                 *sys.argv[1:]])


def timed(fn, repeats: int, sync=None) -> list[float]:
    """Wall times of ``repeats`` calls of ``fn``."""
    times = []
    for _ in range(repeats):
        if sync:
            sync()
        t = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t)
    return times


def write_results(name: str, payload: dict[str, Any], markdown: str,
                  folder: Path = RESULTS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    path = folder / f"{name}.md"
    path.write_text(markdown)
    return path


def make_backbone(spec: str, *, input_size: int | None, device, random_weights: bool = False):
    """The benchmark's backbone; ``random_weights`` builds the same architecture untrained
    (for machines without the offline asset: timings do not depend on the weights)."""
    import inca

    kwargs = {} if input_size is None else {"input_size": input_size}
    if random_weights and spec == "dinov2_vits14":
        from inca.backbones.dinov2 import DinoV2Backbone, DinoV2ViT

        torch.manual_seed(0)
        return DinoV2Backbone(DinoV2ViT(), **kwargs).to(device)
    if random_weights:
        kwargs["pretrained"] = False
    return inca.create_backbone(spec, device=device, **kwargs)


def publish(name: str, fields: dict[str, Any], markdown: list[str],
            env: dict[str, Any] | None = None, folder: Path = RESULTS) -> Path:
    """Write ``<folder>/<name>.{json,md}`` (``results/`` by default): ``fields`` with the
    benchmark's name, command and environment, and the Markdown lines; say where."""
    payload = {"benchmark": name, "command": command_line(),
               "environment": env or environment(), **fields}
    path = write_results(name, payload, "\n".join(markdown) + "\n", folder)
    print(f"wrote {path}")
    return path


def pct(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile of ``values`` (seconds) in ms, by nearest rank; ``None`` for
    no values."""
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, round(q / 100 * (len(v) - 1)))] * 1000


def cpu_seconds(pid: int) -> float:
    """CPU time a process has used (Linux ``/proc``; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
