"""Portable tasks and the public API: the backbone's record, --backbone, the Hugging Face
conventions (offline), file modes, real signatures, the saved report, NumPy outputs and
``task.to_module()`` (autograd, torch.export, ONNX)."""

from __future__ import annotations

import hashlib
import importlib.resources
import inspect
import json
import os
import shutil
import stat
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from planted import planted_backbone, planted_data
from tiny import CLASSES, SIZE, images, make_backbone, random_task, save_tiny_hf_vit

import inca
import inca.backbones
from inca._files import atomic_write_bytes
from inca.backbones.dinov2 import DinoV2Backbone, DinoV2ViT
from inca.runtime import MultiTaskModel
from inca.task import (
    TASK_CARD,
    TASK_JSON,
    TASK_REPORT,
    TASK_WEIGHTS,
    FitReport,
    Task,
    TaskError,
    TaskModule,
    load_task,
)


def spy_creation(monkeypatch) -> list[tuple[str, dict[str, Any], bool]]:
    """Record every backbone creation (spec, arguments, hub offline) and let it happen."""
    from huggingface_hub import constants

    calls: list[tuple[str, dict[str, Any], bool]] = []
    real = inca.backbones.create_backbone

    def create(spec: str, **kwargs: Any):
        calls.append((spec, kwargs, constants.HF_HUB_OFFLINE))
        return real(spec, **kwargs)

    monkeypatch.setattr(inca.backbones, "create_backbone", create)
    return calls


# -- the backbone's record ----------------------------------------------------------------
def test_local_folder_is_recorded_absolute_and_rebuilt_from_anywhere_offline(tmp_path,
                                                                          monkeypatch):
    save_tiny_hf_vit(tmp_path / "models" / "vit")
    monkeypatch.chdir(tmp_path / "models")
    bb = inca.create_backbone("hf:vit")  # a relative path
    source = bb.describe()["source"]
    assert source["spec"] == f"hf:{tmp_path / 'models' / 'vit'}"
    assert source["pretrained"] is True and source["offline"] is True
    assert source["hub_id"] is None and source["revision"] is None
    task = random_task(bb)
    folder = task.save(tmp_path / "task")
    monkeypatch.chdir(tmp_path / "task")  # another working folder
    calls = spy_creation(monkeypatch)
    loaded = load_task(folder, device="cpu", precision="32")
    assert calls == [(source["spec"], {"device": torch.device("cpu"), "dtype": None,
                                       "pretrained": True}, True)]  # hub offline meanwhile
    torch.testing.assert_close(loaded.predict_proba(images()), task.predict_proba(images()))


def test_checkpoint_and_no_pretrained_are_recorded_and_rebuilt(tmp_path, monkeypatch):
    import timm

    arch = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2, img_size=SIZE)
    torch.manual_seed(3)
    torch.save(timm.create_model("vit_tiny_patch16_224", num_classes=0, **arch).state_dict(),
               tmp_path / "weights.pth")
    monkeypatch.chdir(tmp_path)
    kwargs = dict(input_size=SIZE, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    bb = inca.create_backbone("timm:vit_tiny_patch16_224", pretrained=False,
                              checkpoint_path="weights.pth", **kwargs)
    source = bb.describe()["source"]
    assert source["checkpoint_path"] == str(tmp_path / "weights.pth")
    assert source["pretrained"] is False and source["offline"] is True
    assert source["kwargs"] == {**kwargs, "pretrained": False,
                                "checkpoint_path": str(tmp_path / "weights.pth")}
    folder = random_task(bb).save(tmp_path / "task")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    calls = spy_creation(monkeypatch)
    loaded = load_task(folder, device="cpu")  # the same weights: the fingerprint agrees
    assert calls[0][0] == "timm:vit_tiny_patch16_224" and calls[0][2] is True
    assert loaded.backbone.fingerprint() == bb.fingerprint()
    # the checkpoint gone: said clearly, before anything is created
    os.rename(tmp_path / "weights.pth", tmp_path / "moved.pth")
    with pytest.raises(TaskError, match=r"weights.pth, which does not exist on this machine"):
        load_task(folder)
    assert len(calls) == 1
    assert load_task(folder, checkpoint_path=str(tmp_path / "moved.pth")).classes == CLASSES


@pytest.mark.parametrize("spec,kwargs", [
    ("timm:vit_tiny_patch16_224", dict(input_size=SIZE, patch_size=8, embed_dim=32, depth=2,
                                       num_heads=2)),
    ("torchvision:mobilenet_v3_small", {}),
    ("hf", {}),  # a local folder's architecture (its config), built at random
])
def test_a_task_on_random_weights_loads_again(tmp_path, spec, kwargs):
    """--no-pretrained weights are drawn from a fixed seed: rebuilt in another random
    state (another process), they are the same, so the task loads (it was refused with
    "trained on 'X' and does not fit 'X'")."""
    if spec == "hf":
        spec = f"hf:{save_tiny_hf_vit(tmp_path / 'vit')}"
    torch.manual_seed(11)
    bb = inca.create_backbone(spec, pretrained=False, **kwargs)
    state = torch.random.get_rng_state()
    torch.manual_seed(12)
    assert inca.create_backbone(spec, pretrained=False, **kwargs).fingerprint() == \
        bb.fingerprint()
    folder = random_task(bb).save(tmp_path / "task")
    torch.manual_seed(13)
    assert load_task(folder, device="cpu").backbone.fingerprint() == bb.fingerprint()
    torch.manual_seed(11)
    inca.create_backbone(spec, pretrained=False, **kwargs)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's stream untouched


def test_old_task_json_and_unrebuildable_backbones(tmp_path, monkeypatch):
    bb = planted_backbone()  # from_module: nothing records how to build it again
    assert "source" not in bb.describe()
    folder = random_task(bb).save(tmp_path / "task")
    with pytest.raises(TaskError, match=r"cannot create its backbone 'planted'.*Pass the "
                                        r"backbone it was trained on"):
        load_task(folder)
    assert load_task(folder, bb).classes == CLASSES
    # a format-2 task.json (before sources and reports) still loads, by name as before
    meta = json.loads((folder / TASK_JSON).read_text())
    meta["format_version"] = 2
    (folder / TASK_JSON).write_text(json.dumps(meta))
    created = []
    monkeypatch.setattr(inca.backbones, "create_backbone",
                        lambda spec, **kw: created.append((spec, kw["input_size"])) or bb)
    assert load_task(folder).classes == CLASSES and created == [("planted", 16)]


def test_a_task_file_cannot_make_backbone_creation_run_hub_code(tmp_path, monkeypatch):
    bb = make_backbone("timm-cnn", tmp_path)
    folder = random_task(bb, two=False).save(tmp_path / "task")
    meta = json.loads((folder / TASK_JSON).read_text())
    meta["backbone"]["source"]["kwargs"]["trust_remote_code"] = True
    (folder / TASK_JSON).write_text(json.dumps(meta))
    monkeypatch.setattr(inca.backbones, "create_backbone",
                        lambda *a, **k: pytest.fail("a backbone was created"))
    with pytest.raises(TaskError, match=r"trust_remote_code.*would run code from the hub"):
        load_task(folder)


def test_cli_predict_and_serve_take_a_backbone_override(tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file
    from typer.testing import CliRunner

    from inca.cli import app

    bb = inca.create_backbone(f"hf:{save_tiny_hf_vit(tmp_path / 'a')}")
    folder = random_task(bb).save(tmp_path / "task")
    img = tmp_path / "x.png"
    from PIL import Image

    Image.fromarray(images(1)[0].permute(1, 2, 0).numpy()).save(img)
    os.rename(tmp_path / "a", tmp_path / "b")  # the weights moved
    run = CliRunner().invoke
    res = run(app, ["predict", "--task", str(folder), str(img)])
    assert res.exit_code == 2 and "does not exist on this machine" in res.output, res.output
    res = run(app, ["predict", "--task", str(folder), str(img), "--backbone",
                    f"hf:{tmp_path / 'b'}", "--device", "cpu"])
    assert res.exit_code == 0 and "x.png: " in res.output, res.output
    shutil.copytree(tmp_path / "b", tmp_path / "c")  # other weights
    weights = load_file(tmp_path / "c" / "model.safetensors")
    name = next(iter(weights))
    weights[name] = weights[name] + 1
    save_file(weights, tmp_path / "c" / "model.safetensors", metadata={"format": "pt"})
    res = run(app, ["predict", "--task", str(folder), str(img), "--backbone",
                    f"hf:{tmp_path / 'c'}"])
    assert res.exit_code == 2 and "does not fit" in res.output and "fingerprint" in res.output
    import inca.runtime.transport as transport

    served = []
    monkeypatch.setattr(transport, "serve", lambda app_, **kw: served.append(app_))
    res = run(app, ["serve", "--task", str(folder), "--backbone", f"hf:{tmp_path / 'b'}",
                    "--device", "cpu", "--port", "0"])  # any free port: nothing listens
    assert res.exit_code == 0 and len(served) == 1, res.output


# -- Hugging Face conventions ---------------------------------------------------------------
@pytest.fixture(scope="module")
def fitted():
    bb = planted_backbone()
    task = inca.fit(bb, planted_data(96, 0), test=planted_data(40, 1), layers=["stem", "block1"],
                    kinds=("linear",), lrs=(1e-2,), epochs=2, progress=False)
    return bb, task


def test_report_is_saved_with_the_task_and_reloaded(fitted, tmp_path):
    bb, task = fitted
    folder = task.save(tmp_path / "task")
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [TASK_CARD, TASK_JSON, TASK_REPORT, TASK_WEIGHTS])
    loaded = load_task(folder, bb)
    assert isinstance(loaded.report, FitReport)
    assert loaded.report.to_markdown() == task.report.to_markdown()
    table = loaded.report.to_pandas()
    assert list(table["key"]) == [r["key"] for r in task.report.rows]
    assert {"layers", "lr", "val_accuracy", "val_loss", "test_accuracy", "chosen"} <= set(
        table.columns)
    assert table["chosen"].sum() == len(task.report.chosen_members)
    # NaN (a diverged loss), saved as null, comes back as NaN: the report still renders
    report = json.loads((folder / TASK_REPORT).read_text())
    report["rows"][0].update(val_loss=None, test_accuracy=None)
    report["linear_probe"]["val_loss"] = None
    text = json.dumps(report).encode()
    (folder / TASK_REPORT).write_bytes(text)
    meta = json.loads((folder / TASK_JSON).read_text())
    meta["report_sha256"] = hashlib.sha256(text).hexdigest()
    (folder / TASK_JSON).write_text(json.dumps(meta))
    nan_loaded = load_task(folder, bb)
    assert np.isnan(nan_loaded.report.to_pandas()["val_loss"][0])
    assert "| nan |" in nan_loaded.report.to_markdown()
    nan_loaded.save(tmp_path / "again")  # its model card renders the report too
    # a report from another save is refused; a task copied without its report loads
    report["chosen"] = "edited"
    (folder / TASK_REPORT).write_text(json.dumps(report))
    with pytest.raises(TaskError, match="report.json: its sha256 differs"):
        load_task(folder, bb)
    (folder / TASK_REPORT).unlink()
    assert load_task(folder, bb).report is None


def test_to_pandas_says_how_to_install_pandas(fitted, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ModuleNotFoundError, match="pip install pandas") as missing:
        fitted[1].report.to_pandas()
    assert missing.value.name == "pandas"  # what tools that offer to install it read


def test_save_pretrained_from_pretrained_push_to_hub(fitted, tmp_path, monkeypatch):
    import huggingface_hub

    bb, task = fitted
    assert Task.save_pretrained is Task.save  # one writer
    folder = task.save_pretrained(tmp_path / "local")
    card = (folder / TASK_CARD).read_text()
    front, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    assert "library_name: inca" in front and "- image-classification" in front
    assert "metrics:\n- accuracy" in front
    assert "`planted`" in body and "c0" in body and "m0" not in body
    for key in task.keys:
        assert key in body
    assert f"{task.metrics['val_accuracy']:.4f}" in body and "test accuracy" in body
    assert "## Fit report" in body and "| adapter | val acc |" in body
    assert Task.from_pretrained(folder, bb).classes == task.classes  # a local folder
    # the hub's model-index carries each tested candidate's accuracy; no license is claimed
    # unless the user states one, and the card says how
    import yaml

    meta = yaml.safe_load(front)
    tested = {k: v for k, v in task.metrics["test_accuracy"].items() if v is not None}
    assert tested and {m["name"]: m["value"] for m in meta["model-index"][0]["results"][0][
        "metrics"]} == pytest.approx({f"test accuracy ({k})": v for k, v in tested.items()},
                                     rel=1e-5)
    assert "license" not in meta and "set `task.license`" in body
    task.license = "cc-by-nc-4.0"
    folder = task.save_pretrained(tmp_path / "licensed")
    assert yaml.safe_load((folder / TASK_CARD).read_text().split("---\n")[1])[
        "license"] == "cc-by-nc-4.0"
    assert load_task(folder, bb).license == "cc-by-nc-4.0"  # kept in task.json
    task.license = "Apache 2.0\nevil: 1"
    with pytest.raises(TaskError, match="license must be a license identifier"):
        task.save(tmp_path / "bad")
    task.license = None

    hub = tmp_path / "hub"
    calls: list[tuple[str, Any]] = []

    def create_repo(self, repo_id, **kw):
        calls.append(("create_repo", repo_id))

    def upload_folder(self, *, repo_id, folder_path, **kw):
        calls.append(("upload_folder", sorted(kw["allow_patterns"])))
        shutil.copytree(folder_path, hub / repo_id, dirs_exist_ok=True)
        return "commit-info"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    assert task.push_to_hub("me/planted-task", token="t0k") == "commit-info"
    assert calls[0] == ("create_repo", "me/planted-task") and calls[1][0] == "upload_folder"
    assert sorted(p.name for p in (hub / "me" / "planted-task").iterdir()) == sorted(
        [TASK_CARD, TASK_JSON, TASK_REPORT, TASK_WEIGHTS])

    def snapshot_download(repo_id, **kw):
        calls.append(("snapshot_download", repo_id, kw["revision"]))
        return str(hub / repo_id)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    loaded = Task.from_pretrained("me/planted-task", bb, revision="main")
    assert calls[-1] == ("snapshot_download", "me/planted-task", "main")
    assert loaded.report.chosen == task.report.chosen
    torch.testing.assert_close(loaded.predict_proba(images(3)), task.predict_proba(images(3)))

    def offline(repo_id, **kw):
        raise huggingface_hub.errors.LocalEntryNotFoundError("offline, not in the cache")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(TaskError, match="not a folder here, and downloading it.*offline"):
        Task.from_pretrained("me/other-task")
    with pytest.raises(TaskError, match="is not a task folder"):
        Task.from_pretrained(tmp_path / "nothing")  # a path: never the hub


def test_push_and_download_pass_every_option_to_the_hub(fitted, tmp_path, monkeypatch):
    """What the user asks for reaches huggingface_hub: the token, privacy, branch, commit
    message and pull request on upload; the revision, token and cache folder on download;
    a refusal is one line naming its first cause."""
    import huggingface_hub

    from inca._version import __version__

    _, task = fitted
    seen: dict[str, Any] = {}

    class Api:
        def __init__(self, **kw):
            seen["api"] = kw

        def create_repo(self, repo_id, **kw):
            seen["repo"] = (repo_id, kw)

        def create_branch(self, repo_id, **kw):
            seen["branch"] = (repo_id, kw)

        def upload_folder(self, **kw):
            seen["upload"] = {**kw, "files": sorted(p.name for p in kw["folder_path"].iterdir())}
            if kw["commit_message"] == "fail":
                raise OSError("403 Forbidden\nmore detail")
            return "commit"

    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    assert task.push_to_hub("me/t", token="t0k", private=True, revision="v2",
                            commit_message="first", create_pr=True) == "commit"
    assert seen["api"] == {"token": "t0k", "library_name": "inca",
                           "library_version": __version__}
    assert seen["repo"] == ("me/t", {"private": True, "exist_ok": True})
    assert seen["branch"] == ("me/t", {"branch": "v2", "exist_ok": True})
    upload = seen["upload"]
    assert (upload["repo_id"], upload["commit_message"], upload["revision"],
            upload["create_pr"]) == ("me/t", "first", "v2", True)
    assert upload["files"] == sorted([TASK_CARD, TASK_JSON, TASK_REPORT, TASK_WEIGHTS])
    assert sorted(upload["allow_patterns"]) == sorted(upload["delete_patterns"]) == upload[
        "files"]
    seen.clear()
    task.push_to_hub("me/t")
    assert "branch" not in seen and seen["upload"]["revision"] is None
    with pytest.raises(TaskError, match=r"repo 'me/t' failed \(403 Forbidden\); check"):
        task.push_to_hub("me/t", commit_message="fail")

    def snapshot_download(repo_id, **kw):
        seen["download"] = (repo_id, kw)
        raise OSError()

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    with pytest.raises(TaskError, match=r"downloading it as a Hugging Face hub repo failed "
                                        r"\(OSError\)"):
        Task.from_pretrained("me/t", revision="r1", token="t0k", cache_dir=tmp_path / "hf")
    repo, kw = seen["download"]
    assert (repo, kw["revision"], kw["token"], kw["cache_dir"]) == (
        "me/t", "r1", "t0k", tmp_path / "hf")
    assert kw["library_version"] == __version__


def test_a_push_uploads_a_temporary_copy_and_a_download_names_inca(tmp_path, monkeypatch):
    """The upload is of a temporary copy named as inca's (``inca-push-*``: what a kill
    may leave behind), removed after; a download tells the hub it is inca's. Kills hub
    push_task mutant 16 and task_folder mutant 24 (each planted and seen to fail)."""
    import huggingface_hub

    uploaded, downloads = [], []

    class Api:
        def __init__(self, **kw):
            pass

        def create_repo(self, repo_id, **kw):
            pass

        def upload_folder(self, *, folder_path, **kw):
            uploaded.append((folder_path, sorted(p.name for p in folder_path.iterdir())))

    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo_id, **kw: downloads.append(kw) or str(tmp_path))
    task = random_task(planted_backbone())
    task.push_to_hub("me/t")
    ((folder, files),) = uploaded
    assert folder.parent.name.startswith("inca-push-") and not folder.parent.exists()
    assert files == sorted([TASK_CARD, TASK_JSON, TASK_WEIGHTS])
    with pytest.raises(TaskError, match="is not a task folder"):  # nothing was downloaded
        Task.from_pretrained("me/t")
    assert downloads[0]["library_name"] == "inca"


def test_a_folder_here_or_a_path_is_never_taken_for_a_hub_repo(tmp_path, monkeypatch):
    """``org/name`` is a hub repo only when no such folder is here and it does not look
    like a path (``./x/y``, ``/x``, ``~/x``)."""
    import huggingface_hub

    from inca.task.hub import task_folder

    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo_id, **kw: pytest.fail(f"downloaded {repo_id}"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "me" / "t").mkdir(parents=True)
    assert task_folder("me/t") == Path("me/t")  # a folder here
    assert task_folder("./you/t") == Path("you/t")  # a path, though missing
    assert task_folder(Path("you/t")) == Path("you/t")


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_files_get_ordinary_modes(fitted, tmp_path, umask):
    old = os.umask(umask)
    try:
        folder = fitted[1].save(tmp_path / "task")
        atomic_write_bytes(tmp_path / "plain.txt", b"x")
    finally:
        os.umask(old)
    want = 0o666 & ~umask
    for f in [*folder.iterdir(), tmp_path / "plain.txt"]:
        assert stat.S_IMODE(f.stat().st_mode) == want, f
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask


# -- the Python API ------------------------------------------------------------------------
def test_real_signatures_and_py_typed():
    import inca.runtime
    import inca.training

    assert inca.fit is inca.training.fit and inca.load_task is inca.runtime.load_task
    assert list(inspect.signature(inca.fit).parameters)[:3] == ["backbone", "train", "val"]
    assert list(inspect.signature(inca.load_task).parameters)[:2] == ["path", "backbone"]
    assert "Load a task folder" in inca.load_task.__doc__
    assert inca.Task is Task and inca.TaskModule is TaskModule
    assert {"fit", "load_task", "Task"} <= set(dir(inca))
    with pytest.raises(AttributeError):
        inca.no_such_thing  # noqa: B018
    assert importlib.resources.files("inca").joinpath("py.typed").is_file()


def test_numpy_outputs(fitted):
    bb, task = fitted
    x = images(5)
    proba = task.predict_proba(x, numpy=True)
    assert isinstance(proba, np.ndarray) and proba.dtype == np.float32 and proba.shape == (5, 4)
    np.testing.assert_allclose(proba, task.predict_proba(x).numpy())
    labels = task.predict(x, numpy=True)
    assert isinstance(labels, np.ndarray) and list(labels) == task.predict(x)
    assert list(task.classes_[proba.argmax(1)]) == list(labels)
    multi = MultiTaskModel(bb, {"t": task}).predict_proba(x, numpy=True)
    np.testing.assert_allclose(multi["t"], proba, rtol=1e-5, atol=1e-6)


def test_predict_takes_one_image_or_many_in_every_common_form(fitted, tmp_path):
    """A path (not read one character at a time), a list of paths, PIL images, NumPy
    arrays (HWC, CHW, grey, float, a batch) and tensors give the same answers."""
    _, task = fitted
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (20, 24, 3), dtype=np.uint8) for _ in range(3)]
    paths = []
    for i, a in enumerate(arrays):
        paths.append(tmp_path / f"im{i}.png")
        Image.fromarray(a).save(paths[-1])
    ref = task.predict_proba([Image.fromarray(a) for a in arrays])
    same = {
        "one path": (task.predict_proba(str(paths[0])), ref[:1]),
        "one PathLike": (task.predict_proba(paths[1]), ref[1:2]),
        "list of paths": (task.predict_proba([str(p) for p in paths]), ref),
        "one PIL image": (task.predict_proba(Image.fromarray(arrays[2])), ref[2:]),
        "one HWC array": (task.predict_proba(arrays[0]), ref[:1]),
        "a batch (B, H, W, C)": (task.predict_proba(np.stack(arrays)), ref),
        "CHW arrays": (task.predict_proba([a.transpose(2, 0, 1) for a in arrays]), ref),
        "float arrays in 0..1": (task.predict_proba([a / 255.0 for a in arrays]), ref),
    }
    for what, (got, want) in same.items():
        torch.testing.assert_close(got, want, msg=what)
    grey = rng.integers(0, 256, (20, 24), dtype=np.uint8)
    torch.testing.assert_close(task.predict_proba(grey),
                               task.predict_proba(Image.fromarray(grey).convert("RGB")))
    for shape in (grey.shape + (1,), (1,) + grey.shape):  # one channel, last or first
        torch.testing.assert_close(task.predict_proba([grey.reshape(shape)]),
                                   task.predict_proba(grey), msg=str(shape))
    assert task.predict(str(paths[0])) == task.predict([paths[0]])
    with pytest.raises(TaskError, match=r"got shape \(2, 20, 24, 5\)"):
        task.predict_proba([np.zeros((2, 20, 24, 5), dtype=np.uint8)])
    with pytest.raises(TaskError) as refused:
        task.predict_proba(3)
    assert str(refused.value) == ("cannot read images from a int: pass a path, a PIL image, a "
                                  "NumPy array, a tensor, or a list of them")


# -- to_module: autograd, torch.export, ONNX ------------------------------------------------
def tiny_dinov2() -> DinoV2Backbone:
    torch.manual_seed(0)
    return DinoV2Backbone(DinoV2ViT(embed_dim=32, depth=2, num_heads=2, patch_size=8,
                                    pos_grid=4), input_size=SIZE)


@pytest.fixture(scope="module", params=["timm-vit", "timm-cnn", "module", "dinov2"])
def module_task(request, tmp_path_factory):
    source = request.param
    bb = tiny_dinov2() if source == "dinov2" else make_backbone(
        source, tmp_path_factory.mktemp(source))
    return source, random_task(bb, token_grid=2 if source == "timm-vit" else None)


def test_to_module_matches_predict_and_trains_outside_inference_mode(module_task):
    _, task = module_task
    module = task.to_module()
    pixels = images(3)
    expected = task.predict_proba(pixels)
    torch.testing.assert_close(module(pixels), expected)  # uint8 pixels
    prep = task.preprocessing
    mean, std = torch.tensor(prep.mean).view(1, 3, 1, 1), torch.tensor(prep.std).view(1, 3, 1, 1)
    x = ((pixels / 255 - mean) / std).requires_grad_()  # normalized floats, in grad mode
    probs = module(x)
    torch.testing.assert_close(probs, expected, atol=1e-5, rtol=1e-4)
    probs[:, 0].sum().backward()  # no "Inference tensors cannot be saved for backward"
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in task.backbone.parameters())  # the backbone is frozen


def test_to_module_scales_pixels_in_its_own_dtype_and_names_a_wrong_shape(tmp_path):
    """uint8 pixels are scaled and normalized in the module's dtype (float64 here: exactly
    the float64 normalization); anything but (B, 3, H, W) is refused by its shape."""
    from inca.errors import BackboneError

    module = random_task(make_backbone("module", tmp_path)).to_module().double()
    pixels = images(2)
    x = (pixels.double() / 255 - module.mean) / module.std
    assert module.mean.dtype == torch.float64 and torch.equal(module(pixels), module(x))
    with pytest.raises(BackboneError, match=r"^expected images of shape \(B, 3, H, W\), got "
                                            r"\(2, 1, 32, 32\)$"):
        module(pixels[:, :1])


def test_to_module_exports_with_torch_export(module_task):
    source, task = module_task
    module = task.to_module()
    x = torch.randn(2, 3, SIZE, SIZE)
    dynamic = ({0: torch.export.Dim("batch", max=1024)},) if source == "timm-vit" else None
    program = torch.export.export(module, (x,), dynamic_shapes=dynamic)
    torch.testing.assert_close(program.module()(x), module(x))
    if dynamic:
        x5 = torch.randn(5, 3, SIZE, SIZE)
        torch.testing.assert_close(program.module()(x5), module(x5))


def test_a_given_backbone_is_checked_then_moved_and_a_mismatch_says_what_differs(
        tmp_path, monkeypatch):
    from inca.task.backbone import check_backbone, task_backbone

    bb = make_backbone("timm-vit", tmp_path)
    info = bb.describe()
    assert task_backbone(info, bb, dtype=torch.float64) is bb  # only a dtype: still moved
    assert {p.dtype for p in bb.parameters()} == {torch.float64}
    with monkeypatch.context() as m:  # where "auto" would be a GPU, no device: it stays put
        m.setattr(torch.cuda, "is_available", lambda: True)
        assert task_backbone(info, bb, dtype=torch.float32) is bb
    assert {(p.device.type, p.dtype) for p in bb.parameters()} == {("cpu", torch.float32)}
    trained = {**info, "fingerprint": "0" * 16,
               "source": {**info["source"], "pretrained": True, "revision": "v1"}}
    with pytest.raises(TaskError) as e:
        check_backbone(trained, bb, what="task 't'")
    assert "task 't' does not fit backbone" in str(e.value)
    assert f"weights fingerprint {bb.fingerprint()} != {'0' * 16} it was trained with" in str(
        e.value)
    assert "pretrained False != True it was trained with" in str(e.value)
    assert "revision None != 'v1' it was trained with" in str(e.value)
    assert task_backbone(info, bb, device="meta") is bb  # only a device: moved too
    assert {p.device.type for p in bb.parameters()} == {"meta"}


def test_features_are_scored_without_a_backbone_and_from_pretrained_takes_a_dtype(tmp_path):
    """Features extracted elsewhere (a cache, a server's batch) are scored by a task with
    no backbone attached, on its members' device; ``from_pretrained(..., dtype=...)`` moves
    the backbone and the members. Kills model Task._precision mutant 4 and
    Task.from_pretrained mutant 20 (each planted and seen to fail)."""
    from inca.features import extract_features

    bb = planted_backbone()
    task = random_task(bb)
    x = torch.rand(3, 3, 16, 16)
    expected = task.predict_proba(x)
    feats = extract_features(bb, x, task.layers, None)
    task.backbone = None
    torch.testing.assert_close(task.proba_from_features(feats), expected)
    folder = task.save(tmp_path / "task")
    loaded = Task.from_pretrained(folder, bb, dtype=torch.float64)
    assert {p.dtype for p in [*bb.parameters(), *loaded.members.parameters()]} == {
        torch.float64}
    torch.testing.assert_close(loaded.predict_proba(x), expected, check_dtype=False)


def test_a_task_refuses_keys_that_are_not_one_per_member():
    """Keys of another count were taken, and the task then failed to save with a bare
    ``zip() argument 2 is longer than argument 1``; they are refused when given."""
    bb = planted_backbone()
    members = random_task(bb).members
    for keys in (["a"], ["a", "b", "c"]):
        with pytest.raises(TaskError) as refused:
            Task(members, [["stem"], ["block3"]], CLASSES, bb.describe(), keys=keys)
        assert str(refused.value) == (f"{len(keys)} keys were given for 2 members: give one "
                                      "key per member (or none)")
    for some, layers in ((members, [["stem"]]), ([], [])):  # layers for each, and one at least
        with pytest.raises(TaskError, match="^a task needs at least one member, each with its "
                                            "layers$"):
            Task(some, layers, CLASSES, bb.describe())
