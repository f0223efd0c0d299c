"""Many tasks on one backbone pass vs a separate backbone copy per task: images/s and memory.

Usage: python benchmarks/multitask.py [--backbone dinov2_vits14] [--input-size 112]
           [--tasks 1,2,4,8] [--batch-size 32] [--batches 2] [--repeats 3] [--device cpu]
           [--random-weights]

Task heads are untrained InCA adapters (throughput does not depend on their weights), each
reading one layer spread over the depth, so the union of layers grows with the number of
tasks. The first task reads the deepest block, so every shared pass runs to the same depth
and the ratio to one task measures what the extra tasks cost.

- shared: ``MultiTaskModel(backbone, tasks).predict_proba`` (one pass, union of layers).
- separate: one backbone per task (the original plus deep copies, as fine-tuned copies
  would be), each running its own pass (up to its task's layer: a lower bound on what a
  fine-tuned copy, which runs to the end, would cost) and its own head.

Both run in one process on the same batches, interleaved per task count. Memory: parameter
bytes, and RSS growth over the one-backbone process while building and running.
Target: shared images/s for 8 tasks >= 0.85 x for 1 task.
Results: benchmarks/results/multitask[-<device>].{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import statistics
from dataclasses import dataclass
from typing import Any

import torch
from _common import command_line, environment, make_backbone, timed, write_results

from inca._memory import PeakMemory, rss_bytes
from inca.adapters import create_adapter
from inca.features import extract_features
from inca.runtime import MultiTaskModel
from inca.task import Task

# Deepest first, then spread over the second half of the depth.
LAYER_ORDER = (11, 5, 8, 10, 6, 9, 7, 11, 4, 3, 2, 1)
TARGET = 0.85


def _param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="dinov2_vits14")
    ap.add_argument("--input-size", type=int, default=112)
    ap.add_argument("--tasks", default="1,2,4,8", help="task counts to measure")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--batches", type=int, default=2,
                    help="batches per measurement (same images for shared and separate)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--num-classes", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--random-weights", action="store_true",
                    help="same architecture, untrained (no offline asset needed)")
    return ap


def make_tasks(bb, n: int, num_classes: int, device: torch.device) -> dict[str, Task]:
    """``n`` tasks of untrained InCA heads, task ``i`` on the layer ``LAYER_ORDER`` gives."""
    blocks = [ly for ly in bb.layers if ly.startswith("blocks.")] or list(bb.layers)
    info = bb.describe()
    dim = next(iter(bb.embed_dims.values()))
    classes = [f"class{i}" for i in range(num_classes)]

    torch.manual_seed(0)
    tasks: dict[str, Task] = {}
    for i in range(n):
        depth = LAYER_ORDER[i % len(LAYER_ORDER)] * len(blocks) // 12
        layer = blocks[min(depth, len(blocks) - 1)]
        head = create_adapter("inca", embed_dim=bb.embed_dims.get(layer, dim),
                              num_classes=num_classes, device=device)
        tasks[f"task{i}"] = Task([head], [[layer]], classes, info, backbone=bb)
    return tasks


@dataclass
class Setup:
    """What the measurement of every task count shares."""

    bb: Any
    tasks: dict[str, Task]
    batches: list[torch.Tensor]
    args: argparse.Namespace
    sync: Any
    models: list  # separate models: the original backbone plus the deep copies made so far

    def shared_run(self, model: MultiTaskModel):
        def run():
            return [model.predict_proba(x, batch_size=self.args.batch_size)
                    for x in self.batches]
        return run

    def separate_run(self, models: list, selected: list[str]):
        tasks, batches = self.tasks, self.batches

        @torch.no_grad()
        def run():
            out = []
            for x in batches:
                out.append({n: tasks[n].proba_from_features(
                    extract_features(m, x, tasks[n].layers, tasks[n].token_grid)).cpu()
                    for m, n in zip(models, selected, strict=True)})
            return out
        return run


def main() -> None:
    args = parser().parse_args()
    counts = sorted({int(v) for v in args.tasks.split(",")})
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    bb = make_backbone(args.backbone, input_size=args.input_size, device=device,
                       random_weights=args.random_weights)
    tasks = make_tasks(bb, max(counts), args.num_classes, device)
    s = bb.preprocessing.input_size
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(args.batch_size, 3, s, s, generator=gen).to(device)
               for _ in range(args.batches)]
    setup = Setup(bb, tasks, batches, args, sync, [bb])
    # Warm-up (allocator, kernels) on the largest shared model.
    setup.shared_run(MultiTaskModel(bb, tasks))()

    backbone_bytes = _param_bytes(bb)
    rss_one_backbone = rss_bytes()
    # Shared memory first, while the process holds one backbone and no copies.
    shared_peak = {}
    for t in counts:
        with PeakMemory() as mem:
            setup.shared_run(MultiTaskModel(bb, {n: tasks[n] for n in list(tasks)[:t]}))()
        shared_peak[t] = mem.peak
    rows = [measure(setup, t, backbone_bytes, shared_peak[t] - rss_one_backbone,
                    rss_one_backbone) for t in counts]
    payload = summarize(bb, args, rows, backbone_bytes)
    md = to_markdown(payload)
    suffix = "" if device.type == "cpu" else f"-{device.type}"
    path = write_results(f"multitask{suffix}", payload, "\n".join(md))
    print("\n".join(md))
    print(f"wrote {path}")


def measure(setup: Setup, t: int, backbone_bytes: int, shared_growth: int,
            rss_one_backbone: int) -> dict:
    """``t`` tasks shared on one pass and separate (one backbone copy each), interleaved."""
    bb, tasks, batches, args, sync = setup.bb, setup.tasks, setup.batches, setup.args, \
        setup.sync
    selected = list(tasks)[:t]
    model = MultiTaskModel(bb, {n: tasks[n] for n in selected})
    run = setup.shared_run(model)
    with PeakMemory() as mem_sep:
        while len(setup.models) < t:
            setup.models.append(copy.deepcopy(bb))
        sep = setup.separate_run(setup.models[:t], selected)
        sep()  # warm-up of the new copies
    layers = model.layers()

    @torch.no_grad()
    def backbone_only(layers=layers):
        for x in batches:
            bb.extract(x, layers)

    # Interleave so drifts in machine speed hit all alike.
    t_shared, t_sep, t_pass = [], [], []
    for _ in range(args.repeats):
        t_shared += timed(run, 1, sync)
        t_sep += timed(sep, 1, sync)
        t_pass += timed(backbone_only, 1, sync)
    a, b = run(), sep()
    max_diff = max(float((a[i][n] - b[i][n]).abs().max())
                   for i in range(len(batches)) for n in selected)
    shared_s, sep_s = statistics.median(t_shared), statistics.median(t_sep)
    pass_s = statistics.median(t_pass)
    head_bytes = sum(_param_bytes(m) for n in selected for m in tasks[n].members)
    n_images = args.batch_size * args.batches
    return {
        "tasks": t,
        "layers": layers,
        "deepest": layers[-1],
        "shared_s": shared_s,
        "separate_s": sep_s,
        "shared_backbone_pass_s": pass_s,
        "shared_heads_fraction": max(0.0, 1 - pass_s / shared_s),
        "shared_images_per_s": n_images / shared_s,
        "separate_images_per_s": n_images / sep_s,
        "shared_params_mib": (backbone_bytes + head_bytes) / 2**20,
        "separate_params_mib": (t * backbone_bytes + head_bytes) / 2**20,
        "heads_params_mib": head_bytes / 2**20,
        "shared_rss_growth_mib": shared_growth / 2**20,
        "separate_rss_growth_mib": (mem_sep.peak - rss_one_backbone) / 2**20,
        "max_abs_diff_shared_vs_separate": max_diff,
    }


def summarize(bb, args: argparse.Namespace, rows: list[dict], backbone_bytes: int) -> dict:
    """multitask.json's payload: the rows, each against one task, and the target."""
    base = rows[0]["shared_images_per_s"]
    for r in rows:
        r["shared_ratio_to_1"] = r["shared_images_per_s"] / base
        r["shared_over_separate"] = r["shared_images_per_s"] / r["separate_images_per_s"]
    top = rows[-1]
    return {
        "benchmark": "multitask", "command": command_line(), "environment": environment(),
        "backbone": bb.name, "input_size": bb.preprocessing.input_size,
        "random_weights": args.random_weights,
        "images_per_measurement": args.batch_size * args.batches, "batch_size": args.batch_size,
        "repeats": args.repeats, "backbone_params_mib": backbone_bytes / 2**20,
        "head": "inca adapter, untrained, one layer per task",
        "separate_pass": "each copy runs to its own task's layer (early stop): a lower "
                         "bound on a fine-tuned copy's cost",
        "target_shared_ratio": TARGET, "target_tasks": top["tasks"],
        "target_met": top["shared_ratio_to_1"] >= TARGET, "rows": rows,
    }


def to_markdown(payload: dict) -> list[str]:
    """multitask.md's lines."""
    env, rows = payload["environment"], payload["rows"]
    top, met = rows[-1], payload["target_met"]
    max_diff_all = max(r["max_abs_diff_shared_vs_separate"] for r in rows)
    return [
        f"# Many tasks on one pass: {payload['backbone']} at {payload['input_size']} px, "
        f"{env['device']}",
        "",
        f"Command: `{payload['command']}`  ",
        f"torch {env['torch']}, {env['cpu_threads']} threads"
        f"{'; random weights' if payload['random_weights'] else ''}; "
        f"{payload['images_per_measurement']} images per measurement (batch "
        f"{payload['batch_size']}), median of {payload['repeats']}, shared and "
        "separate interleaved. Heads: untrained InCA adapters, one layer each; task 0 reads "
        f"the deepest block ({rows[0]['deepest']}).",
        "",
        "| tasks | layers (deepest) | shared images/s | ratio to 1 task | separate images/s "
        "| shared / separate | params MiB shared / separate | RSS growth MiB shared / "
        "separate | heads' share of shared time |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
        *[f"| {r['tasks']} | {len(r['layers'])} ({r['deepest']}) | "
          f"{r['shared_images_per_s']:.1f} | {r['shared_ratio_to_1']:.3f} | "
          f"{r['separate_images_per_s']:.1f} | {r['shared_over_separate']:.2f} | "
          f"{r['shared_params_mib']:.1f} / {r['separate_params_mib']:.1f} | "
          f"{r['shared_rss_growth_mib']:.0f} / {r['separate_rss_growth_mib']:.0f} | "
          f"{r['shared_heads_fraction']:.0%} |"
          for r in rows],
        "",
        f"- target: shared images/s for {top['tasks']} tasks >= {TARGET} x 1 task: "
        f"**{top['shared_ratio_to_1']:.3f}** ({'met' if met else 'NOT met'})",
        f"- one backbone: {payload['backbone_params_mib']:.1f} MiB of parameters; one head: "
        f"{rows[0]['heads_params_mib'] * 1024:.0f} KiB",
        "- separate: the original backbone plus deep copies (as fine-tuned copies would be), "
        "each running up to its own task's layer, a lower bound on a fine-tuned copy's cost.",
        "- heads' share: 1 - (the union's backbone pass alone) / (shared predict_proba), "
        "measured interleaved with the others.",
        "- RSS growth: peak resident memory while building and running, over the process "
        "holding one backbone (shared measured first, before any copy exists).",
        f"- shared and separate predictions agree to {max_diff_all:.1e} (max abs difference).",
        "",
    ]


if __name__ == "__main__":
    main()
