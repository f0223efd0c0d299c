"""The task folder format: what a task folder holds, how it is checked, and how it is written.

A task folder holds ``task.json`` (format version, classes, members' layers and adapter
specs, the backbone's description and how to create it again, metrics, the sha256 of the
weights and of the report), ``adapter_model.safetensors`` (``members.<i>.<name>`` tensors),
``report.json`` (the fit report, when there is one) and ``README.md`` (a model card, for
people and the Hugging Face hub; never read back). Never the backbone, never a pickle.

Reading one checks everything local first (:func:`read_task_files`: schema and bounds, weight
names, shapes and values, the hashes) before any backbone is created. Writing swaps a
complete, flushed copy in (:func:`write_task_folder`), so a kill never leaves a folder
mixing two saves.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from inca._files import FolderLock, disk_errors, make_new_dir, strict_json
from inca.adapters import Adapter, adapter_from_spec
from inca.adapters.base import MAX_DIM, MAX_LAYERS, MAX_PREFIX_TOKENS
from inca.backbones.base import Preprocessing
from inca.errors import InCAError

if TYPE_CHECKING:
    from inca.runtime.task import Task
    from inca.training.report import FitReport

TASK_JSON = "task.json"
TASK_WEIGHTS = "adapter_model.safetensors"
TASK_REPORT = "report.json"
TASK_CARD = "README.md"
TASK_FILES = (TASK_JSON, TASK_WEIGHTS, TASK_REPORT, TASK_CARD)
# 2 records the weights' sha256; 3 the report's too (report.json), and the backbone's source
TASK_FORMAT = 3
READABLE_FORMATS = (1, 2, 3)

# Bounds of what a task.json may ask for: far above real tasks, far below exhausting memory.
MAX_CLASSES = 1_000_000
MAX_MEMBERS = 1024
MAX_NAME = 4096  # characters of a class, layer, key or backbone name (a path)
MAX_TOKEN_GRID = 1024
MAX_INPUT_SIZE = 16_384
_MAX_JSON_BYTES = 64 << 20
_MAX_BACKBONE_LAYERS = 100_000
# The weights file may hold float64 at most, plus its JSON header (a few hundred bytes a
# tensor): anything longer is not these members' weights and is not read.
_HEADER_SLACK, _HEADER_PER_TENSOR = 1 << 20, 1024
_READ_ATTEMPTS = 3
_FIX = "save the task again (Task.save, or `inca fit --out ...`)"
# Arguments a task file may not pass to create_backbone: a task downloaded from the hub
# must not run code from the hub when its backbone is created.
_UNSAFE_KWARGS = ("trust_remote_code", "code_revision")


class TaskError(InCAError):
    """A task file is missing, malformed, or does not fit the backbone."""


class _ReadRace(TaskError):
    """The folder changed while it was read (a save swapped it in): worth reading again."""


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

    def build(self, precision: str = "auto") -> Task:
        """The task (members on the CPU in float32, no backbone attached yet)."""
        from inca.runtime.task import Task

        members = []
        for i, m in enumerate(self.meta["members"]):
            adapter = adapter_from_spec(m["spec"])
            prefix = f"members.{i}."
            adapter.load_state_dict({k[len(prefix):]: v for k, v in self.tensors.items()
                                     if k.startswith(prefix)})
            members.append(adapter)
        meta = self.meta
        task = Task(members, [m["layers"] for m in meta["members"]], meta["classes"],
                    meta["backbone"], token_grid=meta.get("token_grid"),
                    metrics=meta.get("metrics"), keys=[m["key"] for m in meta["members"]],
                    precision=precision)
        task.report = self.report
        return task


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
    meta_check, weights_check = _Checker(meta_file), _Checker(weights_file)
    meta = _parse_json(_read_bytes(meta_file, _MAX_JSON_BYTES, meta_check), meta_check)
    expected = _expected_tensors(_check_meta(meta, meta_check))
    limit = (8 * sum(t.numel() for t in expected.values()) + _HEADER_SLACK
             + _HEADER_PER_TENSOR * len(expected))
    data = _read_bytes(weights_file, limit, weights_check)
    recorded = meta.get("weights_sha256")
    if recorded is not None and hashlib.sha256(data).hexdigest() != recorded:
        raise _ReadRace(
            f"{weights_file}: its sha256 differs from the one {TASK_JSON} records, so the "
            "two files come from different saves (an interrupted save or copy, or an "
            f"edit); {_FIX}")
    try:
        tensors = load_safetensors(data)
    except (SafetensorError, ValueError, TypeError, RuntimeError, OverflowError) as e:
        first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TaskError(f"{weights_file} is not a readable safetensors file ({first_line}): "
                        f"it is truncated or corrupted; {_FIX}") from e
    _check_tensors(tensors, expected, weights_check)
    return TaskFiles(folder, meta, tensors, _read_report(folder, meta.get("report_sha256")))


def _read_report(folder: Path, recorded: str | None) -> FitReport | None:
    """The report saved with the task: ``None`` when none was saved, or its file was left
    behind when the task was copied (it is not needed to predict)."""
    file = folder / TASK_REPORT
    if recorded is None or not file.is_file():
        return None
    check = _Checker(file)
    data = _read_bytes(file, _MAX_JSON_BYTES, check)
    if hashlib.sha256(data).hexdigest() != recorded:
        raise _ReadRace(
            f"{file}: its sha256 differs from the one {TASK_JSON} records, so the two files "
            f"come from different saves (an interrupted save or copy, or an edit); {_FIX}")
    from inca.training.report import FitReport

    try:
        return FitReport.from_dict(_parse_json(data, check))
    except (InCAError, TypeError, ValueError, KeyError) as e:
        check.fail(f"it is not a fit report ({e})")


def _read_bytes(file: Path, limit: int, check: _Checker) -> bytes:
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


def _parse_json(data: bytes, check: _Checker) -> Any:
    try:
        # NaN/Infinity (which old saves wrote in metrics) read as null: a config field that
        # is NaN is then refused by its type check.
        return json.loads(data.decode("utf-8"), parse_constant=lambda _: None)
    except UnicodeDecodeError:
        check.fail("the file is not UTF-8 text")
    except json.JSONDecodeError as e:
        check.fail(f"the file is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})")
    except (ValueError, RecursionError):  # over-long integers, absurd nesting
        check.fail("the file is not valid JSON (a number too long or nesting too deep)")


# -- the schema of task.json --------------------------------------------------------------
class _Checker:
    """Raises the one-line :class:`TaskError` of a check that failed on ``file``."""

    def __init__(self, file: Path, fix: str = _FIX) -> None:
        self.file = file
        self.fix = fix

    def fail(self, cause: str, fix: str | None = None) -> NoReturn:
        raise TaskError(f"{self.file}: {cause}; {fix or self.fix}")

    def obj(self, value: Any, where: str, required: Iterable[str],
            optional: Iterable[str] = (), *, open_ended: bool = False) -> dict[str, Any]:
        """A JSON object holding ``required`` keys (and, unless ``open_ended``, no others)."""
        if not isinstance(value, dict):
            self.fail(f"{where} must be a JSON object, got {_shown(value)}")
        missing = sorted(set(required) - set(value))
        if missing:
            self.fail(f"{where} lacks the key(s) {_few(missing)}")
        unknown = sorted(set(value) - set(required) - set(optional))
        if unknown and not open_ended:
            self.fail(f"{where} has unknown key(s) {_few(unknown)}")
        return value

    def integer(self, value: Any, where: str, low: int, high: int) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            self.fail(f"{where} must be an integer in [{low:,}, {high:,}], got {_shown(value)}")
        return value

    def name(self, value: Any, where: str) -> str:
        if not isinstance(value, str) or not value or len(value) > MAX_NAME:
            self.fail(f"{where} must be a non-empty string of at most {MAX_NAME} characters, "
                      f"got {_shown(value)}")
        return value

    def names(self, value: Any, where: str, high: int) -> list[str]:
        """A list of 1 to ``high`` distinct names."""
        if not isinstance(value, list) or not 1 <= len(value) <= high:
            self.fail(f"{where} must be a list of 1 to {high:,} names, got {_shown(value)}")
        for i, v in enumerate(value):
            self.name(v, f"{where}[{i}]")
        seen: set[str] = set()
        for v in value:
            if v in seen:
                self.fail(f"{where} names {v!r} more than once")
            seen.add(v)
        return value


def _check_meta(meta: Any, check: _Checker) -> list[Adapter]:
    """Check a task.json's contents; return its members built on the ``meta`` device
    (shapes only, no memory), for the weights to be checked against."""
    top = check.obj(meta, "the top level", {"format_version"}, open_ended=True)
    version = top["format_version"]
    if not isinstance(version, int) or isinstance(version, bool) \
            or version not in READABLE_FORMATS:
        newer = isinstance(version, int) and version > TASK_FORMAT
        check.fail(f"format_version {_shown(version)} is not one this inca reads "
                   f"({', '.join(map(str, READABLE_FORMATS))})",
                   fix="upgrade inca to load it" if newer else _FIX)
    optional = {"token_grid", "metrics", "num_parameters"}
    required = {"format_version", "classes", "members", "backbone"}
    (required if version >= 2 else optional).add("weights_sha256")
    if version >= 3:
        optional.add("report_sha256")
    check.obj(top, "the top level", required, optional)
    for key in ("weights_sha256", "report_sha256"):
        digest = top.get(key)
        if key in top and not (
                isinstance(digest, str) and len(digest) == 64
                and all(c in "0123456789abcdef" for c in digest)):
            check.fail(f"{key} must be 64 lowercase hex digits, got {_shown(digest)}")
    classes = check.names(top["classes"], "classes", MAX_CLASSES)
    info = _check_backbone_info(top["backbone"], check)
    if top.get("token_grid") is not None:
        check.integer(top["token_grid"], "token_grid", 1, MAX_TOKEN_GRID)
    if "metrics" in top and top["metrics"] is not None and not isinstance(top["metrics"], dict):
        check.fail(f"metrics must be a JSON object, got {_shown(top['metrics'])}")
    if "num_parameters" in top:
        check.integer(top["num_parameters"], "num_parameters", 0, 1 << 62)
    members = top["members"]
    if not isinstance(members, list) or not 1 <= len(members) <= MAX_MEMBERS:
        check.fail(f"members must be a list of 1 to {MAX_MEMBERS} members, got "
                   f"{_shown(members)}")
    known = set(info["layers"]) if "layers" in info else None
    return [_check_member(i, m, len(classes), info, known, check)
            for i, m in enumerate(members)]


def _check_backbone_info(info: Any, check: _Checker) -> dict[str, Any]:
    # Open-ended: a backbone's description may grow; the fields read here are checked.
    info = check.obj(info, "backbone", {"name", "fingerprint", "preprocessing"},
                     open_ended=True)
    check.name(info["name"], "backbone.name")
    check.name(info["fingerprint"], "backbone.fingerprint")
    if "layers" in info:
        check.names(info["layers"], "backbone.layers", _MAX_BACKBONE_LAYERS)
    if "embed_dims" in info:
        dims = check.obj(info["embed_dims"], "backbone.embed_dims", set(), open_ended=True)
        for layer, d in dims.items():
            check.integer(d, f"backbone.embed_dims[{layer!r}]", 1, MAX_DIM)
    if "num_prefix_tokens" in info:
        check.integer(info["num_prefix_tokens"], "backbone.num_prefix_tokens", 0,
                      MAX_PREFIX_TOKENS)
    if "source" in info:
        _check_source(info["source"], check)
    prep = check.obj(info["preprocessing"], "backbone.preprocessing",
                     {"input_size", "mean", "std"}, {"interpolation"})
    check.integer(prep["input_size"], "backbone.preprocessing.input_size", 1, MAX_INPUT_SIZE)
    for key in ("mean", "std"):
        v = prep[key]
        if not (isinstance(v, list) and len(v) == 3 and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and abs(x) < 1e6
                for x in v)):
            check.fail(f"backbone.preprocessing.{key} must be 3 numbers, got {_shown(v)}")
    try:
        Preprocessing.from_dict(prep)
    except InCAError as e:
        check.fail(f"backbone.preprocessing: {e}")
    return info


def _check_source(source: Any, check: _Checker) -> None:
    """``backbone.source``: how to create the backbone again (:func:`inca.create_backbone`
    arguments, which a task file from elsewhere must not use to run code)."""
    where = "backbone.source"
    source = check.obj(source, where, {"spec", "kwargs"}, open_ended=True)
    check.name(source["spec"], f"{where}.spec")
    kwargs = check.obj(source["kwargs"], f"{where}.kwargs", set(), open_ended=True)
    unsafe = [k for k in _UNSAFE_KWARGS if kwargs.get(k)]
    if unsafe:
        check.fail(f"{where}.kwargs sets {unsafe[0]!r}, which would run code from the hub "
                   "when the backbone is created; inca never does that",
                   fix="remove it, or load the task with a backbone you created")
    for key in ("pretrained", "offline"):
        if key in source and not isinstance(source[key], bool):
            check.fail(f"{where}.{key} must be true or false, got {_shown(source[key])}")
    for key in ("checkpoint_path", "hub_id", "revision"):
        if source.get(key) is not None:
            check.name(source[key], f"{where}.{key}")
    if "unrecorded" in source and not isinstance(source["unrecorded"], list):
        check.fail(f"{where}.unrecorded must be a list, got {_shown(source['unrecorded'])}")


def _check_member(i: int, member: Any, num_classes: int, info: dict[str, Any],
                  known: set[str] | None, check: _Checker) -> Adapter:
    where = f"members[{i}]"
    member = check.obj(member, where, {"key", "layers", "spec"})
    key = check.name(member["key"], f"{where}.key")
    where = f"{where} ({key!r})"
    layers = check.names(member["layers"], f"{where}.layers", MAX_LAYERS)
    unknown = [ly for ly in layers if known is not None and ly not in known]
    if unknown:
        check.fail(f"{where} reads layer {unknown[0]!r}, which backbone {info['name']!r} "
                   "does not have")
    spec = check.obj(member["spec"], f"{where}.spec",
                     {"kind", "embed_dim", "num_classes", "config"})
    check.name(spec["kind"], f"{where}.spec.kind")
    check.integer(spec["embed_dim"], f"{where}.spec.embed_dim", 1, MAX_DIM)
    check.integer(spec["num_classes"], f"{where}.spec.num_classes", 1, MAX_CLASSES)
    if spec["num_classes"] != num_classes:
        check.fail(f"{where} has {spec['num_classes']} outputs but the task has "
                   f"{num_classes} class names")
    check.obj(spec["config"], f"{where}.spec.config", set(), open_ended=True)
    try:
        # The meta device allocates nothing: the shapes to check the weights against.
        adapter = adapter_from_spec(spec, device="meta")
    except (InCAError, TypeError, ValueError, OverflowError) as e:
        check.fail(f"{where}.spec: {e}")
    named = list(getattr(adapter.config, "layers", None) or [])  # multi-layer probes
    count = len(named) if named else getattr(adapter.config, "num_layers", 1)
    if (named and named != layers) or len(layers) != count:
        check.fail(f"{where} lists layers {_few(layers)} but its {spec['kind']!r} adapter "
                   f"reads {_few(named) if named else f'{count} layer(s)'}")
    widths = getattr(adapter, "layer_dims", None) or (adapter.embed_dim,) * count
    dims = info.get("embed_dims") or {}
    for layer, width in zip(layers, widths, strict=True):
        if layer in dims and dims[layer] != width:
            check.fail(f"{where} reads {width}-wide tokens of layer {layer!r}, which are "
                       f"{dims[layer]} wide in backbone {info['name']!r}")
    return adapter


def _expected_tensors(members: list[Adapter]) -> dict[str, torch.Tensor]:
    """The tensors (on the meta device) a weights file must hold for these members."""
    return {f"members.{i}.{k}": t for i, m in enumerate(members)
            for k, t in m.state_dict().items()}


def _check_tensors(tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                   check: _Checker) -> None:
    missing = sorted(set(expected) - set(tensors))
    if missing:
        check.fail(f"it lacks the weight(s) {_few(missing)} that task.json's members need")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        check.fail(f"it holds weight(s) {_few(extra)} that no member of task.json has")
    for name, want in expected.items():
        t = tensors[name]
        if t.shape != want.shape:
            check.fail(f"weight {name!r} has shape {list(t.shape)}, but task.json's member "
                       f"needs {list(want.shape)}")
        if not t.is_floating_point():
            check.fail(f"weight {name!r} is {str(t.dtype).removeprefix('torch.')}, not "
                       "floating point")
        if not bool(torch.isfinite(t).all()):
            check.fail(f"weight {name!r} holds NaN or infinite values (the training "
                       "diverged)", fix="fit the task again (e.g. a lower learning rate)")


def _shown(value: Any) -> str:
    """A JSON value for a message, cut short (it may be huge or deeply nested)."""
    if isinstance(value, list):
        return f"a list of {len(value)} item(s)"
    if isinstance(value, dict):
        return f"an object of {len(value)} key(s)"
    if isinstance(value, (str, int, float, bool, type(None))):
        text = json.dumps(value)
        return text if len(text) <= 40 else text[:37] + "..."
    return type(value).__name__


def _few(names: Sequence[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:3])
    return shown + (f" and {len(names) - 3} more" if len(names) > 3 else "")


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
    weights = save_safetensors(tensors)
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
    members = _check_meta(json.loads(files[TASK_JSON]), _Checker(folder / TASK_JSON, fix))
    _check_tensors(tensors, _expected_tensors(members), _Checker(folder / TASK_WEIGHTS, fix))
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
                        f"({_few(foreign)}) that replacing it would delete; save the task "
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
