"""Devices and precision: modules that move, mixed precision that matches float32.

A device axis (CPU always; CUDA where a GPU is) and a dtype axis over the bank, fit, the
fine-tuning baseline, task files and the multi-task runtime.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from planted import PlantedNet, planted_backbone, planted_data
from tokens import LAYERS, token_bank, token_source
from torch import nn

import inca
from inca._precision import Precision, resolve_device, resolve_precision
from inca.baselines.finetune import FineTuneConfig, finetune
from inca.errors import InCAError
from inca.runtime import MultiTaskModel
from inca.task import Task, load_task
from inca.training import FitConfig, train_bank
from inca.training.loss import bank_loss
from inca.training.sources import MemorySource

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
BANK = FitConfig(layers=LAYERS, kinds=("inca", "linear"), lrs=(3e-3, 1e-2), epochs=4,
                 batch_size=32, patience=0, precision="32")


def _on(src: MemorySource, device: str) -> MemorySource:
    return MemorySource({k: v.to(device) for k, v in src.feats.items()}, src.labels.to(device))


def _states(bank) -> list[dict[str, torch.Tensor]]:
    return [bank.member_state(i) for i in range(len(bank.keys))]


def _changed(before, after) -> list[bool]:
    return [any(not torch.equal(a[k].double().cpu(), b[k].double().cpu()) for k in a)
            for a, b in zip(before, after, strict=True)]


# -- the bank is an ordinary module ------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bank_moved_before_training_trains_every_member(device, dtype):
    bank = token_bank(BANK)
    init = _states(bank)
    bank.to(device=device, dtype=dtype)
    res = train_bank(bank, _on(token_source(256, 0), device),
                     _on(token_source(128, 1), device), BANK, progress=False)
    assert all(_changed(init, [m.state for m in res.members]))
    assert all(v.dtype == dtype and v.device.type == device
               for m in res.members for v in m.state.values())
    accs = {m.key: m.val_accuracy for m in res.members}
    # the InCA members learn the planted layer, and their learning rates make a difference
    assert accs["inca/l1/lr=0.003"] > 0.9 and accs["inca/l1/lr=0.01"] > 0.9
    i, j = bank.keys.index("inca/l1/lr=0.003"), bank.keys.index("inca/l1/lr=0.01")
    assert not torch.equal(res.members[i].state["query"], res.members[j].state["query"])


@pytest.mark.parametrize("device", DEVICES)
def test_bank_moved_during_training_keeps_training(device):
    """Today's main failed this: moving re-fused the stacks behind the optimizer's back."""
    bank = token_bank(BANK).to(device)
    feats, y = next(_on(token_source(64, 0), device).batches(64))
    opt = torch.optim.AdamW(bank.param_groups(), weight_decay=1e-4)

    def steps(n: int) -> None:
        for _ in range(n):
            opt.zero_grad()
            bank_loss(bank.logits(feats), y, 0.0).sum().backward()
            opt.step()

    steps(3)
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    bank.to(torch.float64)
    opt.load_state_dict(opt.state_dict())  # the optimizer state follows, as for any module
    # the optimizer holds exactly the tensors the forward reads
    assert held == {id(p) for p in bank.parameters()}
    before, logits = _states(bank), bank.logits(feats).detach()
    steps(3)
    assert all(_changed(before, _states(bank)))
    assert all(v.dtype == torch.float64 for s in _states(bank) for v in s.values())
    moved = (bank.logits(feats).detach() - logits).abs().amax(dim=(1, 2))
    assert (moved > 0).all()  # every member's output moved


# -- mixed precision -------------------------------------------------------------------------
def test_precision_names():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "32"
    assert resolve_precision("bf16", cpu) == "bf16-mixed"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    choices = ("precision must be one of auto, 32, bf16-mixed, 16-mixed (or 32-true, fp32, "
               "float32, bf16, 16, fp16); got ")
    # one check, one message, for the functions, the configs and the commands
    with pytest.raises(ConfigError := inca.training.ConfigError) as e:
        resolve_precision("bf8", cpu)
    assert str(e.value) == choices + "'bf8'"
    with pytest.raises(ConfigError) as e:
        FitConfig(precision="half")
    assert str(e.value) == choices + "'half'"
    assert issubclass(ConfigError, InCAError)
    with pytest.raises(ConfigError) as e:
        FineTuneConfig(precision="fp8")
    assert str(e.value) == choices + "'fp8'"
    with pytest.raises(ConfigError) as e:
        Precision("fp4", cpu)
    assert str(e.value) == choices + "'fp4'"
    # the names a function takes, a config takes too (stored under their own name)
    assert FitConfig(precision="bf16").precision == "bf16-mixed"
    assert FineTuneConfig(precision="fp32").precision == "32"
    assert FitConfig().precision == FineTuneConfig().precision == "auto"


def test_each_step_reads_the_current_weights_inside_an_outer_autocast():
    """autocast caches 16-bit weight copies until its outermost region ends: one region
    around a whole training loop froze the forward at the first step's weights."""
    torch.manual_seed(0)
    lin = nn.Linear(4, 1)
    opt = torch.optim.SGD(lin.parameters(), lr=1.0)
    x = torch.randn(8, 4)
    outs = []
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what a user wraps fit() in
        for _ in range(3):
            with Precision("bf16-mixed", "cpu").autocast():
                y = lin(x).float().sum()
            outs.append(y.item())
            opt.zero_grad()
            y.backward()
            opt.step()
    assert len(set(outs)) == 3


def test_bank_in_an_outer_autocast_trains_as_without_it():
    config = FitConfig(layers=LAYERS, kinds=("inca", "linear"), lrs=(1e-2,), epochs=2,
                       batch_size=32, patience=0, precision="bf16-mixed")
    train, val = token_source(128, 0), token_source(64, 1)
    ref = train_bank(token_bank(config), train, val, config, progress=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        wrapped = train_bank(token_bank(config), train, val, config, progress=False)
    for a, b in zip(ref.members, wrapped.members, strict=True):
        assert a.val_accuracy == b.val_accuracy
        for k in a.state:
            torch.testing.assert_close(a.state[k], b.state[k])


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_bank_learns_like_fp32(precision):
    config = FitConfig(layers=LAYERS, kinds=("inca", "linear"), lrs=(3e-3,), epochs=3,
                       batch_size=32, patience=0, precision=precision)
    train, val = token_source(128, 0), token_source(64, 1)
    bank, steps = token_bank(config), []  # each training step's logits: computed in 16 bits
    bank.register_forward_hook(lambda module, args, out: steps.append(out.dtype))
    mixed = train_bank(bank, train, val, config, progress=False)
    assert steps == [Precision(precision).compute_dtype] * 12  # 4 batches x 3 epochs
    ref = train_bank(token_bank(config), train, val, config, progress=False, precision="32")
    for a, b in zip(mixed.members, ref.members, strict=True):
        assert a.val_accuracy == pytest.approx(b.val_accuracy, abs=0.05), a.key
        assert all(v.dtype == torch.float32 for v in a.state.values())  # fp32 masters
    assert mixed.members[1].key == "inca/l1/lr=0.003" and mixed.members[1].val_accuracy > 0.9


def test_each_epochs_validation_runs_in_the_banks_precision():
    """Members are selected on validation scores computed as the task will predict: under
    16-mixed, in 16-mixed (float32 scores differ)."""
    from inca.training.loop import evaluate

    config = FitConfig(layers=LAYERS, kinds=("inca", "linear"), lrs=(3e-3,), epochs=1,
                       batch_size=16, patience=0, precision="16-mixed")
    bank, val = token_bank(config), token_source(32, 1)
    res = train_bank(bank, token_source(64, 0), val, config, progress=False)
    assert res.history[0]["val_loss"] == evaluate(bank, val, 16, "16-mixed").loss.tolist()
    assert res.history[0]["val_loss"] != evaluate(bank, val, 16, "32").loss.tolist()


@pytest.fixture(scope="module")
def planted_both(tmp_path_factory):
    """inca.fit on the planted problem in float32 and in bf16-mixed, same data."""
    train, test = planted_data(320, 0), planted_data(160, 1)
    out = {}
    for precision in ("32", "bf16-mixed"):
        out[precision] = inca.fit(
            planted_backbone(), train, test=test, layers="all", kinds=("inca", "linear"),
            lrs=(3e-3, 1e-2), epochs=6, batch_size=32, precision=precision, progress=False,
            cache_dir=tmp_path_factory.mktemp(precision))
    return out


def test_bf16_mixed_fit_matches_fp32(planted_both):
    for precision, task in planted_both.items():
        assert task.report.config["precision"] == precision
    best = {p: {kind: max(r["val_accuracy"] for r in t.report.rows if r["kind"] == kind)
                for kind in ("inca", "linear")} for p, t in planted_both.items()}
    for kind in ("inca", "linear"):
        assert best["bf16-mixed"][kind] == pytest.approx(best["32"][kind], abs=0.04), kind
    ref, mixed = planted_both["32"].report, planted_both["bf16-mixed"].report
    assert mixed.val_accuracy > 0.8
    assert mixed.test_accuracy[mixed.chosen] == pytest.approx(
        ref.test_accuracy[ref.chosen], abs=0.04)
    # validation and test agree under bf16 (they did not inside one outer autocast)
    assert mixed.test_accuracy[mixed.chosen] == pytest.approx(mixed.val_accuracy, abs=0.1)
    assert {ly for ls in planted_both["bf16-mixed"].member_layers for ly in ls} <= {
        "stem", "block1"}


def test_bf16_mixed_full_finetuning_matches_fp32():
    train, val = planted_data(192, 0), planted_data(96, 1)
    acc = {}
    for precision in ("32", "bf16-mixed"):
        res = finetune(planted_backbone(), train, val, val, FineTuneConfig(
            method="full", epochs=4, batch_size=32, lr_backbone=3e-3, lr_head=3e-2,
            precision=precision), progress=False)
        acc[precision] = res.test_accuracy
    assert acc["32"] > 0.6  # well above chance (0.25): the backbone itself learned
    assert acc["bf16-mixed"] == pytest.approx(acc["32"], abs=0.06)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # an outer autocast changes nothing
        wrapped = finetune(planted_backbone(), train, val, val, FineTuneConfig(
            method="full", epochs=4, batch_size=32, lr_backbone=3e-3, lr_head=3e-2,
            precision="bf16-mixed"), progress=False)
    assert wrapped.test_accuracy == acc["bf16-mixed"]


# -- tasks and the runtime move and cast ---------------------------------------------------
def test_fingerprint_names_the_weights_not_their_dtype_or_device():
    fp = planted_backbone().fingerprint()
    assert planted_backbone().to(torch.bfloat16).fingerprint() == fp
    assert planted_backbone().half().fingerprint() == fp  # fixed before the first cast
    bf16_module = inca.from_module(PlantedNet().to(torch.bfloat16),
                                   ["stem", "block1", "wash", "block3"], name="planted",
                                   preprocessing=planted_backbone().preprocessing)
    assert bf16_module.fingerprint() == fp  # bfloat16-rounded values are what is hashed
    assert planted_backbone(seed=1).fingerprint() != fp


def test_task_saved_in_fp32_loads_in_bf16(planted_both, tmp_path):
    task = planted_both["32"]
    task.save(tmp_path / "task")
    images = [planted_data(64, 2)[i][0] for i in range(64)]
    expected = task.predict(images)
    loaded = load_task(tmp_path / "task", backbone=planted_backbone(), dtype=torch.bfloat16)
    assert isinstance(loaded, nn.Module)
    assert loaded.backbone.dtype == torch.bfloat16
    assert {p.dtype for p in loaded.members.parameters()} == {torch.bfloat16}
    got = loaded.predict(images)
    agree = sum(a == b for a, b in zip(got, expected, strict=True)) / len(images)
    assert agree >= 0.95


@pytest.mark.parametrize("device", DEVICES)
def test_multitask_model_moves_as_one_module(planted_both, device):
    a, b = planted_both["32"], planted_both["bf16-mixed"]
    images = [planted_data(16, 2)[i][0] for i in range(16)]
    model = MultiTaskModel(copy.deepcopy(a.backbone), {"a": a, "b": b}, precision="32")
    assert isinstance(model, nn.Module) and isinstance(model.tasks["a"], Task)
    ref = model.predict_proba(images)
    model.to(device=device, dtype=torch.float64)
    assert model.backbone.dtype == torch.float64
    assert {(p.dtype, p.device.type) for p in model.parameters()} == {(torch.float64, device)}
    out = model.predict_proba(images)
    for name in ("a", "b"):
        torch.testing.assert_close(out[name], ref[name], atol=1e-4, rtol=1e-4)


# -- the command line ------------------------------------------------------------------------
def test_cli_refuses_bad_device_and_precision(tmp_path):
    from typer.testing import CliRunner

    from inca.cli import app

    base = ["fit", "--backbone", "dinov2_vits14", "--data", "digits", "--out", str(tmp_path)]
    res = CliRunner().invoke(app, [*base, "--precision", "half"])
    assert res.exit_code == 2 and "precision must be one of" in res.output
    if not torch.cuda.is_available():
        res = CliRunner().invoke(app, [*base, "--device", "cuda"])
        assert res.exit_code == 2 and "sees no CUDA GPU" in res.output


def test_cli_fit_with_a_bf16_backbone_and_predict_in_fp32(tmp_path):
    from tiny import save_tiny_hf_vit
    from typer.testing import CliRunner

    from inca.cli import app
    from inca.data import load_dataset

    folder = save_tiny_hf_vit(tmp_path / "vit")
    out = tmp_path / "run"
    res = CliRunner().invoke(app, [
        "fit", "--backbone", f"hf:{folder}", "--data", "digits", "--limit", "80",
        "--test-limit", "0", "--epochs", "1", "--out", str(out), "--kinds", "inca,linear",
        "--backbone-dtype", "bfloat16", "--num-workers", "0"])
    assert res.exit_code == 0, res.output
    img = tmp_path / "x.png"
    load_dataset("digits", split="test")[0][0].save(img)
    for dtype in ("bfloat16", "float32"):  # the fingerprint names the weights, not the dtype
        res = CliRunner().invoke(app, ["predict", "--task", str(out / "task"), str(img),
                                       "--backbone-dtype", dtype])
        assert res.exit_code == 0 and "x.png:" in res.output, res.output
    res = CliRunner().invoke(app, ["predict", "--task", str(out / "task"), str(img),
                                   "--backbone-dtype", "int8"])
    assert res.exit_code == 2 and "unknown --backbone-dtype 'int8'" in res.output


# -- CUDA (skipped without a GPU) ---------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("precision, mode", [("bf16-mixed", "cached"),
                                             ("bf16-mixed", "streaming"),
                                             ("16-mixed", "cached")])
def test_fit_on_cuda(tmp_path, precision, mode):
    bb = planted_backbone()
    task = inca.fit(bb, planted_data(320, 0), test=planted_data(160, 1), layers="all",
                    kinds=("inca", "linear"), lrs=(3e-3, 1e-2), epochs=6, batch_size=32,
                    device="cuda", precision=precision, mode=mode, progress=False,
                    cache_dir=tmp_path)
    assert bb.device.type == "cuda" and task.report.config["precision"] == precision
    assert task.report.mode["mode"] == mode
    assert task.report.val_accuracy > 0.85
    inca_rows = [r for r in task.report.rows if r["kind"] == "inca"]
    assert len({r["val_accuracy"] for r in inca_rows}) > 1  # InCA members trained
    assert not any(r.get("diverged_epoch") for r in task.report.rows)
    task.save(tmp_path / "task")
    loaded = load_task(tmp_path / "task", backbone=planted_backbone(), device="cuda")
    assert next(loaded.members.parameters()).device.type == "cuda"
    images = [planted_data(32, 2)[i][0] for i in range(32)]
    assert loaded.predict(images) == task.predict(images)


@pytest.mark.cuda
def test_full_finetuning_on_cuda_in_bf16_mixed():
    train, val = planted_data(192, 0), planted_data(96, 1)
    bb = planted_backbone()
    res = finetune(bb, train, val, val, FineTuneConfig(
        method="full", epochs=4, batch_size=32, lr_backbone=3e-3, lr_head=3e-2,
        precision="bf16-mixed"), progress=False, device="cuda")
    assert bb.device.type == "cpu"  # the caller's backbone is copied, not moved
    assert res.model_.device.type == "cuda"
    assert {p.dtype for p in res.model_.parameters()} == {torch.float32}  # fp32 masters
    assert res.epochs_run == 4 and res.test_accuracy > 0.5  # chance: 0.25


_FIT_TWO_RANKS = """
import json, os, sys
sys.path.insert(0, {tests!r})
from pathlib import Path
import torch
import inca
from tiny import make_backbone
from inca.data import load_dataset
bb = make_backbone("timm-vit", Path({tmp!r}))  # seeded: the same weights on both ranks
task = inca.fit(bb, load_dataset("digits", limit=160), kinds=("inca", "linear"),
                lrs=(3e-3, 1e-2), epochs=3, batch_size=16, patience=0, cache_dir={cache!r},
                progress=False, num_workers=0, device={device!r}, precision="bf16-mixed",
                mode="cached")
Path({out!r} + os.environ["RANK"]).write_text(json.dumps({{
    "device": str(next(task.members.parameters()).device),
    "backend": str(torch.distributed.get_backend()), "val": task.report.val_accuracy}}))
"""


def _two_ranks_fit(tmp_path, monkeypatch, device: str) -> list[dict]:
    """``inca.fit`` under torchrun, 2 ranks over Gloo (the layers of the tiny ViT share a
    shape: the bank's input is a ``StackedFeats`` that DDP must leave alone)."""
    import json

    from tiny import TESTS, torchrun

    monkeypatch.setenv("INCA_DIST_BACKEND", "gloo")  # ranks sharing one GPU
    out = str(tmp_path / "rank")
    res = torchrun(_FIT_TWO_RANKS.format(tests=TESTS, tmp=str(tmp_path), device=device,
                                          cache=str(tmp_path / "cache"), out=out),
                    timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    return [json.loads(Path(out + str(r)).read_text()) for r in range(2)]


@pytest.mark.cuda
def test_two_gloo_ranks_share_one_gpu_through_fit(tmp_path, monkeypatch):
    ranks = _two_ranks_fit(tmp_path, monkeypatch, "cuda")
    assert [r["device"] for r in ranks] == ["cuda:0", "cuda:0"]  # LOCAL_RANK mod 1 GPU
    assert {r["backend"] for r in ranks} == {"gloo"}
    assert ranks[0]["val"] == ranks[1]["val"] > 0.2  # chance: 0.1



def test_precision_of_keeps_one_for_its_device_and_resolves_a_name():
    cpu = torch.device("cpu")
    given = Precision("bf16-mixed", cpu)
    assert Precision.of(given, "cpu") is given
    assert Precision.of("fp32", cpu).name == "32" and Precision.of(None, cpu).name == "32"
    other = Precision("16-mixed", "meta")  # made for another device: its name, this device
    moved = Precision.of(other, cpu)
    assert (moved.name, moved.device) == ("16-mixed", cpu)


def test_the_default_precision_is_declared_once():
    """Every function, config and command takes its default precision from
    ``inca._choices.DEFAULT_PRECISION``, never a literal of its own."""
    import ast
    from pathlib import Path
    src = Path(inca.__file__).parent
    literal, named = [], 0
    for path in src.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            pairs = []
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args
                positional = args.args[len(args.args) - len(args.defaults):]
                pairs += zip(positional, args.defaults, strict=True)
                pairs += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults,
                                                 strict=True) if d]
                pairs = [(a.arg, d) for a, d in pairs]
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) \
                    and node.value is not None:
                pairs = [(node.target.id, node.value)]
            for name, default in pairs:
                if name != "precision":
                    continue
                if isinstance(default, ast.Constant) and default.value is not None:
                    literal.append(f"{path.relative_to(src)}:{default.lineno}")
                named += isinstance(default, ast.Name) and default.id == "DEFAULT_PRECISION"
    assert named >= 15, named  # the search found the defaults
    assert not literal, f"a precision default written as a literal: {literal}"


def test_the_precision_owns_backward_and_step():
    """``Precision.stepper``: gradients cleared, backward, the hook only when a scaler is in
    use, the step; under float16 a step whose gradient overflowed is skipped."""
    w = torch.nn.Parameter(torch.ones(3))
    calls: list[str] = []
    step = Precision("32", "cpu").stepper(torch.optim.SGD([w], lr=0.1))
    w.grad = torch.full((3,), 100.0)  # stale: must be cleared, not added to
    step((w * w).sum(), lambda: calls.append("hook"))
    torch.testing.assert_close(w.detach(), torch.full((3,), 0.8))  # 1 - 0.1 * 2
    assert calls == []  # no scaler in float32
    w16 = torch.nn.Parameter(torch.ones(3))
    step16 = Precision("16-mixed", "cpu").stepper(torch.optim.SGD([w16], lr=0.1))
    assert step16.scaler.is_enabled()
    step16((w16 * w16).sum(), lambda: calls.append("hook"))
    torch.testing.assert_close(w16.detach(), torch.full((3,), 0.8))  # unscaled before the step
    scale = step16.scaler.get_scale()
    step16((w16 * float("inf")).sum(), lambda: calls.append("hook"))
    torch.testing.assert_close(w16.detach(), torch.full((3,), 0.8))  # overflow: skipped
    assert calls == ["hook", "hook"] and step16.scaler.get_scale() < scale
