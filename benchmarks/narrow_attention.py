"""A narrow attention for wide layers: accuracy and size of InCA adapters on MobileNetV2.

Usage: python benchmarks/narrow_attention.py [--train 1500] [--test 500] [--epochs 3]

MobileNetV2's widest stage has 1,280 channels: a full-width InCA adapter there (4 x 1280²
projections) holds 1.9x the backbone's 3.5 M parameters. By default the bank narrows the
attention (``attn_dim``) of any adapter that would exceed 3% of its backbone. Both banks
(narrowed by default, and full width everywhere) train here on one extraction, one split,
tokens pooled to 7x7. Writes ``benchmarks/results/narrow-attention.{json,md}``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _common import command_line, environment, publish

import inca
from inca.data import load_dataset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=1500)
    ap.add_argument("--test", type=int, default=500)
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args()
    bb = inca.create_backbone("mobilenet_v2")
    train = load_dataset("fashion-mnist", limit=args.train)
    test = load_dataset("fashion-mnist", split="test", limit=args.test)
    backbone_params = sum(p.numel() for p in bb.parameters())
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, options in (("narrowed to <= 3% (default)", {}),
                              ("full width", {"inca": {"attn_dim": None}})):
            task = inca.fit(bb, train, test=test, layers="all", kinds=("inca",),
                            lrs=(1e-3, 3e-3), epochs=args.epochs, token_grid=7,
                            adapter_options=options, cache_dir=Path(tmp), progress=False,
                            patience=0, batch_size=32)
            rep = task.report
            widest = max(rep.rows, key=lambda r: r["parameters"])
            runs[name] = {
                "best": rep.chosen_members, "val_accuracy": rep.val_accuracy,
                "test_accuracy": rep.test_accuracy[rep.chosen], "chosen": rep.chosen,
                "largest_adapter_percent": widest["percent_of_backbone"],
                "chosen_percent": 100 * task.num_parameters() / backbone_params,
            }
            print(name, runs[name], flush=True)
    env = environment()
    md = ["# Narrow attention for wide layers (MobileNetV2)", "",
          f"Command: `{command_line()}`  ",
          f"Fashion-MNIST {args.train} train (15% validation) / {args.test} test, "
          f"{args.epochs} epochs, InCA on every stage, lr grid (1e-3, 3e-3), tokens pooled "
          f"to 7x7; {env['device']}, torch {env['torch']}.", "",
          "| bank | chosen | val acc | test acc | largest adapter, % of backbone | "
          "chosen task, % of backbone |", "|---|---|---:|---:|---:|---:|"]
    for name, r in runs.items():
        md.append(f"| {name} | {r['chosen']}: {', '.join(r['best'])} | "
                  f"{100 * r['val_accuracy']:.1f}% | {100 * r['test_accuracy']:.1f}% | "
                  f"{r['largest_adapter_percent']:.1f} | {r['chosen_percent']:.1f} |")
    publish("narrow-attention", {"runs": runs}, md, env)


if __name__ == "__main__":
    main()
