"""Data from other libraries and files: torchvision sets, Hugging Face sets (in memory, on
disk, by hub id with the hub stubbed), lists of pairs, CSV / JSON-lines manifests; and the
single-label-only refusals. Tiny images, no network."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from inca.data import as_image_dataset, has_split, load_dataset
from inca.errors import DataError

COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (20, 40, 210)}


def _image(color: tuple[int, int, int], i: int, size: int = 8) -> Image.Image:
    rng = np.random.default_rng(i)
    arr = np.clip(np.array(color) + rng.integers(-20, 20, (size, size, 3)), 0, 255)
    return Image.fromarray(arr.astype(np.uint8))


def _pairs(n: int = 12, offset: int = 0) -> list[tuple[Image.Image, str]]:
    names = list(COLORS)
    return [(_image(COLORS[names[i % 3]], i + offset), names[i % 3]) for i in range(n)]


def _folder(root: Path, n: int = 4) -> Path:
    for i, (img, label) in enumerate(_pairs(3 * n)):
        (root / label).mkdir(parents=True, exist_ok=True)
        img.save(root / label / f"{i}.png")
    return root


def _hf(pairs, **extra):
    """A Dataset of ``pairs`` (an Image and a ClassLabel column), plus ``extra`` columns
    given as ``name=(feature, value of every row)``."""
    datasets = pytest.importorskip("datasets")
    feats = datasets.Features({"image": datasets.Image(),
                               "label": datasets.ClassLabel(names=sorted(COLORS)),
                               **{k: f for k, (f, _) in extra.items()}})
    data = {"image": [p[0] for p in pairs], "label": [sorted(COLORS).index(p[1]) for p in pairs],
            **{k: [v] * len(pairs) for k, (_, v) in extra.items()}}
    return datasets.Dataset.from_dict(data, features=feats)


# -- torchvision and other map-style sets ---------------------------------------------
def test_torchvision_image_folder_and_its_fingerprint(tmp_path):
    from torchvision.datasets import ImageFolder

    root = _folder(tmp_path / "tv")
    ds = as_image_dataset(ImageFolder(str(root)))
    assert ds.classes == ["blue", "green", "red"] and len(ds) == 12
    img, label = ds[0]
    assert img.mode == "RGB" and label == ImageFolder(str(root)).targets[0]
    assert ds.fingerprint() == as_image_dataset(ImageFolder(str(root))).fingerprint()
    Image.new("RGB", (8, 8)).save(root / "red" / "0.png")  # an edited file: new data
    assert as_image_dataset(ImageFolder(str(root))).fingerprint() != ds.fingerprint()
    sub = as_image_dataset(torch.utils.data.Subset(ImageFolder(str(root)), [0, 5, 9]))
    assert len(sub) == 3 and sub.classes == ds.classes
    # a Subset lacking a class of its parent: that class is left out (it was kept, an
    # output never trained), the labels follow, and a warning names it
    parent = ImageFolder(str(root))
    rows = [i for i, t in enumerate(parent.targets) if t != 1]  # no "green"
    with pytest.warns(UserWarning, match=r"2 of its parent's 3 classes.*'green'"):
        part = as_image_dataset(torch.utils.data.Subset(parent, rows))
    assert part.classes == ["blue", "red"]
    assert [part.classes[t] for t in part.targets] == [
        parent.classes[parent.targets[i]] for i in rows]
    assert load_dataset(ImageFolder(str(root)), limit=6).targets.tolist().count(0) == 2


def test_fakedata_and_array_holding_sets():
    from torchvision.datasets import FakeData

    fake = as_image_dataset(FakeData(size=10, image_size=(3, 8, 8), num_classes=3))
    assert len(fake) == 10 and fake[3][0].size == (8, 8)
    assert fake.classes == sorted(fake.classes, key=int)  # no .classes: the labels found
    assert fake.fingerprint() == as_image_dataset(
        FakeData(size=10, image_size=(3, 8, 8), num_classes=3)).fingerprint()

    class Cifarish(torch.utils.data.Dataset):  # pixels in .data, labels in .targets
        classes = ["a", "b"]

        def __init__(self, data):
            self.data, self.targets = data, [0, 1, 0, 1]

        def __len__(self):
            return len(self.data)

        def __getitem__(self, i):
            return Image.fromarray(self.data[i]), self.targets[i]

    data = np.zeros((4, 6, 6, 3), np.uint8)
    ds = as_image_dataset(Cifarish(data))
    assert ds.classes == ["a", "b"] and ds.targets.tolist() == [0, 1, 0, 1]
    data2 = data.copy()
    data2[2, 0, 0, 0] = 1
    assert as_image_dataset(Cifarish(data2)).fingerprint() != ds.fingerprint()


def test_lists_of_pairs_any_image_type():
    pairs = _pairs(6)
    ds = as_image_dataset(pairs)
    assert ds.classes == ["blue", "green", "red"] and ds.targets.tolist()[:3] == [2, 1, 0]
    changed = list(pairs)
    changed[4] = (_image((0, 0, 0), 99), changed[4][1])
    assert as_image_dataset(changed).fingerprint() != ds.fingerprint()
    assert as_image_dataset(pairs, fingerprint="v1").fingerprint() == \
        as_image_dataset(changed, fingerprint="v1").fingerprint()  # named by the caller
    # int labels index given classes; arrays (H, W, C) and tensors (C, H, W)
    arrays = [(np.full((5, 7, 3), 200, np.uint8), 1), (torch.rand(3, 5, 7), 0)]
    ds = as_image_dataset(arrays, classes=["cat", "dog"])
    assert ds.classes == ["cat", "dog"] and [ds[i][0].size for i in range(2)] == [(7, 5)] * 2
    # ints without names: named by their digits, sorted as numbers (no empty class)
    assert as_image_dataset([(pairs[0][0], 10), (pairs[1][0], 2)]).classes == ["2", "10"]
    rows = [{"img": pairs[0][0], "y": "x"}, {"img": pairs[1][0], "y": "z"}]
    assert as_image_dataset(rows, image_column="img", label_column="y").classes == ["x", "z"]
    with pytest.raises(DataError, match="image_column= and label_column="):
        as_image_dataset(rows)
    with pytest.raises(DataError, match=r"\(image, label\) pairs"):
        as_image_dataset([(pairs[0][0], 0, "extra")])


# -- Hugging Face ---------------------------------------------------------------------
def test_hf_in_memory_on_disk_and_split_names(tmp_path):
    datasets = pytest.importorskip("datasets")
    dd = datasets.DatasetDict({"train": _hf(_pairs(12)), "validation": _hf(_pairs(6, 50)),
                               "test": _hf(_pairs(3, 80))})
    train = as_image_dataset(dd)  # the train split, columns found by their features
    assert train.classes == ["blue", "green", "red"] and len(train) == 12
    assert train[0][0].mode == "RGB" and train[0][1] == 2
    assert len(load_dataset(dd, split="val")) == 6 and has_split(dd, "val")
    assert train.fingerprint() == as_image_dataset(dd["train"]).fingerprint()
    dd.save_to_disk(str(tmp_path / "saved"))
    for spec in (f"hf:{tmp_path / 'saved'}", str(tmp_path / "saved")):  # hf: optional
        assert has_split(spec, "val") and has_split(spec, "test")
        assert not has_split(spec, "dev2")
        val = load_dataset(spec, split="val")
        assert len(val) == 6 and val.name.endswith("/validation")
    assert load_dataset(str(tmp_path / "saved")).fingerprint() == \
        load_dataset(str(tmp_path / "saved")).fingerprint()


def test_hf_columns_chosen_or_found(tmp_path):
    datasets = pytest.importorskip("datasets")
    pairs = _pairs(6)
    feats = datasets.Features({"a": datasets.Image(), "b": datasets.Image(),
                               "kind": datasets.Value("string")})
    two = datasets.Dataset.from_dict({"a": [p[0] for p in pairs], "b": [p[0] for p in pairs],
                                      "kind": [p[1] for p in pairs]}, features=feats)
    with pytest.raises(DataError, match=r"several Image columns \['a', 'b'\].*--image-column"):
        as_image_dataset(two)
    with pytest.raises(DataError, match="no labels column found.*--label-column"):
        as_image_dataset(two, image_column="b")
    ds = as_image_dataset(two, image_column="b", label_column="kind")
    assert ds.classes == ["blue", "green", "red"]  # text labels: sorted names
    with pytest.raises(DataError, match="no column 'nope'"):
        as_image_dataset(two, image_column="nope")
    two.save_to_disk(str(tmp_path / "two"))
    ds = load_dataset(f"hf:{tmp_path / 'two'}", image_column="a", label_column="kind")
    assert len(ds) == 6 and ds[0][0].size == (8, 8)


def test_hf_hub_id_goes_through_datasets_load_dataset(monkeypatch):
    datasets = pytest.importorskip("datasets")
    dd = datasets.DatasetDict({"train": _hf(_pairs(6)), "valid": _hf(_pairs(3, 9))})
    calls = []

    def fake_load(spec, *a, **k):  # the hub, stubbed: the real call path, no network
        calls.append(spec)
        if spec == "someone/colors":
            return dd
        raise ConnectionError("Couldn't reach the Hugging Face Hub")

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    assert has_split("hf:someone/colors", "val")
    assert len(load_dataset("hf:someone/colors", split="val")) == 3
    assert calls == ["someone/colors"] * 2
    with pytest.raises(DataError, match="cannot load the Hugging Face data set 'x/y' "
                                        r"\(hub id\).*Couldn't reach.*save_to_disk"):
        load_dataset("hf:x/y")


# -- manifests ------------------------------------------------------------------------
def _manifest_images(root: Path, pairs) -> list[str]:
    (root / "img").mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (img, _) in enumerate(pairs):
        img.save(root / "img" / f"{i}.png")
        paths.append(f"img/{i}.png")
    return paths


def test_csv_and_jsonl_manifests(tmp_path):
    pairs = _pairs(9)
    paths = _manifest_images(tmp_path, pairs)
    rows = "\n".join(f"{p},{label}" for p, (_, label) in zip(paths, pairs, strict=True))
    (tmp_path / "train.csv").write_text("path,label\n" + rows + "\n")
    ds = load_dataset(str(tmp_path / "train.csv"))
    assert ds.classes == ["blue", "green", "red"] and len(ds) == 9 and ds[1][1] == 1
    assert ds.fingerprint() == load_dataset(str(tmp_path / "train.csv")).fingerprint()
    assert not has_split(str(tmp_path / "train.csv"), "val")
    (tmp_path / "plain.csv").write_text(rows)  # no header: path,label
    assert load_dataset(str(tmp_path / "plain.csv")).classes == ds.classes
    (tmp_path / "named.csv").write_text("file_name,colour\n" + rows)
    named = load_dataset(str(tmp_path / "named.csv"), image_column="file_name",
                         label_column="colour")
    assert named.targets.tolist() == ds.targets.tolist()
    with pytest.raises(DataError, match="no column 'x'"):
        load_dataset(str(tmp_path / "named.csv"), image_column="x")
    sub = tmp_path / "lists"
    sub.mkdir()
    (sub / "val.jsonl").write_text("".join(
        json.dumps({"image": str(tmp_path / p), "label": i % 2}) + "\n"
        for i, p in enumerate(paths[:4])))  # absolute paths; integer labels
    val = load_dataset(str(sub / "val.jsonl"))
    assert val.classes == ["0", "1"] and len(val) == 4
    (tmp_path / "missing.csv").write_text("path,label\nimg/0.png,a\nimg/nope.png,b\n")
    with pytest.raises(DataError, match=r"1 listed image\(s\) not found.*nope\.png"):
        load_dataset(str(tmp_path / "missing.csv"))


# -- single-label classification only --------------------------------------------------
def test_multi_label_and_regression_are_refused_naming_the_column(tmp_path):
    datasets = pytest.importorskip("datasets")
    tags = datasets.Sequence(datasets.ClassLabel(names=["a", "b"]))
    multi = _hf(_pairs(4), tags=(tags, [0, 1])).remove_columns("label")
    with pytest.raises(DataError, match="'tags'.*single-label classification only"):
        as_image_dataset(multi)  # found as the only labels there are
    with pytest.raises(DataError, match="'tags'.*multi-label"):
        as_image_dataset(_hf(_pairs(4), tags=(tags, [1])), label_column="tags")
    score = (datasets.Value("float32"), 0.5)
    with pytest.raises(DataError, match="'score'.*regression.*single-label"):
        as_image_dataset(_hf(_pairs(4), score=score), label_column="score")
    img = _pairs(1)[0][0]
    with pytest.raises(DataError, match="'label'.*several labels.*multi-label"):
        as_image_dataset([(img, [0, 1]), (img, [1])])
    with pytest.raises(DataError, match="regression"):
        as_image_dataset([(img, 0.25), (img, 1.5)])
    assert as_image_dataset([(img, 0.0), (img, 1.0)]).classes == ["0", "1"]  # whole floats
    paths = _manifest_images(tmp_path, _pairs(2))
    (tmp_path / "m.jsonl").write_text("".join(
        json.dumps({"path": p, "label": ["a", "b"]}) + "\n" for p in paths))
    with pytest.raises(DataError, match="m.jsonl: label column 'label'.*multi-label"):
        load_dataset(str(tmp_path / "m.jsonl"))
    (tmp_path / "r.csv").write_text(f"path,y\n{paths[0]},0.37\n{paths[1]},1.2\n")
    with pytest.raises(DataError, match="'y'.*regression"):
        load_dataset(str(tmp_path / "r.csv"))
    (tmp_path / "long.csv").write_text(f"path,label\n{paths[0]},a\n{paths[0]},b\n")
    with pytest.raises(DataError, match="two labels for one image.*multi-label"):
        load_dataset(str(tmp_path / "long.csv"))


# -- inca.fit and the CLI ---------------------------------------------------------------
def test_fit_takes_torchvision_hf_and_lists(tmp_path):
    datasets = pytest.importorskip("datasets")
    from tiny import make_backbone
    from torchvision.datasets import ImageFolder

    import inca

    train = ImageFolder(str(_folder(tmp_path / "train", n=8)))
    val = datasets.DatasetDict({"validation": _hf(_pairs(6, 100))})
    test = [(img, label) for img, label in _pairs(6, 200) if label != "green"]  # a class less
    task = inca.fit(make_backbone("module", tmp_path), train, val, test=test,
                    layers=["stage2"], kinds=("linear",), lrs=(1e-2,), epochs=1,
                    batch_size=8, progress=False, num_workers=0, mode="streaming")
    assert task.classes == ["blue", "green", "red"]
    assert task.report.data["num_val"] == 6
    assert 0 <= task.report.test_accuracy[task.report.chosen] <= 1


@pytest.fixture(scope="module")
def cli_fit(tmp_path_factory):
    """``inca fit`` on a tiny ViT: a function of the extra arguments, returning the result."""
    pytest.importorskip("transformers")
    from tiny import save_tiny_hf_vit
    from typer.testing import CliRunner

    from inca.cli import app

    vit = save_tiny_hf_vit(tmp_path_factory.mktemp("vit"))
    base = ["fit", "--backbone", f"hf:{vit}", "--epochs", "1", "--kinds", "linear",
            "--layers", "last", "--num-workers", "0", "--mode", "streaming"]
    return lambda *args: CliRunner().invoke(app, [*base, *map(str, args)])


def test_cli_fit_reads_manifests_with_val_and_test_data(tmp_path, cli_fit):
    for name, pairs in (("train", _pairs(12)), ("val", _pairs(6, 30)), ("test", _pairs(3, 60))):
        paths = _manifest_images(tmp_path / name, pairs)
        (tmp_path / f"{name}.csv").write_text("file,colour\n" + "".join(
            f"{name}/{p},{label}\n" for p, (_, label) in zip(paths, pairs, strict=True)))
    res = cli_fit("--data", tmp_path / "train.csv", "--val-data", tmp_path / "val.csv",
                  "--test-data", tmp_path / "test.csv", "--image-column", "file",
                  "--label-column", "colour", "--out", tmp_path / "a")
    assert res.exit_code == 0, res.output
    assert "(6 images)" in res.output
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["data"]["num_val"] == 6 and report["test_accuracy"]


def test_cli_fit_reads_a_hf_validation_split_with_chosen_columns(tmp_path, cli_fit):
    datasets = pytest.importorskip("datasets")
    feats = datasets.Features({"photo": datasets.Image(), "colour": datasets.Value("string")})
    split = {n: datasets.Dataset.from_dict({"photo": [p[0] for p in pairs],
                                            "colour": [p[1] for p in pairs]}, features=feats)
             for n, pairs in (("train", _pairs(12)), ("validation", _pairs(4, 40)))}
    datasets.DatasetDict(split).save_to_disk(str(tmp_path / "hf"))
    res = cli_fit("--data", f"hf:{tmp_path / 'hf'}", "--image-column", "photo",
                  "--label-column", "colour", "--out", tmp_path / "b")
    assert res.exit_code == 0, res.output
    assert "validation: hf:" in res.output and "/validation (4 images)" in res.output
    assert "no test split evaluated" in res.output
    res = cli_fit("--data", f"hf:{tmp_path / 'hf'}", "--out", tmp_path / "c")
    assert res.exit_code != 0 and "--label-column" in res.output, res.output
