"""Tampered and half-written task folders are refused with one clear line, before any
backbone is created; a save killed at any step leaves the old task or the new one."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from planted import planted_backbone
from tiny import edit_json, edit_weights, make_task, nan_weight, rehash, task_state

import inca.backbones
from inca.adapters import AdapterError, create_adapter
from inca.task import (
    TASK_CARD,
    TASK_JSON,
    TASK_REPORT,
    TASK_WEIGHTS,
    Task,
    TaskError,
    load_task,
    read_task_files,
)


@pytest.fixture(scope="module")
def bb():
    return planted_backbone()


@pytest.fixture()
def no_backbone_created(monkeypatch):
    """Fail the test if anything asks for a backbone to be created (it could download)."""
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"a backbone was created: {args}")

    monkeypatch.setattr(inca.backbones, "create_backbone", refuse)


def same_task(a: Task, b: Task) -> bool:
    sa, sb = task_state(a), task_state(b)
    return (a.classes == b.classes and a.member_layers == b.member_layers and sa.keys() == sb.keys()
            and all(torch.equal(sa[k], sb[k]) for k in sa))


def set_config(field: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda m: m["members"][0]["spec"]["config"].update({field: value})


def set_backbone(**fields: Any) -> Callable[[dict[str, Any]], None]:
    return lambda m: m["backbone"].update(fields)


def set_prep(**fields: Any) -> Callable[[dict[str, Any]], None]:
    return lambda m: m["backbone"]["preprocessing"].update(fields)


SOURCE = {"spec": "planted", "kwargs": {}}


def truncate(folder: Path) -> None:
    data = (folder / TASK_WEIGHTS).read_bytes()
    (folder / TASK_WEIGHTS).write_bytes(data[:-7])


def not_a_report(folder: Path) -> None:
    """A report.json that is JSON but no fit report, its sha256 recorded in task.json."""
    import hashlib

    (folder / TASK_REPORT).write_bytes(b'{"chosen": "best"}')
    digest = hashlib.sha256(b'{"chosen": "best"}').hexdigest()
    edit_json(folder, lambda m: m.update(report_sha256=digest))


EDITED = "differ from those the weights were saved with.*restore the task.json"
TAMPERS: dict[str, tuple[Callable[[Path], None], str, str]] = {
    # name: (tamper, file named in the message, message fragment)
    "truncated weights": (truncate, TASK_WEIGHTS, "sha256 differs"),
    "truncated weights, hash recomputed": (lambda f: (truncate(f), rehash(f)), TASK_WEIGHTS,
                                           "not a readable safetensors file"),
    "garbage weights": (lambda f: ((f / TASK_WEIGHTS).write_bytes(b"\xff" * 64), rehash(f)),
                        TASK_WEIGHTS, r"not a readable safetensors file \(Error while "
                        r"deserializing: header too large\): it is truncated or corrupted;"),
    "wrong class count": (lambda f: edit_json(f, lambda m: m.update(classes=["a", "b", "c"])),
                          TASK_JSON, "has 4 outputs but the task has 3 class names"),
    "duplicate class": (lambda f: edit_json(f, lambda m: m["classes"].__setitem__(1, "c0")),
                        TASK_JSON, "names 'c0' more than once"),
    "class not a string": (lambda f: edit_json(f, lambda m: m["classes"].__setitem__(0, 7)),
                           TASK_JSON, r"classes\[0\] must be a non-empty string"),
    "huge num_queries": (lambda f: edit_json(f, set_config("num_queries", 1e8)), TASK_JSON,
                         r"num_queries must be an integer in \[1, 1024\]"),
    "huge int num_queries": (lambda f: edit_json(f, set_config("num_queries", 10**8)),
                             TASK_JSON, "num_queries must be an integer"),
    "huge num_heads": (lambda f: edit_json(f, set_config("num_heads", 10**9)), TASK_JSON,
                       "num_heads"),
    "huge attn_dim": (lambda f: edit_json(f, set_config("attn_dim", 10**7)), TASK_JSON,
                      "attn_dim"),
    "NaN dropout": (lambda f: (f / TASK_JSON).write_text(
        (f / TASK_JSON).read_text().replace('"dropout": 0.0', '"dropout": NaN')),
        TASK_JSON, "dropout must be a number"),
    "unknown config field": (lambda f: edit_json(f, set_config("bogus", 1)), TASK_JSON,
                             "unknown InCAConfig field"),
    "unknown format version": (lambda f: edit_json(f, lambda m: m.update(format_version=99)),
                               TASK_JSON, r"format_version 99 is not one this inca reads "
                               r"\(1, 2, 3\); upgrade inca to load it$"),
    "format version not a number": (
        lambda f: edit_json(f, lambda m: m.update(format_version="2")), TASK_JSON,
        "format_version"),
    "missing hash": (lambda f: edit_json(f, lambda m: m.pop("weights_sha256")), TASK_JSON,
                     "lacks the key.*weights_sha256"),
    "missing classes": (lambda f: edit_json(f, lambda m: m.pop("classes")), TASK_JSON,
                        "lacks the key.*classes"),
    "unknown top-level key": (lambda f: edit_json(f, lambda m: m.update(extra=1)), TASK_JSON,
                              r": the top level has unknown key\(s\) 'extra';"),
    "members not a list": (lambda f: edit_json(f, lambda m: m.update(members={})), TASK_JSON,
                           "members must be a list"),
    "members an object of one key": (lambda f: edit_json(f, lambda m: m.update(
        members={"inca/block1": 1})), TASK_JSON,
        r": members must be a list of 1 to 1024 members, got an object of 1 key\(s\);"),
    "no members": (lambda f: edit_json(f, lambda m: m.update(members=[])), TASK_JSON,
                   r": members must be a list of 1 to 1024 members, got a list of 0 item\(s\);"),
    "hash not hex": (lambda f: edit_json(f, lambda m: m.update(weights_sha256="XYZ")),
                     TASK_JSON, 'weights_sha256 must be 64 lowercase hex digits, got "XYZ";'),
    "hash too short": (lambda f: edit_json(f, lambda m: m.update(weights_sha256="abc123")),
                       TASK_JSON, 'weights_sha256 must be 64 lowercase hex digits, got '
                       '"abc123";'),
    "report hash not hex": (lambda f: edit_json(f, lambda m: m.update(report_sha256="XYZ")),
                            TASK_JSON, 'report_sha256 must be 64 lowercase hex digits, got '
                            '"XYZ";'),
    "unrecorded not a list": (lambda f: edit_json(f, set_backbone(source=dict(
        SOURCE, unrecorded="config"))), TASK_JSON,
        r'backbone\.source\.unrecorded must be a list, got "config";'),
    "class with a tab": (lambda f: edit_json(f, lambda m: m["classes"].__setitem__(0, "c\t0")),
                         TASK_JSON, r"classes\[0\] 'c\\t0' holds the control character U\+0009 "
                         r"at position 1; a class name .*; rename the class in task.json, or fit "
                         r"the task again$"),
    "backbone layer named twice": (lambda f: edit_json(f, set_backbone(
        layers=["stem", "stem"])), TASK_JSON, r": backbone\.layers names 'stem' more than once;"),
    "member lists more layers than its adapter reads": (lambda f: edit_json(
        f, lambda m: m["members"][0].update(layers=["block1", "block3"])), TASK_JSON,
        r": members\[0\] \('inca/block1'\) lists layers 'block1', 'block3' but its 'inca' "
        r"adapter reads 1 layer\(s\);"),
    "pretrained not true or false": (lambda f: edit_json(
        f, set_backbone(source=dict(SOURCE, pretrained="yes"))), TASK_JSON,
        r': backbone\.source\.pretrained must be true or false, got "yes";'),
    "JSON nested too deep": (lambda f: (f / TASK_JSON).write_text("[" * 100_000 + "]" * 100_000),
                             TASK_JSON, r"the file is not valid JSON \(a number too long or "
                             r"nesting too deep\); save the task again"),
    "JSON number too long": (lambda f: (f / TASK_JSON).write_text(
        '{"format_version": ' + "3" * 5000 + "}"), TASK_JSON,
        r"the file is not valid JSON \(a number too long or nesting too deep\); save the task"),
    "report not a fit report": (not_a_report, TASK_REPORT,
                                r"report.json: it is not a fit report \(the report lacks "
                                r"backbone, config, rows, candidates, chosen_members, "),
    "unknown adapter kind": (lambda f: edit_json(
        f, lambda m: m["members"][0]["spec"].update(kind="nope")), TASK_JSON,
        "unknown adapter kind 'nope'"),
    "layer the backbone lacks": (lambda f: edit_json(
        f, lambda m: m["members"][0].update(layers=["block9"])), TASK_JSON,
        "reads layer 'block9', which backbone 'planted' does not have"),
    "width the layer lacks": (lambda f: edit_json(
        f, lambda m: m["members"][0]["spec"].update(embed_dim=8)), TASK_JSON,
        "reads 8-wide tokens of layer 'block1', which are 16 wide"),
    "huge token grid": (lambda f: edit_json(f, lambda m: m.update(token_grid=10**9)),
                        TASK_JSON, "token_grid must be an integer"),
    "huge input size": (lambda f: edit_json(
        f, lambda m: m["backbone"]["preprocessing"].update(input_size=10**6)), TASK_JSON,
        "input_size must be an integer"),
    "not JSON": (lambda f: (f / TASK_JSON).write_text("{nope"), TASK_JSON,
                 "not valid JSON"),
    "not UTF-8": (lambda f: (f / TASK_JSON).write_bytes(b'{"classes": "\xe9"}'), TASK_JSON,
                  r": the file is not UTF-8 text; "),
    "JSON not an object": (lambda f: (f / TASK_JSON).write_text("[1, 2]"), TASK_JSON,
                           "top level must be a JSON object"),
    "NaN weights": (lambda f: edit_weights(f, nan_weight), TASK_WEIGHTS,
                    "'members.0.head.weight' holds NaN or infinite values \\(the training "
                    "diverged\\); fit the task again"),
    "missing key": (lambda f: edit_weights(f, lambda t: t.pop("members.0.query")),
                    TASK_WEIGHTS, "lacks the weight.*'members.0.query'"),
    "extra key": (lambda f: edit_weights(f, lambda t: t.update(
        {"members.0.extra": torch.zeros(2)})), TASK_WEIGHTS,
        "holds weight.*'members.0.extra' that no member"),
    "wrong shape": (lambda f: edit_weights(f, lambda t: t.update(
        {"members.0.head.weight": torch.zeros(5, 16)})), TASK_WEIGHTS,
        r"'members.0.head.weight' has shape \[5, 16\], but .* needs \[4, 16\]"),
    "integer weights": (lambda f: edit_weights(f, lambda t: t.update(
        {"members.0.head.bias": torch.zeros(4, dtype=torch.int64)})), TASK_WEIGHTS,
        "is int64, not floating point"),
    "oversized weights file": (lambda f: (f / TASK_WEIGHTS).write_bytes(b"\0" * (3 << 20)),
                               TASK_WEIGHTS, "more than the .* its task can need"),
    "weights file missing": (lambda f: (f / TASK_WEIGHTS).unlink(), "task",
                             "is not a task folder"),
    # each malformed field is named by its path in task.json, with the value it holds
    "backbone name not a string": (lambda f: edit_json(f, set_backbone(name=5)), TASK_JSON,
                                   "backbone.name must be a non-empty string"),
    "empty fingerprint": (lambda f: edit_json(f, set_backbone(fingerprint="")), TASK_JSON,
                          "backbone.fingerprint must be a non-empty string"),
    "embed_dims not an object": (lambda f: edit_json(f, set_backbone(embed_dims=[16])),
                                 TASK_JSON, "backbone.embed_dims must be a JSON object"),
    "negative prefix tokens": (lambda f: edit_json(f, set_backbone(num_prefix_tokens=-1)),
                               TASK_JSON, "backbone.num_prefix_tokens must be an integer"),
    "mean a string of 3 letters": (lambda f: edit_json(f, set_prep(mean="abc")), TASK_JSON,
                                   "backbone.preprocessing.mean must be a list of 3 numbers, "
                                   'got "abc"'),
    "huge std": (lambda f: edit_json(f, set_prep(std=[0.5, 1e9, 0.5])), TASK_JSON,
                 r"backbone.preprocessing.std\[1\] must be a finite number of magnitude below "
                 r"1e\+06, got 1000000000.0"),
    "hub id not a string": (lambda f: edit_json(f, set_backbone(source=dict(SOURCE, hub_id=5))),
                            TASK_JSON, "backbone.source.hub_id must be a non-empty string"),
    "revision not a string": (lambda f: edit_json(
        f, set_backbone(source=dict(SOURCE, revision=[]))), TASK_JSON,
        "backbone.source.revision must be a non-empty string"),
    "empty member key": (lambda f: edit_json(f, lambda m: m["members"][0].update(key="")),
                         TASK_JSON, r"members\[0\].key must be a non-empty string"),
    "member without layers": (lambda f: edit_json(
        f, lambda m: m["members"][0].update(layers=[])), TASK_JSON,
        r"members\[0\] \('inca/block1'\).layers must be a list of 1 to"),
    "metrics not an object": (lambda f: edit_json(f, lambda m: m.update(metrics=5)), TASK_JSON,
                              "metrics must be a JSON object, got 5"),
    "parameter count past 2^62": (lambda f: edit_json(
        f, lambda m: m.update(num_parameters=(1 << 62) + 1)), TASK_JSON,
        "num_parameters must be an integer"),
    "format version 2 without its hash": (lambda f: edit_json(
        f, lambda m: (m.update(format_version=2), m.pop("weights_sha256"))), TASK_JSON,
        "lacks the key.*weights_sha256"),
    "an older unknown format version": (lambda f: edit_json(
        f, lambda m: m.update(format_version=0)), TASK_JSON,
        r"format_version 0 is not one this inca reads \(.*\); save the task again"),
    # edits within the schema, which would load and predict silently: the weights file
    # records the sha256 of what they mean
    "member moved to a layer of the same width": (lambda f: edit_json(
        f, lambda m: m["members"][0].update(layers=["block3"])), TASK_JSON, EDITED),
    "classes reordered": (lambda f: edit_json(f, lambda m: m["classes"].reverse()), TASK_JSON,
                          EDITED),
    "class renamed": (lambda f: edit_json(f, lambda m: m["classes"].__setitem__(0, "dog")),
                      TASK_JSON, EDITED),
    "normalization edited": (lambda f: edit_json(
        f, lambda m: m["backbone"]["preprocessing"].update(mean=[0.0, 0.0, 0.0])), TASK_JSON,
        EDITED),
    "token grid edited": (lambda f: edit_json(f, lambda m: m.update(token_grid=2)), TASK_JSON,
                          EDITED),
    "prefix tokens edited": (lambda f: edit_json(
        f, lambda m: m["backbone"].update(num_prefix_tokens=1)), TASK_JSON, EDITED),
    "adapter option edited": (lambda f: edit_json(f, set_config("init_std", 0.5)), TASK_JSON,
                              EDITED),
}


@pytest.mark.parametrize("tamper", list(TAMPERS))
def test_tampered_task_is_refused_clearly_before_any_backbone(tamper, bb, tmp_path,
                                                              no_backbone_created):
    folder = make_task(bb).save(tmp_path / "task")
    change, file, fragment = TAMPERS[tamper]
    change(folder)
    with pytest.raises(TaskError, match=fragment) as info:
        load_task(folder)  # no backbone given: it would be created, after the checks
    message = str(info.value)
    assert str(folder / file) in message or (file == "task" and str(folder) in message)
    assert "\n" not in message and " object at 0x" not in message
    with pytest.raises(TaskError, match=fragment):  # a given backbone changes nothing
        load_task(folder, backbone=bb)


def test_a_weights_file_of_the_most_bytes_its_task_can_need_is_read(bb, tmp_path):
    """The size bound: 8 bytes a number (float64 at most), a header and a name per tensor;
    a file of that size is read (and refused for what it holds), one byte more is not."""
    from safetensors.torch import load_file

    from inca.task import files

    folder = make_task(bb).save(tmp_path / "task")
    tensors = load_file(folder / TASK_WEIGHTS)
    limit = (8 * sum(t.numel() for t in tensors.values()) + files._HEADER_SLACK
             + files._HEADER_PER_TENSOR * len(tensors))
    for size, message in ((limit, r"is not a readable safetensors file \(Error while "
                                  r"deserializing: invalid JSON in header"),
                          (limit + 1, f"the file is {limit + 1:,} bytes, more than the "
                                      f"{limit:,} its task can need, so it is not this task's")):
        (folder / TASK_WEIGHTS).write_bytes(b"\0" * size)
        rehash(folder)
        with pytest.raises(TaskError, match=message):
            load_task(folder, backbone=bb)


def test_a_read_that_races_a_save_is_tried_again_then_refused(bb, tmp_path, monkeypatch):
    """A folder swapped by a save while it was read is read again, up to three times."""
    from inca.task import files

    folder = make_task(bb).save(tmp_path / "task")
    real, calls = files._read_checked, []

    def racing(f: Path, races: int) -> Any:
        calls.append(f)
        if len(calls) <= races:
            raise files._ReadRace("swapped while it was read")
        return real(f)

    monkeypatch.setattr(files, "_read_checked", lambda f: racing(f, 2))
    assert files.read_task_files(folder).meta["classes"] == ["c0", "c1", "c2", "c3"]
    assert calls == [folder] * 3
    calls.clear()
    monkeypatch.setattr(files, "_read_checked", lambda f: racing(f, 3))
    with pytest.raises(TaskError, match="^swapped while it was read$"):
        files.read_task_files(folder)
    assert calls == [folder] * 3


def test_task_json_reformatted_by_an_editor_still_loads(bb, tmp_path):
    """Keys in another order and other indentation change nothing the weights mean."""
    task = make_task(bb, classes=["c0", "c1", "c2", "c3"])
    folder = task.save(tmp_path / "task")

    def reverse(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: reverse(value[k]) for k in reversed(list(value))}
        return [reverse(v) for v in value] if isinstance(value, list) else value

    text = (folder / TASK_JSON).read_text()
    assert text.startswith('{\n  "format_version": ') and text.endswith("\n}\n")  # saved to read
    meta = json.loads(text)
    (folder / TASK_JSON).write_text(json.dumps(reverse(meta), indent=7))
    assert same_task(load_task(folder, backbone=bb), task)


def test_swapped_weights_from_another_task_are_refused(bb, tmp_path):
    a = make_task(bb, seed=0).save(tmp_path / "a")
    twin = make_task(bb, seed=1).save(tmp_path / "twin")  # same shapes, other values
    other = make_task(bb, kind="linear", layer="stem").save(tmp_path / "other")
    shutil.copy(twin / TASK_WEIGHTS, a / TASK_WEIGHTS)
    with pytest.raises(TaskError, match="sha256 differs.*different saves"):
        load_task(a, backbone=bb)
    shutil.copy(other / TASK_WEIGHTS, a / TASK_WEIGHTS)
    rehash(a)  # even with a matching hash, the names and shapes give it away
    with pytest.raises(TaskError, match="lacks the weight"):
        load_task(a, backbone=bb)


def test_mixed_folder_of_an_interrupted_file_by_file_save_is_refused(bb, tmp_path):
    """What the earlier save left when killed between its two files: new weights, old
    task.json. The recorded hash tells them apart."""
    old = make_task(bb, seed=0).save(tmp_path / "task")
    new = make_task(bb, seed=1).save(tmp_path / "new")
    shutil.copy(new / TASK_WEIGHTS, old / TASK_WEIGHTS)
    with pytest.raises(TaskError) as refused:
        load_task(old, backbone=bb)
    assert str(refused.value) == (
        f"{old / TASK_WEIGHTS}: its sha256 differs from the one task.json records, so the two "
        "files come from different saves (an interrupted save or copy, or an edit); save the "
        "task again (Task.save, or `inca fit --out ...`)")


def test_good_task_round_trips_bit_exactly(bb, tmp_path, monkeypatch):
    task = make_task(bb, num_queries=2, query_reduce="concat")
    folder = task.save(tmp_path / "task")
    assert sorted(p.name for p in folder.iterdir()) == [TASK_CARD, TASK_WEIGHTS, TASK_JSON]
    meta = json.loads((folder / TASK_JSON).read_text())
    assert meta["format_version"] == 3 and len(meta["weights_sha256"]) == 64
    created = []

    def create(name: str, **kwargs: Any):
        created.append((name, kwargs["input_size"]))
        return planted_backbone()

    monkeypatch.setattr(inca.backbones, "create_backbone", create)
    loaded = load_task(folder, device="cpu")
    assert created == [("planted", bb.preprocessing.input_size)]
    assert same_task(task, loaded) and loaded.keys == task.keys
    x = torch.rand(3, 3, 16, 16)
    task.attach(bb)
    assert torch.equal(task.predict_proba(x), loaded.predict_proba(x))
    assert torch.isfinite(loaded.predict_proba(x)).all()


def test_created_backbone_is_checked_before_use(bb, tmp_path, monkeypatch):
    folder = make_task(bb).save(tmp_path / "task")
    other = planted_backbone(seed=1)
    monkeypatch.setattr(inca.backbones, "create_backbone", lambda name, **kw: other)
    moved = []
    monkeypatch.setattr(other, "to", lambda *a, **k: moved.append(1))
    with pytest.raises(TaskError, match="does not fit"):
        load_task(folder)
    with pytest.raises(TaskError, match="does not fit"):  # a given one: before it is moved
        load_task(folder, backbone=other, dtype=torch.float64)
    assert not moved


def test_version_1_task_without_hash_still_loads(bb, tmp_path):
    task = make_task(bb)
    folder = task.save(tmp_path / "task")
    edit_json(folder, lambda m: (m.update(format_version=1), m.pop("weights_sha256")))
    assert same_task(task, load_task(folder, backbone=bb))


def test_save_refuses_what_would_not_load(bb, tmp_path):
    task = make_task(bb)
    with torch.no_grad():
        task.members[0].head.weight[0, 0] = float("inf")
    with pytest.raises(TaskError, match="NaN or infinite"):
        task.save(tmp_path / "task")
    assert not (tmp_path / "task").exists()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(TaskError, match="holds other files.*'notes.txt'"):
        make_task(bb).save(tmp_path / "run")
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"
    with pytest.raises(TaskError, match="3 class names"):
        Task(task.members, [["block1"]], ["a", "b", "c"], bb.describe())


class Killed(BaseException):
    """A simulated SIGKILL: the step it hits, and every file operation after it, fail."""


def _save_killed_at(step: int, task: Task, folder: Path, monkeypatch, *, dead: bool) -> bool:
    """Save with the ``step``-th file operation killed; with ``dead`` every later one fails
    too (nothing is cleaned up, as after a real kill). True when the save completed."""
    count = {"n": 0, "dead": False}

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        def op(*args: Any, **kwargs: Any) -> Any:
            if count["dead"] or count["n"] == step:
                count["n"] += 1
                count["dead"] = dead
                raise Killed
            count["n"] += 1
            return fn(*args, **kwargs)
        return op

    with monkeypatch.context() as m:
        for module, name in ((os, "fsync"), (os, "rename"), (os, "replace"),
                             (shutil, "rmtree")):
            m.setattr(module, name, wrap(getattr(module, name)))
        try:
            task.save(folder)
            return True
        except Killed:
            return False


@pytest.mark.parametrize("dead", [True, False], ids=["killed", "failed"])
def test_save_interrupted_at_every_step_leaves_old_or_new_task(bb, tmp_path, monkeypatch,
                                                               dead):
    old, new, newest = (make_task(bb, seed=s) for s in (0, 1, 2))
    outcomes = []
    for step in range(20):
        root = tmp_path / f"{step}"
        folder = old.save(root / "task")
        done = _save_killed_at(step, new, folder, monkeypatch, dead=dead)
        loaded = load_task(folder, backbone=bb)  # the aside copy if the kill left no folder
        assert same_task(loaded, old) or same_task(loaded, new), step
        outcomes.append("new" if same_task(loaded, new) else "old")
        newest.save(folder)  # the next save recovers and cleans up
        assert same_task(load_task(folder, backbone=bb), newest)
        assert [p.name for p in root.iterdir() if not p.name.endswith(".lock")] == ["task"]
        if done:
            break
    # the kill fell at every step: before the swap (old) and after it (new)
    assert done and outcomes[0] == "old" and outcomes[-1] == "new" and len(outcomes) >= 6
    assert outcomes == sorted(outcomes, key=["old", "new"].index)


def test_kill_between_the_renames_is_read_from_the_aside_copy(bb, tmp_path, monkeypatch):
    old, new = make_task(bb, seed=0), make_task(bb, seed=1)
    folder = old.save(tmp_path / "task")
    # fsync weights, task.json and README.md, fsync the new folder, rename the old aside:
    # kill next
    assert not _save_killed_at(5, new, folder, monkeypatch, dead=True)
    assert not folder.exists()
    files = read_task_files(folder)
    assert files.folder == tmp_path / ".task.old"
    restored = Task.from_files(files)
    assert same_task(restored, old) and restored.precision == "auto"  # the default
    new.save(folder)
    assert same_task(load_task(folder, backbone=bb), new)
    assert not (tmp_path / ".task.old").exists()


@pytest.mark.parametrize("kind, cfg, fragment", [
    ("inca", {"num_queries": 10**8}, "num_queries must be an integer in"),
    ("inca", {"num_queries": 2.0}, "num_queries must be an integer"),
    ("inca", {"num_heads": True}, "num_heads"),
    ("inca", {"attn_dim": 65_537}, "attn_dim"),
    ("inca", {"dropout": float("nan")}, "dropout"),
    ("inca", {"init_std": float("inf")}, "init_std"),
    ("inca", {"query_reduce": ["mean"]}, "query_reduce"),
    ("open_inca", {"class_groups": [1.5, 2.5]}, "class_groups"),
    ("open_inca", {"num_heads": 2048}, "num_heads"),
    ("linear", {"num_prefix_tokens": "1"}, "num_prefix_tokens"),
    ("linear", {"norm": "yes"}, "norm"),
    ("multilayer_linear", {"layers": ["a", 3]}, "layer names"),
    ("multilayer_linear", {"layers": ["a"], "layer_dims": [10**6]}, "layer_dims"),
])
def test_adapter_configs_are_bounded(kind, cfg, fragment):
    with pytest.raises(AdapterError, match=fragment):
        create_adapter(kind, embed_dim=16, num_classes=4, **cfg)


@pytest.mark.parametrize("edit, message", [
    ({"num_hidden_layers": 100_000}, r"backbone\.source\.kwargs\.num_hidden_layers is not an "
                                     r"argument a task file may pass to create backbone"),
    ({"attn_implementation": "eager"}, r"kwargs\.attn_implementation is not an argument"),
    ({"input_size": 10**9}, r"kwargs\.input_size must be an integer in \[1, 16384\], "
                            r"got '1000000000'"),
    ({"pretrained": "yes"}, r"kwargs\.pretrained must be true or false"),
])
def test_task_json_cannot_pass_any_argument_to_the_model_loader(tmp_path, monkeypatch, edit,
                                                                 message):
    """An edited task.json with ``num_hidden_layers: 100000`` made load_task build a
    100,000-block model (over 60 s) before any check: the recorded arguments are now an
    allow-list, checked before anything is created; the caller's own are trusted."""
    import time

    from tiny import save_tiny_hf_vit

    bb = inca.backbones.create_backbone(f"hf:{save_tiny_hf_vit(tmp_path / 'vit')}")
    folder = make_task(bb, "linear", bb.layers[-1]).save(tmp_path / "task")
    meta = json.loads((folder / TASK_JSON).read_text())
    assert set(meta["backbone"]["source"]["kwargs"]) == {"pretrained"}
    meta["backbone"]["source"]["kwargs"].update(edit)
    (folder / TASK_JSON).write_text(json.dumps(meta))
    created = []
    real = inca.backbones.create_backbone
    monkeypatch.setattr(inca.backbones, "create_backbone",
                        lambda spec, **kw: created.append(kw) or real(spec, **kw))
    start = time.perf_counter()
    with pytest.raises(TaskError, match=message) as refused:
        load_task(folder)
    assert time.perf_counter() - start < 5 and created == []  # refused before creating
    assert "pass it yourself (load_task(path, " in str(refused.value)
    assert "--backbone" in str(refused.value)
    if "pretrained" not in edit and "input_size" not in edit:
        # the arguments a caller passes are the caller's: trusted, and used
        with pytest.raises(TaskError, match="cannot create its backbone"):
            load_task(folder, **{k: "x" for k in edit})
        assert created and all(kw[k] == "x" for kw in created for k in edit)


def test_a_backbone_made_with_arguments_a_task_file_cannot_hold_must_be_given(tmp_path):
    """A backbone created with an argument that is not JSON (listed in ``unrecorded``)
    cannot be created again from task.json: load_task says which and asks for it, unless
    the caller passes arguments of their own; a recorded number out of bounds is named."""
    import re

    from tiny import save_tiny_hf_vit

    from inca.task.backbone import _check_kwargs

    bb = inca.backbones.create_backbone(f"hf:{save_tiny_hf_vit(tmp_path / 'vit')}")
    folder = make_task(bb, "linear", bb.layers[-1]).save(tmp_path / "task")
    meta = json.loads((folder / TASK_JSON).read_text())
    meta["backbone"]["source"]["unrecorded"] = ["config", "quantization"]
    (folder / TASK_JSON).write_text(json.dumps(meta))
    with pytest.raises(TaskError, match="^" + re.escape(
            f"the task in {folder}: its backbone {bb.name!r} was created with arguments a "
            "task file cannot hold (config, quantization); pass the backbone (backbone=..., "
            "or --backbone)") + "$"):
        load_task(folder)
    assert load_task(folder, pretrained=False).backbone.fingerprint() == bb.fingerprint()
    with pytest.raises(TaskError, match=r"^this task: task.json's backbone\.source\.kwargs\."
                                        r"mlp_ratio must be a number in \[0, 16\], got "
                                        r"'99\.5'; remove it"):
        _check_kwargs("timm:vit_tiny", {"mlp_ratio": 99.5}, {}, "this task")


def test_a_license_is_a_short_lowercase_identifier():
    from inca.task.schema import license_ok

    for good in ("a", "apache-2.0", "cc-by-nc-4.0", "gpl-3.0+", "x" * 64):
        assert license_ok(good), good
    for bad in ("", "x" * 65, "MIT", "X11", "apache 2.0", "licenсe", None, 3):  # Cyrillic с
        assert not license_ok(bad), bad


def test_values_and_names_in_messages_are_cut_short():
    from inca.task.schema import _shown, few

    assert _shown("a" * 38) == '"' + "a" * 38 + '"'  # 40 characters: shown whole
    assert _shown("a" * 39) == '"' + "a" * 36 + "..."  # 41: cut to 40
    assert (_shown([1, 2]), _shown({"a": 1}), _shown(None)) == (
        "a list of 2 item(s)", "an object of 1 key(s)", "null")
    assert _shown(object()) == "object"
    assert few(["a", "b", "c"]) == "'a', 'b', 'c'"
    assert few(["a", "b", "c", "d"]) == "'a', 'b', 'c' and 1 more"
    assert few(list("abcdef")) == "'a', 'b', 'c' and 3 more"


def test_save_creates_the_missing_parent_folders(bb, tmp_path):
    """Kills files write_task_folder mutant 60 (planted and seen to fail)."""
    task = make_task(bb)
    folder = task.save(tmp_path / "runs" / "pets" / "task")
    assert same_task(load_task(folder, backbone=bb), task)


def test_a_list_of_names_may_be_exactly_as_long_as_its_bound(tmp_path):
    """Kills schema Checker.names mutant 6 (planted and seen to fail)."""
    from inca.task.schema import Checker

    check = Checker(tmp_path / TASK_JSON)
    assert check.names(["a", "b"], "layers", 2) == ["a", "b"]
    with pytest.raises(TaskError, match=r"layers must be a list of 1 to 2 names, got a list "
                                        r"of 3 item\(s\)"):
        check.names(["a", "b", "c"], "layers", 2)


PREP = {"input_size": 16, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
CANNOT = ("this task: cannot create its backbone 'nope'{how}: gone. Pass the backbone it was "
          "trained on (backbone=..., or --backbone)")


def test_a_backbone_that_cannot_be_created_says_whether_only_local_files_were_read(
        monkeypatch):
    """A spec given, or a task.json without a source: created as usual, and the message
    says nothing of local files; a source recorded offline: it says so. Kills backbone
    task_backbone mutants 21 and 60 and _recorded mutant 8 (each planted and seen to
    fail)."""
    pytest.importorskip("huggingface_hub")  # without it nothing is offline
    from inca.errors import BackboneError
    from inca.task.backbone import task_backbone

    def gone(spec: str, **kwargs: Any) -> None:
        raise BackboneError("gone")

    monkeypatch.setattr(inca.backbones, "create_backbone", gone)
    info = {"name": "nope", "fingerprint": "0" * 16, "preprocessing": PREP}
    recorded = dict(info, source={"spec": "nope", "kwargs": {}, "offline": True})
    for backbone, record, how in (("nope", info, ""), (None, info, ""),
                                  (None, recorded, " (from local files only, as recorded)")):
        with pytest.raises(TaskError) as refused:
            task_backbone(record, backbone)
        assert str(refused.value) == CANNOT.format(how=how)


def test_a_spec_is_created_at_the_tasks_size_on_the_device_and_dtype_asked_then_checked(
        monkeypatch):
    """A backbone given as a spec is created at the task's input size, on the device and
    in the dtype asked for, and checked at once, the message naming the task."""
    from inca.task.backbone import task_backbone

    made = []

    def spy(spec: str, **kwargs: Any) -> Any:
        made.append((spec, kwargs))
        return planted_backbone()

    monkeypatch.setattr(inca.backbones, "create_backbone", spy)
    info = {"name": "nope", "fingerprint": "0" * 16, "preprocessing": PREP}
    with pytest.raises(TaskError, match=r"^task 't' was trained on backbone 'nope' and does "
                                        r"not fit 'planted': weights fingerprint "):
        task_backbone(info, "timm:other", device="meta", dtype=torch.float64, what="task 't'")
    assert made == [("timm:other", {"device": torch.device("meta"), "dtype": torch.float64,
                                    "input_size": 16})]


def test_a_recorded_local_folder_missing_here_is_named_whole(tmp_path, no_backbone_created):
    """The path after ``hf:`` is taken whole, colons and all, and named in the message
    before anything is created. Kills backbone _recorded mutants 53 and 72 and
    task_backbone mutant 34 (each planted and seen to fail)."""
    from inca.task.backbone import task_backbone

    missing = tmp_path / "models:v2" / "vit"
    info = {"name": "vit", "fingerprint": "0" * 16, "preprocessing": PREP,
            "source": {"spec": f"hf:{missing}", "kwargs": {}}}
    with pytest.raises(TaskError) as refused:
        task_backbone(info)
    assert str(refused.value) == (
        f"this task: its backbone was created from {missing}, which does not exist on this "
        "machine; pass the same weights from where they are here (backbone='hf:<folder>' or "
        "a Backbone; --backbone, --checkpoint)")
