"""``inca compare``: InCA against fine-tuning, LoRA and probes, side by side, on one split.

Every method runs in its own child process (spawned), so that its peak resident memory is
measured the same way for all: sampled during its training phase. Every method sees the
same backbone, data, split (seed 0), preprocessing and epoch budget; seeds vary the
initialisation and batch order. Costs are counted honestly: the probes and InCA share one
extraction pass (run once, in its own process, into one cache of every layer), and its
wall time and peak memory are added to each of them; fine-tuning's cost includes every
epoch's forward and backward pass.
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from inca._precision import resolve_device, resolve_precision
from inca.errors import DataError, InCAError

METHODS = ("full", "last", "lora", "linear", "multilayer", "inca")
EXPENSIVE = ("full", "last", "lora")
# What each cheap method asks of inca.fit.
_FIT_ARGS = {
    "linear": {"kinds": ("linear",), "layers": "last"},
    "multilayer": {"kinds": ("multilayer_linear",), "layers": "all"},
    "inca": {"kinds": ("inca",), "layers": "all"},
}


@dataclass
class CompareConfig:
    """What ``inca compare`` runs.

    Attributes:
        backbone: backbone spec (``dinov2_vits14``, ``timm:<name>``, ...).
        data: data spec (``fashion-mnist``, a folder, ...); its test split is the test set.
        methods: methods to compare (see :data:`METHODS`).
        epochs: the epoch budget of every method.
        limit: training samples (a seeded, class-balanced subset).
        test_limit: test samples.
        seeds: seeds of the cheap methods (probes, InCA): mean and spread are reported.
        expensive_seeds: seeds of full, last-layer and LoRA fine-tuning.
        batch_size: batch size of every method.
        lrs: learning-rate grid of the probes and InCA.
        input_size: image side (the backbone's default when ``None``).
        val_fraction: held-out share for selection and early choice of epoch.
        token_grid: pool patch tokens of the probes' and InCA's inputs to this grid.
        equal_time: also run the probes and InCA on full fine-tuning's wall time (its first
            seed's, extraction included): as many epochs as fit, at most ``max_epochs``.
            The table shows them as ``<method> @ full's time`` beside the equal-epoch rows.
        time_fraction: the share of full fine-tuning's wall time an equal-time run gets
            (0.5: half of it).
        max_epochs: the most epochs an equal-time run may take.
        checkpoint_path: local weights of the backbone (``timm:``/``torchvision:``) instead
            of the hub's.
        pretrained: load the backbone's pretrained weights (``False``: built at random, for
            trying the pipeline offline).
        device: where to run (``"auto"``: CUDA when available).
        precision: ``"32"``, ``"bf16-mixed"``, ``"16-mixed"`` or ``"auto"`` (bf16-mixed on a
            GPU), the same for every method.
        workdir: where the shared activation cache goes (a temporary folder if ``None``).
    """

    backbone: str = "dinov2_vits14"
    data: str = "fashion-mnist"
    methods: tuple[str, ...] = METHODS
    epochs: int = 3
    limit: int | None = 2000
    test_limit: int | None = 1000
    seeds: int = 3
    expensive_seeds: int = 1
    batch_size: int = 32
    lrs: tuple[float, ...] = (1e-3, 3e-3)
    input_size: int | None = None
    val_fraction: float = 0.15
    token_grid: int | None = None
    equal_time: bool = False
    time_fraction: float = 1.0
    max_epochs: int = 30
    checkpoint_path: str | None = None
    pretrained: bool = True
    device: str = "auto"
    precision: str = "auto"
    workdir: str | None = None

    def __post_init__(self) -> None:
        from inca._hints import did_you_mean

        self.methods = tuple(self.methods)
        for m in self.methods:
            if m not in METHODS:
                raise InCAError(f"unknown method {m!r}{did_you_mean(m, METHODS)}; choose from "
                                f"{', '.join(METHODS)}")
        if not self.methods or len(set(self.methods)) != len(self.methods):
            raise InCAError(f"methods must name each method once, got {list(self.methods)}")
        if self.epochs < 1 or self.seeds < 1 or self.expensive_seeds < 1:
            raise InCAError("epochs, seeds and expensive_seeds must be at least 1")
        for name in ("limit", "test_limit", "input_size", "token_grid"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise InCAError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.batch_size < 1 or self.max_epochs < 1:
            raise InCAError("batch_size and max_epochs must be at least 1")
        self.lrs = tuple(float(v) for v in self.lrs)
        if not self.lrs or not all(0 < v < float("inf") for v in self.lrs):
            raise InCAError(f"lrs must be positive numbers, got {list(self.lrs)}")
        if not 0 < self.val_fraction < 1:
            raise InCAError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if not 0 < self.time_fraction <= 10:
            raise InCAError(f"time_fraction must be in (0, 10], got {self.time_fraction}")
        if self.equal_time and "full" not in self.methods:
            raise InCAError("equal_time gives the other methods full fine-tuning's wall "
                            "time: include 'full' in the methods")
        # Resolved once, here: every method and every child process runs the same.
        device = resolve_device(self.device)
        self.device = str(device)
        self.precision = resolve_precision(self.precision, device)


@dataclass
class Run:
    """One method at one seed."""

    method: str
    seed: int
    test_accuracy: float
    val_accuracy: float
    train_seconds: float
    peak_rss_mib: float
    cuda_peak_mib: float | None
    trainable_parameters: int
    stored_bytes: int
    extra: dict[str, Any] = field(default_factory=dict)


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


def _backbone(config: CompareConfig, device: str | None = None):
    import inca

    kwargs: dict[str, Any] = {} if config.input_size is None else {
        "input_size": config.input_size}
    if not config.pretrained:  # only then: bundled backbones take no such argument
        kwargs["pretrained"] = False
    if config.checkpoint_path is not None:
        kwargs["checkpoint_path"] = config.checkpoint_path
    return inca.create_backbone(config.backbone, device=device or config.device, **kwargs)


def _setup(config: CompareConfig):
    from inca.data import load_dataset

    backbone = _backbone(config)
    train = load_dataset(config.data, split="train", limit=config.limit, seed=0)
    test = load_dataset(config.data, split="test", limit=config.test_limit, seed=0)
    return backbone, train, test


def _run_one(job: dict[str, Any]) -> list[dict[str, Any]]:
    """A child process: one method at one seed (or the shared extraction); returns dicts."""
    import torch

    from inca._memory import PeakMemory
    from inca.data import split_train_val

    config = CompareConfig(**job["config"])
    method, seed = job["method"], job["seed"]
    torch.manual_seed(seed)
    backbone, train, test = _setup(config)
    tr, val = split_train_val(train, config.val_fraction, 0)  # one split for every method
    device = torch.device(config.device)
    cache_root = Path(job["cache_root"])
    if method == "extract":
        from inca.features import extract_to_cache

        with PeakMemory(device=device) as mem:
            t = time.perf_counter()
            for name, ds in (("train", tr), ("val", val), ("test", test)):
                extract_to_cache(backbone, ds, cache_root / name, layers="all",
                                 batch_size=config.batch_size, token_grid=config.token_grid,
                                 progress=False, precision=config.precision)
            seconds = time.perf_counter() - t
        return [{"seconds": seconds, "peak_rss_mib": mem.peak_rss_mib,
                 "cuda_peak_mib": mem.cuda_peak_mib}]
    if method in EXPENSIVE:
        from inca.baselines.finetune import FineTuneConfig, finetune

        ft = FineTuneConfig(method=method, epochs=config.epochs, batch_size=config.batch_size,
                            seed=seed, precision=config.precision)
        with PeakMemory(device=device) as mem:
            t = time.perf_counter()
            res = finetune(backbone, tr, val, test, ft, progress=False)
            seconds = time.perf_counter() - t
        return [asdict(Run(method, seed, res.test_accuracy or 0.0, res.val_accuracy, seconds,
                           mem.peak_rss_mib, mem.cuda_peak_mib, res.trainable_parameters,
                           res.stored_bytes, {"epochs_run": res.epochs_run}))]

    import inca

    ext = job["extraction"]
    budget = job.get("time_budget_s")  # equal time: what is left after the extraction
    written = _manifests(cache_root)
    with PeakMemory(device=device) as mem:
        t = time.perf_counter()
        task = inca.fit(backbone, tr, val, test=test, seed=seed,
                        epochs=config.max_epochs if budget else config.epochs,
                        time_budget_s=max(budget - ext["seconds"], 1e-3) if budget else None,
                        batch_size=config.batch_size, lrs=config.lrs, patience=0,
                        token_grid=config.token_grid, progress=False, cache_dir=cache_root,
                        precision=config.precision, **_FIT_ARGS[method])
        seconds = time.perf_counter() - t
    rep = task.report
    if _manifests(cache_root) != written:  # a cache (re)written: not the shared one's
        raise InCAError("the shared activation cache was not reused; costs would count "
                        "extraction twice")
    runs = []
    names = ["best", "ensemble"] if method == "inca" else ["best"]
    for name in names:
        cand = next((c for c in rep.candidates if c["name"] == name), None)
        if cand is None:
            continue
        members = [r for r in rep.rows if r["key"] in cand["members"]]
        label = method if name == "best" else f"{method}-ensemble"
        label += " @ full's time" if budget else ""
        cuda = None if mem.cuda_peak_mib is None else max(mem.cuda_peak_mib,
                                                          ext["cuda_peak_mib"] or 0)
        runs.append(asdict(Run(
            label, seed, rep.test_accuracy[name], cand["val_accuracy"],
            ext["seconds"] + seconds, max(ext["peak_rss_mib"], mem.peak_rss_mib), cuda,
            sum(r["parameters"] for r in rep.rows),  # the whole bank was trained
            sum(r["parameters"] for r in members) * 4,  # fp32 safetensors of the chosen
            {"members": cand["members"], "extract_seconds": ext["seconds"],
             "fit_seconds": seconds, "bank_size": len(rep.rows),
             "epochs_run": rep.timings["epochs_run"]})))
    return runs


def _manifests(root: Path) -> dict[str, int]:
    """Each cache manifest under ``root`` and when it was last written: a fit that reuses
    the shared caches writes none of them."""
    return {str(p): p.stat().st_mtime_ns for p in sorted(root.glob("*/manifest.json"))}


def run_compare(config: CompareConfig, progress: bool = True) -> dict[str, Any]:
    """Run every method (each in a fresh child process) and summarise.

    A method that fails does not stop the others: its error is recorded under
    ``"failures"`` (the methods that needed it, such as the probes after a failed shared
    extraction, too) and the table holds what finished.

    Returns:
        ``{"config", "runs", "failures", "summary", "backbone", ...}``; see
        :func:`to_markdown`.
    """
    # Built once here, on the CPU: a backbone that cannot be created fails now, before any
    # child process starts; its description and size go in the report.
    backbone = _backbone(config, device="cpu")
    backbone_info = {**backbone.describe(),
                     "bytes": sum(p.numel() * p.element_size() for p in backbone.parameters())}
    del backbone
    from inca.data import has_split, load_dataset

    if not has_split(config.data, "test"):
        raise DataError(f"{config.data} has no test split of its own: compare scores every "
                           "method on held-out test data (a test/ folder beside train/, or a "
                           "data set with a test split)")
    for split, limit in (("train", config.limit), ("test", config.test_limit)):
        load_dataset(config.data, split=split, limit=limit, seed=0)  # read, or refused, now
    runs: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []

    def failed(job: dict[str, Any], error: str) -> None:
        label = job["method"] + (" @ full's time" if job.get("equal_time") else "")
        failures.append({"method": label, "seed": job["seed"], "error": error})
        if progress:
            print(f"  {label} seed {job['seed']} failed: {error}", flush=True)

    extraction: dict[str, Any] = {}
    extraction_error = None
    with tempfile.TemporaryDirectory(prefix="inca-compare-") as tmp:
        root = Path(config.workdir or tmp) / "cache"
        base = {"config": asdict(config), "cache_root": str(root)}
        cheap = [m for m in config.methods if m not in EXPENSIVE]
        if cheap:
            if progress:
                print("extracting every layer once for " + ", ".join(cheap), flush=True)
            try:
                extraction = _in_child({**base, "method": "extract", "seed": 0})[0]
            except Exception as e:  # noqa: BLE001 - recorded against every method needing it
                extraction_error = f"the shared extraction failed: {_error_text(e)}"
                if progress:
                    print(f"  {extraction_error}", flush=True)
        jobs = []
        for method in sorted(config.methods, key=lambda m: m != "full"):  # full first
            n = config.expensive_seeds if method in EXPENSIVE else config.seeds
            jobs += [{**base, "method": method, "seed": s, "extraction": extraction}
                     for s in range(n)]
        if config.equal_time:  # after full, whose wall time they are given
            jobs += [{**job, "equal_time": True} for job in jobs if job["method"] in cheap]
        for i, job in enumerate(jobs):
            if progress:
                print(f"[{i + 1}/{len(jobs)}] {job['method']} seed {job['seed']}"
                      + (" (full's time)" if job.get("equal_time") else ""), flush=True)
            if extraction_error and job["method"] in cheap:
                failed(job, extraction_error)
                continue
            if job.get("equal_time"):
                full = min((r for r in runs if r["method"] == "full"), key=lambda r: r["seed"],
                           default=None)
                if full is None:
                    failed(job, "needs full fine-tuning's wall time, and full fine-tuning "
                                "failed")
                    continue
                job = {**job, "time_budget_s": config.time_fraction * full["train_seconds"]}
            try:
                runs += _in_child(job)
            except Exception as e:  # noqa: BLE001 - one method's failure is reported, not fatal
                failed(job, _error_text(e))
    return {"config": asdict(config), "runs": runs, "failures": failures,
            "extraction": extraction, "settings": method_settings(config),
            "time_budget_s": next((config.time_fraction * r["train_seconds"] for r in runs
                                   if r["method"] == "full" and r["seed"] == 0), None),
            "backbone": backbone_info,
            "summary": summarise(runs, backbone_info["bytes"])}


def _in_child(job: dict[str, Any]) -> list[dict[str, Any]]:
    """:func:`_run_one` in a fresh (spawned) process: the peak memory of this job alone.
    Not a multiprocessing.Pool, whose daemonic workers may not start the data-loading
    workers every method uses."""
    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(_run_one, job).result()


def _error_text(error: BaseException) -> str:
    """One line for a child's error: its type and message (the child's traceback is not
    the reader's business; a crash that killed the process says so)."""
    from concurrent.futures.process import BrokenProcessPool

    if isinstance(error, BrokenProcessPool):
        return ("its process died (out of memory, or killed): "
                + (str(error) or type(error).__name__))
    text = " ".join(line.strip() for line in str(error).strip().splitlines())
    if len(text) > 600:
        text = text[:600] + " ..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


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
    full = next((r for r in rows if r["method"] == "full"), None)
    for r in rows:
        if full:
            r["time_vs_full"] = r["train_seconds"] / full["train_seconds"]
            r["memory_vs_full"] = r["peak_rss_mib"] / full["peak_rss_mib"]
            r["storage_vs_full"] = r["stored_bytes"] / full["stored_bytes"]
            r["accuracy_minus_full"] = r["test_accuracy_mean"] - full["test_accuracy_mean"]
    return rows


def to_markdown(result: dict[str, Any], command: str = "") -> str:
    """The comparison table."""
    c = result["config"]
    has_full = any("time_vs_full" in r for r in result["summary"])
    lines = [
        f"# inca compare: {result['backbone']['name']} on {c['data']}",
        "",
        *([f"Command: `{command}`  "] if command else []),
        f"{c['limit']} training images ({c['val_fraction']:.0%} held out for validation), "
        f"{c['test_limit']} test images, {c['epochs']} epochs for every method, batch "
        f"{c['batch_size']}, device {c['device']}, precision {c.get('precision', '32')}. "
        "Accuracy: mean ± std over the seeds shown. "
        "Costs: the first seed's run, each method in its own process; the probes and InCA "
        f"include the shared extraction pass ({result['extraction'].get('seconds', 0):.1f} s).",
        "",
        "| method | seeds | test acc | Δ vs full | train s | time vs full | peak RSS MiB | "
        "memory vs full | trainable params | stored per task | % of backbone |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["summary"]:
        def ratio(key: str, row: dict[str, Any] = r) -> str:
            return f"{row[key]:.3f}" if has_full and key in row else "n/a"

        delta = f"{100 * r['accuracy_minus_full']:+.2f}" if "accuracy_minus_full" in r else "n/a"
        lines.append(
            f"| {r['method']} | {r['seeds']} | {100 * r['test_accuracy_mean']:.2f} ± "
            f"{100 * r['test_accuracy_std']:.2f} | {delta} | {r['train_seconds']:.1f} | "
            f"{ratio('time_vs_full')} | {r['peak_rss_mib']:.0f} | {ratio('memory_vs_full')} | "
            f"{r['trainable_parameters']:,} | {_size(r['stored_bytes'])} | "
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


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def plot(result: dict[str, Any], path: str | Path) -> Path:
    """Accuracy against training cost, one point per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for r in result["summary"]:
        ax.errorbar(r["train_seconds"], 100 * r["test_accuracy_mean"],
                    yerr=100 * r["test_accuracy_std"], fmt="o", capsize=3)
        ax.annotate(r["method"], (r["train_seconds"], 100 * r["test_accuracy_mean"]),
                    textcoords="offset points", xytext=(5, 5), fontsize=8)
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
