"""InCA at GPU scale: step throughput and memory against the frozen forward pass (the
ceiling) and bf16 full fine-tuning, side by side in one run; then end to end.

Usage (on the GPU machine; timm models with random weights, timings only):
    PYTHONPATH=src python benchmarks/gpu.py
On a CPU, with tiny settings (what the test suite runs):
    python benchmarks/gpu.py --device cpu --models vit_tiny_patch16_224 --giant none \\
        --input-size 32 --batch-sizes 4 --steps 2 --e2e-sizes 32,64 --epochs 1

Per model, all in bf16-mixed on the same batch of random images:
- ``forward_bf16_img_s``: the plain forward (what nothing can beat);
- ``extract_all_bf16_img_s``: inca's extraction of every layer;
- ``fullft_bf16_img_s`` / ``_peak_gib``: a full fine-tuning step (every weight, AdamW);
- ``inca_stream_bf16_img_s`` / ``_peak_gib``: a streaming InCA step: the backbone pass plus
  a bank of every layer x 2 learning rates x {InCA, linear} trained on it (``bank_size``).
Then the ViT-g-class claim (``--giant``: a bank over all its blocks on one GPU), and end
to end (``--e2e-sizes``): ``inca.fit`` and full fine-tuning on the same images (Fashion-
MNIST from ``.bench-assets/`` when present, see ``gpu_quality.py --prepare``; random
images otherwise), same epochs, each with its default data pipeline. Writes
``benchmarks/results/gpu.{json,md}``.
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _common import RESULTS, command_line, environment, timed, write_results

import inca
from inca._memory import PeakMemory
from inca._precision import Precision, resolve_device
from inca.baselines.finetune import FineTuneConfig, _features, finetune, prepare
from inca.data import ArrayDataset, split_train_val, to_model_input
from inca.features import extract_features, token_shapes
from inca.training import AdapterBank, FitConfig, plan_members
from inca.training.bank import bank_loss, build_adapter
from inca.training.sources import StackedFeats

ASSETS = Path(__file__).resolve().parents[1] / ".bench-assets" / "fashion_mnist.npz"
TARGETS = {  # ratio key: (what, bound, at least?); InCA's step: the faster backbone dtype
    "inca_vs_forward": ("InCA streaming step / plain bf16 forward", 0.8, True),
    "inca_vs_fullft": ("InCA streaming step / bf16 full fine-tuning step", 2.5, True),
    "extract_vs_forward": ("all-layer extraction / plain forward", 0.95, True),
    "inca_vs_fullft_memory": ("InCA peak memory / full fine-tuning peak memory", 0.35, False),
}


class Clock:
    """Synchronised wall clock and peak device memory of a device."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self) -> float | None:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**30
        return None


def rate(fn, batch: int, steps: int, clock: Clock) -> float:
    """Images per second of ``fn`` (one step on ``batch`` images), after two warm-up steps."""
    for _ in range(2):
        fn()
    seconds = sum(timed(fn, steps, clock.sync))
    return batch * steps / seconds


def bank_for(backbone, layers: list[str], num_classes: int, lrs: tuple[float, ...]):
    config = FitConfig(layers=layers, kinds=("inca", "linear"), lrs=lrs)
    specs = plan_members(layers, config)
    dims = {k: backbone.embed_dims[k] for k in layers}
    adapters = [build_adapter(s, embed_dims=dims, num_prefix_tokens=backbone.num_prefix_tokens,
                              num_classes=num_classes) for s in specs]
    counts = {k: n for k, (n, _) in token_shapes(backbone, layers).items()}
    return AdapterBank(specs, adapters, counts).to(backbone.device)


def _fullft(bb, x, y, prec: Precision, steps: int, clock: Clock) -> dict:
    """A bf16 full fine-tuning step (every weight and a head, AdamW): rate and peak."""
    clock.reset_peak()
    tuned, names = prepare(bb, FineTuneConfig(method="full"))
    head = torch.nn.Linear(_features(tuned, x[:1]).shape[-1], 10).to(x.device)
    trained = set(names)
    params = [p for n, p in tuned.model.named_parameters() if n in trained]
    opt = torch.optim.AdamW([*params, *head.parameters()], lr=1e-5,
                            fused=x.device.type == "cuda")
    torch.nn.Module.train(tuned.model, True)

    def step() -> None:
        with prec.autocast():
            loss = F.cross_entropy(head(_features(tuned, x)).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return {"fullft_bf16_img_s": rate(step, len(x), steps, clock),
            "fullft_bf16_peak_gib": clock.peak_gib()}


def _inca(bb, pixels, y, prec: Precision, lrs: str, steps: int, clock: Clock) -> dict:
    """A streaming InCA step (backbone pass + the whole bank, AdamW): rate and peak."""
    clock.reset_peak()
    bank = bank_for(bb, bb.layers, 10, tuple(float(v) for v in lrs.split(",")))
    opt = torch.optim.AdamW(bank.param_groups(), fused=pixels.device.type == "cuda")

    def step() -> None:
        with prec.autocast():
            feats = extract_features(bb, pixels, bb.layers)
            block = StackedFeats(torch.stack(list(feats.values())), bb.layers)
            losses = bank_loss(bank.logits(block), y, 0.1)
        opt.zero_grad(set_to_none=True)
        losses.sum().backward()
        opt.step()

    return {"inca_stream_bf16_img_s": rate(step, len(pixels), steps, clock),
            "inca_stream_bf16_peak_gib": clock.peak_gib(), "bank_size": len(bank.keys),
            "bank_parameters": sum(p.numel() for p in bank.parameters())}


def measure_model(name: str, batch: int, args, device: torch.device, clock: Clock,
                  inca_only: bool = False) -> dict:
    """Step rates and peaks of one timm model (random weights)."""
    bb = inca.create_backbone(f"timm:{name}", pretrained=False, input_size=args.input_size,
                              device=device)
    prec = Precision("bf16-mixed", device)
    s = bb.preprocessing.input_size
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (batch, 3, s, s), generator=g, dtype=torch.uint8)
    pixels = pixels.to(device)
    x = to_model_input(pixels, bb.preprocessing, device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    out: dict = {"batch_size": batch, "parameters": sum(p.numel() for p in bb.parameters())}
    if inca_only:  # what full fine-tuning would need at least: fp32 weights, grads, Adam
        out["fullft_static_gib_estimate"] = out["parameters"] * 16 / 2**30
    else:
        def forward() -> None:
            with torch.no_grad(), prec.autocast():
                bb._forward_plain(x)

        def extract() -> None:
            with prec.autocast():
                bb.extract(x, bb.layers)

        out["forward_bf16_img_s"] = rate(forward, batch, args.steps, clock)
        out["extract_all_bf16_img_s"] = rate(extract, batch, args.steps, clock)
        out.update(_fullft(bb, x, y, prec, args.steps, clock))
    out.update(_inca(bb, pixels, y, prec, args.lrs, args.steps, clock))
    # A frozen backbone needs no float32 master weights: held in bfloat16 it skips
    # autocast's casts (inca fit --backbone-dtype bfloat16).
    bb.to(torch.bfloat16)
    pure = _inca(bb, pixels, y, prec, args.lrs, args.steps, clock)
    out["inca_stream_pure_bf16_img_s"] = pure["inca_stream_bf16_img_s"]
    out["inca_stream_pure_bf16_peak_gib"] = pure["inca_stream_bf16_peak_gib"]
    if not inca_only:
        xb = x.to(torch.bfloat16)

        def forward_pure() -> None:
            with torch.no_grad():
                bb._forward_plain(xb)

        out["forward_pure_bf16_img_s"] = rate(forward_pure, batch, args.steps, clock)
    clock.reset_peak()
    return out


def e2e_data(n: int):
    if ASSETS.is_file():
        z = np.load(ASSETS)
        if len(z["train_images"]) >= n:
            classes = [str(c) for c in z["classes"]]
            return ArrayDataset(z["train_images"][:n], z["train_labels"][:n], classes,
                                f"fashion-mnist/{n}"), "fashion-mnist"
    rng = np.random.default_rng(0)
    return ArrayDataset(rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), np.arange(n) % 10,
                        [str(i) for i in range(10)], f"random/{n}"), "random images"


def end_to_end(args, device: torch.device, clock: Clock) -> tuple[list[dict], str]:
    rows, source = [], ""
    for n in (int(v) for v in args.e2e_sizes.split(",")):
        data, source = e2e_data(n)
        for method in ("inca", "full"):
            bb = inca.create_backbone(f"timm:{args.e2e_model}", pretrained=False,
                                      input_size=args.input_size, device=device)
            clock.reset_peak()
            with tempfile.TemporaryDirectory() as tmp, PeakMemory(device=device) as mem:
                t = time.perf_counter()
                if method == "inca":
                    task = inca.fit(bb, data, epochs=args.epochs, batch_size=args.e2e_batch,
                                    precision="bf16-mixed", device=device, cache_dir=tmp,
                                    progress=False, patience=0)
                    mode, cache = task.report.mode["mode"], task.report.mode["cache_bytes"]
                else:
                    tr, val = split_train_val(data, 0.15, 0)
                    finetune(bb, tr, val, None, FineTuneConfig(
                        method="full", epochs=args.epochs, batch_size=args.e2e_batch,
                        precision="bf16-mixed"), progress=False, device=device)
                    mode, cache = "", 0
                clock.sync()
                wall = time.perf_counter() - t
            peak = clock.peak_gib()
            rows.append({"n_images": n, "method": method, "mode": mode, "wall_s": wall,
                         "peak_gib": peak if peak is not None else mem.peak_rss_mib / 1024,
                         "cache_gib": cache / 2**30 if mode == "cached" else 0.0})
            print(rows[-1], flush=True)
    return rows, source


def ratios(m: dict) -> dict:
    r = {}
    if "forward_bf16_img_s" in m:
        best = max(m["inca_stream_bf16_img_s"], m["inca_stream_pure_bf16_img_s"])
        r["inca_vs_forward"] = best / m["forward_bf16_img_s"]
        r["extract_vs_forward"] = m["extract_all_bf16_img_s"] / m["forward_bf16_img_s"]
    if "fullft_bf16_img_s" in m:
        best = max(m["inca_stream_bf16_img_s"], m["inca_stream_pure_bf16_img_s"])
        r["inca_vs_fullft"] = best / m["fullft_bf16_img_s"]
        if m.get("fullft_bf16_peak_gib"):
            r["inca_vs_fullft_memory"] = m["inca_stream_bf16_peak_gib"] / m["fullft_bf16_peak_gib"]
    return r


def _f(v, spec=".2f") -> str:
    return "n/a" if v is None else format(v, spec)


def to_markdown(p: dict) -> str:
    md = ["# InCA at GPU scale", "", f"Command: `{p['command']}`  ",
          f"Device: {p['device']}, torch {p['environment']['torch']}; timm models with random "
          f"weights at {p['input_size']} px (timings only), bf16-mixed. Bank: every layer x "
          f"lr ({p['lrs']}) x {{InCA, linear}}.", "",
          "| model | batch | forward img/s | extract img/s | full FT img/s (GiB) | "
          "InCA stream img/s (GiB) | bank | pure-bf16 backbone: forward, InCA stream img/s |",
          "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, m in p["models"].items():
        ft = f"{_f(m.get('fullft_bf16_img_s'), '.0f')} ({_f(m.get('fullft_bf16_peak_gib'))})"
        if "fullft_static_gib_estimate" in m:
            ft = f"needs >= {m['fullft_static_gib_estimate']:.1f} GiB"
        md.append(f"| {name} | {m['batch_size']} | {_f(m.get('forward_bf16_img_s'), '.0f')} | "
                  f"{_f(m.get('extract_all_bf16_img_s'), '.0f')} | {ft} | "
                  f"{m['inca_stream_bf16_img_s']:.0f} ({_f(m['inca_stream_bf16_peak_gib'])}) | "
                  f"{m['bank_size']} | {_f(m.get('forward_pure_bf16_img_s'), '.0f')}, "
                  f"{m['inca_stream_pure_bf16_img_s']:.0f} |")
    md += ["", "| model | target | measured | bound | met |", "|---|---|---:|---:|---|"]
    for name, m in p["models"].items():
        for key, value in ratios(m).items():
            what, bound, at_least = TARGETS[key]
            ok = value >= bound if at_least else value <= bound
            md.append(f"| {name} | {what} | {value:.2f} | {'>=' if at_least else '<='} "
                      f"{bound} | {'yes' if ok else 'no'} |")
    md += ["", "InCA's step in the ratios is the faster of its two backbones: float32 weights "
           "under autocast, or the frozen weights held in bfloat16 (`--backbone-dtype`)."]
    if p["e2e"]:
        md += ["", f"End to end ({p['e2e_model']}, {p['e2e_source']}, {p['epochs']} epochs, "
               f"batch {p['e2e_batch']}, default data pipeline):", "",
               "| images | method | mode | wall s | peak GiB | cache GiB |",
               "|---:|---|---|---:|---:|---:|"]
        for r in p["e2e"]:
            md.append(f"| {r['n_images']} | {r['method']} | {r['mode'] or '-'} | "
                      f"{r['wall_s']:.1f} | {_f(r['peak_gib'])} | {r['cache_gib']:.1f} |")
        walls = {(r["n_images"], r["method"]): r for r in p["e2e"]}
        sizes = sorted({r["n_images"] for r in p["e2e"]})
        big, small = sizes[-1], sizes[0]
        md += ["", f"- inca / full wall time at {big} images: "
               f"{walls[(big, 'inca')]['wall_s'] / walls[(big, 'full')]['wall_s']:.2f} "
               "(target <= 0.4)."]
        if big != small and walls[(small, "inca")]["peak_gib"]:
            growth = walls[(big, "inca")]["peak_gib"] / walls[(small, "inca")]["peak_gib"]
            md.append(f"- inca peak memory at {big} / at {small} images: {growth:.2f} "
                      "(target <= 1.10).")
    return "\n".join(md) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--models", default="vit_base_patch16_224,vit_large_patch16_224")
    ap.add_argument("--batch-sizes", default="128,64", help="one per model")
    ap.add_argument("--giant", default="vit_giant_patch14_dinov2",
                    help="the ViT-g-class model for the bank-only run, or 'none'")
    ap.add_argument("--giant-batch", type=int, default=32)
    ap.add_argument("--input-size", type=int, default=224)
    ap.add_argument("--lrs", default="1e-3,3e-3")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--e2e-model", default=None, help="default: the first of --models")
    ap.add_argument("--e2e-sizes", default="4000,16000")
    ap.add_argument("--e2e-batch", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--name", default="gpu")
    ap.add_argument("--results-dir", type=Path, default=RESULTS)
    args = ap.parse_args()
    device = resolve_device(args.device)
    clock = Clock(device)
    models = args.models.split(",")
    batches = [int(v) for v in args.batch_sizes.split(",")]
    batches += batches[-1:] * (len(models) - len(batches))
    args.e2e_model = args.e2e_model or models[0]
    payload = {"benchmark": "gpu", "command": command_line(), "environment": environment(),
               "device": environment()["device"], "input_size": args.input_size,
               "lrs": args.lrs, "epochs": args.epochs, "e2e_model": args.e2e_model,
               "e2e_batch": args.e2e_batch, "models": {}, "e2e": [], "e2e_source": ""}

    def save() -> Path:  # after each part: a later failure loses nothing measured
        return write_results(args.name, payload, to_markdown(payload), args.results_dir)

    for name, batch in zip(models, batches, strict=True):
        print(f"{name} (batch {batch}) ...", flush=True)
        payload["models"][name] = measure_model(name, batch, args, device, clock)
        print(payload["models"][name], flush=True)
        save()
    if args.giant != "none":
        print(f"{args.giant} (batch {args.giant_batch}, bank only) ...", flush=True)
        payload["models"][args.giant] = measure_model(args.giant, args.giant_batch, args,
                                                      device, clock, inca_only=True)
        print(payload["models"][args.giant], flush=True)
        save()
    if args.e2e_sizes:
        payload["e2e"], payload["e2e_source"] = end_to_end(args, device, clock)
    print(f"wrote {save()}")


if __name__ == "__main__":
    main()
