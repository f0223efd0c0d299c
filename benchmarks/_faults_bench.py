"""The faults benchmark's workspace (``benchmarks/faults.py``): the run's temporary folder,
backbone and child processes, the scrubbing of what it records (:class:`Bench`), and the
small helpers its parts share (text, pipes, caches, tasks).

The tests' helper module ``tests/tiny.py`` goes on ``sys.path`` here: the benchmark is the
heavier, repeated version of the fault tests and takes their tampers, request bodies and
tiny models from it. Every ``_faults_*`` module imports this one before ``tiny`` (the
import order sorts ``_faults_bench`` first).
"""

from __future__ import annotations

import os
import select
import shlex
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import inca
from inca.errors import InCAError
from inca.features.cache import ActivationCache, read_manifest
from inca.task import Task

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # tests/tiny.py: the tests' helpers, shared
from tiny import save_tiny_hf_vit, task_state  # noqa: E402

SOURCE = Path(inca.__file__).resolve().parents[2]  # the checkout whose inca runs
HOST = "127.0.0.1"  # loopback only
KEY = "faults-benchmark-key"
INPUT_SIZE = 28
CLASSES = [str(i) for i in range(10)]


# `inca` with os.fsync patched: a full or a stalled disk (FAULTS_FSYNC selects the fault).
WRAPPER = '''"""`inca` with os.fsync patched: a full disk or a stalled one (benchmarks/faults.py).

FAULTS_FSYNC=enospc-path:TEXT  fsyncs of files whose path holds TEXT fail with ENOSPC, as
                               a full disk reports it when data is flushed
FAULTS_FSYNC=stall:FILE        every fsync waits until FILE exists (a stalled disk)
"""
import errno, os, sys, time

mode, _, arg = os.environ.get("FAULTS_FSYNC", "").partition(":")
real_fsync = os.fsync


def fsync(fd):
    if mode == "stall":
        while not os.path.exists(arg):
            time.sleep(0.05)
    elif mode == "enospc-path" and arg in os.readlink(f"/proc/self/fd/{fd}"):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real_fsync(fd)


os.fsync = fsync
from inca.cli import main  # noqa: E402

sys.argv[0] = "inca"
sys.exit(main())
'''


@dataclass
class Run:
    """One finished CLI process."""

    args: list[str]
    rc: int
    stdout: str
    stderr: str
    seconds: float


class Bench:
    """The run's temporary folder, its backbone, the child processes it started, and the
    scrubbing of machine paths from everything recorded."""

    def __init__(self, tmp: Path, backbone: str, threads: int) -> None:
        self.tmp = tmp
        self.threads = threads
        self._procs: set[subprocess.Popen] = set()
        self._lock = threading.Lock()
        self.bb_lock = threading.Lock()  # in-process passes, one at a time (hooks)
        self.cli_lock = threading.Lock()  # in-process CLI runs swap sys.stdout/stderr
        self.bb, self.spec, self.kwargs, self.cli_backbone = choose_backbone(backbone, tmp)
        names = self.bb.layers
        self.layers = list(dict.fromkeys([names[len(names) // 4], names[len(names) // 2],
                                          names[-1]]))
        self.wrapper = tmp / "inca_patched.py"
        self.wrapper.write_text(WRAPPER)

    # processes
    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "INCA_API_KEY"}
        env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                    "OMP_NUM_THREADS": str(self.threads)})
        return env | (extra or {})

    def spawn(self, cmd: list[str], **kwargs: Any) -> subprocess.Popen:
        p = subprocess.Popen(cmd, **kwargs)
        with self._lock:
            self._procs.add(p)
        return p

    def end(self, p: subprocess.Popen) -> None:
        """Kill ``p`` if it still runs, reap it, forget it."""
        try:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=30)
        finally:
            with self._lock:
                self._procs.discard(p)

    def end_all(self) -> None:
        with self._lock:
            procs = list(self._procs)
        for p in procs:
            self.end(p)

    def run(self, args: list[str], *, patch: str | None = None, timeout: float = 300.0
            ) -> Run:
        """``inca ARGS`` in a subprocess (through the fsync-patching wrapper with ``patch``)."""
        cmd = [sys.executable, str(self.wrapper)] if patch else \
            [sys.executable, "-m", "inca.cli"]
        extra = {"FAULTS_FSYNC": patch} if patch else {}
        t = time.perf_counter()
        p = self.spawn([*cmd, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True, env=self.env(extra))
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
            err += f"\n[faults.py: killed after {timeout:.0f} s]"
        finally:
            self.end(p)
        return Run(args, p.returncode, out, err, time.perf_counter() - t)

    def cli(self, args: list[str]) -> Run:
        """``inca ARGS`` in this process (typer's runner: the same commands and error
        handling, without a new interpreter's start-up); an exception escaping the command
        is written to ``stderr`` as the traceback a process would print."""
        from typer.testing import CliRunner

        from inca.cli import app

        with self.cli_lock, self.bb_lock:
            t = time.perf_counter()
            res = CliRunner().invoke(app, args)
            err = res.stderr
            if res.exception is not None and not isinstance(res.exception, SystemExit):
                err += "Traceback (most recent call last):\n" + "".join(
                    traceback.format_exception(*res.exc_info)[-3:])
            return Run(args, res.exit_code, res.stdout, err, time.perf_counter() - t)

    # records
    def scrub(self, text: str) -> str:
        """``text`` without machine paths: the temporary folder becomes ``$TMP``."""
        for path, name in ((str(self.tmp.resolve()), "$TMP"), (str(self.tmp), "$TMP"),
                           (sys.executable, "python"), (str(SOURCE), "."),
                           (str(REPO), ".")):
            text = text.replace(path, name)
        return text

    def repro(self, args: list[str], patch: str | None = None) -> str:
        head = f"FAULTS_FSYNC={patch} python $TMP/inca_patched.py" if patch else "inca"
        return self.scrub(f"{head} {shlex.join(args)}")


def source_info() -> dict[str, Any]:
    """The commit of the inca that runs, and whether its ``src`` has uncommitted changes."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(SOURCE), *args], capture_output=True,
                              text=True, timeout=30).stdout.strip()
    try:
        return {"commit": git("rev-parse", "--short", "HEAD") or None,
                "uncommitted_changes_in_src": bool(git("status", "--porcelain", "--", "src"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "uncommitted_changes_in_src": None}


def choose_backbone(name: str, tmp: Path) -> tuple[Any, str, dict[str, Any], list[str]]:
    """``(backbone, spec, create kwargs, CLI options)``: the bundled DINOv2 at 28 px, or a
    tiny random Hugging Face ViT (``tests/tiny.py``'s) where its weights are missing."""
    if name in ("auto", "dinov2"):
        try:
            bb = inca.create_backbone("dinov2_vits14", device="cpu", input_size=INPUT_SIZE)
            return bb, "dinov2_vits14", {"input_size": INPUT_SIZE}, [
                "--backbone", "dinov2_vits14", "--input-size", str(INPUT_SIZE)]
        except InCAError:
            if name == "dinov2":
                raise
    spec = f"hf:{save_tiny_hf_vit(tmp / 'tiny-hf-vit')}"
    return inca.create_backbone(spec, device="cpu"), spec, {}, ["--backbone", spec]


def last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.replace("\r", "\n").splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def short(text: str, n: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n - 3] + "..."


def wait_line(proc: subprocess.Popen, token: bytes, timeout: float) -> bytes | None:
    """Read ``proc``'s stdout (a binary pipe) until a line equal to ``token``; what was
    read after that line, or ``None`` when it exits or ``timeout`` passes first."""
    deadline, buf = time.monotonic() + timeout, b""
    fd = proc.stdout.fileno()
    while time.monotonic() < deadline:
        if select.select([fd], [], [], 0.05)[0]:
            chunk = os.read(fd, 4096)
            if not chunk:
                return None
            buf += chunk
            if token + b"\n" in buf:
                return buf.split(token + b"\n", 1)[1]
        elif proc.poll() is not None:
            return None
    return None


def drain(proc: subprocess.Popen) -> bytes:
    """What is left in ``proc``'s stdout pipe (after it ended)."""
    if proc.stdout is None:
        return b""
    out, fd = b"", proc.stdout.fileno()
    while select.select([fd], [], [], 0)[0]:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        out += chunk
    return out


def task_diff(a: Task, b: Task) -> float:
    """Largest weight difference of two tasks (``inf`` when their structure differs)."""
    sa, sb = task_state(a), task_state(b)
    if a.classes != b.classes or a.member_layers != b.member_layers or sa.keys() != sb.keys():
        return float("inf")
    if any(sa[k].shape != sb[k].shape for k in sa):
        return float("inf")
    return max((float((sa[k].float() - sb[k].float()).abs().max()) for k in sa), default=0.0)


def cache_arrays(folder: Path) -> dict[str, np.ndarray]:
    cache = ActivationCache(folder)
    idx = np.arange(len(cache))
    out = {layer: cache.get_numpy(layer, idx) for layer in cache.layers}
    out["labels"] = np.asarray(cache.labels)
    return out


def compare_arrays(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> tuple[bool, float]:
    """``(bitwise equal, largest difference)``; ``inf`` when keys or shapes differ."""
    if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
        return False, float("inf")
    diff = max(float(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)).max(initial=0))
               for k in a)
    return all(np.array_equal(a[k], b[k]) for k in a), diff


def recorded(folder: Path) -> list[dict[str, Any]]:
    """The shards a cache folder records as written: its manifest's list, and the shards'
    own records where the cache keeps them (``shards/<i>/shard.json``)."""
    try:
        manifest = read_manifest(folder)
    except InCAError:
        return []
    try:
        from inca.features.cache import recorded_shards
    except ImportError:  # caches that record shards in the manifest only
        return list((manifest or {}).get("shards", []))
    return recorded_shards(folder, manifest)


def shard_files(folder: Path) -> dict[str, tuple[int, int, int]]:
    """``{file: (inode, mtime_ns, size)}`` of the shards a cache folder records."""
    out = {}
    for s in recorded(folder):
        shard = folder / "shards" / f"{s['index']:05d}"
        for f in sorted(shard.glob("*.npy")) if shard.is_dir() else []:
            st = f.stat()
            out[str(f.relative_to(folder))] = (st.st_ino, st.st_mtime_ns, st.st_size)
    return out


def changed(before: dict[str, tuple[int, int, int]], folder: Path) -> list[str]:
    """Files of ``before`` rewritten (another inode or time) or gone under ``folder``."""
    out = []
    for name, sig in before.items():
        f = folder / name
        if not f.exists():
            out.append(name)
            continue
        st = f.stat()
        if (st.st_ino, st.st_mtime_ns, st.st_size) != sig:
            out.append(name)
    return out


def cache_phase(folder: Path) -> str:
    try:
        m = read_manifest(folder)
    except InCAError as e:
        return f"unreadable manifest ({e})"
    if m is None:
        return "no manifest yet"
    total = -(-m["num_samples"] // m["shard_size"])
    return "complete" if m.get("complete") else f"{len(recorded(folder))}/{total} shards"


def stale(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*.tmp")) \
        if folder.exists() else []
