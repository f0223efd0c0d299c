"""One ``inca compare`` job in a child process of its own: one method at one seed (or the
shared extraction), timed, its peak memory sampled while it trains.

A fresh spawned process per job measures each method's peak resident memory the same way,
and a crash (out of memory, killed) is that job's failure, not the comparison's.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from inca.baselines.compare_config import EXPENSIVE, CompareConfig
from inca.errors import InCAError

# What each cheap method asks of inca.fit.
FIT_ARGS = {
    "linear": {"kinds": ("linear",), "layers": "last"},
    "multilayer": {"kinds": ("multilayer_linear",), "layers": "all"},
    "inca": {"kinds": ("inca",), "layers": "all"},
}


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


@dataclass(frozen=True)
class Extraction:
    """What the shared extraction of every layer cost (added to each method reading it)."""

    seconds: float
    peak_rss_mib: float
    cuda_peak_mib: float | None


@dataclass(frozen=True)
class Job:
    """One child process's work: ``method`` at ``seed``, or (``method="extract"``) the
    shared extraction, into and from the caches under ``cache_root``."""

    config: CompareConfig
    method: str
    seed: int
    cache_root: Path
    extraction: Extraction | None = None  # the shared one, for the methods reading its cache
    equal_time: bool = False  # a cheap method again, given full fine-tuning's wall time
    time_budget_s: float | None = None  # that time, once full fine-tuning has run

    @property
    def label(self) -> str:
        """The method as the results name it."""
        return self.method + (" @ full's time" if self.equal_time else "")


def backbone_for(config: CompareConfig, device: str | None = None):
    """The compared backbone, created as ``config`` asks, on ``device`` (its own by
    default)."""
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

    backbone = backbone_for(config)
    train = load_dataset(config.data, split="train", limit=config.limit, seed=0)
    test = load_dataset(config.data, split="test", limit=config.test_limit, seed=0)
    return backbone, train, test


def _run_one(job: Job) -> list[Run] | Extraction:
    """A child process: one method at one seed, or the shared extraction."""
    import torch

    from inca.data import split_train_val

    config = job.config
    torch.manual_seed(job.seed)
    backbone, train, test = _setup(config)
    tr, val = split_train_val(train, config.val_fraction, 0)  # one split for every method
    splits = {"train": tr, "val": val, "test": test}
    if job.method == "extract":
        return _run_extract(config, backbone, splits, job.cache_root)
    if job.method in EXPENSIVE:
        return _run_finetune(config, backbone, splits, job.method, job.seed)
    return _run_fit(config, backbone, splits, job)


def _run_extract(config: CompareConfig, backbone: Any, splits: dict[str, Any],
                 cache_root: Path) -> Extraction:
    """The shared extraction of every split's activations, timed."""
    import torch

    from inca._memory import PeakMemory
    from inca.features import extract_to_cache

    with PeakMemory(device=torch.device(config.device)) as mem:
        t = time.perf_counter()
        for name, ds in splits.items():
            extract_to_cache(backbone, ds, cache_root / name, layers="all",
                             batch_size=config.batch_size, token_grid=config.token_grid,
                             progress=False, precision=config.precision)
        seconds = time.perf_counter() - t
    return Extraction(seconds, mem.peak_rss_mib, mem.cuda_peak_mib)


def _run_finetune(config: CompareConfig, backbone: Any, splits: dict[str, Any],
                  method: str, seed: int) -> list[Run]:
    """Full or LoRA fine-tuning at one seed."""
    import torch

    from inca._memory import PeakMemory
    from inca.baselines.finetune import FineTuneConfig, finetune

    ft = FineTuneConfig(method=method, epochs=config.epochs, batch_size=config.batch_size,
                        seed=seed, precision=config.precision)
    with PeakMemory(device=torch.device(config.device)) as mem:
        t = time.perf_counter()
        res = finetune(backbone, splits["train"], splits["val"], splits["test"], ft,
                       progress=False)
        seconds = time.perf_counter() - t
    return [Run(method, seed, res.test_accuracy or 0.0, res.val_accuracy, seconds,
                mem.peak_rss_mib, mem.cuda_peak_mib, res.trainable_parameters,
                res.stored_bytes, {"epochs_run": res.epochs_run})]


def _run_fit(config: CompareConfig, backbone: Any, splits: dict[str, Any],
             job: Job) -> list[Run]:
    """``inca.fit`` (InCA or a probe) on the shared cache: its best adapter, and for InCA
    its ensemble, each costed with the shared extraction."""
    import torch

    import inca
    from inca._memory import PeakMemory

    method, seed, cache_root, budget = job.method, job.seed, job.cache_root, job.time_budget_s
    ext = job.extraction  # equal time (budget): what is left after the extraction
    if ext is None:
        raise InCAError(f"{method} reads the shared extraction's cache, and none was made")
    written = _manifests(cache_root)
    with PeakMemory(device=torch.device(config.device)) as mem:
        t = time.perf_counter()
        task = inca.fit(backbone, splits["train"], splits["val"], test=splits["test"],
                        seed=seed, epochs=config.max_epochs if budget else config.epochs,
                        time_budget_s=max(budget - ext.seconds, 1e-3) if budget else None,
                        batch_size=config.batch_size, lrs=config.lrs, patience=0,
                        token_grid=config.token_grid, progress=False, cache_dir=cache_root,
                        precision=config.precision, **FIT_ARGS[method])
        seconds = time.perf_counter() - t
    rep = task.report
    if _manifests(cache_root) != written:  # a cache (re)written: not the shared one's
        raise InCAError("the shared activation cache was not reused; costs would count "
                        "extraction twice")
    runs = []
    for name in ["best", "ensemble"] if method == "inca" else ["best"]:
        cand = next((c for c in rep.candidates if c["name"] == name), None)
        if cand is None:
            continue
        members = [r for r in rep.rows if r["key"] in cand["members"]]
        label = method if name == "best" else f"{method}-ensemble"
        label += " @ full's time" if job.equal_time else ""
        cuda = None if mem.cuda_peak_mib is None else max(mem.cuda_peak_mib,
                                                          ext.cuda_peak_mib or 0)
        runs.append(Run(
            label, seed, rep.test_accuracy[name], cand["val_accuracy"],
            ext.seconds + seconds, max(ext.peak_rss_mib, mem.peak_rss_mib), cuda,
            sum(r["parameters"] for r in rep.rows),  # the whole bank was trained
            sum(r["parameters"] for r in members) * 4,  # fp32 safetensors of the chosen
            {"members": cand["members"], "extract_seconds": ext.seconds,
             "fit_seconds": seconds, "bank_size": len(rep.rows),
             "epochs_run": rep.timings["epochs_run"]}))
    return runs


def _manifests(root: Path) -> dict[str, int]:
    """Each cache manifest under ``root`` and when it was last written: a fit that reuses
    the shared caches writes none of them."""
    return {str(p): p.stat().st_mtime_ns for p in sorted(root.glob("*/manifest.json"))}


def run_in_child(job: Job) -> list[Run] | Extraction:
    """:func:`_run_one` in a fresh (spawned) process: the peak memory of this job alone.
    Not a multiprocessing.Pool, whose daemonic workers may not start the data-loading
    workers every method uses."""
    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(_run_one, job).result()


def error_text(error: BaseException) -> str:
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
