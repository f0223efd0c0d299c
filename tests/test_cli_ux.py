"""The command line as a new user meets it: --version, every option checked before any
expensive work, close-match suggestions, --overwrite, --checkpoint, the disk-space check."""

from __future__ import annotations

import dataclasses
import json
import shutil
import warnings
from types import SimpleNamespace

import pytest
import torch
from tiny import SIZE, make_backbone
from typer.testing import CliRunner

import inca
from inca.baselines.compare import CompareConfig
from inca.cli import app
from inca.errors import CacheError, InCAError, StorageError
from inca.runtime.config import ServerConfig
from inca.training.config import FitConfig


def run(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if a backbone is created or data is loaded: options must be refused
    before either."""
    import inca.backbones
    import inca.data

    def boom(*a, **k):
        raise AssertionError("expensive work started before the options were checked")

    monkeypatch.setattr(inca.backbones, "create_backbone", boom)
    monkeypatch.setattr(inca.data, "load_dataset", boom)


def test_version():
    res = run("--version")
    assert res.exit_code == 0 and res.output.strip() == f"inca {inca.__version__}"


@pytest.mark.parametrize("option, message", [
    (["--kinds", "inca,inka"], "unknown --kinds kind 'inka' (did you mean 'inca'?)"),
    (["--kinds", "linear:big"], "needs its settings"),
    (["--lrs", "fast"], "expected comma-separated numbers"),
    (["--lrs", "0"], "lrs must be positive"),
    (["--adapter-options", "{oops"], "not valid JSON"),
    (["--adapter-options", '{"inca": {"num_querys": 4}}'], "not settings of 'inca'"),
    (["--mode", "fast"], "mode must be"),
    (["--precision", "fp8"], "precision must be one of"),
    (["--backbone-dtype", "int8"], "unknown --backbone-dtype"),
    (["--select-by", "luck"], "select_by must be"),
    (["--epochs", "0"], "epochs must be at least 1"),
    (["--limit", "0"], "--limit must be at least 1"),
    (["--input-size", "0"], "--input-size must be positive"),
    (["--checkpoint", "/no/such/weights.pth"], "no such file"),
    (["--data", "fashion_mnist"], "did you mean 'fashion-mnist'"),
    (["--val-data", "digit"], "did you mean 'digits'"),
])
def test_fit_checks_options_before_any_work(tmp_path, no_work, option, message):
    args = ["fit", "--backbone", "timm:resnet10t", "--data", "digits", "--out", tmp_path / "r"]
    if option[0] == "--data":
        args = args[:3] + args[5:]
    res = run(*args, *option)
    assert res.exit_code == 2, res.output
    assert message in res.output


@pytest.mark.parametrize("option, message", [
    (["--dtype", "float8"], "unknown --dtype 'float8'"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--token-grid", "0"], "--token-grid must be at least 1"),
    (["--checkpoint", "/no/such/weights.pth"], "no such file"),
    (["--precision", "fp8"], "precision must be one of"),
    (["--data", "fashion_mnist"], "did you mean 'fashion-mnist'"),
])
def test_extract_checks_options_before_any_work(tmp_path, no_work, option, message):
    args = ["extract", "--backbone", "timm:resnet10t", "--data", "digits", "--out", tmp_path]
    if option[0] == "--data":
        args = args[:3] + args[5:]
    res = run(*args, *option)
    assert res.exit_code == 2, res.output
    assert message in res.output


def test_compare_checks_methods_before_any_work(tmp_path, no_work):
    res = run("compare", "--backbone", "timm:resnet10t", "--data", "digits", "--out", tmp_path,
              "--methods", "full,lorra")
    assert res.exit_code == 2 and "unknown method 'lorra' (did you mean 'lora'?)" in res.output


def test_unknown_backbone_suggests_the_close_match(tmp_path):
    res = run("extract", "--backbone", "dinov2_vits16", "--data", "digits", "--limit", "10",
              "--out", tmp_path)
    assert res.exit_code == 2 and "did you mean 'dinov2_vits14'" in res.output


def test_a_failed_fit_leaves_no_empty_run_folder(tmp_path):
    (tmp_path / "kept").mkdir()  # a folder the user made is theirs: kept, even empty
    for out in (tmp_path / "new", tmp_path / "kept"):
        res = run("fit", "--backbone", "dinov2_vits16", "--data", "digits", "--limit", "10",
                  "--out", out)
        assert res.exit_code == 2 and "did you mean" in res.output
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        "kept"]


def test_checkpoint_option_on_every_command_that_builds_a_backbone():
    for command in ("extract", "fit", "compare"):
        assert "--checkpoint" in run(command, "--help").output, command


# -- a default lives in the config only --------------------------------------------------

FIT_OPTIONS = {"layers", "kinds", "adapter_options", "lrs", "epochs", "batch_size",
               "val_fraction", "mode", "augment", "cache_budget_gb", "ensemble_k",
               "select_by", "soup", "token_grid", "seed", "patience", "precision"}
COMPARE_OPTIONS = {"methods", "epochs", "limit", "test_limit", "seeds", "expensive_seeds",
                   "batch_size", "lrs", "input_size", "token_grid", "equal_time",
                   "time_fraction", "max_epochs", "pretrained", "device", "precision"}


@pytest.mark.parametrize("command, config_class, options", [
    ("fit", FitConfig, FIT_OPTIONS), ("compare", CompareConfig, COMPARE_OPTIONS)])
def test_every_cli_default_is_the_configs_default(command, config_class, options):
    from typer.main import get_command

    from inca.cli._options import floats, names, parse_adapter_options

    fields = {f.name: f for f in dataclasses.fields(config_class)}
    cli = {p.name: p.default for p in get_command(app).commands[command].params
           if not p.required}
    assert set(cli) & set(fields) == options  # every option restating a field is checked
    for name in options:
        f = fields[name]
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        value = cli[name]
        if name == "adapter_options":
            value = parse_adapter_options(value)
        elif name == "lrs":
            value = floats(value)
        elif isinstance(default, tuple):
            value = names(value)
        assert value == default, f"inca {command} --{name.replace('_', '-')}"


def test_default_options_build_the_default_configs(tmp_path, monkeypatch):
    from inca.cli import compare as compare_cli
    from inca.cli import fit as fit_cli

    built = []

    def capture(*args, **kwargs):
        built.extend(a for a in args if isinstance(a, (FitConfig, CompareConfig)))
        raise InCAError("captured")

    monkeypatch.setattr(fit_cli, "_fit_into", capture)
    monkeypatch.setattr(compare_cli, "run_compare", capture)
    for command in ("fit", "compare"):
        res = run(command, "--backbone", "timm:resnet10t", "--data", "digits", "--out",
                  tmp_path / command)
        assert res.exit_code == 2 and "captured" in res.output, res.output
    assert built == [FitConfig(), CompareConfig(backbone="timm:resnet10t", data="digits")]


@pytest.fixture
def captured_serve(monkeypatch):
    """The ServerConfig ``inca serve`` builds, no model loaded and no server started."""
    pytest.importorskip("fastapi")
    import inca.runtime.server as server
    from inca.cli import predict as predict_cli

    built = []

    def capture(_model, config):
        built.append(config)
        raise InCAError("captured")

    monkeypatch.delenv("INCA_API_KEY", raising=False)
    monkeypatch.setattr(predict_cli, "_model", lambda *a, **k: SimpleNamespace(tasks={"t": 0}))
    monkeypatch.setattr(predict_cli, "_check_port", lambda *a: None)
    monkeypatch.setattr(server, "create_app", capture)
    return built


def test_serve_defaults_build_the_default_server_config(tmp_path, captured_serve):
    # serve's options (some in other units: MB, megapixels) take their defaults from
    # ServerConfig: with none given it builds ServerConfig() itself
    res = run("serve", "--task", tmp_path)
    assert "captured" in res.output, res.output
    assert captured_serve == [ServerConfig()]


def test_serve_config_file_sets_options_and_fields_that_options_override(tmp_path,
                                                                        captured_serve):
    path = tmp_path / "serve.json"
    path.write_text(json.dumps({"max_batch": 8, "cheap_pixels": 5, "max_upload_bytes": 1000,
                                "header_timeout_s": 3.0, "max_image_megapixels": 2}))
    res = run("serve", "--config", path, "--task", tmp_path, "--header-timeout", "7",
              "--max-batch", "16")
    assert "captured" in res.output, res.output
    # options given win (max_batch 16, header_timeout 7); the file's option (megapixels)
    # and fields (cheap_pixels, max_upload_bytes) set the rest
    assert captured_serve == [ServerConfig(max_batch=16, cheap_pixels=5, max_upload_bytes=1000,
                                           header_timeout_s=7.0, max_image_pixels=2_000_000)]
    path.write_text('{"max_batchh": 8}')
    res = run("serve", "--config", path, "--task", tmp_path)
    assert res.exit_code == 2 and "did you mean 'max_batch'" in res.output


# -- fit --overwrite ---------------------------------------------------------------------


def test_fit_refuses_to_replace_a_task_unless_overwrite(tmp_path, monkeypatch):
    import inca.backbones

    (tmp_path / "task").mkdir()
    (tmp_path / "task" / "task.json").write_text("{}")
    args = ["fit", "--backbone", "timm:resnet10t", "--data", "digits", "--limit", "20",
            "--test-limit", "0", "--out", tmp_path]

    def reached(*a, **k):
        raise InCAError("reached the backbone")

    monkeypatch.setattr(inca.backbones, "create_backbone", reached)
    # a run killed before its report was written: the same command completes it
    res = run(*args)
    assert res.exit_code == 2 and "reached the backbone" in res.output
    (tmp_path / "report.json").write_text("{}")  # a finished run: refused
    res = run(*args)
    assert res.exit_code == 2
    assert "already holds a fitted task" in res.output and "--overwrite" in res.output
    res = run(*args, "--overwrite")
    assert res.exit_code == 2 and "reached the backbone" in res.output


def test_overwrite_replaces_a_cache_made_differently_and_nothing_else(tmp_path):
    from inca.cli.fit import _fit_replacing
    from inca.errors import CacheMismatchError

    root = tmp_path / "cache"
    (root / "train").mkdir(parents=True)
    calls = []

    def fit_once():
        calls.append(root.exists())
        if len(calls) == 1:
            raise CacheMismatchError(f"{root / 'train'} holds a cache made differently: ...")
        return "task"

    with pytest.raises(CacheError):  # without --overwrite: refused, the cache kept
        _fit_replacing(fit_once, root, overwrite=False)
    assert root.exists()
    calls.clear()
    assert _fit_replacing(fit_once, root, overwrite=True) == "task"
    assert calls == [True, False]  # removed, then fitted again

    def other_error():  # decided by the error's kind, never by words in its message
        raise CacheError("layer x produced non-finite activations (the cache was made "
                         "differently, maybe)")

    with pytest.raises(CacheError, match="non-finite"):  # not a mismatch: never deleted
        (root / "train").mkdir(parents=True)
        _fit_replacing(other_error, root, overwrite=True)
    assert root.exists()


# -- extract --checkpoint, end to end ------------------------------------------------------


def test_extract_with_a_local_checkpoint(tmp_path):
    import timm

    torch.manual_seed(3)
    src = timm.create_model("resnet10t", pretrained=False)  # with its classifier
    ckpt = tmp_path / "resnet10t.pth"
    torch.save(src.state_dict(), ckpt)
    res = run("extract", "--backbone", "timm:resnet10t", "--checkpoint", ckpt, "--data",
              "digits", "--limit", "20", "--input-size", SIZE, "--layers", "last",
              "--out", tmp_path / "cache", "--num-workers", "0")
    assert res.exit_code == 0, res.output
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    want = inca.create_backbone("timm:resnet10t", checkpoint_path=str(ckpt), input_size=SIZE)
    assert manifest["fingerprint"] == want.fingerprint()


# -- the cache's size against the free disk ------------------------------------------------


def _tiny_data():
    from inca.data import load_dataset

    return load_dataset("digits", limit=20)


def test_extraction_refused_when_the_cache_cannot_fit(tmp_path, monkeypatch):
    from inca.features import extract_to_cache

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=1000))
    bb = make_backbone("module", tmp_path)
    with pytest.raises(StorageError) as e:
        extract_to_cache(bb, _tiny_data(), tmp_path / "cache", progress=False, num_workers=0)
    text = str(e.value)
    for part in ("KiB per image x 20 images", "1000 B free", "--token-grid", "--layers",
                 "another folder"):
        assert part in text, part
    assert not (tmp_path / "cache" / "manifest.json").exists()  # refused before writing


def test_large_cache_warns_and_resume_counts_what_is_left(tmp_path, monkeypatch):
    import inca.features.extract as ex

    bb, data = make_backbone("module", tmp_path), _tiny_data()
    monkeypatch.setattr(ex, "LARGE_CACHE_BYTES", 0)
    with pytest.warns(UserWarning, match=r"the cache would take .* x 20 images"):
        cache = ex.extract_to_cache(bb, data, tmp_path / "c", progress=False, num_workers=0,
                                    shard_size=8)
    assert len(cache) == 20
    with warnings.catch_warnings():  # complete: nothing to write, nothing to warn about
        warnings.simplefilter("error")
        ex.extract_to_cache(bb, data, tmp_path / "c", progress=False, num_workers=0,
                            shard_size=8)
    monkeypatch.setattr(ex, "LARGE_CACHE_BYTES", 2**40)
    wanted = ex._wanted_manifest(bb, data, bb.layers, None, "float16", 8)
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert ex.check_disk_space(tmp_path / "c", wanted) == 0
    # an interrupted extraction: only the shards not yet recorded count
    manifest.update(complete=False, shards=manifest["shards"][:1])
    (tmp_path / "c" / "manifest.json").write_text(json.dumps(manifest))
    shutil.rmtree(tmp_path / "c" / "shards" / "00001")
    shutil.rmtree(tmp_path / "c" / "shards" / "00002")
    assert ex.check_disk_space(tmp_path / "c", wanted) == 12 * wanted["bytes_per_sample"]


def test_extract_cli_refuses_a_cache_too_large(tmp_path, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=1000))
    res = run("extract", "--backbone", "timm:resnet10t", "--no-pretrained", "--data", "digits",
              "--limit", "10", "--input-size", SIZE, "--out", tmp_path / "cache")
    assert res.exit_code == 2 and "the cache would take" in res.output
    assert "--token-grid" in res.output


def test_library_bars_hidden_after_a_partial_hub_import():
    """``from huggingface_hub import constants`` (loading a task's backbone offline) leaves
    huggingface_hub in sys.modules without its lazily loaded ``utils``: every in-process
    fit or extract after it failed with 'No huggingface_hub attribute utils'."""
    import subprocess
    import sys

    code = ("import sys\nfrom huggingface_hub import constants\n"
            "assert 'huggingface_hub.utils' not in sys.modules\n"
            "from inca._progress import hide_library_bars\nhide_library_bars(quiet=True)\n"
            "from huggingface_hub.utils import are_progress_bars_disabled\n"
            "assert are_progress_bars_disabled()\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
