"""Faults on the data and cache side: a full disk, a second writer, a kill in the first
manifest write, hidden files, edited images, NaN in a report. Each ends in a clear error
or a correct result, and nothing already computed is lost."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import make_backbone, overwrite_inside

from inca.data import ImageFolderDataset, load_dataset
from inca.errors import StorageError
from inca.features import extract_to_cache
from inca.features.cache import read_manifest, recorded_shards

N = 40


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", limit=N)


def _no_traceback_line(text: str) -> None:
    assert "Traceback" not in text and len(text.strip().splitlines()) == 1, text


@pytest.mark.parametrize("failure", [
    OSError(errno.ENOSPC, "No space left on device"),
    OSError("6389760 requested and 4091840 written"),  # numpy's short write
])
def test_full_disk_mid_extraction_is_named_and_loses_no_shard(tmp_path, digits, monkeypatch,
                                                              failure):
    import tempfile

    bb = make_backbone("module", tmp_path)
    out = tmp_path / "cache"
    real = tempfile.mkstemp

    def fill_up(*args, **kwargs):
        if "00002" in str(kwargs.get("dir")):  # two shards written, then the disk is full
            raise failure
        return real(*args, **kwargs)

    monkeypatch.setattr("inca._files.tempfile.mkstemp", fill_up)
    with pytest.raises(StorageError, match=r"no space left on the device holding .*cache.*"
                                           r"free some space"):
        extract_to_cache(bb, digits, out, batch_size=4, shard_size=8, progress=False)
    assert [s["index"] for s in recorded_shards(out)] == [0, 1]
    monkeypatch.undo()
    before = {p: p.stat().st_mtime_ns for p in (out / "shards").rglob("*.npy")}
    cache = extract_to_cache(bb, digits, out, batch_size=4, shard_size=8, progress=False)
    assert len(cache) == N and not list(out.rglob("*.tmp"))
    for p, t in before.items():  # the shards written before the failure were kept as they are
        assert p.stat().st_mtime_ns == t


def test_a_folder_left_by_a_kill_in_the_first_manifest_write_resumes(tmp_path, digits):
    out = tmp_path / "cache"
    (out / "shards").mkdir(parents=True)
    (out / ".manifest.json.abc123.tmp").write_text('{"format_ver')  # half-written
    cache = extract_to_cache(make_backbone("module", tmp_path), digits, out, batch_size=8,
                             progress=False)
    assert len(cache) == N and not list(out.rglob("*.tmp"))


_HOLD = """
import sys, time
from inca._files import FolderLock
with FolderLock(sys.argv[1], "activation cache"):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_a_second_writer_is_refused_and_a_killed_one_frees_the_folder(tmp_path, digits):
    out = tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(StorageError, match=rf"in use by another inca process \(pid "
                                               rf"{proc.pid}\)"):
            extract_to_cache(make_backbone("module", tmp_path), digits, out, progress=False,
                             overwrite=True)
    finally:
        proc.kill()  # kill -9: the OS releases the lock with the process
        proc.wait()
    assert len(extract_to_cache(make_backbone("module", tmp_path), digits, out,
                                progress=False)) == N


def test_fit_refuses_an_unwritable_run_folder_before_any_work(tmp_path):
    from typer.testing import CliRunner

    from inca.cli import app

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    start = time.perf_counter()
    res = CliRunner().invoke(app, ["fit", "--backbone", "no-such-backbone", "--data", "digits",
                                   "--out", str(blocker / "run")])
    assert res.exit_code == 2 and "part of it is a file, not a folder" in res.output
    _no_traceback_line(res.output)
    assert time.perf_counter() - start < 5  # refused before the backbone or the data


def _folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(
                root / c / f"{i}.png")
    return root


def test_hidden_files_and_folders_are_not_images(tmp_path):
    root = _folder(tmp_path / "data")
    (root / "cat" / ".ipynb_checkpoints").mkdir()
    Image.new("RGB", (8, 8)).save(root / "cat" / ".ipynb_checkpoints" / "0-checkpoint.png")
    Image.new("RGB", (8, 8)).save(root / "dog" / "._0.png")  # macOS resource fork
    ds = ImageFolderDataset(root)
    assert len(ds) == 6 and not any("/." in str(f) for f in ds.files)


def test_an_edited_image_with_its_old_size_and_time_is_a_new_data_set(tmp_path):
    root = _folder(tmp_path / "data")
    before = ImageFolderDataset(root).fingerprint()
    f = root / "cat" / "0.png"
    st = f.stat()
    data = bytearray(f.read_bytes())
    data[-20] ^= 0xFF  # same size
    time.sleep(0.01)
    f.write_bytes(bytes(data))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # as cp -p / rsync -t / touch -r do
    assert f.stat().st_size == st.st_size and f.stat().st_mtime_ns == st.st_mtime_ns
    assert ImageFolderDataset(root).fingerprint() != before


def test_non_finite_numbers_are_written_as_valid_json(tmp_path):
    from inca._files import atomic_write_json

    atomic_write_json(tmp_path / "r.json", {"val_loss": float("nan"), "x": [float("inf"), 1.0],
                                             "t": (float("-inf"),)})

    def refuse(name):
        raise ValueError(f"bare {name} in JSON")

    assert json.loads((tmp_path / "r.json").read_text(), parse_constant=refuse) == \
        {"val_loss": None, "x": [None, 1.0], "t": [None]}


def test_report_with_a_nan_validation_sample_is_valid_json(tmp_path):
    import inca
    from inca.data import ArrayDataset

    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (48, 16, 16, 3), dtype=np.uint8)
    ds = ArrayDataset(x, np.arange(48) % 2, ["a", "b"], "two")
    bb = make_backbone("module", tmp_path)
    task = inca.fit(bb, ds, kinds=("linear",), epochs=1, progress=False, device="cpu")
    task.report.rows[0]["val_loss"] = float("nan")  # as a NaN validation sample makes it
    task.report.write(tmp_path / "run")
    text = (tmp_path / "run" / "report.json").read_text()
    assert "NaN" not in text and json.loads(text)["rows"][0]["val_loss"] is None


def test_loss_of_a_diverging_lr_keeps_the_run(tmp_path):
    import inca
    from inca.data import ArrayDataset

    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (48, 16, 16, 3), dtype=np.uint8)
    ds = ArrayDataset(x, np.arange(48) % 2, ["a", "b"], "two")
    bb = make_backbone("module", tmp_path)
    with pytest.warns(RuntimeWarning, match="dropped linear/.*lr=1e\\+38"):
        task = inca.fit(bb, ds, kinds=("linear",), lrs=(1e-3, 1e38), epochs=2, patience=0,
                        progress=False, device="cpu")
    rows = {r["key"]: r for r in task.report.rows}
    assert all(r["diverged_epoch"] for k, r in rows.items() if "1e+38" in k)
    assert all("1e+38" not in k for k in task.keys)
    assert torch.isfinite(task.predict_proba(torch.zeros(2, 3, 16, 16, dtype=torch.uint8))).all()


_FIT = """
import sys
sys.path.insert(0, {tests!r})
from pathlib import Path
import inca
from tiny import make_backbone
from inca.data import load_dataset
bb = make_backbone("module", Path({tmp!r}))
task = inca.fit(bb, load_dataset("digits", limit={n}), kinds=("linear",), epochs={epochs},
                patience=0, cache_dir={cache!r}, progress=False, device="cpu")
task.save({task!r})
"""


def test_kill_9_during_training_keeps_the_cache_and_the_rerun_finishes(tmp_path):
    cache, task = tmp_path / "cache", tmp_path / "task"
    args = dict(tests=str(Path(__file__).parent), tmp=str(tmp_path), n=N, cache=str(cache),
                task=str(task))
    proc = subprocess.Popen([sys.executable, "-c", _FIT.format(epochs=100000, **args)])
    try:
        deadline = time.time() + 60
        while not (read_manifest(cache / "train") or {}).get("complete"):
            assert proc.poll() is None and time.time() < deadline, "fit ended before the kill"
            time.sleep(0.05)
        time.sleep(0.5)  # training now
    finally:
        proc.kill()
        proc.wait()
    shards = {p: p.stat().st_mtime_ns for p in (cache / "train").rglob("*.npy")}
    assert shards and not task.exists()
    subprocess.run([sys.executable, "-c", _FIT.format(epochs=1, **args)], check=True,
                   timeout=120)
    assert {p: p.stat().st_mtime_ns for p in (cache / "train").rglob("*.npy")} == shards
    from inca.task import load_task

    assert load_task(task, make_backbone("module", tmp_path)).classes


def test_an_unreadable_image_read_by_a_worker_is_one_line_naming_it(tmp_path):
    from tiny import save_tiny_hf_vit
    from typer.testing import CliRunner

    from inca.cli import app

    root = _folder(tmp_path / "data")
    (root / "dog" / "1.png").write_bytes(b"junk")
    vit = save_tiny_hf_vit(tmp_path / "vit")
    res = CliRunner().invoke(app, ["extract", "--backbone", f"hf:{vit}", "--data", str(root),
                                   "--out", str(tmp_path / "cache"), "--num-workers", "1"])
    assert res.exit_code == 2
    err = next(line for line in res.output.splitlines() if "error:" in line)
    assert "dog/1.png" in err and "--skip-unreadable" in err
    assert "Traceback" not in res.output and "DataLoader" not in res.output


@pytest.mark.parametrize("damage", ["labels-deleted", "tokens-cut", "tokens-overwritten",
                                    "labels-overwritten"])
def test_a_damaged_complete_cache_is_a_clear_error(tmp_path, digits, damage):
    from inca.errors import CacheError

    bb = make_backbone("module", tmp_path)
    out = tmp_path / "cache"
    extract_to_cache(bb, digits, out, batch_size=8, shard_size=16, progress=False)
    shard = out / "shards" / "00001"
    tokens = next(p for p in shard.glob("*.npy") if p.name != "labels.npy")
    if damage == "labels-deleted":
        (shard / "labels.npy").unlink()
    elif damage == "tokens-cut":
        tokens.write_bytes(tokens.read_bytes()[: tokens.stat().st_size // 2])
    else:
        f = shard / "labels.npy" if damage == "labels-overwritten" else tokens
        size = f.stat().st_size
        overwrite_inside(f)
        assert f.stat().st_size == size and np.load(f).shape  # still loads: only a checksum
    what = "does not match the checksum" if "overwritten" in damage else "missing or cut short"
    with pytest.raises(CacheError, match=rf"is damaged: shards/00001/.*{what}.* delete the folder"):
        cache = extract_to_cache(bb, digits, out, batch_size=8, shard_size=16, progress=False)
        for layer in cache.layers:
            cache.load(layer)


def test_serve_refuses_a_port_in_use_clearly():
    import socket

    from inca.cli.predict import _check_port
    from inca.errors import InCAError

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(InCAError, match=r"another program uses that port; choose another"):
            _check_port("127.0.0.1", s.getsockname()[1])


def test_extract_over_a_complete_but_damaged_cache_says_so(tmp_path, monkeypatch):
    """``inca extract`` run again over a complete cache checks every array (the attack's
    L10: it said "complete" over a damaged one); a cache it has just written is not read
    back."""
    from tiny import save_tiny_hf_vit
    from typer.testing import CliRunner

    from inca.cli import app
    from inca.features.cache import ActivationCache

    verified = []
    real_verify = ActivationCache.verify
    monkeypatch.setattr(ActivationCache, "verify",
                        lambda self: verified.append(self.path) or real_verify(self))
    root = _folder(tmp_path / "data")
    vit = save_tiny_hf_vit(tmp_path / "vit")
    args = ["extract", "--backbone", f"hf:{vit}", "--data", str(root), "--out",
            str(tmp_path / "cache"), "--num-workers", "0"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0 and "checksummed as written" in res.output, res.output
    assert verified == []  # written now: not read back
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0 and "arrays match the checksums" in res.output, res.output
    assert len(verified) == 1  # found complete: checked
    layer = next(p for p in (tmp_path / "cache" / "shards").rglob("*.npy")
                 if p.name != "labels.npy")
    overwrite_inside(layer)
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, res.output
    assert "does not match the checksum" in res.output and "Traceback" not in res.output
