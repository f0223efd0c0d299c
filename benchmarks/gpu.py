"""InCA at GPU scale: step throughput and memory against the frozen forward pass (the
ceiling) and bf16 full fine-tuning, side by side in one run; then end to end.

Usage (on the GPU machine; timm models with random weights, timings only):
    PYTHONPATH=src python benchmarks/gpu.py
(``scripts/gpu_check.sh`` runs it in stages). On a CPU, with tiny settings:
    python benchmarks/gpu.py --device cpu --models vit_tiny_patch16_224 --giant none \\
        --input-size 32 --batch-sizes 4 --steps 2 --e2e-sizes 32,64 --epochs 1

Per model, in bf16 on the same batch of random images, each rate timed over ``--steps``
steps between two synchronisations:
- ``forward_bf16_img_s``: the plain forward under autocast (what nothing can beat);
- ``extract_all_bf16_img_s``: inca's extraction of every layer;
- ``fullft_bf16_img_s`` / ``_peak_gib``: a full fine-tuning step (every weight, AdamW), the
  frozen original off the device; measured when its estimate (16 bytes a parameter plus
  activations) fits the free memory, else only estimated; an out-of-memory is recorded;
- ``inca_stream_bf16_img_s`` / ``_peak_gib``: a streaming InCA step as ``StreamingSource``
  makes it (one block in the compute dtype): the backbone pass plus a bank of every layer
  x 2 learning rates x {InCA, linear} trained on it (``bank_size``);
- ``forward_pure_bf16_img_s``, ``inca_stream_pure_bf16_*``: the same with the frozen
  backbone held in bfloat16. The ratios pair like with like (autocast with autocast, pure
  bf16 with pure bf16).
Then the ViT-g-class claim (``--giant``: a bank over all its blocks on one GPU, beside its
fine-tuning step), and end to end (``--e2e-sizes``): ``inca.fit`` (``--e2e-mode``,
streaming by default, the same at every size) and full fine-tuning on the same images
(Fashion-MNIST from ``.bench-assets/`` when present, see ``gpu_quality.py --prepare``;
random images otherwise), same epochs, each with its default data pipeline. Writes
``benchmarks/results/gpu.{json,md}``.
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _common import RESULTS, command_line, environment, write_results
from _gpu_report import to_markdown

import inca
from inca._memory import PeakMemory
from inca._precision import Precision, resolve_device
from inca.baselines.finetune import FineTuneConfig, _features, finetune, prepare
from inca.data import ArrayDataset, split_train_val, to_model_input
from inca.features import extract_features, token_shapes
from inca.training import AdapterBank, FitConfig
from inca.training.loss import bank_loss
from inca.training.sources import StackedFeats

ASSETS = Path(__file__).resolve().parents[1] / ".bench-assets" / "fashion_mnist.npz"
# Activations a bf16-autocast training step of a ViT keeps for its backward, in bytes per
# token channel per block (residual stream in float32, LayerNorm, qkv, attention output,
# MLP hidden in 16 bits; fused attention stores no N x N matrix): a generous rounding.
ACTIVATION_BYTES = 48


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

    def free_gib(self) -> float | None:
        """Free device memory (``None`` on a CPU: the tiny CPU runs always fit)."""
        if self.device.type == "cuda":
            return torch.cuda.mem_get_info(self.device)[0] / 2**30
        return None


def rate(fn, batch: int, steps: int, clock: Clock) -> float:
    """Images per second of ``fn`` (one step on ``batch`` images): two warm-up steps, then
    ``steps`` steps timed between two synchronisations (the device queues them back to back,
    as in training, rather than draining after each)."""
    for _ in range(2):
        fn()
    clock.sync()
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    clock.sync()
    return batch * steps / (time.perf_counter() - t)


def build_backbone(name: str, args, device) -> inca.Backbone:
    """A timm model with random weights (timings only), seeded."""
    torch.manual_seed(0)
    return inca.create_backbone(f"timm:{name}", pretrained=False, input_size=args.input_size,
                                device=device, **json.loads(args.model_kwargs))


def bank_for(backbone, layers: list[str], num_classes: int, lrs: tuple[float, ...]):
    config = FitConfig(layers=layers, kinds=("inca", "linear"), lrs=lrs)
    counts = {k: n for k, (n, _) in token_shapes(backbone, layers).items()}
    return AdapterBank.from_plan(layers, config,
                                 embed_dims={k: backbone.embed_dims[k] for k in layers},
                                 token_counts=counts, num_classes=num_classes,
                                 num_prefix_tokens=backbone.num_prefix_tokens
                                 ).to(backbone.device)


def stream_block(bb, pixels: torch.Tensor, prec: Precision) -> StackedFeats:
    """A streaming step's bank input, made as ``StreamingSource.batches`` makes it: every
    layer from one pass under autocast, written into one block in the compute dtype (a
    ViT's residual stream stays float32 under autocast), the per-layer dict dropped."""
    with prec.autocast():
        feats = extract_features(bb, pixels, bb.layers)
    first = next(iter(feats.values()))
    block = first.new_empty((len(feats), *first.shape), dtype=prec.compute_dtype)
    for row, v in zip(block, feats.values(), strict=True):
        row.copy_(v)  # stacked and cast in one write
    del feats, first, v
    return StackedFeats(block, bb.layers)


def fullft_estimate_gib(bb, batch: int) -> float:
    """What a bf16-mixed full fine-tuning step needs at least: float32 weights, gradients
    and AdamW's two moments (16 bytes a parameter) plus the activations it keeps."""
    params = sum(p.numel() for p in bb.parameters())
    tokens = token_shapes(bb, bb.layers)
    acts = sum(batch * n * d * ACTIVATION_BYTES for n, d in tokens.values())
    return (params * 16 + acts) / 2**30


def _fullft(bb, x, y, prec: Precision, steps: int, clock: Clock) -> dict:
    """A bf16 full fine-tuning step (every weight and a head, AdamW): rate and peak. The
    caller has moved ``bb`` (the frozen original) off the device: the peak counts the
    trained copy only."""
    clock.reset_peak()
    tuned, names = prepare(bb, FineTuneConfig(method="full"))
    tuned.model.to(x.device)  # the inner model: the copy's weights are not hashed again
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


def _inca(bb, bank, pixels, y, prec: Precision, steps: int, clock: Clock) -> tuple:
    """A streaming InCA step (backbone pass + the whole bank, AdamW): rate and peak."""
    clock.reset_peak()
    opt = torch.optim.AdamW(bank.param_groups(), fused=pixels.device.type == "cuda")

    def step() -> None:
        block = stream_block(bb, pixels, prec)
        with prec.autocast():
            losses = bank_loss(bank.logits(block), y, 0.1)
        opt.zero_grad(set_to_none=True)
        losses.sum().backward()
        opt.step()

    return rate(step, len(pixels), steps, clock), clock.peak_gib()


def measure_fullft(bb, x, y, prec: Precision, steps: int, clock: Clock) -> dict:
    """Full fine-tuning when the device has the memory (estimated first), else the
    estimate; an out-of-memory error is recorded, not raised."""
    batch = len(x)
    out: dict = {"fullft_gib_estimate": fullft_estimate_gib(bb, batch)}
    free = clock.free_gib()
    if free is not None and out["fullft_gib_estimate"] * 1.2 + 2 > free:
        out["fullft_skipped"] = (f"needs about {out['fullft_gib_estimate']:.1f} GiB, "
                                 f"{free:.1f} GiB free")
        return out
    device = bb.device
    bb.to("cpu")  # the frozen original is no part of fine-tuning's memory
    try:
        out.update(_fullft(bb, x, y, prec, steps, clock))
    except torch.cuda.OutOfMemoryError as e:
        out["fullft_error"] = "CUDA out of memory: " + str(e).splitlines()[0][:300]
        print(out["fullft_error"], flush=True)
    clock.reset_peak()  # the failed step's tensors went with the exception
    bb.to(device)
    return out


def measure_model(name: str, batch: int, args, device: torch.device, clock: Clock) -> dict:
    """Step rates and peaks of one timm model (random weights)."""
    bb = build_backbone(name, args, device)
    prec = Precision("bf16-mixed", device)
    s = bb.preprocessing.input_size
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (batch, 3, s, s), generator=g, dtype=torch.uint8)
    pixels = pixels.to(device)
    x = to_model_input(pixels, bb.preprocessing, device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    out: dict = {"batch_size": batch, "parameters": sum(p.numel() for p in bb.parameters())}

    def forward() -> None:
        with torch.no_grad(), prec.autocast():
            bb._forward_plain(x)

    def extract() -> None:
        with prec.autocast():
            bb.extract(x, bb.layers)

    out["forward_bf16_img_s"] = rate(forward, batch, args.steps, clock)
    out["extract_all_bf16_img_s"] = rate(extract, batch, args.steps, clock)
    out.update(measure_fullft(bb, x, y, prec, args.steps, clock))
    # one bank for both backbones (built once: seconds of CPU for a ViT-g-sized bank)
    bank = bank_for(bb, bb.layers, 10, tuple(float(v) for v in args.lrs.split(",")))
    out["bank_size"] = len(bank.keys)
    out["bank_parameters"] = sum(p.numel() for p in bank.parameters())
    out["inca_stream_bf16_img_s"], out["inca_stream_bf16_peak_gib"] = _inca(
        bb, bank, pixels, y, prec, args.steps, clock)
    # A frozen backbone needs no float32 master weights: held in bfloat16 it skips
    # autocast's casts (inca fit --backbone-dtype bfloat16).
    bb.to(torch.bfloat16)
    xb = x.to(torch.bfloat16)

    def forward_pure() -> None:
        with torch.no_grad():
            bb._forward_plain(xb)

    out["forward_pure_bf16_img_s"] = rate(forward_pure, batch, args.steps, clock)
    out["inca_stream_pure_bf16_img_s"], out["inca_stream_pure_bf16_peak_gib"] = _inca(
        bb, bank, pixels, y, prec, args.steps, clock)
    bank = bb = None  # freed before the next model is built
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
    """``inca.fit`` (in ``args.e2e_mode``, the same at every size) and full fine-tuning on
    the same images and epochs; each run's peak holds nothing of the runs before it."""
    rows, source = [], ""
    for n in (int(v) for v in args.e2e_sizes.split(",")):
        data, source = e2e_data(n)
        for method in ("inca", "full"):
            # fine-tuning copies the backbone to the device itself: its frozen original
            # stays on the CPU, out of the peak
            bb = build_backbone(args.e2e_model, args, device if method == "inca" else "cpu")
            clock.reset_peak()
            with tempfile.TemporaryDirectory() as tmp, PeakMemory(device=device) as mem:
                t = time.perf_counter()
                if method == "inca":
                    task = inca.fit(bb, data, epochs=args.epochs, batch_size=args.e2e_batch,
                                    precision="bf16-mixed", device=device, cache_dir=tmp,
                                    progress=False, patience=0, mode=args.e2e_mode)
                    mode, cache = task.report.mode["mode"], task.report.mode["cache_bytes"]
                else:
                    tr, val = split_train_val(data, 0.15, 0)
                    task = finetune(bb, tr, val, None, FineTuneConfig(
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
            task = bb = None  # the next run's peak must not hold this one's task
            gc.collect()
    return rows, source


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--models", default="vit_base_patch16_224,vit_large_patch16_224",
                    help="timm models, comma-separated ('' for none)")
    ap.add_argument("--batch-sizes", default="128,64", help="one per model")
    ap.add_argument("--giant", default="vit_giant_patch14_dinov2",
                    help="the ViT-g-class model (bank over all its blocks beside a measured "
                         "full fine-tuning step when it fits), or 'none'")
    ap.add_argument("--giant-batch", type=int, default=32)
    ap.add_argument("--input-size", type=int, default=224)
    ap.add_argument("--model-kwargs", default="{}",
                    help="JSON keyword arguments for every timm model (tiny CPU runs)")
    ap.add_argument("--lrs", default="1e-3,3e-3")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--e2e-model", default=None, help="default: the first of --models")
    ap.add_argument("--e2e-sizes", default="4000,16000", help="'' for none")
    ap.add_argument("--e2e-batch", type=int, default=128)
    ap.add_argument("--e2e-mode", default="streaming", choices=("streaming", "cached", "auto"),
                    help="inca.fit's mode, the same at every size (auto may cache the small "
                         "size and stream the large one)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--name", default="gpu")
    ap.add_argument("--results-dir", type=Path, default=RESULTS)
    return ap


def main() -> None:
    args = parser().parse_args()
    device = resolve_device(args.device)
    clock = Clock(device)
    models = [m for m in args.models.split(",") if m]
    batches = [int(v) for v in args.batch_sizes.split(",")]
    batches += batches[-1:] * (len(models) - len(batches))
    args.e2e_model = args.e2e_model or (models[0] if models else "vit_base_patch16_224")
    payload = {"benchmark": "gpu", "command": command_line(), "environment": environment(),
               "device": environment()["device"], "input_size": args.input_size,
               "lrs": args.lrs, "steps": args.steps, "epochs": args.epochs,
               "e2e_model": args.e2e_model, "e2e_batch": args.e2e_batch,
               "e2e_mode": args.e2e_mode, "giant": None if args.giant == "none" else args.giant,
               "models": {}, "e2e": [], "e2e_source": ""}

    def save() -> Path:  # after each part: a later failure loses nothing measured
        return write_results(args.name, payload, to_markdown(payload), args.results_dir)

    runs = list(zip(models, batches[:len(models)], strict=True))
    if args.giant != "none":
        runs.append((args.giant, args.giant_batch))
    for name, batch in runs:
        print(f"{name} (batch {batch}) ...", flush=True)
        payload["models"][name] = measure_model(name, batch, args, device, clock)
        print(payload["models"][name], flush=True)
        save()
    if args.e2e_sizes:
        payload["e2e"], payload["e2e_source"] = end_to_end(args, device, clock)
    print(f"wrote {save()}")


if __name__ == "__main__":
    main()
