"""The GPU benchmark's page (``benchmarks/gpu.py``): its targets, the ratios of one model's
figures that meet them, and gpu.md from the payload, one function a section."""

from __future__ import annotations

# ratio key: (what, bound, at least?). Like with like: InCA's step with the backbone under
# autocast against the autocast forward, and with the backbone held in bfloat16 against
# the forward of that same bfloat16 backbone.
TARGETS = {
    "inca_vs_forward": ("InCA streaming step / plain forward, both autocast", 0.8, True),
    "inca_vs_forward_pure_bf16": ("InCA streaming step / plain forward, both pure bf16",
                                  0.8, True),
    "extract_vs_forward": ("all-layer extraction / plain forward", 0.95, True),
    "inca_vs_fullft": ("InCA streaming step (autocast) / bf16 full fine-tuning step",
                       2.5, True),
    "inca_pure_bf16_vs_fullft": ("InCA streaming step (bf16 backbone) / bf16 full "
                                 "fine-tuning step", 2.5, True),
    "inca_vs_fullft_memory": ("InCA peak memory (autocast) / full fine-tuning peak memory",
                              0.35, False),
    "inca_pure_bf16_vs_fullft_memory": ("InCA peak memory (bf16 backbone) / full "
                                        "fine-tuning peak memory", 0.35, False),
}


def ratios(m: dict) -> dict:
    """The target ratios of one model's figures, each pairing like with like."""
    r = {}
    pairs = {
        "inca_vs_forward": ("inca_stream_bf16_img_s", "forward_bf16_img_s"),
        "inca_vs_forward_pure_bf16": ("inca_stream_pure_bf16_img_s", "forward_pure_bf16_img_s"),
        "extract_vs_forward": ("extract_all_bf16_img_s", "forward_bf16_img_s"),
        "inca_vs_fullft": ("inca_stream_bf16_img_s", "fullft_bf16_img_s"),
        "inca_pure_bf16_vs_fullft": ("inca_stream_pure_bf16_img_s", "fullft_bf16_img_s"),
        "inca_vs_fullft_memory": ("inca_stream_bf16_peak_gib", "fullft_bf16_peak_gib"),
        "inca_pure_bf16_vs_fullft_memory": ("inca_stream_pure_bf16_peak_gib",
                                            "fullft_bf16_peak_gib"),
    }
    for key, (num, den) in pairs.items():
        if m.get(num) is not None and m.get(den):
            r[key] = m[num] / m[den]
    return r


def _f(v, spec=".2f") -> str:
    return "n/a" if v is None else format(v, spec)


def _fullft_cell(m: dict) -> str:
    if "fullft_bf16_img_s" in m:
        return f"{m['fullft_bf16_img_s']:.0f} ({_f(m.get('fullft_bf16_peak_gib'))})"
    if "fullft_error" in m:
        return f"out of memory (est. {m['fullft_gib_estimate']:.1f} GiB)"
    if "fullft_skipped" in m:
        return f"not run: {m['fullft_skipped']}"
    return "n/a"


def to_markdown(p: dict) -> str:
    md = _models_md(p) + _giant_md(p)
    if p["e2e"]:
        md += _e2e_md(p)
    return "\n".join(md) + "\n"


def _models_md(p: dict) -> list[str]:
    """The setting, a row of rates per model, and each model's target ratios."""
    md = ["# InCA at GPU scale", "", f"Command: `{p['command']}`  ",
          f"Device: {p['device']}, torch {p['environment']['torch']}; timm models with random "
          f"weights at {p['input_size']} px (timings only), bf16-mixed, eager mode (no "
          f"torch.compile on either side); {p['steps']} steps timed between two "
          f"synchronisations after 2 warm-up steps. Bank: every layer x lr ({p['lrs']}) x "
          "{InCA, linear}.", "",
          "| model | batch | forward img/s | extract img/s | full FT img/s (GiB) | "
          "InCA stream img/s (GiB) | bank | pure-bf16 backbone: forward img/s | "
          "pure-bf16 backbone: InCA stream img/s (GiB) |",
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, m in p["models"].items():
        md.append(f"| {name} | {m['batch_size']} | {_f(m.get('forward_bf16_img_s'), '.0f')} | "
                  f"{_f(m.get('extract_all_bf16_img_s'), '.0f')} | {_fullft_cell(m)} | "
                  f"{m['inca_stream_bf16_img_s']:.0f} ({_f(m['inca_stream_bf16_peak_gib'])}) | "
                  f"{m['bank_size']} | {_f(m.get('forward_pure_bf16_img_s'), '.0f')} | "
                  f"{m['inca_stream_pure_bf16_img_s']:.0f} "
                  f"({_f(m['inca_stream_pure_bf16_peak_gib'])}) |")
    md += ["", "| model | target | measured | bound | met |", "|---|---|---:|---:|---|"]
    for name, m in p["models"].items():
        for key, value in ratios(m).items():
            what, bound, at_least = TARGETS[key]
            ok = value >= bound if at_least else value <= bound
            md.append(f"| {name} | {what} | {value:.2f} | {'>=' if at_least else '<='} "
                      f"{bound} | {'yes' if ok else 'no'} |")
    md += ["", "Each ratio pairs like with like: InCA's step with its backbone's float32 "
           "weights under autocast against the autocast forward, and with the frozen "
           "weights held in bfloat16 (`--backbone-dtype bfloat16`) against the forward of "
           "that bfloat16 backbone. Full fine-tuning keeps float32 master weights under "
           "autocast (the strongest eager baseline); its peak counts the trained copy, not "
           "the frozen original. Fine-tuning runs when its estimated memory (16 bytes a "
           "parameter plus activations) fits the free memory."]
    return md


def _giant_md(p: dict) -> list[str]:
    """The ViT-g-class claim: its bank's peak beside its fine-tuning."""
    g = p.get("giant")
    if g not in p["models"]:
        return []
    m = p["models"][g]
    ft = (f"{m['fullft_bf16_img_s']:.0f} img/s, peak {_f(m['fullft_bf16_peak_gib'])} GiB"
          if "fullft_bf16_img_s" in m else _fullft_cell(m))
    return ["", f"- {g} ({m['parameters'] / 1e6:.0f}M parameters): the bank over all its "
            f"blocks ({m['bank_size']} members, {m['bank_parameters'] / 1e6:.0f}M "
            f"parameters) peaks at {_f(m['inca_stream_bf16_peak_gib'])} GiB with the "
            f"float32 backbone, {_f(m['inca_stream_pure_bf16_peak_gib'])} GiB with it in "
            f"bfloat16 (target <= 24 GiB), beside full fine-tuning: {ft}."]


def _e2e_md(p: dict) -> list[str]:
    """End to end: a row per size and method, the wall-time and memory-growth targets."""
    md = ["", f"End to end ({p['e2e_model']}, {p['e2e_source']}, {p['epochs']} epochs, "
          f"batch {p['e2e_batch']}, default data pipeline; inca.fit in mode "
          f"`{p['e2e_mode']}` at every size):", "",
          "| images | method | mode | wall s | peak GiB | cache GiB |",
          "|---:|---|---|---:|---:|---:|"]
    for r in p["e2e"]:
        md.append(f"| {r['n_images']} | {r['method']} | {r['mode'] or '-'} | "
                  f"{r['wall_s']:.1f} | {_f(r['peak_gib'])} | {r['cache_gib']:.1f} |")
    walls = {(r["n_images"], r["method"]): r for r in p["e2e"]}
    sizes = sorted({r["n_images"] for r in p["e2e"]})
    big, small = sizes[-1], sizes[0]
    if (big, "full") in walls:
        md += ["", f"- inca / full wall time at {big} images: "
               f"{walls[(big, 'inca')]['wall_s'] / walls[(big, 'full')]['wall_s']:.2f} "
               "(target <= 0.4)."]
    if big != small and walls[(small, "inca")]["peak_gib"]:
        growth = walls[(big, "inca")]["peak_gib"] / walls[(small, "inca")]["peak_gib"]
        md.append(f"- inca peak memory at {big} / at {small} images: {growth:.2f} "
                  "(target <= 1.10).")
    return md
