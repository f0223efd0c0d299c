"""The GPU benchmark scripts also run on the CPU, at a tiny size (the figures come from a GPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_quality.py"


@pytest.mark.slow  # make test runs it; plain pytest skips it
def test_gpu_quality_runs_on_cpu(tmp_path):
    assets, results = tmp_path / "assets", tmp_path / "results"
    run = [sys.executable, str(SCRIPT), "--assets", str(assets)]
    subprocess.run([*run, "--prepare", "--train", "48", "--test", "24"], check=True)
    assert (assets / "dinov2_vits14_fp16.safetensors").stat().st_size > 40e6
    subprocess.run([*run, "--device", "cpu", "--input-size", "28", "--epochs", "1",
                    "--batch-size", "16", "--num-workers", "0", "--results-dir", str(results)],
                   check=True)
    payload = json.loads((results / "gpu-quality.json").read_text())
    assert payload["device"] == "cpu" and payload["n_train"] == 48
    runs = {(r["method"], r["precision"]): r for r in payload["runs"]}
    assert set(runs) == {(m, p) for m in ("inca", "full") for p in ("32", "bf16-mixed")}
    for r in runs.values():
        assert {"test_accuracy", "chosen", "wall_s", "peak_gib", "epochs"} <= set(r)
        assert 0 <= r["test_accuracy"] <= 1 and r["epochs"] == 1
    assert runs[("inca", "32")]["chosen"].split("/")[0] in ("inca", "linear", "ensemble")
    assert "| inca | bf16-mixed |" in (results / "gpu-quality.md").read_text()


@pytest.mark.slow  # make test runs it; plain pytest skips it
def test_gpu_scale_benchmark_runs_on_cpu(tmp_path):
    script = SCRIPT.parent / "gpu.py"
    subprocess.run([sys.executable, str(script), "--device", "cpu", "--models",
                    "vit_tiny_patch16_224", "--giant", "vit_small_patch14_dinov2",
                    "--giant-batch", "2", "--input-size", "28", "--batch-sizes", "4",
                    "--steps", "1", "--e2e-sizes", "32,48", "--epochs", "1",
                    "--e2e-batch", "16", "--results-dir", str(tmp_path)], check=True)
    payload = json.loads((tmp_path / "gpu.json").read_text())
    tiny = payload["models"]["vit_tiny_patch16_224"]
    for key in ("forward_bf16_img_s", "extract_all_bf16_img_s", "fullft_bf16_img_s",
                "inca_stream_bf16_img_s", "bank_size"):
        assert tiny[key] > 0, key
    assert tiny["bank_size"] == 12 * 2 * 2  # 12 blocks x 2 lrs x {InCA, linear}
    giant = payload["models"]["vit_small_patch14_dinov2"]
    assert giant["inca_stream_bf16_img_s"] > 0 and "fullft_bf16_img_s" not in giant
    assert {(r["n_images"], r["method"]) for r in payload["e2e"]} == {
        (n, m) for n in (32, 48) for m in ("inca", "full")}
    assert "InCA streaming step / plain bf16 forward" in (tmp_path / "gpu.md").read_text()


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
