"""Faults at scale: repeated kill -9, a catalogue of bad inputs, `inca serve` under bombs.

Usage: python benchmarks/faults.py [--kills 8] [--fit-kills 4] [--seed 0] [--jobs 2]
           [--threads 1] [--requests 400] [--rounds 4] [--clients 4] [--bomb-clients 2]
           [--bombs-per-request 3] [--parts kills,inputs,load] [--backbone auto]
           [--quick] [--results-dir DIR]

The heavier, repeated version of the fault tests (tests/test_faults_*.py), on a small
backbone (the bundled DINOv2 ViT-S/14 at 28 px, or a tiny random Hugging Face ViT where
its weights are not installed) and scikit-learn's digits. About 4 minutes on 2 busy cores.

1. Kills (``--parts extract,save,fit``). Subprocesses get SIGKILL at seeded random
   moments. ``extract_to_cache`` (``--kills`` times, a moment within the time an
   uninterrupted worker took): resumed here, the cache must equal the uninterrupted one
   and no shard recorded before the kill may be extracted again. ``Task.save`` rotating
   three tasks into one folder (``--kills`` times): the folder must load as exactly the
   last finished save or the one in progress, and the next save must leave nothing
   behind. ``inca fit --out`` (``--fit-kills`` times, each after one of the run's moments
   in turn, plus a random part of the next phase): the same command run again must
   succeed, keep the cache files recorded before the kill, and give the cache and the task
   of an uninterrupted run. Workers start one ahead and wait for ``go``, so start-up costs
   neither time nor kill moments.
2. Bad inputs (``--parts library,cli,http``). Bad images and folders, tampered task files,
   bad options, a full and a stalled disk, a second writer, damaged caches, ``inca serve``
   refusing to start, hostile HTTP requests to a real ``inca serve``, and the cases of an
   outside attack (``_faults_attack.py``: thin strips, a hub classifier checkpoint, a cache
   overwritten in place, 2 million task names, odd manifests, edited task files, EXIF
   orientation, media types, /docs). Handled clearly: a
   4xx with a JSON ``detail``; exit code 2 with one ``error: ...`` line on stderr (only
   progress-bar redraws after it) and no traceback; or the correct result where one is
   expected (16-bit images scaled, hidden files ignored). A bad input accepted, or a valid
   one answered wrongly, is a silent wrong result. CLI cases that need a process of their
   own (patched disks, second writers, data-loading workers, serve) get one, ``--jobs``
   at a time; the others run through typer's runner in this process.
3. Load with bombs (``--parts load``). ``inca serve`` (batching on, an API key) answers
   one-image requests from ``--clients`` threads, alone and while ``--bomb-clients``
   threads post decompression bombs (12000x12000 PNGs, ``--bombs-per-request`` each)
   without pause, in alternating rounds. Every answer is checked against in-process
   ``Task.predict_proba`` of the same bytes. The bombers are a process of their own;
   clients, bombers and server share the CPUs.

``--quick`` runs the library cases only (a smoke test). Every subprocess is ended in
``finally`` blocks; everything is written to a temporary folder.
Results: benchmarks/results/faults.{json,md}.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import functools
import hashlib
import http.client
import io
import json
import os
import random
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import command_line, cpu_seconds, environment, pct, write_results
from PIL import Image

import inca
from inca.adapters import create_adapter
from inca.data import load_dataset
from inca.errors import InCAError
from inca.features import extract_to_cache
from inca.features.cache import ActivationCache, read_manifest
from inca.task import TASK_JSON, TASK_WEIGHTS, Task, load_task, read_task_files

REPO = Path(__file__).resolve().parents[1]
SOURCE = Path(inca.__file__).resolve().parents[2]  # the checkout whose inca runs
HOST = "127.0.0.1"  # loopback only
KEY = "faults-benchmark-key"
INPUT_SIZE = 28
CLASSES = [str(i) for i in range(10)]

HANDLED, UNCLEAR, REFUSED, SILENT = ("handled", "unclear error", "wrongly refused",
                                     "silent wrong")

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

# Extracts digits into a cache until killed (part 1a); starts on "go" (stdin), once warm.
EXTRACT_WORKER = '''
import json, sys
cfg = json.loads(sys.argv[1])
import inca
from inca.data import load_dataset
from inca.features import extract_to_cache
bb = inca.create_backbone(cfg["spec"], device="cpu", **cfg["kwargs"])
ds = load_dataset("digits", limit=cfg["n"])
bb.fingerprint()
print("ready", flush=True)
sys.stdin.readline()
extract_to_cache(bb, ds, cfg["out"], layers=cfg["layers"], batch_size=cfg["batch_size"],
                 shard_size=cfg["shard_size"], num_workers=0, progress=False)
print("done", flush=True)
'''

# Saves three tasks into one folder in turn, printing the count of finished saves (1b);
# starts on "go" (stdin).
SAVE_WORKER = '''
import json, sys, torch
cfg = json.loads(sys.argv[1])
from inca.adapters import create_adapter
from inca.task import Task
info = json.loads(open(cfg["info"]).read())

def make(seed):
    torch.manual_seed(seed)
    head = create_adapter("inca", embed_dim=cfg["embed_dim"], num_classes=len(cfg["classes"]))
    with torch.no_grad():
        for p in head.parameters():
            p.normal_()
    return Task([head], [[cfg["layer"]]], cfg["classes"], info, keys=["inca/" + cfg["layer"]])

tasks = [make(s) for s in cfg["seeds"]]
print("ready", flush=True)
sys.stdin.readline()
i = 0
while True:
    tasks[i % len(tasks)].save(cfg["folder"])
    i += 1
    print(i, flush=True)
'''


# Posts decompression bombs from several threads until told "stop" (part 3): a process of
# its own, as an attacker is, so its threads hold no lock the measured clients need.
BOMBER = '''
import json, sys, threading, time
import httpx
cfg = json.loads(sys.argv[1])
body = open(cfg["body"], "rb").read()
stop, lock = threading.Event(), threading.Lock()
stats = {"sent": 0, "status": {}, "latency": []}

def bomb():
    headers = {"X-API-Key": cfg["key"], "Content-Type": cfg["ctype"]}
    with httpx.Client(timeout=cfg["timeout"], headers=headers) as c:
        while not stop.is_set():
            t = time.perf_counter()
            try:
                status = str(c.post(cfg["url"], content=body).status_code)
            except Exception as e:
                status = type(e).__name__
            with lock:
                stats["sent"] += 1
                stats["status"][status] = stats["status"].get(status, 0) + 1
                stats["latency"].append(time.perf_counter() - t)

threads = [threading.Thread(target=bomb, daemon=True) for _ in range(cfg["threads"])]
for th in threads:
    th.start()
while stats["sent"] < cfg["threads"]:
    time.sleep(0.01)
print("ready", flush=True)
sys.stdin.readline()
stop.set()
for th in threads:
    th.join(timeout=cfg["timeout"] + 5)
print(json.dumps(stats), flush=True)
'''


# -- the run's workspace -------------------------------------------------------------
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
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    folder = tmp / "tiny-hf-vit"
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                       intermediate_size=64, image_size=32, patch_size=8)
             ).save_pretrained(folder)
    spec = f"hf:{folder}"
    return inca.create_backbone(spec, device="cpu"), spec, {}, ["--backbone", spec]


# -- small helpers -------------------------------------------------------------------
def png(image: Image.Image, **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", **kwargs)
    return buf.getvalue()


def encoded(image: Image.Image, fmt: str, **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def digit_images(n: int, split: str = "test", scale: int = 4) -> list[Image.Image]:
    """``n`` digits (8x8, 0..255) as grey images ``scale`` times larger."""
    ds = load_dataset("digits", split=split)
    return [Image.fromarray(ds.images[i]).resize((8 * scale, 8 * scale), Image.NEAREST)
            for i in range(n)]


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


def task_state(task: Task) -> dict[str, torch.Tensor]:
    return {f"{i}.{k}": v for i, m in enumerate(task.members) for k, v in m.state_dict().items()}


def task_diff(a: Task, b: Task) -> float:
    """Largest weight difference of two tasks (``inf`` when their structure differs)."""
    sa, sb = task_state(a), task_state(b)
    if a.classes != b.classes or a.member_layers != b.member_layers or sa.keys() != sb.keys():
        return float("inf")
    if any(sa[k].shape != sb[k].shape for k in sa):
        return float("inf")
    return max((float((sa[k].float() - sb[k].float()).abs().max()) for k in sa), default=0.0)


def random_task(bb: Any, layer: str, seed: int) -> Task:
    """An untrained task with random (not initial) weights, so copies are told apart (the
    same construction as SAVE_WORKER's)."""
    torch.manual_seed(seed)
    head = create_adapter("inca", embed_dim=bb.embed_dims[layer], num_classes=len(CLASSES))
    with torch.no_grad():
        for p in head.parameters():
            p.normal_()
    return Task([head], [[layer]], CLASSES, bb.describe(), keys=[f"inca/{layer}"])


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


# -- part 1: kills ----------------------------------------------------------------------
class Warm:
    """Worker processes started one ahead (:meth:`prepare`): the next one imports torch
    while this process checks the last kill, and works only once told ``go`` (so kill
    moments count from the work, not from a start-up whose length varies with the load)."""

    def __init__(self, b: Bench, code: str, cfg: Callable[[int], dict[str, Any]],
                 log: Callable[[int], Path]) -> None:
        self.b, self.code, self.cfg, self.log = b, code, cfg, log
        self.next: tuple[int, subprocess.Popen] | None = None

    def _spawn(self, i: int) -> subprocess.Popen:
        with open(self.log(i), "wb") as f:
            return self.b.spawn([sys.executable, "-c", self.code, json.dumps(self.cfg(i))],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=f,
                                env=self.b.env())

    def prepare(self, i: int) -> None:
        """Start worker ``i``'s start-up now."""
        self.close()
        self.next = (i, self._spawn(i))

    def start(self, i: int) -> subprocess.Popen:
        """Worker ``i``, ready and told to go."""
        if self.next and self.next[0] == i:
            proc = self.next[1]
        else:
            self.close()
            proc = self._spawn(i)
        self.next = None
        if wait_line(proc, b"ready", 300) is None:
            self.b.end(proc)
            raise RuntimeError(f"worker {i} failed:\n"
                               + self.log(i).read_text(errors="replace")[-2000:])
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        return proc

    def close(self) -> None:
        if self.next:
            self.b.end(self.next[1])
            self.next = None


def kill_after(proc: subprocess.Popen, delay: float) -> tuple[bool, bytes]:
    """SIGKILL ``proc`` ``delay`` s from now. ``(killed while running, its stdout)``."""
    time.sleep(delay)
    if proc.poll() is not None:
        return False, drain(proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    return True, drain(proc)


def kill_extractions(b: Bench, kills: int, rng: random.Random) -> list[dict[str, Any]]:
    """Part 1a: ``extract_to_cache`` killed, resumed here, compared with a clean run."""
    root = b.tmp / "kill-extract"
    root.mkdir()
    n, params = 480, {"layers": b.layers, "batch_size": 16, "shard_size": 32}
    ds = load_dataset("digits", limit=n)
    warm = Warm(b, EXTRACT_WORKER, lambda i: {"spec": b.spec, "kwargs": b.kwargs, "n": n,
                                              "out": str(root / f"run{i}"), **params},
                lambda i: root / f"run{i}.log")
    rows = []
    try:
        # worker 0 runs uninterrupted: the reference cache, and how long extraction takes
        proc = warm.start(0)
        t = time.monotonic()
        ok = wait_line(proc, b"done", 600) is not None
        window = time.monotonic() - t
        b.end(proc)
        warm.prepare(1)
        if not ok:
            raise RuntimeError("extraction worker failed:\n"
                               + (root / "run0.log").read_text(errors="replace")[-2000:])
        clean = cache_arrays(root / "run0")
        attempt = 0
        while len(rows) < kills and attempt < 3 * kills:
            attempt += 1
            delay = rng.uniform(0, window)
            proc = warm.start(attempt)
            try:
                killed, _ = kill_after(proc, delay)
            finally:
                b.end(proc)
            warm.prepare(attempt + 1)
            if killed:
                rows.append(resume_extraction(b, ds, root / f"run{attempt}", params, clean,
                                              delay, window))
    finally:
        warm.close()
    return rows


def resume_extraction(b: Bench, ds: Any, out: Path, params: dict[str, Any],
                      clean: dict[str, np.ndarray], delay: float, window: float
                      ) -> dict[str, Any]:
    phase, before = cache_phase(out), shard_files(out)
    done = sum(s["count"] for s in recorded(out))
    row: dict[str, Any] = {"kind": "extract_to_cache", "kill_after_s": round(delay, 3),
                           "clean_extraction_s": round(window, 3),
                           "state_at_kill": phase, "stale_tmp_at_kill": len(stale(out)),
                           "samples_recorded": done}
    seen: list[int] = []
    real = b.bb.extract

    def counting(x: torch.Tensor, layers: Any = None) -> dict[str, torch.Tensor]:
        seen.append(len(x))
        return real(x, layers)

    b.bb.extract = counting
    try:
        extract_to_cache(b.bb, ds, out, num_workers=0, progress=False, **params)
        error = None
    except Exception as e:  # noqa: BLE001 - recorded: the resume failed
        error = f"{type(e).__name__}: {e}"
    finally:
        del b.bb.extract
    row["resume_error"] = b.scrub(error) if error else None
    extracted = max(sum(seen) - 1, 0)  # one image is the shape probe
    rewritten = changed(before, out)
    row.update(images_extracted_on_resume=extracted, expected=len(ds) - done,
               recorded_files_rewritten=len(rewritten), stale_tmp_after=len(stale(out)))
    bitwise, diff = (False, float("inf"))
    if error is None:
        bitwise, diff = compare_arrays(cache_arrays(out), clean)
    row.update(bitwise_equal=bitwise, max_abs_diff=diff)
    row["data_lost"] = error is not None or bool(rewritten) or extracted > len(ds) - done
    row["silent_wrong"] = error is None and not (diff <= 1e-3)
    row["survived"] = not (row["data_lost"] or row["silent_wrong"] or row["stale_tmp_after"])
    return row


def kill_saves(b: Bench, kills: int, rng: random.Random) -> list[dict[str, Any]]:
    """Part 1b: ``Task.save`` rotating three tasks into one folder, killed; the folder
    must load as the last finished save or the one in progress."""
    root = b.tmp / "kill-save"
    root.mkdir()
    layer = b.layers[0]
    seeds = [11, 12, 13]
    tasks = [random_task(b.bb, layer, s) for s in seeds]
    first, recovery = random_task(b.bb, layer, 10), random_task(b.bb, layer, 14)
    info = root / "backbone.json"
    info.write_text(json.dumps(b.bb.describe()))
    warm = Warm(b, SAVE_WORKER, lambda i: {
        "info": str(info), "embed_dim": b.bb.embed_dims[layer], "layer": layer,
        "classes": CLASSES, "seeds": seeds, "folder": str(root / f"run{i}" / "task")},
        lambda i: root / f"run{i}.log")
    try:
        return [kill_save(b, warm, i, rng.uniform(0.02, 1.0), first, tasks, recovery)
                for i in range(kills)]
    finally:
        warm.close()


def kill_save(b: Bench, warm: Warm, i: int, delay: float, first: Task, tasks: list[Task],
              recovery: Task) -> dict[str, Any]:
    """Worker ``i`` saving ``tasks`` in turn over ``first``, killed after ``delay`` s."""
    folder = Path(warm.cfg(i)["folder"])
    first.save(folder)
    proc = warm.start(i)
    try:
        killed, out = kill_after(proc, delay)
    finally:
        b.end(proc)
    warm.prepare(i + 1)
    if not killed:
        raise RuntimeError("the save worker ended on its own:\n"
                           + warm.log(i).read_text(errors="replace")[-2000:])
    lines = out.split()
    done = int(lines[-1]) if lines and lines[-1].isdigit() else 0
    # saves finished: `done`; on disk must be the last finished one or the next
    last = first if done == 0 else tasks[(done - 1) % 3]
    nxt = tasks[done % 3]
    siblings = sorted(p.name for p in folder.parent.iterdir() if p.name != ".task.lock")
    row: dict[str, Any] = {"kind": "Task.save", "kill_after_s": round(delay, 3),
                           "saves_finished": done, "folder_at_kill": siblings,
                           "state_at_kill": save_state(siblings)}
    try:
        loaded = load_task(folder, backbone=b.bb)
        found = "last finished save" if task_diff(loaded, last) == 0 else \
            "save in progress" if task_diff(loaded, nxt) == 0 else "another task"
    except Exception as e:  # noqa: BLE001 - recorded: the folder did not load
        found = f"unloadable: {type(e).__name__}: {b.scrub(str(e))}"
    row["loaded_as"] = found
    try:
        recovery.save(folder)
        recovered = task_diff(load_task(folder, backbone=b.bb), recovery) == 0
        left = sorted(p.name for p in folder.parent.iterdir()
                      if p.name not in ("task", ".task.lock"))
    except Exception as e:  # noqa: BLE001 - recorded
        recovered, left = False, [f"{type(e).__name__}: {b.scrub(str(e))}"]
    row.update(next_save_ok=recovered, left_behind=left)
    row["data_lost"] = found.startswith("unloadable")
    row["silent_wrong"] = found == "another task"
    row["survived"] = found in ("last finished save", "save in progress") and recovered \
        and not left
    return row


def save_state(siblings: list[str]) -> str:
    """Where a kill caught ``Task.save``, from what it left beside the folder."""
    new, old, task = (any(n.startswith(".task.new-") for n in siblings),
                      ".task.old" in siblings, "task" in siblings)
    if old and not task:
        return "between the two renames (old task aside, no task folder)"
    if old:
        return "after the swap (old copy not yet removed)"
    if new:
        return "writing the new copy"
    return "between saves"


def fit_args(b: Bench, out: Path) -> list[str]:
    return ["fit", *b.cli_backbone, "--data", "digits", "--limit", "512", "--test-limit", "32",
            "--out", str(out), "--mode", "cached", "--kinds", "inca,linear", "--layers",
            ",".join(b.layers[:2]), "--lrs", "3e-3", "--epochs", "1", "--batch-size", "32",
            "--num-workers", "0", "--device", "cpu"]


def fit_state(out: Path) -> str:
    train, test = out / "cache" / "train", out / "cache" / "test"
    if not (train / "manifest.json").exists():
        return "starting (no cache yet)"
    for name, folder in (("train", train), ("test", test)):
        phase = cache_phase(folder)
        if phase != "complete":
            return f"extracting {name}: {phase}"
    if not (out / "task").exists():
        return "training or saving (caches complete, no task yet)"
    if not (out / "report.json").exists():
        return "task saved, report not yet"
    return "finishing (report written)"


def fit_anchors(out: Path) -> list[tuple[str, Callable[[], bool]]]:
    """Moments of an ``inca fit`` run that its folder shows, in order."""
    train, test = out / "cache" / "train", out / "cache" / "test"
    return [
        ("train cache begun", lambda: (train / "manifest.json").exists()),
        ("train shard 0 recorded", lambda: len(recorded(train)) >= 1),
        ("train cache complete", lambda: cache_phase(train) == "complete"),
        ("test cache complete", lambda: cache_phase(test) == "complete"),
        ("task saved", lambda: (out / "task" / TASK_JSON).exists()),
    ]


def kill_fits(b: Bench, kills: int, rng: random.Random) -> tuple[list[dict[str, Any]],
                                                                   dict[str, Any]]:
    """Part 1c: ``inca fit --out`` killed, then run again. Each kill waits for one of the
    run's moments (:func:`fit_anchors`, in turn from a seeded start) and then a random
    part of the time the clean run took from that moment to the next: every phase gets
    kills, whatever the machine's speed."""
    root = b.tmp / "kill-fit"
    root.mkdir()
    ref = root / "clean"
    t0 = time.monotonic()
    log = root / "clean.log"
    seen: dict[str, float] = {}
    with open(log, "wb") as f:
        proc = b.spawn([sys.executable, "-m", "inca.cli", *fit_args(b, ref)],
                       stdout=f, stderr=subprocess.STDOUT, env=b.env())
        try:
            anchors = fit_anchors(ref)
            while proc.poll() is None and time.monotonic() - t0 < 600:
                for name, reached in anchors:
                    if name not in seen and reached():
                        seen[name] = time.monotonic()
                time.sleep(0.005)
            proc.wait(timeout=60)
        finally:
            b.end(proc)
    if proc.returncode != 0 or len(seen) != len(anchors):
        raise RuntimeError(f"the clean fit failed:\n{log.read_text()[-3000:]}")
    ends = [seen[name] for name, _ in anchors[1:]] + [time.monotonic()]
    gaps = [end - seen[name] for (name, _), end in zip(anchors, ends, strict=True)]
    clean = {"seconds": round(time.monotonic() - t0, 2),
             "phases_s": {name: round(g, 2) for (name, _), g in zip(anchors, gaps, strict=True)}}
    ref_task = Task.from_files(read_task_files(ref / "task"))
    ref_caches = {s: cache_arrays(ref / "cache" / s) for s in ("train", "test")}
    rows, attempt, first = [], 0, rng.randrange(len(anchors))
    while len(rows) < kills and attempt < 3 * kills:
        attempt += 1
        out = root / f"run{attempt}"
        k = (first + len(rows)) % len(anchors)
        name, reached = fit_anchors(out)[k]
        delay = rng.uniform(0, gaps[k])
        proc = b.spawn([sys.executable, "-m", "inca.cli", *fit_args(b, out)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=b.env())
        try:
            deadline = time.monotonic() + 300
            while not reached() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.005)
            killed, _ = kill_after(proc, delay)
        finally:
            b.end(proc)
        if killed:
            rows.append(rerun_fit(b, out, f"{name} + {delay:.2f} s", ref_task, ref_caches))
    return rows, clean


def rerun_fit(b: Bench, out: Path, when: str, ref_task: Task,
              ref_caches: dict[str, dict[str, np.ndarray]]) -> dict[str, Any]:
    state = fit_state(out)
    before = {s: shard_files(out / "cache" / s) for s in ("train", "test")}
    row: dict[str, Any] = {"kind": "inca fit", "killed_at": when,
                           "state_at_kill": state,
                           "shard_files_recorded": sum(len(v) for v in before.values())}
    finished = (out / "report.json").is_file()
    r = b.run(fit_args(b, out))
    row.update(rerun_exit=r.rc, rerun_s=round(r.seconds, 2))
    refused = r.rc == 2 and "--overwrite" in r.stderr
    if refused:  # the task was saved: the same command will not replace it unasked
        row["rerun_error"] = b.scrub(last_line(r.stderr))
        r = b.run([*fit_args(b, out), "--overwrite"])  # as the message says
        row["overwrite_exit"] = r.rc
    if r.rc != 0:
        row["rerun_error"] = b.scrub(last_line(r.stderr))
        row.update(data_lost=True, silent_wrong=False, survived=False)
        return row
    rewritten = sum(len(changed(before[s], out / "cache" / s)) for s in before)
    diffs, bitwise = [], True
    try:
        for s, arrays in ref_caches.items():
            same, diff = compare_arrays(cache_arrays(out / "cache" / s), arrays)
            bitwise &= same
            diffs.append(diff)
        tdiff = task_diff(Task.from_files(read_task_files(out / "task")), ref_task)
    except InCAError as e:  # exit 0, yet its files do not read back
        row["read_back_error"] = b.scrub(str(e))
        diffs, bitwise, tdiff = [float("inf")], False, float("inf")
    row.update(recorded_files_rewritten=rewritten, cache_bitwise_equal=bitwise,
               cache_max_abs_diff=max(diffs), task_max_abs_diff=tdiff,
               report_written=(out / "report.json").is_file(),
               stale_tmp_after=len(stale(out)))
    row["data_lost"] = rewritten > 0
    row["silent_wrong"] = not (max(diffs) <= 1e-3 and tdiff <= 1e-4)
    # refusing to replace the task of a finished run protects it; of an unfinished one (no
    # report yet) it means the same command cannot finish the run
    row["survived"] = not (row["data_lost"] or row["silent_wrong"]) and row["report_written"] \
        and not row["stale_tmp_after"] and (finished or not refused)
    return row


# -- part 2: bad inputs -------------------------------------------------------------------
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


def edit_json(folder: Path, change: Callable[[dict[str, Any]], Any]) -> None:
    meta = json.loads((folder / TASK_JSON).read_text())
    change(meta)
    (folder / TASK_JSON).write_text(json.dumps(meta))


def rehash(folder: Path) -> None:
    """Record the weights' sha256, so the checks behind the hash are reached."""
    digest = hashlib.sha256((folder / TASK_WEIGHTS).read_bytes()).hexdigest()
    edit_json(folder, lambda m: m.update(weights_sha256=digest))


def edit_weights(folder: Path, change: Callable[[dict[str, torch.Tensor]], Any]) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / TASK_WEIGHTS))
    change(tensors)
    save_file(tensors, str(folder / TASK_WEIGHTS))
    rehash(folder)


def unknown_backbone(meta: dict[str, Any]) -> None:
    """The backbone a task rebuilds: its name, and its recorded source where there is one."""
    meta["backbone"]["name"] = "nope:xyz"
    if isinstance(meta["backbone"].get("source"), dict):
        meta["backbone"]["source"]["spec"] = "nope:xyz"


def nan_weight(t: dict[str, torch.Tensor]) -> None:
    name = next(k for k, v in t.items() if v.ndim == 2)
    t[name][0, 0] = float("nan")


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


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


def folder_cases(b: Bench, x: Inputs, ext: list[str]) -> list[Case]:
    """Bad images and folders through ``inca extract`` / ``inca fit``."""
    root = b.tmp / "inputs"
    good = {f"a/{i}.png": x.good[i] for i in range(4)} | \
        {f"b/{i}.png": x.good[4 + i] for i in range(4)}
    cases = []

    def extract_error(cid: str, what: str, files: dict[str, bytes], mention: tuple[str, ...],
                      extra: tuple[str, ...] = ("--num-workers", "0"), *,
                      alone: bool = False, own: bool = False) -> Case:
        """``files`` added to two good classes (or ``alone``: the whole folder)."""
        data = root / cid
        args = [*ext, "--data", str(data), "--out", str(b.tmp / "out" / cid), *extra]

        def go() -> Verdict:
            write_folder(data, files if alone else good | files)
            return error_verdict((b.run if own else b.cli)(args), mention)
        return Case(cid, "cli", what, "clear error", go, b.repro(args),
                    "own" if own else "shared")

    cases += [
        extract_error("corrupt-image", "an image folder with random bytes named bad.png",
                      {"a/bad.png": x.corrupt}, ("bad.png",)),
        extract_error("truncated-png", "an image folder with a PNG cut in half (half.png)",
                      {"a/half.png": x.truncated}, ("half.png",)),
        extract_error("zero-byte-png", "an image folder with a zero-byte empty.png",
                      {"b/empty.png": b""}, ("empty.png",)),
        extract_error("bomb-png", "an image folder with a 12000x12000 PNG bomb (18 KB)",
                      {"a/bomb.png": x.bomb}, ("bomb.png",)),
        extract_error("hard-bomb-png", "an image folder with a 14000x14000 PNG bomb (over "
                      "twice Pillow's limit)", {"a/hard.png": x.hard_bomb}, ("hard.png",)),
        extract_error("text-as-jpg", "an image folder with a text file named notes.jpg",
                      {"b/notes.jpg": b"just some notes\n"}, ("notes.jpg",)),
        extract_error("corrupt-image-workers", "bad.png read by a data-loading worker "
                      "(--num-workers 1)", {"a/bad.png": x.corrupt}, ("bad.png",),
                      ("--num-workers", "1"), own=True),
        extract_error("empty-class-folder", "a class folder holding no images",
                      {"c/readme.txt": b"nothing here"}, ("holds no images",)),
        extract_error("one-class", "a data folder with a single class folder",
                      {"a/0.png": x.good[0], "a/1.png": x.good[1]}, ("2 classes",),
                      alone=True),
    ]
    gone = root / "no-such-folder"
    gone_args = [*ext, "--data", str(gone), "--out", str(b.tmp / "out" / "gone"),
                 "--num-workers", "0"]
    cases.append(Case("folder-missing", "cli", "--data naming a folder that does not exist",
                      "clear error", lambda: error_verdict(b.cli(gone_args), ("no-such-folder",)),
                      b.repro(gone_args), "shared"))

    # correct results
    def extract_ok(cid: str, what: str, files: dict[str, bytes], base: dict[str, bytes],
                   check: Callable[[Path, Run], str | None],
                   extra: tuple[str, ...] = ("--num-workers", "0")) -> Case:
        data, out = root / cid, b.tmp / "out" / cid
        args = [*ext, "--data", str(data), "--out", str(out), *extra]

        def go() -> Verdict:
            write_folder(data, base | files)
            r = b.cli(args)
            return result_verdict(r, lambda: check(out, r))
        return Case(cid, "cli", what, "correct result", go, b.repro(args), "shared")

    def samples(n: int, classes: list[str] | None = None) -> Callable[[Path, Run], str | None]:
        def check(out: Path, r: Run) -> str | None:
            m = read_manifest(out)
            if m["num_samples"] != n:
                return f"{m['num_samples']} samples extracted, expected {n}"
            if classes is not None and m["classes"] != classes:
                return f"classes {m['classes']}, expected {classes}"
            return None
        return check

    bad = {"a/bad.png": x.corrupt, "a/half.png": x.truncated, "b/empty.png": b"",
           "a/bomb.png": x.bomb, "a/hard.png": x.hard_bomb, "b/notes.jpg": b"notes\n"}
    cases.append(extract_ok("skip-unreadable", "the six bad files above with "
                            "--skip-unreadable (8 good images)", bad, good, samples(8),
                            ("--num-workers", "0", "--skip-unreadable")))
    cases.append(extract_ok("jpeg-named-png", "a JPEG file named .png", {"b/photo.png": x.jpeg},
                            good, samples(9)))
    hidden = {"a/.ipynb_checkpoints/0-checkpoint.png": x.good[0],
              "a/.ipynb_checkpoints/notes-checkpoint.png": b"junk",
              "a/.DS_Store": b"\0\0\0\1Bud1junk", "b/._3.png": b"\0\5\26\7AppleDouble junk",
              "b/.hidden.png": x.good[5], ".ipynb_checkpoints/a/x.png": x.good[1],
              ".Trash/c/y.png": x.good[2]}
    cases.append(extract_ok("hidden-files", ".ipynb_checkpoints/, .DS_Store, ._x.png, "
                            ".hidden.png in class folders, hidden top-level folders", hidden,
                            good, samples(8, ["a", "b"])))
    odd = {"a/cmyk.jpg": encoded(x.digits[0].convert("CMYK"), "JPEG"),
           "a/palette.png": png(x.digits[1].convert("P"), transparency=0),
           "a/la.png": png(x.digits[2].convert("LA")),
           "b/rgba.png": png(x.digits[3].convert("RGBA")),
           "b/one-pixel.png": png(Image.new("L", (1, 1), 200)),
           "b/strip.png": png(Image.new("L", (3000, 2), 100)),
           "b/anim.gif": encoded(x.digits[4].convert("P"), "GIF", save_all=True,
                                 append_images=[x.digits[5].convert("P")])}
    cases.append(extract_ok("unusual-modes", "CMYK JPEG, palette PNG with transparency, LA, "
                            "RGBA, 1x1 and 3000x2 images, an animated GIF", odd, good,
                            samples(15)))

    # 16-bit images: the cache of a 16-bit folder equals the cache of its 8-bit twin
    deep_data, twin_data = root / "deep16", root / "deep16-twin"
    deep_args = [*ext, "--data", str(deep_data), "--out", str(b.tmp / "out" / "deep16"),
                 "--num-workers", "0"]
    twin_args = [*ext, "--data", str(twin_data), "--out", str(b.tmp / "out" / "deep16-twin"),
                 "--num-workers", "0"]

    def deep() -> Verdict:
        wide = {f"a/{i}.png": png(Image.fromarray(np.asarray(x.digits[i], np.uint16) * 257))
                for i in range(3)} | {f"b/{i}.png": png(Image.fromarray(
                    np.asarray(x.digits[4 + i], np.uint16) * 257)) for i in range(3)}
        write_folder(deep_data, wide)
        write_folder(twin_data, {f"a/{i}.png": x.good[i] for i in range(3)}
                     | {f"b/{i}.png": x.good[4 + i] for i in range(3)})
        r, r8 = b.cli(deep_args), b.cli(twin_args)
        if r8.rc != 0:
            raise RuntimeError(f"the 8-bit twin failed: {r8.stderr[-2000:]}")

        def check() -> str | None:
            same, diff = compare_arrays(cache_arrays(b.tmp / "out" / "deep16"),
                                        cache_arrays(b.tmp / "out" / "deep16-twin"))
            return None if diff == 0 else f"tokens differ from the 8-bit twin's by {diff:.3g}"
        return result_verdict(r, check)
    cases.append(Case("png-16-bit", "cli", "a folder of 16-bit grey PNGs: tokens must equal "
                      "those of the same pictures in 8 bits", "correct result", deep,
                      b.repro(deep_args), "shared"))
    return cases


def split_cases(b: Bench, x: Inputs, fit: list[str]) -> list[Case]:
    """Train/test folders whose test split lacks a class, or has one training lacks."""
    root = b.tmp / "inputs"
    train = {f"train/{c}/{i}.png": x.good[k * 6 + i] for k, c in enumerate("abc")
             for i in range(6)}
    cases = []
    data, out = root / "test-lacks-class", b.tmp / "out" / "test-lacks-class"
    args = [*fit, "--data", str(data), "--out", str(out), "--val-fraction", "0.34"]

    def lacks() -> Verdict:
        write_folder(data, train | {f"test/{c}/{i}.png": x.good[18 + k * 2 + i]
                                    for k, c in enumerate("ab") for i in range(2)})
        r = b.cli(args)

        def check() -> str | None:
            report = json.loads((out / "report.json").read_text())
            return None if report.get("test_accuracy") else "no test accuracy reported"
        return result_verdict(r, check)
    cases.append(Case("test-lacks-class", "cli", "a test/ split without one of the training "
                      "classes (train a,b,c; test a,b)", "correct result", lacks,
                      b.repro(args), "shared"))

    data2, out2 = root / "test-extra-class", b.tmp / "out" / "test-extra-class"
    args2 = [*fit, "--data", str(data2), "--out", str(out2), "--val-fraction", "0.34"]

    def extra() -> Verdict:
        write_folder(data2, train | {f"test/{c}/{i}.png": x.good[18 + k * 2 + i]
                                     for k, c in enumerate("abz") for i in range(2)})
        r = b.cli(args2)
        if r.rc == 0:  # also fine: the test split skipped with a message naming the class
            said = "no test split evaluated" in r.stdout and "'z'" in r.stdout
            report = json.loads((out2 / "report.json").read_text())
            if said and not report.get("test_accuracy"):
                return Verdict(HANDLED, short(last_line(r.stdout)))
            return Verdict(SILENT, "exit 0 and the test split evaluated with an unknown class")
        return error_verdict(r, ("'z'",))
    cases.append(Case("test-extra-class", "cli", "a test/ split with a class 'z' training "
                      "lacks", "clear error", extra, b.repro(args2), "shared"))
    return cases


def task_cases(b: Bench, x: Inputs, task: Path) -> list[Case]:
    """Tampered task folders through ``inca predict``, and bad images to predict."""
    root = b.tmp / "tasks-tampered"
    image = root / "seven.png"
    image.parent.mkdir(parents=True, exist_ok=True)
    image.write_bytes(x.good[7])

    def predict(folder: Path, *images: Path) -> list[str]:
        return ["predict", *[str(i) for i in images], "--task", str(folder), "--device", "cpu"]

    def other_weights(f: Path) -> None:
        shutil.copy(b.tmp / "tasks" / "other" / TASK_WEIGHTS, f / TASK_WEIGHTS)

    def set_config(field_name: str, value: Any) -> Callable[[dict[str, Any]], None]:
        return lambda m: m["members"][0]["spec"]["config"].update({field_name: value})

    tampers: list[tuple[str, str, Callable[[Path], Any], tuple[str, ...]]] = [
        ("task-wrong-class-count", "task.json lists 3 class names for 10 outputs",
         lambda f: edit_json(f, lambda m: m.update(classes=["a", "b", "c"])), (TASK_JSON,)),
        ("task-huge-num-queries", "task.json asks for num_queries 1e8",
         lambda f: edit_json(f, set_config("num_queries", 10**8)), ("num_queries",)),
        ("task-unknown-version", "task.json format_version 99",
         lambda f: edit_json(f, lambda m: m.update(format_version=99)), ("format_version",)),
        ("task-nan-weights", "a NaN in the weights (hash recomputed)",
         lambda f: edit_weights(f, nan_weight), ("NaN",)),
        ("task-missing-weight", "a weight tensor removed (hash recomputed)",
         lambda f: edit_weights(f, lambda t: t.pop(next(iter(t)))), (TASK_WEIGHTS,)),
        ("task-missing-key", "task.json without its 'classes' key",
         lambda f: edit_json(f, lambda m: m.pop("classes")), ("classes",)),
        ("task-truncated-weights", "adapter_model.safetensors cut in half",
         lambda f: truncate(f / TASK_WEIGHTS), (TASK_WEIGHTS,)),
        ("task-truncated-rehashed", "adapter_model.safetensors cut in half, hash recomputed",
         lambda f: (truncate(f / TASK_WEIGHTS), rehash(f)), (TASK_WEIGHTS,)),
        ("task-json-garbage", "task.json is not JSON",
         lambda f: (f / TASK_JSON).write_text("{nope"), (TASK_JSON,)),
        ("task-json-missing", "task.json deleted", lambda f: (f / TASK_JSON).unlink(), ()),
        ("task-json-huge", "task.json of 65 MB of spaces",
         lambda f: (f / TASK_JSON).write_bytes(b" " * (65 << 20)), (TASK_JSON,)),
        ("task-swapped-weights", "the weights file of another task",
         other_weights, (TASK_WEIGHTS,)),
        ("task-other-fingerprint", "task.json records another backbone fingerprint",
         lambda f: edit_json(f, lambda m: m["backbone"].update(fingerprint="0" * 16)),
         ("fingerprint",)),
        ("task-unknown-backbone", "task.json names backbone 'nope:xyz' (name and source)",
         lambda f: edit_json(f, unknown_backbone), ("nope",)),
    ]
    cases = []
    for cid, what, tamper, mention in tampers:
        folder = root / cid
        args = predict(folder, image)

        def go(folder: Path = folder, tamper: Callable[[Path], Any] = tamper,
               args: list[str] = args, mention: tuple[str, ...] = mention) -> Verdict:
            shutil.copytree(task, folder)
            tamper(folder)
            return error_verdict(b.cli(args), mention)
        cases.append(Case(cid, "cli", what + " (inca predict)", "clear error", go,
                          b.repro(args), "shared"))
    as_file = root / "task-is-a-file"
    file_args = predict(as_file, image)
    cases.append(Case("task-is-a-file", "cli", "--task naming a regular file", "clear error",
                      lambda: (as_file.write_bytes(b"x"), error_verdict(
                          b.cli(file_args), ("task-is-a-file",)))[1], b.repro(file_args),
                      "shared"))

    def predict_error(cid: str, what: str, name: str, data: bytes | None) -> Case:
        """``name`` beside a good image: inca predict reports the one it cannot read (an
        ``error:`` line naming it, then how many failed), predicts the other, exits 1."""
        path = root / name
        args = predict(task, path, image)

        def go() -> Verdict:
            if data is not None:
                path.write_bytes(data)
            r = b.cli(args)
            if r.rc == 0:
                return Verdict(SILENT, "exit 0: " + short(r.stdout))
            errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
            problems = ([f"exit {r.rc}"] if r.rc != 1 else []) + \
                (["a traceback"] if "Traceback" in r.stderr else []) + \
                ([] if len(errors) == 1 and name in errors[0] else ["no error line naming it"]) + \
                ([] if last_line(r.stderr) == "1 of 2 images could not be read" else
                 ["no count of the images not read"]) + \
                ([] if f"{image}: " in r.stdout else ["the good image not predicted"])
            shown = short(errors[0] if errors else last_line(r.stderr))
            return Verdict(UNCLEAR, "; ".join(problems) + ": " + shown) if problems else \
                Verdict(HANDLED, shown + " [the good image predicted; exit 1]")
        return Case(cid, "cli", what + " (beside a good image)", "clear error", go,
                    b.repro(args), "shared")

    cases += [predict_error("predict-bomb", "inca predict on a 12000x12000 PNG bomb",
                            "bomb.png", x.bomb),
              predict_error("predict-missing-image", "inca predict on a file that does not "
                            "exist", "nowhere.png", None),
              predict_error("predict-truncated", "inca predict on a PNG cut in half",
                            "half.png", x.truncated)]
    pdir = root / "a-folder"
    pdir_args = predict(task, pdir)
    cases.append(Case("predict-directory", "cli", "inca predict given a folder as the image",
                      "clear error", lambda: (pdir.mkdir(exist_ok=True), error_verdict(
                          b.cli(pdir_args), ("a-folder",)))[1], b.repro(pdir_args),
                      "shared"))

    # 16-bit pictures predicted like their 8-bit twins
    pairs = [("deep.png", x.deep, "deep-twin.png", x.deep_twin),
             ("dark.png", x.dark, "dark-twin.png", x.dark_twin),
             ("float.tif", x.float_tiff, "float-twin.png", x.float_twin)]
    for name, data, twin, twin_data in pairs:
        args = predict(task, root / name, root / twin)

        def same(name: str = name, data: bytes = data, twin: str = twin,
                 twin_data: bytes = twin_data, args: list[str] = args) -> Verdict:
            (root / name).write_bytes(data)
            (root / twin).write_bytes(twin_data)
            r = b.cli(args)

            def check() -> str | None:
                lines = {ln.split(": ", 1)[0].strip(): ln.split(": ", 1)[1]
                         for ln in r.stdout.splitlines() if ": " in ln}
                got = {Path(k).name: v for k, v in lines.items()}
                if got.get(name) != got.get(twin):
                    return f"{name}: {got.get(name)} but its 8-bit twin: {got.get(twin)}"
                return None
            return result_verdict(r, check)
        what = {"deep.png": "a 16-bit PNG (full range)",
                "dark.png": "a dark 16-bit PNG (every value <= 255 of 65535)",
                "float.tif": "a 32-bit float TIFF in [0, 1]"}[name]
        cases.append(Case(f"predict-{name.split('.')[0]}", "cli", what + ": predicted like "
                          "the same picture in 8 bits", "correct result", same, b.repro(args),
                          "shared"))
    return cases


def serve_cases(b: Bench, task: Path) -> list[Case]:
    """``inca serve`` refusing to start: a bad task, a bad limit, a port already taken."""
    root = b.tmp / "serve-cases"
    bad = root / "nan-task"
    serve = ["serve", "--device", "cpu", "--host", HOST]

    def refused(cid: str, what: str, args: list[str], mention: tuple[str, ...],
                setup: Callable[[], Any] = lambda: None) -> Case:
        def go() -> Verdict:
            setup()
            r = b.run(args, timeout=90)
            if "[faults.py: killed after" in r.stderr:
                return Verdict(SILENT if "port" not in cid else UNCLEAR,
                               "still running after 90 s: " + short(last_line(r.stdout)))
            return error_verdict(r, mention)
        return Case(cid, "cli", what, "clear error", go, b.repro(args), "own")

    def nan_task() -> None:
        shutil.copytree(task, bad)
        edit_weights(bad, nan_weight)

    port = free_port()
    taken = [*serve, "--task", str(task), "--port", str(port)]
    holder: list[socket.socket] = []

    def hold_port() -> None:
        s = socket.socket()
        s.bind((HOST, port))
        s.listen()
        holder.append(s)

    def port_taken() -> Verdict:
        try:
            return refused("serve-port-taken", "", taken, (str(port),), hold_port).run()
        finally:
            for s in holder:
                s.close()
    return [
        refused("serve-nan-task", "inca serve of a task whose weights hold a NaN",
                [*serve, "--task", str(bad), "--port", str(free_port())], ("NaN",), nan_task),
        refused("serve-zero-upload-limit", "inca serve --max-upload-mb 0",
                [*serve, "--task", str(task), "--port", str(free_port()), "--max-upload-mb",
                 "0"], ("max_upload",)),
        Case("serve-port-taken", "cli", "inca serve on a port another program listens on",
             "clear error", port_taken, b.repro(taken), "own"),
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def option_cases(b: Bench, fit: list[str]) -> list[Case]:
    """Bad options of ``inca fit``."""
    cases = []
    base = [*fit, "--data", "digits", "--limit", "40"]

    def opt(cid: str, extra: list[str], mention: tuple[str, ...] = (),
            what: str | None = None) -> Case:
        args = [*base, "--out", str(b.tmp / "out" / cid), *extra]
        return Case(cid, "cli", what or " ".join(extra), "clear error",
                    lambda: error_verdict(b.cli(args), mention), b.repro(args), "shared")

    cases += [
        opt("lrs-nan", ["--lrs", "nan"], ("lrs",)),
        opt("lrs-inf", ["--lrs", "inf"], ("lrs",)),
        opt("lrs-negative", ["--lrs", "-1"], ("lrs",)),
        opt("lrs-text", ["--lrs", "abc"], ("abc",)),
        opt("lrs-empty", ["--lrs", ","], ("lrs",)),
        opt("adapter-options-bad-json", ["--adapter-options", "{bad"], ("adapter-options",)),
        opt("adapter-options-list", ["--adapter-options", "[1, 2]"], ("adapter-options",)),
        opt("adapter-options-huge", ["--kinds", "inca", "--adapter-options",
                                     '{"inca": {"num_queries": 100000000}}'], ("num_queries",)),
        opt("adapter-options-unknown", ["--kinds", "inca", "--adapter-options",
                                        '{"inca": {"bogus": 1}}'], ("bogus",)),
        opt("epochs-zero", ["--epochs", "0"], ("epochs",)),
        opt("batch-size-zero", ["--batch-size", "0"], ("batch_size",)),
        opt("val-fraction-1.5", ["--val-fraction", "1.5"], ("1.5",)),
        opt("limit-zero", ["--limit", "0"], ("limit",)),
        opt("kinds-unknown", ["--kinds", "nope"], ("nope",)),
        opt("layers-unknown", ["--layers", "blocks.99"], ("blocks.99",)),
        opt("backbone-unknown", ["--backbone", "nope:xyz"], ("nope",)),
        opt("device-missing-gpu", ["--device", "cuda:7"], ("cuda",)),
        opt("precision-unknown", ["--precision", "fp8"], ("fp8",)),
        opt("mode-unknown", ["--mode", "turbo"], ("turbo",)),
        opt("token-grid-negative", ["--token-grid", "-1"], ("token",)),
    ]
    blocker = b.tmp / "out" / "a-file"
    if os.geteuid() == 0:  # root writes anywhere: a path through a file cannot be created
        target, what = blocker / "sub", "--out under a regular file (running as root)"
    else:
        target, what = b.tmp / "out" / "read-only" / "sub", "--out in a chmod 0o500 folder"
    args = [*base, "--out", str(target)]

    def unwritable() -> Verdict:
        blocker.parent.mkdir(parents=True, exist_ok=True)
        blocker.write_bytes(b"x")
        if os.geteuid() != 0:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.parent.chmod(0o500)
        try:
            return error_verdict(b.cli(args), ())
        finally:
            if os.geteuid() != 0:
                target.parent.chmod(0o700)
    cases.append(Case("out-unwritable", "cli", what, "clear error", unwritable, b.repro(args),
                      "shared"))
    args2 = [*base, "--out", str(blocker)]
    cases.append(Case("out-is-a-file", "cli", "--out naming an existing regular file",
                      "clear error", lambda: (blocker.parent.mkdir(parents=True, exist_ok=True),
                                              blocker.write_bytes(b"x"),
                                              error_verdict(b.cli(args2), ()))[2],
                      b.repro(args2), "shared"))
    return cases


def storage_cases(b: Bench, ext: list[str], fit: list[str]) -> list[Case]:
    """A full disk, a slow disk with a second writer, damaged caches."""
    root = b.tmp / "storage"
    layers = ",".join(b.layers[:2])
    cases = []

    # full disk mid-extraction, then the same command once space is back
    full, clean = root / "full", root / "full-clean"
    full_args = [*ext, "--data", "digits", "--limit", "320", "--layers", layers, "--out",
                 str(full), "--batch-size", "32", "--num-workers", "0"]
    patch = "enospc-path:shards/00001"  # shard 0 is written; then the disk is full

    def disk_full() -> Verdict:
        with b.bb_lock:
            extract_to_cache(b.bb, load_dataset("digits", limit=320), clean,
                             layers=b.layers[:2], batch_size=32, num_workers=0, progress=False)
        v = error_verdict(b.run(full_args, patch=patch), ("no space",))
        kept = shard_files(full)
        r = b.run(full_args)  # space is back
        if r.rc != 0:
            return Verdict(UNCLEAR, v.detail + " | the same command once space was back "
                           f"failed: exit {r.rc}: {short(last_line(r.stderr))}", data_lost=True)
        lost = changed(kept, full)
        same, diff = compare_arrays(cache_arrays(full), cache_arrays(clean))
        if lost or diff > 1e-3:
            return Verdict(SILENT if diff > 1e-3 else v.outcome, v.detail + f" | resumed: "
                           f"{len(lost)} of {len(kept)} files written before the disk filled "
                           f"were written again; cache differs from a clean one by {diff:.3g}",
                           data_lost=bool(lost))
        v.detail += (f" | the same command once space was back resumed, keeping the "
                     f"{len(kept)} files of shard 0; cache equals a clean one")
        return v
    cases.append(Case("disk-full-extract", "cli", "the disk fills during extraction (fsync "
                      "of shard 1's files fails with ENOSPC), then space is freed and the "
                      "command re-run", "clear error", disk_full, b.repro(full_args, patch),
                      "own"))

    # full disk while fit saves its task over an older one
    run = root / "fit-full"
    fargs = [*fit, "--data", "digits", "--limit", "60", "--out", str(run)]
    patch2 = "enospc-path:.task.new-"
    # fit again, another lr: a new task over the old (--overwrite where fit asks for it)
    again = [*fargs, "--lrs", "3e-2"] + (["--overwrite"] if "--overwrite" in
                                         b.cli(["fit", "--help"]).stdout else [])

    def save_full() -> Verdict:
        first = b.cli(fargs)
        if first.rc != 0:
            raise RuntimeError(f"the first fit failed: {first.stderr[-2000:]}")
        old = Task.from_files(read_task_files(run / "task"))
        v = error_verdict(b.run(again, patch=patch2), ("no space",))
        try:
            kept = task_diff(Task.from_files(read_task_files(run / "task")), old) == 0
        except InCAError as e:
            kept = False
            v.detail += f" | the old task no longer loads: {b.scrub(str(e))}"
        left = sorted(p.name for p in run.iterdir() if p.name.startswith(".task."))
        left = [n for n in left if n != ".task.lock"]
        if not kept or left:
            v = Verdict(UNCLEAR if kept else SILENT, v.detail + f" | old task kept: {kept}, "
                        f"left behind: {left}", data_lost=not kept)
        return v
    cases.append(Case("disk-full-task-save", "cli", "the disk fills while inca fit saves its "
                      "task over an older one (old task must stay intact)", "clear error",
                      save_full, b.repro(again, patch2), "own"))

    # a run killed between saving its task and writing its report, run again
    unfinished = root / "fit-unfinished"
    uargs = [*fit, "--data", "digits", "--limit", "60", "--out", str(unfinished)]

    def no_report() -> Verdict:
        first = b.cli(uargs)
        if first.rc != 0:
            raise RuntimeError(f"the first fit failed: {first.stderr[-2000:]}")
        saved = Task.from_files(read_task_files(unfinished / "task"))
        for f in unfinished.glob("report.*"):
            f.unlink()
        r = b.cli(uargs)

        def check() -> str | None:
            if not (unfinished / "report.json").is_file():
                return "exit 0 but no report written"
            diff = task_diff(Task.from_files(read_task_files(unfinished / "task")), saved)
            return None if diff <= 1e-4 else f"the task differs from the first run's by {diff}"
        return result_verdict(r, check)
    cases.append(Case("fit-rerun-without-report", "cli", "inca fit run again on its run folder "
                      "whose task was saved but whose report was not (a kill between the two): "
                      "the same command should finish the run", "correct result", no_report,
                      b.repro(uargs), "shared"))

    # a second writer while the first one holds the folder (its disk stalled)
    for cid, what, cmd, out in (
            ("second-extract-writer", "a second inca extract into a cache folder another "
             "process is writing", [*ext, "--data", "digits", "--limit", "600", "--layers",
                                    layers, "--batch-size", "32", "--num-workers", "0"],
             root / "shared-cache"),
            ("second-fit-writer", "a second inca fit into a run folder another process is "
             "fitting into", [*fit, "--data", "digits", "--limit", "600"],
             root / "shared-run")):
        args = [*cmd, "--out", str(out)]

        def second(args: list[str] = args, out: Path = out) -> Verdict:
            log, go = out.parent / f"{out.name}-first.log", out.parent / f"{out.name}.go"
            lock = out.parent / f".{out.name}.lock"
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "wb") as f:
                first = b.spawn([sys.executable, str(b.wrapper), *args], stdout=f,
                                stderr=subprocess.STDOUT,
                                env=b.env({"FAULTS_FSYNC": f"stall:{go}"}))
                try:
                    deadline = time.monotonic() + 180
                    while first.poll() is None and time.monotonic() < deadline and not (
                            lock.exists() and lock.read_text().strip()):
                        time.sleep(0.02)
                    holding = first.poll() is None
                    r = b.cli(args)  # this process is not the first writer: locks apply
                    go.touch()
                    first.wait(timeout=300)
                finally:
                    go.touch()
                    b.end(first)
            if not holding:
                raise RuntimeError("the first writer never held its folder:\n"
                                   + log.read_text(errors="replace")[-2000:])
            v = error_verdict(r, ("in use",))
            if first.returncode != 0:
                return Verdict(SILENT, "the first writer failed: "
                               + short(last_line(log.read_text(errors="replace"))),
                               data_lost=True)
            try:  # and what it wrote reads back
                if (out / "manifest.json").exists():
                    size = f"{len(ActivationCache(out))} samples"
                else:
                    size = f"task of {len(read_task_files(out / 'task').meta['members'])} member(s)"
            except InCAError as e:
                return Verdict(SILENT, f"the first writer's output does not read back: {e}",
                               data_lost=True)
            v.detail += f" | the first writer then finished: exit 0, {size}"
            return v
        cases.append(Case(cid, "cli", what + " (its disk stalled: fsync waits)",
                          "clear error", second, b.repro(args), "own"))

    # damaged complete caches
    def damaged(cid: str, what: str, damage: Callable[[Path], Any]) -> Case:
        folder = root / cid
        args = [*ext, "--data", "digits", "--limit", "40", "--layers", layers, "--out",
                str(folder), "--batch-size", "32", "--num-workers", "0"]

        def go() -> Verdict:
            with b.bb_lock:
                extract_to_cache(b.bb, load_dataset("digits", limit=40), folder,
                                 layers=b.layers[:2], batch_size=32, num_workers=0,
                                 progress=False)
            damage(folder)
            r = b.cli(args)
            if r.rc == 0:  # re-extracting the damaged part is a fine answer too
                try:
                    cache_arrays(folder)
                    return Verdict(HANDLED, "re-extracted: " + short(last_line(r.stdout)))
                except Exception as e:  # noqa: BLE001 - the cache is still damaged
                    return Verdict(SILENT, f"exit 0 but the cache is still damaged: {e}")
            return error_verdict(r, ())
        return Case(cid, "cli", what + " (inca extract into it again)", "clear error", go,
                    b.repro(args), "shared")

    def first_layer(folder: Path) -> Path:
        return folder / "shards" / "00000" / (b.layers[0].replace("/", "_") + ".npy")

    cases += [
        damaged("cache-manifest-garbage", "a cache whose manifest.json is not JSON",
                lambda f: (f / "manifest.json").write_text("{garbage")),
        damaged("cache-labels-deleted", "a complete cache whose shard 0 labels.npy was deleted",
                lambda f: (f / "shards" / "00000" / "labels.npy").unlink()),
        damaged("cache-shard-truncated", "a complete cache whose shard 0 token file was cut "
                "in half", lambda f: truncate(first_layer(f))),
    ]
    return cases


def library_cases(b: Bench, x: Inputs, task: Task) -> list[Case]:
    """Deep images through ``open_image``; a bomb through ``Task.predict``."""
    from inca.data.images import open_image
    from inca.task import TaskError

    def pixels(data: bytes, twin: bytes, what: str) -> Callable[[], Verdict]:
        def go() -> Verdict:
            got = np.asarray(open_image(data))
            want = np.asarray(open_image(twin))
            if got.shape != want.shape or np.abs(got.astype(int) - want).max() > 1:
                return Verdict(SILENT, f"{what}: mean pixel {got.mean():.1f}, expected "
                                       f"{want.mean():.1f} (max difference "
                                       f"{np.abs(got.astype(int) - want).max()})")
            return Verdict(HANDLED, f"scaled: mean pixel {got.mean():.1f} = {want.mean():.1f}")
        return go

    def bomb() -> Verdict:
        path = b.tmp / "inputs" / "lib-bomb.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(x.bomb)
        try:
            task.predict([str(path)])
        except TaskError as e:
            msg = str(e)
            ok = "\n" not in msg and "lib-bomb.png" in msg
            return Verdict(HANDLED if ok else UNCLEAR, short(b.scrub(msg)))
        except Exception as e:  # noqa: BLE001 - recorded: not a clear error
            return Verdict(UNCLEAR, f"{type(e).__name__}: {short(b.scrub(str(e)))}")
        return Verdict(SILENT, "predicted a 144-megapixel bomb")

    snippet = "np.asarray(inca.data.images.open_image(data))"
    return [
        Case("open-16-bit", "library", "open_image of a 16-bit PNG (full range)",
             "correct result", pixels(x.deep, x.deep_twin, "16-bit"), snippet),
        Case("open-16-bit-dark", "library", "open_image of a dark 16-bit PNG (every value "
             "<= 255 of 65535)", "correct result", pixels(x.dark, x.dark_twin, "dark 16-bit"),
             snippet),
        Case("open-float-tiff", "library", "open_image of a float32 TIFF in [0, 1]",
             "correct result", pixels(x.float_tiff, x.float_twin, "float TIFF"), snippet),
        Case("task-predict-bomb", "library", "Task.predict on a 12000x12000 PNG bomb",
             "clear error", bomb, "task.predict(['bomb.png'])"),
    ]


# -- HTTP --------------------------------------------------------------------------------
def multipart(files: list[tuple[str, bytes]], fields: dict[str, str] | None = None,
              boundary: str = "faults-boundary") -> tuple[bytes, str]:
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'
             .encode() for k, v in (fields or {}).items()]
    for name, data in files:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="files"; '
                     f'filename="{name}"\r\nContent-Type: image/png\r\n\r\n'.encode()
                     + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), \
        f"multipart/form-data; boundary={boundary}"


def request(port: int, method: str, path: str, body: bytes = b"",
            headers: dict[str, str] | None = None, timeout: float = 60
            ) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def http_verdict(status: int, body: bytes, expect: int, mention: tuple[str, ...] = ()
                 ) -> Verdict:
    try:
        detail = json.loads(body).get("detail")
    except (ValueError, AttributeError):
        detail = None
    if 200 <= status < 300:
        return Verdict(SILENT, f"HTTP {status}: accepted: {short(body.decode(errors='replace'))}")
    text = detail if isinstance(detail, str) else short(body.decode(errors="replace"), 200)
    problems = []
    if not 400 <= status < 500:
        problems.append(f"HTTP {status}")
    if not isinstance(detail, str) or not detail:
        problems.append("no JSON detail message")
    elif " object at 0x" in detail or "Traceback" in detail:
        problems.append("internals in the message")
    missing = [m for m in mention if isinstance(detail, str) and m.lower() not in detail.lower()]
    if missing:
        problems.append(f"the message does not name {missing}")
    if problems:
        return Verdict(UNCLEAR, "; ".join(problems) + f": {short(text, 200)}")
    note = "" if status == expect else f" (expected {expect})"
    return Verdict(HANDLED, f"HTTP {status}{note}: {short(text, 200)}")


def predicted(body: bytes) -> list[dict[str, Any]]:
    return json.loads(body)["predictions"]


def answer_problem(pred: dict[str, Any], expected: torch.Tensor, classes: list[str],
                   atol: float = 1e-4) -> str | None:
    """What is wrong with one image's answer (``tasks.digits``), or ``None``."""
    top = pred["tasks"]["digits"]
    for entry in top:
        want = float(expected[classes.index(entry["label"])])
        if abs(entry["probability"] - want) > atol:
            return f"{entry['label']}: {entry['probability']:.5f}, expected {want:.5f}"
    values, idx = expected.topk(2)
    if float(values[0] - values[1]) > atol and top[0]["label"] != classes[int(idx[0])]:
        return f"top label {top[0]['label']}, expected {classes[int(idx[0])]}"
    return None


def http_cases(b: Bench, port: int, x: Inputs, task: Task) -> list[Case]:
    key = {"X-API-Key": KEY}
    seven = x.good[7]
    url = f"http://{HOST}:<port>/predict"

    def post_form(files: list[tuple[str, bytes]], fields: dict[str, str] | None = None,
                  headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        body, ctype = multipart(files, fields)
        return request(port, "POST", "/predict", body,
                       {"Content-Type": ctype} | (key if headers is None else headers))

    def post_json(payload: Any, raw: bytes | None = None) -> tuple[int, bytes]:
        body = raw if raw is not None else json.dumps(payload).encode()
        return request(port, "POST", "/predict", body,
                       {"Content-Type": "application/json"} | key)

    def case(cid: str, what: str, expect: int, send: Callable[[], tuple[int, bytes]],
             mention: tuple[str, ...] = (), how: str = "") -> Case:
        return Case(cid, "http", what, "clear error",
                    lambda: http_verdict(*send(), expect, mention), how or f"POST {url}")

    b64 = base64.b64encode(seven).decode()
    cases = [
        case("http-no-key", "no X-API-Key header", 401,
             lambda: post_form([("x.png", seven)], headers={}), ("API key",)),
        case("http-wrong-key", "a wrong API key", 401,
             lambda: post_form([("x.png", seven)], headers={"X-API-Key": KEY + "x"}),
             ("API key",)),
        case("http-empty-key", "an empty API key", 401,
             lambda: post_form([("x.png", seven)], headers={"X-API-Key": ""}), ("API key",)),
        case("http-latin1-key", "an API key with a non-ASCII byte", 401,
             lambda: post_form([("x.png", seven)], headers={"X-API-Key": KEY + "\xe9"}),
             ("API key",)),
        case("http-tasks-no-key", "GET /tasks without a key", 401,
             lambda: request(port, "GET", "/tasks"), ("API key",), "GET /tasks"),
        case("http-bomb", "a 12000x12000 PNG bomb (18 KB)", 413,
             lambda: post_form([("bomb.png", x.bomb)]), ("bomb.png",)),
        case("http-hard-bomb", "a 14000x14000 PNG bomb (over twice Pillow's limit)", 413,
             lambda: post_form([("hard.png", x.hard_bomb)]), ("hard.png",)),
        case("http-bombs-json", "three bombs as base64 JSON", 413,
             lambda: post_json({"images": [base64.b64encode(x.bomb).decode()] * 3})),
        case("http-request-megapixels", "five 6000x6000 images (each under the image limit, "
             "180 megapixels together)", 413,
             lambda: post_form([(f"{i}.png", big) for i, big in enumerate([png(Image.new(
                 "L", (6000, 6000)))] * 5)]), ("megapixels",)),
        case("http-junk-image", "junk bytes after a PNG signature", 400,
             lambda: post_form([("junk.png", x.corrupt)]), ("junk.png",)),
        case("http-truncated-image", "a PNG cut in half", 400,
             lambda: post_form([("half.png", x.truncated)]), ("half.png",)),
        case("http-zero-byte-image", "a zero-byte file", 400,
             lambda: post_form([("empty.png", b"")]), ("empty.png",)),
        case("http-bad-json", "a body that is not JSON", 400, lambda: post_json(None, b"{nope")),
        case("http-deep-json", "JSON nested 100,000 levels deep", 400,
             lambda: post_json(None, b"[" * 100_000 + b"]" * 100_000), (),
             "curl -H 'Content-Type: application/json' -H 'X-API-Key: KEY' --data-binary "
             "@deep.json http://127.0.0.1:PORT/predict  # deep.json: python -c \"print('[' * "
             "100000 + ']' * 100000)\" > deep.json"),
        case("http-huge-int-json", "top_k with 5,000 digits", 422,
             lambda: post_json(None, b'{"images": ["' + b64.encode() + b'"], "top_k": '
                               + b"9" * 5000 + b"}")),
        case("http-bad-base64", "an image that is not base64", 400,
             lambda: post_json({"images": ["not base64!"]}), ("base64",)),
        case("http-data-url", "a data: URL instead of base64", 400,
             lambda: post_json({"images": ["data:image/png;base64," + b64]})),
        case("http-images-not-list", '"images" a string', 422,
             lambda: post_json({"images": b64})),
        case("http-image-not-string", "an image given as a number", 422,
             lambda: post_json({"images": [7]})),
        case("http-tasks-number", '"tasks" a number', 422,
             lambda: post_json({"images": [b64], "tasks": 5})),
        case("http-no-images", "a request without images", 400, lambda: post_json({"images": []})),
        case("http-100k-empty-images", "100,000 empty images in JSON", 413,
             lambda: post_json({"images": [""] * 100_000})),
        case("http-65-images", "65 images (limit 64)", 413,
             lambda: post_form([(f"{i}.png", seven) for i in range(65)])),
        case("http-1001-parts", "1,001 multipart file parts", 400,
             lambda: post_form([(f"{i}.png", b"") for i in range(1001)])),
        case("http-top-k-zero", "top_k=0", 422,
             lambda: post_form([("x.png", seven)], {"top_k": "0"}), ("top_k",)),
        case("http-top-k-text", "top_k=abc", 422,
             lambda: post_form([("x.png", seven)], {"top_k": "abc"}), ("top_k",)),
        case("http-top-k-huge", "top_k=1000000000", 422,
             lambda: post_form([("x.png", seven)], {"top_k": "1000000000"}), ("top_k",)),
        case("http-top-k-float", "top_k 2.5 in JSON", 422,
             lambda: post_json({"images": [b64], "top_k": 2.5}), ("top_k",)),
        case("http-unknown-task", "tasks=nope", 404,
             lambda: post_form([("x.png", seven)], {"tasks": "nope"}), ("nope",)),
        case("http-text-content-type", "Content-Type text/plain", 415,
             lambda: request(port, "POST", "/predict", b"hello",
                             {"Content-Type": "text/plain"} | key)),
        case("http-no-boundary", "multipart/form-data without a boundary", 400,
             lambda: request(port, "POST", "/predict", b"--x\r\n\r\n",
                             {"Content-Type": "multipart/form-data"} | key)),
        case("http-files-as-text", "'files' sent as a text field", 422,
             lambda: post_form([], {"files": "not a file"}), ("files",)),
        case("http-get-predict", "GET /predict", 405,
             lambda: request(port, "GET", "/predict", headers=key), (), f"GET {url}"),
        case("http-content-length-huge", "Content-Length: 10^9 announced", 413,
             lambda: raw_exchange(port, b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: "
                                  b"application/json\r\nX-API-Key: " + KEY.encode()
                                  + b"\r\nContent-Length: 1000000000\r\n\r\n"), ()),
    ]

    def chunked() -> Verdict:
        limit = 2 * 2**20
        with socket.create_connection((HOST, port), timeout=30) as s:
            s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"X-API-Key: " + KEY.encode() + b"\r\nTransfer-Encoding: chunked\r\n\r\n")
            chunk, sent = b"4000\r\n" + b"x" * 0x4000 + b"\r\n", 0
            try:
                while sent < 20 * limit and not select.select([s], [], [], 0)[0]:
                    s.sendall(chunk)
                    sent += 0x4000
            except OSError:
                pass
            head = read_response(s)
        status, body = head
        v = http_verdict(status, body, 413)
        if sent >= 20 * limit:  # (the bytes sent include what loopback buffers hold)
            return Verdict(UNCLEAR, f"no answer while {sent / 2**20:.0f} MiB were sent: "
                           + v.detail)
        v.detail += f" (answered while the client was sending: {sent / 2**20:.1f} MiB sent)"
        return v
    cases.append(Case("http-chunked-oversize", "http", "a chunked body growing past the "
                      "2 MiB limit", "clear error", chunked, f"POST {url} (chunked)"))

    def deep16() -> Verdict:
        status, body = post_form([("deep.png", x.deep)], {"top_k": "3"})
        if status != 200:
            return Verdict(REFUSED, f"HTTP {status}: {short(body.decode(errors='replace'))}")
        want = task.predict_proba([x.deep_twin])[0]
        problem = answer_problem(predicted(body)[0], want, task.classes)
        return Verdict(SILENT, problem) if problem else Verdict(HANDLED, "predicted like the "
                                                                         "8-bit twin")
    cases.append(Case("http-16-bit", "http", "a 16-bit PNG: predicted like the 8-bit twin",
                      "correct result", deep16, f"POST {url}"))

    def odd_name() -> Verdict:
        name = "a\x01\x1b[31m" + "n" * 500 + ".png"
        status, body = post_form([(name, seven)])
        if status != 200:
            return Verdict(REFUSED, f"HTTP {status}: {short(body.decode(errors='replace'))}")
        label = predicted(body)[0]["image"]
        if len(label) > 200 or any(ord(c) < 32 for c in label):
            return Verdict(SILENT, f"echoed the name unsanitised ({len(label)} characters)")
        return Verdict(HANDLED, f"answered; name echoed as {len(label)} safe characters")
    cases.append(Case("http-hostile-filename", "http", "a 506-character file name with control "
                      "characters", "correct result", odd_name, f"POST {url}"))
    return cases


def read_response(s: socket.socket, timeout: float = 30) -> tuple[int, bytes]:
    """Status and body of the HTTP response on ``s`` (read until the body is complete or
    the connection closes)."""
    s.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1]) if lines and len(lines[0].split()) > 1 else 0
    length = next((int(ln.split(b":", 1)[1]) for ln in lines[1:]
                   if ln.lower().startswith(b"content-length:")), None)
    while length is not None and len(body) < length:
        try:
            chunk = s.recv(65536)
        except OSError:
            break
        if not chunk:
            break
        body += chunk
    return status, body


def raw_exchange(port: int, head: bytes) -> tuple[int, bytes]:
    with socket.create_connection((HOST, port), timeout=30) as s:
        s.sendall(head)
        return read_response(s)


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


# -- part 3: load with bombs ------------------------------------------------------------
def load_phase(b: Bench, port: int, images: list[bytes], expected: torch.Tensor,
               classes: list[str], *, requests: int, clients: int, bomb_clients: int,
               bomb_file: Path, bomb_ctype: str, timeout: float) -> dict[str, Any]:
    """``requests`` one-image POSTs from ``clients`` threads (with ``bomb_clients`` threads
    of another process posting bombs meanwhile); latency of each, errors, wrong answers."""
    import httpx

    url = f"http://{HOST}:{port}/predict"
    lock = threading.Lock()
    todo = iter(range(requests))
    lat: list[float] = []
    errors: list[str] = []
    wrong: list[str] = []

    def take() -> int | None:
        with lock:
            return next(todo, None)

    def client() -> None:
        with httpx.Client(timeout=timeout, headers={"X-API-Key": KEY}) as c:
            while (i := take()) is not None:
                k = i % len(images)
                t = time.perf_counter()
                try:
                    r = c.post(url, files=[("files", (f"{k}.png", images[k], "image/png"))],
                               data={"top_k": "3"})
                    dt = time.perf_counter() - t
                    problem = None if r.status_code == 200 else \
                        f"HTTP {r.status_code}: {r.text[:200]}"
                    answer = None if problem else answer_problem(r.json()["predictions"][0],
                                                                 expected[k], classes)
                except Exception as e:  # noqa: BLE001 - counted as an error
                    dt, problem, answer = time.perf_counter() - t, f"{type(e).__name__}: {e}", None
                with lock:
                    if problem:
                        errors.append(problem)
                    else:
                        lat.append(dt)
                        if answer:
                            wrong.append(f"image {k}: {answer}")

    bomber = None
    if bomb_clients:  # the bombs are flowing before the measured requests start
        cfg = {"body": str(bomb_file), "ctype": bomb_ctype, "url": url, "key": KEY,
               "threads": bomb_clients, "timeout": timeout}
        bomber = b.spawn([sys.executable, "-c", BOMBER, json.dumps(cfg)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, env=b.env())
    try:
        if bomber is not None and wait_line(bomber, b"ready", 60) is None:
            raise RuntimeError("the bomber did not start")
        threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
        t0 = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=requests * timeout)
        wall = time.perf_counter() - t0
        stats: dict[str, Any] = {"sent": 0, "status": {}, "latency": []}
        if bomber is not None:
            out, _ = bomber.communicate(b"stop\n", timeout=timeout + 30)
            stats = json.loads(out.decode().strip().splitlines()[-1])
    finally:
        if bomber is not None:
            b.end(bomber)
    return {"requests": requests, "ok": len(lat), "errors": len(errors),
            "wrong_answers": len(wrong), "error_examples": errors[:3],
            "wrong_examples": wrong[:3], "wall_s": wall, "latencies_s": lat,
            "bomb_requests": stats["sent"], "bomb_status": stats["status"],
            "bomb_latencies_s": stats["latency"]}


@contextlib.contextmanager
def timer(into: dict[str, float], name: str) -> Iterator[None]:
    """Add the seconds the block takes to ``into[name]``."""
    t = time.perf_counter()
    try:
        yield
    finally:
        into[name] = into.get(name, 0.0) + time.perf_counter() - t


def run_load(b: Bench, server: Any, task: Task, args: argparse.Namespace) -> dict[str, Any]:
    imgs = digit_images(64, scale=1)  # 8x8 grey, as small as requests get
    images = [png(im) for im in imgs]
    expected = task.predict_proba(images)
    bomb = png(Image.new("1", (12000, 12000)))
    body, ctype = multipart([(f"bomb{i}.png", bomb) for i in range(args.bombs_per_request)])
    bomb_file = b.tmp / "bombs.multipart"
    bomb_file.write_bytes(body)
    common = dict(b=b, port=server.port, images=images, expected=expected,
                  classes=task.classes, clients=args.clients, bomb_file=bomb_file,
                  bomb_ctype=ctype, timeout=60.0)
    load_phase(requests=16, bomb_clients=0, **common)  # warm-up
    rss_before = server.peak_rss_mib()
    rounds: dict[str, list[dict[str, Any]]] = {"alone": [], "bombs": []}
    per_round = max(1, args.requests // args.rounds)
    for r in range(args.rounds):
        for phase in ("alone", "bombs"):
            cpu = cpu_seconds(server.proc.pid)
            res = load_phase(requests=per_round, bomb_clients=args.bomb_clients if
                             phase == "bombs" else 0, **common)
            res["server_cpu_s"] = cpu_seconds(server.proc.pid) - cpu
            rounds[phase].append(res)
            print(f"  round {r + 1} {phase}: p99 {pct(res['latencies_s'], 99) or 0:.0f} ms, "
                  f"{res['errors']} errors, {res['wrong_answers']} wrong, "
                  f"{res['bomb_requests']} bomb requests", flush=True)
    phases = {}
    for phase, runs in rounds.items():
        lat = [x for r in runs for x in r["latencies_s"]]
        blat = [x for r in runs for x in r["bomb_latencies_s"]]
        status: dict[str, int] = {}
        for r in runs:
            for k, v in r["bomb_status"].items():
                status[k] = status.get(k, 0) + v
        phases[phase] = {
            "requests": sum(r["requests"] for r in runs), "ok": len(lat),
            "errors": sum(r["errors"] for r in runs),
            "wrong_answers": sum(r["wrong_answers"] for r in runs),
            "error_examples": [e for r in runs for e in r["error_examples"]][:3],
            "wrong_examples": [e for r in runs for e in r["wrong_examples"]][:3],
            "latency_ms": {q: pct(lat, float(q[1:])) for q in ("p50", "p90", "p99")}
            | {"max": max(lat) * 1000 if lat else None},
            "requests_per_s": len(lat) / sum(r["wall_s"] for r in runs),
            "bomb_requests": sum(r["bomb_requests"] for r in runs), "bomb_status": status,
            "bomb_latency_ms": {"p50": pct(blat, 50), "p99": pct(blat, 99)},
            "server_cpu_s": sum(r["server_cpu_s"] for r in runs),
            "wall_s": sum(r["wall_s"] for r in runs),
        }
    return {"phases": phases, "server_peak_rss_mib_before": rss_before,
            "server_peak_rss_mib_after": server.peak_rss_mib(),
            "bomb": f"{args.bombs_per_request} x 12000x12000 1-bit PNG ({len(bomb)} bytes "
                    "each) per request"}


# -- the run -----------------------------------------------------------------------------
def serve_task(b: Bench, folder: Path) -> Task:
    """A task trained briefly on digits (so its answers are worth checking), saved."""
    task = inca.fit(b.bb, load_dataset("digits", limit=300), kinds=("inca", "linear"),
                    layers=b.layers[:2], lrs=(3e-3,), epochs=3, progress=False,
                    num_workers=0, device="cpu")
    task.save(folder)
    return load_task(folder, backbone=b.bb)


PARTS = {"kills": ("extract", "save", "fit"), "inputs": ("library", "cli", "http")}
ALL_PARTS = "extract,save,fit,library,cli,http,load"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=8, help="kills of extraction and of saving")
    ap.add_argument("--fit-kills", type=int, default=4, help="kills of `inca fit`")
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    ap.add_argument("--jobs", type=int, default=2, help="CLI cases run side by side")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads of every process (on few busy cores more threads "
                         "spin-wait: 2 made extraction 10x slower here)")
    ap.add_argument("--requests", type=int, default=400, help="per load phase")
    ap.add_argument("--rounds", type=int, default=4, help="alternations alone / with bombs")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--bomb-clients", type=int, default=2)
    ap.add_argument("--bombs-per-request", type=int, default=3)
    ap.add_argument("--parts", default=ALL_PARTS,
                    help=f"some of {ALL_PARTS} ('kills' and 'inputs' name three each)")
    ap.add_argument("--backbone", default="auto", choices=("auto", "dinov2", "tiny-hf"))
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: the library cases only (no subprocess, seconds)")
    ap.add_argument("--results-dir", type=Path, default=None)
    args = ap.parse_args()
    import _faults_attack as attack  # imports this module's helpers (as ``faults``)

    parts = {q for p in args.parts.split(",") for q in PARTS.get(p, (p,))}
    if args.quick:
        parts = {"library"}
    args.parts = ",".join(sorted(parts))
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # children, and the server
    torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)
    kills: list[dict[str, Any]] = []
    cases: list[dict[str, Any]] = []
    load: dict[str, Any] | None = None
    fit_clean: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="inca-faults-") as tmp, \
            timer(seconds, "total"):
        b = Bench(Path(tmp), args.backbone, args.threads)
        backbone = b.scrub(" ".join(b.cli_backbone[1:]).replace("--input-size ", "at ")
                           + (" px" if b.kwargs else ""))
        try:
            if "extract" in parts:
                print(f"1a. extract_to_cache killed {args.kills} times", flush=True)
                with timer(seconds, "extract"):
                    kills += kill_extractions(b, args.kills, rng)
            if "save" in parts:
                print(f"1b. Task.save killed {args.kills} times", flush=True)
                with timer(seconds, "save"):
                    kills += kill_saves(b, args.kills, rng)
            if "fit" in parts and args.fit_kills:
                print(f"1c. inca fit killed {args.fit_kills} times", flush=True)
                with timer(seconds, "fit"):
                    rows, fit_clean = kill_fits(b, args.fit_kills, rng)
                kills += rows
            x = Inputs()
            if "library" in parts:
                print("2. bad inputs: library", flush=True)
                lib_task = random_task(b.bb, b.layers[0], 5).attach(b.bb)
                cases += run_cases(library_cases(b, x, lib_task) + attack.library_cases(b),
                                   1, b.scrub)
            if parts & {"cli", "http", "load"}:
                task_dir = b.tmp / "tasks" / "digits"
                task = serve_task(b, task_dir)
            if "cli" in parts:
                random_task(b.bb, b.layers[0], 99).save(b.tmp / "tasks" / "other")
                ext = ["extract", *b.cli_backbone, "--device", "cpu", "--batch-size", "8"]
                fit = ["fit", *b.cli_backbone, "--device", "cpu", "--num-workers", "0",
                       "--kinds", "linear", "--layers", "last", "--lrs", "1e-2", "--epochs",
                       "1", "--batch-size", "16", "--mode", "cached"]
                print("2. bad inputs: CLI", flush=True)
                catalogue = (folder_cases(b, x, ext) + split_cases(b, x, fit)
                             + task_cases(b, x, task_dir) + serve_cases(b, task_dir)
                             + option_cases(b, fit) + storage_cases(b, ext, fit)
                             + attack.cli_cases(b, x, ext, fit, task_dir))
                with timer(seconds, "cli"):
                    cases += run_cases(catalogue, args.jobs, b.scrub)
            if parts & {"http", "load"}:
                from serve import Server

                options = ["--api-key", KEY, "--device", "cpu", "--max-upload-mb", "2",
                           "--max-batch", "32", "--max-wait-ms", "5", "--batching"]
                with Server([task_dir], options, b.tmp / "server.log", 180) as server:
                    if "http" in parts:
                        print("2. bad inputs: HTTP", flush=True)
                        with timer(seconds, "http"):
                            cases += run_cases(http_cases(b, server.port, x, task), 1, b.scrub)
                    if "load" in parts:
                        print("3. load with bombs", flush=True)
                        with timer(seconds, "load"):
                            load = run_load(b, server, task, args)
                        load["server_log_tail"] = b.scrub(server.log_tail(1500))
                if "http" in parts:  # the attack's cases, on a server of default limits
                    with timer(seconds, "http"):
                        cases += attack.http_rows(b, x, task_dir, task)
        finally:
            b.end_all()
    payload = summarize(kills, cases, load, fit_clean, args, seconds, backbone)
    md = to_markdown(payload)
    folder = args.results_dir or Path(__file__).parent / "results"
    path = write_results("faults", payload, md, folder)
    print(md)
    print(f"wrote {path}")


def summarize(kills: list[dict[str, Any]], cases: list[dict[str, Any]],
              load: dict[str, Any] | None, fit_clean: dict[str, Any],
              args: argparse.Namespace, seconds: dict[str, float], backbone: str
              ) -> dict[str, Any]:
    counted = [c for c in cases if c["outcome"] != "harness error"]
    phases = (load or {}).get("phases", {})
    alone, bombs = phases.get("alone", {}), phases.get("bombs", {})
    p99a = alone.get("latency_ms", {}).get("p99")
    p99b = bombs.get("latency_ms", {}).get("p99")
    return {
        "faults_injected": len(kills),
        "faults_survived": sum(k["survived"] for k in kills),
        "bad_inputs_tried": len(counted),
        "bad_inputs_handled_clearly": sum(c["outcome"] == HANDLED for c in counted),
        "silent_wrong_results": sum(k["silent_wrong"] for k in kills)
        + sum(c["outcome"] == SILENT for c in counted),
        "data_lost_events": sum(k["data_lost"] for k in kills)
        + sum(bool(c["data_lost"]) for c in counted),
        "load": {
            "requests": alone.get("requests", 0) + bombs.get("requests", 0),
            "errors": alone.get("errors", 0) + bombs.get("errors", 0),
            "wrong_answers": alone.get("wrong_answers", 0) + bombs.get("wrong_answers", 0),
            "p99_ms_normal": p99a,
            "p99_ms_normal_under_bombs": p99b,
        },
        "benchmark": "faults", "command": command_line(), "environment": environment(),
        "runtime_s": round(seconds["total"], 1),
        "part_seconds": {k: round(v, 1) for k, v in seconds.items() if k != "total"},
        "backbone": backbone, "inca_source": source_info(),
        "settings": {k: v for k, v in vars(args).items() if k != "results_dir"},
        "p99_under_bombs_over_alone": p99b / p99a if p99a and p99b else None,
        "kills": kills, "fit_clean_run": fit_clean, "bad_inputs": cases,
        "harness_errors": [c for c in cases if c["outcome"] == "harness error"],
        "load_detail": load,
    }


def to_markdown(p: dict[str, Any]) -> str:
    env, load = p["environment"], p["load"]

    def cell(text: Any, n: int = 160) -> str:
        return short(str(text), n).replace("|", "\\|")

    def ms(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.0f}"

    md = [
        "# Faults: repeated kill -9, bad inputs, `inca serve` under decompression bombs",
        "",
        f"Command: `{p['command']}`  ",
        f"{env['device']}, torch {env['torch']}, {env['cpu_threads']} thread(s) per process; "
        f"backbone {p['backbone']}; runtime {p['runtime_s']:.0f} s; inca at commit "
        f"{p['inca_source']['commit']}"
        + (" with uncommitted changes" if p["inca_source"]["uncommitted_changes_in_src"]
           else "") + ".  ",
        "Seconds per part: " + ", ".join(f"{k} {v:.1f}" for k, v in p["part_seconds"].items())
        + " (the machine's 2 cores were shared with other work).",
        "",
        "| measure | value |",
        "|---|---:|",
        f"| faults injected (SIGKILL) | {p['faults_injected']} |",
        f"| faults survived | {p['faults_survived']} |",
        f"| bad inputs tried | {p['bad_inputs_tried']} |",
        f"| bad inputs handled clearly | {p['bad_inputs_handled_clearly']} |",
        f"| silent wrong results | {p['silent_wrong_results']} |",
        f"| data-lost events | {p['data_lost_events']} |",
        f"| load: normal requests / errors / wrong answers | {load['requests']} / "
        f"{load['errors']} / {load['wrong_answers']} |",
        f"| load: p99 ms alone / under bombs | {ms(load['p99_ms_normal'])} / "
        f"{ms(load['p99_ms_normal_under_bombs'])} |",
        "",
    ]
    if p["kills"]:
        md += ["## Kills", "",
               "| kind | injected | survived | data lost | silent wrong | states hit at the "
               "kill |", "|---|---:|---:|---:|---:|---|"]
        for kind in dict.fromkeys(k["kind"] for k in p["kills"]):
            rows = [k for k in p["kills"] if k["kind"] == kind]
            states = sorted({str(r.get("state_at_kill") or r.get("loaded_as")) for r in rows})
            md.append(f"| {kind} | {len(rows)} | {sum(r['survived'] for r in rows)} | "
                      f"{sum(r['data_lost'] for r in rows)} | "
                      f"{sum(r['silent_wrong'] for r in rows)} | {cell('; '.join(states), 300)} |")
        md += ["", "Survived: `extract_to_cache` resumed in-process to a cache equal to an "
               "uninterrupted one, with no recorded shard extracted again; `Task.save` left "
               "the last finished save or the one in progress, and the next save left nothing "
               "behind; `inca fit` run again exited 0, kept every recorded shard file, and gave "
               "the clean run's cache and task weights (a run killed after its report was "
               "written may instead be refused clearly, as a finished run, and is then fitted "
               "again with `--overwrite`). Data lost: a resume that failed or wrote a recorded "
               "shard again. Each kill's details are in faults.json (`kills`).", ""]
        not_survived = [k for k in p["kills"] if not k["survived"]]
        if not_survived:
            why = [k.get("rerun_error") or k.get("resume_error") or k.get("loaded_as")
                   for k in not_survived]
            md += ["Not survived:", ""] + [
                f"- {k['kind']}, killed at {k.get('killed_at') or k.get('kill_after_s')} "
                f"({k.get('state_at_kill')}): {cell(w, 300)}"
                for k, w in zip(not_survived, why, strict=True)] + [""]
    if p["bad_inputs"]:
        md += ["## Bad inputs", "",
               "Handled clearly: a 4xx with a JSON `detail`; exit code 2 with one `error: ...` "
               "line on stderr and no traceback (`inca predict`, which reads on past an "
               "unreadable image: exit 1, one `error:` line naming it, the good image "
               "predicted); or the correct result where one is expected. "
               "Silent wrong: a bad input accepted, or a valid one answered wrongly. CLI cases "
               "run in their own process (`own`: kills, patched disks, second writers, data "
               "workers, serve) or through typer's runner in this process (`shared`: the same "
               "command and error handling, without 2-4 s of interpreter start-up each). "
               "An input starting H1 ... L10 is a case of the outside attack (its report's "
               "numbering; benchmarks/_faults_attack.py); its HTTP cases run against a server "
               "of default limits (10 MB bodies), the others against a 2 MiB one.", "",
               "| id | area | input | expected | outcome | what happened |",
               "|---|---|---|---|---|---|"]
        for c in p["bad_inputs"]:
            mark = c["outcome"] if c["outcome"] == HANDLED else f"**{c['outcome']}**"
            area = f"{c['area']} ({c['process']})" if c["process"] else c["area"]
            md.append(f"| {c['id']} | {area} | {cell(c['input'], 120)} | {c['expect']} | "
                      f"{mark} | {cell(c['detail'])} |")
        bad = [c for c in p["bad_inputs"] if c["outcome"] != HANDLED]
        if bad:
            md += ["", "Not handled clearly, with a reproduction (`$TMP` is the script's "
                   "temporary folder; see the case's input for how the file was made):", ""]
            md += [f"- `{c['id']}`: {cell(c['detail'], 400)}  \n  `{c['reproduce']}`"
                   for c in bad]
        md.append("")
    detail = p.get("load_detail")
    if detail:
        md += ["## Load with bombs", "",
               f"`inca serve` (batching on, max batch 32, wait 5 ms, API key), one 8x8 PNG per "
               f"request from {p['settings']['clients']} client threads; bombs: "
               f"{detail['bomb']} from {p['settings']['bomb_clients']} threads of another "
               f"process, without pause; {p['settings']['rounds']} alternating rounds of "
               f"{p['settings']['requests'] // p['settings']['rounds']} requests. Server, "
               "clients and bombers share the machine's 2 cores; every answer is checked "
               "against in-process `Task.predict_proba` (probabilities within 1e-4).", "",
               "| phase | requests | errors | wrong | p50 ms | p90 ms | p99 ms | max ms | "
               "bomb requests (status) | bomb p50 ms |",
               "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
        for name, ph in detail["phases"].items():
            lat = ph["latency_ms"]
            status = ", ".join(f"{k}: {v}" for k, v in sorted(ph["bomb_status"].items()))
            md.append(f"| {name} | {ph['requests']} | {ph['errors']} | {ph['wrong_answers']} | "
                      f"{ms(lat['p50'])} | {ms(lat['p90'])} | {ms(lat['p99'])} | "
                      f"{ms(lat['max'])} | {ph['bomb_requests']} ({status or '-'}) | "
                      f"{ms(ph['bomb_latency_ms']['p50'])} |")
        ratio = p["p99_under_bombs_over_alone"]
        alone, bombs = detail["phases"]["alone"], detail["phases"]["bombs"]
        per_bomb = ((bombs["server_cpu_s"] - alone["server_cpu_s"]) / bombs["bomb_requests"]
                    * 1000 if bombs["bomb_requests"] else None)
        md += ["", f"- p99 under bombs / alone: **{ratio:.2f}** (target: at most 2)"
               if ratio else "- p99 ratio: n/a",
               f"- server CPU: {alone['server_cpu_s']:.1f} s in {alone['wall_s']:.1f} s alone, "
               f"{bombs['server_cpu_s']:.1f} s in {bombs['wall_s']:.1f} s under bombs: about "
               f"{ms(per_bomb)} ms per rejected bomb request (parsing the body, reading the "
               "headers); the bombs cost CPU time, not memory",
               f"- server peak RSS: {ms(detail['server_peak_rss_mib_before'])} MiB before the "
               f"load, {ms(detail['server_peak_rss_mib_after'])} MiB after (a decoded bomb "
               "would add 430 MiB)", ""]
    return "\n".join(md)


if __name__ == "__main__":
    main()
