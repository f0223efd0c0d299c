"""Extraction throughput: all layers hooked vs the backbone's plain forward, and early stop.

Usage: python benchmarks/extract.py [--backbone dinov2_vits14] [--batch-size 32]
           [--batches 3] [--repeats 3] [--input-size 112] [--device cpu]

Both measurements run in one process on the same batches, interleaved, so the ratio is
robust to the machine's noise. Results: benchmarks/results/extract[-<device>].{json,md}.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from _common import command_line, environment, make_backbone, timed, write_results


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="dinov2_vits14")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--input-size", type=int, default=112)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--random-weights", action="store_true",
                    help="same architecture, untrained (no offline asset needed)")
    return ap


def main() -> None:
    args = parser().parse_args()
    device = torch.device(args.device)
    bb = make_backbone(args.backbone, input_size=args.input_size, device=device,
                       random_weights=args.random_weights)
    payload = measure(bb, args, device)
    md = to_markdown(payload, args.repeats)
    suffix = "" if device.type == "cpu" else f"-{device.type}"
    path = write_results(f"extract{suffix}", payload, "\n".join(md))
    print("\n".join(md))
    print(f"wrote {path}")


def measure(bb, args: argparse.Namespace, device: torch.device) -> dict:
    """The plain forward and the all-layer extraction, interleaved; then each layer alone."""
    s = bb.preprocessing.input_size
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(args.batch_size, 3, s, s, generator=gen).to(device)
               for _ in range(args.batches)]
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    n_images = args.batch_size * args.batches

    def plain():
        for x in batches:
            bb(x)

    def hooked(layers):
        def run():
            for x in batches:
                bb.extract(x, layers)
        return run

    plain()  # warm-up (allocator, kernels)
    hooked(None)()
    # Interleave the two so drifts in machine speed hit both alike.
    t_plain, t_all = [], []
    for _ in range(args.repeats):
        t_plain += timed(plain, 1, sync)
        t_all += timed(hooked(None), 1, sync)
    plain_s, all_s = statistics.median(t_plain), statistics.median(t_all)

    depth_rows = []
    for i, layer in enumerate(bb.layers):
        t = statistics.median(timed(hooked([layer]), args.repeats, sync))
        depth_rows.append({"layer": layer, "depth": i + 1, "seconds": t,
                           "fraction_of_all_layers": t / all_s})
    return {
        "benchmark": "extract",
        "command": command_line(),
        "environment": environment(),
        "backbone": bb.name,
        "input_size": s,
        "images": n_images,
        "plain_forward_s": plain_s,
        "all_layers_extract_s": all_s,
        "plain_images_per_s": n_images / plain_s,
        "all_layers_images_per_s": n_images / all_s,
        "throughput_ratio_all_layers_vs_plain": plain_s / all_s,
        "target_ratio": 0.95,
        "early_stop": depth_rows,
    }


def to_markdown(payload: dict, repeats: int) -> list[str]:
    """extract.md's lines (``repeats``: the measurements each median is of)."""
    name, s, n_images = payload["backbone"], payload["input_size"], payload["images"]
    plain_s, all_s = payload["plain_forward_s"], payload["all_layers_extract_s"]
    depth_rows = payload["early_stop"]
    return [
        f"# Extraction throughput: {name} at {s} px, {payload['environment']['device']}",
        "",
        f"Command: `{payload['command']}`  ",
        f"torch {payload['environment']['torch']}, {payload['environment']['cpu_threads']} "
        f"threads, {n_images} images per measurement, median of {repeats}.",
        "",
        "| pass | images/s | ratio to plain forward |",
        "|---|---:|---:|",
        f"| plain forward | {n_images / plain_s:.1f} | 1.000 |",
        f"| extract all {len(depth_rows)} layers | {n_images / all_s:.1f} | "
        f"{payload['throughput_ratio_all_layers_vs_plain']:.3f} |",
        "",
        "Early stop: cost of extracting only one layer, relative to all layers.",
        "",
        "| deepest layer | depth | fraction of full cost |",
        "|---|---:|---:|",
        *[f"| {r['layer']} | {r['depth']} | {r['fraction_of_all_layers']:.3f} |"
          for r in depth_rows],
        "",
    ]


if __name__ == "__main__":
    main()
