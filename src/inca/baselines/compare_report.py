"""What ``inca compare`` reports: per-method statistics, the Markdown table with each
method's settings in words, the accuracy-against-cost plot, and the files holding them."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from inca._files import human_bytes
from inca.baselines.compare_config import EXPENSIVE, CompareConfig


def method_settings(config: CompareConfig) -> dict[str, str]:
    """How each method trains, in words, for the report: every baseline as its own
    community runs it, so the comparison can be checked."""
    from inca.adapters import LinearConfig, MultiLayerLinearConfig
    from inca.baselines.finetune import FineTuneConfig

    out = {}
    for m in config.methods:
        if m in EXPENSIVE:
            ft = FineTuneConfig(method=m)
            common = (f"AdamW (weight decay {ft.weight_decay}), cosine schedule after "
                      f"{ft.warmup_epochs} epoch of warm-up, label smoothing "
                      f"{ft.label_smoothing}, head lr {ft.lr_head:g}, augmentation "
                      f"{ft.augment}, best epoch on validation")
            if m == "lora":
                out[m] = f"LoRA (peft) r={ft.lora_r}, alpha={ft.lora_alpha}, lr " \
                         f"{ft.lr_lora:g}; {common}"
            else:
                what = "every weight" if m == "full" else "the last block"
                out[m] = (f"{what}, lr {ft.lr_backbone:g} at the top with layer-wise decay "
                          f"{ft.layer_decay}; {common}")
        else:
            lrs = ", ".join(f"{v:g}" for v in config.lrs)
            if m == "linear":
                lc = LinearConfig()
                out[m] = (f"last layer, {lc.pool} pooling (mean for CNNs), standardized: "
                          f"{lc.norm}; lr grid {lrs}, best epoch and lr on validation")
            elif m == "multilayer":
                out[m] = (f"every layer, {MultiLayerLinearConfig.pool} pooling, each layer "
                          f"standardized; lr grid {lrs}, best on validation")
            else:
                out[m] = (f"InCA adapters on every layer, lr grid {lrs}; the best adapter on "
                          "validation (and the top-3 ensemble)")
    return out


def summarise(runs: list[dict[str, Any]], backbone_bytes: int) -> list[dict[str, Any]]:
    """Per method: accuracy mean and spread over seeds, costs of the first seed, ratios."""
    by: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by.setdefault(r["method"], []).append(r)
    rows = []
    for method, rs in by.items():
        accs = [r["test_accuracy"] for r in rs]
        first = min(rs, key=lambda r: r["seed"])  # costs of seed 0: extraction included
        rows.append({
            "method": method, "seeds": len(rs), "test_accuracy_mean": statistics.mean(accs),
            "test_accuracy_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "train_seconds": first["train_seconds"], "peak_rss_mib": first["peak_rss_mib"],
            "cuda_peak_mib": first["cuda_peak_mib"],
            "trainable_parameters": first["trainable_parameters"],
            "stored_bytes": first["stored_bytes"],
            "stored_percent_of_backbone": 100 * first["stored_bytes"] / backbone_bytes,
        })
    # ratios against full fine-tuning when it ran, else against the most accurate method
    ref = next((r for r in rows if r["method"] == "full"), None) or \
        max(rows, key=lambda r: r["test_accuracy_mean"], default=None)
    for r in rows if ref else ():
        r["reference"] = ref["method"]
        r["time_vs_ref"] = r["train_seconds"] / ref["train_seconds"]
        r["memory_vs_ref"] = r["peak_rss_mib"] / ref["peak_rss_mib"]
        r["storage_vs_ref"] = r["stored_bytes"] / ref["stored_bytes"]
        r["accuracy_minus_ref"] = r["test_accuracy_mean"] - ref["test_accuracy_mean"]
    return rows


def verdict(summary: list[dict[str, Any]]) -> str:
    """One line: the most accurate method, and each other's accuracy and wall time against
    it (InCA can win on accuracy and still be slower at a small scale: it says so)."""
    if not summary:
        return "Verdict: no method finished."
    best = max(summary, key=lambda r: r["test_accuracy_mean"])
    others = [
        f"{r['method']} {100 * (r['test_accuracy_mean'] - best['test_accuracy_mean']):+.1f} "
        f"points in {r['train_seconds'] / best['train_seconds']:.2f}x its time"
        for r in sorted(summary, key=lambda r: -r["test_accuracy_mean"]) if r is not best]
    return (f"Verdict: {best['method']} is the most accurate "
            f"({100 * best['test_accuracy_mean']:.1f}%, {best['train_seconds']:.1f} s)"
            + ("; " + ", ".join(others) if others else "") + ".")


def to_markdown(result: dict[str, Any], command: str = "") -> str:
    """The comparison table."""
    c = result["config"]
    ref = next((r["reference"] for r in result["summary"] if "reference" in r), None)
    vs = "full" if ref == "full" else f"best ({ref})" if ref else "best"
    lines = [
        f"# inca compare: {result['backbone']['name']} on {c['data']}",
        "",
        verdict(result["summary"]),
        "",
        *([f"Command: `{command}`  "] if command else []),
        f"{c['limit']} training images ({c['val_fraction']:.0%} held out for validation), "
        f"{c['test_limit']} test images, {c['epochs']} epochs for every method, batch "
        f"{c['batch_size']}, device {c['device']}, precision {c.get('precision', '32')}. "
        "Accuracy: mean ± std over the seeds shown (one seed: no spread). "
        "Costs: the first seed's run, each method in its own process; the probes and InCA "
        f"include the shared extraction pass ({result['extraction'].get('seconds', 0):.1f} s).",
        "",
        f"| method | seeds | test acc | Δ vs {vs} | train s | time vs {vs} | peak RSS MiB | "
        f"memory vs {vs} | trainable params | stored per task | % of backbone |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["summary"]:
        def ratio(key: str, row: dict[str, Any] = r) -> str:
            return f"{row[key]:.3f}" if key in row else "n/a"

        delta = f"{100 * r['accuracy_minus_ref']:+.2f}" if "accuracy_minus_ref" in r else "n/a"
        spread = f" ± {100 * r['test_accuracy_std']:.2f}" if r["seeds"] > 1 else ""
        lines.append(
            f"| {r['method']} | {r['seeds']} | {100 * r['test_accuracy_mean']:.2f}{spread} | "
            f"{delta} | {r['train_seconds']:.1f} | "
            f"{ratio('time_vs_ref')} | {r['peak_rss_mib']:.0f} | {ratio('memory_vs_ref')} | "
            f"{r['trainable_parameters']:,} | {human_bytes(r['stored_bytes'])} | "
            f"{r['stored_percent_of_backbone']:.2f} |")
    finished = {r["method"] for r in result["summary"]}
    failures = result.get("failures", [])
    for method in dict.fromkeys(f["method"] for f in failures if f["method"] not in finished):
        lines.append(f"| {method} | 0 | failed | n/a | | | | | | | |")
    if failures:
        lines += ["", "Failed runs (the other methods' results above are complete):", ""]
        lines += [f"- {f['method']} seed {f['seed']}: {f['error']}" for f in failures]
    timed = [r for r in result["runs"] if r["method"].endswith("@ full's time")]
    if timed:
        epochs = sorted({r["extra"]["epochs_run"] for r in timed})
        share = "" if c.get("time_fraction", 1.0) == 1.0 else f"{c['time_fraction']:g} x "
        lines += ["", f"Rows `@ full's time`: the same method given {share}full fine-tuning's "
                  f"wall time ({result['time_budget_s']:.1f} s, extraction included), as many "
                  f"epochs as fit: {', '.join(map(str, epochs))} (at most {c['max_epochs']})."]
    if result.get("settings"):
        lines += ["", "Settings:", ""]
        lines += [f"- {m}: {text}" for m, text in result["settings"].items()]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: str | Path) -> Path:
    """Accuracy against training cost, one point per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for i, r in enumerate(sorted(result["summary"], key=lambda r: r["train_seconds"])):
        ax.errorbar(r["train_seconds"], 100 * r["test_accuracy_mean"],
                    yerr=100 * r["test_accuracy_std"], fmt="o", capsize=3)
        ax.annotate(r["method"], (r["train_seconds"], 100 * r["test_accuracy_mean"]),
                    textcoords="offset points", xytext=(6, 6 - 12 * (i % 3)), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("training wall time, s (log; extraction included)")
    ax.set_ylabel("test accuracy, %")
    ax.set_title(f"{result['backbone']['name']} on {result['config']['data']}: "
                 "accuracy vs training cost")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def write(result: dict[str, Any], folder: str | Path, name: str = "compare",
          command: str = "") -> dict[str, Path]:
    """``<name>.json``, ``<name>.md`` and ``<name>.png`` in ``folder``."""
    from inca._files import atomic_write_bytes, atomic_write_json

    folder = Path(folder)
    atomic_write_json(folder / f"{name}.json", {**result, "command": command})
    atomic_write_bytes(folder / f"{name}.md", to_markdown(result, command).encode())
    return {"json": folder / f"{name}.json", "markdown": folder / f"{name}.md",
            "plot": plot(result, folder / f"{name}.png")}
