"""Progress bars that suit where they are read: tqdm on a terminal or in a notebook; in a
log file or a pipe, a plain line now and then (an epoch's end, every tenth of an
extraction) instead of tqdm's carriage-return redraws, which fill a redirected log with
thousands of partial lines."""

from __future__ import annotations

import sys
import time
from typing import Any


def progress_bar(*, total: int, desc: str, unit: str, disable: bool = False, initial: int = 0,
                 lines_every: float | None = None) -> Any:
    """A tqdm bar when stderr is a terminal (or a notebook runs this), else plain lines.

    Args:
        total: the count at which the work is done.
        desc: what the bar measures (``"extract train"``).
        unit: what is counted (``"img"``, ``"step"``).
        disable: show nothing.
        initial: the count already done (a resumed extraction).
        lines_every: plain output only: also write a line each time this share of ``total``
            is done (``None``: only at :meth:`set_postfix`, one line per epoch, and at the
            end).
    """
    if disable or sys.stderr is None:
        return _Lines(total, desc, unit, initial, None, enabled=False)
    if _interactive():
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, unit=unit)
    return _Lines(total, desc, unit, initial, lines_every)


def hide_library_bars(quiet: bool = False) -> None:
    """With ``quiet``, or when stderr is not a terminal, turn off the progress bars of
    Hugging Face's libraries (loading weights, downloads): carriage-return redraws too."""
    if not quiet and _interactive():
        return
    import os

    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read when they are imported
    # imported by name: a package in sys.modules may lack the submodule still (its
    # attributes load lazily: `from huggingface_hub import constants` leaves no .utils)
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging

        logging.disable_progress_bar()


def _interactive() -> bool:
    if "ipykernel" in sys.modules:  # a notebook: tqdm.auto draws a widget
        return True
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed
        return False


class _Lines:
    """The part of tqdm's interface inca uses, written as whole lines to stderr."""

    def __init__(self, total: int, desc: str, unit: str, initial: int,
                 lines_every: float | None, enabled: bool = True) -> None:
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.enabled = enabled
        self._step = max(1, round(total * lines_every)) if lines_every and total else None
        self._next = (initial // self._step + 1) * self._step if self._step else None
        self._postfix = ""
        self._start = time.perf_counter()
        self._closed = False
        self._written: int | None = None  # the count of the last line written

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._next is not None and self.n >= self._next and self.n < self.total:
            self._write()
            self._next = (self.n // self._step + 1) * self._step

    def set_postfix(self, values: dict[str, Any]) -> None:
        self._postfix = ", ".join(f"{k}={v}" for k, v in values.items())
        self._write()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._written != self.n:  # no line repeating the last one
                self._write(done=True)

    def _write(self, done: bool = False) -> None:
        if not self.enabled:
            return
        self._written = self.n
        seconds = time.perf_counter() - self._start
        line = f"{self.desc}: {self.n}/{self.total} {self.unit}, {seconds:.1f} s"
        if self._postfix:
            line += f", {self._postfix}"
        print(line + (" (done)" if done and self.n >= self.total else ""), file=sys.stderr,
              flush=True)
