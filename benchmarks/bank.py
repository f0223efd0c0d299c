"""The adapter bank against the machine's limits: FLOP/s beside a measured sgemm peak, token
bytes beside a measured memory bandwidth, and the bank step beside the backbone pass that
feeds it, all in one process.

Usage: python benchmarks/bank.py [--shapes a,b,c,d] [--repeats 7] [--quick]

Shapes (synthetic tokens, random weights: timings only):
- (a) DINOv2-S/14 at 112 px: 13 layers of 65 x 384 tokens, {InCA, linear} x 2 lrs (52);
- (b) ViT-B/16 at 224 px: 13 layers of 197 x 768 tokens, {InCA, linear} x 2 lrs (52);
- (c) one InCA member on shape (a)'s last layer;
- (d) shape (a)'s tokens, 13 layers x (4 InCA variants + linear) x 3 lrs (195 members).

For each: FLOPs of a forward and of a training step (``FlopCounterMode``), their best
times over ``--repeats`` (the minimum: other processes only ever add time), achieved
GFLOP/s, efficiency against the best of a 2048^2 sgemm timed in the same process on the
same threads, token bytes read per step beside a large ``copy_``'s bandwidth, and the bank
step / the backbone's extraction of every layer for the same batch.
Writes ``benchmarks/results/bank.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from _common import RESULTS, environment, make_backbone, publish
from fit import EPOCHS as FIT_EPOCHS  # fit.md's bank / extraction: this many epochs of steps
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from inca.training import AdapterBank, FitConfig, plan_members
from inca.training.loss import bank_loss
from inca.training.sources import StackedFeats

VARIANTS = {"inca": {}, "inca:q4": {"num_queries": 4}, "inca:mlp": {"head_hidden": 384},
            "inca:patch": {"attend_prefix": False}}


@dataclass
class Shape:
    name: str
    what: str
    backbone: str  # extraction timed on this backbone (random weights)
    input_size: int
    layers: int
    tokens: int
    dim: int
    batch: int
    kinds: tuple[str, ...]
    lrs: tuple[float, ...]
    only_last_layer: bool = False


SHAPES = {
    "a": Shape("a", "DINOv2-S/14 112 px, {InCA, linear} x 2 lrs", "dinov2_vits14", 112,
               13, 65, 384, 64, ("inca", "linear"), (1e-3, 3e-3)),
    "b": Shape("b", "ViT-B/16 224 px, {InCA, linear} x 2 lrs", "timm:vit_base_patch16_224",
               224, 13, 197, 768, 32, ("inca", "linear"), (1e-3, 3e-3)),
    "c": Shape("c", "one InCA member (shape a, last layer)", "dinov2_vits14", 112, 13, 65,
               384, 64, ("inca",), (1e-3,), only_last_layer=True),
    "d": Shape("d", "shape a, (4 InCA variants + linear) x 3 lrs", "dinov2_vits14", 112, 13,
               65, 384, 64, (*VARIANTS, "linear"), (1e-3, 3e-3, 1e-2)),
}
QUICK = {  # the test suite's smoke run: tiny tokens, the same code
    "a": Shape("a", "tiny", "timm:vit_tiny_patch16_224", 32, 3, 5, 192, 4, ("inca", "linear"),
               (1e-3, 3e-3)),
    "c": Shape("c", "tiny, one member", "timm:vit_tiny_patch16_224", 32, 3, 5, 192, 4,
               ("inca",), (1e-3,), only_last_layer=True),
}


# The least memory traffic of a training step: the folded attention reads its token block
# at least 5 times (forward: scores, squared norms, pooling; backward: the keys' and the
# pooling weights' gradients); each parameter is read in the forward and in the backward,
# its gradient written, and AdamW reads parameter, gradient and two moments and writes
# three: 10 transfers.
FLOOR_TOKEN_PASSES, FLOOR_PARAM_PASSES = 5, 10


def best_time(fn, repeats: int) -> float:
    """The fastest of ``repeats`` calls, after two warm-up calls (seconds)."""
    for _ in range(2):
        fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def sgemm_peak(repeats: int) -> float:
    """GFLOP/s of a 2048^2 float32 matmul on this process's threads (best of ``repeats``)."""
    a, b, out = torch.randn(2048, 2048), torch.randn(2048, 2048), torch.empty(2048, 2048)
    return 2 * 2048**3 / best_time(lambda: torch.mm(a, b, out=out), repeats) / 1e9


def copy_bandwidth(repeats: int) -> float:
    """GB/s of a 256 MiB ``copy_`` (bytes read + written)."""
    src, dst = torch.empty(2**26).normal_(), torch.empty(2**26)
    return 2 * src.numel() * 4 / best_time(lambda: dst.copy_(src), repeats) / 1e9


MATMULS = {torch.ops.aten.bmm.default, torch.ops.aten.baddbmm.default,
           torch.ops.aten.mm.default, torch.ops.aten.addmm.default}


class _RecordMatmuls(TorchDispatchMode):
    """Every matmul a step dispatches (forward and backward), as (op, tensor layouts, other
    arguments), to be replayed alone."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        if func in MATMULS:
            self.calls.append((func, [(tuple(a.shape), a.stride(), a.dtype)
                                      if isinstance(a, torch.Tensor) else a for a in args],
                               dict(kwargs or {})))
        return func(*args, **(kwargs or {}))


def _like(layout: tuple) -> torch.Tensor:
    """A random tensor of this shape, strides and dtype (strides of 0 included)."""
    shape, stride, dtype = layout
    size = 1 + sum((n - 1) * st for n, st in zip(shape, stride, strict=True))
    return torch.randn(size, dtype=dtype).as_strided(shape, stride)


def matmul_floor(step, repeats: int) -> float:
    """The least time the matmuls of one ``step()`` take: each recorded call replayed alone,
    on tensors of its shapes and strides, at its best over ``repeats`` (seconds). Alone, its
    operands stay in cache: a bound the step's matmuls cannot beat with this BLAS."""
    with _RecordMatmuls() as rec:
        step()
    total = 0.0
    for func, args, kwargs in rec.calls:
        real = [_like(a) if isinstance(a, tuple) else a for a in args]
        total += best_time(lambda f=func, a=real, k=kwargs: f(*a, **k), repeats)
    return total


def build_bank(s: Shape) -> tuple[AdapterBank, StackedFeats, torch.Tensor]:
    layers = [f"blocks.{i}" for i in range(s.layers)]
    config = FitConfig(layers=layers, kinds=s.kinds, lrs=s.lrs,
                       adapter_options={k: v for k, v in VARIANTS.items() if v})
    specs = plan_members(layers, config)
    if s.only_last_layer:
        specs = [sp for sp in specs if sp.layers == (layers[-1],)]
    bank = AdapterBank.build(specs, embed_dims=dict.fromkeys(layers, s.dim),
                             token_counts=dict.fromkeys(layers, s.tokens), num_classes=10,
                             num_prefix_tokens=1, options=config.adapter_options)
    g = torch.Generator().manual_seed(0)
    block = torch.randn(s.layers, s.batch, s.tokens, s.dim, generator=g)
    return bank, StackedFeats(block, layers), torch.randint(0, 10, (s.batch,), generator=g)


def measure(s: Shape, repeats: int, extraction: dict[str, float]) -> dict:
    torch.manual_seed(0)
    bank, feats, y = build_bank(s)
    opt = torch.optim.AdamW(bank.param_groups(), fused=True)

    def forward() -> None:
        with torch.no_grad():
            bank(feats)

    def step() -> None:
        losses = bank_loss(bank(feats), y, 0.1)
        opt.zero_grad(set_to_none=True)
        losses.sum().backward()
        opt.step()

    flops = {}
    for name, fn in (("forward", forward), ("train", step)):
        with FlopCounterMode(display=False) as fc:
            fn()
        flops[name] = fc.get_total_flops()
    times = {"forward": best_time(forward, repeats), "train": best_time(step, repeats),
             "optimizer": best_time(opt.step, repeats),  # on the last step's gradients
             "matmuls_alone": matmul_floor(step, repeats)}
    key = (s.backbone, s.input_size, s.batch)
    if key not in extraction:
        bb = make_backbone(s.backbone, input_size=s.input_size, device="cpu",
                           random_weights=True)
        x = torch.randn(s.batch, 3, s.input_size, s.input_size)
        extraction[key] = best_time(lambda: bb.extract(x, bb.layers), max(2, repeats // 3))
        with FlopCounterMode(display=False) as fc:
            bb.extract(x, bb.layers)
        extraction[(*key, "flops")] = fc.get_total_flops()
    read = len(bank.layers) * s.batch * s.tokens * s.dim * 4  # its token block, float32
    params = sum(p.numel() * p.element_size() for p in bank.parameters() if p.requires_grad)
    return {
        "shape": s.name, "what": s.what, "members": len(bank.keys),
        "tokens": [s.layers, s.batch, s.tokens, s.dim],
        "flops": flops, "seconds": times,
        "gflop_s": {k: flops[k] / times[k] / 1e9 for k in flops},
        "token_block_bytes": read, "param_bytes": params,
        "floor_bytes": FLOOR_TOKEN_PASSES * read + FLOOR_PARAM_PASSES * params,
        "extract_seconds": extraction[key], "extract_flops": extraction[(*key, "flops")],
        "step_vs_extract": times["train"] / extraction[key],
        "flops_vs_extract": flops["train"] / extraction[(*key, "flops")],
    }


C_BEFORE_MS = 9.9  # shape (c)'s step in bank.md's first run (commit e91f34d), before the
# bank changes of issue 19, on this machine


def targets(rows: list[dict], peak: float) -> list[str]:
    """Issue 19's targets against what this run measured, with the bounds that decide them."""
    by = {r["shape"]: r for r in rows}
    if "a" not in by:
        return []
    a = by["a"]
    ta, fa = a["seconds"]["train"], a["flops"]["train"]
    ext = a["extract_seconds"]
    eff, kfe, mfe = a["efficiency"]["train"], a["kernel_floor_efficiency"], \
        a["floor_efficiency"]
    out = ["", "## Targets (issue 19) against this run", "",
           f"- (a) training step, efficiency >= 25%: **{eff:.1%}** ("
           + ("met" if eff >= 0.25 else
              f"not met; its own matmuls alone, each at its best, plus AdamW alone take "
              f"{a['kernel_floor_s'] * 1e3:.1f} ms, which allows at most {kfe:.1%}; its "
              f"memory floor allows {mfe:.1%}; the other "
              f"{(ta - a['kernel_floor_s']) * 1e3:.1f} ms of the step are its elementwise "
              "work, copies and dispatch") + ").",
           f"- (a) step / extraction of the same batch <= 0.15: **{a['step_vs_extract']:.3f}** "
           f"({'met' if a['step_vs_extract'] <= 0.15 else 'not met'}).",
           f"- fit.md's bank / extraction <= 0.3: {FIT_EPOCHS} epochs of (a)'s steps over "
           f"the batches extracted once take {FIT_EPOCHS * a['step_vs_extract']:.2f} of the "
           f"extraction; at (a)'s memory floor {FIT_EPOCHS * a['floor_s'] / ext:.2f}, at "
           f"its kernel floor {FIT_EPOCHS * a['kernel_floor_s'] / ext:.2f}; 0.3 needs a "
           f"step of {0.3 / FIT_EPOCHS * ext * 1e3:.1f} ms "
           "(before validation and reading the cache)."]
    if "d" in by:
        d = by["d"]
        ratio, t25 = d["seconds"]["train"] / ta, fa / (0.25 * peak * 1e9)
        floor_d = max(d["floor_s"], d["kernel_floor_s"])
        out.append(
            f"- (d) step / (a) step <= 3: **{ratio:.2f}** ("
            + ("met" if ratio <= 3 else
               f"not met; (d) does {d['flops']['train'] / fa:.1f}x (a)'s FLOPs; its memory "
               f"floor is {d['floor_s'] * 1e3:.0f} ms and its kernel floor "
               f"{d['kernel_floor_s'] * 1e3:.0f} ms, {floor_d / ta:.2f}x (a)'s step; with "
               f"(a) at its 25% target ({t25 * 1e3:.1f} ms), 3x that is "
               f"{3 * t25 * 1e3:.0f} ms, "
               + ("below (d)'s floor: the two targets cannot both hold on this machine"
                  if 3 * t25 < floor_d else "above (d)'s floors")) + ").")
    if "c" in by:
        tc = by["c"]["seconds"]["train"] * 1e3
        out.append(f"- (c) one member no slower than before the issue: **{tc:.1f} ms** a step; "
                   f"{C_BEFORE_MS} ms in this file's first run, before the issue's changes ("
                   + ("met" if tc <= C_BEFORE_MS else "not met") + ").")
    return out


def render(payload: dict) -> list[str]:
    """bank.md from the measurements (derived columns filled in, in place)."""
    peak, rows = payload["sgemm_gflop_s"], payload["shapes"]
    derive(rows, peak, payload["copy_gb_s"])
    return table(payload) + relative_steps(rows) + NOTES + targets(rows, peak)


def derive(rows: list[dict], peak: float, bandwidth: float) -> None:
    """Each row's efficiencies and floors, from the peak and bandwidth of its run."""
    for r in rows:
        r["efficiency"] = {k: v / peak for k, v in r["gflop_s"].items()}
        # time to read the token block once at the measured bandwidth (half the copy's)
        r["one_token_pass_s"] = r["token_block_bytes"] / (bandwidth / 2 * 1e9)
        r["floor_s"] = r["floor_bytes"] / (bandwidth * 1e9)  # bandwidth: bytes moved / s
        r["floor_efficiency"] = r["flops"]["train"] / r["floor_s"] / 1e9 / peak
        # the step's matmuls, each alone at its best, and AdamW alone: a floor of its kernels
        r["kernel_floor_s"] = r["seconds"]["matmuls_alone"] + r["seconds"]["optimizer"]
        r["kernel_floor_efficiency"] = r["flops"]["train"] / r["kernel_floor_s"] / 1e9 / peak


def table(payload: dict) -> list[str]:
    """The title, the machine's limits, and a row per shape."""
    peak, bandwidth, rows = payload["sgemm_gflop_s"], payload["copy_gb_s"], payload["shapes"]
    peaks, repeats = payload["sgemm_samples"], payload["repeats"]
    md = ["# The adapter bank against the machine's limits", "",
          f"{payload['environment']['cpu_threads']} threads; sgemm 2048^2: {peak:.0f} GFLOP/s "
          "(best of "
          f"{len(peaks)} x {repeats}, between the shapes: "
          f"{', '.join(f'{p:.0f}' for p in peaks)}); copy_ bandwidth {bandwidth:.1f} GB/s "
          "(read + write). Times are the best of the repeats (other load only adds time).", "",
          "| shape | members | tokens (L, B, N, D) | train GFLOP | train ms | train GFLOP/s "
          "| efficiency | forward ms | forward eff. | token passes in a step's time | "
          "step / extraction | FLOPs / extraction's | optimizer ms | memory floor ms | "
          "step / floor | efficiency at the floor | matmuls alone ms | kernel floor ms | "
          "efficiency at the kernel floor |",
          "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
          "---:|---:|"]
    for r in rows:
        md.append(
            f"| ({r['shape']}) {r['what']} | {r['members']} | {tuple(r['tokens'])} | "
            f"{r['flops']['train'] / 1e9:.2f} | {r['seconds']['train'] * 1e3:.1f} | "
            f"{r['gflop_s']['train']:.1f} | {r['efficiency']['train']:.1%} | "
            f"{r['seconds']['forward'] * 1e3:.1f} | {r['efficiency']['forward']:.1%} | "
            f"{r['seconds']['train'] / r['one_token_pass_s']:.1f} | "
            f"{r['step_vs_extract']:.3f} | {r['flops_vs_extract']:.3f} | "
            f"{r['seconds']['optimizer'] * 1e3:.1f} | {r['floor_s'] * 1e3:.1f} | "
            f"{r['seconds']['train'] / r['floor_s']:.2f} | {r['floor_efficiency']:.1%} | "
            f"{r['seconds']['matmuls_alone'] * 1e3:.1f} | {r['kernel_floor_s'] * 1e3:.1f} | "
            f"{r['kernel_floor_efficiency']:.1%} |")
    return md


def relative_steps(rows: list[dict]) -> list[str]:
    """Shapes (c) and (d) against (a): steps and FLOPs."""
    ra = next((r for r in rows if r["shape"] == "a"), None)
    if ra is None:
        return []
    return [f"\n({r['shape']}) step / (a) step: "
            f"{r['seconds']['train'] / ra['seconds']['train']:.2f} "
            f"(its FLOPs / (a)'s: {r['flops']['train'] / ra['flops']['train']:.2f})"
            for r in rows if r["shape"] in ("c", "d")]


NOTES = [
    "", "'token passes in a step's time': the step's time divided by the time to read "
    "its float32 token block once at the measured bandwidth (a bound on what a "
    "bandwidth-limited step can reach).",
    "", f"'memory floor': the least a step can move ({FLOOR_TOKEN_PASSES} reads of its "
    f"token block, {FLOOR_PARAM_PASSES} transfers of its parameters: forward and "
    "backward reads, the gradient, AdamW's moments) at the measured copy bandwidth; "
    "'efficiency at the floor': the step's FLOPs in that time against the sgemm peak, "
    "the most a step bound by memory traffic could show.",
    "", "'matmuls alone': every matmul of one training step (forward and backward, "
    "recorded as dispatched), each replayed alone on tensors of its shapes and "
    "strides at its best time, summed: alone, its operands stay in cache, so the "
    "step's matmuls cannot beat it with this BLAS; 'kernel floor': that plus AdamW's "
    "step alone; 'efficiency at the kernel floor': the step's FLOPs in that time "
    "against the sgemm peak."]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="a,b,c,d")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="tiny shapes (the test suite's)")
    ap.add_argument("--name", default="bank")
    ap.add_argument("--results-dir", type=Path, default=RESULTS)
    ap.add_argument("--from-json", action="store_true",
                    help="re-write NAME.md from NAME.json of --results-dir (no measuring)")
    args = ap.parse_args()
    if args.from_json:
        payload = json.loads((args.results_dir / f"{args.name}.json").read_text())
        publish(args.name, payload, render(payload), folder=args.results_dir)
        return
    table = QUICK if args.quick else SHAPES
    shapes = [table[k] for k in args.shapes.split(",") if k in table]
    peaks, bandwidths, rows, extraction = [], [], [], {}
    for s in shapes:  # the peak is measured between the shapes, and its best kept
        peaks.append(sgemm_peak(args.repeats))
        bandwidths.append(copy_bandwidth(args.repeats))
        rows.append(measure(s, args.repeats, extraction))
        print(rows[-1], flush=True)
    payload = {"sgemm_gflop_s": max(peaks), "sgemm_samples": peaks, "repeats": args.repeats,
               "copy_gb_s": max(bandwidths), "environment": environment(),
               "shapes": rows}
    publish(args.name, payload, render(payload), folder=args.results_dir)


if __name__ == "__main__":
    main()
