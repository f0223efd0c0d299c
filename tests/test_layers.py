"""The architecture's one rule: imports flow one way through the rooms of the tree.

plumbing (errors, files, precision, distributed...) -> backbones -> data -> features ->
adapters -> task -> training -> runtime -> baselines -> cli. A module may import its own
room and the rooms before it, never a later one (lazy imports inside functions count).
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "inca"
ROOMS = ["_plumbing", "backbones", "data", "features", "adapters", "task", "training",
         "runtime", "baselines", "cli"]
TOP = {"__init__", "__main__"}  # the package's face: may import anything


def room(module: str) -> str | None:
    """The room of ``inca.x.y`` (None for the package's top-level face)."""
    parts = module.split(".")
    if parts[0] != "inca":
        return None
    if len(parts) == 1 or parts[1] in TOP:
        return None
    head = parts[1]
    return head if head in ROOMS else "_plumbing"


def imports(path: Path, tree: ast.Module | None = None) -> set[str]:
    tree = tree or ast.parse(path.read_text())
    found = set()
    package = ".".join(("inca", *path.relative_to(SRC).with_suffix("").parts[:-1]))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                found.add(f"{base}.{node.module}" if node.module else base)
            elif node.module:
                found.add(node.module)
    return {m for m in found if m == "inca" or m.startswith("inca.")}


def test_imports_flow_one_way():
    assert len(list(SRC.rglob("*.py"))) > 40, SRC  # the tree itself, not an empty folder
    wrong = []
    for path in sorted(SRC.rglob("*.py")):
        module = ".".join(("inca", *path.relative_to(SRC).with_suffix("").parts))
        mine = room(module)
        if mine is None:
            continue
        for target in imports(path):
            theirs = room(target)
            if theirs is not None and ROOMS.index(theirs) > ROOMS.index(mine):
                wrong.append(f"{module} ({mine}) imports {target} ({theirs})")
    assert not wrong, "imports against the flow:\n  " + "\n  ".join(wrong)


# The size rules hold for the package and for the scripts around it (benchmarks, scripts).
ROOT = SRC.parents[1]
SIZED = (SRC, ROOT / "benchmarks", ROOT / "scripts")


def _sized_files() -> list[Path]:
    files = [p for folder in SIZED if folder.is_dir() for p in sorted(folder.rglob("*.py"))]
    assert any(p.parent == ROOT / "benchmarks" for p in files), "benchmarks/ not found"
    return files


def test_no_module_is_too_long():
    long = {str(p.relative_to(ROOT)): n for p in _sized_files()
            if (n := len(p.read_text().splitlines())) > 420}
    assert not long, f"modules over ~400 lines (split them by job): {long}"


def _body_lines(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines of a function's body, its docstring aside (nested functions included)."""
    body = fn.body
    if isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None),
                                                     ast.Constant) \
            and isinstance(body[0].value.value, str):
        body = body[1:]
    return body[-1].end_lineno - body[0].lineno + 1 if body else 0


def test_no_function_is_too_long():
    """A long function hides its steps; name them (the module cap alone moved complexity
    into long functions)."""
    long = {f"{p.relative_to(ROOT)}:{node.lineno} {node.name}": n
            for p in _sized_files() for node in ast.walk(ast.parse(p.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and (n := _body_lines(node)) > 50}
    assert not long, f"functions over 50 body lines (split them into named steps): {long}"


def _runtime_imports(path: Path) -> set[str]:
    """``imports(path)`` without those under ``if TYPE_CHECKING:`` (annotations only)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            node.body = [ast.Pass()]
    return imports(path, tree)


def test_no_two_modules_import_each_other():
    """A module that imports another which imports it back (even lazily, inside a
    function) has two homes for one concept; annotations under TYPE_CHECKING aside."""
    mods = {}
    for path in SRC.rglob("*.py"):
        name = ".".join(("inca", *path.relative_to(SRC).with_suffix("").parts))
        if not name.endswith("__init__"):
            mods[name] = _runtime_imports(path)
    pairs = sorted({tuple(sorted((a, b))) for a, targets in mods.items() for b in targets
                    if b in mods and b != a and a in mods[b]})
    assert not pairs, f"modules importing each other: {pairs}"
