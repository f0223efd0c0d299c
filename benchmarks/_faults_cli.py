"""Part 2 of the faults benchmark, bad inputs of the commands: tampered task folders and
bad images through ``inca predict``, ``inca serve`` refusing to start, and bad options of
``inca fit``."""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _faults_bench import HOST, Bench, last_line, short
from _faults_cases import (
    HANDLED,
    SILENT,
    UNCLEAR,
    Case,
    Inputs,
    Verdict,
    error_verdict,
    result_verdict,
    truncate,
)
from tiny import edit_json, edit_weights, free_port, nan_weight, rehash

from inca.task import TASK_JSON, TASK_WEIGHTS


def unknown_backbone(meta: dict[str, Any]) -> None:
    """The backbone a task rebuilds: its name, and its recorded source where there is one."""
    meta["backbone"]["name"] = "nope:xyz"
    if isinstance(meta["backbone"].get("source"), dict):
        meta["backbone"]["source"]["spec"] = "nope:xyz"


def task_cases(b: Bench, x: Inputs, task: Path) -> list[Case]:
    """Tampered task folders through ``inca predict``, and bad images to predict."""
    root = b.tmp / "tasks-tampered"
    image = root / "seven.png"
    image.parent.mkdir(parents=True, exist_ok=True)
    image.write_bytes(x.good[7])
    as_file = root / "task-is-a-file"
    file_args = _predict(as_file, image)
    pdir = root / "a-folder"
    pdir_args = _predict(task, pdir)
    return [
        *_tamper_cases(b, task, root, image),
        Case("task-is-a-file", "cli", "--task naming a regular file", "clear error",
             lambda: (as_file.write_bytes(b"x"), error_verdict(
                 b.cli(file_args), ("task-is-a-file",)))[1], b.repro(file_args), "shared"),
        *_predict_error_cases(b, x, task, root, image),
        Case("predict-directory", "cli", "inca predict given a folder as the image",
             "clear error", lambda: (pdir.mkdir(exist_ok=True), error_verdict(
                 b.cli(pdir_args), ("a-folder",)))[1], b.repro(pdir_args), "shared"),
        *_bit_depth_cases(b, x, task, root),
    ]


def _predict(folder: Path, *images: Path) -> list[str]:
    return ["predict", *[str(i) for i in images], "--task", str(folder), "--device", "cpu"]


def _tampers(b: Bench) -> list[tuple[str, str, Callable[[Path], Any], tuple[str, ...]]]:
    """``(id, what, tamper of a task folder, what the error must name)``."""
    def other_weights(f: Path) -> None:
        shutil.copy(b.tmp / "tasks" / "other" / TASK_WEIGHTS, f / TASK_WEIGHTS)

    def set_config(field_name: str, value: Any) -> Callable[[dict[str, Any]], None]:
        return lambda m: m["members"][0]["spec"]["config"].update({field_name: value})

    return [
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


def _tamper_cases(b: Bench, task: Path, root: Path, image: Path) -> list[Case]:
    """Each of :func:`_tampers` on a copy of the task, through ``inca predict``."""
    cases = []
    for cid, what, tamper, mention in _tampers(b):
        folder = root / cid
        args = _predict(folder, image)

        def go(folder: Path = folder, tamper: Callable[[Path], Any] = tamper,
               args: list[str] = args, mention: tuple[str, ...] = mention) -> Verdict:
            shutil.copytree(task, folder)
            tamper(folder)
            return error_verdict(b.cli(args), mention)
        cases.append(Case(cid, "cli", what + " (inca predict)", "clear error", go,
                          b.repro(args), "shared"))
    return cases


def _predict_error_cases(b: Bench, x: Inputs, task: Path, root: Path, image: Path
                         ) -> list[Case]:
    """Unreadable images beside a good one through ``inca predict``."""
    def predict_error(cid: str, what: str, name: str, data: bytes | None) -> Case:
        """``name`` beside a good image: inca predict reports the one it cannot read (an
        ``error:`` line naming it, then how many failed), predicts the other, exits 1."""
        path = root / name
        args = _predict(task, path, image)

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

    return [predict_error("predict-bomb", "inca predict on a 12000x12000 PNG bomb",
                          "bomb.png", x.bomb),
            predict_error("predict-missing-image", "inca predict on a file that does not "
                          "exist", "nowhere.png", None),
            predict_error("predict-truncated", "inca predict on a PNG cut in half",
                          "half.png", x.truncated)]


def _bit_depth_cases(b: Bench, x: Inputs, task: Path, root: Path) -> list[Case]:
    """16-bit pictures predicted like their 8-bit twins."""
    pairs = [("deep.png", x.deep, "deep-twin.png", x.deep_twin),
             ("dark.png", x.dark, "dark-twin.png", x.dark_twin),
             ("float.tif", x.float_tiff, "float-twin.png", x.float_twin)]
    cases = []
    for name, data, twin, twin_data in pairs:
        args = _predict(task, root / name, root / twin)

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


def option_cases(b: Bench, fit: list[str]) -> list[Case]:
    """Bad options of ``inca fit``."""
    base = [*fit, "--data", "digits", "--limit", "40"]
    return _bad_value_cases(b, base) + _out_cases(b, base)


def _bad_value_cases(b: Bench, base: list[str]) -> list[Case]:
    """Option values out of range, unknown or malformed."""
    def opt(cid: str, extra: list[str], mention: tuple[str, ...] = (),
            what: str | None = None) -> Case:
        args = [*base, "--out", str(b.tmp / "out" / cid), *extra]
        return Case(cid, "cli", what or " ".join(extra), "clear error",
                    lambda: error_verdict(b.cli(args), mention), b.repro(args), "shared")

    return [
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


def _out_cases(b: Bench, base: list[str]) -> list[Case]:
    """``--out`` where nothing can be written."""
    cases = []
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
