"""What a bad-input case of the faults benchmark is (part 2), how its outcome is judged
(a clear error, or the correct result), the input files the cases share, and how the
cases run (``--jobs`` at a time)."""

from __future__ import annotations

import functools
import io
import sys
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from _faults_bench import Run, last_line, short
from PIL import Image
from tiny import png

from inca.data import load_dataset

HANDLED, UNCLEAR, REFUSED, SILENT = ("handled", "unclear error", "wrongly refused",
                                     "silent wrong")


@dataclass
class Verdict:
    outcome: str  # HANDLED, UNCLEAR, REFUSED or SILENT
    detail: str
    data_lost: bool = False


@dataclass
class Case:
    id: str
    area: str  # cli, library, http
    input: str  # what was fed, in words
    expect: str  # "clear error" or "correct result"
    run: Callable[[], Verdict] = field(repr=False)
    reproduce: str = ""
    process: str = ""  # CLI cases: "own" subprocess, or "shared" (this process)


def error_verdict(r: Run, mention: tuple[str, ...] = ()) -> Verdict:
    """A CLI run that should end in a clear error: exit 2, one ``error: ...`` line (only
    progress-bar redraws may follow it), no traceback, naming ``mention``."""
    err = r.stderr
    if r.rc == 0:
        return Verdict(SILENT, "exit 0: the bad input was accepted; " + short(last_line(r.stdout)))
    at = err.rfind("error: ")
    stop = err.find("\n", at) if at >= 0 else -1
    message = err[at:stop if stop >= 0 else None].strip() if at >= 0 else ""
    after = [ln for ln in err[stop + 1:].replace("\r", "\n").splitlines()
             if ln.strip()] if stop >= 0 else []
    problems = []
    if r.rc != 2:
        problems.append(f"exit {r.rc}")
    if "Traceback" in err:
        problems.append("a traceback")
    if at < 0:
        problems.append("no 'error:' line")
    elif any("%|" not in ln for ln in after):
        problems.append("more output after the error line")
    missing = [m for m in mention if m.lower() not in message.lower()]
    if at >= 0 and missing:
        problems.append(f"the message does not name {missing}")
    if " object at 0x" in message:
        problems.append("an object repr in the message")
    if problems:
        shown = message if at >= 0 and "Traceback" not in err else last_line(err)
        return Verdict(UNCLEAR, "; ".join(problems) + ": " + short(shown))
    notes = []
    if at > 0 and err[at - 1] != "\n":
        notes.append("printed on the line of an unfinished progress bar")
    if after:
        notes.append("the bar is drawn again after it")
    return Verdict(HANDLED, short(message) + (f" [{'; '.join(notes)}]" if notes else ""))


def result_verdict(r: Run, check: Callable[[], str | None]) -> Verdict:
    """A CLI run that should succeed; ``check()`` returns what is wrong, or ``None``."""
    if r.rc != 0:
        return Verdict(REFUSED, f"exit {r.rc}: " + short(last_line(r.stderr)))
    problem = check()
    return Verdict(SILENT, problem) if problem else Verdict(HANDLED, "correct result")


def write_folder(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def encoded(image: Image.Image, fmt: str, **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def digit_images(n: int, split: str = "test", scale: int = 4) -> list[Image.Image]:
    """``n`` digits (8x8, 0..255) as grey images ``scale`` times larger."""
    ds = load_dataset("digits", split=split)
    return [Image.fromarray(ds.images[i]).resize((8 * scale, 8 * scale), Image.NEAREST)
            for i in range(n)]


class Inputs:
    """Image files shared by the cases (made once)."""

    def __init__(self) -> None:
        rng = np.random.default_rng(0)
        digits = digit_images(24)
        self.good = [png(im) for im in digits]
        self.digits = digits
        self.corrupt = b"\x89PNG\r\n\x1a\n" + rng.integers(0, 256, 400, dtype=np.uint8).tobytes()
        self.truncated = self.good[0][: len(self.good[0]) // 2]
        self.jpeg = encoded(digits[1].convert("RGB"), "JPEG", quality=95)
        wide = np.asarray(digits[2], dtype=np.uint16) * 257  # the same picture in 16 bits
        self.deep = png(Image.fromarray(wide))
        self.deep_twin = self.good[2]
        dark = np.asarray(digits[3], dtype=np.uint16)  # 0..255: the darkest 0.4% of 16 bits
        self.dark = png(Image.fromarray(dark))
        self.dark_twin = png(Image.fromarray(((dark.astype(np.uint32) + 128) // 257)
                                             .astype(np.uint8)))
        f32 = np.asarray(digits[4], dtype=np.float32) / 255
        self.float_tiff = encoded(Image.fromarray(f32), "TIFF")
        self.float_twin = self.good[4]

    @functools.cached_property
    def bomb(self) -> bytes:
        """A 12000x12000 1-bit PNG: 18 KB that decode to 144 megapixels."""
        return png(Image.new("1", (12000, 12000)))

    @functools.cached_property
    def hard_bomb(self) -> bytes:
        """14000x14000: over twice Pillow's limit, refused by Pillow itself."""
        return png(Image.new("1", (14000, 14000)))


def run_cases(cases: list[Case], jobs: int, scrub: Callable[[str], str]
              ) -> list[dict[str, Any]]:
    def one(c: Case) -> dict[str, Any]:
        t = time.perf_counter()
        try:
            v = c.run()
        except Exception as e:  # noqa: BLE001 - the harness failed, not the product
            v = Verdict("harness error", f"{type(e).__name__}: {e} | "
                        + short(traceback.format_exc(), 600))
        row = {"id": c.id, "area": c.area, "process": c.process, "input": c.input,
               "expect": c.expect, "outcome": v.outcome, "detail": scrub(v.detail),
               "data_lost": v.data_lost,
               "reproduce": scrub(c.reproduce), "seconds": round(time.perf_counter() - t, 2)}
        print(f"  {c.id}: {v.outcome}", file=sys.__stdout__, flush=True)
        return row

    if jobs <= 1:
        return [one(c) for c in cases]
    with ThreadPoolExecutor(jobs) as pool:
        return list(pool.map(one, cases))
