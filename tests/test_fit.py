"""inca.fit end to end on tiny backbones: layer choice, cached == streaming, task files, CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from planted import SIZE, planted_backbone, planted_data

import inca
from inca.errors import InCAError
from inca.task import TaskError, load_task


@pytest.fixture(scope="module")
def planted_fit(tmp_path_factory):
    bb = planted_backbone()
    train, test = planted_data(480, 0), planted_data(200, 1)
    task = inca.fit(bb, train, test=test, layers="all", kinds=("inca", "linear"),
                    lrs=(3e-3, 1e-2), epochs=10, batch_size=32, progress=False,
                    cache_dir=tmp_path_factory.mktemp("cache"))
    return bb, task, test


def test_bank_picks_the_planted_layer_and_beats_last_layer_probe(planted_fit):
    _, task, _ = planted_fit
    report = task.report
    assert {r["layers"][0] for r in report.rows} == {"stem", "block1", "wash", "block3"}
    chosen_layers = {ly for ls in task.member_layers for ly in ls}
    assert chosen_layers <= {"stem", "block1"}
    assert report.linear_probe["key"].startswith("linear/block3/")
    last = [r for r in report.rows if r["kind"] == "linear" and r["layers"] == ["block3"]]
    best = min(last, key=lambda r: (-r["val_accuracy"], r["val_loss"]))  # by validation
    assert report.linear_probe["key"] == best["key"]
    assert report.val_accuracy > 0.85
    assert report.val_accuracy > report.linear_probe["val_accuracy"] + 0.3
    assert report.test_accuracy[report.chosen] > report.test_accuracy["linear_probe"] + 0.3


def test_task_round_trip_and_backbone_mismatch(planted_fit, tmp_path):
    bb, task, test = planted_fit
    images = [test[i][0] for i in range(16)]
    before = task.predict_proba(images)
    task.save(tmp_path / "task")
    meta = json.loads((tmp_path / "task" / "task.json").read_text())
    assert meta["backbone"]["fingerprint"] == bb.fingerprint()
    assert not list(tmp_path.glob("task/*.pt")) and not list(tmp_path.glob("task/*.pkl"))
    loaded = load_task(tmp_path / "task", backbone=bb)
    torch.testing.assert_close(loaded.predict_proba(images), before)
    assert loaded.predict(images) == task.predict(images)
    # the same name, other weights: said once, with what differs
    with pytest.raises(TaskError, match=r"does not fit backbone 'planted' as it is now "
                                        r"\(trained on other weights of the same name\): "
                                        r"weights fingerprint"):
        load_task(tmp_path / "task", backbone=planted_backbone(seed=1))
    with pytest.raises(TaskError, match="not a task folder"):
        load_task(tmp_path / "nothing", backbone=bb)


def test_report_files(planted_fit, tmp_path):
    _, task, _ = planted_fit
    files = task.report.write(tmp_path)
    assert json.loads(files["json"].read_text())["chosen"] == task.report.chosen
    assert "last-layer linear probe" in files["markdown"].read_text()
    assert files["plot"].read_bytes()[:4] == b"\x89PNG"


def test_cached_mode_equals_streaming_mode(tmp_path):
    bb = planted_backbone()
    train = planted_data(160, 0)
    common = dict(layers=["stem", "wash"], kinds=("inca", "linear"), lrs=(3e-3,), epochs=3,
                  batch_size=32, patience=0, progress=False, token_grid=2)
    cached = inca.fit(bb, train, cache_dtype="float32", cache_dir=tmp_path, **common)
    streamed = inca.fit(bb, train, mode="streaming", augment=False, **common)
    # the cache holds what the config asks: float32 tokens, pooled to a 2 x 2 grid
    from inca.features import ActivationCache

    cache = ActivationCache(tmp_path / "train")
    assert cache.manifest["dtype"] == "float32" and cache.token_shape("stem") == (4, 16)
    # the mode was chosen on the size of exactly these layers' tokens
    assert cached.report.mode["cache_bytes"] == 160 * 2 * 4 * 16 * 4  # images, layers, tokens, D
    # the logistic-regression baseline needs cached features: skipped, and said why
    assert "streaming" in streamed.report.probe["skipped"]
    assert "probe not fitted: streaming" in streamed.report.to_markdown()
    assert cached.report.probe["best_layer"]["layer"] == "stem"
    a = {r["key"]: r["val_accuracy"] for r in cached.report.rows}
    b = {r["key"]: r["val_accuracy"] for r in streamed.report.rows}
    assert a == pytest.approx(b, abs=1e-6)
    for ma, mb in zip(cached.members, streamed.members, strict=True):
        for (k, va), vb in zip(ma.state_dict().items(), mb.state_dict().values(), strict=True):
            torch.testing.assert_close(va, vb, atol=1e-4, rtol=1e-3, msg=k)


def test_streaming_with_augmentation_runs(monkeypatch):
    """Each epoch trains on a new random view of every training image; validation sees the
    same images every time."""
    import inca.data

    build, views = inca.data.build_transform, {}  # {augment: {image bytes: [views]}}

    def spy(preprocessing, augment="none"):
        transform, seen = build(preprocessing, augment), views.setdefault(augment, {})

        def record(image):
            out = transform(image)
            seen.setdefault(image.tobytes(), []).append(out)
            return out
        return record

    monkeypatch.setattr(inca.data, "build_transform", spy)
    task = inca.fit(planted_backbone(), planted_data(96, 0), mode="streaming", layers="stem",
                    kinds=("linear",), lrs=(1e-2,), epochs=2, patience=0, augment="crop",
                    num_workers=0, progress=False)
    assert task.report.timings["epochs_run"] == 2
    train, val = views.pop("crop"), views.pop("none")
    assert not views and len(train) + len(val) == 96 and len(val) >= 10
    assert all(len(v) == 2 for v in train.values())  # once per epoch
    # validation: once per epoch; the chosen member's per-class figures (no test split
    # here) come from those passes, not from one more
    assert all(len(v) == 2 for v in val.values())
    changed = sum(not torch.equal(a, b) for a, b in train.values())
    assert changed >= 0.9 * len(train)  # a crop repeats only by chance
    assert all(torch.equal(v[0], w) for v in val.values() for w in v[1:])


def test_cli_fit_and_predict(tmp_path, monkeypatch):
    import sys

    from tiny import save_tiny_hf_vit
    from typer.testing import CliRunner

    from inca.cli import app
    from inca.data import load_dataset

    folder = save_tiny_hf_vit(tmp_path / "vit")
    out = tmp_path / "run"
    args = ["fit", "--backbone", f"hf:{folder}", "--data", "digits", "--limit", "120",
            "--test-limit", "40", "--epochs", "2", "--out", str(out), "--kinds",
            "inca,linear,multilayer_linear"]
    monkeypatch.setattr(sys, "argv", ["/somewhere/bin/inca", *args])  # as a shell runs it
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "last-layer linear probe" in res.output
    assert res.output.index("Test accuracy") < res.output.index("## Every adapter")
    for name in ("task/task.json", "task/adapter_model.safetensors", "report.json",
                 "report.md", "accuracy_per_layer.png", "confusion_matrix.png"):
        assert (out / name).is_file(), name
    # the command is recorded, with the program named inca (not where it is installed)
    report = json.loads((out / "report.json").read_text())
    assert report["command"] == "inca " + " ".join(args)
    assert report["data"]["num_test"] == 40
    img = tmp_path / "x.png"
    load_dataset("digits", split="test")[0][0].save(img)
    res = CliRunner().invoke(app, ["predict", "--task", str(out / "task"), str(img)])
    assert res.exit_code == 0, res.output
    assert "x.png:" in res.output
    # a folder of images, one unreadable: the others predicted, the bad one named, exit 1
    shots = tmp_path / "shots"
    (shots / "sub").mkdir(parents=True)
    (shots / ".hidden").mkdir()
    for name in ("a.png", "sub/b.png", ".hidden/c.png"):
        load_dataset("digits", split="test")[1][0].save(shots / name)
    (shots / "bad.png").write_bytes(b"not an image")
    (shots / "notes.txt").write_text("not an image either")
    res = CliRunner().invoke(app, ["predict", "--task", str(out / "task"),
                                   str(shots), "--json", "--top-k", "2"])
    assert res.exit_code == 1, res.output
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert [Path(r["image"]).relative_to(shots).as_posix() for r in rows] == [
        "a.png", "bad.png", "sub/b.png"]
    assert "bad.png" in rows[1]["error"] and "1 of 3 images could not be read" in res.stderr
    (top,) = rows[0]["tasks"].values()
    assert len(top) == 2 and top[0]["probability"] >= top[1]["probability"]
    assert rows[0]["tasks"] == rows[2]["tasks"]  # the same digit image twice
    res = CliRunner().invoke(app, ["predict", "--task", str(tmp_path), str(img)])
    assert res.exit_code == 2 and "not a task folder" in res.output
    res = CliRunner().invoke(app, ["fit", "--backbone", f"hf:{folder}", "--data", "digits",
                                   "--out", str(out), "--lrs", "-1"])
    assert res.exit_code == 2 and "lrs must be positive" in res.output


def test_cli_fit_says_what_its_cache_holds_and_drops_it_when_asked(tmp_path):
    from tiny import save_tiny_hf_vit
    from typer.testing import CliRunner

    from inca.cli import app

    folder = save_tiny_hf_vit(tmp_path / "vit")
    out = tmp_path / "run"
    base = ["fit", "--backbone", f"hf:{folder}", "--data", "digits", "--limit", "60",
            "--test-limit", "0", "--epochs", "1", "--num-workers", "0", "--mode", "cached",
            "--out", str(out)]
    res = CliRunner().invoke(app, base)
    assert res.exit_code == 0, res.output
    assert re.search(r"activation cache: [\d.]+ [KMG]?i?B kept in .*cache .*--drop-cache",
                     res.output)
    assert "from an earlier run" not in res.output
    res = CliRunner().invoke(app, [*base, "--overwrite", "--drop-cache"])
    assert res.exit_code == 0, res.output
    assert re.search(r"cache holds [\d.]+ [KMG]?i?B from an earlier run; reused", res.output)
    assert re.search(r"activation cache: [\d.]+ [KMG]?i?B deleted \(--drop-cache\)", res.output)
    assert not (out / "cache").exists() and (out / "task" / "task.json").is_file()


def test_soup_and_ensemble_candidates(tmp_path, monkeypatch):
    task = inca.fit(planted_backbone(), planted_data(160, 0), layers=["stem", "block1"],
                    kinds=("inca",), lrs=(3e-3, 1e-2), epochs=3, soup=True, ensemble_k=2,
                    progress=False, cache_dir=tmp_path)
    names = [c["name"] for c in task.report.candidates]
    assert names[:2] == ["best", "ensemble"]
    assert {"soup:inca/stem", "soup:inca/block1"} <= set(names)
    chosen = next(c for c in task.report.candidates if c["name"] == task.report.chosen)
    assert chosen["val_loss"] == min(c["val_loss"] for c in task.report.candidates)
    ens = next(c for c in task.report.candidates if c["name"] == "ensemble")
    assert len(ens["members"]) == 2
    # a soup is one adapter whose weights average the lr grid's members
    import inca.training.fitting as fitting

    real, made = fitting.soups, []

    def spy(bank, result, *args, **kwargs):
        made.append((bank, result, real(bank, result, *args, **kwargs)))
        return made[-1][2]

    monkeypatch.setattr(fitting, "soups", spy)
    soup = inca.fit(planted_backbone(), planted_data(160, 0), layers=["stem"], kinds=("inca",),
                    lrs=(3e-3, 1e-2), epochs=1, soup=True, ensemble_k=1, progress=False,
                    cache_dir=tmp_path / "s", patience=0)
    assert {c["name"] for c in soup.report.candidates} == {"best", "soup:inca/stem"}
    [(bank, result, [candidate])] = made
    assert [s.key for s in bank.specs] == ["inca/stem/lr=0.003", "inca/stem/lr=0.01"]
    first, second = (m.state for m in result.members)
    [averaged] = candidate.states
    assert averaged.keys() == first.keys()
    for key, weight in averaged.items():
        torch.testing.assert_close(weight, (first[key] + second[key]) / 2, rtol=0, atol=1e-7)
    assert not torch.equal(first["query"], second["query"])  # two trainings, a true average
    exported = bank.export(candidate.member_indices[0], averaged).state_dict()
    assert all(torch.equal(exported[k], v) for k, v in averaged.items())


def _image_folders(root, splits: dict[str, dict[str, int]], seed: int = 0):
    """``root/<split>/<class>/*.png`` with the planted brightness of each class."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, counts in splits.items():
        for name, n in counts.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            level = 0.3 + 0.13 * int(name[1:])
            for i in range(n):
                img = np.clip(level + rng.normal(0, 0.12, (SIZE, SIZE)), 0, 1)
                Image.fromarray((img * 255).astype(np.uint8)).save(folder / f"{i}.png")
    return root


def test_val_and_test_splits_match_the_training_classes_by_name(tmp_path):
    from inca.data import load_dataset

    root = _image_folders(tmp_path / "data", {
        "train": {f"c{i}": 40 for i in range(4)},
        "val": {f"c{i}": 12 for i in range(4)},
        "test": {"c0": 15, "c2": 15, "c3": 15},  # a class missing: labels must not shift
    })
    train, val, test = (load_dataset(str(root), split=s) for s in ("train", "val", "test"))
    assert test.classes == ["c0", "c2", "c3"]
    task = inca.fit(planted_backbone(), train, val, test=test, layers=["stem", "block1"],
                    kinds=("inca", "linear"), lrs=(1e-2,), epochs=8, batch_size=32,
                    progress=False, cache_dir=tmp_path / "cache", num_workers=0)
    assert task.report.data["num_val"] == 48  # the explicit validation split
    images = [test[i][0] for i in range(len(test))]
    truth = [test.classes[test[i][1]] for i in range(len(test))]
    predicted = task.predict(images)
    by_hand = float(np.mean([p == t for p, t in zip(predicted, truth, strict=True)]))
    assert by_hand > 0.8
    assert task.report.test_accuracy[task.report.chosen] == pytest.approx(by_hand)
    rows = task.report.rows  # per-adapter test accuracy, reported and never used to choose
    assert all(0 <= r["test_accuracy"] <= 1 for r in rows)
    assert "test acc (not used to choose)" in task.report.to_markdown()
    odd = _image_folders(tmp_path / "odd", {"test": {"c9": 3, "c0": 3}})
    with pytest.raises(InCAError, match=r"classes the training data does not: \['c9'\]"):
        inca.fit(planted_backbone(), train, val, test=load_dataset(str(odd), split="test"),
                 layers=["stem"], kinds=("linear",), epochs=1, progress=False)


def test_cli_reads_a_val_folder_or_val_data(tmp_path):
    from tiny import save_tiny_hf_vit
    from typer.testing import CliRunner

    from inca.cli import app

    folder = save_tiny_hf_vit(tmp_path / "vit")
    root = _image_folders(tmp_path / "data", {"train": {"c0": 20, "c1": 20},
                                              "val": {"c0": 5, "c1": 5}})
    base = ["fit", "--backbone", f"hf:{folder}", "--epochs", "1", "--test-limit", "0",
            "--kinds", "linear", "--num-workers", "0"]
    res = CliRunner().invoke(app, [*base, "--data", str(root), "--out", str(tmp_path / "a")])
    assert res.exit_code == 0, res.output
    assert "validation: " in res.output and "(10 images)" in res.output
    assert json.loads((tmp_path / "a" / "report.json").read_text())["data"]["num_val"] == 10
    res = CliRunner().invoke(app, [*base, "--data", str(root / "train"), "--val-data",
                                   str(root / "val"), "--out", str(tmp_path / "b")])
    assert res.exit_code == 0 and "(10 images)" in res.output, res.output


def test_cli_variants_and_their_errors(tmp_path):
    from tiny import save_tiny_hf_vit
    from typer.testing import CliRunner

    from inca.cli import app

    folder = save_tiny_hf_vit(tmp_path / "vit")
    base = ["fit", "--backbone", f"hf:{folder}", "--data", "digits", "--limit", "60",
            "--test-limit", "0", "--epochs", "1", "--num-workers", "0"]
    res = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "a"), "--kinds",
                                   "inca,inca:q2", "--adapter-options",
                                   '{"inca:q2": {"num_queries": 2}}'])
    assert res.exit_code == 0, res.output
    keys = [r["key"] for r in json.loads((tmp_path / "a" / "report.json").read_text())["rows"]]
    assert any(k.startswith("inca:q2/") for k in keys) and any(k.startswith("inca/") for k in keys)
    res = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "b"), "--kinds", "inca:q2"])
    assert res.exit_code == 2 and "needs its settings" in res.output
    res = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "c"), "--adapter-options",
                                   "{num_queries: 2}"])
    assert res.exit_code == 2 and "not valid JSON" in res.output


@pytest.mark.parametrize("kinds", [("inca:w2",), ("inca:mlp", "inca:patch")])
def test_a_task_of_windowed_mlp_or_patch_adapters_round_trips(kinds, tmp_path):
    from inca.runtime import MultiTaskModel

    opts = {"inca:w2": {"num_layers": 2}, "inca:mlp": {"head_hidden": 8},
            "inca:patch": {"attend_prefix": False}}
    bb = planted_backbone()
    task = inca.fit(bb, planted_data(96, 0), layers=["stem", "block1"], kinds=kinds,
                    adapter_options={k: opts[k] for k in kinds}, lrs=(3e-3, 1e-2), epochs=1,
                    ensemble_k=2, progress=False, cache_dir=tmp_path / "c")
    assert all(k.split("/")[0] in kinds for k in task.keys)
    if kinds == ("inca:w2",):
        assert task.member_layers[0] == ["stem", "block1"]
    task.save(tmp_path / "t")
    loaded = load_task(tmp_path / "t", bb)
    x = torch.randint(0, 255, (4, 3, SIZE, SIZE), dtype=torch.uint8)
    torch.testing.assert_close(loaded.predict_proba(x), task.predict_proba(x))
    model = MultiTaskModel(bb)
    model.add_task("a", tmp_path / "t")
    torch.testing.assert_close(model.predict_proba(x)["a"], task.predict_proba(x),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("select_by, chosen", [("accuracy", 3), ("loss", 2)])
def test_the_banks_linear_baseline_is_its_best_last_layer_probe(select_by, chosen):
    """Among the last layer's linear members (not another kind, not another layer), the
    one validation prefers by the selection's measure; the first in the bank on a tie."""
    from types import SimpleNamespace as NS

    from inca.training.fitting import _linear_probe_baseline

    specs = [NS(kind="linear", layers=("a",)), NS(kind="inca", layers=("b",)),
             NS(kind="linear", layers=("b",)), NS(kind="linear", layers=("b",)),
             NS(kind="linear", layers=("b",))]
    scores = [(0.99, 0.01), (0.99, 0.01), (0.80, 0.30), (0.85, 0.50), (0.85, 0.50)]
    result = NS(members=[NS(val_accuracy=a, val_loss=lo) for a, lo in scores])
    assert _linear_probe_baseline(NS(specs=specs), result, ["a", "b"], select_by) == chosen
    assert _linear_probe_baseline(NS(specs=specs[:2]), result, ["a", "b"], select_by) is None


def test_fit_from_one_folder_scores_every_candidate_on_its_test_split(tmp_path, monkeypatch):
    """A folder with train/ and test/ given as both ``train`` and ``test``: each is read from
    its own split; every soup's test accuracy is its own task's, the chosen task's confusion
    matrix is counted on test, and the report records the mode's cache size."""
    import inca.training.fitting as fitting
    from inca.data import as_image_dataset

    made, real = [], fitting.soups
    monkeypatch.setattr(fitting, "soups", lambda bank, result, *a, **k: made.append(
        (bank, result, real(bank, result, *a, **k))) or made[-1][2])
    root = _image_folders(tmp_path / "data", {"train": {f"c{i}": 16 for i in range(3)},
                                              "test": {f"c{i}": 8 for i in range(3)}})
    bb = planted_backbone()
    task = inca.fit(bb, str(root), test=str(root), layers=["stem", "block1", "wash"],
                    kinds=("inca",), lrs=(1e-4, 3e-3), epochs=1, soup=True, ensemble_k=2,
                    batch_size=16, progress=False, cache_dir=tmp_path / "cache", num_workers=0)
    r, test = task.report, as_image_dataset(str(root), split="test")
    assert (r.data["num_train"] + r.data["num_val"], r.data["num_test"]) == (48, 24)
    assert r.mode["cache_bytes"] > 0 and r.per_class["split"] == "test"
    images, truth = zip(*(test[i] for i in range(len(test))), strict=True)
    [(bank, result, soups)] = made
    config = fitting.FitConfig(token_grid=task.token_grid)
    accuracies = {}
    for c in soups:
        soup = fitting._task_from(c, bank, result, task.classes, bb, config)
        accuracies[c.name] = float(np.mean(soup.predict_proba(list(images)).argmax(-1).numpy()
                                           == np.array(truth)))
        assert r.test_accuracy[c.name] == pytest.approx(accuracies[c.name]), c.name
    assert len(set(accuracies.values())) > 1, accuracies  # the soups are told apart
    predicted = task.predict_proba(list(images)).argmax(-1).numpy()
    expected = np.zeros((3, 3), dtype=int)
    np.add.at(expected, (np.array(truth), predicted), 1)
    assert r.per_class["confusion"] == expected.tolist()


def test_the_bank_plans_windows_of_one_width_and_stacks_members_of_one_shape():
    """``inca.fit``'s bank: a two-layer window never spans a change of width, and members of
    one kind, width, token count and learning rate share one stack."""
    from types import SimpleNamespace

    import inca.training.fitting as fitting

    bb = SimpleNamespace(embed_dims={"a": 8, "b": 8, "c": 16}, num_prefix_tokens=0,
                         device=torch.device("cpu"))
    config = fitting.FitConfig(kinds=("inca:w2", "linear"), lrs=(1e-3, 1e-2),
                               adapter_options={"inca:w2": {"num_layers": 2}})
    shapes = {"a": (4, 8), "b": (4, 8), "c": (4, 16)}
    specs, bank = fitting._build_bank(bb, ["a", "b", "c"], config, shapes, 3, 1000)
    assert [s.key for s in specs] == [
        "inca:w2/a+b/lr=0.001", "inca:w2/a+b/lr=0.01", "linear/a/lr=0.001", "linear/a/lr=0.01",
        "linear/b/lr=0.001", "linear/b/lr=0.01", "linear/c/lr=0.001", "linear/c/lr=0.01"]
    assert len(bank.stacks) == 6  # linear on a and b, per lr, stacked; the rest alone


def test_confusion_counts_are_whole_numbers_on_either_split(tmp_path):
    """The confusion matrix in report.json counts images, on validation (a task's own
    pass) as on test (the scoring pass): integers, never 3.0."""
    for test in (None, planted_data(40, 2)):
        task = inca.fit(planted_backbone(), planted_data(80, 0), test=test, layers=["stem"],
                        kinds=("linear",), lrs=(1e-2,), epochs=1, progress=False,
                        num_workers=0, cache_dir=tmp_path / str(test is None))
        counts = [v for row in task.report.per_class["confusion"] for v in row]
        assert all(type(v) is int for v in counts) and sum(counts) in (12, 40), counts


def test_fit_hands_its_workers_to_every_cached_split(tmp_path, monkeypatch):
    import inca.training.fitting as fitting

    made = []

    class Source(fitting.CachedSource):
        def __init__(self, *args) -> None:
            made.append(args[-1])  # num_workers
            super().__init__(*args)

    monkeypatch.setattr(fitting, "CachedSource", Source)
    inca.fit(planted_backbone(), planted_data(48, 0), test=planted_data(16, 1), layers=["stem"],
             kinds=("linear",), lrs=(1e-2,), epochs=1, progress=False, num_workers=1,
             mode="cached", cache_dir=tmp_path)
    assert made == [1, 1, 1]  # train, validation, test


def test_a_validation_split_without_indices_is_refused_by_name():
    import inca.training.fitting as fitting

    with pytest.raises(InCAError, match=r"^a validation split must carry \.indices into its "
                                        r"parent data set$"):
        fitting._indices_of(object(), planted_data(4, 0))


def test_fit_says_which_mode_it_chose_when_it_shows_progress(tmp_path, capsys):
    common = dict(layers=["stem"], kinds=("linear",), lrs=(1e-2,), epochs=1, num_workers=0,
                  mode="cached", cache_dir=tmp_path)
    inca.fit(planted_backbone(), planted_data(48, 0), progress=True, **common)
    out = capsys.readouterr().out
    assert re.search(r"^mode: cached \(asked for; a cache of 48 images would take ", out, re.M)
    inca.fit(planted_backbone(), planted_data(48, 0), progress=False, **common)
    assert "mode:" not in capsys.readouterr().out
