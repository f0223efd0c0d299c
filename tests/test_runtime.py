"""Many tasks on one backbone pass."""

from __future__ import annotations

import json

import pytest
import torch
from planted import planted_backbone, planted_data

import inca
import inca.backbones
from inca.adapters import _folded, create_adapter, stacked
from inca.runtime import MultiTaskModel
from inca.task import Task, TaskError


def test_one_pass_serves_every_task(two_tasks, tmp_path):
    bb, a, b = two_tasks
    images = [planted_data(8, 2)[i][0] for i in range(8)]
    model = MultiTaskModel(bb, {"a": a, "b": b})
    assert model.layers() == ["stem", "block1"]
    model.predict_proba(images[:1])  # plans the heads once (one probe pass)
    passes, deep = [], []
    h1 = bb.model.register_forward_pre_hook(lambda m, i: passes.append(1))
    h2 = bb.model.get_submodule("block3").register_forward_hook(lambda *x: deep.append(1))
    try:
        out = model.predict_proba(images, batch_size=8)
    finally:
        h1.remove()
        h2.remove()
    assert len(passes) == 1 and not deep  # one pass, stopped after block1
    torch.testing.assert_close(out["a"], a.predict_proba(images))
    torch.testing.assert_close(out["b"], b.predict_proba(images))
    top = model.predict(images, top_k=2)
    assert len(top["a"]) == 8 and len(top["a"][0]) == 2
    assert top["a"][0][0][0] in a.classes


def test_add_remove_and_refuse(two_tasks, tmp_path):
    bb, a, b = two_tasks
    b.save(tmp_path / "b" / "task")
    model = MultiTaskModel.from_paths([tmp_path / "b" / "task"], backbone=bb,
                                      precision="bf16-mixed")
    assert list(model.tasks) == ["b"]
    # the model's precision is every task's, whether loaded with it or added from a folder
    assert model.precision == model.tasks["b"].precision == "bf16-mixed"
    assert model.add_task("b2", tmp_path / "b" / "task").precision == "bf16-mixed"
    model.remove_task("b2")
    model.add_task("a", a)
    assert set(model.tasks) == {"a", "b"}
    model.remove_task("b")
    assert model.layers() == ["stem"]
    with pytest.raises(TaskError, match="^no task named 'b'; tasks: a$"):
        model.remove_task("b")
    model.remove_task("a")
    with pytest.raises(TaskError, match="^no task named 'a'; tasks: none$"):
        model.remove_task("a")
    model.add_task("a", a)
    with pytest.raises(TaskError, match="unknown task"):
        model.predict_proba(torch.zeros(1, 3, 16, 16), tasks=["zzz"])
    other = MultiTaskModel(planted_backbone(seed=1))
    with pytest.raises(TaskError, match="does not fit"):
        other.add_task("a", a)
    # a task's submodule (its state_dict keys) is its name made an identifier, kept distinct
    named = MultiTaskModel(bb, {"pets.v2": a, "pets_v2": b, "": a})
    assert list(named.heads) == ["pets_v2", "pets_v2_1", "task"]


def test_inca_heads_of_several_tasks_share_one_attention_pass(monkeypatch):
    bb = planted_backbone()
    common = dict(kinds=("inca",), lrs=(1e-2,), epochs=1, progress=False, ensemble_k=1)
    tasks = {
        "c": inca.fit(bb, planted_data(64, 0), layers=["stem"], **common),
        "d": inca.fit(bb, planted_data(64, 1), layers=["block1"], **common),
        "e": inca.fit(bb, planted_data(64, 2), layers=["stem"], **common),
    }
    model = MultiTaskModel(bb, tasks)
    images = [planted_data(6, 3)[i][0] for i in range(6)]
    passes = []  # adapters in each folded attention call, wherever it is called from
    real = _folded.cross_attention

    def counted(tokens, parts, *args, **kwargs):
        passes.append(sum(p.query.shape[0] for p in parts))
        return real(tokens, parts, *args, **kwargs)

    monkeypatch.setattr(_folded, "cross_attention", counted)  # a member run alone
    monkeypatch.setattr(stacked, "cross_attention", counted)  # StackedInCA.run
    out = model.predict_proba(images)
    assert passes == [3]  # the three tasks' members in one attention pass, none alone
    monkeypatch.undo()
    shared, alone = model._plan(("c", "d", "e"))
    assert len(shared) == 1 and len(shared[0].members) == 3 and not alone
    assert shared[0].layers == ["stem", "block1"] and shared[0].layer_index == [[0], [1], [0]]
    for name, task in tasks.items():
        torch.testing.assert_close(out[name], task.predict_proba(images), atol=1e-5,
                                   rtol=1e-4)
    model.remove_task("d")
    torch.testing.assert_close(model.predict_proba(images)["e"], out["e"])


def test_from_paths_names_the_broken_task_before_creating_a_backbone(two_tasks, tmp_path,
                                                                    monkeypatch):
    bb, a, b = two_tasks
    paths = [a.save(tmp_path / "a" / "task"), b.save(tmp_path / "b" / "task"),
             a.save(tmp_path / "c" / "task")]
    meta = json.loads((paths[1] / "task.json").read_text())
    meta["classes"] = meta["classes"][:2]
    (paths[1] / "task.json").write_text(json.dumps(meta))
    created = []
    monkeypatch.setattr(inca.backbones, "create_backbone",
                        lambda *args, **kwargs: created.append(args) or bb)
    with pytest.raises(TaskError, match=r"task 'b': .*b/task/task.json: .*2 class names"):
        MultiTaskModel.from_paths(paths)
    assert not created  # every folder is checked before the backbone is created
    model = MultiTaskModel.from_paths([paths[0], paths[2]])
    assert created and list(model.tasks) == ["a", "c"]
    with pytest.raises(TaskError, match=r"task 'bad': .*b/task/task.json"):
        model.add_task("bad", paths[1])
    assert list(model.tasks) == ["a", "c"]


def test_from_paths_refuses_tasks_of_different_backbones_before_creating_one(
        two_tasks, tmp_path, monkeypatch):
    bb, a, _ = two_tasks
    other_bb = planted_backbone(seed=1)
    other = Task([create_adapter("linear", embed_dim=16, num_classes=4, pool="mean",
                                 num_prefix_tokens=0)], [["stem"]], a.classes,
                 other_bb.describe())
    paths = [a.save(tmp_path / "a" / "task"), other.save(tmp_path / "o" / "task")]
    monkeypatch.setattr(inca.backbones, "create_backbone",
                        lambda *args, **kwargs: pytest.fail("a backbone was created"))
    with pytest.raises(TaskError, match=r"task 'o' \(.*o/task\) was trained on backbone "
                                        r"'planted' \(weights .*\) but task 'a'"):
        MultiTaskModel.from_paths(paths)
    with pytest.raises(TaskError, match=r"task 'o' \(.*o/task\) .*does not fit"):
        MultiTaskModel.from_paths(paths[1:], backbone=bb, names=["o"])


def test_the_compatibility_names_are_listed_by_dir():
    import inca.runtime

    assert dir(inca.runtime) == ["MultiTaskModel", "Task", "TaskError", "TaskModule",
                                 "load_task"]


def test_a_head_alone_in_its_kind_leaves_the_shared_groups_after_it_intact():
    """A member with no partner (its own config) runs alone, and the groups planned after it
    still share one attention pass, on their tasks' pooled token grid."""
    from tiny import make_task

    bb = planted_backbone()

    def pooled(layer: str, seed: int, **cfg) -> Task:  # on a 2 x 2 grid of tokens
        t = make_task(bb, "inca", layer, seed=seed, classes=["x", "y"], **cfg)
        return Task(t.members, t.member_layers, t.classes, bb.describe(), token_grid=2,
                    keys=t.keys, backbone=bb, precision="32")

    # planned in this order: solo (a group of one), then c and d (one group)
    tasks = {"solo": pooled("stem", 0, norm_eps=1e-3), "c": pooled("stem", 1),
             "d": pooled("block1", 2)}
    model = MultiTaskModel(bb, tasks)
    images = [planted_data(5, 3)[i][0] for i in range(5)]
    out = model.predict_proba(images)
    shared, alone = model._plan(("solo", "c", "d"))
    assert [name for name, _, _ in alone] == ["solo"]
    assert len(shared) == 1 and [n for n, _ in shared[0].members] == ["c", "d"]
    assert shared[0].grid == 2
    for name, task in tasks.items():
        torch.testing.assert_close(out[name], task.predict_proba(images), atol=1e-5,
                                   rtol=1e-4)


def test_planning_probes_the_backbone_only_as_deep_as_the_tasks_read(two_tasks):
    """The first prediction plans the heads with a probe pass, which stops after the
    deepest layer asked for, as every prediction pass does."""
    bb, a, b = two_tasks
    model = MultiTaskModel(bb, {"a": a, "b": b})
    deep = []
    hook = bb.model.get_submodule("wash").register_forward_hook(lambda *x: deep.append(1))
    try:
        model.predict_proba(torch.zeros(1, 3, 16, 16))
    finally:
        hook.remove()
    assert not deep and ("a", "b") in model._plans


def test_predict_runs_batch_size_images_per_pass(two_tasks):
    bb, a, _ = two_tasks
    model = MultiTaskModel(bb, {"a": a})
    images = [planted_data(5, 2)[i][0] for i in range(5)]
    model.predict(images[:1])  # plans the heads (one probe pass)
    sizes = []
    hook = bb.model.register_forward_pre_hook(lambda m, i: sizes.append(len(i[0])))
    try:
        top = model.predict(images, top_k=2, batch_size=2)
    finally:
        hook.remove()
    assert sizes == [2, 2, 1]
    whole = model.ranked(model.predict_proba(images), 2)["a"]  # one pass: the same answers
    assert [[c for c, _ in im] for im in top["a"]] == [[c for c, _ in im] for im in whole]
    assert [p for im in top["a"] for _, p in im] == pytest.approx(
        [p for im in whole for _, p in im], abs=1e-6)
