"""Class-incremental tasks: ``inca.add_classes`` and ``inca add-classes`` extend an
Open-InCA task from images, the old classes' logits bit for bit unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from planted import planted_backbone, planted_data

import inca
from inca.data import ArrayDataset
from inca.errors import TrainingError
from inca.features import extract_features


def _only(data: ArrayDataset, keep: list[str], name: str) -> ArrayDataset:
    """The samples of ``data`` whose class is in ``keep``, with only those classes."""
    rows = [i for i, t in enumerate(data.targets) if data.classes[t] in keep]
    labels = np.array([keep.index(data.classes[data.targets[i]]) for i in rows])
    images = np.stack([np.asarray(data[i][0].convert("L")) for i in rows])
    return ArrayDataset(images, labels, keep, name)


@pytest.fixture(scope="module")
def phase1():
    bb = planted_backbone()
    old = _only(planted_data(320, 0), ["c0", "c1"], "old")
    task = inca.fit(bb, old, layers=["block1"], kinds=("open_inca",), lrs=(1e-2,),
                    epochs=8, batch_size=32, progress=False, mode="streaming")
    return bb, task


def test_add_classes_from_images_keeps_old_logits_bit_for_bit(phase1, tmp_path):
    bb, task = phase1
    ext = inca.add_classes(task, planted_data(320, 2), epochs=8, batch_size=32,
                           lrs=(3e-3, 1e-2, 3e-2),
                           progress=False)
    assert task.classes == ["c0", "c1"] and ext.classes == ["c0", "c1", "c2", "c3"]
    test = planted_data(200, 1)
    pixels = torch.stack([torch.from_numpy(np.array(test[i][0])).permute(2, 0, 1)
                          for i in range(len(test))])
    with torch.no_grad():
        tokens = extract_features(bb, pixels, ["block1"])["block1"]
        before, after = task.members[0](tokens), ext.members[0](tokens)
    assert torch.equal(after[:, :2], before)  # the old classes' logits, bit for bit
    pred = ext.predict_proba(list(test[i][0] for i in range(len(test)))).argmax(-1).numpy()
    truth = np.array([ext.classes.index(test.classes[t]) for t in test.targets])
    new = truth >= 2
    assert (pred[new] == truth[new]).mean() > 0.6  # the new classes are learned (chance 1/4)
    added = ext.metrics["classes_added"][-1]
    assert added["classes"] == ["c2", "c3"] and len(added["members"]) == 1
    loaded = inca.load_task(ext.save(tmp_path / "ext"), bb)
    assert loaded.classes == ext.classes and loaded.metrics["classes_added"][-1] == added
    assert "classes added after the fit: c2, c3" in (tmp_path / "ext" / "README.md").read_text()
    torch.testing.assert_close(loaded.predict_proba(pixels[:8]), ext.predict_proba(pixels[:8]))


def test_add_classes_says_what_it_needs(phase1):
    bb, task = phase1
    same = _only(planted_data(64, 3), ["c0", "c1"], "same")
    with pytest.raises(TrainingError, match=r"^same holds no class the task lacks \(it has 2: "
                                            r"c0, c1\)$"):
        inca.add_classes(task, same, progress=False)
    del same.name  # a data set of the user's own that names itself nothing
    with pytest.raises(TrainingError, match=r"^the data holds no class the task lacks"):
        inca.add_classes(task, same, progress=False)
    closed = inca.fit(bb, _only(planted_data(96, 0), ["c0", "c1"], "old"),
                      layers=["block1"], kinds=("linear",), lrs=(1e-2,), epochs=1,
                      progress=False, mode="streaming")
    with pytest.raises(TrainingError, match=r"^only tasks of Open-InCA members can add "
                                            r"classes; this one has linear members\. Fit one "
                                            r"with --kinds open_inca \(kinds=\('open_inca',\)\)$"):
        inca.add_classes(closed, planted_data(64, 2), progress=False)


def test_cli_add_classes_extends_a_saved_task(tmp_path):
    from PIL import Image
    from tiny import save_tiny_hf_vit
    from typer.testing import CliRunner

    from inca.cli import app

    def folder(root, names):
        data = planted_data(24 * len(names), 5)
        for i, t in enumerate(data.targets):
            name = data.classes[t]
            if name in names:
                (root / name).mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.array(data[i][0])).save(root / name / f"{i}.png")
        return root

    vit = save_tiny_hf_vit(tmp_path / "vit")
    run = CliRunner().invoke
    res = run(app, ["fit", "--backbone", f"hf:{vit}", "--data",
                    str(folder(tmp_path / "old", ["c0", "c1"])), "--kinds", "open_inca",
                    "--layers", "last", "--epochs", "2", "--out", str(tmp_path / "run"),
                    "--num-workers", "0"])
    assert res.exit_code == 0, res.output
    new = folder(tmp_path / "new", ["c0", "c1", "c2"])
    res = run(app, ["add-classes", "--task", str(tmp_path / "run" / "task"), "--data",
                    str(new), "--out", str(tmp_path / "bigger"), "--epochs", "2",
                    "--num-workers", "0"])
    assert res.exit_code == 0, res.output
    assert "added 1 classes (c2) to 2" in res.output
    old, ext = inca.load_task(tmp_path / "run" / "task"), inca.load_task(tmp_path / "bigger")
    assert ext.classes == ["c0", "c1", "c2"]
    tokens = torch.randn(5, *next(iter(
        extract_features(old.backbone, torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
        .values())).shape[1:])
    with torch.no_grad():
        assert torch.equal(ext.members[0](tokens)[:, :2], old.members[0](tokens))
    res = run(app, ["add-classes", "--task", str(tmp_path / "run" / "task"), "--data",
                    str(new), "--out", str(tmp_path / "bigger"), "--epochs", "1",
                    "--num-workers", "0"])
    assert res.exit_code == 2 and "already holds a task" in res.output
    assert "adapters:" not in res.output  # refused before any training


def test_classes_added_twice_keep_the_tasks_settings_and_their_record(phase1, monkeypatch):
    """A given validation set is the one used; the task's keys, token grid, license and
    report carry over; the precision is the call's; each addition is recorded, in order."""
    bb, task = phase1
    monkeypatch.setattr(task, "license", "apache-2.0")
    c2 = _only(planted_data(160, 2), ["c0", "c1", "c2"], "with c2")
    c2_val = _only(planted_data(90, 4), ["c0", "c1", "c2"], "c2 val")
    once = inca.add_classes(task, c2, val=c2_val, epochs=1, batch_size=32, lrs=(1e-2,),
                            precision="32", progress=False)
    assert once.classes == ["c0", "c1", "c2"] and once.precision == "32"
    assert (once.keys, once.token_grid, once.license, once.report) == (
        task.keys, task.token_grid, "apache-2.0", task.report)
    first = once.metrics["classes_added"][0]
    assert first["val_samples"] == len(c2_val) and first["train_samples"] == len(c2)
    twice = inca.add_classes(once, _only(planted_data(160, 3), ["c2", "c3"], "with c3"),
                             epochs=1, batch_size=32, lrs=(1e-2,), progress=False)
    assert twice.classes == ["c0", "c1", "c2", "c3"]
    assert [a["classes"] for a in twice.metrics["classes_added"]] == [["c2"], ["c3"]]
    assert twice.metrics["val_accuracy"] == task.metrics["val_accuracy"]  # the fit's own


@pytest.mark.parametrize("count, shown", [(5, "c0, c1, c2, c3, c4)"),
                                          (6, "c0, c1, c2, c3, c4 ...)")])
def test_nothing_to_add_names_the_tasks_classes_briefly(phase1, count, shown):
    from inca.adapters import create_adapter

    bb, _ = phase1
    classes = [f"c{i}" for i in range(count)]
    task = inca.Task([create_adapter("open_inca", embed_dim=bb.embed_dims["block1"],
                                     num_classes=count)], [["block1"]], classes,
                     bb.describe(), backbone=bb)
    with pytest.raises(TrainingError) as info:
        inca.add_classes(task, _only(planted_data(32, 3), ["c0", "c1"], "same"),
                         progress=False)
    assert str(info.value).endswith(f"(it has {count}: {shown}")


def test_new_classes_learn_from_the_tokens_the_task_predicts_from(monkeypatch):
    """A task fitted on tokens pooled to a grid: the new classes train on the same pooled
    tokens (not the backbone's full set), and the grid is kept."""
    from inca.training import incremental

    bb = planted_backbone()
    task = inca.fit(bb, _only(planted_data(96, 0), ["c0", "c1"], "old"), layers=["block1"],
                    kinds=("open_inca",), lrs=(1e-2,), epochs=1, batch_size=32,
                    token_grid=2, progress=False, mode="streaming")
    seen, extend = [], incremental.extend_adapters

    def spy(members, layers, new, train, val, *args, **kwargs):
        seen.append(next(train.batches(4))[0]["block1"].shape[1])
        return extend(members, layers, new, train, val, *args, **kwargs)

    monkeypatch.setattr(incremental, "extend_adapters", spy)
    ext = inca.add_classes(task, planted_data(96, 2), epochs=1, batch_size=32,
                           lrs=(1e-2,), progress=False)
    assert task.token_grid == ext.token_grid == 2 and seen == [4]  # 2 x 2, not 16
    with pytest.raises(TrainingError, match="pooled to token_grid=2.*drop token_grid"):
        inca.add_classes(task, planted_data(96, 2), token_grid=4, progress=False)


def test_added_classes_keep_each_copys_best_epoch_in_the_calls_precision_quietly(
        phase1, monkeypatch, capsys):
    """Each adapter's chosen copy carries the weights of its best validation epoch (here
    the first: later epochs are scripted not to improve), tokens are extracted in the
    precision asked for, and ``progress=False`` prints nothing."""
    import inca.training.fitting as fitting
    import inca.training.incremental as incremental
    import inca.training.loop as loop

    _, task = phase1
    keep_best, runs, extracted = loop._keep_best, [], []
    monkeypatch.setattr(loop, "_keep_best", lambda bank, results, *a: keep_best(
        bank, results, *a) if a[2] == 0 else False)  # a[2]: the epoch

    def train_bank(bank, *args, **kwargs):
        runs.append((bank, loop.train_bank(bank, *args, **kwargs)))
        return runs[-1][1]

    class Source(fitting.StreamingSource):
        def __init__(self, *args) -> None:
            extracted.append(args[-1].name)  # the precision
            super().__init__(*args)

    monkeypatch.setattr(incremental, "train_bank", train_bank)
    monkeypatch.setattr(fitting, "StreamingSource", Source)
    ext = inca.add_classes(task, planted_data(96, 2), epochs=3, batch_size=32, lrs=(1e-2,),
                           precision="16-mixed", progress=False, patience=0)
    [(bank, result)] = runs
    assert extracted == ["16-mixed", "16-mixed"] and result.epochs_run == 3
    assert [m.best_epoch for m in result.members] == [0]
    state = ext.members[0].state_dict()
    assert all(torch.equal(state[k], v) for k, v in result.members[0].state.items())
    now = bank.member_state(0)  # trained on after its best epoch
    assert any(not torch.equal(now[k], v) for k, v in result.members[0].state.items())
    assert capsys.readouterr().err == ""


def test_added_classes_show_their_training_when_asked(phase1, capsys):
    _, task = phase1
    inca.add_classes(task, planted_data(64, 2), epochs=1, batch_size=32, lrs=(1e-2,))
    err = capsys.readouterr().err  # not a terminal: plain lines
    assert err.startswith("train 1 adapters: 2/2 step") and "epoch=1, best_val_loss=" in err
