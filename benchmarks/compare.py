"""InCA against fine-tuning, LoRA and probes (the offline setting), and how costs scale.

Usage: python benchmarks/compare.py [--backbones dinov2_vits14,mobilenet_v2] [--limit 1500]
           [--test-limit 500] [--epochs 3] [--seeds 3] [--scaling-limit 600]

1. ``inca compare`` (:func:`inca.baselines.compare.run_compare`) per backbone: one table of
   accuracy, training time, peak memory, trainable parameters and bytes per task, with
   ratios to full fine-tuning. Results: benchmarks/results/compare-<backbone>.{json,md,png}.
2. Scaling (DINOv2-S/14): InCA's cost for 1, 3 and all layers probed and 1, 3 and 5 tasks
   trained from one extraction (tasks = different labelings of the same images), against
   full fine-tuning, whose cost is one measured run per task (each task needs its own
   fine-tuned backbone). Results: benchmarks/results/scaling.{json,md,png}.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import RESULTS, command_line, environment, write_results

import inca
from inca.baselines.compare import CompareConfig, run_compare, write
from inca.data import load_dataset, split_train_val
from inca.features import extract_to_cache
from inca.training import AdapterBank, FitConfig, train_bank
from inca.training.sources import CachedSource

# Five labelings of the 10 Fashion-MNIST classes: five different tasks on the same images.
TASKS = {
    "10-way": np.arange(10),
    "pairs": np.arange(10) // 2,
    "binary": (np.arange(10) >= 5).astype(int),
    "mod-3": np.arange(10) % 3,
    "tops-vs-rest": np.isin(np.arange(10), [0, 2, 4, 6]).astype(int),
}
GRID = {"mobilenet_v2": 7}  # CNN stages are large maps: pool them to 7x7 for the cache


def scaling(backbone_name: str, limit: int, epochs: int, lrs: tuple[float, ...]) -> dict:
    from inca.baselines.finetune import FineTuneConfig, finetune

    bb = inca.create_backbone(backbone_name)
    data = load_dataset("fashion-mnist", limit=limit)
    tr, val = split_train_val(data, 0.15, 0)
    n = len(bb.layers)
    layer_sets = {"1 layer": [bb.layers[n // 2]],
                  "3 layers": [bb.layers[n // 4], bb.layers[n // 2], bb.layers[3 * n // 4]],
                  f"all {n} layers": list(bb.layers)}
    config = FitConfig(kinds=("inca",), lrs=lrs, epochs=epochs, patience=0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, layers in layer_sets.items():
            t = time.perf_counter()
            caches = [extract_to_cache(bb, ds, Path(tmp) / name / split, layers=layers,
                                       progress=False) for split, ds in (("t", tr), ("v", val))]
            extract_s = time.perf_counter() - t
            train_s = []
            for labels in TASKS.values():
                sources = [CachedSource(c, np.arange(len(c)), layers, relabel=labels)
                           for c in caches]
                bank = AdapterBank.from_plan(
                    layers, config, embed_dims=bb.embed_dims, num_classes=int(labels.max()) + 1,
                    token_counts={k: caches[0].token_shape(k)[0] for k in layers},
                    num_prefix_tokens=bb.num_prefix_tokens)
                t = time.perf_counter()
                train_bank(bank, sources[0], sources[1], config, progress=False)
                train_s.append(time.perf_counter() - t)
            for tasks in (1, 3, 5):
                rows.append({"layers": name, "tasks": tasks, "extract_seconds": extract_s,
                             "train_seconds": sum(train_s[:tasks]),
                             "inca_seconds": extract_s + sum(train_s[:tasks]),
                             "adapters_per_task": len(layers) * len(lrs)})
    t = time.perf_counter()
    finetune(bb, tr, val, None, FineTuneConfig(method="full", epochs=epochs), progress=False)
    full_s = time.perf_counter() - t
    for r in rows:
        r["full_finetune_seconds"] = full_s * r["tasks"]
        r["inca_over_full"] = r["inca_seconds"] / r["full_finetune_seconds"]
    return {"backbone": backbone_name, "train_images": len(tr), "val_images": len(val),
            "epochs": epochs, "full_finetune_one_task_seconds": full_s, "rows": rows}


def plot_scaling(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for name in dict.fromkeys(r["layers"] for r in result["rows"]):
        rs = [r for r in result["rows"] if r["layers"] == name]
        ax.plot([r["tasks"] for r in rs], [r["inca_seconds"] for r in rs], marker="o",
                label=f"InCA, {name}")
    rs = [r for r in result["rows"] if r["layers"] == result["rows"][0]["layers"]]
    ax.plot([r["tasks"] for r in rs], [r["full_finetune_seconds"] for r in rs], marker="s",
            color="black", label="full fine-tuning (one run per task)")
    ax.set_xlabel("tasks trained")
    ax.set_ylabel("total training cost, s")
    ax.set_yscale("log")
    ax.set_xticks([1, 3, 5])
    ax.set_title(f"{result['backbone']}: cost vs tasks and layers probed")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbones", default="dinov2_vits14,mobilenet_v2")
    ap.add_argument("--limit", type=int, default=1500)
    ap.add_argument("--test-limit", type=int, default=500)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--scaling-limit", type=int, default=600)
    ap.add_argument("--skip-scaling", action="store_true")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    lrs = (1e-3, 3e-3)
    for name in args.backbones.split(","):
        config = CompareConfig(backbone=name, data="fashion-mnist", epochs=args.epochs,
                               limit=args.limit, test_limit=args.test_limit, seeds=args.seeds,
                               lrs=lrs, token_grid=GRID.get(name), device=args.device)
        result = run_compare(config)
        result["environment"] = environment()
        files = write(result, RESULTS, f"compare-{name}", command_line())
        print(files["markdown"].read_text())
    if args.skip_scaling:
        return
    result = scaling("dinov2_vits14", args.scaling_limit, args.epochs, lrs)
    result.update(command=command_line(), environment=environment())
    md = [
        f"# Scaling: {result['backbone']}, {result['train_images']} training images, "
        f"{result['epochs']} epochs",
        "",
        f"Command: `{result['command']}`  ",
        "InCA: one extraction of the probed layers, then one bank per task (tasks are five "
        "labelings of the same Fashion-MNIST images). Full fine-tuning: one measured run of "
        f"{result['full_finetune_one_task_seconds']:.1f} s, times the number of tasks (each "
        "task needs its own fine-tuned backbone).",
        "",
        "| layers probed | tasks | extraction s | adapters s | InCA total s | full FT s | "
        "InCA / full |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *[f"| {r['layers']} | {r['tasks']} | {r['extract_seconds']:.1f} | "
          f"{r['train_seconds']:.1f} | {r['inca_seconds']:.1f} | "
          f"{r['full_finetune_seconds']:.1f} | {r['inca_over_full']:.3f} |"
          for r in result["rows"]],
        "",
    ]
    write_results("scaling", result, "\n".join(md))
    plot_scaling(result, RESULTS / "scaling.png")
    print("\n".join(md))


if __name__ == "__main__":
    main()
