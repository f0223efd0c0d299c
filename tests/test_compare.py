"""inca compare: one run, every method in its own process, one table."""

from __future__ import annotations

import json

import pytest
from tiny import save_tiny_hf_vit
from typer.testing import CliRunner

from inca.baselines.compare import CompareConfig, summarise, to_markdown
from inca.cli import app
from inca.errors import InCAError


@pytest.mark.slow  # make test runs it; plain pytest skips it
def test_compare_cli_end_to_end(tmp_path):
    folder = save_tiny_hf_vit(tmp_path / "vit")
    out = tmp_path / "cmp"
    res = CliRunner().invoke(app, [
        "compare", "--backbone", f"hf:{folder}", "--data", "digits", "--out", str(out),
        "--methods", "full,linear,inca", "--epochs", "1", "--limit", "120", "--test-limit",
        "60", "--seeds", "2", "--batch-size", "16", "--equal-time", "--max-epochs", "4"])
    assert res.exit_code == 0, res.output
    result = json.loads((out / "compare.json").read_text())
    rows = {r["method"]: r for r in result["summary"]}
    timed = {"linear @ full's time", "inca @ full's time", "inca-ensemble @ full's time"}
    assert set(rows) == {"full", "linear", "inca", "inca-ensemble"} | timed
    for r in result["runs"]:  # given full's time: as many epochs as fit, up to 4
        if r["method"] in timed:
            assert 1 <= r["extra"]["epochs_run"] <= 4
    assert result["time_budget_s"] == rows["full"]["train_seconds"]
    assert rows["linear"]["seeds"] == 2 and rows["full"]["seeds"] == 1
    assert rows["full"]["reference"] == "full" and rows["full"]["time_vs_ref"] == 1.0
    assert rows["inca"]["stored_bytes"] < rows["full"]["stored_bytes"]
    for r in result["runs"]:
        if r["method"] in ("linear", "inca"):  # the shared extraction is counted in
            assert r["train_seconds"] >= r["extra"]["extract_seconds"]
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    md = (out / "compare.md").read_text()
    assert "| inca |" in md
    # each baseline's settings are stated
    assert "- full: every weight, lr 0.0002 at the top with layer-wise decay 0.75" in md
    assert "- linear: last layer, cls_mean pooling" in md
    assert "Rows `@ full's time`" in md



def test_config_and_summary():
    with pytest.raises(InCAError, match="unknown method"):
        CompareConfig(methods=("full", "magic"))
    with pytest.raises(InCAError, match="include 'full'"):
        CompareConfig(methods=("linear", "inca"), equal_time=True, device="cpu")
    with pytest.raises(InCAError, match="time_fraction"):
        CompareConfig(time_fraction=0, device="cpu")
    runs = [
        {"method": "full", "seed": 0, "test_accuracy": 0.9, "train_seconds": 100.0,
         "peak_rss_mib": 1000.0, "cuda_peak_mib": None, "trainable_parameters": 10,
         "stored_bytes": 1000},
        {"method": "inca", "seed": 0, "test_accuracy": 0.88, "train_seconds": 10.0,
         "peak_rss_mib": 300.0, "cuda_peak_mib": None, "trainable_parameters": 5,
         "stored_bytes": 20},
        {"method": "inca", "seed": 1, "test_accuracy": 0.86, "train_seconds": 99.0,
         "peak_rss_mib": 999.0, "cuda_peak_mib": None, "trainable_parameters": 5,
         "stored_bytes": 20},
    ]
    rows = {r["method"]: r for r in summarise(runs, backbone_bytes=1000)}
    assert rows["inca"]["test_accuracy_mean"] == pytest.approx(0.87)
    assert rows["inca"]["reference"] == "full"
    assert rows["inca"]["time_vs_ref"] == pytest.approx(0.1)  # seed 0's cost
    assert rows["inca"]["memory_vs_ref"] == pytest.approx(0.3)
    assert rows["inca"]["accuracy_minus_ref"] == pytest.approx(-0.03)
    assert rows["inca"]["stored_percent_of_backbone"] == pytest.approx(2.0)
    assert CompareConfig(device="cpu").seeds == 1  # a quick look by default

    # without full: ratios against the most accurate method, named in the columns; one seed
    # shows no "± 0.00"; the verdict leads with the winner and says who is slower
    cheap = [dict(r, method={"full": "linear"}.get(r["method"], r["method"])) for r in runs]
    cheap = [r for r in cheap if r["seed"] == 0]
    summary = summarise(cheap, backbone_bytes=1000)
    assert {r["reference"] for r in summary} == {"linear"}
    assert next(r for r in summary if r["method"] == "inca")["time_vs_ref"] == \
        pytest.approx(0.1)
    md = to_markdown({"config": {"data": "d", "limit": 1, "val_fraction": 0.1,
                                 "test_limit": 1, "epochs": 1, "batch_size": 1,
                                 "device": "cpu"},
                      "backbone": {"name": "b"}, "extraction": {}, "summary": summary,
                      "runs": cheap})
    assert "Δ vs best (linear)" in md and "n/a" not in md and "± 0.00" not in md
    assert "Verdict: linear is the most accurate (90.0%, 100.0 s); inca -2.0 points in " \
           "0.10x its time." in md
    assert md.index("Verdict") < md.index("| method |")


def test_config_checks_every_option_and_suggests():
    with pytest.raises(InCAError, match="did you mean 'lora'"):
        CompareConfig(methods=("full", "lorra"), device="cpu")
    for bad in ({"limit": 0}, {"lrs": (0.0,)}, {"batch_size": 0}, {"token_grid": 0},
                {"methods": ("inca", "inca")}, {"val_fraction": 1.0}):
        with pytest.raises(InCAError):
            CompareConfig(device="cpu", **bad)


def _fake_child(fail: dict[str, str]):
    """In-process stand-in for the child processes: a made-up run per job, or the error
    ``fail`` gives for its method."""
    from inca.baselines.compare import EXPENSIVE, Extraction, Run

    def child(job):
        if job.method in fail:
            raise InCAError(fail[job.method])
        if job.method == "extract":
            return Extraction(1.0, 10.0, None)
        assert (job.time_budget_s is not None) == job.equal_time  # full's time, when asked
        assert (job.extraction is None) == (job.method in EXPENSIVE or "extract" in fail)
        return [Run(job.label, job.seed, 0.5, 0.5, 10.0, 100.0, None, 10, 40,
                    {"epochs_run": 1})]

    return child


def test_compare_writes_what_finished(tmp_path, monkeypatch):
    from inca.baselines import compare

    folder = save_tiny_hf_vit(tmp_path / "vit")
    monkeypatch.setattr(compare, "run_in_child", _fake_child(
        {"lora": "prepare: no attention projections\nto put LoRA on"}))
    out = tmp_path / "cmp"
    res = CliRunner().invoke(app, [
        "compare", "--backbone", f"hf:{folder}", "--data", "digits", "--out", str(out),
        "--methods", "full,lora,linear", "--seeds", "1", "--limit", "60", "--test-limit", "30"])
    assert res.exit_code == 1, res.output
    assert "1 run(s) failed (lora)" in res.output
    result = json.loads((out / "compare.json").read_text())
    assert {r["method"] for r in result["summary"]} == {"full", "linear"}
    assert result["failures"] == [{"method": "lora", "seed": 0, "error": "InCAError: prepare: "
                                   "no attention projections to put LoRA on"}]
    md = (out / "compare.md").read_text()
    assert "| lora | 0 | failed |" in md and "- lora seed 0: InCAError: prepare" in md
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"


def test_compare_failed_extraction_and_full(tmp_path, monkeypatch):
    from inca.baselines import compare

    folder = save_tiny_hf_vit(tmp_path / "vit")
    monkeypatch.setattr(compare, "run_in_child", _fake_child({"extract": "disk full"}))
    config = CompareConfig(backbone=f"hf:{folder}", data="digits", methods=("full", "inca"),
                           seeds=1, limit=60, test_limit=30, device="cpu", equal_time=True)
    result = compare.run_compare(config, progress=False)
    assert [r["method"] for r in result["summary"]] == ["full"]
    failed = {f["method"]: f["error"] for f in result["failures"]}
    assert failed == {"inca": "the shared extraction failed: InCAError: disk full",
                      "inca @ full's time": "the shared extraction failed: InCAError: "
                                            "disk full"}
    monkeypatch.setattr(compare, "run_in_child", _fake_child({"full": "out of memory"}))
    result = compare.run_compare(config, progress=False)
    failed = {f["method"]: f["error"] for f in result["failures"]}
    assert failed["full"] == "InCAError: out of memory"
    assert "full fine-tuning failed" in failed["inca @ full's time"]
    assert [r["method"] for r in result["summary"]] == ["inca"]
    assert "n/a" in compare.to_markdown(result)  # no ratios without full


def test_lora_finds_the_attention_projections_of_current_transformers(tmp_path):
    import inca
    from inca.baselines.finetune import FineTuneConfig, _lora_targets, prepare

    bb = inca.create_backbone(f"hf:{save_tiny_hf_vit(tmp_path / 'vit')}")
    targets = _lora_targets(bb.model)  # q_proj/k_proj/v_proj (5) or query/key/value (4)
    assert len(targets) == 3 * len(bb.layers)
    assert {t.rsplit(".", 1)[-1] for t in targets} in ({"q_proj", "k_proj", "v_proj"},
                                                       {"query", "key", "value"})
    pytest.importorskip("peft")
    tuned, names = prepare(bb, FineTuneConfig(method="lora"))
    assert names and all("lora_" in n for n in names)


def test_compare_config_errors_are_config_errors():
    from inca.errors import ConfigError

    with pytest.raises(ConfigError, match="epochs, seeds and expensive_seeds"):
        CompareConfig(epochs=0, device="cpu")
