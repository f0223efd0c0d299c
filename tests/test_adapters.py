"""Adapters: folded attention == nn.MultiheadAttention, shapes of every kind, configs,
stacked == unstacked (forward and training), Open-InCA class-incremental invariance,
parameter counts, safetensors round trips."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from inca.adapters import (
    AdapterError,
    InCAAdapter,
    InCAConfig,
    LinearConfig,
    LinearProbe,
    MultiLayerLinearConfig,
    MultiLayerLinearProbe,
    OpenInCAAdapter,
    OpenInCAConfig,
    StackedInCA,
    StackedLinear,
    adapter_from_spec,
    create_adapter,
    default_num_heads,
    list_adapters,
    parameter_report,
)
from inca.adapters.base import check_tokens

B, N, D, C = 3, 9, 32, 5
LAYERS = ["blocks.1", "blocks.3"]

# Every registered kind with the config it is tested under; the matrix tests below fail
# for a kind registered without an entry here.
KINDS: dict[str, dict] = {
    "inca": {"num_heads": 4, "num_queries": 2},
    "open_inca": {"num_heads": 2},
    "linear": {"pool": "cls_mean"},
    "multilayer_linear": {"layers": LAYERS, "pool": "mean", "num_prefix_tokens": 1},
}


def _inputs(kind: str, dtype: torch.dtype = torch.float32, b: int = B):
    if kind == "multilayer_linear":
        return {name: torch.randn(b, N, D, dtype=dtype) for name in LAYERS}
    return torch.randn(b, N, D, dtype=dtype)


def _randomize(module: nn.Module, seed: int = 1) -> nn.Module:
    """Random values everywhere (LN affine and biases included), so folds are exercised."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.4)
    return module


def _mha_like(adapter: InCAAdapter | OpenInCAAdapter) -> nn.MultiheadAttention:
    w = adapter.in_proj_weight
    mha = nn.MultiheadAttention(adapter.embed_dim, adapter.config.num_heads, batch_first=True,
                                dtype=w.dtype)
    mha.load_state_dict({
        "in_proj_weight": adapter.in_proj_weight, "in_proj_bias": adapter.in_proj_bias,
        "out_proj.weight": adapter.out_proj.weight, "out_proj.bias": adapter.out_proj.bias,
    })
    return mha.eval()


def test_registry_lists_every_kind_tested():
    assert sorted(a["name"] for a in list_adapters()) == sorted(KINDS)


# -- the folded attention against nn.MultiheadAttention ------------------------------------
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("num_heads,num_queries", [(1, 1), (4, 1), (4, 3), (8, 2)])
def test_folded_attention_equals_multihead_attention(dtype, tol, num_heads, num_queries):
    cfg = InCAConfig(num_heads=num_heads, num_queries=num_queries)
    adapter = _randomize(InCAAdapter(D, C, cfg, dtype=dtype)).eval()
    torch.manual_seed(2)
    z = torch.randn(B, N, D, dtype=dtype) * 3 + 1
    out, weights = adapter.attend(z, need_weights=True)

    mha = _mha_like(adapter)
    x = adapter.token_norm(z)  # LN(z)
    q = adapter.query.expand(B, -1, -1)  # the same learned queries for every image
    ref, ref_weights = mha(q, x, x, need_weights=True, average_attn_weights=False)
    assert out.shape == (B, num_queries, D) and weights.shape == (B, num_heads, num_queries, N)
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    torch.testing.assert_close(weights, ref_weights, atol=tol, rtol=tol)
    torch.testing.assert_close(weights.sum(-1), torch.ones_like(weights.sum(-1)))


def test_folded_float32_is_accurate_for_tokens_with_an_offset():
    # The folded form computes LayerNorm statistics in one pass (E[z²] - μ²), whose error
    # grows with |mean| / std of a token; real layers stay below 2, test 5.
    adapter = _randomize(InCAAdapter(D, C, InCAConfig(num_heads=4))).eval()
    exact = InCAAdapter(D, C, InCAConfig(num_heads=4), dtype=torch.float64)
    exact.load_state_dict({k: v.double() for k, v in adapter.state_dict().items()})
    z = torch.randn(B, N, D) + 5.0
    ref = exact.attend(z.double())
    torch.testing.assert_close(adapter.attend(z).double(), ref, rtol=1e-5,
                               atol=1e-5 * ref.abs().max().item())


def _graph(out: torch.Tensor) -> set[str]:
    """The names of the autograd nodes ``out`` was computed through."""
    names, todo, seen = set(), [out.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is not None and node not in seen:
            seen.add(node)
            names.add(type(node).__name__)
            todo.extend(n for n, _ in node.next_functions)
    return names


def test_training_eagerly_takes_the_custom_key_gradient():
    """The score matmul's own backward (the keys' gradient as gᵀ @ tokens, faster on CPU)
    is autograd's gradient, and it is the one taken while the keys learn; with frozen
    adapters the plain matmul's is (its tokens still get a gradient)."""
    from inca.adapters._folded import _Scores

    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(2, 7, 6, dtype=torch.float64, generator=g, requires_grad=True)
    keys = torch.randn(2, 3, 6, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(_Scores.apply, (tokens, keys))
    stack = StackedInCA(2, D, C, InCAConfig(num_heads=4))
    z = torch.randn(2, B, N, D, requires_grad=True)
    assert "_ScoresBackward" in _graph(stack(z))
    stack.requires_grad_(False)
    assert "_ScoresBackward" not in _graph(stack(z)) and "BmmBackward0" in _graph(stack(z))


def test_the_skipped_prefix_is_masked_on_the_tokens_device():
    """The mask of the leading tokens a row skips is made where the tokens are: on the meta
    device here, where a mask made on the CPU fails as it would next to CUDA tokens."""
    from inca.adapters._folded import _attend, _layout, fold_keys

    meta = torch.device("meta")
    cfg = InCAConfig(num_heads=4, attend_prefix=False, num_prefix_tokens=2)
    stack = StackedInCA(2, D, C, cfg, device=meta)
    with torch.no_grad():
        lay = _layout(((0, 0),), (4,), (2,), 1, meta)  # 2 adapters x 4 heads, skipping 2
        attn, _, _ = _attend(torch.randn(1, B, N, D, device=meta),
                             [fold_keys(stack.attention_params(), 4)], lay, 1e-6)
    assert attn.is_meta and attn.shape == (1, B, 8, N)


def test_open_inca_attention_equals_multihead_attention():
    adapter = _randomize(OpenInCAAdapter(D, C, OpenInCAConfig(num_heads=4),
                                         dtype=torch.float64)).eval()
    adapter.add_classes(2)
    z = torch.randn(B, N, D, dtype=torch.float64)
    x = adapter.token_norm(z)
    queries = torch.cat(list(adapter.queries)).expand(B, -1, -1)  # (B, C, D): one per class
    ref, _ = _mha_like(adapter)(queries, x, x)
    torch.testing.assert_close(adapter.attend(z), ref, atol=1e-10, rtol=1e-10)


# -- one matrix over every kind ------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_shapes_gradients_and_half_inputs(kind):
    torch.manual_seed(0)
    adapter = create_adapter(kind, embed_dim=D, num_classes=C, **KINDS[kind])
    logits = adapter(_inputs(kind))
    assert logits.shape == (B, C) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    logits.square().sum().backward()
    assert all(p.grad is not None for p in adapter.parameters())
    # fp16 tokens (as the activation cache stores them) feed an fp32 adapter.
    assert adapter(_inputs(kind, torch.float16)).dtype == torch.float32


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_config_json_round_trip(kind):
    adapter = create_adapter(kind, embed_dim=D, num_classes=C, **KINDS[kind])
    cfg = adapter.config
    data = json.loads(json.dumps(cfg.to_dict()))
    assert type(cfg).from_dict(data) == cfg
    spec = json.loads(json.dumps(adapter.spec()))
    assert spec["kind"] == kind
    assert adapter_from_spec(spec).config == cfg


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_safetensors_round_trip(kind, tmp_path):
    torch.manual_seed(0)
    adapter = create_adapter(kind, embed_dim=D, num_classes=C, **KINDS[kind]).eval()
    if kind == "open_inca":
        adapter.add_classes(2)  # several class groups: the layout must survive too
    path = tmp_path / "adapter.safetensors"
    save_file(adapter.state_dict(), path)
    (tmp_path / "adapter.json").write_text(json.dumps(adapter.spec()))

    loaded = adapter_from_spec(json.loads((tmp_path / "adapter.json").read_text())).eval()
    loaded.load_state_dict(load_file(path))
    x = _inputs(kind)
    assert torch.equal(adapter(x), loaded(x))


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_parameter_counts(kind):
    adapter = create_adapter(kind, embed_dim=D, num_classes=C, **KINDS[kind])
    total = sum(p.numel() for p in adapter.parameters())
    assert adapter.num_parameters() == total
    report = parameter_report(adapter, 100 * total)
    assert report["parameters"] == total == report["trainable_parameters"]
    assert report["percent_of_backbone"] == pytest.approx(1.0)
    assert report["kind"] == kind


def test_parameter_counts_by_formula():
    q, c, d = 2, 7, 64
    inca = InCAAdapter(d, c, InCAConfig(num_queries=q))
    # query, token LN, in_proj, out_proj, output LN, classifier
    assert inca.num_parameters() == q * d + 2 * d + 3 * d * d + 3 * d + d * d + d + 2 * d + (
        d * c + c)
    concat = InCAAdapter(d, c, InCAConfig(num_queries=q, query_reduce="concat"))
    assert concat.num_parameters() - inca.num_parameters() == (q - 1) * d * c
    assert LinearProbe(d, c).num_parameters() == 2 * d * c + c  # CLS ⊕ mean by default
    assert LinearProbe(d, c, LinearConfig(pool="cls")).num_parameters() == d * c + c
    ml = create_adapter("multilayer_linear", embed_dim=d, num_classes=c, layers=["a", "b"],
                        layer_dims=[d, 2 * d])
    assert ml.num_parameters() == 2 * 3 * d * c + c
    open_inca = OpenInCAAdapter(d, c)
    shared = 2 * d + 3 * d * d + 3 * d + d * d + d
    assert open_inca.num_parameters() == shared + c * (2 * d + 1)
    open_inca.add_classes(3)
    assert open_inca.num_parameters(trainable_only=True) == 3 * (2 * d + 1)
    stack = StackedInCA(4, d, c)
    assert stack.num_parameters() == 4 * InCAAdapter(d, c).num_parameters()
    stack.query.requires_grad_(False)
    # four members' one query each, frozen: left out of the trainable count
    assert stack.num_parameters(trainable_only=True) == stack.num_parameters() - 4 * d
    assert parameter_report(inca, nn.Linear(100, 100))["backbone_parameters"] == 10100


# -- configs -------------------------------------------------------------------------------
def test_default_heads():
    assert [default_num_heads(d) for d in (384, 768, 1024, 192, 32, 2048)] == [4, 8, 8, 2, 1, 8]
    assert InCAAdapter(384, 10).config.num_heads == 4


def test_config_classes_round_trip_and_refuse_unknown_fields():
    cfg = MultiLayerLinearConfig(layers=["a", "b"], layer_dims=[8, 16], norm=False)
    assert cfg.to_dict()["layers"] == ["a", "b"]
    assert MultiLayerLinearConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert OpenInCAConfig.from_dict({"class_groups": [3, 2]}).class_groups == (3, 2)
    assert InCAConfig().replace(num_queries=4).num_queries == 4
    with pytest.raises(AdapterError, match="num_queries"):
        InCAConfig().replace(num_queries=-1)
    with pytest.raises(AdapterError, match="unknown LinearConfig field"):
        LinearConfig.from_dict({"pooling": "cls"})


@pytest.mark.parametrize(
    "kind,cfg,match",
    [
        ("inca", {"num_heads": 5}, "not divisible"),
        ("inca", {"num_heads": 0}, "num_heads"),
        ("inca", {"num_queries": 0}, "num_queries"),
        ("inca", {"query_reduce": "max"}, "query_reduce"),
        ("inca", {"dropout": 1.0}, "dropout"),
        ("inca", {"heads": 4}, "unknown InCAConfig field"),
        ("open_inca", {"class_groups": [2, 2]}, "add up to"),
        ("linear", {"pool": "max"}, "pool"),
        ("linear", {"pool": "cls", "num_prefix_tokens": 0}, "no CLS"),
        ("linear", {"num_prefix_tokens": -1}, "num_prefix_tokens"),
        ("multilayer_linear", {}, "needs layers"),
        ("multilayer_linear", {"layers": ["a", "a"]}, "distinct"),
        ("multilayer_linear", {"layers": ["a", "b"], "layer_dims": [4]}, "layer_dims"),
        ("nope", {}, "^unknown adapter kind 'nope'; choose one of: inca, linear, "
                     "multilayer_linear, open_inca$"),
    ],
)
def test_invalid_configs_are_refused(kind, cfg, match):
    with pytest.raises(AdapterError, match=match):
        create_adapter(kind, embed_dim=D, num_classes=C, **cfg)


def test_invalid_inputs_are_refused():
    with pytest.raises(AdapterError, match="embed_dim"):
        create_adapter("inca", embed_dim=0, num_classes=C)
    with pytest.raises(AdapterError, match=r"must be \(B, N, 32\)"):
        InCAAdapter(D, C)(torch.randn(B, N, D + 1))
    with pytest.raises(AdapterError, match="needs patch tokens"):
        LinearProbe(D, C, LinearConfig(pool="mean"))(torch.randn(B, 1, D))
    probe = create_adapter("multilayer_linear", embed_dim=D, num_classes=C, layers=LAYERS)
    with pytest.raises(AdapterError, match="missing layers"):
        probe({"blocks.1": torch.randn(B, N, D)})
    with pytest.raises(AdapterError, match="list of 2"):
        probe([torch.randn(B, N, D)])
    with pytest.raises(AdapterError, match="either config= or"):
        create_adapter("inca", embed_dim=D, num_classes=C, config=InCAConfig(), num_heads=2)
    stack = StackedInCA(2, D, C)
    with pytest.raises(AdapterError, match=r"tokens must be \(B, N, 32\) or"):
        stack(torch.randn(2, B, 0, D))  # no tokens at all
    out = stack.attend(torch.randn(2, B, N, D))  # the weights only when asked for
    assert isinstance(out, torch.Tensor) and out.shape == (2, B, 1, D)
    out, weights = stack.attend(torch.randn(2, B, N, D), need_weights=True)
    assert weights.shape == (2, B, stack.config.num_heads, 1, N)


def test_create_adapter_with_config_object_and_dtype():
    a = create_adapter("inca", embed_dim=D, num_classes=C, config=InCAConfig(num_heads=2),
                       dtype=torch.float64)
    assert a.config.num_heads == 2 and a.query.dtype == torch.float64
    assert a(torch.randn(B, N, D)).dtype == torch.float64
    probe = create_adapter("multilayer_linear", embed_dim=D, num_classes=C, layers=LAYERS,
                           dtype=torch.float64)  # its one module, the head, in that dtype
    assert {p.dtype for p in probe.parameters()} == {torch.float64}
    assert probe(_inputs("multilayer_linear")).dtype == torch.float64


# -- pooling semantics ---------------------------------------------------------------------
def test_linear_pooling_reads_the_right_tokens():
    x = torch.randn(B, N, D)
    y = x.clone()
    y[:, 1:] += 1.0  # patch tokens change, CLS does not
    cls_probe = LinearProbe(D, C, LinearConfig(pool="cls"))
    assert torch.equal(cls_probe(x), cls_probe(y))
    y = x.clone()
    y[:, :2] += 1.0  # prefix tokens change, patches do not
    mean_probe = LinearProbe(D, C, LinearConfig(pool="mean", num_prefix_tokens=2,
                                                 norm=False))
    assert torch.equal(mean_probe(x), mean_probe(y))
    torch.testing.assert_close(
        mean_probe(x), mean_probe.head(x[:, 2:].mean(1)), atol=1e-6, rtol=1e-6
    )
    # the default: CLS ⊕ mean patch, each standardized on its own (scale-free)
    probe = LinearProbe(D, C)
    z = x.clone()
    z[:, 0] *= 100.0  # a CLS token on another scale than the patches
    feat = torch.cat([nn.functional.layer_norm(x[:, 0], (D,)),
                      nn.functional.layer_norm(x[:, 1:].mean(1), (D,))], dim=-1)
    torch.testing.assert_close(probe(x), probe.head(feat), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(probe(z), probe(x), atol=1e-4, rtol=1e-4)


def test_multilayer_linear_dict_and_list_agree_and_dims_may_differ():
    probe = create_adapter("multilayer_linear", embed_dim=D, num_classes=C, layers=LAYERS,
                           layer_dims=[D, 2 * D], pool="mean", num_prefix_tokens=0)
    feats = {"blocks.1": torch.randn(B, N, D), "blocks.3": torch.randn(B, 4, 2 * D),
             "blocks.9": torch.randn(B, N, D)}  # an extra layer is ignored
    assert torch.equal(probe(feats), probe([feats["blocks.1"], feats["blocks.3"]]))
    # Per-layer standardization: rescaling one layer's tokens leaves the logits alone.
    scaled = dict(feats, **{"blocks.3": feats["blocks.3"] * 1000})
    torch.testing.assert_close(probe(feats), probe(scaled), atol=1e-4, rtol=1e-4)


# -- stacked adapters ----------------------------------------------------------------------
def _adapters(k: int, cfg: InCAConfig, dtype=torch.float32) -> list[InCAAdapter]:
    return [_randomize(InCAAdapter(D, C, cfg, dtype=dtype), seed=i) for i in range(k)]


@pytest.mark.parametrize("n_layers", [1, 2, 6])  # shared, grid layers x 3, one layer each
@pytest.mark.parametrize("reduce", ["mean", "concat"])
def test_stacked_inca_equals_each_adapter(n_layers, reduce):
    k = 6
    adapters = _adapters(k, InCAConfig(num_heads=4, num_queries=2, query_reduce=reduce))
    stack = StackedInCA.from_adapters(adapters)
    tokens = torch.randn(n_layers, B, N, D)  # (L, B, N, D)
    logits = stack(tokens if n_layers > 1 else tokens[0])
    assert logits.shape == (k, B, C)
    for i, a in enumerate(adapters):
        expected = a(tokens[i // (k // n_layers)])
        torch.testing.assert_close(logits[i], expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(stack.unstack(i)(tokens[i // (k // n_layers)]), expected,
                                   atol=0, rtol=0)
    out, weights = stack.attend(list(tokens), need_weights=True)  # a list of layers works too
    assert out.shape == (k, B, 2, D) and weights.shape == (k, B, 4, 2, N)


@pytest.mark.parametrize("layout", ["regular", "any"])
def test_stacks_of_different_settings_share_the_token_passes_exactly(layout):
    """Stacks of any query count, heads, width or prefix rule run as one computation on
    one token block (every pass over a layer shared); each member equals its adapter run
    alone, forward and gradient, whether the members sit one per layer (views) or
    anywhere (gathered)."""
    configs = [InCAConfig(num_heads=4, num_queries=2), InCAConfig(num_heads=2, attn_dim=16),
               InCAConfig(num_heads=1, attend_prefix=False, num_prefix_tokens=2),
               InCAConfig(num_heads=4, head_hidden=8)]
    n_layers = 3
    index = ([[0, 1, 2]] * 4 if layout == "regular"
             else [[2, 0, 2], [1], [0, 0, 1, 2], [2, 1]])
    stacks = [StackedInCA.from_adapters(_adapters(len(idx), cfg))
              for idx, cfg in zip(index, configs, strict=True)]
    tokens = torch.randn(n_layers, B, N, D, requires_grad=True)
    together = StackedInCA.run(tokens, stacks, index)
    loss = sum((o * torch.arange(C)).sum() for o in together)
    loss.backward()
    grad_together = tokens.grad.clone()
    grad_params = [p.grad.clone() for s in stacks for p in s.parameters()]
    tokens.grad = None
    for s in stacks:
        s.zero_grad(set_to_none=True)
    alone_loss = 0
    for s, idx, out in zip(stacks, index, together, strict=True):
        for j, layer in enumerate(idx):
            member = s.unstack(j)
            expected = member(tokens[layer])
            torch.testing.assert_close(out[j], expected, atol=1e-5, rtol=1e-5)
        alone = StackedInCA.run(tokens, [s], [idx])[0]
        alone_loss = alone_loss + (alone * torch.arange(C)).sum()
    alone_loss.backward()
    torch.testing.assert_close(tokens.grad, grad_together, atol=1e-4, rtol=1e-4)
    for g, p in zip(grad_params, [p for s in stacks for p in s.parameters()], strict=True):
        torch.testing.assert_close(p.grad, g, atol=1e-5, rtol=1e-4)
    # the attention weights skip the prefix tokens of adapters that ignore them
    _, w = stacks[2].attend(tokens.detach(), layer_index=index[2], need_weights=True)
    assert w.shape == (len(index[2]), B, 1, 1, N - 2)
    torch.testing.assert_close(w.sum(-1), torch.ones_like(w.sum(-1)))


def test_stacked_linear_equals_each_probe():
    torch.manual_seed(0)
    probes = [LinearProbe(D, C, LinearConfig(pool="cls_mean", norm=True)) for _ in range(4)]
    stack = StackedLinear.from_adapters(probes)
    tokens = torch.randn(2, B, N, D)
    logits = stack(tokens)
    for i, p in enumerate(probes):
        torch.testing.assert_close(logits[i], p(tokens[i // 2]), atol=1e-5, rtol=1e-5)
    assert StackedLinear(3, D, C)(tokens[0]).shape == (3, B, C)


def test_from_adapters_refuses_mixed_stacks():
    a = InCAAdapter(D, C, InCAConfig(num_heads=2))
    with pytest.raises(AdapterError, match="differs"):
        StackedInCA.from_adapters([a, InCAAdapter(D, C, InCAConfig(num_heads=4))])
    with pytest.raises(AdapterError, match="not a InCAAdapter"):
        StackedInCA.from_adapters([a, LinearProbe(D, C)])
    double = InCAAdapter(D, C, InCAConfig(num_heads=2), dtype=torch.float64)
    with pytest.raises(AdapterError, match=r"^adapter 1 is torch.float64 on cpu, "
                                           r"adapter 0 torch.float32 on cpu$"):
        StackedInCA.from_adapters([a, double])
    with pytest.raises(AdapterError, match="split evenly"):
        StackedInCA(3, D, C)(torch.randn(2, B, N, D))
    with pytest.raises(AdapterError, match="one layer in"):
        StackedInCA(3, D, C)(torch.randn(2, B, N, D), layer_index=[0, 1, 2])


def test_from_adapters_copies():
    adapters = _adapters(2, InCAConfig(num_heads=2))
    stack = StackedInCA.from_adapters(adapters)
    assert stack.query.shape == (2, 1, D) and stack.in_proj_weight_q.shape == (2, D, D)
    assert stack.query.data_ptr() != adapters[0].query.data_ptr()
    # The registered stacked tensors are all there is: what the optimizer sees is what the
    # forward reads.
    assert {n for n, _ in stack.named_parameters()} == {
        "query", "token_norm_weight", "token_norm_bias", "in_proj_weight_q", "in_proj_weight_k",
        "in_proj_weight_v", "in_proj_bias", "out_proj_weight", "out_proj_bias", "norm_weight",
        "norm_bias", "head_weight", "head_bias"}
    for a, i in zip(adapters, range(2), strict=True):  # stored in parts, read back whole
        torch.testing.assert_close(stack.member_state(i)["in_proj_weight"], a.in_proj_weight,
                                   rtol=0, atol=0)


@pytest.mark.parametrize("stack_class", [StackedInCA, StackedLinear])
def test_unstack_gives_a_member_in_the_stacks_dtype_and_on_its_device(stack_class):
    stack = _randomize(stack_class(3, D, C, dtype=torch.float64))
    one = stack.unstack(1)
    assert {p.dtype for p in one.parameters()} == {torch.float64}
    x = torch.randn(B, N, D, dtype=torch.float64)
    torch.testing.assert_close(one(x), stack(x)[1], rtol=1e-12, atol=1e-12)
    # made on the stack's device, not the default one (where a copy from meta would fail)
    assert all(p.is_meta for p in stack_class(2, D, C, device="meta").unstack(0).parameters())


def test_stacks_share_token_passes_with_any_layer_assignment():
    """Several stacks and single adapters computed together (as the bank and the multi-task
    runtime do), each member reading any layer, equal each adapter alone."""
    cfg = InCAConfig(num_heads=4, num_queries=2)
    adapters = _adapters(5, cfg)
    tokens = torch.randn(3, B, N, D)
    parts = [StackedInCA.from_adapters(adapters[:3]), adapters[3], adapters[4]]
    index = [[2, 0, 2], [1], [2]]
    logits = StackedInCA.run(tokens, parts, index)
    assert [tuple(x.shape) for x in logits] == [(3, B, C), (1, B, C), (1, B, C)]
    flat = torch.cat(logits)
    for a, layer, out in zip(adapters, [2, 0, 2, 1, 2], flat, strict=True):
        torch.testing.assert_close(out, a(tokens[layer]), atol=1e-5, rtol=1e-5)
    stack = StackedInCA.from_adapters(adapters[:3])
    torch.testing.assert_close(stack(tokens, layer_index=[2, 0, 2]), logits[0])


@pytest.mark.parametrize("stack_class", [StackedInCA, StackedLinear])
def test_stacked_safetensors_round_trip(stack_class, tmp_path):
    torch.manual_seed(0)
    stack = stack_class(3, D, C).eval()
    save_file(stack.state_dict(), tmp_path / "stack.safetensors")
    fresh = stack_class(3, D, C).eval()
    fresh.load_state_dict(load_file(tmp_path / "stack.safetensors"))
    x = torch.randn(3, B, N, D)
    assert torch.equal(stack(x), fresh(x))
    assert parameter_report(stack, 10**6)["kind"] == stack.kind


@pytest.mark.parametrize("make_opt", [
    lambda groups: torch.optim.AdamW(groups, betas=(0.9, 0.99)),
    lambda groups: torch.optim.SGD(groups, momentum=0.9),
])
def test_stacked_training_equals_separate_training(make_opt):
    k, steps = 3, 4
    lr, wd = 1e-2, 0.05
    adapters = _adapters(k, InCAConfig(num_heads=4), dtype=torch.float64)
    stack = StackedInCA.from_adapters(adapters).train()
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(k, B, N, D, generator=gen, dtype=torch.float64),
                torch.randint(0, C, (B,), generator=gen)) for _ in range(steps)]

    opt = make_opt([{"params": list(stack.parameters()), "lr": lr, "weight_decay": wd}])
    for x, y in batches:
        logits = stack(x)  # (K, B, C)
        # The sum over adapters: each one's gradient is exactly its own loss's gradient.
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), y.repeat(k), reduction="none")
        loss.view(k, B).mean(1).sum().backward()
        opt.step()
        opt.zero_grad()

    for i, a in enumerate(adapters):
        a.train()
        opt_i = make_opt([{"params": list(a.parameters()), "lr": lr, "weight_decay": wd}])
        for x, y in batches:
            nn.functional.cross_entropy(a(x[i]), y).backward()
            opt_i.step()
            opt_i.zero_grad()
        trained = stack.member_state(i)
        for name, p in a.named_parameters():
            torch.testing.assert_close(trained[name], p.detach(), atol=1e-9, rtol=1e-9,
                                       msg=f"adapter {i} {name}")
        assert not torch.equal(a.query, adapters[(i + 1) % k].query)


# -- Open-InCA: class-incremental training leaves old classes alone ------------------------
def _train(adapter: nn.Module, params, x, y, steps: int, offset: int = 0) -> None:
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    for _ in range(steps):
        logits = adapter(x)
        nn.functional.cross_entropy(logits[:, offset:], y - offset).backward()
        opt.step()
        opt.zero_grad()


def test_open_inca_new_classes_leave_old_logits_unchanged():
    torch.manual_seed(0)
    adapter = OpenInCAAdapter(D, C, OpenInCAConfig(num_heads=4))
    x_old, y_old = torch.randn(8, N, D), torch.randint(0, C, (8,))
    _train(adapter, adapter.parameters(), x_old, y_old, steps=3)  # phase 1: everything
    probe = torch.randn(6, N, D)
    with torch.no_grad():
        phase1 = adapter(probe)
    shared_before = [p.clone() for p in adapter.shared_parameters()]

    adapter.add_classes(3)  # freezes the shared part and classes 0..C-1
    assert adapter.num_classes == C + 3 and adapter.config.class_groups == (C, 3)
    with torch.no_grad():
        before = adapter(probe)[:, :C]
    # Adding queries changes matmul shapes, hence rounding, but not the function.
    torch.testing.assert_close(before, phase1, atol=1e-6, rtol=1e-6)
    x_new, y_new = torch.randn(8, N, D), torch.randint(C, C + 3, (8,))
    # All parameters to the optimizer, with weight decay: frozen ones still must not move.
    _train(adapter, adapter.parameters(), x_new, y_new, steps=5, offset=C)

    with torch.no_grad():
        after = adapter(probe)
    assert after.shape == (6, C + 3)
    assert torch.equal(after[:, :C], before)
    assert all(torch.equal(p, q) for p, q in zip(adapter.shared_parameters(), shared_before,
                                                 strict=True))
    assert adapter.queries[1].requires_grad and not adapter.queries[0].requires_grad
    assert adapter.num_parameters(trainable_only=True) == 3 * (2 * D + 1)


def test_narrow_attention_equals_its_unfolded_definition():
    """attn_dim < D: queries, keys and values of width A, the output projected back to D;
    the folded computation equals the plain one, and the adapter is ~A/D of the size."""
    torch.manual_seed(0)
    a, h, q = 16, 2, 2
    adapter = _randomize(InCAAdapter(D, C, InCAConfig(num_heads=h, num_queries=q,
                                                      attn_dim=a)), seed=3).double()
    assert adapter.in_proj_weight.shape == (3 * a, D) and adapter.out_proj.weight.shape == (D, a)
    tokens = torch.randn(B, N, D, dtype=torch.float64)
    x = adapter.token_norm(tokens)  # (B, N, D)
    w_q, w_k, w_v = adapter.in_proj_weight.chunk(3)
    b_q, b_k, b_v = adapter.in_proj_bias.chunk(3)
    qs = (adapter.query @ w_q.T + b_q).view(q, h, a // h)  # (Q, H, A/H)
    keys = (x @ w_k.T + b_k).view(B, N, h, a // h)
    values = (x @ w_v.T + b_v).view(B, N, h, a // h)
    att = torch.einsum("qhe,bnhe->bhqn", qs, keys).div((a // h) ** 0.5).softmax(-1)
    pooled = torch.einsum("bhqn,bnhe->bqhe", att, values).reshape(B, q, a)
    expected = adapter.out_proj(pooled)  # (B, Q, D)
    out, weights = adapter.attend(tokens, need_weights=True)
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(weights, att, atol=1e-12, rtol=1e-10)
    full = InCAAdapter(D, C, InCAConfig(num_heads=h, num_queries=q))
    assert full.num_parameters() - adapter.num_parameters() == 4 * D * (D - a) + 3 * (D - a)
    stack = StackedInCA.from_adapters([adapter.float(), adapter.float()])
    torch.testing.assert_close(stack(tokens.float())[0], adapter.float()(tokens.float()),
                               atol=1e-5, rtol=1e-5)
    with pytest.raises(AdapterError, match="attn_dim 16 is not divisible by num_heads 3"):
        InCAAdapter(D, C, InCAConfig(num_heads=3, attn_dim=16))


def test_patch_tokens_only_attends_past_the_prefix():
    cfg = InCAConfig(num_heads=4, attend_prefix=False, num_prefix_tokens=2)
    adapter = _randomize(InCAAdapter(D, C, cfg, dtype=torch.float64)).eval()
    z = torch.randn(B, N, D, dtype=torch.float64)
    out, weights = adapter.attend(z, need_weights=True)
    mha = _mha_like(adapter)
    x = adapter.token_norm(z[:, 2:])
    ref, ref_weights = mha(adapter.query.expand(B, -1, -1), x, x, need_weights=True,
                           average_attn_weights=False)
    assert weights.shape == (B, 4, 1, N - 2)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    every = InCAAdapter(D, C, cfg.replace(attend_prefix=True), dtype=torch.float64)
    every.load_state_dict(adapter.state_dict())
    assert not torch.allclose(every.eval()(z), adapter(z))  # the prefix did count there
    adapters = _adapters(3, cfg)
    stack = StackedInCA.from_adapters(adapters)
    tokens = torch.randn(3, B, N, D)
    for i, a in enumerate(adapters):
        torch.testing.assert_close(stack(tokens)[i], a(tokens[i]), atol=1e-5, rtol=1e-5)


def test_mlp_head_stacks_and_round_trips(tmp_path):
    cfg = InCAConfig(num_heads=4, head_hidden=24)
    adapters = _adapters(4, cfg)
    a = adapters[0]
    assert a.hidden.weight.shape == (24, D) and a.head.weight.shape == (C, 24)
    z = torch.randn(B, N, D)
    feat = a.norm(a.attend(z)).mean(1)
    torch.testing.assert_close(a(z), a.head(F.gelu(a.hidden(feat))), atol=1e-6, rtol=1e-6)
    stack = StackedInCA.from_adapters(adapters)
    assert stack.hidden_weight.shape == (4, 24, D)
    tokens = torch.randn(2, B, N, D)
    for i, ad in enumerate(adapters):
        torch.testing.assert_close(stack(tokens)[i], ad(tokens[i // 2]), atol=1e-5, rtol=1e-5)
    assert stack.unstack(3).config == adapters[3].config
    with pytest.raises(AdapterError, match="head_hidden"):
        InCAConfig(head_hidden=0)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"layers": "ab"}, "layers must be a list of at most 4096 entries"),
    ({"layers": [f"l{i}" for i in range(4097)]}, "layers must be a list of at most 4096"),
    ({"layers": ["a"], "layer_dims": (4,) * 4097}, "layer_dims must be a list of at most 4096"),
    ({"layers": []}, "multilayer_linear needs layers=[...]: the layers it reads"),
    ({"layers": ["a", ""]}, "layers must be non-empty layer names"),
    ({"layers": ["a", 3]}, "layers must be non-empty layer names"),
    ({"layers": ["a"], "layer_dims": [0]}, "each of layer_dims must be an integer in [1, "),
    ({"layers": [*"abcdefghi", "a"]},
     "layers must be distinct, got ['a', 'b', 'c', 'd', 'e', 'f', 'g', 'h']$"),
    ({"layers": ["a", "b"], "layer_dims": [4]}, "layer_dims has 1 entries for 2 layers"),
    ({"layers": ["a"], "num_prefix_tokens": -1}, "num_prefix_tokens must be an integer in"),
    ({"layers": ["a"], "norm": 1}, "norm must be true or false, got 1"),
    ({"layers": ["a"], "dropout": 1.0}, "dropout must be a number in [0, 1), got 1.0"),
    ({"layers": ["a"], "dropout": 1.5}, "dropout must be a number in [0, 1), got 1.5"),
])
def test_multilayer_linear_config_refusals_name_the_field(kwargs, message):
    import re

    with pytest.raises(AdapterError, match="^" + re.escape(message).replace(r"\$", "$")):
        MultiLayerLinearConfig(**kwargs)


def test_multilayer_linear_config_accepts_its_bounds():
    wide = MultiLayerLinearConfig(layers=[f"l{i}" for i in range(4096)],
                                  layer_dims=[1] * 4096, dropout=0.99)
    assert len(wide.layers) == 4096 and wide.layer_dims == (1,) * 4096
    assert MultiLayerLinearConfig(layers=["a"]).layers == ("a",)


def test_folded_layernorm_statistics_accumulate_16_bit_tokens_in_float32():
    """The folded attention's per-token 1/std of bfloat16 tokens is LayerNorm's own (float32
    accumulation), not a bfloat16 norm's (off by about 1%)."""
    from inca.adapters._folded import token_inv_std

    g = torch.Generator().manual_seed(0)
    tokens = (torch.randn(4, 9, 384, generator=g) * 3 + 1).bfloat16()
    mean = tokens.float().mean(-1)
    exact = 1 / (tokens.double().var(-1, unbiased=False) + 1e-6).sqrt()
    got = token_inv_std(tokens, mean, 1e-6)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), exact, rtol=2e-4, atol=0)


@pytest.mark.parametrize("build, message", [
    (lambda: InCAConfig(norm_eps=0.0), r"norm_eps must be a number in \(0, 1\], got 0.0"),
    (lambda: InCAConfig(num_layers=0), r"num_layers must be an integer in \[1, "),
    (lambda: InCAConfig(attn_dim=0),  # "None", the Python value that leaves it unset
     r"attn_dim \(or None\) must be an integer in \[1, \d+\], got 0$"),
    (lambda: InCAConfig(attend_prefix=1), r"attend_prefix must be true or false, got 1$"),
    (lambda: LinearConfig(dropout=1.0), r"dropout must be a number in \[0, 1\), got 1.0"),
    (lambda: OpenInCAConfig(dropout="1" * 60),  # a value from JSON shown cut short
     r"dropout must be a number in \[0, 1\), got '1{36}\.\.\.$"),
    (lambda: check_tokens(torch.zeros(B, 0, D), D), r"tokens must be \(B, N, 32\), got "
                                                    r"\(3, 0, 32\)$"),  # no token at all
    (lambda: OpenInCAConfig(dropout=1.0), r"dropout must be a number in \[0, 1\), got 1.0"),
    (lambda: OpenInCAConfig(init_std=1000.5),
     r"init_std must be a number in \(0, 1000\], got 1000.5$"),
    (lambda: OpenInCAConfig(norm_eps=0.0), r"norm_eps must be a number in \(0, 1\], got 0.0$"),
    (lambda: OpenInCAConfig(norm_eps=1.5), r"norm_eps must be a number in \(0, 1\], got 1.5$"),
    (lambda: OpenInCAConfig(class_groups=[1] * 1025),
     r"class_groups must be a list of at most 1024 sizes"),
    (lambda: InCAAdapter(D, 0), r"num_classes must be positive, got 0"),
    (lambda: InCAAdapter(D, C, InCAConfig(attn_dim=12, num_heads=5)),
     r"attn_dim 12 is not divisible by num_heads 5"),
    (lambda: InCAAdapter(30, C, InCAConfig(num_heads=4)),
     r"embed_dim 30 is not divisible by num_heads 4"),
    (lambda: create_adapter("multilayer_linear", embed_dim=D, num_classes=C),
     r"multilayer_linear needs layers=\[...\]: the layers it reads"),
    (lambda: MultiLayerLinearProbe(D, C), r"multilayer_linear needs a config naming its layers"),
    (lambda: adapter_from_spec({"kind": "linear", "embed_dim": D}),
     r"adapter spec lacks \['config', 'num_classes'\]"),
])
def test_adapter_refusals_name_the_setting(build, message):
    with pytest.raises(AdapterError, match=f"^{message}"):
        build()


def test_adapter_inputs_refused_by_name_and_edges_accepted():
    """One class is a valid start for a class-incremental adapter; a multi-layer adapter
    given one tensor, or a layer of the wrong width, is told what it reads."""
    assert OpenInCAAdapter(D, 1).num_classes == 1
    two = InCAAdapter(D, C, InCAConfig(num_layers=2))
    with pytest.raises(AdapterError, match=r"^this adapter reads 2 layers: pass a list of "
                                           r"their tokens$"):
        two(torch.randn(B, N, D))
    probe = create_adapter("multilayer_linear", embed_dim=D, num_classes=C,
                           config={"layers": LAYERS})
    with pytest.raises(AdapterError, match=r"tokens of layer 'blocks.3'"):
        probe({"blocks.1": torch.randn(B, N, D), "blocks.3": torch.randn(B, N, D + 1)})
    stack = StackedInCA.from_adapters(_adapters(2, InCAConfig(num_heads=4)))
    one = torch.randn(B, 1, D)  # one token per image (a pooled or CLS-only input) is enough
    for i in range(2):
        torch.testing.assert_close(stack(one)[i], stack.unstack(i)(one), atol=1e-5, rtol=1e-5)


def test_dropout_acts_only_in_training_and_attention_weights_come_when_asked():
    probe = LinearProbe(D, C, LinearConfig(dropout=0.5)).eval()
    x = torch.randn(B, N, D)
    torch.testing.assert_close(probe(x), probe(x))  # eval: no dropout
    assert not torch.equal(probe.train()(x), probe(x))
    open_inca = OpenInCAAdapter(D, C, OpenInCAConfig(num_heads=2))
    out, weights = open_inca.attend(x, need_weights=True)
    assert out.shape == (B, C, D) and weights.shape == (B, 2, C, N)
    torch.testing.assert_close(weights.sum(-1), torch.ones(B, 2, C))


def test_a_registered_kind_is_named_listed_and_rebuilt(monkeypatch):
    import inca.adapters.registry as registry

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    @registry.register_adapter("plain_probe")
    class PlainProbe(LinearProbe):  # no docstring
        pass

    assert PlainProbe.kind == "plain_probe" and registry.adapter_class("plain_probe") is PlainProbe
    listed = {a["name"]: a for a in list_adapters()}
    assert listed["plain_probe"]["description"] == ""
    assert listed["linear"]["description"] == LinearProbe.__doc__.strip().splitlines()[0]
    spec = PlainProbe(D, C).spec()
    rebuilt = adapter_from_spec(spec, dtype=torch.float64)
    assert type(rebuilt) is PlainProbe and rebuilt.head.weight.dtype == torch.float64
    assert adapter_from_spec(spec, device="meta").head.weight.is_meta
    # every parameter, the shared attention's too, is made where it is asked for
    open_inca = adapter_from_spec(OpenInCAAdapter(D, C).spec(), device="meta")
    assert all(p.is_meta for p in open_inca.parameters())


def test_the_parameter_report_counts_frozen_weights_apart():
    grown = OpenInCAAdapter(D, 2).add_classes(3, freeze_old=True)
    report = parameter_report(grown, 1_000_000)
    assert 0 < report["trainable_parameters"] < grown.num_parameters()
    assert report["trainable_parameters"] == sum(
        p.numel() for p in grown.parameters() if p.requires_grad)
