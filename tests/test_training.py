"""The adapter bank: batched == one by one, NaN stops, Open-InCA class-incremental."""

from __future__ import annotations

import math

import pytest
import torch
from tokens import LAYERS, C, D, N, token_bank, token_source

import inca.errors as inca_errors
from inca.training import AdapterBank, FitConfig, TrainingError, plan_members, train_bank
from inca.training.factory import MAX_ADAPTER_SHARE, build_adapter, narrow_attention
from inca.training.incremental import extend_adapters
from inca.training.plan import MemberSpec
from inca.training.sources import MemorySource, StackedFeats


def test_bank_keys_and_stacking():
    config = FitConfig(layers=LAYERS, kinds=("inca", "linear", "multilayer_linear"),
                       lrs=(1e-3, 1e-2))
    bank = token_bank(config)
    assert bank.keys[:2] == ["inca/l0/lr=0.001", "inca/l0/lr=0.01"]
    assert "multilayer_linear/3layers/lr=0.01" in bank.keys
    # one stack per (kind, lr), each holding a member per layer; single multi-layer probes
    assert [type(s).__name__ for s in bank.stacks] == ["StackedInCA"] * 2 + \
        ["StackedLinear"] * 2 + ["MultiLayerLinearProbe"] * 2
    assert [len(s) for s in bank.stacks[:4]] == [3] * 4
    assert [g["lr"] for g in bank.param_groups()] == [1e-3, 1e-2] * 3
    stacked = [f for f in bank._families if f.kind is not None]
    assert len(stacked) == 2 and all(f.layers == [(k,) for k in LAYERS] for f in stacked)
    feats, y = next(token_source(8, 0).batches(8))
    bank.eval()
    logits = bank.logits(feats)
    assert logits.shape == (len(bank.keys), 8, C)
    for i, s in enumerate(bank.specs):
        x = [feats[k] for k in s.layers] if len(s.layers) > 1 else feats[s.layers[0]]
        torch.testing.assert_close(logits[i], bank.export(i)(x), atol=1e-5, rtol=1e-5)



def test_member_seeds_come_from_the_spec_not_its_display_key(monkeypatch):
    specs = [MemberSpec("inca", ("blocks.7",), 1e-3), MemberSpec("inca:q4", ("l0", "l1"), 1e-2),
             MemberSpec("multilayer_linear", ("l0", "l1", "l2"), 1e-3)]
    assert [s.key for s in specs] == ["inca/blocks.7/lr=0.001", "inca:q4/l0+l1/lr=0.01",
                                      "multilayer_linear/3layers/lr=0.001"]
    # frozen: these seeds initialise every trained adapter, so results depend on them
    pinned = {0: [501792842, 1094104264, 52261534], 7: [508792863, 1101104285, 59261555]}
    assert {b: [s.seed(b) for s in specs] for b in pinned} == pinned
    assert MemberSpec("inca", ("blocks.7",), 0.5).seed(0) == pinned[0][0]  # lr aside
    # reformatting how members are shown changes no seed
    monkeypatch.setattr(MemberSpec, "key", property(lambda self: f"[{self.kind}]"))
    monkeypatch.setattr(MemberSpec, "name", property(lambda self: "renamed"))
    assert {b: [s.seed(b) for s in specs] for b in pinned} == pinned

def test_batched_bank_equals_adapters_trained_one_by_one():
    config = FitConfig(layers=LAYERS, kinds=("inca", "linear"), lrs=(1e-3, 1e-2), epochs=2,
                       batch_size=16, patience=0)
    train, val = token_source(64, 0), token_source(32, 1)
    bank = token_bank(config)
    together = train_bank(bank, train, val, config, progress=False)
    for i, spec in enumerate(bank.specs):
        alone = token_bank(config, [spec])
        res = train_bank(alone, train, val, config, progress=False)
        assert res.members[0].val_accuracy == pytest.approx(together.members[i].val_accuracy)
        for k, v in res.members[0].state.items():
            torch.testing.assert_close(v, together.members[i].state[k], atol=1e-5, rtol=1e-4)


def test_bank_finds_the_informative_layer_and_is_reproducible():
    config = FitConfig(layers=LAYERS, kinds=("inca", "linear"), lrs=(3e-3,), epochs=6,
                       batch_size=32)
    train, val = token_source(256, 0), token_source(128, 1)
    a = train_bank(token_bank(config), train, val, config, progress=False)
    b = train_bank(token_bank(config), train, val, config, progress=False)
    accs = {r.key: r.val_accuracy for r in a.members}
    assert accs["inca/l1/lr=0.003"] > 0.9 > accs["inca/l2/lr=0.003"] + 0.3
    assert [r.val_accuracy for r in a.members] == [r.val_accuracy for r in b.members]


def test_a_diverging_member_is_dropped_and_the_others_train_on():
    config = FitConfig(layers=LAYERS, kinds=("inca", "linear"), lrs=(3e-3,), epochs=3,
                       batch_size=16, patience=0)
    train, val = token_source(64, 0), token_source(32, 1)
    clean = train_bank(token_bank(config), train, val, config, progress=False)
    bank = token_bank(config)
    bad = bank.keys.index("linear/l2/lr=0.003")
    with torch.no_grad():  # an exploded member: its logits, hence its loss, are infinite
        for p, row in bank.member_slices(bad):
            p[row].fill_(float("inf"))
    with pytest.warns(RuntimeWarning, match=r"dropped linear/l2/lr=0.003: .* epoch 1 .* "
                                            r"no epoch to keep"):
        res = train_bank(bank, train, val, config, progress=False)
    assert res.members[bad].diverged_epoch == 1 and res.members[bad].val_accuracy == -1
    for p, row in bank.member_slices(bad):
        assert torch.isfinite(p[row] if row is not None else p).all()
    for i, (a, b) in enumerate(zip(clean.members, res.members, strict=True)):
        if i != bad:  # the others train exactly as without it
            assert b.diverged_epoch is None and b.val_accuracy == pytest.approx(a.val_accuracy)


def test_a_diverging_member_does_not_stop_the_others_under_16_mixed():
    """Under float16 a gradient scaler skips the whole step when any gradient is not
    finite: a diverged member's NaN gradients must not reach it."""
    config = FitConfig(layers=LAYERS, kinds=("inca", "linear"), lrs=(3e-3,), epochs=1,
                       batch_size=16, patience=0, precision="16-mixed")
    train, val = token_source(64, 0), token_source(32, 1)
    clean_bank = token_bank(config)
    train_bank(clean_bank, train, val, config, progress=False)
    bank = token_bank(config)
    start = [bank.member_state(i) for i in range(len(bank.keys))]
    bad = bank.keys.index("inca/l2/lr=0.003")
    with torch.no_grad():  # an exploded member: its own weights are infinite
        for p, row in bank.member_slices(bad):
            p[row].fill_(float("inf"))
    with pytest.warns(RuntimeWarning, match="dropped inca/l2/lr=0.003"):
        train_bank(bank, train, val, config, progress=False)
    for i in range(len(bank.keys)):
        if i != bad:  # the others took every step, exactly as without it
            moved = bank.member_state(i)
            assert any(not torch.equal(moved[k], start[i][k]) for k in moved)
            for k, v in clean_bank.member_state(i).items():
                torch.testing.assert_close(moved[k], v)


def test_stacked_feats_survive_being_moved_by_ddp():
    """DistributedDataParallel with device_ids moves its inputs with ``_recursive_to``,
    which rebuilds a dict subclass from its pairs (torch 2.11)."""
    from torch.distributed.utils import _recursive_to

    block = torch.randn(3, 2, N, D)
    feats = StackedFeats(block, LAYERS)
    [(moved,)] = _recursive_to((feats,), torch.device("meta"), False)  # [(inputs...)]
    assert isinstance(moved, StackedFeats) and moved.order == LAYERS
    assert moved.block.shape == block.shape and list(moved) == LAYERS
    same = StackedFeats(list(feats.items()))
    assert torch.equal(same.block, block) and same.order == LAYERS


def test_nan_everywhere_stops_with_a_clear_error():
    config = FitConfig(layers=LAYERS, kinds=("linear",), lrs=(1e-3,), epochs=1)
    train = token_source(32, 0)
    for k in LAYERS:
        train.feats[k][3, 0, 0] = float("nan")
    with pytest.raises(TrainingError, match=r"every adapter became NaN or infinite .*--lrs"):
        train_bank(token_bank(config), train, token_source(16, 1), config, progress=False)
    for lrs in ((float("nan"),), (float("inf"),), (0.0,)):
        with pytest.raises(inca_errors.InCAError, match="lrs must be positive finite"):
            FitConfig(lrs=lrs)


def test_a_fit_config_is_plain_data_that_round_trips_through_json():
    import json

    config = FitConfig(kinds=("inca", "linear"), lrs=(1e-3, 3e-3), layers=["l1"])
    d = config.to_dict()
    assert d["kinds"] == ["inca", "linear"] and d["lrs"] == [1e-3, 3e-3]
    assert set(d) == set(FitConfig.__dataclass_fields__)
    assert FitConfig.from_dict(json.loads(json.dumps(d))) == config


def test_open_inca_adds_classes_without_hurting_old_ones():
    torch.manual_seed(0)
    old, total = 3, 6
    config = FitConfig(layers=["l1"], kinds=("open_inca",), lrs=(1e-2,), epochs=8,
                       batch_size=32)

    def split(src: MemorySource, keep) -> MemorySource:
        m = keep(src.labels)
        return MemorySource({k: v[m] for k, v in src.feats.items()}, src.labels[m])

    full_train, full_val = token_source(600, 0, total), token_source(300, 1, total)
    first = [plan_members(["l1"], config)[0]]
    adapter = build_adapter(first[0], embed_dims={"l1": D}, num_prefix_tokens=1,
                            num_classes=old)
    bank = AdapterBank(first, [adapter])
    res = train_bank(bank, split(full_train, lambda y: y < old),
                     split(full_val, lambda y: y < old), config, progress=False)
    phase1 = bank.export(0, res.members[0].state)
    old_val = split(full_val, lambda y: y < old)
    feats, y = next(old_val.batches(len(old_val)))
    with torch.no_grad():
        before = phase1(feats["l1"])
    acc_before = float((before.argmax(-1) == y).float().mean())
    assert acc_before > 0.9

    (extended,), (chosen,) = extend_adapters([phase1], ["l1"], total - old, full_train,
                                             full_val, config)
    assert chosen["lr"] == 1e-2 and chosen["val_accuracy"] > 0.6
    with torch.no_grad():
        after = extended(feats["l1"])
    assert after.shape[1] == total
    torch.testing.assert_close(after[:, :old], before)  # old logits exactly unchanged
    acc_after = float((after.argmax(-1) == y).float().mean())  # now a 6-way decision
    assert acc_after >= acc_before - 0.02
    new_val = split(full_val, lambda y: y >= old)
    nf, ny = next(new_val.batches(len(new_val)))
    with torch.no_grad():
        # new classes are learned through the frozen shared attention: well above chance (1/6)
        assert float((extended(nf["l1"]).argmax(-1) == ny).float().mean()) > 0.6


def test_wide_layers_get_a_narrow_attention():
    assert narrow_attention(384, 10, 1, 22_000_000) is None  # DINOv2-S: 2.7%, full width
    spec = MemberSpec("inca", ("stage",), 1e-3)
    common = dict(embed_dims={"stage": 320}, num_prefix_tokens=0, num_classes=10,
                  backbone_params=3_500_000)  # MobileNetV2's size
    narrow = build_adapter(spec, **common)
    assert narrow.config.attn_dim == narrow_attention(320, 10, 1, 3_500_000) == 64
    assert narrow.num_parameters() <= MAX_ADAPTER_SHARE * 3_500_000
    full = build_adapter(spec, options={"inca": {"attn_dim": None}}, **common)
    assert full.config.attn_dim == 320 and full.num_parameters() > 0.1 * 3_500_000
    assert build_adapter(spec, embed_dims={"stage": 320}, num_prefix_tokens=0,
                         num_classes=10).config.attn_dim == 320  # no backbone size given
    # the width is counted with the member's own queries: 4 of them leave room for less
    assert narrow_attention(320, 10, 1, 3_600_000) == 80
    queries = build_adapter(spec, options={"inca": {"num_queries": 4}},
                            **{**common, "backbone_params": 3_600_000})
    assert queries.config.attn_dim == narrow_attention(320, 10, 4, 3_600_000) == 64
    assert queries.num_parameters() <= MAX_ADAPTER_SHARE * 3_600_000


@pytest.mark.parametrize("d, classes, queries, backbone", [
    (320, 10, 1, 3_500_000), (320, 100, 2, 5_000_000), (512, 10, 4, 9_000_000),
    (1280, 1000, 1, 60_000_000), (100, 10, 1, 1_380_000)])
def test_the_narrowed_attention_is_the_widest_that_fits(d, classes, queries, backbone):
    """Counted on the adapters themselves: the width chosen fits the budget, 16 more
    would not (unless it is already the least, 16). A width that is no multiple of 16
    (100) still gets a multiple of 16 (96), not 16 less than the full width (84)."""
    from inca.adapters import create_adapter

    def params(a: int) -> int:
        return create_adapter("inca", embed_dim=d, num_classes=classes, num_queries=queries,
                              attn_dim=a, num_heads=1).num_parameters()

    a = narrow_attention(d, classes, queries, backbone)
    budget = MAX_ADAPTER_SHARE * backbone
    assert a is not None and a % 16 == 0 and 16 <= a < d
    assert params(a) <= budget or a == 16
    assert a + 16 >= d or params(a + 16) > budget
    # at full width: None exactly when the whole adapter fits
    full = params(d)
    assert narrow_attention(d, classes, queries, math.ceil(full / MAX_ADAPTER_SHARE)) is None
    assert narrow_attention(d, classes, queries, int(full / MAX_ADAPTER_SHARE) - 1) is not None


def test_time_budget_sets_the_epochs_after_timing_the_first():
    train, val = token_source(64, 0), token_source(32, 1)
    base = dict(layers=LAYERS, kinds=("linear",), lrs=(1e-2,), batch_size=16, patience=0,
                epochs=20)
    short = FitConfig(**base, time_budget_s=1e-9)  # no time: the first epoch only
    assert train_bank(token_bank(short), train, val, short, progress=False).epochs_run == 1
    ample = FitConfig(**base, time_budget_s=1e9)  # all the time: every epoch asked for
    assert train_bank(token_bank(ample), train, val, ample, progress=False).epochs_run == 20
    with pytest.raises(inca_errors.InCAError, match="time_budget_s"):
        FitConfig(time_budget_s=0)


def test_variants_are_axes_of_one_bank():
    from inca.training import ConfigError

    config = FitConfig(layers=LAYERS, kinds=("inca", "inca:q4", "linear"), lrs=(3e-3,),
                       epochs=4, batch_size=32, patience=0,
                       adapter_options={"inca": {"num_heads": 2},
                                        "inca:q4": {"num_queries": 4}})
    bank = token_bank(config)
    assert "inca:q4/l1/lr=0.003" in bank.keys
    q4 = bank.export(bank.keys.index("inca:q4/l1/lr=0.003"))
    one = bank.export(bank.keys.index("inca/l1/lr=0.003"))
    assert (q4.config.num_queries, q4.config.num_heads) == (4, 2)  # its kind's, then its own
    assert (one.config.num_queries, one.config.num_heads) == (1, 2)
    assert len(bank.stacks) == 3  # the variant is a stack of its own
    res = train_bank(bank, token_source(256, 0), token_source(128, 1), config, progress=False)
    accs = {m.key: m.val_accuracy for m in res.members}
    assert accs["inca:q4/l1/lr=0.003"] > 0.9 and accs["inca/l1/lr=0.003"] > 0.9
    with pytest.raises(ConfigError, match="needs its settings"):
        FitConfig(kinds=("inca:q8",))
    with pytest.raises(ConfigError, match=r"has \['queries'\], not settings of 'inca'"):
        FitConfig(kinds=("inca:q",), adapter_options={"inca:q": {"queries": 4}})
    with pytest.raises(ConfigError, match="unknown adapter kind 'inka'"):
        FitConfig(kinds=("inka",))


def test_select_by_loss_picks_epochs_and_members_by_validation_loss():
    from inca.training import ConfigError
    from inca.training.selection import best_member, rank_members, top_k_ensemble

    config = FitConfig(layers=LAYERS, kinds=("inca", "linear"), lrs=(3e-3, 3e-2), epochs=5,
                       batch_size=32, patience=0, select_by="loss")
    res = train_bank(token_bank(config), token_source(128, 0), token_source(64, 1), config,
                     progress=False)
    losses = torch.tensor([h["val_loss"] for h in res.history])  # (epochs, K)
    for i, m in enumerate(res.members):
        assert m.best_epoch == int(losses[:, i].argmin())
        assert m.val_loss == pytest.approx(float(losses[:, i].min()))
    order = rank_members(res.members, "loss")
    assert [res.members[i].val_loss for i in order] == sorted(m.val_loss for m in res.members)
    assert best_member(res, "loss").member_indices == order[:1]
    ens = top_k_ensemble(res, 3, "loss")
    assert ens.member_indices == order[:3] and 0 < ens.val_loss < 10
    by_acc = rank_members(res.members, "accuracy")
    assert res.members[by_acc[0]].val_accuracy == max(m.val_accuracy for m in res.members)
    with pytest.raises(ConfigError, match="select_by must be 'accuracy' or 'loss'"):
        FitConfig(select_by="auc")


def test_adapters_reading_adjacent_layers_stack_and_export():
    config = FitConfig(layers=LAYERS, kinds=("inca", "inca:w2"), lrs=(3e-3,), epochs=3,
                       batch_size=32, patience=0, adapter_options={"inca:w2": {"num_layers": 2}})
    specs = plan_members(LAYERS, config)
    assert [s.key for s in specs if s.kind == "inca:w2"] == \
        ["inca:w2/l0+l1/lr=0.003", "inca:w2/l1+l2/lr=0.003"]
    wide = plan_members(LAYERS, config, {"l0": D, "l1": D, "l2": 2 * D})
    assert [s.layers for s in wide if s.kind == "inca:w2"] == [("l0", "l1")]  # not across widths
    bank = token_bank(config)
    assert len(bank.stacks) == 2  # windows of 2 layers stack as (L'=2, B, 2N, D)
    feats, _ = next(token_source(8, 0).batches(8))
    bank.eval()
    logits = bank.logits(feats)
    for i, s in enumerate(bank.specs):
        adapter = bank.export(i)
        x = [feats[k] for k in s.layers] if len(s.layers) > 1 else feats[s.layers[0]]
        torch.testing.assert_close(logits[i], adapter(x), atol=1e-5, rtol=1e-5)
    res = train_bank(bank, token_source(256, 0), token_source(128, 1), config, progress=False)
    accs = {m.key: m.val_accuracy for m in res.members}
    assert accs["inca:w2/l0+l1/lr=0.003"] > 0.9  # the window holding the signal layer learns
    with pytest.raises(TrainingError, match="reads 4 adjacent layers"):
        plan_members(LAYERS, FitConfig(kinds=("inca",), adapter_options={"inca": {
            "num_layers": 4}}))


def test_fused_adamw_is_chosen_before_the_first_step(monkeypatch):
    """torch checks fused AdamW's devices only at its first step: the choice is made up
    front, and a device without the kernel trains with the plain AdamW."""
    import torch.utils._foreach_utils as foreach_utils

    from inca.training.loop import _adamw

    bank = token_bank(FitConfig(layers=LAYERS, kinds=("linear",), lrs=(1e-3,)))
    assert _adamw(bank.param_groups(), 0.0).defaults["fused"]
    monkeypatch.setattr(foreach_utils, "_get_fused_kernels_supported_devices",
                        lambda: ["cuda"])  # as if the CPU had no fused kernel
    opt = _adamw(bank.param_groups(), 0.0)
    assert not opt.defaults["fused"]
    feats, y = next(token_source(8, 0).batches(8))
    bank_loss = torch.nn.functional.cross_entropy(bank(feats)[0], y)
    bank_loss.backward()
    opt.step()  # the plain kernel: no late "fused unsupported" error


@pytest.mark.parametrize("select_by, shown_as, order", [("loss", "best_val_loss", -1),
                                                       ("accuracy", "best_val_acc", 1)])
def test_the_progress_bar_shows_the_selection_measure_which_only_improves(
        monkeypatch, select_by, shown_as, order):
    """The bar shows the best validation value of the measure selection uses (by loss, an
    accuracy at the best loss could go down from one epoch to the next)."""
    import inca.training.loop as loop

    shown: list[dict] = []

    class Bar:
        def __init__(self, *a, **k) -> None:
            self.total = k.get("total")

        def update(self, n: int) -> None: ...

        def close(self) -> None: ...

        def set_postfix(self, values: dict) -> None:
            shown.append(values)

    monkeypatch.setattr(loop, "progress_bar", Bar)  # tqdm, or plain lines in a log
    config = FitConfig(layers=LAYERS, kinds=("inca", "linear"), lrs=(3e-3,), epochs=4,
                       batch_size=16, patience=0, select_by=select_by)
    train_bank(token_bank(config), token_source(64, 0), token_source(32, 1), config)
    assert [sorted(v) for v in shown] == [sorted(["epoch", shown_as])] * 4
    values = [float(v[shown_as]) for v in shown]
    assert values == sorted(values, reverse=order < 0) and len(set(values)) > 1


@pytest.mark.parametrize("patience", [2, 3])
def test_early_stopping_waits_patience_epochs_and_keeps_each_best_state(monkeypatch, patience):
    """Training stops after ``patience`` epochs in which no member improved on validation
    (scripted here), and each member keeps its state from its own best epoch."""
    import inca.training.loop as loop
    from inca.training.evaluation import ValScores

    # validation losses per epoch (rows) of the 3 members: the last improvement is member
    # 1's in epoch 3; after `patience` epochs without one, every member would improve again
    script = torch.tensor([[1.0, 1.0, 1.0], [0.5, 0.9, 2.0], [0.6, 0.8, 2.0]]
                          + [[0.7, 0.85, 2.0]] * patience + [[0.1, 0.1, 0.1]] * 7,
                          dtype=torch.float64)
    states = []  # every member's weights as each epoch is scored

    def scripted(bank, source, batch_size, precision="32", ensembles=(), **_):
        assert not ensembles  # ensemble_k=1: no ensemble is scored
        states.append([bank.member_state(i) for i in range(len(bank.keys))])
        return ValScores(torch.full((3,), 0.5), script[len(states) - 1], 64)

    monkeypatch.setattr(loop, "evaluate", scripted)
    config = FitConfig(layers=LAYERS, kinds=("linear",), lrs=(1e-2,), epochs=10,
                       batch_size=32, patience=patience, ensemble_k=1)
    res = train_bank(token_bank(config), token_source(64, 0), token_source(32, 1), config,
                     progress=False)
    assert res.epochs_run == 3 + patience  # epoch 3, then `patience` epochs in vain
    assert len(states) == res.epochs_run
    assert [m.best_epoch for m in res.members] == [1, 2, 0]
    assert [m.val_loss for m in res.members] == [0.5, 0.8, 1.0]
    for i, m in enumerate(res.members):
        best, last = states[m.best_epoch][i], states[-1][i]
        assert all(torch.equal(m.state[k], best[k]) for k in best), f"{m.key}: not its best"
        assert not all(torch.equal(m.state[k], last[k]) for k in last)  # it trained on


@pytest.mark.parametrize("batch_size, lr", [(64, 1e-2), (16, 1e-9)])
def test_an_epochs_training_loss_is_the_mean_loss_of_its_samples(batch_size, lr):
    """One step per epoch (the batch holds every sample): epoch 1's training loss of each
    member is its label-smoothed cross-entropy over the training set before that step. In
    4 batches of 16, 16, 16 and 2 (steps too small to move the weights) it is the same mean,
    over every sample."""
    from inca.training.loss import bank_loss

    config = FitConfig(layers=LAYERS, kinds=("inca", "linear"), lrs=(lr,), epochs=1,
                       batch_size=batch_size, patience=0, label_smoothing=0.1,
                       adapter_options={"inca": {"dropout": 0.0}})
    bank, train = token_bank(config), token_source(50, 0)
    feats, y = next(train.batches(64))
    bank.train()
    with torch.no_grad():
        expected = bank_loss(bank.logits(feats), y, 0.1)
    res = train_bank(bank, train, token_source(16, 1), config, progress=False)
    torch.testing.assert_close(torch.tensor(res.history[0]["train_loss"]), expected,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("patience, improves, epochs_run", [
    (2, [True, False, True, False, False, True, True], 5),  # stale for 2 epochs after epoch 3
    (1, [True, False, True], 2),
    (0, [True, False, False, False], 4),  # 0: never stop early
    (3, [True, True, True, True], 4),  # the epoch budget ends it
    (2, [False, False, True], 2),  # a first epoch without improvement counts too
])
def test_early_stopping_after_patience_epochs_without_improvement(patience, improves,
                                                                  epochs_run, monkeypatch):
    from inca.training import loop

    keep_best, script = loop._keep_best, iter(improves)

    def scripted(*args, **kwargs):
        keep_best(*args, **kwargs)  # the states are still recorded
        return next(script)

    monkeypatch.setattr(loop, "_keep_best", scripted)
    config = FitConfig(layers=LAYERS, kinds=("linear",), lrs=(1e-2,), epochs=len(improves),
                       batch_size=16, patience=patience)
    res = train_bank(token_bank(config), token_source(32, 0), token_source(16, 1), config,
                     progress=False)
    assert res.epochs_run == epochs_run == len(res.history)
    assert [h["epoch"] for h in res.history] == list(range(1, epochs_run + 1))


@pytest.mark.parametrize("field, value, message", [
    ("token_grid", 0, "token_grid must be positive, got 0"),
    ("warmup_epochs", float("inf"), "patience, weight_decay and warmup_epochs must be >= 0"),
    ("weight_decay", -1e-3, "patience, weight_decay and warmup_epochs must be >= 0"),
    ("label_smoothing", 1.0, r"label_smoothing must be in \[0, 1\), got 1.0"),
    ("cache_budget_gb", -1.0, "cache_budget_gb must be >= 0, got -1.0"),
    ("val_fraction", 1.0, r"val_fraction must be in \(0, 1\), got 1.0"),
    ("val_fraction", 0.0, r"val_fraction must be in \(0, 1\), got 0.0"),
    ("cache_dtype", "int8", "cache_dtype must be float16 or float32, got 'int8'"),
    ("lrs", (1e-3, 0.0), r"lrs must be positive finite numbers, got \[0.001, 0.0\]"),
    ("epochs", 0, "epochs must be at least 1, got 0"),
    ("kinds", (), "kinds must name at least one adapter kind"),
])
def test_fit_config_refuses_values_out_of_bounds_by_name(field, value, message):
    from inca.training import ConfigError

    with pytest.raises(ConfigError, match=f"^{message}$"):
        FitConfig(**{field: value})


def test_fit_config_accepts_the_edges_of_its_bounds():
    config = FitConfig(token_grid=1, label_smoothing=0.0, warmup_epochs=0, weight_decay=0.0,
                       cache_budget_gb=0.0, val_fraction=0.01, patience=0, epochs=1)
    assert (config.token_grid, config.label_smoothing, config.cache_budget_gb) == (1, 0.0, 0.0)


class _OneBadStep:
    """A source whose ``bad_call``-th pass holds infinite ``layer`` tokens in its first
    batch only: the members reading that layer see non-finite logits in one step."""

    def __init__(self, source, layer: str, bad_call: int) -> None:
        self.source, self.layer, self.bad_call, self.calls = source, layer, bad_call, 0

    def __len__(self) -> int:
        return len(self.source)

    def batches(self, *args, **kwargs):
        self.calls += 1
        for step, (feats, y) in enumerate(self.source.batches(*args, **kwargs)):
            if self.calls == self.bad_call and step == 0:
                feats = {**feats, self.layer: torch.full_like(feats[self.layer], float("inf"))}
            yield feats, y


@pytest.mark.parametrize("precision", ["32", "16-mixed"])
def test_a_member_non_finite_in_one_step_is_dropped_and_keeps_its_best_epoch(precision):
    """A member whose logits are not finite in any one step of an epoch is dropped at the
    epoch's end, even if its later steps are finite (under 16-mixed its weights stay finite:
    its gradients are masked), and keeps its best epoch's state."""
    config = FitConfig(layers=LAYERS, kinds=("linear",), lrs=(3e-3,), epochs=3,
                       batch_size=16, patience=0, precision=precision)
    bank = token_bank(config)
    train = _OneBadStep(token_source(64, 0), "l2", bad_call=2)  # epoch 2's first step
    with pytest.warns(RuntimeWarning) as caught:
        res = train_bank(bank, train, token_source(32, 1), config, progress=False)
    [message] = [str(w.message) for w in caught]
    assert message.startswith("dropped linear/l2/lr=0.003: its training loss became NaN or "
                              "infinite in epoch 2 (")
    assert message.endswith("; kept its best epoch (1)")
    assert [m.diverged_epoch for m in res.members] == [None, None, 2]
    assert [m.best_epoch for m in res.members][2] == 0 and len(res.history) == 3


def test_every_member_diverging_names_the_epoch_and_the_fix():
    config = FitConfig(layers=LAYERS, kinds=("linear",), lrs=(3e-3,), epochs=3,
                       batch_size=16, patience=0)
    train = token_source(64, 0)
    for k in LAYERS:
        train = _OneBadStep(train, k, bad_call=2)
    with pytest.raises(TrainingError, match=r"^the training loss of every adapter became NaN "
                                            r"or infinite by epoch 2; lower the learning rates "
                                            r"\(--lrs\) or check the inputs for NaN/inf$"):
        train_bank(token_bank(config), train, token_source(32, 1), config, progress=False)


def test_a_variant_named_with_colons_keeps_its_base_kinds_reading():
    """``multilayer_linear:a:b`` is a variant of ``multilayer_linear`` (the name before the
    first colon): one member per lr reading every layer, not one per layer."""
    kind = "multilayer_linear:a:b"
    config = FitConfig(kinds=(kind,), lrs=(1e-3,), adapter_options={kind: {}})
    assert plan_members(["x", "y"], config) == [MemberSpec(kind, ("x", "y"), 1e-3)]


def test_the_probe_reads_cls_and_mean_tokens_counts_its_iterations_and_picks_by_measure(
        monkeypatch):
    """The logistic-regression baseline: CLS ⊕ mean patch token where there is a prefix
    token (the mean alone on CNN layers); L-BFGS's own iteration count (capped at
    ``max_iter``); the best layer by the selection's measure."""
    import inca.training.probe as probe

    assert (probe.probe_features(1, None).pool, probe.probe_features(0, None).pool) == (
        "cls_mean", "mean")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 5, generator=g), torch.randint(0, 3, (64,), generator=g)
    capped, free = (probe.fit_logistic(x, y, 3, 1e-3, **k)[2] for k in ({"max_iter": 5}, {}))
    assert 1 <= capped <= 5 < free <= probe.MAX_ITER
    scores = {"l0": (0.9, 0.8), "l1": (0.8, 0.3), "l2": (0.5, 1.0)}  # (accuracy, loss)

    def scripted(x, y, xv, yv, num_classes, select_by):
        layer = next(k for k, (a, _) in scores.items() if a == round(float(x[0, 0]), 1))
        return {"val_accuracy": scores[layer][0], "val_loss": scores[layer][1]}

    monkeypatch.setattr(probe, "fit_layer", scripted)
    feats = {k: torch.full((8, 2, 4), a) for k, (a, _) in scores.items()}  # x[0, 0]: a
    source = MemorySource(feats, torch.arange(8) % 3)
    linear = probe.probe_features(0, {"linear": {"norm": False}})
    for select_by, best in (("accuracy", "l0"), ("loss", "l1")):
        out = probe.probe_baseline(source, source, None, LAYERS, linear, 3,
                                   select_by=select_by, batch_size=4)
        assert (out["best_layer"]["layer"], out["last_layer"]["layer"]) == (best, "l2")


def test_the_probe_fits_a_seeded_sample_and_runs_small_problems_in_one_thread(monkeypatch):
    """Over ``keep`` samples the probe fits a random ``keep`` of them, drawn from the fit's
    seed: the same seed, the same fits. L-BFGS on a small CPU problem (features x classes
    under 2**22) runs in one thread; a larger one in all of torch's."""
    import inca.training.probe as probe

    real = probe.pooled
    monkeypatch.setattr(probe, "pooled", lambda *a, **k: real(*a, keep=24, **k))
    linear = probe.probe_features(1, None)
    train, val = token_source(64, 0), token_source(48, 1)
    runs = [probe.probe_baseline(train, val, None, LAYERS, linear, C, select_by="loss",
                                 batch_size=16, seed=seed) for seed in (3, 3, 4)]
    assert [(r["train_samples"], r["val_samples"]) for r in runs] == [(24, 24)] * 3
    assert runs[0]["per_layer"] == runs[1]["per_layer"] != runs[2]["per_layer"]

    threads, real_threads = [], probe._threads
    monkeypatch.setattr(probe, "_threads", lambda n: threads.append(n) or real_threads(n))
    for n in (64, 2**22 // 4 // 64):  # x (n, 64), 4 classes: 2**14, then 2**22 numbers
        x, y = torch.randn(n, 64), torch.arange(n) % 4
        probe.fit_logistic(x, y, 4, 1e-3, max_iter=1)
    assert threads == [1, None]
