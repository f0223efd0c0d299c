"""Peak memory of a phase of work, measured the same way for every method compared."""

from __future__ import annotations

import os
import threading

import torch


def rss_bytes() -> int:
    """Resident memory of this process (Linux ``/proc``; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class PeakMemory:
    """Peak resident memory (sampled every 5 ms) and CUDA peak allocation during a block.

    Example:
        >>> with PeakMemory() as mem:
        ...     x = bytearray(10**7)
        >>> mem.peak_rss_mib >= mem.start_rss_mib
        True
    """

    def __init__(self, interval: float = 0.005, device: torch.device | str | None = None):
        self.interval = interval
        self.device = torch.device(device) if device is not None else None
        self.start = self.peak = 0
        self.cuda_peak: int | None = None

    def __enter__(self) -> PeakMemory:
        self.start = self.peak = rss_bytes()
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.is_set():
                self.peak = max(self.peak, rss_bytes())
                self._stop.wait(self.interval)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
        if self.device is not None and self.device.type == "cuda":
            self.cuda_peak = torch.cuda.max_memory_allocated(self.device)

    @property
    def start_rss_mib(self) -> float:
        return self.start / 2**20

    @property
    def peak_rss_mib(self) -> float:
        return self.peak / 2**20

    @property
    def growth_mib(self) -> float:
        return (self.peak - self.start) / 2**20

    @property
    def cuda_peak_mib(self) -> float | None:
        return None if self.cuda_peak is None else self.cuda_peak / 2**20
