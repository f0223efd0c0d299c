"""Extraction and training throughput under torchrun: 1 rank against N on this machine.

Usage: python benchmarks/distributed.py [--ranks 1,2] [--images 512] [--epochs 3]
           [--backbone dinov2_vits14] [--input-size 112] [--device cpu|cuda]
           [--random-weights] [--data fashion-mnist|digits|...] [--results-dir DIR]

For each rank count, ``torchrun --standalone --nproc-per-node N`` runs the same script:
``extract_to_cache`` of the training images into a fresh folder (each rank its shards),
then ``inca.fit`` on that cache (DDP over the bank, each rank half of every batch). The
machine's cores are divided between the ranks (``OMP_NUM_THREADS``), so on a CPU the
ranks share the same arithmetic: the ratio shows the cost of the split (process start,
collectives, smaller matmuls), not a speed-up. ``--device cuda`` puts each rank on GPU
``LOCAL_RANK`` modulo the GPUs (inca's own rule): on one GPU every rank shares ``cuda:0``,
over Gloo (``INCA_DIST_BACKEND=gloo``; NCCL wants a GPU per rank), to exercise the CUDA
path. ``--random-weights`` builds the backbone untrained (seeded, the same on every rank),
and ``--data digits`` (scikit-learn's, bundled) needs no download: together they need no
large assets (what the GPU check runs). Writes
``benchmarks/results/distributed.{json,md}`` (``distributed-cuda`` with ``--device cuda``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import RESULTS, command_line, environment, publish

_RUN = """
import json, sys, time
sys.path.insert(0, {bench!r})
from pathlib import Path
import torch
import inca
from _common import make_backbone
from inca._distributed import context
from inca.data import load_dataset
from inca.features import extract_to_cache
ctx = context()
device = ctx.device({device!r})  # cuda: GPU LOCAL_RANK modulo the GPUs, made current
torch.manual_seed(0)  # random weights: the same on every rank (fit checks it)
bb = make_backbone({backbone!r}, input_size={input_size!r}, device=device,
                   random_weights={random_weights!r})
train = load_dataset({data!r}, limit={images})
ctx.barrier()
t = time.perf_counter()
extract_to_cache(bb, train, Path({folder!r}) / "cache" / "train", batch_size=32,
                 progress=False, num_workers=1)
ctx.barrier()
extract_s = time.perf_counter() - t
task = inca.fit(bb, train, kinds=("inca", "linear"), epochs={epochs}, patience=0,
                batch_size=64, cache_dir=Path({folder!r}) / "cache", progress=False,
                num_workers=1, device=device)
Path({folder!r}, f"device-{{ctx.rank}}").write_text(str(next(task.members.parameters()).device))
ctx.barrier()
if ctx.is_main:
    rep = task.report
    Path({folder!r}, "result.json").write_text(json.dumps({{
        "extract_seconds": extract_s, "train_seconds": rep.timings["train_seconds"],
        "epochs": rep.timings["epochs_run"], "adapters": len(rep.rows),
        "chosen": rep.chosen_members, "val_accuracy": rep.val_accuracy}}))
"""


def run(ranks: int, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        script = _RUN.format(bench=str(Path(__file__).parent), device=args.device,
                             backbone=args.backbone, input_size=args.input_size,
                             random_weights=args.random_weights, data=args.data,
                             images=args.images, folder=folder, epochs=args.epochs)
        threads = max(1, (os.cpu_count() or 1) // ranks)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        if args.device == "cuda":
            env["INCA_DIST_BACKEND"] = "gloo"  # NCCL wants a GPU per rank
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            env.pop(k, None)
        res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                              "--nproc-per-node", str(ranks), "--no-python", sys.executable,
                              "-c", script], env=env, capture_output=True, text=True,
                             timeout=args.time_limit)
        if res.returncode != 0:
            raise SystemExit(f"{ranks} rank(s) failed:\n{res.stderr[-4000:]}")
        out = json.loads(Path(folder, "result.json").read_text())
        out["devices"] = [Path(folder, f"device-{r}").read_text() for r in range(ranks)]
    out.update(ranks=ranks, threads_per_rank=threads,
               extract_images_per_s=args.images / out["extract_seconds"],
               train_samples_per_s=args.images * 0.85 * out["epochs"] / out["train_seconds"])
    print(out, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", default="1,2")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--backbone", default="dinov2_vits14")
    ap.add_argument("--input-size", type=int, default=112)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--random-weights", action="store_true",
                    help="the backbone untrained (no weight assets needed; timings only)")
    ap.add_argument("--data", default="fashion-mnist",
                    help="the training images (digits: no download)")
    ap.add_argument("--time-limit", type=float, default=900)
    ap.add_argument("--name", default=None,
                    help="results file name (default: distributed, or distributed-cuda)")
    ap.add_argument("--results-dir", type=Path, default=RESULTS)
    args = ap.parse_args()
    args.name = args.name or ("distributed-cuda" if args.device.startswith("cuda")
                              else "distributed")
    runs: list[dict] = []
    for ranks in (int(r) for r in args.ranks.split(",")):
        runs.append(run(ranks, args))
        publish_runs(runs, args)  # after each: a later failure loses nothing measured


def publish_runs(runs: list[dict], args: argparse.Namespace) -> None:
    base = runs[0]
    env = environment()
    md = ["# Extraction and training under torchrun", "", f"Command: `{command_line()}`  ",
          f"{args.backbone} ({'random' if args.random_weights else 'pretrained'} weights) "
          f"at {args.input_size} px, {args.data} {args.images} images "
          f"(85% trained on), {base['adapters']} adapters, {args.epochs} epochs, "
          f"device {args.device}; {env['device']}, {os.cpu_count()} cores, torch "
          f"{env['torch']}. Each run: torchrun --standalone, the cores split between ranks"
          + (", every rank on GPU LOCAL_RANK modulo the GPUs, Gloo." if args.device != "cpu"
             else "."),
          "", "| ranks | threads/rank | devices | extract img/s | train samples/s | "
          "extract vs 1st row | train vs 1st row | chosen |",
          "|---:|---:|---|---:|---:|---:|---:|---|"]
    for r in runs:
        md.append(f"| {r['ranks']} | {r['threads_per_rank']} | {', '.join(r['devices'])} | "
                  f"{r['extract_images_per_s']:.1f} | {r['train_samples_per_s']:.0f} | "
                  f"{r['extract_images_per_s'] / base['extract_images_per_s']:.2f} | "
                  f"{r['train_samples_per_s'] / base['train_samples_per_s']:.2f} | "
                  f"{', '.join(r['chosen'])} |")
    print("\n".join(md))
    publish(args.name, {"device_requested": args.device, "random_weights": args.random_weights,
                        "data": args.data, "runs": runs}, md, env, args.results_dir)

if __name__ == "__main__":
    main()
