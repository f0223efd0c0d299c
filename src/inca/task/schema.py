"""The schema of a task folder: its file names, ``task.json``'s fields and bounds, and the
checks that a ``task.json`` and its weights describe a task that loads.

Everything here is local: no file is read and no backbone created (reading and writing
are :mod:`inca.task.files`). Each check fails with a one-line :class:`TaskError` naming
the file, the cause and the fix (:class:`Checker`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch

from inca.adapters import Adapter, adapter_from_spec
from inca.adapters.base import MAX_DIM, MAX_LAYERS, MAX_PREFIX_TOKENS
from inca.backbones.base import Preprocessing
from inca.data.labels import CLASS_NAME_RULE, class_name_problem, shown_name
from inca.errors import InCAError, TaskError

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
_MAX_BACKBONE_LAYERS = 100_000
# The fix a message names when a task folder is damaged.
FIX = "save the task again (Task.save, or `inca fit --out ...`)"
# Arguments a task file may not pass to create_backbone: a task downloaded from the hub
# must not run code from the hub when its backbone is created.
_UNSAFE_KWARGS = ("trust_remote_code", "code_revision")


def license_ok(value: Any) -> bool:
    """A license identifier as the Hugging Face hub takes it (``apache-2.0``, ``mit``,
    ``cc-by-nc-4.0``, ``other``): short, lowercase letters, digits, ``.``, ``-``, ``+``."""
    return (isinstance(value, str) and 0 < len(value) <= 64
            and all(c.isascii() and (c.islower() or c.isdigit() or c in ".-+") for c in value))


class Checker:
    """Raises the one-line :class:`TaskError` of a check that failed on ``file``."""

    def __init__(self, file: Path, fix: str = FIX) -> None:
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
            self.fail(f"{where} lacks the key(s) {few(missing)}")
        unknown = sorted(set(value) - set(required) - set(optional))
        if unknown and not open_ended:
            self.fail(f"{where} has unknown key(s) {few(unknown)}")
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


def check_meta(meta: Any, check: Checker) -> list[Adapter]:
    """Check a task.json's contents; return its members built on the ``meta`` device
    (shapes only, no memory), for the weights to be checked against."""
    top = check.obj(meta, "the top level", {"format_version"}, open_ended=True)
    version = top["format_version"]
    if not isinstance(version, int) or isinstance(version, bool) \
            or version not in READABLE_FORMATS:
        newer = isinstance(version, int) and version > TASK_FORMAT
        check.fail(f"format_version {_shown(version)} is not one this inca reads "
                   f"({', '.join(map(str, READABLE_FORMATS))})",
                   fix="upgrade inca to load it" if newer else FIX)
    optional = {"token_grid", "metrics", "num_parameters", "license"}
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
    for i, name in enumerate(classes):
        problem = class_name_problem(name)
        if problem:
            check.fail(f"classes[{i}] {shown_name(name)} {problem}; {CLASS_NAME_RULE}",
                       fix="rename the class in task.json, or fit the task again")
    info = _check_backbone_info(top["backbone"], check)
    if top.get("token_grid") is not None:
        check.integer(top["token_grid"], "token_grid", 1, MAX_TOKEN_GRID)
    if "metrics" in top and top["metrics"] is not None and not isinstance(top["metrics"], dict):
        check.fail(f"metrics must be a JSON object, got {_shown(top['metrics'])}")
    if "num_parameters" in top:
        check.integer(top["num_parameters"], "num_parameters", 0, 1 << 62)
    if top.get("license") is not None and not license_ok(top["license"]):
        check.fail(f"license must be a license identifier such as 'apache-2.0', got "
                   f"{_shown(top['license'])}")
    members = top["members"]
    if not isinstance(members, list) or not 1 <= len(members) <= MAX_MEMBERS:
        check.fail(f"members must be a list of 1 to {MAX_MEMBERS} members, got "
                   f"{_shown(members)}")
    known = set(info["layers"]) if "layers" in info else None
    return [_check_member(i, m, len(classes), info, known, check)
            for i, m in enumerate(members)]


def _check_backbone_info(info: Any, check: Checker) -> dict[str, Any]:
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
        if not (isinstance(v, list) and len(v) == 3):
            check.fail(f"backbone.preprocessing.{key} must be a list of 3 numbers, got "
                       f"{_shown(v)}")
        for i, x in enumerate(v):
            if not (isinstance(x, (int, float)) and not isinstance(x, bool) and abs(x) < 1e6):
                check.fail(f"backbone.preprocessing.{key}[{i}] must be a finite number of "
                           f"magnitude below {1e6:g}, got {_shown(x)}")
    try:
        Preprocessing.from_dict(prep)
    except InCAError as e:
        check.fail(f"backbone.preprocessing: {e}")
    return info


def _check_source(source: Any, check: Checker) -> None:
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
                  known: set[str] | None, check: Checker) -> Adapter:
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
        check.fail(f"{where} lists layers {few(layers)} but its {spec['kind']!r} adapter "
                   f"reads {few(named) if named else f'{count} layer(s)'}")
    widths = getattr(adapter, "layer_dims", None) or (adapter.embed_dim,) * count
    dims = info.get("embed_dims") or {}
    for layer, width in zip(layers, widths, strict=True):
        if layer in dims and dims[layer] != width:
            check.fail(f"{where} reads {width}-wide tokens of layer {layer!r}, which are "
                       f"{dims[layer]} wide in backbone {info['name']!r}")
    return adapter


def expected_tensors(members: list[Adapter]) -> dict[str, torch.Tensor]:
    """The tensors (on the meta device) a weights file must hold for these members."""
    return {f"members.{i}.{k}": t for i, m in enumerate(members)
            for k, t in m.state_dict().items()}


def check_tensors(tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                   check: Checker) -> None:
    missing = sorted(set(expected) - set(tensors))
    if missing:
        check.fail(f"it lacks the weight(s) {few(missing)} that task.json's members need")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        check.fail(f"it holds weight(s) {few(extra)} that no member of task.json has")
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


def few(names: Sequence[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:3])
    return shown + (f" and {len(names) - 3} more" if len(names) > 3 else "")

