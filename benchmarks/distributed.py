"""Extraction and training throughput under torchrun: 1 rank against N on this machine.

Usage: python benchmarks/distributed.py [--ranks 1,2] [--images 512] [--epochs 3]
           [--backbone dinov2_vits14] [--input-size 112] [--device cpu|cuda]

For each rank count, ``torchrun --standalone --nproc-per-node N`` runs the same script:
``extract_to_cache`` of the training images into a fresh folder (each rank its shards),
then ``inca.fit`` on that cache (DDP over the bank, each rank half of every batch). The
machine's cores are divided between the ranks (``OMP_NUM_THREADS``), so on a CPU the
ranks share the same arithmetic: the ratio shows the cost of the split (process start,
collectives, smaller matmuls), not a speed-up. On one GPU, ``--device cuda`` runs the
ranks on that one GPU with Gloo (NCCL needs a GPU per rank) to exercise the CUDA path.
Writes ``benchmarks/results/distributed.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import command_line, environment, publish

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
device = {device!r}
if device == "cuda":
    device = "cuda:0"  # every rank on the one GPU (Gloo), as the docstring says
bb = make_backbone({backbone!r}, input_size={input_size!r}, device=device)
train = load_dataset("fashion-mnist", limit={images})
ctx.barrier()
t = time.perf_counter()
extract_to_cache(bb, train, Path({folder!r}) / "cache" / "train", batch_size=32,
                 progress=False, num_workers=1)
ctx.barrier()
extract_s = time.perf_counter() - t
task = inca.fit(bb, train, kinds=("inca", "linear"), epochs={epochs}, patience=0,
                batch_size=64, cache_dir=Path({folder!r}) / "cache", progress=False,
                num_workers=1, device=None)
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
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--time-limit", type=float, default=900)
    args = ap.parse_args()
    runs = [run(int(r), args) for r in args.ranks.split(",")]
    base = runs[0]
    env = environment()
    md = ["# Extraction and training under torchrun", "", f"Command: `{command_line()}`  ",
          f"{args.backbone} at {args.input_size} px, Fashion-MNIST {args.images} images "
          f"(85% trained on), {base['adapters']} adapters, {args.epochs} epochs, "
          f"device {args.device}; {env['device']}, {os.cpu_count()} cores, torch "
          f"{env['torch']}. Each run: torchrun --standalone, the cores split between ranks.",
          "", "| ranks | threads/rank | extract img/s | train samples/s | extract vs 1 rank "
          "| train vs 1 rank | chosen |", "|---:|---:|---:|---:|---:|---:|---|"]
    for r in runs:
        md.append(f"| {r['ranks']} | {r['threads_per_rank']} | "
                  f"{r['extract_images_per_s']:.1f} | {r['train_samples_per_s']:.0f} | "
                  f"{r['extract_images_per_s'] / base['extract_images_per_s']:.2f} | "
                  f"{r['train_samples_per_s'] / base['train_samples_per_s']:.2f} | "
                  f"{', '.join(r['chosen'])} |")
    print("\n".join(md))
    publish("distributed", {"runs": runs}, md, env)


if __name__ == "__main__":
    main()
