"""Full fine-tuning's learning rate: one rate for every layer vs layer-wise decay (BEiT/MAE).

Usage: python benchmarks/finetune_lr.py [--train 700] [--test 300] [--epochs 3]

DINOv2-S/14 (bundled weights) at 112 px on Fashion-MNIST, the same split for every
setting (15% of ``--train`` held out), batch 32, one seed: the evidence behind
``FineTuneConfig``'s defaults (``lr_backbone`` at the top layer, ``layer_decay``).
Writes ``benchmarks/results/finetune-lr.{json,md}``.
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import command_line, environment, publish

import inca
from inca.baselines.finetune import FineTuneConfig, finetune
from inca.data import load_dataset, split_train_val

SETTINGS = {
    "one lr 5e-5 (the previous default)": {"lr_backbone": 5e-5, "layer_decay": 1.0},
    "layer decay 0.75, top lr 1e-4": {"lr_backbone": 1e-4, "layer_decay": 0.75},
    "layer decay 0.75, top lr 2e-4": {"lr_backbone": 2e-4, "layer_decay": 0.75},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=700)
    ap.add_argument("--test", type=int, default=300)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    torch.manual_seed(0)
    data = load_dataset("fashion-mnist", limit=args.train)
    test = load_dataset("fashion-mnist", split="test", limit=args.test)
    tr, val = split_train_val(data, 0.15, 0)
    runs = []
    for name, kw in SETTINGS.items():
        bb = inca.create_backbone("dinov2_vits14")
        t = time.perf_counter()
        res = finetune(bb, tr, val, test, FineTuneConfig(
            method="full", epochs=args.epochs, batch_size=32, **kw), progress=False,
            device=args.device)
        runs.append({"setting": name, **kw, "val_accuracy": res.val_accuracy,
                     "test_accuracy": res.test_accuracy, "seconds": time.perf_counter() - t})
        print(runs[-1], flush=True)
    env = environment()
    md = ["# Full fine-tuning: one learning rate vs layer-wise decay", "",
          f"Command: `{command_line()}`  ",
          f"DINOv2-S/14 at 112 px, Fashion-MNIST {len(tr)} train / {len(val)} val / "
          f"{len(test)} test, {args.epochs} epochs, batch 32, one seed; {env['device']}, "
          f"torch {env['torch']}.", "",
          "| setting | val acc | test acc | s |", "|---|---:|---:|---:|"]
    md += [f"| {r['setting']} | {100 * r['val_accuracy']:.1f}% | "
           f"{100 * r['test_accuracy']:.1f}% | {r['seconds']:.0f} |" for r in runs]
    md += ["", "The default is the best setting on validation (the test column is not used to "
           "choose). One seed on a few hundred images: differences of a point or two are "
           "within noise."]
    publish("finetune-lr", {"runs": runs}, md, env)


if __name__ == "__main__":
    main()
