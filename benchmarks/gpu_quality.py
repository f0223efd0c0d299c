"""GPU quality run: InCA and full fine-tuning, each in float32 and in bf16-mixed, one split.

Usage:
    python benchmarks/gpu_quality.py --prepare          # here: write the portable assets
    PYTHONPATH=src python benchmarks/gpu_quality.py     # on the GPU machine

``--prepare`` writes ``.bench-assets/`` (git-ignored): the bundled DINOv2-S/14 weights as
an fp16 safetensors file (42 MiB; the ONNX asset they are converted from is 97 MB) and
Fashion-MNIST's first ``--train`` training and ``--test`` test images as a compressed
``.npz`` (12.6 MiB for 20,000 + the whole 10,000-image test set). Carry that folder to the
GPU machine (``scripts/gpu_check.sh`` says how).

Every run uses the same data and split: ``inca.fit`` (all 13 layers, InCA and linear
adapters, two learning rates, the default 15% validation split with seed 0) and full
fine-tuning (its own best epoch chosen on that same validation split), ``--epochs`` each,
batch ``--batch-size``, at 224 px, no augmentation for either. InCA streams by default
(``--mode``): a cache of every layer of 20,000 images at 224 px would be 51 GB. The runs go
precision by precision (the first of ``--precisions`` first, every method in it). Method
``axes``, last (as time allows), is InCA at full fine-tuning's training time (as many
epochs as that buys, at most ``--axes-max-epochs``) with the bank's design axes side by
side in one bank: 1 and 4 queries, 2-layer windows, an MLP head, and linear probes; it
uses the training time of ``full`` in ``--axes-precision`` (or ``--axes-budget-s``).
Writes ``benchmarks/results/gpu-quality.{json,md}``:
``{"device": ..., "runs": [{"method", "precision", "test_accuracy", "chosen", "wall_s",
"peak_gib", "epochs"}], "gaps": {method: bf16-mixed minus float32 with its standard
error}}``. Expected: InCA chosen over the linear probes, test accuracy >= 89%, bf16-mixed
within the noise of float32 for both methods (the standard error of a gap from 10,000 test
images is about 0.4 points; it leaves out the noise of the training runs themselves).
"""

from __future__ import annotations

import argparse
import gc
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import RESULTS, command_line, environment, write_results

from inca._memory import PeakMemory
from inca._precision import resolve_device
from inca.data import ArrayDataset, split_train_val

ASSETS = Path(__file__).resolve().parents[1] / ".bench-assets"
WEIGHTS = "dinov2_vits14_fp16.safetensors"
DATA = "fashion_mnist.npz"


def prepare(folder: Path, n_train: int, n_test: int) -> None:
    """Write the portable weights and data (needs the offline assets of ``make assets``)."""
    from safetensors.torch import save_file

    from inca.backbones.dinov2 import load_state_dict
    from inca.data import load_dataset

    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.to(torch.float16).contiguous() for k, v in load_state_dict().items()}
    save_file(state, str(folder / WEIGHTS))
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        ds = load_dataset("fashion-mnist", split=split)
        arrays[f"{split}_images"] = ds.images[:n]
        arrays[f"{split}_labels"] = ds.targets[:n]
    arrays["classes"] = np.array(ds.classes)
    np.savez_compressed(folder / DATA, **arrays)
    for name in (WEIGHTS, DATA):
        print(f"wrote {folder / name} ({(folder / name).stat().st_size / 2**20:.1f} MiB)")


def load(folder: Path, input_size: int, device: torch.device):
    """The backbone (float32 weights from the fp16 file) and the train and test sets."""
    from safetensors.torch import load_file

    from inca.backbones.dinov2 import DinoV2Backbone, DinoV2ViT

    missing = [n for n in (WEIGHTS, DATA) if not (folder / n).is_file()]
    if missing:
        raise SystemExit(f"{folder} lacks {missing}: run `python benchmarks/gpu_quality.py "
                         "--prepare` where the offline assets are installed, and carry it")
    with torch.device("meta"):
        model = DinoV2ViT()
    model.load_state_dict({k: v.float() for k, v in load_file(folder / WEIGHTS).items()},
                          assign=True)
    backbone = DinoV2Backbone(model, input_size=input_size).to(device)
    z = np.load(folder / DATA)
    classes = [str(c) for c in z["classes"]]
    train = ArrayDataset(z["train_images"], z["train_labels"], classes, "fashion-mnist/train")
    test = ArrayDataset(z["test_images"], z["test_labels"], classes, "fashion-mnist/test")
    return backbone, train, test


AXES = {  # the bank's design axes, side by side in the axes run
    "inca": {},  # one query
    "inca:q4": {"num_queries": 4},
    "inca:w2": {"num_layers": 2},  # two adjacent layers' tokens together
    "inca:mlp": {"head_hidden": 384},  # Linear-GELU-Linear head
}


def fresh(device: torch.device) -> None:
    """Free what earlier runs left, so that a run's peak holds only its own memory."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_inca(backbone, train, test, precision: str, args, device) -> dict:
    import inca

    fresh(device)
    with tempfile.TemporaryDirectory() as tmp, PeakMemory(device=device) as mem:
        t = time.perf_counter()
        task = inca.fit(backbone, train, test=test, layers=args.layers, kinds=("inca", "linear"),
                        lrs=(1e-3, 3e-3), epochs=args.epochs, batch_size=args.batch_size,
                        patience=0, precision=precision, device=device, cache_dir=tmp,
                        mode=args.mode, augment=False,
                        num_workers=args.num_workers, progress=args.progress)
        wall = time.perf_counter() - t
    rep = task.report
    chosen = rep.chosen if rep.chosen != "best" else rep.chosen_members[0]
    return {"method": "inca", "precision": precision,
            "test_accuracy": rep.test_accuracy[rep.chosen], "chosen": chosen,
            "wall_s": wall, "peak_gib": _gib(mem), "epochs": rep.timings["epochs_run"],
            "val_accuracy": rep.val_accuracy,
            "linear_probe_test_accuracy": rep.test_accuracy.get("linear_probe"),
            "extract_s": rep.timings["extract_seconds"]}


def run_full(backbone, train, test, precision: str, args, device) -> dict:
    from inca.baselines.finetune import FineTuneConfig, finetune

    tr, val = split_train_val(train, 0.15, 0)  # the split inca.fit makes
    config = FineTuneConfig(method="full", epochs=args.epochs, batch_size=args.batch_size,
                            precision=precision, num_workers=args.num_workers)
    fresh(device)
    with PeakMemory(device=device) as mem:
        t = time.perf_counter()
        res = finetune(backbone, tr, val, test, config, progress=args.progress, device=device)
        wall = time.perf_counter() - t
    best = max(res.history, key=lambda h: (h["val_accuracy"], -h["epoch"]))
    return {"method": "full", "precision": precision, "test_accuracy": res.test_accuracy,
            "chosen": f"epoch {best['epoch']}", "wall_s": wall, "peak_gib": _gib(mem),
            "epochs": res.epochs_run, "val_accuracy": res.val_accuracy,
            "train_s": res.train_seconds}


def run_axes(backbone, train, test, precision: str, args, device, budget_s: float) -> dict:
    """InCA at a given training time, the design axes in one bank (see :data:`AXES`)."""
    import inca

    fresh(device)
    with tempfile.TemporaryDirectory() as tmp, PeakMemory(device=device) as mem:
        t = time.perf_counter()
        task = inca.fit(backbone, train, test=test, layers=args.layers, kinds=(*AXES, "linear"),
                        adapter_options={k: v for k, v in AXES.items() if v},
                        lrs=(1e-3, 3e-3), epochs=args.axes_max_epochs,
                        time_budget_s=budget_s, batch_size=args.batch_size, patience=0,
                        precision=precision, device=device, cache_dir=tmp, mode=args.mode,
                        augment=False, num_workers=args.num_workers, progress=args.progress)
        wall = time.perf_counter() - t
    rep = task.report
    variants: dict[str, dict] = {}
    for r in rep.rows:
        b = variants.get(r["kind"])
        if b is None or (r["val_accuracy"], -r["val_loss"]) > (b["val_accuracy"],
                                                               -b["val_loss"]):
            variants[r["kind"]] = {k: r[k] for k in ("key", "val_accuracy", "val_loss",
                                                     "test_accuracy")}
    chosen = rep.chosen if rep.chosen != "best" else rep.chosen_members[0]
    return {"method": "axes", "precision": precision,
            "test_accuracy": rep.test_accuracy[rep.chosen], "chosen": chosen,
            "wall_s": wall, "peak_gib": _gib(mem), "epochs": rep.timings["epochs_run"],
            "val_accuracy": rep.val_accuracy, "time_budget_s": budget_s,
            "train_s": rep.timings["train_seconds"], "adapters": len(rep.rows),
            "variants": variants}


def _gib(mem: PeakMemory) -> float:
    if mem.cuda_peak_mib is not None:
        return mem.cuda_peak_mib / 1024
    return mem.peak_rss_mib / 1024


def gaps(runs: list[dict], n_test: int) -> dict:
    """bf16-mixed minus float32 test accuracy per method, in points, with the standard error
    of that difference from the test sample (two binomial proportions on ``n_test`` images;
    the training runs' own noise is not in it): within noise when at most two of them."""
    by = {(r["method"], r["precision"]): r["test_accuracy"] for r in runs}
    out = {}
    for method in dict.fromkeys(r["method"] for r in runs):
        if (method, "32") in by and (method, "bf16-mixed") in by:
            a, b = by[(method, "bf16-mixed")], by[(method, "32")]
            se = math.sqrt((a * (1 - a) + b * (1 - b)) / max(n_test, 1))
            gap = 100 * (a - b)
            out[method] = {"gap_points": gap, "se_points": 100 * se,
                           "within_noise": abs(gap) <= 2 * 100 * se}
    return out


def to_markdown(payload: dict) -> str:
    runs = payload["runs"]
    md = [
        "# GPU quality: InCA and full fine-tuning in float32 and bf16-mixed", "",
        f"Command: `{payload['command']}`  ",
        f"Device: {payload['device']}, torch {payload['environment']['torch']}. "
        f"DINOv2-S/14 (bundled weights) at {payload['input_size']} px, Fashion-MNIST "
        f"{payload['n_train']} training images (15% held out for selection) and "
        f"{payload['n_test']} test images, {payload['epochs']} epochs, batch "
        f"{payload['batch_size']}. InCA: layers {payload.get('layers', 'all')} x (InCA, linear) x "
        "lr (1e-3, 3e-3), "
        f"mode {payload['inca_mode']}, no augmentation. float32 means TF32 off. Peak "
        "memory: CUDA peak allocation (RSS on a CPU).", "",
        "| method | precision | test acc | chosen | val acc | wall s | peak GiB | epochs |",
        "|---|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in runs:
        md.append(f"| {r['method']} | {r['precision']} | {100 * r['test_accuracy']:.2f}% | "
                  f"{r['chosen']} | {100 * r['val_accuracy']:.2f}% | {r['wall_s']:.1f} | "
                  f"{r['peak_gib']:.2f} | {r['epochs']} |")
    md.append("")
    for method, g in gaps(runs, payload["n_test"]).items():
        md.append(f"- {method}: bf16-mixed minus float32 = {g['gap_points']:+.2f} "
                  f"+- {g['se_points']:.2f} points (standard error from the "
                  f"{payload['n_test']} test images): "
                  f"{'within' if g['within_noise'] else 'outside'} the noise (2 se).")
    for r in (r for r in runs if r["method"] == "axes"):
        md += ["", f"InCA at full fine-tuning's training time ({r['precision']}, budget "
               f"{r['time_budget_s']:.1f} s, trained {r['train_s']:.1f} s, {r['epochs']} "
               f"epochs, {r['adapters']} adapters in one bank); best of each variant on "
               "validation:", "", "| variant | settings | best adapter | val acc | test acc |",
               "|---|---|---|---:|---:|"]
        for kind, v in sorted(r["variants"].items(), key=lambda kv: -kv[1]["val_accuracy"]):
            settings = AXES.get(kind, {}) if kind != "linear" else {"pool": "cls_mean"}
            md.append(f"| {kind} | {settings or 'default'} | {v['key']} | "
                      f"{100 * v['val_accuracy']:.2f}% | {100 * v['test_accuracy']:.2f}% |")
        md.append(f"\nChosen on validation: {r['chosen']}, test "
                  f"{100 * r['test_accuracy']:.2f}%.")
    return "\n".join(md) + "\n"


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prepare", action="store_true", help="write the assets and stop")
    ap.add_argument("--assets", type=Path, default=ASSETS)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--input-size", type=int, default=224)
    ap.add_argument("--train", type=int, default=20000)
    ap.add_argument("--test", type=int, default=10000,
                    help="test images (prepared and scored; Fashion-MNIST has 10,000)")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--precisions", default="bf16-mixed,32",
                    help="run in this order (every method of the first, then the next)")
    ap.add_argument("--layers", default="all",
                    help="InCA's layers: all, or comma-separated names or positions")
    ap.add_argument("--methods", default="inca,full",
                    help="inca, full, axes (InCA's design axes at full's training time)")
    ap.add_argument("--axes-budget-s", type=float, default=None,
                    help="the axes run's training time (default: the full run's, same "
                         "precision)")
    ap.add_argument("--axes-max-epochs", type=int, default=30)
    ap.add_argument("--axes-precision", default="bf16-mixed",
                    help="the one precision the axes run uses")
    ap.add_argument("--num-workers", type=int, default=8)
    ap.add_argument("--mode", default="streaming",
                    help="InCA's mode: streaming (no 51 GB cache of 20,000 images at 224 px) "
                         "or cached")
    ap.add_argument("--name", default="gpu-quality", help="results file name")
    ap.add_argument("--results-dir", type=Path, default=RESULTS)
    ap.add_argument("--progress", action="store_true")
    return ap


def main() -> None:
    ap = parser()
    args = ap.parse_args()
    unknown = set(args.methods.split(",")) - {"inca", "full", "axes"}
    if unknown:
        ap.error(f"unknown --methods {sorted(unknown)}: choose from inca, full, axes")
    if args.prepare:
        prepare(args.assets, args.train, args.test)
        return

    device = resolve_device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False  # "32" means float32, not TF32
    torch.backends.cudnn.allow_tf32 = False
    backbone, train, test = load(args.assets, args.input_size, device)
    train = ArrayDataset(train.images[:args.train], train.targets[:args.train], train.classes,
                         train.name)
    test = ArrayDataset(test.images[:args.test], test.targets[:args.test], test.classes,
                        test.name)
    payload = {
        "benchmark": "gpu-quality", "command": command_line(), "environment": environment(),
        "device": environment()["device"], "input_size": args.input_size,
        "n_train": len(train), "n_test": len(test), "epochs": args.epochs,
        "batch_size": args.batch_size, "inca_mode": args.mode, "layers": args.layers, "runs": [],
        "gaps": {},
    }
    path = None
    for method, precision in plan(args):
        run = run_one(method, precision, backbone, train, test, args, device, payload["runs"])
        if run is None:
            continue
        print(run, flush=True)
        payload["runs"].append(run)
        payload["gaps"] = gaps(payload["runs"], len(test))
        # written after each run: a later failure loses nothing measured
        path = write_results(args.name, payload, to_markdown(payload), args.results_dir)
    print(f"wrote {path}")


def plan(args: argparse.Namespace) -> list[tuple[str, str]]:
    """``(method, precision)`` in the order they run: every precision's runs first; the
    axes run last, as time allows."""
    methods = args.methods.split(",")
    runs = [(m, p) for p in args.precisions.split(",") for m in methods if m != "axes"]
    if "axes" in methods:
        runs.append(("axes", args.axes_precision))
    return runs


def run_one(method: str, precision: str, backbone, train, test, args: argparse.Namespace,
            device, done: list[dict]) -> dict | None:
    """One run of the plan (``done``: the runs before it); ``None`` for an axes run with no
    time budget to match."""
    if method == "axes":
        full = next((r for r in done if r["method"] == "full"
                     and r["precision"] == precision), None)
        budget = args.axes_budget_s or (full["train_s"] if full else None)
        if budget is None:
            print(f"axes {precision}: skipped (no full run of that precision to match, "
                  "and no --axes-budget-s)", flush=True)
            return None
        print(f"axes {precision} (budget {budget:.1f} s) ...", flush=True)
        return run_axes(backbone, train, test, precision, args, device, budget)
    print(f"{method} {precision} ...", flush=True)
    runners = {"inca": run_inca, "full": run_full}
    return runners[method](backbone, train, test, precision, args, device)


if __name__ == "__main__":
    main()
