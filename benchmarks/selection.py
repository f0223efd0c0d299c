"""Selection that holds up on test: choosing epochs and adapters by validation accuracy
or by validation loss, over several validation splits.

Usage: python benchmarks/selection.py [--train 1500] [--test 500] [--epochs 12] [--seeds 3]

DINOv2-S/14 (bundled weights) at 112 px on Fashion-MNIST, every layer x lr (1e-3, 3e-3),
InCA and linear adapters in one bank, 15% of the training images for validation (the
seed draws the split, the initialisation and the batch order). One extraction serves
every fit. For each seed and each ``select_by``, the test accuracy of the single chosen
adapter and of the top-3 ensemble, beside the best test accuracy any adapter of the bank
reached (an oracle, never available to selection). Writes
``benchmarks/results/selection.{json,md}``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from _common import command_line, environment, publish

import inca
from inca.data import load_dataset

RULES = ("accuracy", "loss")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=1500)
    ap.add_argument("--test", type=int, default=500)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--backbone", default="dinov2_vits14")
    return ap


def main() -> None:
    args = parser().parse_args()
    runs = fit_all(args)
    env = environment()
    summary = summarize(runs)
    publish("selection", {"runs": runs, "summary": summary},
            to_markdown(runs, summary, args, env), env)


def fit_all(args: argparse.Namespace) -> list[dict]:
    """One fit per seed and rule, all from one extraction: what each chose, and the oracle."""
    bb = inca.create_backbone(args.backbone)
    train = load_dataset("fashion-mnist", limit=args.train)
    test = load_dataset("fashion-mnist", split="test", limit=args.test)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            for rule in RULES:
                task = inca.fit(bb, train, test=test, layers="all", kinds=("inca", "linear"),
                                lrs=(1e-3, 3e-3), epochs=args.epochs, patience=0, seed=seed,
                                select_by=rule, cache_dir=Path(tmp), progress=False)
                rep = task.report
                best = next(c for c in rep.candidates if c["name"] == "best")
                chosen = next(r for r in rep.rows if r["key"] == best["members"][0])
                run = {"seed": seed, "select_by": rule, "chosen": chosen["key"],
                       "chosen_val_accuracy": chosen["val_accuracy"],
                       "chosen_test_accuracy": rep.test_accuracy["best"],
                       "ensemble_test_accuracy": rep.test_accuracy.get("ensemble"),
                       "oracle_test_accuracy": max(r["test_accuracy"] for r in rep.rows),
                       "num_val": rep.data["num_val"], "adapters": len(rep.rows)}
                runs.append(run)
                print(run, flush=True)
    return runs


def summarize(runs: list[dict]) -> dict:
    """Each rule's means over the seeds."""
    summary = {}
    for rule in RULES:
        rs = [r for r in runs if r["select_by"] == rule]
        summary[rule] = {k: statistics.fmean(r[k] for r in rs)
                         for k in ("chosen_val_accuracy", "chosen_test_accuracy",
                                   "ensemble_test_accuracy", "oracle_test_accuracy")}
    return summary


def to_markdown(runs: list[dict], summary: dict, args: argparse.Namespace, env: dict
                ) -> list[str]:
    md = ["# Selection on validation: accuracy or loss", "", f"Command: `{command_line()}`  ",
          f"{args.backbone} at 112 px, Fashion-MNIST {args.train} training images "
          f"({runs[0]['num_val']} of them for validation) / {args.test} test, {args.epochs} "
          f"epochs, {runs[0]['adapters']} adapters in one bank (InCA and linear, every layer x "
          f"lr 1e-3, 3e-3), {args.seeds} seeds (split, init, order); {env['device']}, "
          f"torch {env['torch']}.", "",
          "| seed | select by | chosen adapter | its val acc | its test acc | top-3 ensemble "
          "test | best test of any adapter (oracle) |", "|---|---|---|---:|---:|---:|---:|"]
    for r in runs:
        md.append(f"| {r['seed']} | {r['select_by']} | {r['chosen']} | "
                  f"{100 * r['chosen_val_accuracy']:.1f}% | "
                  f"{100 * r['chosen_test_accuracy']:.1f}% | "
                  f"{100 * r['ensemble_test_accuracy']:.1f}% | "
                  f"{100 * r['oracle_test_accuracy']:.1f}% |")
    md += ["", "| select by | mean val acc of the chosen | mean test acc of the chosen | "
           "mean ensemble test |", "|---|---:|---:|---:|"]
    for rule, s in summary.items():
        md.append(f"| {rule} | {100 * s['chosen_val_accuracy']:.1f}% | "
                  f"{100 * s['chosen_test_accuracy']:.1f}% | "
                  f"{100 * s['ensemble_test_accuracy']:.1f}% |")
    return md


if __name__ == "__main__":
    main()
