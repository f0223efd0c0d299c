"""The README's Python sections run as written: the quick start, class-incremental tasks
and ONNX export, each in a fresh process on the offline DINOv2-S/14 and Fashion-MNIST.

Only the sizes shrink (``SMALLER``: fewer images and epochs, so a section takes a minute on
two cores, not ten); every other line runs as a reader would paste it.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SMALLER = [("limit=2000", "limit=40"), ("epochs=12", "epochs=1")]


def python_blocks(heading: str) -> list[str]:
    """The ```python blocks of the README under ``heading``, to the next heading."""
    text = README.read_text()
    start = text.index(f"\n{heading}\n")
    end = re.search(r"\n#+ ", text[start + 1:])
    section = text[start:start + 1 + end.start()] if end else text[start:]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def run(code: str, cwd: Path) -> str:
    for old, new in SMALLER:
        code = code.replace(old, new)
    res = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, f"README block failed:\n{code}\n{res.stderr[-3000:]}"
    return res.stdout


def fashion_images(folder: Path, classes: dict[str, int], n: int) -> Path:
    """``n`` test images of each named Fashion-MNIST class in ``folder/<name>/``."""
    from inca.data import load_dataset

    test = load_dataset("fashion-mnist", split="test", limit=2000, seed=3)
    for name, label in classes.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        rows = [i for i, t in enumerate(test.targets) if t == label][:n]
        for i in rows:
            test[i][0].save(folder / name / f"{i}.png")
    return folder


@pytest.mark.slow  # the offline DINOv2-S/14 over a few dozen images, and an export
def test_the_quick_start_runs_as_written(tmp_path):
    (block,) = python_blocks("## Python")
    from inca.data import load_dataset

    load_dataset("fashion-mnist", split="test", limit=10)[0][0].save(tmp_path / "shoe.png")
    run(block, tmp_path)
    assert (tmp_path / "runs" / "fmnist" / "task" / "task.json").is_file()


@pytest.mark.slow
def test_class_incremental_and_export_sections_run_as_written(tmp_path):
    (incremental,) = python_blocks("### Adding classes later: Open-InCA")
    fashion_images(tmp_path / "pets", {"T-shirt": 0, "Trouser": 1}, 12)
    fashion_images(tmp_path / "more_pets", {"T-shirt": 0, "Sneaker": 7}, 12)
    fit = ("import inca\nfrom inca.data import load_dataset\n"
           "task = inca.fit(inca.create_backbone('dinov2_vits14'), load_dataset('pets'), "
           "layers='last', kinds=('open_inca',), epochs=1, progress=False)\n"
           "task.save('runs/pets/task')\n")
    run(fit, tmp_path)
    run(incremental, tmp_path)
    import inca

    bigger = inca.load_task(tmp_path / "runs" / "pets" / "task-v2")
    assert bigger.classes == ["T-shirt", "Trouser", "Sneaker"]

    export = next(b for b in python_blocks("## Command line") if "onnxruntime" in b)
    pytest.importorskip("onnxscript")
    from inca.cli.export import export_task

    export_task(tmp_path / "runs" / "pets" / "task-v2", tmp_path / "fmnist.onnx")
    out = run(export + "\nprint(probs.shape)\n", tmp_path)
    assert out.strip().endswith("(4, 3)")
