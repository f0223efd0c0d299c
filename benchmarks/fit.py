"""Cost of InCA's phases on the demo setting: extraction, the whole bank, one adapter.

Usage: python benchmarks/fit.py [--backbone dinov2_vits14] [--train 2000] [--epochs 12]

All phases run in one process on the same data: (a) extraction of every layer into the
activation cache, (b) training the whole bank (every layer x adapter kind x lr) in one
loop, (c) training one adapter alone with the same loop. Targets: (b) < (a), and
(b) <= K/3 x (c). Results: benchmarks/results/fit.{json,md}.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from _common import command_line, environment, make_backbone, write_results

from inca._memory import PeakMemory
from inca.data import load_dataset, split_train_val
from inca.features import extract_to_cache
from inca.training import AdapterBank, FitConfig, plan_members, train_bank
from inca.training.sources import CachedSource

EPOCHS = 12  # the bank's epochs over the batches extracted once (bank.py's bound reads it)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="dinov2_vits14")
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=EPOCHS)
    ap.add_argument("--kinds", default="inca,linear")
    ap.add_argument("--lrs", default="1e-3,3e-3")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--random-weights", action="store_true",
                    help="same architecture, untrained (timings only; accuracy meaningless)")
    return ap


def main() -> None:
    args = parser().parse_args()
    device = torch.device(args.device)
    bb = make_backbone(args.backbone, input_size=None, device=device,
                       random_weights=args.random_weights)
    data = load_dataset(args.data, split="train", limit=args.train)
    config = FitConfig(kinds=tuple(args.kinds.split(",")),
                       lrs=tuple(float(v) for v in args.lrs.split(",")),
                       epochs=args.epochs, batch_size=args.batch_size, patience=0)
    payload = summarize(bb, data, args, measure(bb, data, config, device))
    md = to_markdown(payload, args.data, len(bb.layers))
    suffix = "" if device.type == "cpu" else f"-{device.type}"
    path = write_results(f"fit{suffix}", payload, "\n".join(md))
    print("\n".join(md))
    print(f"wrote {path}")


def measure(bb, data, config: FitConfig, device: torch.device) -> dict:
    """(a) extraction of every layer into a cache, (b) the whole bank trained on it, (c) one
    adapter trained alone: seconds and memory of each, and what the bank chose."""
    train_part, val_part = split_train_val(data, config.val_fraction, config.seed)
    layers = bb.layers
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    with tempfile.TemporaryDirectory() as tmp:
        with PeakMemory(device=device) as mem_a:
            t = time.perf_counter()
            cache = extract_to_cache(bb, data, Path(tmp) / "cache", layers=layers,
                                     progress=False)
            sync()
            extract_s = time.perf_counter() - t
        dims = dict(bb.embed_dims)
        counts = {k: cache.token_shape(k)[0] for k in layers}

        def run(specs):
            # Each run reads only the layers its adapters read, as inca.fit does.
            used = [k for k in layers if any(k in s.layers for s in specs)]
            train = CachedSource(cache, train_part.indices, used, device)
            val = CachedSource(cache, val_part.indices, used, device)
            bank = AdapterBank.build(specs, embed_dims=dims, token_counts=counts,
                                     num_classes=len(data.classes),
                                     num_prefix_tokens=bb.num_prefix_tokens).to(device)
            with PeakMemory(device=device) as mem:
                t = time.perf_counter()
                result = train_bank(bank, train, val, config, progress=False)
                sync()
                seconds = time.perf_counter() - t
            return bank, result, seconds, mem, len(train), len(val)

        specs = plan_members(layers, config)
        bank, result, bank_s, mem_b, n_train, n_val = run(specs)
        best = max(range(len(specs)), key=lambda i: result.members[i].val_accuracy)
        one = [s for s in specs if s.kind == "inca"][len(layers) // 2 * len(config.lrs)]
        _, _, one_s, mem_c, _, _ = run([one])
    return {"specs": specs, "result": result, "best": best, "one": one, "n_train": n_train,
            "n_val": n_val, "extract_s": extract_s, "bank_s": bank_s, "one_s": one_s,
            "mem_a": mem_a, "mem_b": mem_b, "mem_c": mem_c}


def summarize(bb, data, args: argparse.Namespace, m: dict) -> dict:
    """fit.json's payload from :func:`measure`'s figures."""
    specs, one, extract_s, bank_s, one_s = m["specs"], m["one"], m["extract_s"], \
        m["bank_s"], m["one_s"]
    mem_a, mem_b, mem_c = m["mem_a"], m["mem_b"], m["mem_c"]
    k = len(specs)
    rows = [{"key": s.key, "val_accuracy": r.val_accuracy}
            for s, r in zip(specs, m["result"].members, strict=True)]
    return {
        "benchmark": "fit", "command": command_line(), "environment": environment(),
        "backbone": bb.name, "input_size": bb.preprocessing.input_size,
        "samples": len(data), "train": m["n_train"], "val": m["n_val"], "epochs": args.epochs,
        "adapters_in_bank": k,
        "extract": {"seconds": extract_s, "peak_rss_mib": mem_a.peak_rss_mib,
                    "rss_growth_mib": mem_a.growth_mib,
                    "cuda_max_allocated_mib": mem_a.cuda_peak_mib},
        "bank": {"seconds": bank_s, "peak_rss_mib": mem_b.peak_rss_mib,
                 "rss_growth_mib": mem_b.growth_mib, "cuda_max_allocated_mib": mem_b.cuda_peak_mib},
        "one_adapter": {"key": one.key, "seconds": one_s, "peak_rss_mib": mem_c.peak_rss_mib,
                        "rss_growth_mib": mem_c.growth_mib,
                        "cuda_max_allocated_mib": mem_c.cuda_peak_mib},
        "random_weights": args.random_weights,
        "bank_over_extract": bank_s / extract_s,
        "bank_over_one_adapter": bank_s / one_s,
        "target_bank_over_one_adapter": k / 3,
        "best": rows[m["best"]],
        "accuracy": rows,
    }


def to_markdown(payload: dict, data_name: str, n_layers: int) -> list[str]:
    """fit.md's lines (``data_name``: the data set; ``n_layers``: the layers extracted)."""
    env, k, rows = payload["environment"], payload["adapters_in_bank"], payload["accuracy"]
    ext, bank, one = payload["extract"], payload["bank"], payload["one_adapter"]
    extract_s, bank_s, one_s = ext["seconds"], bank["seconds"], one["seconds"]
    best = payload["best"]
    return [
        f"# Fit cost: {payload['backbone']} at {payload['input_size']} px on {data_name}, "
        f"{env['device']}",
        "",
        f"Command: `{payload['command']}`  ",
        f"torch {env['torch']}, {env['cpu_threads']} threads"
        f"{'; random weights (timings only)' if payload['random_weights'] else ''}; "
        f"{payload['train']} train / {payload['val']} val samples, {payload['epochs']} "
        f"epochs, {k} adapters in the bank.",
        "",
        "| phase | wall s | peak RSS MiB | RSS growth MiB | CUDA max allocated MiB |",
        "|---|---:|---:|---:|---:|",
        f"| (a) extraction, {n_layers} layers | {extract_s:.1f} | {ext['peak_rss_mib']:.0f} | "
        f"{ext['rss_growth_mib']:.0f} | {_mib(ext['cuda_max_allocated_mib'])} |",
        f"| (b) bank of {k} adapters | {bank_s:.1f} | {bank['peak_rss_mib']:.0f} | "
        f"{bank['rss_growth_mib']:.0f} | {_mib(bank['cuda_max_allocated_mib'])} |",
        f"| (c) one adapter ({one['key']}) | {one_s:.1f} | {one['peak_rss_mib']:.0f} | "
        f"{one['rss_growth_mib']:.0f} | {_mib(one['cuda_max_allocated_mib'])} |",
        "",
        f"- bank / extraction: **{bank_s / extract_s:.2f}** (target < 1)",
        f"- bank / one adapter: **{bank_s / one_s:.2f}** for K={k} (target <= K/3 = {k / 3:.1f})",
        f"- best adapter: {best['key']} at {best['val_accuracy']:.4f} val accuracy",
        "- On a CPU the cache is read in this process (memory-mapped): the RSS of (b) and (c) "
        "counts the cache's pages mapped by those reads, file pages the kernel drops under "
        "memory pressure, not memory held by the bank.",
        "",
        "| adapter | val acc |",
        "|---|---:|",
        *[f"| {r['key']} | {r['val_accuracy']:.4f} |" for r in rows],
        "",
    ]


def _mib(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.0f}"


if __name__ == "__main__":
    main()
