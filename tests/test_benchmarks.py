"""The GPU benchmark scripts also run on the CPU, at a tiny size (the figures come from a GPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_quality.py"
TINY_VIT = {"depth": 2, "embed_dim": 32, "num_heads": 2, "patch_size": 8}


@pytest.fixture
def gpu(monkeypatch):
    """benchmarks/gpu.py as a module (its bookkeeping runs on a CPU)."""
    import importlib

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    return importlib.import_module("gpu")


@pytest.fixture
def gpu_report(monkeypatch):
    """benchmarks/_gpu_report.py: gpu.py's targets, ratios and page."""
    import importlib

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    return importlib.import_module("_gpu_report")


def test_gpu_ratios_pair_like_with_like(gpu_report):
    """Review F5: the pure-bf16 InCA step was divided by the slower autocast forward."""
    m = {"forward_bf16_img_s": 100.0, "forward_pure_bf16_img_s": 150.0,
         "extract_all_bf16_img_s": 95.0, "fullft_bf16_img_s": 20.0,
         "inca_stream_bf16_img_s": 80.0, "inca_stream_pure_bf16_img_s": 120.0,
         "fullft_bf16_peak_gib": 10.0, "inca_stream_bf16_peak_gib": 3.0,
         "inca_stream_pure_bf16_peak_gib": 2.0}
    r = gpu_report.ratios(m)
    assert r["inca_vs_forward"] == pytest.approx(0.8)  # autocast / autocast
    assert r["inca_vs_forward_pure_bf16"] == pytest.approx(0.8)  # pure bf16 / pure bf16
    assert r["extract_vs_forward"] == pytest.approx(0.95)
    assert r["inca_vs_fullft"] == pytest.approx(4.0)
    assert r["inca_pure_bf16_vs_fullft"] == pytest.approx(6.0)
    assert r["inca_vs_fullft_memory"] == pytest.approx(0.3)
    assert r["inca_pure_bf16_vs_fullft_memory"] == pytest.approx(0.2)
    assert set(r) == set(gpu_report.TARGETS)
    skipped = {k: v for k, v in m.items() if not k.startswith("fullft")}
    assert set(gpu_report.ratios(skipped)) == {"inca_vs_forward", "inca_vs_forward_pure_bf16",
                                        "extract_vs_forward"}


def test_gpu_inca_step_feeds_the_bank_as_the_streaming_source_does(gpu):
    """Review F3/F8: one block in the compute dtype, as ``StreamingSource`` yields it."""
    from inca._precision import Precision
    from inca.data import ArrayDataset
    from inca.data.transforms import build_transform
    from inca.training.sources import StackedFeats, StreamingSource

    args = gpu.parser().parse_args(["--input-size", "32", "--model-kwargs",
                                    json.dumps(TINY_VIT)])
    bb = gpu.build_backbone("vit_tiny_patch16_224", args, "cpu")
    pixels = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    data = ArrayDataset(np.zeros((4, 28, 28), np.uint8), [0, 1, 2, 3], list("abcd"), "zeros")
    for name, dtype in (("bf16-mixed", torch.bfloat16), ("32", torch.float32)):
        prec = Precision(name, "cpu")
        block = gpu.stream_block(bb, pixels, prec)
        assert isinstance(block, StackedFeats) and block.order == bb.layers
        assert block.block.dtype == dtype and block.block.shape[:2] == (len(bb.layers), 4)
        src = StreamingSource(bb, data, range(4), bb.layers, build_transform(bb.preprocessing),
                              num_workers=0, precision=prec)
        feats, _ = next(src.batches(4))
        assert isinstance(feats, StackedFeats) and feats.block.dtype == block.block.dtype


class _FakeBackbone:
    def __init__(self, where: str) -> None:
        self.where = where
        self.parameters = lambda: iter([torch.zeros(3)])

    @property
    def device(self) -> str:
        return self.where

    def to(self, where):
        self.where = str(where)
        return self


class _FakeClock:
    def __init__(self, free: float | None) -> None:
        self.free, self.resets = free, 0

    def free_gib(self):
        return self.free

    def reset_peak(self) -> None:
        self.resets += 1

    def sync(self) -> None:
        pass

    def peak_gib(self):
        return None


def test_gpu_full_finetuning_measured_when_it_fits_without_the_frozen_original(
        gpu, gpu_report, monkeypatch):
    """Review F4 and F9: the frozen original leaves the device while fine-tuning is
    measured; the step is measured when its estimate fits, an OOM is recorded."""
    monkeypatch.setattr(gpu, "fullft_estimate_gib", lambda bb, batch: 40.0)
    seen = []

    def fullft(bb, x, y, prec, steps, clock):
        seen.append(bb.device)
        return {"fullft_bf16_img_s": 1.0, "fullft_bf16_peak_gib": 41.0}

    monkeypatch.setattr(gpu, "_fullft", fullft)
    bb, x = _FakeBackbone("cuda:0"), torch.zeros(2, 3)
    out = gpu.measure_fullft(bb, x, None, None, 2, _FakeClock(free=130.0))
    assert seen == ["cpu"] and bb.device == "cuda:0"
    assert out["fullft_bf16_img_s"] == 1.0 and out["fullft_gib_estimate"] == 40.0
    out = gpu.measure_fullft(bb, x, None, None, 2, _FakeClock(free=30.0))
    assert "fullft_bf16_img_s" not in out and "30.0 GiB free" in out["fullft_skipped"]
    assert len(seen) == 1  # not tried

    def oom(*a):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9 GiB")

    monkeypatch.setattr(gpu, "_fullft", oom)
    out = gpu.measure_fullft(bb, x, None, None, 2, _FakeClock(free=130.0))
    assert out["fullft_error"].startswith("CUDA out of memory") and bb.device == "cuda:0"
    assert "out of memory" in gpu_report._fullft_cell(out)


def test_gpu_end_to_end_streams_at_every_size_and_frees_each_run(gpu, monkeypatch):
    """Review F6 and F7: the mode is streaming (asked, not chosen) at every size, and no
    run's peak holds the previous run's task or backbone."""
    alive: list[weakref.ref] = []
    calls: list[tuple] = []

    class Clock(_FakeClock):
        def reset_peak(self) -> None:
            assert [r for r in alive if r() is not None] == alive[-1:]  # only the new backbone

    class Report:
        mode = {"mode": "streaming", "cache_bytes": 0}

    class Task:
        def __init__(self, bb) -> None:
            self.backbone, self.report = bb, Report()
            alive.append(weakref.ref(self))

    def build(name, args, device):
        bb = _FakeBackbone(str(device))
        alive.append(weakref.ref(bb))
        return bb

    def fit(bb, data, **kw):
        calls.append(("inca", kw["mode"], bb.device))
        return Task(bb)

    def finetune(bb, tr, val, test, config, **kw):
        calls.append(("full", None, bb.device))
        return Task(bb)

    monkeypatch.setattr(gpu, "build_backbone", build)
    monkeypatch.setattr(gpu.inca, "fit", fit)
    monkeypatch.setattr(gpu, "finetune", finetune)
    monkeypatch.setattr(gpu, "ASSETS", Path("/nonexistent.npz"))  # random images

    class Peak:  # no CUDA here: the device is only passed around
        peak_rss_mib = 1.0

        def __init__(self, device) -> None:
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            pass

    monkeypatch.setattr(gpu, "PeakMemory", Peak)
    args = gpu.parser().parse_args(["--e2e-sizes", "40,60", "--e2e-model", "m"])
    assert args.e2e_mode == "streaming"
    rows, source = gpu.end_to_end(args, torch.device("cuda"), Clock(None))
    # fine-tuning gets its backbone on the CPU and copies it to the device itself (F4)
    assert calls == [("inca", "streaming", "cuda"), ("full", None, "cpu")] * 2
    assert [(r["n_images"], r["method"]) for r in rows] == [
        (40, "inca"), (40, "full"), (60, "inca"), (60, "full")]
    assert source == "random images"
    payload = {"command": "c", "device": "cpu", "environment": {"torch": "t"},
               "input_size": 32, "steps": 2, "lrs": "1e-3", "models": {}, "e2e": rows,
               "e2e_model": "m", "e2e_source": source, "epochs": 1, "e2e_batch": 8,
               "e2e_mode": args.e2e_mode}
    assert "inca.fit in mode `streaming` at every size" in gpu.to_markdown(payload)


@pytest.mark.slow  # make test runs it; plain pytest skips it
def test_gpu_quality_runs_on_cpu(tmp_path):
    assets, results = tmp_path / "assets", tmp_path / "results"
    run = [sys.executable, str(SCRIPT), "--assets", str(assets)]
    subprocess.run([*run, "--prepare", "--train", "48", "--test", "24"], check=True)
    assert (assets / "dinov2_vits14_fp16.safetensors").stat().st_size > 40e6
    subprocess.run([*run, "--device", "cpu", "--input-size", "28", "--epochs", "1",
                    "--batch-size", "16", "--num-workers", "0", "--layers", "10,11",
                    "--methods", "inca,full,axes", "--axes-max-epochs", "2",
                    "--results-dir", str(results)], check=True)
    payload = json.loads((results / "gpu-quality.json").read_text())
    assert payload["device"] == "cpu" and payload["n_train"] == 48 and payload["n_test"] == 24
    runs = {(r["method"], r["precision"]): r for r in payload["runs"]}
    assert list(runs) == [("inca", "bf16-mixed"), ("full", "bf16-mixed"), ("inca", "32"),
                          ("full", "32"), ("axes", "bf16-mixed")]  # axes last, as time allows
    for r in runs.values():
        assert {"test_accuracy", "chosen", "wall_s", "peak_gib", "epochs"} <= set(r)
        assert 0 <= r["test_accuracy"] <= 1 and 1 <= r["epochs"] <= 2
    assert runs[("inca", "32")]["chosen"].split("/")[0] in ("inca", "linear", "ensemble")
    axes = runs[("axes", "bf16-mixed")]
    assert axes["time_budget_s"] == runs[("full", "bf16-mixed")]["train_s"]
    assert set(axes["variants"]) == {"inca", "inca:q4", "inca:w2", "inca:mlp", "linear"}
    assert set(payload["gaps"]) == {"inca", "full"}
    for g in payload["gaps"].values():  # 24 test images: a standard error of 10+ points
        assert g["se_points"] > 5 and g["within_noise"] == (abs(g["gap_points"])
                                                             <= 2 * g["se_points"])
    md = (results / "gpu-quality.md").read_text()
    assert "| inca | bf16-mixed |" in md and "| inca:q4 |" in md and "+- " in md


@pytest.mark.slow  # make test runs it; plain pytest skips it
def test_gpu_scale_benchmark_runs_on_cpu(tmp_path):
    script = SCRIPT.parent / "gpu.py"
    subprocess.run([sys.executable, str(script), "--device", "cpu", "--models",
                    "vit_tiny_patch16_224", "--giant", "vit_small_patch14_dinov2",
                    "--giant-batch", "2", "--input-size", "32", "--batch-sizes", "4",
                    "--model-kwargs", json.dumps(TINY_VIT), "--steps", "1",
                    "--e2e-sizes", "32,48", "--epochs", "1", "--e2e-batch", "16",
                    "--results-dir", str(tmp_path)], check=True)
    payload = json.loads((tmp_path / "gpu.json").read_text())
    for name in ("vit_tiny_patch16_224", "vit_small_patch14_dinov2"):
        m = payload["models"][name]
        for key in ("forward_bf16_img_s", "extract_all_bf16_img_s", "fullft_bf16_img_s",
                    "inca_stream_bf16_img_s", "forward_pure_bf16_img_s",
                    "inca_stream_pure_bf16_img_s", "fullft_gib_estimate"):
            assert m[key] > 0, (name, key)
        assert m["bank_size"] == 2 * 2 * 2  # 2 blocks x 2 lrs x {InCA, linear}
    assert payload["e2e_mode"] == "streaming"
    assert [(r["n_images"], r["method"], r["mode"]) for r in payload["e2e"]] == [
        (n, m, "streaming" if m == "inca" else "") for n in (32, 48) for m in ("inca", "full")]
    md = (tmp_path / "gpu.md").read_text()
    assert "InCA streaming step / plain forward, both pure bf16" in md
    assert "inca.fit in mode `streaming` at every size" in md


CHECK = ROOT / "scripts" / "gpu_check.sh"
STAGES = ["machine", "cuda-tests", "gpu", "gpu-quality", "cli-fit", "gpu-giant", "distributed"]


def _gpu_check(out: Path, *args: str, timeout: float = 60, **env: str):
    env = {**os.environ, "OUT": str(out), "PY": sys.executable, **env}
    res = subprocess.run(["bash", str(CHECK), *args], env=env, capture_output=True,
                         text=True, timeout=timeout)
    stages = {}
    if (out / "stages.txt").is_file():
        for line in (out / "stages.txt").read_text().splitlines():
            num, name, rest = line.split(" ", 2)
            stages[name] = rest
    return res, stages


@pytest.mark.slow  # make test runs it (minutes on 2 shared cores); plain pytest skips it
def test_gpu_check_quick_runs_every_stage(tmp_path):
    """scripts/gpu_check.sh --quick: the GPU check's stages on the CPU, so it cannot rot."""
    res, stages = _gpu_check(tmp_path, "--quick", timeout=1700)
    log = (tmp_path / "log.txt").read_text()
    assert res.returncode == 0, res.stderr[-2000:]
    assert list(stages) == STAGES
    for name, rest in stages.items():
        assert rest.startswith("rc=0 "), (name, rest, log[-4000:])
        assert f"=== stage {STAGES.index(name)} {name}: rc=0" in log
    for f in ("gpu", "gpu-quality", "gpu-giant", "distributed-cuda", "cli-fit-report"):
        assert (tmp_path / f"{f}.json").is_file() and (tmp_path / f"{f}.md").is_file(), f
    assert "skipped" in (tmp_path / "cuda-tests.log").read_text()  # no GPU here
    assert (tmp_path / "cuda-tests.xml").is_file()
    assert "StackedFeats survives DDP moving its inputs: True" in log
    gpu = json.loads((tmp_path / "gpu.json").read_text())
    assert gpu["e2e_mode"] == "streaming" and len(gpu["e2e"]) == 4
    giant = json.loads((tmp_path / "gpu-giant.json").read_text())
    assert giant["models"]["vit_small_patch14_dinov2"]["fullft_bf16_img_s"] > 0
    quality = json.loads((tmp_path / "gpu-quality.json").read_text())
    assert [(r["method"], r["precision"]) for r in quality["runs"]] == [
        ("inca", "bf16-mixed"), ("full", "bf16-mixed"), ("inca", "32"), ("full", "32"),
        ("axes", "bf16-mixed")]
    dist = json.loads((tmp_path / "distributed-cuda.json").read_text())
    assert [r["ranks"] for r in dist["runs"]] == [1, 2] and dist["random_weights"]
    cli = json.loads((tmp_path / "cli-fit-report.json").read_text())
    assert cli["config"]["precision"] == "32"  # the CPU's auto


def test_gpu_check_skips_the_stages_its_budget_cannot_hold(tmp_path):
    """A stage runs only when its cap fits in what is left; a cap cuts a stage off."""
    res, stages = _gpu_check(tmp_path, "--quick", BUDGET="6", CAPS="3 300 300 300 300 300 300")
    assert res.returncode == 0, res.stderr
    assert list(stages) == STAGES
    assert stages["machine"].split()[0] in ("rc=0", "rc=124")  # 124: cut off at 3 s
    assert all(stages[s].startswith("skipped (") for s in STAGES[1:])
    assert "=== stage 2 gpu: skipped" in (tmp_path / "log.txt").read_text()
    res, _ = _gpu_check(tmp_path / "bad", "--bogus")
    assert res.returncode == 2 and "usage" in res.stderr


@pytest.mark.slow  # make test runs it; plain pytest skips it
def test_bank_benchmark_quick(tmp_path):
    """benchmarks/bank.py --quick: FLOPs, times and efficiencies of each shape, in one run."""
    script = SCRIPT.parent / "bank.py"
    subprocess.run([sys.executable, str(script), "--quick", "--repeats", "1",
                    "--results-dir", str(tmp_path)], check=True, timeout=300)
    payload = json.loads((tmp_path / "bank.json").read_text())
    rows = {r["shape"]: r for r in payload["shapes"]}
    assert set(rows) == {"a", "c"} and rows["a"]["members"] == 12 and rows["c"]["members"] == 1
    for r in rows.values():
        assert r["flops"]["train"] > r["flops"]["forward"] > 0
        for k in ("forward", "train"):  # achieved / the sgemm measured in the same run
            assert r["efficiency"][k] == pytest.approx(
                r["flops"][k] / r["seconds"][k] / 1e9 / payload["sgemm_gflop_s"])
        # the kernel floor: the step's recorded matmuls replayed alone, plus AdamW alone
        assert r["seconds"]["matmuls_alone"] > 0
        assert r["kernel_floor_s"] == pytest.approx(
            r["seconds"]["matmuls_alone"] + r["seconds"]["optimizer"])
    md = (tmp_path / "bank.md").read_text()
    assert "(c) step / (a) step" in md and "## Targets (issue 19)" in md
    assert "(a) training step, efficiency >= 25%" in md
    (tmp_path / "bank.md").unlink()  # --from-json writes the same page from the numbers
    subprocess.run([sys.executable, str(script), "--from-json", "--results-dir", str(tmp_path)],
                   check=True, timeout=120)
    assert (tmp_path / "bank.md").read_text() == md


def test_faults_benchmark_quick(tmp_path):
    """benchmarks/faults.py --quick: the library cases, the results' shape."""
    script = SCRIPT.parent / "faults.py"
    subprocess.run([sys.executable, str(script), "--quick", "--results-dir", str(tmp_path)],
                   check=True, timeout=120)
    payload = json.loads((tmp_path / "faults.json").read_text())
    assert {"faults_injected", "faults_survived", "bad_inputs_tried",
            "bad_inputs_handled_clearly", "silent_wrong_results", "data_lost_events",
            "load"} <= set(payload)
    assert set(payload["load"]) == {"requests", "errors", "wrong_answers", "p99_ms_normal",
                                    "p99_ms_normal_under_bombs"}
    assert payload["bad_inputs_tried"] >= 4 and not payload["harness_errors"]
    assert {c["id"] for c in payload["bad_inputs"]} >= {"open-16-bit", "task-predict-bomb"}
    assert "| open-16-bit | library |" in (tmp_path / "faults.md").read_text()


def test_the_mutation_triage_names_real_tests_and_refuses_a_bad_line(monkeypatch, tmp_path):
    """Every survivor said killed names a test that exists (file and function); each line
    has a known verdict, and a mutant is triaged once."""
    import ast
    import importlib

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    mutation = importlib.import_module("mutation")
    triage = mutation.read_triage()
    names: dict[str, set[str]] = {}
    for verdict, why in triage.values():
        if verdict != "killed":
            assert why, "an equivalent or accepted mutant says why"
            continue
        file = why.split("::")[0]
        if file not in names:
            tree = ast.parse((ROOT / file).read_text())
            names[file] = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
        for test in why.split("::")[1:]:
            assert test.split()[0].split("[")[0] in names[file], why
    bad = tmp_path / "triage.tsv"
    for line in ("a\tkilled\tx\na\tkilled\tx\n", "b\tmaybe\tx\n"):
        bad.write_text(line)
        with pytest.raises(SystemExit, match="triage.tsv:"):
            mutation.read_triage(bad)


def test_mutation_results_retriaged_from_the_triage_file(monkeypatch):
    """``mutation.py --retriage``: each survivor's verdict read again, and the scores that
    follow from them; the raw score and the totals stay those of the run."""
    import importlib

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    mutation = importlib.import_module("mutation")
    run = {"score": 0.7, "totals": {"killed": 7, "survived": 3}, "notes": ["as run"],
           "survivors": [{"mutant": m, "status": "survived", "explained": "unexplained",
                          "why": ""} for m in ("a", "b", "c")]}
    triage = {"a": ("killed", "tests/x.py::test_a"), "b": ("equivalent", "same value")}
    out = mutation.retriage(run, triage)
    assert [(s["explained"], s["why"]) for s in out["survivors"]] == [
        ("killed", "tests/x.py::test_a"), ("equivalent", "same value"), ("unexplained", "")]
    assert out["score"] == 0.7 and out["totals"] == run["totals"]
    assert out["score_excluding_equivalent"] == pytest.approx(7 / 9)
    assert out["score_with_new_tests_excluding_equivalent"] == pytest.approx(8 / 9)
    assert (out["equivalent"], out["killed_since_by_new_tests"],
            out["unexplained_survivors"]) == (1, 1, 1)
    again = mutation.retriage(out, triage)  # said once however often it is re-read
    assert again["notes"] == ["as run", mutation.RETRIAGED] and again == out
