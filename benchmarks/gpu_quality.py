"""GPU quality run: InCA and full fine-tuning, each in float32 and in bf16-mixed, one split.

Usage:
    python benchmarks/gpu_quality.py --prepare          # here: write the portable assets
    PYTHONPATH=src python benchmarks/gpu_quality.py     # on the GPU machine

``--prepare`` writes ``.bench-assets/`` (git-ignored): the bundled DINOv2-S/14 weights as
an fp16 safetensors file (44 MB; the ONNX asset they are converted from is 97 MB) and
Fashion-MNIST's first ``--train`` training and ``--test`` test images as a compressed
``.npz`` (about 10 MB for 20,000 + 2,000). Carry that folder to the GPU machine.

Every run uses the same data and split: ``inca.fit`` (all 13 layers, InCA and linear
adapters, two learning rates, the default 15% validation split with seed 0) and full
fine-tuning (its own best epoch chosen on that same validation split), ``--epochs`` each,
batch ``--batch-size``, at 224 px, no augmentation for either. InCA streams by default
(``--mode``): a cache of every layer of 20,000 images at 224 px would be 51 GB. Writes
``benchmarks/results/gpu-quality.{json,md}``:
``{"device": ..., "runs": [{"method", "precision", "test_accuracy", "chosen", "wall_s",
"peak_gib", "epochs"}]}``. Expected: InCA chosen over the linear probes, test accuracy
>= 89%, bf16-mixed within 0.5 points of float32 for both methods.
"""

from __future__ import annotations

import argparse
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


def run_inca(backbone, train, test, precision: str, args, device) -> dict:
    import inca

    with tempfile.TemporaryDirectory() as tmp, PeakMemory(device=device) as mem:
        t = time.perf_counter()
        task = inca.fit(backbone, train, test=test, layers="all", kinds=("inca", "linear"),
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
    with PeakMemory(device=device) as mem:
        t = time.perf_counter()
        res = finetune(backbone, tr, val, test, config, progress=args.progress, device=device)
        wall = time.perf_counter() - t
    best = max(res.history, key=lambda h: (h["val_accuracy"], -h["epoch"]))
    return {"method": "full", "precision": precision, "test_accuracy": res.test_accuracy,
            "chosen": f"epoch {best['epoch']}", "wall_s": wall, "peak_gib": _gib(mem),
            "epochs": res.epochs_run, "val_accuracy": res.val_accuracy}


def _gib(mem: PeakMemory) -> float:
    if mem.cuda_peak_mib is not None:
        return mem.cuda_peak_mib / 1024
    return mem.peak_rss_mib / 1024


def to_markdown(payload: dict) -> str:
    runs = payload["runs"]
    md = [
        "# GPU quality: InCA and full fine-tuning in float32 and bf16-mixed", "",
        f"Command: `{payload['command']}`  ",
        f"Device: {payload['device']}, torch {payload['environment']['torch']}. "
        f"DINOv2-S/14 (bundled weights) at {payload['input_size']} px, Fashion-MNIST "
        f"{payload['n_train']} training images (15% held out for selection) and "
        f"{payload['n_test']} test images, {payload['epochs']} epochs, batch "
        f"{payload['batch_size']}. InCA: all layers x (InCA, linear) x lr (1e-3, 3e-3), "
        f"mode {payload['inca_mode']}, no augmentation. Peak memory: CUDA peak allocation "
        "(RSS on a CPU).", "",
        "| method | precision | test acc | chosen | val acc | wall s | peak GiB | epochs |",
        "|---|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in runs:
        md.append(f"| {r['method']} | {r['precision']} | {100 * r['test_accuracy']:.2f}% | "
                  f"{r['chosen']} | {100 * r['val_accuracy']:.2f}% | {r['wall_s']:.1f} | "
                  f"{r['peak_gib']:.2f} | {r['epochs']} |")
    by = {(r["method"], r["precision"]): r["test_accuracy"] for r in runs}
    md.append("")
    for method in ("inca", "full"):
        if (method, "32") in by and (method, "bf16-mixed") in by:
            gap = 100 * (by[(method, "bf16-mixed")] - by[(method, "32")])
            md.append(f"- {method}: bf16-mixed minus float32 = {gap:+.2f} points "
                      f"(target within 0.5).")
    return "\n".join(md) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prepare", action="store_true", help="write the assets and stop")
    ap.add_argument("--assets", type=Path, default=ASSETS)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--input-size", type=int, default=224)
    ap.add_argument("--train", type=int, default=20000)
    ap.add_argument("--test", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--precisions", default="32,bf16-mixed")
    ap.add_argument("--methods", default="inca,full")
    ap.add_argument("--num-workers", type=int, default=8)
    ap.add_argument("--mode", default="streaming",
                    help="InCA's mode: streaming (no 51 GB cache of 20,000 images at 224 px) "
                         "or cached")
    ap.add_argument("--name", default="gpu-quality", help="results file name")
    ap.add_argument("--results-dir", type=Path, default=RESULTS)
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args()
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
    runners = {"inca": run_inca, "full": run_full}
    payload = {
        "benchmark": "gpu-quality", "command": command_line(), "environment": environment(),
        "device": environment()["device"], "input_size": args.input_size,
        "n_train": len(train), "n_test": len(test), "epochs": args.epochs,
        "batch_size": args.batch_size, "inca_mode": args.mode, "runs": [],
    }
    for method in args.methods.split(","):
        for precision in args.precisions.split(","):
            print(f"{method} {precision} ...", flush=True)
            run = runners[method](backbone, train, test, precision, args, device)
            print(run, flush=True)
            payload["runs"].append(run)
            # written after each run: a later failure loses nothing measured
            path = write_results(args.name, payload, to_markdown(payload), args.results_dir)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
