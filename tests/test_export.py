"""``inca export``: a saved task as one ONNX model or ``torch.export`` program whose output
equals ``Task.predict_proba``, at any batch size, with named input and output."""

from __future__ import annotations

import pytest
import torch
from tiny import images, make_backbone, random_task
from typer.testing import CliRunner

from inca.cli import app
from inca.task import load_task


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A task on a random-weight timm ViT (rebuilt from its record), saved."""
    tmp = tmp_path_factory.mktemp("export")
    return random_task(make_backbone("timm-vit", tmp), token_grid=2).save(tmp / "task")


@pytest.mark.parametrize("fmt", ["onnx", "export"])
def test_export_equals_predict_proba_at_any_batch_size(saved, tmp_path, fmt):
    out = tmp_path / ("task.onnx" if fmt == "onnx" else "task.pt2")
    if fmt == "onnx":
        pytest.importorskip("onnxscript")
    res = CliRunner().invoke(app, ["export", "--task", str(saved), "--out", str(out),
                                   "--format", fmt])
    assert res.exit_code == 0, res.output
    assert "input 'images'" in res.output and "output 'probabilities'" in res.output
    task = load_task(saved)
    for n in (1, 3):  # exported with a batch of 2: the batch is dynamic
        pixels = images(n, seed=n)
        expected = task.predict_proba(pixels).numpy()
        if fmt == "onnx":
            ort = pytest.importorskip("onnxruntime")
            session = ort.InferenceSession(str(out))
            assert [i.name for i in session.get_inputs()] == ["images"]
            assert [o.name for o in session.get_outputs()] == ["probabilities"]
            got = session.run(None, {"images": pixels.numpy()})[0]
        else:
            with torch.no_grad():
                got = torch.export.load(out).module()(pixels).numpy()
        assert got.shape == expected.shape
        torch.testing.assert_close(torch.from_numpy(got), torch.from_numpy(expected),
                                   atol=1e-5, rtol=1e-4)


def test_export_refuses_an_unknown_format_and_names_a_missing_exporter(saved, tmp_path,
                                                                       monkeypatch):
    res = CliRunner().invoke(app, ["export", "--task", str(saved), "--out",
                                   str(tmp_path / "x"), "--format", "tflite"])
    assert res.exit_code == 2 and "--format" in res.output and "onnx" in res.output
    import sys

    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if not installed
    res = CliRunner().invoke(app, ["export", "--task", str(saved), "--out",
                                   str(tmp_path / "x.onnx")])
    assert res.exit_code == 2 and 'pip install "inca[export]"' in res.output, res.output
    assert not (tmp_path / "x.onnx").exists()
