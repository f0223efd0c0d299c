"""Every registered adapter kind through every way a task is used: save → ``load_task``,
``task.to_module()`` (and its ``torch.export``), the multi-task runtime (with a task of
another kind in the same backbone pass) and the HTTP server, each answering the task's
own ``predict_proba``.

The cases are built: every parameter is drawn at random (LayerNorm affines, biases and
queries included, so a step that drops or resets one changes the answer), on a tiny random
timm ViT (a CLS token, four blocks of width 32) that ``load_task`` creates again from the
task's record. Each kind is set away from its defaults where a step could lose the
setting: InCA with two queries, an MLP head and prefix tokens skipped (and ``inca:window``,
a narrow InCA over two adjacent layers); a linear probe over CLS ⊕ mean; Open-InCA with two
class groups (classes added later); a multi-layer probe over two non-adjacent layers.
``ensemble`` holds one member of every kind. A kind registered without a case here fails
``test_every_registered_kind_has_a_case``. The runtime serves each case beside a task of
another kind and a same-settings twin with other weights (InCA members of both run as one
batched attention). Last, one member of each kind is fitted on a planted backbone (what
the bank exports) and goes through the same steps.

Tolerance: float32 on the CPU throughout, so every path computes the same numbers up to
the order of its sums (the folded attention, the runtime's batched attention of several
tasks): probabilities agree within ``ATOL`` = 1e-5 absolute (``rtol`` 0). The weights
are scaled so that the probabilities stay well inside (0, 1): a dropped parameter moves
them by far more than that (``test_the_cases_are_not_saturated``).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from planted import planted_backbone, planted_data
from tiny import SIZE, make_backbone

import inca
from inca.adapters import Adapter, OpenInCAAdapter, create_adapter, list_adapters
from inca.runtime import MultiTaskModel
from inca.task import Task, load_task

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from inca.runtime.server import ServerConfig, create_app  # noqa: E402

ATOL = 1e-5
CLASSES = ["ant", "bee", "cow"]
KINDS = sorted(a["name"] for a in list_adapters())
CASES = [*KINDS, "inca:window", "ensemble"]


def member(kind: str, bb: Any) -> tuple[Adapter, list[str]]:
    """One adapter of ``kind`` over the tiny ViT (set away from its defaults), and the layers
    it reads."""
    d, prefix = bb.embed_dims[bb.layers[0]], bb.num_prefix_tokens
    if kind == "inca":
        return create_adapter("inca", embed_dim=d, num_classes=3, num_queries=2, num_heads=2,
                              head_hidden=8, attend_prefix=False,
                              num_prefix_tokens=prefix), [bb.layers[1]]
    if kind == "inca:window":
        return create_adapter("inca", embed_dim=d, num_classes=3, num_layers=2,
                              attn_dim=16, num_heads=2), bb.layers[2:4]
    if kind == "linear":
        return create_adapter("linear", embed_dim=d, num_classes=3, pool="cls_mean",
                              num_prefix_tokens=prefix), [bb.layers[2]]
    if kind == "open_inca":
        adapter = OpenInCAAdapter(d, 2)
        adapter.add_classes(1)  # two class groups: two tensors per class parameter
        return adapter, [bb.layers[3]]
    if kind == "multilayer_linear":
        layers = [bb.layers[0], bb.layers[2]]
        return create_adapter("multilayer_linear", embed_dim=d, num_classes=3, layers=layers,
                              layer_dims=[d, d], pool="cls_mean",
                              num_prefix_tokens=prefix), layers
    raise KeyError(kind)


def scale(name: str, p: torch.Tensor) -> float:
    """Queries large enough to attend unevenly (small ones mean-pool alike for every
    image), biases small enough not to drown what the images change, matrices scaled by
    their width (logits of a few units, probabilities inside (0, 1))."""
    if "quer" in name:
        return 1.0
    if "bias" in name:
        return 0.02
    return 1.5 / p.shape[-1] ** 0.5 if p.ndim == 2 else 0.3


def build_task(case: str, bb: Any, seed: int) -> Task:
    torch.manual_seed(seed)
    pairs = [member(k, bb) for k in (KINDS if case == "ensemble" else [case])]
    for adapter, _ in pairs:
        with torch.no_grad():
            for name, p in adapter.named_parameters():  # every parameter matters
                p.copy_(torch.randn_like(p) * scale(name, p))
        adapter.requires_grad_(True)  # add_classes froze Open-InCA's first group
    return Task([a for a, _ in pairs], [ls for _, ls in pairs], CLASSES, bb.describe(),
                backbone=bb, precision="32", keys=[f"{case}{i}" for i in range(len(pairs))])


def pixels(n: int = 5, seed: int = 0, size: int = SIZE) -> torch.Tensor:
    """Images of different colours and textures (uniform noise alone looks alike to a
    random backbone: every image got nearly the same answer)."""
    g = torch.Generator().manual_seed(seed)
    colour = torch.rand(n, 3, 1, 1, generator=g) * 255
    texture = torch.rand(n, 1, 1, 1, generator=g) * 120
    noise = (torch.rand(n, 3, size, size, generator=g) - 0.5) * texture
    return (colour + noise).clamp(0, 255).to(torch.uint8)


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)


@pytest.fixture(scope="module")
def bb(tmp_path_factory):
    return make_backbone("timm-vit", tmp_path_factory.mktemp("bb"))


@pytest.fixture(scope="module")
def tasks(bb) -> dict[str, Task]:
    return {case: build_task(case, bb, seed=i) for i, case in enumerate(CASES)}


class Saved(dict):
    """Each case's task folder, saved when first asked for: a kind that fails to save
    fails the tests that use it, not the whole module."""

    def __init__(self, tasks: dict[str, Task], root: Path) -> None:
        super().__init__()
        self.tasks, self.root = tasks, root

    def __missing__(self, case: str) -> Path:
        self[case] = self.tasks[case].save(self.root / case / "task")
        return self[case]


@pytest.fixture(scope="module")
def folders(tasks, tmp_path_factory) -> Saved:
    return Saved(tasks, tmp_path_factory.mktemp("tasks"))


def partner(case: str) -> str:
    """A task of another kind, to share the backbone pass with ``case``."""
    return CASES[(CASES.index(case) + 1) % len(CASES)]


def test_every_registered_kind_has_a_case(bb):
    assert {"inca", "linear", "open_inca", "multilayer_linear"} <= set(KINDS)
    for kind in KINDS:
        adapter, _ = member(kind, bb)  # KeyError: a new kind needs a case above
        assert adapter.kind == kind


def test_the_cases_are_not_saturated(tasks):
    for case, task in tasks.items():
        p = task.predict_proba(pixels())
        assert p.min() > 1e-3 and p.max() < 1 - 1e-3, case
        assert (p - p.mean(0)).abs().max() > 1e-2, case  # the images get different answers


@pytest.mark.parametrize("case", CASES)
def test_save_then_load_gives_the_same_probabilities(case, tasks, folders, bb):
    task, x = tasks[case], pixels()
    expected = task.predict_proba(x)
    rebuilt = load_task(folders[case], device="cpu", precision="32")  # backbone from record
    assert [m.kind for m in rebuilt.members] == [m.kind for m in task.members]
    assert rebuilt.member_layers == task.member_layers
    for a, b in zip(rebuilt.members, task.members, strict=True):
        assert a.config == b.config
        assert a.state_dict().keys() == b.state_dict().keys()
    close(rebuilt.predict_proba(x), expected)
    close(load_task(folders[case], bb, precision="32").predict_proba(x), expected)


@pytest.mark.parametrize("case", CASES)
def test_to_module_equals_predict_proba(case, tasks, folders, bb):
    x = pixels()
    for task in (tasks[case], load_task(folders[case], bb, precision="32")):
        module = task.to_module()
        with torch.no_grad():
            close(module(x), task.predict_proba(x))
        normalized = (x.float() / 255 - module.mean) / module.std  # the float input too
        with torch.no_grad():
            close(module(normalized), task.predict_proba(x))


def export_each_case(folder: str) -> dict[str, str]:
    """In a fresh process: export every case's module *before* any eager pass (what a
    script that loads a task and exports it does), then predict eagerly. ``"ok"`` or what
    went wrong, per case."""
    bb, x, result = make_backbone("timm-vit", Path(folder)), pixels(), {}
    for i, case in enumerate(CASES):
        task = build_task(case, bb, seed=i)
        try:
            exported = torch.export.export(task.to_module(), (x,)).module()(x)
            after = task.predict_proba(x)  # nothing made while tracing may be kept
            assert type(after) is torch.Tensor, f"predict_proba gave a {type(after).__name__}"
            close(exported, after)
            result[case] = "ok"
        except Exception as e:  # noqa: BLE001 - reported per case to the test
            result[case] = f"{type(e).__name__}: {str(e)[:300]}"
    return result


def test_export_first_then_predict_in_a_fresh_process(tmp_path):
    code = ("import json, sys, test_kind_matrix as m; "
            "print(json.dumps(m.export_each_case(sys.argv[1])))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result == dict.fromkeys(CASES, "ok")


@pytest.mark.parametrize("case", CASES)
def test_runtime_equals_predict_proba(case, tasks, folders, bb, monkeypatch):
    other = partner(case)
    x = pixels(7, seed=1)
    model = MultiTaskModel.from_paths([folders[case], folders[other]], backbone=bb,
                                      names=[case, other], precision="32")
    twin = build_task(case, bb, seed=99)  # the same kind and settings, other weights:
    model.add_task("twin", twin)  # InCA members of both run as one batched attention
    model.predict_proba(x[:1])  # plans the heads once (a probe pass)
    extract, passes = bb.extract, []
    monkeypatch.setattr(bb, "extract", lambda *a, **k: passes.append(1) or extract(*a, **k))
    out = model.predict_proba(x, batch_size=16)
    assert len(passes) == 1  # three tasks, two kinds, one backbone pass
    shared, _ = model._plan((case, other, "twin"))
    task = tasks[case]
    if any(m.kind == "inca" and len(ls) == 1 for m, ls in zip(task.members,
                                                               task.member_layers,
                                                               strict=True)):
        # the twins' one-layer InCA members run as one batched attention
        assert any({n for n, _ in g.members} >= {case, "twin"} for g in shared)
    for name, task in ((case, tasks[case]), (other, tasks[other]), ("twin", twin)):
        close(out[name], task.predict_proba(x))
    alone = model.predict_proba(x, tasks=[case])[case]  # planned without the others
    close(alone, tasks[case].predict_proba(x))


def png(image: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buf, format="PNG")
    return buf.getvalue()


def pil(x: torch.Tensor) -> list[Image.Image]:
    """The images as a client holds them (``predict_proba`` preprocesses these as the server
    does: resized and cropped to the backbone's input, which pixels given as a tensor skip)."""
    return [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in x]


def served(model: MultiTaskModel, x: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """``{task: probabilities (B, C)}`` as ``POST /predict`` answers for ``x`` sent as PNG
    files (every class asked for, put back in the task's class order)."""
    with TestClient(create_app(model, ServerConfig(max_wait_ms=1))) as client:
        r = client.post("/predict", files=[("files", (f"{i}.png", png(im)))
                                           for i, im in enumerate(x)],
                        data={"top_k": "1000", "tasks": ",".join(names)})
    assert r.status_code == 200, r.text
    answers = r.json()["predictions"]
    assert [a["image"] for a in answers] == [f"{i}.png" for i in range(len(x))]
    out = {}
    for name in names:
        classes = model.tasks[name].classes
        rows = [{a["label"]: a["probability"] for a in p["tasks"][name]} for p in answers]
        assert all(len(row) == len(classes) for row in rows)
        out[name] = torch.tensor([[row[c] for c in classes] for row in rows])
    return out


@pytest.mark.parametrize("case", CASES)
def test_http_answers_equal_predict_proba(case, tasks, folders, bb):
    other = partner(case)
    model = MultiTaskModel.from_paths([folders[case], folders[other]], backbone=bb,
                                      names=[case, other], precision="32")
    x = pixels(4, seed=2)
    got = served(model, x, [case, other])
    for name in (case, other):
        close(got[name], tasks[name].predict_proba(pil(x)))


# -- fitted: what the bank makes of each kind, through the same steps ------------------------
@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    bb, root = planted_backbone(), tmp_path_factory.mktemp("fitted")
    tasks = {kind: inca.fit(bb, planted_data(48, 0), layers=["stem", "block1"], kinds=(kind,),
                            lrs=(1e-2,), epochs=1, batch_size=16, ensemble_k=1,
                            progress=False, precision="32")
             for kind in KINDS}
    return bb, tasks, {kind: t.save(root / kind / "task") for kind, t in tasks.items()}


@pytest.mark.parametrize("kind", KINDS)
def test_a_fitted_member_of_each_kind_round_trips(kind, fitted):
    bb, tasks, folders = fitted
    task, x = tasks[kind], pixels(6, seed=3, size=bb.preprocessing.input_size)
    assert [m.kind for m in task.members] == [kind]
    expected = task.predict_proba(x)
    close(load_task(folders[kind], bb, precision="32").predict_proba(x), expected)
    with torch.no_grad():
        close(task.to_module()(x), expected)
    model = MultiTaskModel.from_paths(list(folders.values()), backbone=bb,
                                      names=list(folders), precision="32")
    close(model.predict_proba(x)[kind], expected)  # beside every other kind
    close(served(model, x, [kind])[kind], task.predict_proba(pil(x)))
