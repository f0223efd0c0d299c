"""InCA's design choices as axes of one bank: which variant validation prefers.

Usage: python benchmarks/bank_axes.py [--train 2000] [--test 500] [--epochs 8]

DINOv2-S/14 (bundled weights) at 112 px on Fashion-MNIST, every layer, lr grid
(1e-3, 3e-3); the variants train side by side in one bank on one extraction, and the
report gives each adapter's validation and (never used to choose) test accuracy.
Writes ``benchmarks/results/bank-axes.{json,md}``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _common import command_line, environment, publish

import inca
from inca.data import load_dataset

VARIANTS = {
    "inca": {},  # one query, heads of 64+ channels (4 at D=384)
    "inca:q4": {"num_queries": 4},
    "inca:q4cat": {"num_queries": 4, "query_reduce": "concat"},
    "inca:h1": {"num_heads": 1},
    "inca:drop": {"dropout": 0.2},
    "inca:patch": {"attend_prefix": False},  # patch tokens only, no CLS
    "inca:mlp": {"head_hidden": 384},  # Linear-GELU-Linear head
    "inca:w2": {"num_layers": 2},  # two adjacent layers' tokens together
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--test", type=int, default=500)
    ap.add_argument("--epochs", type=int, default=8)
    args = ap.parse_args()
    bb = inca.create_backbone("dinov2_vits14")
    train = load_dataset("fashion-mnist", limit=args.train)
    test = load_dataset("fashion-mnist", split="test", limit=args.test)
    with tempfile.TemporaryDirectory() as tmp:
        task = inca.fit(bb, train, test=test, layers="all", kinds=(*VARIANTS, "linear"),
                        adapter_options={k: v for k, v in VARIANTS.items() if v},
                        lrs=(1e-3, 3e-3), epochs=args.epochs, patience=0,
                        cache_dir=Path(tmp), progress=False)
    rep = task.report
    best = {}
    for r in rep.rows:
        b = best.get(r["kind"])
        if b is None or (r["val_accuracy"], -r["val_loss"]) > (b["val_accuracy"], -b["val_loss"]):
            best[r["kind"]] = r
    env = environment()
    md = ["# InCA variants in one bank", "", f"Command: `{command_line()}`  ",
          f"DINOv2-S/14 at 112 px, Fashion-MNIST {rep.data['num_train']} train / "
          f"{rep.data['num_val']} val / {args.test} test, {args.epochs} epochs, every layer x "
          f"lr (1e-3, 3e-3), {len(rep.rows)} adapters in one bank; {env['device']}, "
          f"torch {env['torch']}.", "",
          "| variant | settings | best adapter | val acc | test acc | % of backbone |",
          "|---|---|---|---:|---:|---:|"]
    for kind, r in sorted(best.items(), key=lambda kv: -kv[1]["val_accuracy"]):
        settings = VARIANTS.get(kind, {}) if kind != "linear" else {"pool": "cls_mean"}
        md.append(f"| {kind} | {settings or 'default'} | {r['key']} | "
                  f"{100 * r['val_accuracy']:.1f}% | {100 * r['test_accuracy']:.1f}% | "
                  f"{r['percent_of_backbone']:.2f} |")
    md += ["", f"Chosen on validation: {rep.chosen} ({', '.join(rep.chosen_members)}), "
           f"test {100 * rep.test_accuracy[rep.chosen]:.1f}%."]
    print("\n".join(md))
    publish("bank-axes", {"best": best, "chosen": rep.chosen, "members": rep.chosen_members,
                          "test_accuracy": rep.test_accuracy}, md, env)


if __name__ == "__main__":
    main()
