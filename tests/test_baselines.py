"""Fine-tuning baselines change exactly the parameters they should; probes and InCA none."""

from __future__ import annotations

import pytest
import torch
from planted import planted_backbone, planted_data
from tiny import make_backbone

import inca
from inca.baselines.finetune import FineTuneConfig, finetune, trainable_parameter_names
from inca.errors import InCAError

BACKBONES = ["timm-vit", "torchvision", "planted"]


def _backbone(kind, tmp_path):
    return planted_backbone() if kind == "planted" else make_backbone(kind, tmp_path)


def _data(bb):
    from inca.data import load_dataset

    if bb.name == "planted":
        return planted_data(32, 0), planted_data(16, 1)
    return load_dataset("digits", limit=32), load_dataset("digits", split="test", limit=16)


@pytest.mark.parametrize("kind", BACKBONES)
@pytest.mark.parametrize("method", ["full", "last", "lora"])
def test_changes_exactly_what_it_trains(kind, method, tmp_path):
    bb = _backbone(kind, tmp_path)
    before = {k: v.clone() for k, v in bb.model.state_dict().items()}
    fp = bb.fingerprint()
    train, test = _data(bb)
    res = finetune(bb, train, test, test, FineTuneConfig(method=method, epochs=1,
                                                          batch_size=16), progress=False)
    # the caller's backbone is untouched
    assert bb.fingerprint() == fp
    for k, v in bb.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    trained = set(trainable_parameter_names(bb, method))
    assert trained
    if method == "lora":
        assert all("lora_" in n for n in trained)
    if method == "last":
        last = bb.layers[-1]
        assert all(n.startswith(tuple(f"{m}." for m in (last, *bb.layers[-2:]))) for n in trained)
    tuned = dict(res.model_.model.named_parameters())
    reached = {n for n in trained if tuned[n].grad is not None}  # on the path to the head
    assert len(reached) >= 0.8 * len(trained)
    for name, p in tuned.items():
        original = before.get(name.replace(".base_layer", ""))
        if name in reached:
            if original is not None:
                assert not torch.equal(p, original), f"{name} should have changed"
        else:  # not trained, or off the path (e.g. timm's final norm after blocks.3)
            assert original is None or torch.equal(p, original), f"{name} changed"
            assert original is not None or name in trained
    if method == "full":
        assert trained == set(dict(bb.model.named_parameters()))
    assert 0.0 <= res.val_accuracy <= 1.0 and 0.0 <= res.test_accuracy <= 1.0
    assert res.trainable_parameters > 0 and res.stored_bytes > 0


def test_storage_ordering_and_errors(tmp_path):
    bb = _backbone("timm-vit", tmp_path)
    train, test = _data(bb)
    sizes = {m: finetune(bb, train, test, None, FineTuneConfig(method=m, epochs=1),
                         progress=False).stored_bytes for m in ("full", "last", "lora")}
    assert sizes["full"] > sizes["last"] > sizes["lora"] > 0
    with pytest.raises(InCAError, match="method must be one of"):
        FineTuneConfig(method="adapters")


def test_probes_and_inca_leave_the_backbone_alone():
    bb = planted_backbone()
    before = {k: v.clone() for k, v in bb.model.state_dict().items()}
    inca.fit(bb, planted_data(64, 0), kinds=("inca", "linear", "multilayer_linear"),
             lrs=(1e-2,), epochs=1, progress=False)
    for k, v in bb.model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_layer_wise_learning_rate_decay(tmp_path):
    from inca.baselines.finetune import layer_decay_groups, prepare

    bb = _backbone("timm-vit", tmp_path)  # 4 blocks, then the final norm
    tuned, names = prepare(bb, FineTuneConfig(method="full"))
    groups = layer_decay_groups(tuned, names, 1e-3, 0.5)
    assert [g["depth"] for g in groups] == [0, 1, 2, 3, 4, 5]
    assert [g["lr"] for g in groups] == [1e-3 * 0.5 ** (5 - d) for d in range(6)]
    by_name = {id(p): g["depth"] for g in groups for p in g["params"]}
    params = dict(tuned.model.named_parameters())
    assert sum(len(g["params"]) for g in groups) == len(names)
    assert by_name[id(params["pos_embed"])] == 0 and by_name[id(params["norm.weight"])] == 5
    assert by_name[id(params["blocks.2.attn.qkv.weight"])] == 3
    flat = layer_decay_groups(tuned, names, 1e-3, 1.0)
    assert {g["lr"] for g in flat} == {1e-3}
    with pytest.raises(InCAError, match="layer_decay"):
        FineTuneConfig(layer_decay=1.5)


def test_the_copy_to_train_is_not_hashed(tmp_path, hashes):
    # Moving the copy (device=...) must not hash its weights: the hash costs seconds for a
    # large ViT and is stale once training starts. The caller's fingerprint stays as it was.
    bb = _backbone("timm-vit", tmp_path)
    fp = bb.fingerprint()
    hashed = hashes
    hashed.clear()
    train, test = _data(bb)
    res = finetune(bb, train, test, None, FineTuneConfig(method="last", epochs=1,
                                                          batch_size=16),
                   progress=False, device="cpu")
    assert hashed == []
    assert bb._fingerprint == fp and res.model_._fingerprint is None
    assert res.model_.fingerprint() != fp  # when asked: from the trained weights
    assert hashed == [res.model_]
