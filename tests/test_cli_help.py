"""The command line as it reads: quick help (no torch imported), options grouped in
panels with their choices listed, --quiet, plain progress in logs, ``inca layers`` and
``--config``."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from inca.cli import app


def run(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})


# -- quick: help and version import no torch -----------------------------------------------

HELP_WITHOUT_TORCH = """
import sys
from typer.main import get_command
from typer.testing import CliRunner
import inca
assert "torch" not in sys.modules, "import inca imported torch"
from inca.cli import app
commands = sorted(get_command(app).commands)
assert {"fit", "extract", "layers", "compare", "predict", "serve"} <= set(commands)
for args in (["--help"], ["--version"], *([c, "--help"] for c in commands)):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, (args, result.output)
    assert "torch" not in sys.modules, f"inca {' '.join(args)} imported torch"
print("ok")
"""


def test_help_and_version_import_no_torch():
    out = subprocess.run([sys.executable, "-c", HELP_WITHOUT_TORCH], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


# -- options grouped in panels, choices listed ---------------------------------------------

FIT_PANELS = ["Data", "Backbone", "Adapters", "Training", "Selection", "Output", "Device"]


def _params(command: str):
    from typer.main import get_command

    return [p for p in get_command(app).commands[command].params if p.name != "help"]


@pytest.mark.parametrize("command", ["fit", "extract", "compare", "predict", "serve",
                                     "export", "add-classes", "layers"])
def test_every_option_sits_in_a_help_panel(command):
    loose = [p.name for p in _params(command)
             if p.param_type_name == "option" and not p.rich_help_panel
             and p.name != "config_file"]
    assert not loose, f"inca {command}: options outside a panel: {loose}"


def test_fit_help_shows_its_panels_in_order():
    text = run("fit", "--help").output
    at = [text.index(f"─ {panel} ") for panel in FIT_PANELS]
    assert at == sorted(at), text


@pytest.mark.parametrize("command, option, metavar", [
    ("fit", "precision", "[auto|32|bf16-mixed|16-mixed]"),
    ("fit", "select_by", "[accuracy|loss]"),
    ("fit", "mode", "[auto|cached|streaming]"),
    ("fit", "augment", "[none|crop|crop-flip]"),
    ("fit", "backbone_dtype", "[float32|bfloat16|float16]"),
    ("extract", "dtype", "[float16|float32]"),
    ("extract", "split", "[train|val|test]"),
    ("compare", "precision", "[auto|32|bf16-mixed|16-mixed]"),
    ("predict", "backbone_dtype", "[float32|bfloat16|float16]"),
])
def test_choices_are_listed_in_help(command, option, metavar):
    (param,) = [p for p in _params(command) if p.name == option]
    assert param.metavar == metavar
    assert metavar in run(command, "--help").output


def test_every_registered_adapter_kind_and_method_is_named_in_help():
    from inca._choices import ADAPTER_KINDS
    from inca.adapters import adapter_class, list_adapters
    from inca.baselines.compare_config import METHODS

    own = {a["name"] for a in list_adapters()  # not kinds another test registered
           if adapter_class(a["name"]).__module__.startswith("inca.")}
    assert own == set(ADAPTER_KINDS)
    fit_help = " ".join(run("fit", "--help").output.split())
    for kind in ADAPTER_KINDS:
        assert kind in fit_help, kind
    compare_help = " ".join(run("compare", "--help").output.split())
    assert all(m in compare_help for m in METHODS)


# -- progress: plain lines in a log, nothing with --quiet -----------------------------------


def test_extraction_progress_in_a_log_is_plain_labelled_lines(tmp_path, capsys):
    from tiny import make_backbone

    from inca.data import load_dataset
    from inca.features import extract_to_cache

    bb = make_backbone("module", tmp_path)
    extract_to_cache(bb, load_dataset("digits", limit=40), tmp_path / "c", batch_size=4,
                     num_workers=0, desc="extract train")
    err = capsys.readouterr().err  # not a terminal: no carriage-return redraws
    assert "\r" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("extract train: ")]
    assert 2 <= len(lines) <= 11 and lines[-1].startswith("extract train: 40/40 img"), err


def _fit_args(tmp_path, out: str, *more: str) -> list[str]:
    from tiny import save_tiny_hf_vit

    vit = tmp_path / "vit"
    if not vit.exists():
        save_tiny_hf_vit(vit)
    return ["fit", "--backbone", f"hf:{vit}", "--data", "digits", "--limit", "40",
            "--test-limit", "20", "--epochs", "2", "--kinds", "linear", "--layers", "last",
            "--lrs", "0.01", "--mode", "cached", "--num-workers", "0",
            "--out", str(tmp_path / out), *more]


def test_fit_logs_a_line_per_epoch_and_names_what_it_extracts(tmp_path):
    res = run(*_fit_args(tmp_path, "run"))
    assert res.exit_code == 0, res.output
    assert "\r" not in res.output
    for split in ("train", "test"):  # the two extraction bars say which split they read
        assert f"extract {split}: " in res.stderr, res.stderr
    epochs = [ln for ln in res.stderr.splitlines() if re.match(r"train \d+ adapters: ", ln)]
    assert len(epochs) == 2, res.stderr  # one line per epoch
    assert "epoch=1, best_val_loss=" in epochs[0] and "epoch=2" in epochs[1], res.stderr


def test_fit_quiet_prints_only_the_result_line(tmp_path):
    res = run(*_fit_args(tmp_path, "run", "--quiet"))
    assert res.exit_code == 0, res.output
    assert res.stderr == ""
    (line,) = res.stdout.splitlines()
    assert line.startswith(f"task saved to {tmp_path / 'run' / 'task'}")
    res = run(*_fit_args(tmp_path, "run", "--quiet"))  # an error still says so
    assert res.exit_code == 2 and "already holds a fitted task" in res.stderr


def test_extract_quiet_prints_only_the_result_line(tmp_path):
    from tiny import save_tiny_hf_vit

    vit = save_tiny_hf_vit(tmp_path / "vit")
    res = run("extract", "--backbone", f"hf:{vit}", "--data", "digits", "--limit", "20",
              "--num-workers", "0", "--out", tmp_path / "c", "--quiet")
    assert res.exit_code == 0, res.output
    assert res.stderr == ""
    (line,) = res.stdout.splitlines()
    assert line.startswith(f"cache {tmp_path / 'c'}: 20 samples, 3 layers"), line


# -- inca layers ---------------------------------------------------------------------------


def test_layers_lists_token_shapes_and_the_cache_size_per_image(tmp_path):
    from tiny import save_tiny_hf_vit

    vit = save_tiny_hf_vit(tmp_path / "vit")  # 32 px, patches of 8: 16 + CLS, width 32
    res = run("layers", f"hf:{vit}")
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert lines[0].startswith(f"hf:{vit} at 32 px: 3 layers, 1 prefix token"), lines[0]
    rows = [ln.split() for ln in lines[2:5]]
    assert rows == [[f"layers.{i}", "17", "32", "1.1"] for i in range(3)]  # 17x32x2 bytes
    assert lines[5].startswith("cache of every layer: 3.2 KiB per image (float16)")
    res = run("layers", f"hf:{vit}", "--input-size", "64", "--token-grid", "2")
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines()[2].split() == ["layers.0", "5", "32", "0.3"]  # CLS + 2x2
    res = run("layers", f"hf:{vit}", "--input-size", "64")
    assert res.stdout.splitlines()[2].split()[1] == "65"  # 8x8 patches + CLS
    res = run("layers", "dinov2_vits16")
    assert res.exit_code == 2 and "did you mean 'dinov2_vits14'" in res.output


# -- fit --config ----------------------------------------------------------------------------


@pytest.fixture
def captured_fit(monkeypatch):
    """The arguments fit's options come to (out, backbone, data, FitConfig), no work."""
    from inca.cli import fit as fit_cli
    from inca.errors import InCAError

    got = []

    def capture(out, backbone, data, config, *a, **k):
        got.append((out, backbone, data, config))
        raise InCAError("captured")

    monkeypatch.setattr(fit_cli, "_fit_into", capture)
    return got


SETTINGS = {
    "json": '{"data": "digits", "backbone": "timm:resnet10t", "epochs": 3, "kinds": ["linear"],'
            ' "lrs": [0.01, 0.1], "weight_decay": 0.02, "adapter_options": '
            '{"linear": {"norm": false}}}',
    "toml": 'data = "digits"\nbackbone = "timm:resnet10t"\nepochs = 3\nkinds = ["linear"]\n'
            'lrs = [0.01, 0.1]\nweight_decay = 0.02\n'
            '[adapter_options.linear]\nnorm = false\n',
    "yaml": "data: digits\nbackbone: timm:resnet10t\nepochs: 3\nkinds: [linear]\n"
            "lrs: [0.01, 0.1]\nweight_decay: 0.02\nadapter_options:\n  linear:\n"
            "    norm: false\n",
}


@pytest.mark.parametrize("suffix", sorted(SETTINGS))
def test_fit_config_file_sets_defaults_that_options_override(tmp_path, captured_fit, suffix):
    from inca.training.config import FitConfig

    if suffix == "yaml":
        pytest.importorskip("yaml")
    path = tmp_path / f"fit.{suffix}"
    path.write_text(SETTINGS[suffix])
    res = run("fit", "--config", path, "--out", tmp_path / "run", "--epochs", "5")
    assert res.exit_code == 2 and "captured" in res.output, res.output
    ((out, backbone, data, config),) = captured_fit
    assert (out, backbone, data) == (tmp_path / "run", "timm:resnet10t", "digits")
    assert config == FitConfig(epochs=5, kinds=("linear",), lrs=(0.01, 0.1), weight_decay=0.02,
                               adapter_options={"linear": {"norm": False}})


@pytest.mark.parametrize("text, message", [
    ('{"epochz": 3}', "unknown setting 'epochz' (did you mean 'epochs'?)"),
    ('{"weight_decy": 0.1}', "unknown setting 'weight_decy' (did you mean 'weight_decay'?)"),
    ('{"epochs": 0}', "epochs must be at least 1"),
    ('{"label_smoothing": 1.5}', "label_smoothing must be in [0, 1)"),
    ("[3]", "must hold a mapping"),
    ("{oops", "is not valid JSON"),
])
def test_fit_config_file_refuses_unknown_or_bad_settings(tmp_path, captured_fit, text, message):
    path = tmp_path / "fit.json"
    path.write_text(text)
    res = run("fit", "--config", path, "--backbone", "timm:resnet10t", "--data", "digits",
              "--out", tmp_path / "run")
    assert res.exit_code == 2 and message in " ".join(res.output.replace("│", "").split()), \
        res.output
    assert not captured_fit


def test_compare_config_file_sets_defaults_that_options_override(tmp_path, monkeypatch):
    from inca.baselines.compare_config import CompareConfig
    from inca.cli import compare as compare_cli
    from inca.errors import InCAError

    got = []

    def capture(config, progress=True):
        got.append(config)
        raise InCAError("captured")

    monkeypatch.setattr(compare_cli, "run_compare", capture)
    ckpt = tmp_path / "w.safetensors"
    ckpt.write_bytes(b"")
    path = tmp_path / "compare.toml"
    path.write_text('data = "digits"\nbackbone = "timm:resnet10t"\nmethods = ["linear", '
                    '"inca"]\nepochs = 2\nval_fraction = 0.25\n'
                    f'checkpoint_path = "{tmp_path / "other.safetensors"}"\n')
    res = run("compare", "--config", path, "--out", tmp_path / "out", "--epochs", "4",
              "--checkpoint", ckpt)
    assert res.exit_code == 2 and "captured" in res.output, res.output
    assert got == [CompareConfig(backbone="timm:resnet10t", data="digits",
                                 methods=("linear", "inca"), epochs=4, val_fraction=0.25,
                                 checkpoint_path=str(ckpt))]
    path.write_text('data = "digits"\nbackbone = "timm:resnet10t"\nepochz = 2\n')
    res = run("compare", "--config", path, "--out", tmp_path / "out")
    assert res.exit_code == 2 and "did you mean 'epochs'" in res.output


def test_compare_quiet_prints_only_the_result_line(tmp_path, monkeypatch):
    import inca.baselines.compare as lib
    from inca.cli import compare as compare_cli

    asked = []

    def fake_run(config, progress=True):
        asked.append(progress)
        if progress:
            print("[1/1] linear seed 0")
        return {"failures": []}

    monkeypatch.setattr(compare_cli, "run_compare", fake_run)
    monkeypatch.setattr(lib, "to_markdown", lambda result: "| the table |")
    monkeypatch.setattr(lib, "write", lambda result, out, command: {
        "markdown": out / "compare.md", "json": out / "compare.json", "plot": out / "c.png"})
    args = ["compare", "--backbone", "timm:resnet10t", "--data", "digits", "--methods",
            "linear", "--out", tmp_path]
    res = run(*args)
    assert res.exit_code == 0 and "| the table |" in res.output and "[1/1]" in res.output
    res = run(*args, "--quiet")
    assert res.exit_code == 0, res.output
    assert res.output.splitlines() == [f"wrote {tmp_path / 'compare.md'}, "
                                       f"{tmp_path / 'compare.json'}, {tmp_path / 'c.png'}"]
    assert asked == [True, False]


def test_inca_extract_defaults_to_what_extract_to_cache_does():
    """``inca extract`` takes its defaults from where ``extract_to_cache`` declares them."""
    import inspect

    from typer.main import get_command

    from inca.features import extract_to_cache

    options = {p.name: p.default for p in get_command(app).commands["extract"].params}
    signature = inspect.signature(extract_to_cache).parameters
    for name in ("layers", "batch_size", "dtype", "token_grid", "num_workers", "precision",
                 "overwrite"):
        assert options[name] == signature[name].default, name
