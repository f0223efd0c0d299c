"""The outside attack's cases (issue 20; its report's H1, H2, M1, M2, M4, M6, L1-L4, L6,
L7, L9, L10) as bad inputs of ``benchmarks/faults.py``, in its style and with its helpers:
the library and CLI cases here, the HTTP cases in ``_faults_attack_http.py``.

``library_cases`` and ``cli_cases`` join the library and CLI catalogue, one builder for each
of the report's findings (or each group of them, as the manifests). The load with slow
connections and strips is measured by ``serve_load.py`` (``_attacks.py``), not here.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from _faults_bench import Bench, Run, last_line, short
from _faults_cases import (
    HANDLED,
    SILENT,
    UNCLEAR,
    Case,
    Inputs,
    Verdict,
    error_verdict,
    result_verdict,
    write_folder,
)
from PIL import Image
from tiny import edit_json, overwrite_inside, png, save_tiny_vit_classifier

from inca.data import load_dataset

STRIP_WIDE = (100_000, 4)  # the CLI's strip (467 bytes; 2.48 GB RSS before the fix)


def run_rss(b: Bench, args: list[str], timeout: float = 300) -> tuple[Run, float]:
    """``inca ARGS`` in its own process, and that process's peak RSS in MiB (wait4)."""
    out, err = (b.tmp / f"rss-{time.monotonic_ns()}.{s}" for s in ("out", "err"))
    t = time.perf_counter()
    with open(out, "w+") as fo, open(err, "w+") as fe:
        p = b.spawn([sys.executable, "-m", "inca.cli", *args], stdout=fo, stderr=fe,
                    env=b.env())
        timer = threading.Timer(timeout, p.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(p.pid, 0)
            p.returncode = os.waitstatus_to_exitcode(status)
        finally:
            timer.cancel()
            b.end(p)
    return (Run(args, p.returncode, out.read_text(), err.read_text(), time.perf_counter() - t),
            usage.ru_maxrss / 1024)


def exif_rotated(image: Image.Image) -> bytes:
    """A JPEG of ``image`` whose EXIF says Orientation=6 (viewed turned 90 degrees)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def overwritten_cache(b: Bench, folder: Path) -> Path:
    """A complete cache of 40 digits in ``folder`` whose shard 0 token file has 4 KiB
    overwritten inside (M1); that file."""
    from inca.features import extract_to_cache

    with b.bb_lock:
        extract_to_cache(b.bb, load_dataset("digits", limit=40), folder,
                         layers=b.layers[:2], batch_size=32, num_workers=0, progress=False)
    shard = folder / "shards" / "00000"
    target = shard / (b.layers[0].replace("/", "_") + ".npy")
    size = target.stat().st_size
    overwrite_inside(target)
    assert target.stat().st_size == size
    return target


def library_cases(b: Bench) -> list[Case]:
    """M1 through the cache's reader, L6 through the image opener."""
    from inca.data.images import open_image
    from inca.errors import CacheError
    from inca.features.cache import ActivationCache

    root = b.tmp / "attack"
    rng = np.random.default_rng(1)
    cases: list[Case] = []

    # M1 / L10: 4 KiB overwritten inside a complete cache's shard, same size
    def cache_load() -> Verdict:
        target = overwritten_cache(b, root / "cache-overwritten")
        cache = ActivationCache(root / "cache-overwritten")
        try:
            tokens = cache.get_numpy(b.layers[0], np.arange(len(cache)))
        except CacheError as e:
            msg = b.scrub(str(e))
            ok = target.name in msg and "\n" not in msg
            return Verdict(HANDLED if ok else UNCLEAR, short(msg))
        except Exception as e:  # noqa: BLE001 - recorded: not a clear error
            return Verdict(UNCLEAR, f"{type(e).__name__}: {short(b.scrub(str(e)))}")
        bad = int((~np.isfinite(tokens)).sum())
        return Verdict(SILENT, f"loaded without an error ({bad} non-finite values)")
    cases.append(Case("cache-shard-overwritten", "library", "M1: 4 KiB of 0xff written inside "
                      "a complete cache's shard 0 token file (same size), then "
                      "ActivationCache.get_numpy", "clear error", cache_load,
                      "ActivationCache(folder).get_numpy(layer, idx)"))

    # L6: EXIF orientation
    def exif() -> Verdict:
        from PIL import ImageOps

        pic = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8))
        data = exif_rotated(pic)
        got = np.asarray(open_image(data).convert("RGB"))
        want = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
        if got.shape != want.shape or np.abs(got.astype(int) - want).max() > 1:
            return Verdict(SILENT, f"opened as {got.shape[1]}x{got.shape[0]}, upright is "
                           f"{want.shape[1]}x{want.shape[0]}")
        return Verdict(HANDLED, f"turned upright: {got.shape[1]}x{got.shape[0]} (stored 40x30),"
                       " equal to ImageOps.exif_transpose")
    cases.append(Case("exif-orientation", "library", "L6: a 40x30 JPEG with EXIF Orientation=6 "
                      "through open_image", "correct result", exif,
                      "inca.data.images.open_image(data) vs PIL.ImageOps.exif_transpose"))
    return cases


def cli_cases(b: Bench, x: Inputs, ext: list[str], fit: list[str], task: Path) -> list[Case]:
    """The attack's CLI and library cases."""
    root = b.tmp / "attack"
    image = root / "seven.png"  # what the `inca predict` cases predict
    return [_thin_strip_case(b, x, ext, root), _hf_classifier_case(b, x, root, image),
            _cache_rerun_case(b, ext, root), _kwargs_huge_case(b, x, task, root, image),
            *_class_count_cases(b, fit, root), *_manifest_cases(b, x, ext, root),
            *_task_edit_cases(b, x, task, root, image)]


def _thin_strip_case(b: Bench, x: Inputs, ext: list[str], root: Path) -> Case:
    """H1: a 100000x4 PNG in an image folder (inca extract), peak RSS against the same
    folder without it."""
    from inca.features.cache import ActivationCache

    good = {f"a/{i}.png": x.good[i] for i in range(4)} | \
        {f"b/{i}.png": x.good[4 + i] for i in range(4)}
    strip_data, plain_data = root / "thin-strip", root / "thin-strip-without"
    strip_args = [*ext, "--data", str(strip_data), "--out", str(b.tmp / "out" / "thin-strip"),
                  "--num-workers", "0"]
    plain_args = [*ext, "--data", str(plain_data), "--out",
                  str(b.tmp / "out" / "thin-strip-without"), "--num-workers", "0"]

    def thin_strip() -> Verdict:
        write_folder(strip_data, good | {"a/strip.png": png(Image.new("L", STRIP_WIDE, 128))})
        write_folder(plain_data, good)
        r, rss = run_rss(b, strip_args)
        r0, rss0 = run_rss(b, plain_args)
        if r0.rc != 0:
            raise RuntimeError(f"the folder without the strip failed: {r0.stderr[-2000:]}")
        if r.rc == 2:
            return error_verdict(r, ("strip.png",))

        def check() -> str | None:
            cache = ActivationCache(b.tmp / "out" / "thin-strip")
            if len(cache) != 9:
                return f"{len(cache)} samples extracted, expected 9"
            tokens = cache.get_numpy(cache.layers[0], np.arange(9))
            return None if np.isfinite(tokens).all() else "non-finite tokens"
        v = result_verdict(r, check)
        v.detail += (f"; peak RSS {rss:.0f} MiB in {r.seconds:.1f} s, {rss0:.0f} MiB in "
                     f"{r0.seconds:.1f} s without the strip")
        if v.outcome == HANDLED and rss - rss0 > 512:
            return Verdict(UNCLEAR, "the strip is amplified: " + v.detail)
        return v
    return Case("thin-strip-extract", "cli", "H1: a 100000x4 PNG (467 bytes) in an "
                "image folder (inca extract; peak RSS against the folder without it)",
                "correct result", thin_strip, b.repro(strip_args), "own")


def _hf_classifier_case(b: Bench, x: Inputs, root: Path, image: Path) -> Case:
    """H2: a task fitted on a saved ViTForImageClassification loads in another process."""
    cls_run = root / "hf-classifier-run"
    cls_fit = ["fit", "--backbone", f"hf:{root / 'vit-classifier'}", "--data", "digits",
               "--limit", "60", "--device", "cpu", "--num-workers", "0", "--kinds", "linear",
               "--layers", "last", "--lrs", "1e-2", "--epochs", "1", "--mode", "cached",
               "--val-fraction", "0.25", "--out", str(cls_run)]
    cls_predict = ["predict", str(image), "--task", str(cls_run / "task"), "--device", "cpu"]

    def hf_classifier() -> Verdict:
        save_tiny_vit_classifier(root / "vit-classifier")
        image.write_bytes(x.good[7])
        r = b.run(cls_fit)
        if r.rc != 0:
            return error_verdict(r) if r.rc == 2 else Verdict(
                UNCLEAR, f"inca fit: exit {r.rc}: {short(last_line(r.stderr))}")
        p = b.run(cls_predict)  # another process: another random pooler
        if p.rc != 0:
            return Verdict(SILENT, f"fit exit 0, but its task does not load in another "
                           f"process: exit {p.rc}: {short(last_line(p.stderr))}",
                           data_lost=True)
        return Verdict(HANDLED, "fitted (exit 0); loaded and predicted in another process: "
                       + short(last_line(p.stdout), 120))
    return Case("hf-classifier-task-loads", "cli", "H2: inca fit on a saved "
                "ViTForImageClassification (hf:, pooler missing), then inca predict "
                "with its task in another process", "correct result", hf_classifier,
                b.repro(cls_fit) + " && " + b.repro(cls_predict), "own")


def _cache_rerun_case(b: Bench, ext: list[str], root: Path) -> Case:
    """L10: inca extract again over a complete cache with 4 KiB overwritten inside."""
    rerun = root / "cache-overwritten-rerun"
    rerun_args = [*ext, "--data", "digits", "--limit", "40", "--layers", ",".join(b.layers[:2]),
                  "--out", str(rerun), "--batch-size", "32", "--num-workers", "0"]

    def cache_rerun() -> Verdict:
        target = overwritten_cache(b, rerun)
        return error_verdict(b.cli(rerun_args), (target.name,))
    return Case("cache-overwritten-extract-again", "cli", "L10: inca extract re-run over "
                "that complete cache with 4 KiB overwritten inside a shard",
                "clear error", cache_rerun, b.repro(rerun_args), "shared")


def _kwargs_huge_case(b: Bench, x: Inputs, task: Path, root: Path, image: Path) -> Case:
    """M4: backbone.source.kwargs num_hidden_layers 100000 (inca predict, own process)."""
    huge = root / "task-kwargs-huge"
    huge_args = ["predict", str(image), "--task", str(huge), "--device", "cpu"]

    def kwargs_huge() -> Verdict:
        image.write_bytes(x.good[7])
        shutil.copytree(task, huge)
        edit_json(huge, lambda m: m["backbone"].setdefault("source", {}).setdefault(
            "kwargs", {}).update(num_hidden_layers=100_000))
        r = b.run(huge_args, timeout=120)
        v = error_verdict(r, ("num_hidden_layers",))
        v.detail += f" ({r.seconds:.1f} s, interpreter start-up included)"
        if v.outcome == HANDLED and r.seconds > 30:
            return Verdict(UNCLEAR, "refused, but slowly: " + v.detail)
        return v
    return Case("task-kwargs-huge-layers", "cli", "M4: task.json backbone.source.kwargs "
                "num_hidden_layers 100000 (inca predict; refused within 30 s)",
                "clear error", kwargs_huge, b.repro(huge_args), "own")


def _class_count_cases(b: Bench, fit: list[str], root: Path) -> list[Case]:
    """M6: many small classes (the two cases draw their pictures from one generator)."""
    rng = np.random.default_rng(0)

    def tiny_pngs(classes: int, each: int) -> dict[str, bytes]:
        return {f"c{c:04d}/{i}.png": png(Image.fromarray(
            rng.integers(0, 256, (12, 12), dtype=np.uint8))) for c in range(classes)
            for i in range(each)}

    many, many_out = root / "classes-300x3", b.tmp / "out" / "classes-300x3"
    many_args = [*fit, "--data", str(many), "--out", str(many_out), "--val-fraction", "0.001"]

    def many_classes() -> Verdict:
        write_folder(many, tiny_pngs(300, 3))
        r = b.cli(many_args)

        def check() -> str | None:
            data = json.loads((many_out / "report.json").read_text()).get("data", {})
            if data.get("num_val", 0) < 1 or data.get("num_train", 0) + data["num_val"] != 900:
                return f"split {data.get('num_train')} / {data.get('num_val')} of 900"
            return None
        v = result_verdict(r, check)
        if v.outcome == HANDLED:
            data = json.loads((many_out / "report.json").read_text())["data"]
            v.detail += f": {data['num_train']} training / {data['num_val']} validation"
        return v

    single, single_args = root / "classes-2000x1", [
        *fit, "--data", str(root / "classes-2000x1"), "--out",
        str(b.tmp / "out" / "classes-2000x1")]
    return [Case("val-split-300x3", "cli", "M6: 300 classes x 3 images, --val-fraction "
                 "0.001 (inca fit)", "correct result", many_classes, b.repro(many_args),
                 "shared"),
            Case("val-split-2000x1", "cli", "M6: 2000 classes x 1 image (no split "
                 "possible; inca fit)", "clear error",
                 lambda: (write_folder(single, tiny_pngs(2000, 1)),
                          error_verdict(b.cli(single_args), ("per class",)))[1],
                 b.repro(single_args), "shared")]


@dataclass
class _Manifests:
    """The manifest cases' folder: 24 images of three classes beside each manifest, run
    through ``inca extract``."""

    b: Bench
    ext: list[str]
    folder: Path
    rows: list[tuple[str, str]]
    imgs: dict[str, bytes]

    def csv_text(self, labels: dict[str, str], extra: list[tuple[str, str]] = ()) -> str:
        return "path,label\n" + "".join(f"{p},{labels.get(c, c)}\n"
                                        for p, c in [*self.rows, *extra])

    def args(self, name: str) -> list[str]:
        return [*self.ext, "--data", str(self.folder / name), "--out",
                str(self.b.tmp / "out" / f"mf-{name}"), "--num-workers", "0"]

    def error(self, cid: str, what: str, name: str, data: bytes,
              mention: tuple[str, ...]) -> Case:
        args, b = self.args(name), self.b
        return Case(cid, "cli", what, "clear error",
                    lambda: (write_folder(self.folder, self.imgs | {name: data}),
                             error_verdict(b.cli(args), mention))[1], b.repro(args), "shared")

    def ok(self, cid: str, what: str, name: str, text: str, samples: int,
           classes: set[str], warned: str | None = None) -> Case:
        from inca.features.cache import read_manifest

        args, b = self.args(name), self.b

        def go() -> Verdict:
            write_folder(self.folder, self.imgs | {name: text.encode()})
            r = b.cli(args)

            def check() -> str | None:
                m = read_manifest(b.tmp / "out" / f"mf-{name}")
                if m["num_samples"] != samples or set(m["classes"]) != classes:
                    return (f"{m['num_samples']} samples, classes {m['classes']}; expected "
                            f"{samples}, {sorted(classes)}")
                if warned and warned not in r.stdout + r.stderr:
                    return f"no warning saying '{warned}'"
                return None
            v = result_verdict(r, check)
            if v.outcome == HANDLED:
                v.detail += f": {samples} samples, classes {sorted(classes)}"
            return v
        return Case(cid, "cli", what, "correct result", go, b.repro(args), "shared")


def _manifest_cases(b: Bench, x: Inputs, ext: list[str], root: Path) -> list[Case]:
    """L1-L3, L7: manifests (an encoding, label spellings, duplicate rows, class names)."""
    rows = [(f"img/{c}/{i}.png", c) for c in ("cat", "dog", "fox") for i in range(8)]
    mf = _Manifests(b, ext, root / "manifests", rows,
                    {p: x.good[k % len(x.good)] for k, (p, _) in enumerate(rows)})
    latin1 = ("path,label\n" + "".join(f"{p},{c}\xe9\n" for p, c in rows)).encode("latin-1")
    cases = [
        mf.error("manifest-latin1", "L1: a Latin-1 CSV manifest (labels with an e-acute)",
                 "latin1.csv", latin1, ("latin1.csv", "UTF-8")),
        mf.ok("manifest-number-spellings", "L2: CSV labels 01, 1 and 007 (three "
              "classes)", "zero_padded.csv", mf.csv_text({"cat": "01", "dog": "1",
                                                          "fox": "007"}), 24,
              {"01", "1", "007"}),
        mf.ok("manifest-nan-inf-labels", "L2: CSV labels nan, inf and fox (class names)",
              "nan_label.csv", mf.csv_text({"cat": "nan", "dog": "inf"}), 24,
              {"nan", "inf", "fox"}),
        mf.ok("manifest-duplicate-rows", "L3: a CSV manifest listing 8 of its 24 rows "
              "twice (each image used once, with a warning)", "dup_rows.csv",
              mf.csv_text({}, rows[:8]), 24, {"cat", "dog", "fox"}, "duplicate row"),
    ]
    bad_names = [("nul", "NUL", "ca\x00t"), ("newline", "a newline", "ca\nt"),
                 ("rtl", "U+202E", "cat\u202egnp.exe"), ("4096", "4,096 characters", "c" * 4096)]
    for tag, what, name in bad_names:
        text = "".join(json.dumps({"path": p, "label": name if c == "cat" else c}) + "\n"
                       for p, c in rows).encode()
        cases.append(mf.error(f"class-name-{tag}", f"L7: a class name holding {what} "
                              "(JSON-lines manifest)", f"name-{tag}.jsonl", text,
                              ("rename the class",)))
    return cases


def _task_edit_cases(b: Bench, x: Inputs, task: Path, root: Path, image: Path) -> list[Case]:
    """L7: task.json edited within the schema (inca predict)."""
    def layer_moved(m: dict[str, Any]) -> None:
        layers = m["members"][0]["layers"]
        other = next(ly for ly in b.bb.layers if ly not in layers
                     and b.bb.embed_dims[ly] == b.bb.embed_dims[layers[0]])
        m["members"][0]["layers"] = [other, *layers[1:]]

    edits = [("task-member-moved-layer", "a member moved to another layer of the same width",
              lambda t: edit_json(t, layer_moved)),
             ("task-classes-reordered", "the class names reversed",
              lambda t: edit_json(t, lambda m: m["classes"].reverse())),
             ("task-class-name-rtl", "a class name holding U+202E",
              lambda t: edit_json(t, lambda m: m["classes"].__setitem__(0, "7\u202egnp.exe")))]
    cases = []
    for cid, what, tamper in edits:
        folder = root / "tasks" / cid
        args = ["predict", str(image), "--task", str(folder), "--device", "cpu"]

        def go(folder: Path = folder, tamper: Any = tamper, args: list[str] = args) -> Verdict:
            image.write_bytes(x.good[7])
            shutil.copytree(task, folder)
            tamper(folder)
            return error_verdict(b.cli(args), ("task.json",))
        cases.append(Case(cid, "cli", f"L7: task.json edited within the schema: {what} "
                          "(inca predict)", "clear error", go, b.repro(args), "shared"))
    return cases
