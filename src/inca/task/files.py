"""Reading and writing task folders: what a task folder holds, read and checked, and saved
by an atomic swap.

A task folder holds ``task.json`` (format version, classes, members' layers and adapter
specs, the backbone's description and how to create it again, metrics, the sha256 of the
weights and of the report), ``adapter_model.safetensors`` (``members.<i>.<name>`` tensors),
``report.json`` (the fit report, when there is one) and ``README.md`` (a model card, for
people and the Hugging Face hub; never read back). Never the backbone, never a pickle.

Reading one checks everything local first (:func:`read_task_files`: the schema of
:mod:`inca.task.schema`, weight names, shapes and values, the hashes) before any backbone is
created. Writing swaps a complete, flushed copy in (:func:`write_task_folder`), so a kill
never leaves a folder mixing two saves.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from inca._files import FolderLock, disk_errors, make_new_dir, strict_json
from inca.adapters import Adapter, adapter_from_spec
from inca.errors import InCAError
from inca.task.report import FitReport
from inca.task.schema import (
    FIX,
    TASK_CARD,
    TASK_FILES,
    TASK_FORMAT,
    TASK_JSON,
    TASK_REPORT,
    TASK_WEIGHTS,
    Checker,
    TaskError,
    check_meta,
    check_tensors,
    expected_tensors,
    few,
)

_MAX_JSON_BYTES = 64 << 20
# The weights file may hold float64 at most, plus its JSON header (a few hundred bytes a
# tensor): anything longer is not these members' weights and is not read.
_HEADER_SLACK, _HEADER_PER_TENSOR = 1 << 20, 1024
_READ_ATTEMPTS = 3


class _ReadRace(TaskError):
    """The folder changed while it was read (a save swapped it in): worth reading again."""


# What the weights mean: the fields of task.json that turn tokens into outputs. Their
# sha256 is saved inside the weights file (safetensors metadata), which task.json's
# weights_sha256 covers: an edit of them (a member moved to another layer of the same width,
# classes renamed or reordered) is refused instead of loading and predicting silently.
# The backbone's name and how to create it are left out: a local backbone may move.
_MEANING_KEY = "inca_meaning_sha256"
_BACKBONE_MEANING = ("fingerprint", "layers", "embed_dims", "num_prefix_tokens",
                     "preprocessing")


def meaning_sha256(meta: dict[str, Any]) -> str:
    """The sha256 of what a task's weights mean (see ``_MEANING_KEY``)."""
    bb = meta.get("backbone", {})
    meaning = {"classes": meta.get("classes"), "members": meta.get("members"),
               "token_grid": meta.get("token_grid"),
               "backbone": {k: bb.get(k) for k in _BACKBONE_MEANING}}
    return hashlib.sha256(json.dumps(meaning, sort_keys=True).encode()).hexdigest()


def _saved_meaning(data: bytes) -> str | None:
    """The meaning sha256 a safetensors file's header holds (tasks saved before have none)."""
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]).get("__metadata__", {}).get(_MEANING_KEY)


@dataclass(frozen=True)
class TaskFiles:
    """A task folder read and checked by :func:`read_task_files`; no backbone involved.

    Attributes:
        folder: where it was read: the folder, or its aside copy (``.<name>.old``) when a
            save was killed between its two renames.
        meta: the checked ``task.json``.
        tensors: the checked weights, ``members.<i>.<name>`` (on the CPU, as saved).
        report: the fit report saved with the task (``report.json``), when there is one.
    """

    folder: Path
    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    report: FitReport | None = None

    @property
    def backbone_info(self) -> dict[str, Any]:
        """``Backbone.describe()`` of the backbone the task was trained on."""
        return self.meta["backbone"]

    def members(self) -> list[Adapter]:
        """The members with their weights (on the CPU, in float32);
        :meth:`Task.from_files <inca.task.Task.from_files>` makes the task of them."""
        members = []
        for i, m in enumerate(self.meta["members"]):
            adapter = adapter_from_spec(m["spec"])
            prefix = f"members.{i}."
            adapter.load_state_dict({k[len(prefix):]: v for k, v in self.tensors.items()
                                     if k.startswith(prefix)})
            members.append(adapter)
        return members


def read_task_files(path: str | Path) -> TaskFiles:
    """Read a task folder and check everything that needs no backbone.

    In order, before any module is built or any weight is read: ``task.json`` against the
    schema (types, required keys, a readable format version, every field within bounds,
    one class name per output of every member, layers the backbone has); then the
    weights file's size against what the members can hold, its sha256 against the one
    ``task.json`` records (format 2), its safetensors header, and every tensor's name,
    shape, dtype and values (finite) against the members' specs; then the report
    (format 3), its sha256 and fields.

    Raises:
        TaskError: one line naming the file, the cause and the fix.
    """
    folder = Path(path)
    for attempt in range(_READ_ATTEMPTS):
        try:
            return _read_checked(_readable_folder(folder))
        except _ReadRace:  # a save swapped the folder while we read it: read it again
            if attempt == _READ_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")


def _readable_folder(folder: Path) -> Path:
    """``folder``, or its aside copy when a save was killed between its two renames."""
    aside = _aside(folder)
    return aside if not folder.exists() and aside.is_dir() else folder


def _read_checked(folder: Path) -> TaskFiles:
    meta_file, weights_file = folder / TASK_JSON, folder / TASK_WEIGHTS
    if not meta_file.is_file() or not weights_file.is_file():
        raise TaskError(f"{folder} is not a task folder (needs {TASK_JSON} and "
                        f"{TASK_WEIGHTS}); create one with `inca fit --out ...`")
    meta_check, weights_check = Checker(meta_file), Checker(weights_file)
    meta = _parse_json(_read_bytes(meta_file, _MAX_JSON_BYTES, meta_check), meta_check)
    expected = expected_tensors(check_meta(meta, meta_check))
    limit = (8 * sum(t.numel() for t in expected.values()) + _HEADER_SLACK
             + _HEADER_PER_TENSOR * len(expected))
    data = _read_bytes(weights_file, limit, weights_check)
    recorded = meta.get("weights_sha256")
    if recorded is not None and hashlib.sha256(data).hexdigest() != recorded:
        raise _ReadRace(
            f"{weights_file}: its sha256 differs from the one {TASK_JSON} records, so the "
            "two files come from different saves (an interrupted save or copy, or an "
            f"edit); {FIX}")
    try:
        tensors = load_safetensors(data)
    except (SafetensorError, ValueError, TypeError, RuntimeError, OverflowError) as e:
        first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TaskError(f"{weights_file} is not a readable safetensors file ({first_line}): "
                        f"it is truncated or corrupted; {FIX}") from e
    check_tensors(tensors, expected, weights_check)
    saved = _saved_meaning(data)
    if saved is not None and saved != meaning_sha256(meta):
        meta_check.fail("its classes, members or backbone layers differ from those the "
                        "weights were saved with (it was edited after the save)",
                        "restore the task.json saved with these weights, or fit the task "
                        "again")
    return TaskFiles(folder, meta, tensors, _read_report(folder, meta.get("report_sha256")))


def _read_report(folder: Path, recorded: str | None) -> FitReport | None:
    """The report saved with the task: ``None`` when none was saved, or its file was left
    behind when the task was copied (it is not needed to predict)."""
    file = folder / TASK_REPORT
    if recorded is None or not file.is_file():
        return None
    check = Checker(file)
    data = _read_bytes(file, _MAX_JSON_BYTES, check)
    if hashlib.sha256(data).hexdigest() != recorded:
        raise _ReadRace(
            f"{file}: its sha256 differs from the one {TASK_JSON} records, so the two files "
            f"come from different saves (an interrupted save or copy, or an edit); {FIX}")
    try:
        return FitReport.from_dict(_parse_json(data, check))
    except (InCAError, TypeError, ValueError, KeyError) as e:
        check.fail(f"it is not a fit report ({e})")


def _read_bytes(file: Path, limit: int, check: Checker) -> bytes:
    try:
        size = file.stat().st_size
        if size > limit:
            check.fail(f"the file is {size:,} bytes, more than the {limit:,} its task can "
                       "need, so it is not this task's")
        return file.read_bytes()
    except FileNotFoundError as e:  # renamed away by a concurrent save
        raise _ReadRace(f"{file} disappeared while it was read; load the task again") from e
    except OSError as e:
        raise TaskError(f"cannot read {file}: {e.strerror or e}; check its permissions") \
            from e


def _parse_json(data: bytes, check: Checker) -> Any:
    try:
        # NaN/Infinity (which old saves wrote in metrics) read as the floats they are: a
        # config field that is NaN is then refused as NaN by its range check (as null it
        # read "got None", and an optional field took it for unset).
        return json.loads(data.decode("utf-8"), parse_constant=float)
    except UnicodeDecodeError:
        check.fail("the file is not UTF-8 text")
    except json.JSONDecodeError as e:
        check.fail(f"the file is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})")
    except (ValueError, RecursionError):  # over-long integers, absurd nesting
        check.fail("the file is not valid JSON (a number too long or nesting too deep)")


# -- writing ------------------------------------------------------------------------------
def write_task_folder(folder: Path, meta: dict[str, Any], tensors: dict[str, torch.Tensor], *,
                      report: dict[str, Any] | None = None, card: str | None = None) -> Path:
    """Check a task and swap it into ``folder``, replacing a task saved there before.

    ``meta`` is ``task.json`` without its format version and hashes, which are added here.
    A task that would not load is not written: the checks :func:`read_task_files` makes are
    made first. The folder then gets ``task.json``, ``adapter_model.safetensors``,
    ``report.json`` (when ``report`` is given) and ``README.md`` (``card``), written and
    flushed in a hidden sibling (``.<name>.new-*``) and swapped in by two renames; files
    get mode 0644 (0666 less the umask), folders 0755. One process writes a folder at a
    time (a lock file beside it, ``.<name>.lock``).

    Raises:
        TaskError: the task would not load, or ``folder`` holds other files than a task's
            (replacing it would delete them).
        StorageError: the disk is full or read-only, or another process is saving there.
    """
    meaning = meaning_sha256(json.loads(_json_bytes(meta)))  # of the fields as read back
    weights = save_safetensors(tensors, metadata={_MEANING_KEY: meaning})
    files = {TASK_WEIGHTS: weights}
    if report is not None:
        files[TASK_REPORT] = _json_bytes(report)
    meta = {"format_version": TASK_FORMAT, **meta,
            "weights_sha256": hashlib.sha256(weights).hexdigest()}
    if TASK_REPORT in files:
        meta["report_sha256"] = hashlib.sha256(files[TASK_REPORT]).hexdigest()
    files[TASK_JSON] = _json_bytes(meta)
    if card is not None:
        files[TASK_CARD] = card.encode()
    fix = "fix the task before saving it"
    members = check_meta(json.loads(files[TASK_JSON]), Checker(folder / TASK_JSON, fix))
    check_tensors(tensors, expected_tensors(members), Checker(folder / TASK_WEIGHTS, fix))
    with disk_errors(folder):
        folder.parent.mkdir(parents=True, exist_ok=True)
        with FolderLock(folder, what="task folder"):
            _recover(folder)
            _check_replaceable(folder)
            _swap_in(folder, files)
    return folder


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(strict_json(obj), indent=2, allow_nan=False) + "\n").encode()


# -- the folder swap ----------------------------------------------------------------------
def _aside(folder: Path) -> Path:
    """Where a save moves the old task while it renames the new one in."""
    return folder.parent / f".{folder.name}.old"


def _new_prefix(folder: Path) -> str:
    return f".{folder.name}.new-"


def _swap_in(folder: Path, files: dict[str, bytes]) -> None:
    """Write ``files`` into a new hidden sibling of ``folder``, flushed, and swap it in."""
    new = make_new_dir(folder.parent, _new_prefix(folder))  # 0755, where mkdtemp is 0700
    try:
        for name, data in files.items():
            with open(new / name, "xb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        _fsync_dir(new)
        if folder.exists():
            aside = _aside(folder)
            os.rename(folder, aside)  # until the next rename, load_task reads `aside`
            os.rename(new, folder)
            _fsync_dir(folder.parent)
            shutil.rmtree(aside)
        else:
            os.rename(new, folder)
            _fsync_dir(folder.parent)
    except BaseException:
        _recover(folder)  # put the old task back, remove the new copy
        raise


def _recover(folder: Path) -> None:
    """Undo what an interrupted save left beside ``folder`` (the caller holds its lock)."""
    aside = _aside(folder)
    if aside.exists():
        if folder.exists():  # interrupted after the swap: the new task is in place
            shutil.rmtree(aside)
        else:  # interrupted between the renames: the old task goes back
            os.rename(aside, folder)
            _fsync_dir(folder.parent)
    prefix = _new_prefix(folder)
    for p in folder.parent.iterdir():
        if p.name.startswith(prefix) and p.is_dir():
            shutil.rmtree(p)


def _check_replaceable(folder: Path) -> None:
    """Refuse to replace (and so delete) a folder holding anything but a task's files."""
    if not folder.exists():
        return
    if not folder.is_dir():
        raise TaskError(f"cannot save a task to {folder}: it is a file; give a folder path")
    # Hidden *.tmp files are what the earlier, file-by-file save left when interrupted.
    foreign = sorted(p.name for p in folder.iterdir() if p.name not in TASK_FILES
                     and not (p.name.startswith(".") and p.name.endswith(".tmp")))
    if foreign:
        raise TaskError(f"cannot save a task to {folder}: it holds other files "
                        f"({few(foreign)}) that replacing it would delete; save the task "
                        "to a new folder or to an existing task folder")


def _fsync_dir(path: Path) -> None:
    """Make a folder's entries (new files, renames) durable; a no-op where a folder cannot
    be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
