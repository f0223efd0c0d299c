"""Part 2 of the faults benchmark, bad inputs: image folders (bad, odd and 16-bit images,
hidden files, too few classes), train/test splits that disagree, and the library's image
opener and ``Task.predict``."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
from _faults_bench import Bench, Run, cache_arrays, compare_arrays, last_line, short
from _faults_cases import (
    HANDLED,
    SILENT,
    UNCLEAR,
    Case,
    Inputs,
    Verdict,
    encoded,
    error_verdict,
    result_verdict,
    write_folder,
)
from PIL import Image
from tiny import png

from inca.features.cache import read_manifest
from inca.task import Task


def folder_cases(b: Bench, x: Inputs, ext: list[str]) -> list[Case]:
    """Bad images and folders through ``inca extract`` / ``inca fit``."""
    root = b.tmp / "inputs"
    good = {f"a/{i}.png": x.good[i] for i in range(4)} | \
        {f"b/{i}.png": x.good[4 + i] for i in range(4)}
    return (_folder_error_cases(b, x, ext, root, good)
            + _folder_result_cases(b, x, ext, root, good) + [_deep_folder_case(b, x, ext, root)])


def _folder_error_cases(b: Bench, x: Inputs, ext: list[str], root: Path,
                        good: dict[str, bytes]) -> list[Case]:
    """Folders that must be refused clearly."""
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

    gone = root / "no-such-folder"
    gone_args = [*ext, "--data", str(gone), "--out", str(b.tmp / "out" / "gone"),
                 "--num-workers", "0"]
    return [
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
        Case("folder-missing", "cli", "--data naming a folder that does not exist",
             "clear error", lambda: error_verdict(b.cli(gone_args), ("no-such-folder",)),
             b.repro(gone_args), "shared"),
    ]


def _extract_ok(b: Bench, ext: list[str], root: Path, cid: str, what: str,
                files: dict[str, bytes], base: dict[str, bytes],
                check: Callable[[Path, Run], str | None],
                extra: tuple[str, ...] = ("--num-workers", "0")) -> Case:
    """``files`` added to ``base``, extracted: ``check(out, run)`` says what is wrong."""
    data, out = root / cid, b.tmp / "out" / cid
    args = [*ext, "--data", str(data), "--out", str(out), *extra]

    def go() -> Verdict:
        write_folder(data, base | files)
        r = b.cli(args)
        return result_verdict(r, lambda: check(out, r))
    return Case(cid, "cli", what, "correct result", go, b.repro(args), "shared")


def _samples(n: int, classes: list[str] | None = None) -> Callable[[Path, Run], str | None]:
    """A check: the cache holds ``n`` samples (of ``classes``, where given)."""
    def check(out: Path, r: Run) -> str | None:
        m = read_manifest(out)
        if m["num_samples"] != n:
            return f"{m['num_samples']} samples extracted, expected {n}"
        if classes is not None and m["classes"] != classes:
            return f"classes {m['classes']}, expected {classes}"
        return None
    return check


def _folder_result_cases(b: Bench, x: Inputs, ext: list[str], root: Path,
                         good: dict[str, bytes]) -> list[Case]:
    """Folders with a correct result: bad files skipped, hidden files ignored, odd modes."""
    bad = {"a/bad.png": x.corrupt, "a/half.png": x.truncated, "b/empty.png": b"",
           "a/bomb.png": x.bomb, "a/hard.png": x.hard_bomb, "b/notes.jpg": b"notes\n"}
    hidden = {"a/.ipynb_checkpoints/0-checkpoint.png": x.good[0],
              "a/.ipynb_checkpoints/notes-checkpoint.png": b"junk",
              "a/.DS_Store": b"\0\0\0\1Bud1junk", "b/._3.png": b"\0\5\26\7AppleDouble junk",
              "b/.hidden.png": x.good[5], ".ipynb_checkpoints/a/x.png": x.good[1],
              ".Trash/c/y.png": x.good[2]}
    odd = {"a/cmyk.jpg": encoded(x.digits[0].convert("CMYK"), "JPEG"),
           "a/palette.png": png(x.digits[1].convert("P"), transparency=0),
           "a/la.png": png(x.digits[2].convert("LA")),
           "b/rgba.png": png(x.digits[3].convert("RGBA")),
           "b/one-pixel.png": png(Image.new("L", (1, 1), 200)),
           "b/strip.png": png(Image.new("L", (3000, 2), 100)),
           "b/anim.gif": encoded(x.digits[4].convert("P"), "GIF", save_all=True,
                                 append_images=[x.digits[5].convert("P")])}
    return [
        _extract_ok(b, ext, root, "skip-unreadable", "the six bad files above with "
                    "--skip-unreadable (8 good images)", bad, good, _samples(8),
                    ("--num-workers", "0", "--skip-unreadable")),
        _extract_ok(b, ext, root, "jpeg-named-png", "a JPEG file named .png",
                    {"b/photo.png": x.jpeg}, good, _samples(9)),
        _extract_ok(b, ext, root, "hidden-files", ".ipynb_checkpoints/, .DS_Store, ._x.png, "
                    ".hidden.png in class folders, hidden top-level folders", hidden,
                    good, _samples(8, ["a", "b"])),
        _extract_ok(b, ext, root, "unusual-modes", "CMYK JPEG, palette PNG with transparency, "
                    "LA, RGBA, 1x1 and 3000x2 images, an animated GIF", odd, good,
                    _samples(15)),
    ]


def _deep_folder_case(b: Bench, x: Inputs, ext: list[str], root: Path) -> Case:
    """16-bit images: the cache of a 16-bit folder equals the cache of its 8-bit twin."""
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
    return Case("png-16-bit", "cli", "a folder of 16-bit grey PNGs: tokens must equal "
                "those of the same pictures in 8 bits", "correct result", deep,
                b.repro(deep_args), "shared")


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
