"""``inca.fit``: extract once, train the whole bank in parallel, select, return a Task."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from inca._distributed import Dist, context
from inca._precision import Precision, resolve_device
from inca.adapters import parameter_report
from inca.backbones.base import Backbone
from inca.errors import InCAError
from inca.features import extract_to_cache, token_shapes
from inca.task import Task, selection_key
from inca.training.bank import AdapterBank
from inca.training.config import FitConfig
from inca.training.loop import BankResult, train_bank
from inca.training.mode import ModeChoice, choose_mode
from inca.training.plan import MemberSpec
from inca.training.probe import probe_baseline, probe_features
from inca.training.report import build_report
from inca.training.scoring import (
    accuracy,
    task_confusion,
    test_accuracies,
    validation_confusion,
)
from inca.training.selection import Candidate, best_member, soups, top_k_ensemble
from inca.training.sources import CachedSource, StreamingSource

# under torchrun, every rank must run the same backbone
_SAME_WEIGHTS = ("give every rank the same pretrained weights or --checkpoint (random "
                 "weights differ per process)")

def _indices_of(part: Any, parent: Any) -> np.ndarray:
    idx = getattr(part, "indices", None)
    if idx is None:
        raise InCAError("a validation split must carry .indices into its parent data set")
    return np.asarray(idx, dtype=np.int64)


def _splits(train: Any, val: Any, test: Any, config: FitConfig) -> dict[str, tuple[Any, Any]]:
    """``{split: (data set, indices into it)}``; validation split off ``train`` if not given.
    Validation and test labels are matched to the training classes by name."""
    from inca.data import align_classes, split_train_val

    val = None if val is None else align_classes(val, train.classes)
    test = None if test is None else align_classes(test, train.classes)
    if val is None:
        train_part, val_part = split_train_val(train, config.val_fraction, config.seed)
        splits = {"train": (train, _indices_of(train_part, train)),
                  "val": (train, _indices_of(val_part, train))}
    else:
        splits = {"train": (train, np.arange(len(train))), "val": (val, np.arange(len(val)))}
    if test is not None:
        splits["test"] = (test, np.arange(len(test)))
    return splits


def _sources(backbone: Backbone, splits: dict[str, tuple[Any, Any]], layers: list[str],
             config: FitConfig, mode: str, cache_dir: Path, progress: bool,
             num_workers: int | None, precision: Precision) -> tuple[dict[str, Any], float]:
    """A source per split, and the seconds spent extracting (cached mode)."""
    from inca.data import build_transform

    if mode == "streaming":
        out = {}
        for name, (ds, idx) in splits.items():
            tf = build_transform(backbone.preprocessing,
                                 config.augment if name == "train" else "none")
            out[name] = StreamingSource(backbone, ds, idx, layers, tf, config.token_grid,
                                        num_workers, precision)
        return out, 0.0

    caches: dict[int, Any] = {}
    t = time.perf_counter()
    for name, (ds, _) in splits.items():
        if id(ds) not in caches:
            caches[id(ds)] = extract_to_cache(
                backbone, ds, cache_dir / name, layers=layers, token_grid=config.token_grid,
                dtype=config.cache_dtype, batch_size=config.batch_size,
                num_workers=num_workers, progress=progress, precision=precision)
    extract_s = time.perf_counter() - t
    # Tokens go to the device in the cache's 16 bits, converted there to the compute dtype.
    return {name: CachedSource(caches[id(ds)], idx, layers, backbone.device,
                               precision.compute_dtype, num_workers)
            for name, (ds, idx) in splits.items()}, extract_s


def _task_from(candidate: Candidate, bank: AdapterBank, result: BankResult, classes: list[str],
               backbone: Backbone, config: FitConfig) -> Task:
    states = candidate.states or [result.members[i].state for i in candidate.member_indices]
    members = [bank.export(i, s) for i, s in zip(candidate.member_indices, states, strict=True)]
    return Task(
        members, [list(bank.specs[i].layers) for i in candidate.member_indices], classes,
        backbone.describe(), token_grid=config.token_grid, backbone=backbone,
        precision=config.precision,
        keys=[candidate.name if candidate.states else bank.specs[i].key
              for i in candidate.member_indices],
    )


def fit(
    backbone: Backbone,
    train: Any,
    val: Any = None,
    *,
    test: Any = None,
    config: FitConfig | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    num_workers: int | None = None,
    device: str | torch.device | None = "auto",
    **overrides: Any,
) -> Task:
    """Train a bank of adapters on a frozen backbone and return the selected task.

    The backbone is moved to ``device``; extraction, training and scoring run there in
    ``config.precision`` (bf16-mixed by default on a GPU). Don't wrap ``fit`` in
    ``torch.autocast`` yourself: set the precision instead.

    Args:
        backbone: the frozen backbone.
        train: training data: an :class:`inca.data.ImageDataset`, or anything
            :func:`inca.data.as_image_dataset` takes (torchvision and Hugging Face data
            sets, lists of ``(image, label)`` pairs, names and paths).
        val: validation data; by default a seeded, stratified split of ``train``.
        test: optional held-out data, evaluated for the report only (never for selection).
        config: a :class:`FitConfig`; keyword ``overrides`` change its fields.
        cache_dir: where the activation caches go (cached mode); a temporary folder when
            omitted. Reusing a folder reuses (or resumes) its caches.
        progress: show progress bars.
        num_workers: data-loading workers decoding images (default: the cores but one, at
            most 8) or reading the cache (default: none on a CPU, 2 on a GPU; see
            :class:`~inca.training.sources.CachedSource`).
        device: where to run: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``,
            ``"cuda:1"``...; ``None`` keeps the backbone where it is.
        **overrides: fields of :class:`FitConfig`, e.g. ``epochs=5, precision="bf16-mixed"``.

    Returns:
        The :class:`~inca.task.Task` chosen on validation (the best adapter, or
        the top-k ensemble when it is better), with ``task.report`` describing every
        adapter of the bank.

    Example:
        >>> import inca
        >>> from inca.data import load_dataset
        >>> bb = inca.create_backbone("dinov2_vits14")  # doctest: +SKIP
        >>> task = inca.fit(bb, load_dataset("fashion-mnist", limit=1000),
        ...                 layers="all", epochs=10)  # doctest: +SKIP
        >>> task.report.to_markdown()  # doctest: +SKIP
    """
    ctx = context()  # one process, or one rank of torchrun's N
    progress = progress and ctx.is_main
    config, precision = _settle(backbone, config, overrides, device, ctx)
    layers = backbone.resolve_layers(config.layers)
    from inca.data import as_image_dataset  # torchvision, Hugging Face, lists of pairs ...

    train, val, test = (None if d is None else as_image_dataset(d, split=s)
                        for d, s in ((train, "train"), (val, "val"), (test, "test")))
    classes = list(train.classes)
    shapes = token_shapes(backbone, layers, config.token_grid)
    splits = _splits(train, val, test, config)
    with _cache_root(cache_dir, ctx) as root:
        mode = _mode(backbone, splits, shapes, config, root, ctx, progress)
        sources, extract_s = _sources(backbone, splits, layers, config, mode.mode, root,
                                      progress, num_workers, precision)
        train_src, val_src, test_src = sources["train"], sources["val"], sources.get("test")

        n_params = sum(p.numel() for p in backbone.parameters())
        specs, bank = _build_bank(backbone, layers, config, shapes, len(classes), n_params)
        result = train_bank(bank, train_src, val_src, config, progress=progress,
                            precision=precision)

        candidates = _candidates(bank, result, val_src, config, precision)
        chosen = min(candidates, key=lambda c: c.key(config.select_by))
        task = _task_from(chosen, bank, result, classes, backbone, config)

        baseline = _linear_probe_baseline(bank, result, layers, config.select_by)
        tests, member_tests, per_class = _evaluate(
            task, bank, result, candidates, chosen, baseline, test_src, val_src, classes,
            backbone, config, precision)
        probe = _probe(mode.mode, train_src, val_src, test_src, layers, backbone, classes,
                       config, ctx)

    params = [parameter_report(bank.export(i), n_params) for i in range(len(specs))]
    report = build_report(
        backbone=backbone.describe(), config=config, specs=specs, result=result,
        params=params, candidates=candidates, chosen=chosen, baseline=baseline, tests=tests,
        extract_seconds=extract_s, num_train=len(train_src), num_val=len(val_src),
        mode={"mode": mode.mode, "reason": mode.reason, "cache_bytes": mode.cache_bytes},
        member_tests=member_tests, probe=probe, per_class=per_class,
        num_test=None if test_src is None else len(test_src),
        device=backbone.device,
        classes=classes, task_parameters=task.num_parameters(),
    )
    task.metrics = report.summary()
    task.report = report
    return task


def _settle(backbone: Backbone, config: FitConfig | None, overrides: dict[str, Any],
            device: str | torch.device | None, ctx: Dist) -> tuple[FitConfig, Precision]:
    """The config with its overrides, checked; the backbone on its device (the same weights
    on every rank); the precision resolved there, and recorded in the config."""
    config = replace(config or FitConfig(), **overrides) if overrides else (config or FitConfig())
    config.__post_init__()
    if device is not None:
        backbone.to(resolve_device(ctx.device(device)))
    ctx.agree(backbone.fingerprint(), "backbone weights", _SAME_WEIGHTS)
    precision = Precision(config.precision, backbone.device)
    return replace(config, precision=precision.name), precision


def _mode(backbone: Backbone, splits: dict[str, Any], shapes: dict[str, tuple[int, int]],
          config: FitConfig, root: Path, ctx: Dist, progress: bool) -> ModeChoice:
    """Cached or streaming: rank 0's choice, made on its disk and device, for every rank."""
    images = sum(len(ds) for ds in {id(ds): ds for ds, _ in splits.values()}.values())
    mode = ctx.broadcast_object(
        choose_mode(config, shapes, backbone.num_prefix_tokens, images, root,
                    backbone.device) if ctx.is_main else None)
    if progress:
        tqdm.write(f"mode: {mode.mode} ({mode.reason})")
    return mode


def _candidates(bank: AdapterBank, result: BankResult, val: Any, config: FitConfig,
                precision: Precision) -> list[Candidate]:
    """What the task may be: the best member, the top-k ensemble, the soups."""
    candidates = [best_member(result, config.select_by)]
    if len(result.members) > 1 and config.ensemble_k > 1:
        candidates.append(top_k_ensemble(result, config.ensemble_k, config.select_by))
    if config.soup:
        candidates += soups(bank, result, val, config.batch_size, precision)
    return candidates


def _build_bank(backbone: Backbone, layers: list[str], config: FitConfig,
                shapes: dict[str, tuple[int, int]], num_classes: int, backbone_params: int
                ) -> tuple[list[MemberSpec], AdapterBank]:
    """The members planned for ``layers`` and their adapters, stacked into a bank on the
    backbone's device."""
    bank = AdapterBank.from_plan(layers, config,
                                 embed_dims={k: backbone.embed_dims[k] for k in layers},
                                 token_counts={k: n for k, (n, _) in shapes.items()},
                                 num_classes=num_classes,
                                 num_prefix_tokens=backbone.num_prefix_tokens,
                                 backbone_params=backbone_params)
    return bank.specs, bank.to(backbone.device)


def _evaluate(task: Task, bank: AdapterBank, result: BankResult, candidates: list[Candidate],
              chosen: Candidate, baseline: int | None, test_src: Any, val_src: Any,
              classes: list[str], backbone: Backbone, config: FitConfig, precision: Precision
              ) -> tuple[dict[str, float], list[float] | None, dict[str, Any]]:
    """Test accuracies of every candidate and of the linear-probe baseline, every member's,
    and the chosen task's confusion matrix (on test, else on validation: from what training
    kept, unless a soup was chosen)."""
    if test_src is None:
        return {}, None, {"split": "validation", "confusion": validation_confusion(
            task, result, chosen, val_src, config.batch_size, len(classes)).tolist()}
    tests, member_tests, confusion = test_accuracies(
        bank, result, candidates, test_src, config.batch_size, precision, chosen, len(classes))
    if baseline is not None:
        tests["linear_probe"] = member_tests[baseline]
    for c in candidates:
        if c.states:  # soups
            soup = task if c is chosen else _task_from(c, bank, result, classes, backbone,
                                                       config)
            matrix = task_confusion(soup, test_src, config.batch_size, len(classes))
            tests[c.name] = accuracy(matrix)
            confusion = matrix if c is chosen else confusion
    return tests, member_tests, {"split": "test", "confusion": confusion.tolist()}


@contextmanager
def _cache_root(cache_dir: str | Path | None, ctx: Dist) -> Iterator[Path]:
    """``cache_dir``, or a temporary folder (rank 0's, shared with the other ranks of one
    node; ranks on several nodes need a ``cache_dir`` on storage they all see)."""
    if cache_dir is not None:
        yield Path(cache_dir)
        return
    tmp = tempfile.mkdtemp(prefix="inca-cache-") if ctx.is_main else None
    tmp = ctx.broadcast_object(tmp)
    try:
        yield Path(tmp)
    finally:
        ctx.barrier()
        if ctx.is_main:
            shutil.rmtree(tmp, ignore_errors=True)


def _linear_probe_baseline(bank: AdapterBank, result: BankResult, layers: list[str],
                           select_by: str) -> int | None:
    """The best last-layer linear probe of the bank (over the lr grid), if there is one."""
    idx = [i for i, s in enumerate(bank.specs) if s.kind == "linear" and s.layers == (layers[-1],)]
    if not idx:
        return None
    m = result.members
    return min(idx, key=lambda i: (*selection_key(m[i].val_accuracy, m[i].val_loss, select_by),
                                   i))


def _probe(mode: str, train: Any, val: Any, test: Any, layers: list[str], backbone: Backbone,
           classes: list[str], config: FitConfig, ctx: Dist) -> dict[str, Any]:
    """The logistic-regression baseline (:mod:`inca.training.probe`) on cached features,
    fitted by rank 0 (every rank reads the whole cache) and shared with the others. A
    baseline never fails a fit: what went wrong is recorded instead."""
    if mode == "streaming":
        return {"skipped": "streaming mode: no cached features (the probe would cost "
                           "another backbone pass over the data)"}
    probe = None
    if ctx.is_main:
        try:
            probe = probe_baseline(
                train, val, test, layers, probe_features(backbone.num_prefix_tokens,
                                                         config.adapter_options),
                len(classes), select_by=config.select_by, batch_size=config.batch_size,
                seed=config.seed, device=backbone.device)
        except (InCAError, ValueError, RuntimeError) as e:
            probe = {"skipped": f"failed: {e}"}
    return ctx.broadcast_object(probe)
