"""Data sources, splits, transforms and every bad-input case."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from inca.backbones import Preprocessing
from inca.data import (
    build_transform,
    has_split,
    list_datasets,
    load_dataset,
    split_train_val,
    to_model_input,
)
from inca.errors import DataError


def make_folder(root: Path, counts: dict[str, int], size: int = 12) -> Path:
    rng = np.random.default_rng(0)
    for cls, n in counts.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            arr = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / cls / f"{i}.png")
    return root


def test_image_folder(tmp_path):
    root = make_folder(tmp_path / "d", {"cat": 3, "dog": 4})
    ds = load_dataset(str(root))
    assert ds.classes == ["cat", "dog"] and len(ds) == 7
    img, label = ds[5]
    assert img.mode == "RGB" and label == 1
    assert ds.fingerprint() == load_dataset(str(root)).fingerprint()
    Image.new("RGB", (12, 12)).save(root / "dog" / "9.png")
    assert load_dataset(str(root)).fingerprint() != ds.fingerprint()


def test_folder_with_splits(tmp_path):
    make_folder(tmp_path / "d" / "train", {"a": 2, "b": 2})
    make_folder(tmp_path / "d" / "test", {"a": 1, "b": 1})
    assert len(load_dataset(str(tmp_path / "d"), split="test")) == 2
    with pytest.raises(DataError, match="has splits"):
        load_dataset(str(tmp_path / "d"), split="val")


def test_split_names_and_has_split(tmp_path):
    make_folder(tmp_path / "d" / "train", {"a": 2, "b": 2})
    make_folder(tmp_path / "d" / "validation", {"a": 1, "b": 1})
    assert has_split(str(tmp_path / "d"), "val") and not has_split(str(tmp_path / "d"), "test")
    assert load_dataset(str(tmp_path / "d"), split="val").name.endswith("validation")
    plain = make_folder(tmp_path / "plain", {"a": 2, "b": 2})
    assert has_split(str(plain), "train") and not has_split(str(plain), "test")
    assert len(load_dataset(str(plain), split="val")) == 4  # one split: the data named
    assert has_split("digits", "test") and not has_split("digits", "val")


def test_corrupt_image_named_and_skippable(tmp_path):
    root = make_folder(tmp_path / "d", {"a": 2, "b": 2})
    bad = root / "b" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    ds = load_dataset(str(root))
    with pytest.raises(DataError, match=r"cannot read image .*broken\.png"):
        [ds[i] for i in range(len(ds))]
    with pytest.warns(UserWarning, match="skipped 1"):
        ok = load_dataset(str(root), skip_unreadable=True)
    assert len(ok) == 4 and ok.skipped == [str(bad)]
    truncated = root / "a" / "cut.png"
    good = (root / "a" / "0.png").read_bytes()
    truncated.write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match="cut.png"):
        load_dataset(str(root))[2]


def test_bad_folders(tmp_path):
    with pytest.raises(DataError, match="unknown data set"):
        load_dataset(str(tmp_path / "missing"))
    (tmp_path / "flat").mkdir()
    with pytest.raises(DataError, match="no class subfolders"):
        load_dataset(str(tmp_path / "flat"))
    root = make_folder(tmp_path / "e", {"a": 2})
    (root / "empty").mkdir()
    with pytest.raises(DataError, match=r"class folder .*empty holds no images"):
        load_dataset(str(root))
    one = make_folder(tmp_path / "one", {"only": 3})
    with pytest.raises(DataError, match="at least 2 classes"):
        load_dataset(str(one))


def test_label_outside_class_list_hf(tmp_path):
    datasets = pytest.importorskip("datasets")
    imgs = [Image.new("RGB", (8, 8), (i * 40, 0, 0)) for i in range(4)]
    feats = datasets.Features({"image": datasets.Image(),
                               "label": datasets.ClassLabel(names=["x", "y"])})
    good = datasets.Dataset.from_dict({"image": imgs, "label": [0, 1, 0, 1]}, features=feats)
    good.save_to_disk(str(tmp_path / "good"))
    ds = load_dataset(f"hf:{tmp_path / 'good'}")
    assert ds.classes == ["x", "y"] and ds[1][1] == 1 and ds[1][0].size == (8, 8)
    raw = datasets.Dataset.from_dict({"image": imgs, "label": [0, 1, 2, -1]},
                                     features=datasets.Features({"image": datasets.Image(),
                                                                 "label": datasets.Value("int64")}))
    raw.save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(DataError, match="label -1, outside"):
        load_dataset(f"hf:{tmp_path / 'bad'}")


def test_builtins_and_limit():
    assert {"fashion-mnist", "digits"} <= set(list_datasets())
    digits = load_dataset("digits")
    assert len(digits) + len(load_dataset("digits", split="test")) == 1797
    sub = load_dataset("digits", limit=50, seed=3)
    assert len(sub) == 50 and set(sub.targets) == set(range(10))
    assert sub.fingerprint() == load_dataset("digits", limit=50, seed=3).fingerprint()
    assert sub.fingerprint() != load_dataset("digits", limit=50, seed=4).fingerprint()
    with pytest.raises(DataError, match="unknown data set"):
        load_dataset("imagenet-99")


def test_fashion_mnist():
    try:
        ds = load_dataset("fashion-mnist", split="test", limit=30)
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"Fashion-MNIST not installed: {e}")
    img, label = ds[0]
    assert img.size == (28, 28) and img.mode == "RGB" and ds.classes[9] == "Ankle boot"
    assert len(load_dataset("fashion-mnist").targets) == 60000


def test_split_is_seeded_stratified_and_disjoint():
    ds = load_dataset("digits", limit=200)
    tr, va = split_train_val(ds, 0.2, seed=1)
    assert len(tr) + len(va) == 200 and not set(tr.indices) & set(va.indices)
    assert np.array_equal(va.indices, split_train_val(ds, 0.2, seed=1)[1].indices)
    assert not np.array_equal(va.indices, split_train_val(ds, 0.2, seed=2)[1].indices)
    assert set(va.targets) == set(range(10))
    assert va[0][1] == ds[int(va.indices[0])][1]
    with pytest.raises(DataError, match="val_fraction"):
        split_train_val(ds, 1.5)
    with pytest.raises(DataError, match="too few samples"):
        split_train_val(load_dataset("digits", limit=10), 0.5)


def test_transforms():
    prep = Preprocessing(input_size=16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    img = Image.new("L", (28, 20), 255)
    x = build_transform(prep)(img)
    assert x.shape == (3, 16, 16) and x.dtype == torch.uint8  # pixels; normalized on device
    y = to_model_input(x[None], prep, "cpu")
    torch.testing.assert_close(y, torch.full_like(y, 2.0))
    assert to_model_input(y, prep, "cpu", torch.float64).dtype == torch.float64  # as it is
    assert build_transform(prep, "crop-flip")(img).shape == (3, 16, 16)
    # orientation-sensitive data: crops without flips
    steps = [type(t).__name__ for t in build_transform(prep, "crop").transforms]
    assert "RandomResizedCrop" in steps and "RandomHorizontalFlip" not in steps
    assert "RandomHorizontalFlip" in [type(t).__name__
                                      for t in build_transform(prep, True).transforms]
    with pytest.raises(DataError, match="unknown augmentation 'flip'"):
        build_transform(prep, "flip")


def _png(size: tuple[int, int], value: int = 0) -> bytes:
    import io

    buf = io.BytesIO()
    Image.new("L", size, value).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("size", [(4, 100_000), (100_000, 4), (1, 1_000_000)])
@pytest.mark.parametrize("policy", ["none", "crop", "crop-flip"])
def test_thin_images_cost_no_more_than_the_output(size, policy, monkeypatch):
    """A strip of a few hundred bytes within the pixel bound (4 x 100,000) was resized to
    S x 25,000 S before its center crop: gigabytes and seconds for one image. Every resize
    is now bounded by a few S x S (checked before Pillow allocates), for every policy."""
    import time

    from inca.data.images import open_image

    s = 64
    largest = []
    resize = Image.Image.resize

    def bounded(im, out, *args, **kwargs):
        largest.append(out[0] * out[1])
        assert out[0] * out[1] <= 4 * s * s, f"resized to {out} for a {s}px input"
        return resize(im, out, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", bounded)
    data = _png(size)
    assert len(data) < 4000
    start = time.perf_counter()
    x = build_transform(Preprocessing(input_size=s), policy)(open_image(data))
    assert x.shape == (3, s, s) and x.dtype == torch.uint8
    assert time.perf_counter() - start < 5
    assert largest and max(largest) <= 4 * s * s


def test_resize_center_crop_is_torchvision_s_for_ordinary_images_and_close_for_strips():
    from torchvision import transforms as T

    from inca.data.transforms import MAX_RESIZE_RATIO, ResizeCenterCrop

    rng = np.random.default_rng(0)
    for interp in ("bicubic", "bilinear"):
        mode = T.InterpolationMode(interp)
        for i in range(40):
            s = int(rng.integers(8, 48))
            short = int(rng.integers(1, 60))
            # ordinary aspect ratios (the torchvision path, bit for bit), then strips
            ratio = rng.uniform(1, MAX_RESIZE_RATIO) if i < 20 else rng.uniform(5, 60)
            long = max(short, int(short * ratio))
            w, h = (short, long) if i % 2 else (long, short)
            img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            ref = np.asarray(T.CenterCrop(s)(T.Resize(s, interpolation=mode)(img)), np.int16)
            out = np.asarray(ResizeCenterCrop(s, mode)(img), np.int16)
            assert out.shape == ref.shape == (s, s, 3)
            diff = np.abs(out - ref)
            if int(s * long / short) <= MAX_RESIZE_RATIO * s:
                assert diff.max() == 0, (interp, s, w, h)
            else:  # the same resample of the same band, up to rounding (noise: the worst)
                assert diff.mean() < 1 and diff.max() <= 32, (interp, s, w, h, diff.max())
    # the eval transform uses it; its output for an ordinary image is unchanged
    prep = Preprocessing(input_size=16)
    img = Image.fromarray(rng.integers(0, 256, (20, 28, 3), dtype=np.uint8))
    ref = T.Compose([T.Resize(16, interpolation=T.InterpolationMode.BICUBIC),
                     T.CenterCrop(16), T.PILToTensor()])(img)
    assert torch.equal(build_transform(prep)(img), ref)
