"""The shape of the tree: errors in one module, each helper imported from its one home,
no module shadowed by a name its package exports, one attention block for two adapters."""

from __future__ import annotations

import ast
import importlib
import types
from pathlib import Path

import pytest
import torch

import inca.errors

SRC = Path(__file__).resolve().parents[1] / "src" / "inca"
ERRORS_ELSEWHERE: set[str] = set()  # none: every user-facing error is in errors.py
# Helpers split out of training/bank.py, and where they live now.
HOMES = {
    "cosine_with_warmup": "inca.training.schedule",
    "bank_loss": "inca.training.loss",
    "build_adapter": "inca.training.factory",
    "narrow_attention": "inca.training.factory",
    "MAX_ADAPTER_SHARE": "inca.training.factory",
    "MemberSpec": "inca.training.plan",
    "plan_members": "inca.training.plan",
    "kind_options": "inca.training.plan",
    "member_input": "inca.adapters.base",
}


def _sources() -> list[tuple[Path, ast.Module]]:
    return [(p, ast.parse(p.read_text(), str(p))) for p in sorted(SRC.rglob("*.py"))]


def _packages() -> list[str]:
    return [".".join(p.parent.relative_to(SRC.parent).parts)
            for p in sorted(SRC.rglob("__init__.py"))]


def _base_name(node: ast.expr) -> str:
    return node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", "")


def test_user_facing_errors_are_defined_in_errors_py():
    elsewhere = {}
    for path, tree in _sources():
        if path == SRC / "errors.py":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_") and any(
                    _base_name(b).endswith(("Error", "Exception")) for b in node.bases):
                elsewhere[node.name] = str(path.relative_to(SRC))
    assert set(elsewhere) <= ERRORS_ELSEWHERE, elsewhere
    defined = [v for v in vars(inca.errors).values()
               if isinstance(v, type) and v.__module__ == "inca.errors"]
    assert len(defined) >= 14 and all(issubclass(e, inca.errors.InCAError) for e in defined)
    assert issubclass(inca.errors.MissingDependencyError, ImportError)  # fallbacks still work


def _room(path: Path) -> str:
    """A module's room: its package under ``inca`` (``training``, ``backbones`` ...), or the
    module itself for one at the top (``_precision``)."""
    return path.relative_to(SRC).with_suffix("").parts[0]


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _owner_names(node: ast.expr) -> bool:
    """``self.x``, ``cls.x`` and ``super().x`` reach into their own object."""
    if isinstance(node, ast.Name):
        return node.id in ("self", "cls")
    return isinstance(node, ast.Call) and getattr(node.func, "id", "") == "super"


def _private_reaches(sources: list[tuple[Path, ast.Module]]) -> list[str]:
    """Private names one room takes from another: imported by name, or read off an object
    (``backbone._extract``) when no module of the reading room defines that name."""
    defined: dict[str, set[str]] = {}
    for path, tree in sources:
        names = defined.setdefault(_room(path), set())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
    wrong = []
    for path, tree in sources:
        room, where = _room(path), str(path.relative_to(SRC))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                    and node.module.startswith("inca."):
                theirs = node.module.split(".")[1]
                wrong += [f"{where}:{node.lineno} imports {a.name} from {node.module}"
                          for a in node.names if _private(a.name) and theirs != room]
            elif isinstance(node, ast.Attribute) and _private(node.attr) \
                    and not _owner_names(node.value) and node.attr not in defined[room] \
                    and not (isinstance(node.value, ast.Name)
                             and node.value.id in ("torch", "os", "sys", "threading")):
                wrong.append(f"{where}:{node.lineno} reads {ast.unparse(node)}")
    return wrong


def test_no_room_reaches_into_another_rooms_private_names():
    """Fine-tuning, export and serving go through the backbone's and the task's public
    contract (``Backbone.forward_layers``, ``trainable_copy``, ``Task.preprocess``), never
    their hooks: a module may use a private name only in the room that defines it."""
    sources = _sources()
    assert not _private_reaches(sources)
    # the check finds a reach when there is one
    planted = ast.parse("from inca.backbones.hooks import _first_tensor\n"
                        "def f(backbone, task):\n"
                        "    return backbone._extract(1, 2), task._images(3)\n")
    found = _private_reaches([*sources, (SRC / "task" / "planted.py", planted)])
    assert [w.split(" ", 1)[1] for w in found] == [
        "imports _first_tensor from inca.backbones.hooks", "reads backbone._extract",
        "reads task._images"], found


def test_helpers_are_imported_from_their_homes():
    packages = set(_packages())
    wrong = []
    for path, tree in _sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module not in packages:
                wrong += [(str(path.relative_to(SRC)), node.module, a.name) for a in node.names
                          if a.name in HOMES and node.module != HOMES[a.name]]
    assert not wrong
    for name, home in HOMES.items():
        assert hasattr(importlib.import_module(home), name)


def test_no_module_is_shadowed_by_a_name_of_its_package():
    """``import inca.training.fitting as m`` gives the module, ``inca.training.fit`` the
    function: a package attribute named as one of its modules must be that module."""
    for name in _packages():
        try:
            pkg = importlib.import_module(name)
        except ImportError:  # an optional dependency is missing
            continue
        folder = Path(pkg.__file__).parent
        subs = [p.stem for p in folder.glob("*.py")] + \
            [p.name for p in folder.iterdir() if (p / "__init__.py").is_file()]
        for sub in subs:
            value = vars(pkg).get(sub)
            assert value is None or (isinstance(value, types.ModuleType)
                                     and value.__name__ == f"{name}.{sub}"), f"{name}.{sub}"
    import inca.training
    import inca.training.fitting as fitting

    assert isinstance(fitting, types.ModuleType) and inca.training.fit is fitting.fit


@pytest.mark.parametrize("kind", ["inca", "open_inca"])
def test_inca_and_open_inca_share_one_attention_block(kind):
    from inca.adapters import create_adapter
    from inca.adapters.attention import CrossAttentionAdapter

    adapter = create_adapter(kind, embed_dim=32, num_classes=3)
    assert isinstance(adapter, CrossAttentionAdapter)
    attention = ["token_norm.weight", "token_norm.bias", "in_proj_weight", "in_proj_bias",
                 "out_proj.weight", "out_proj.bias"]
    # the keys of every saved task: renaming one would orphan their weights
    expected = {"inca": ["query", *attention, "norm.weight", "norm.bias", "head.weight",
                         "head.bias"],
                "open_inca": [*attention, "queries.0", "class_weights.0", "class_biases.0"]}
    assert sorted(adapter.state_dict()) == sorted(expected[kind])
    ids = {id(p) for p in adapter.attention_parameters()}
    assert ids == {id(adapter.get_parameter(k)) for k in attention}


def test_member_input_is_one_rule():
    from inca.adapters import member_input

    feats = {k: torch.randn(2, 3, 4) for k in ("a", "b", "c")}
    assert member_input(["b"], feats) is feats["b"]
    assert [t is feats[k] for t, k in zip(member_input(("a", "c"), feats), "ac",
                                          strict=True)] == [True, True]
