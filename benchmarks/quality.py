"""Quality at equal cost: full fine-tuning at its best setting vs InCA (and the strong
linear probe) given at most half of fine-tuning's wall time.

Usage: python benchmarks/quality.py [--limit 1500] [--test-limit 500] [--epochs 3]

Runs ``inca compare`` (each method in its own process, one split) with
``--equal-time --time-fraction 0.5``: fine-tuning trains ``--epochs`` epochs with
layer-wise learning-rate decay; the probes and InCA get half its wall time, extraction
included, and run as many epochs as fit. On this CPU: DINOv2-S/14 at 112 px and
MobileNetV2 (tokens pooled to 7x7). The GPU half of the issue (DINOv2-S/14 at 224 px,
20,000 images) needs a GPU; ``gpu`` stays ``null`` until it runs there. Writes
``benchmarks/results/quality.{json,md}``, and each comparison's own table under
``benchmarks/results/quality-<backbone>/``.
"""

from __future__ import annotations

import argparse

from _common import RESULTS, command_line, environment, publish

from inca.baselines.compare import CompareConfig, run_compare, write

BACKBONES = {"dinov2_vits14": {}, "mobilenet_v2": {"token_grid": 7}}
ROWS = {"full": "full", "inca_best": "inca @ full's time",
        "inca_ensemble": "inca-ensemble @ full's time", "linear_probe": "linear @ full's time"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=1500)
    ap.add_argument("--test-limit", type=int, default=500)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    cpu: dict = {}
    for name, extra in BACKBONES.items():
        config = CompareConfig(backbone=name, data="fashion-mnist",
                               methods=("full", "linear", "inca"), epochs=args.epochs,
                               limit=args.limit, test_limit=args.test_limit, seeds=1,
                               expensive_seeds=1, batch_size=32, equal_time=True,
                               time_fraction=0.5, device=args.device, **extra)
        result = run_compare(config)
        write(result, RESULTS / f"quality-{name}", command=command_line())
        rows = {r["method"]: r for r in result["summary"]}
        epochs = {r["method"]: r["extra"].get("epochs_run") for r in result["runs"]}
        cpu[name] = {key: {"test_accuracy": rows[m]["test_accuracy_mean"],
                           "wall_s": rows[m]["train_seconds"],
                           "epochs": epochs.get(m, args.epochs)}
                     for key, m in ROWS.items() if m in rows}
        print(name, cpu[name], flush=True)
    env = environment()
    md = ["# Quality at equal cost", "", f"Command: `{command_line()}`  ",
          f"Fashion-MNIST {args.limit} training images (15% validation) / {args.test_limit} "
          f"test, one seed; full fine-tuning {args.epochs} epochs (layer-wise lr decay 0.75); "
          "InCA and the linear probe (CLS ⊕ mean, standardized) given half of its wall time, "
          f"extraction included; {env['device']}, torch {env['torch']}. GPU: not run yet.", "",
          "| backbone | method | test acc | wall s | epochs |", "|---|---|---:|---:|---:|"]
    for name, methods in cpu.items():
        for key, r in methods.items():
            md.append(f"| {name} | {key} | {100 * r['test_accuracy']:.1f}% | "
                      f"{r['wall_s']:.0f} | {r['epochs']} |")
    md += ["", "Targets: the selected InCA adapter >= full fine-tuning - 0.5 points, the "
           "ensemble >= full fine-tuning, at <= 0.5 of its wall time; InCA above the linear "
           "probe."]
    for name, m in cpu.items():
        if {"full", "inca_best", "inca_ensemble"} <= set(m):
            gap = 100 * (m["inca_best"]["test_accuracy"] - m["full"]["test_accuracy"])
            ens = 100 * (m["inca_ensemble"]["test_accuracy"] - m["full"]["test_accuracy"])
            md.append(f"- {name}: InCA best {gap:+.1f} points, ensemble {ens:+.1f} points "
                      "vs full fine-tuning.")
    publish("quality", {"gpu": None, "cpu": cpu}, md, env)


if __name__ == "__main__":
    main()
