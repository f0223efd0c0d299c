"""Data sets at the edges (issue 20): many small classes split, manifests read as their
authors wrote them (encoding, label text, duplicate rows), images as cameras store them
(EXIF orientation), class names that cannot spoof the output."""

from __future__ import annotations

import numpy as np
import pytest

from inca.data import ImageDataset, split_train_val
from inca.errors import DataError


class _Labels(ImageDataset):
    """Labels only (splits never open an image)."""

    def __init__(self, counts: list[int]) -> None:
        super().__init__()
        self.name = "tiny"
        self.classes = [f"c{i:04d}" for i in range(len(counts))]
        self.targets = np.repeat(np.arange(len(counts)), counts).astype(np.int64)
        self._validate()

    def _identity(self) -> str:
        return "labels"


# -- M6: a validation share allocated over the whole data set --------------------------
@pytest.mark.parametrize(("counts", "fraction", "num_val"), [
    ([3] * 300, 0.15, 135),  # 3 x 0.15 rounds to 0 in every class
    ([2] * 50 + [1] * 20, 0.1, 12),  # singletons stay in training
    ([40] * 5 + [3] * 100, 0.001, 1),  # a tiny share is still one image
])
def test_many_small_classes_split_with_every_class_in_training(counts, fraction, num_val):
    ds = _Labels(counts)
    train, val = split_train_val(ds, fraction, seed=3)
    assert len(val) == num_val and len(train) + len(val) == len(ds)
    assert not set(train.indices) & set(val.indices)
    assert set(train.targets.tolist()) == set(range(len(counts)))  # every class trains
    again = split_train_val(ds, fraction, seed=3)[1]
    assert np.array_equal(val.indices, again.indices)


def test_a_split_share_is_stratified_as_far_as_counts_allow():
    ds = _Labels([100, 50, 10, 3, 3, 1])
    val = split_train_val(ds, 0.2, seed=0)[1]
    held = np.bincount(val.targets, minlength=6)
    assert held[:3].tolist() == [20, 10, 2] and held[5] == 0 and held.sum() == 33


@pytest.mark.parametrize(("counts", "fraction", "needed"), [
    ([1] * 2000, 0.15, 2),  # one image per class: none can be held out
    ([2] * 30, 0.6, 3),  # 36 to hold out, but only 30 can go while each class trains
])
def test_an_impossible_split_says_how_many_images_per_class_and_names_val_data(
        counts, fraction, needed):
    with pytest.raises(DataError) as info:
        split_train_val(_Labels(counts), fraction)
    text = str(info.value)
    assert f"at least {needed} images per class" in text and "--val-data" in text
    assert "[]" not in text


# -- manifests: encoding, label text, duplicate rows ----------------------------------
def _manifest(root, labels, name="m.csv", *, extra=()) -> str:
    """A CSV manifest of one tiny PNG per label (``extra`` rows appended as written)."""
    from PIL import Image

    (root / "img").mkdir(exist_ok=True)
    rows = []
    for i, label in enumerate(labels):
        Image.new("RGB", (4, 4), (i % 256, 0, 0)).save(root / "img" / f"{i}.png")
        rows.append(f"img/{i}.png,{label}")
    (root / name).write_text("path,label\n" + "\n".join([*rows, *extra]) + "\n")
    return str(root / name)


def test_a_latin1_manifest_is_one_clear_error_naming_file_line_and_fix(tmp_path):
    from typer.testing import CliRunner

    from inca.cli import app
    from inca.data import load_dataset

    _manifest(tmp_path, ["a", "b"])
    text = (tmp_path / "m.csv").read_text().replace(",b\n", ",caf\xe9\n")
    (tmp_path / "latin1.csv").write_bytes(text.encode("latin-1"))
    (tmp_path / "latin1.jsonl").write_bytes(
        b'{"path": "img/0.png", "label": "a"}\n{"path": "img/1.png", "label": "caf\xe9"}\n')
    for name, line in (("latin1.csv", 3), ("latin1.jsonl", 2)):
        with pytest.raises(DataError, match=rf"{name}: not UTF-8 text: byte 0xe9 on line "
                                            rf"{line}.*save the file as UTF-8"):
            load_dataset(str(tmp_path / name))
    res = CliRunner().invoke(app, ["extract", "--backbone", "dinov2_vits14", "--data",
                                   str(tmp_path / "latin1.csv"), "--out", str(tmp_path / "c")])
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert "latin1.csv: not UTF-8 text" in res.output


@pytest.mark.parametrize(("labels", "classes"), [
    (["01", "1", "007"], ["007", "01", "1"]),  # two spellings of 1: text order
    (["10", "9", "2", "9"], ["2", "9", "10"]),  # plain integers: numeric order
    (["nan", "inf", "fox"], ["fox", "inf", "nan"]),  # words, not regression targets
    (["1.0", "10.0", "2.5e0", "x"], ["1.0", "10.0", "2.5e0", "x"]),
])
def test_csv_labels_are_text_kept_as_written(tmp_path, labels, classes):
    from inca.data import load_dataset

    ds = load_dataset(_manifest(tmp_path, labels))
    assert ds.classes == classes
    assert [ds.classes[t] for t in ds.targets] == labels


def test_csv_labels_that_are_all_decimals_with_fractions_still_look_like_regression(tmp_path):
    from inca.data import ManifestDataset, load_dataset

    with pytest.raises(DataError, match="regression"):
        load_dataset(_manifest(tmp_path, ["0.5", "1.5", "2"]))
    with pytest.raises(DataError, match="negative label marks an unlabelled sample"):
        load_dataset(_manifest(tmp_path, ["0", "-1", "2"]))
    named = ManifestDataset(_manifest(tmp_path, ["1", "0", "1"]), classes=["cat", "dog"])
    assert named.classes == ["cat", "dog"] and named.targets.tolist() == [1, 0, 1]


def test_duplicate_rows_are_dropped_with_a_warning_and_conflicts_refused(tmp_path):
    from inca.data import load_dataset

    labels = ["cat", "dog"] * 8
    dup = [f"img/{i}.png,{labels[i]}" for i in range(8)] + ["img/../img/9.png,dog"]
    with pytest.warns(UserWarning, match=r"9 duplicate row\(s\).*left out"):
        ds = load_dataset(_manifest(tmp_path, labels, extra=dup))
    assert len(ds) == 16 and len(set(ds.files)) == 16
    train, val = split_train_val(ds, 0.25)
    assert not {ds.files[i] for i in train.indices} & {ds.files[i] for i in val.indices}
    with pytest.raises(DataError, match=r"two labels for one image.*'cat' and 'dog'"):
        load_dataset(_manifest(tmp_path, labels, extra=["./img/0.png,dog"]))


# -- L6: images as cameras store them ---------------------------------------------------
def test_exif_orientation_is_applied_wherever_an_image_is_opened(tmp_path):
    from PIL import Image, ImageOps

    from inca.data import load_dataset, open_image
    from inca.task.inputs import open_one

    for name in ("up", "side"):
        (tmp_path / name).mkdir()
        pixels = np.zeros((20, 40, 3), np.uint8)  # 40 wide, 20 high, left half bright
        pixels[:, :20] = 250
        exif = Image.Exif()
        exif[0x0112] = 6 if name == "side" else 1  # 6: rotate 90 degrees clockwise to view
        Image.fromarray(pixels).save(tmp_path / name / "a.jpg", exif=exif.tobytes())
    path = tmp_path / "side" / "a.jpg"
    viewed = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
    assert viewed.shape == (40, 20, 3)
    with Image.open(path) as raw:
        opened = [open_image(path), open_image(path.read_bytes()), open_image(raw),
                  open_one(str(path)), open_one(path.read_bytes()),
                  load_dataset(str(tmp_path))[0][0]]
    for im in opened:
        assert np.array_equal(np.asarray(im), viewed)
    assert open_image(tmp_path / "up" / "a.jpg").size == (40, 20)  # orientation 1: as stored


# -- L7: class names that cannot spoof what inca prints ----------------------------------
SPOOFS = {"nul": "a\x00b", "newline": "cat\nerror: fake", "tab": "a\tb", "del": "a\x7fb",
          "c1": "a\x85b", "bidi": "photo\u202egnp.exe", "isolate": "a\u2066b",
          "line separator": "a\u2028b", "4096 characters": "x" * 4096}


@pytest.mark.parametrize("name", list(SPOOFS))
def test_class_names_that_could_spoof_output_are_refused_where_they_enter(name, tmp_path):
    from PIL import Image

    from inca.data import as_image_dataset

    img = Image.new("RGB", (4, 4))
    bad = SPOOFS[name]
    with pytest.raises(DataError, match=r"class .* (holds|is 4,096 characters).*rename"):
        as_image_dataset([(img, "fine"), (img, bad)])
    if "\x00" not in bad and len(bad) < 256:  # what a file system can hold
        for cls in ("fine", bad):
            (tmp_path / cls).mkdir()
            img.save(tmp_path / cls / "a.png")
        from inca.data import load_dataset
        with pytest.raises(DataError, match="class"):
            load_dataset(str(tmp_path))


def test_ordinary_class_names_stay_accepted():
    from PIL import Image

    from inca.data import as_image_dataset

    img = Image.new("RGB", (4, 4))
    names = ["café", "cafe\u0301", "dog ", "猫", "a/b", "<script>", "👩\u200d💻", "y" * 256]
    assert sorted(as_image_dataset([(img, n) for n in names]).classes) == sorted(names)


@pytest.fixture(scope="module")
def saved_task(tmp_path_factory):
    from planted import planted_backbone
    from tiny import make_task

    bb = planted_backbone()
    folder = tmp_path_factory.mktemp("task") / "t"
    make_task(bb).save(folder)
    return bb, folder


def _edited(saved_task, tmp_path, change):
    import shutil

    from tiny import edit_json

    from inca.task import load_task

    bb, folder = saved_task
    copy = tmp_path / "t"
    shutil.copytree(folder, copy)
    edit_json(copy, change)
    return lambda: load_task(copy, bb)


@pytest.mark.parametrize("name", ["nul", "newline", "bidi", "4096 characters"])
def test_a_task_json_with_a_spoofing_class_name_is_refused(saved_task, tmp_path, name):
    from inca.task import TaskError

    load = _edited(saved_task, tmp_path, lambda m: m["classes"].__setitem__(1, SPOOFS[name]))
    with pytest.raises(TaskError, match=r"classes\[1\] .* (holds|is 4,096 characters)"):
        load()


# -- L8: messages that say what is wrong --------------------------------------------------
def test_out_of_range_mean_and_nan_config_are_named_as_such(saved_task, tmp_path):
    from inca.task import TaskError

    def mean(m):
        m["backbone"]["preprocessing"]["mean"] = [1e308, 0, 0]

    with pytest.raises(TaskError, match=r"mean\[0\] must be a finite number of magnitude "
                                        r"below 1e\+06, got 1e\+308"):
        _edited(saved_task, tmp_path / "a", mean)()

    def init_std(m):
        m["members"][0]["spec"]["config"]["init_std"] = float("nan")  # written as NaN

    with pytest.raises(TaskError, match=r"init_std must be a number .*got nan") as info:
        _edited(saved_task, tmp_path / "b", init_std)()
    assert "None" not in str(info.value)
