"""The baseline a practitioner would run: a multinomial logistic regression fitted to
convergence on each layer's pooled features, as scikit-learn users run it.

The bank's own ``linear`` members train by SGD for the bank's epochs, which can leave them
far from converged (43.3% where a tuned logistic regression scored 71.1% on the same
features): a report whose baseline is under-trained overstates InCA's margin. This probe is
fitted by L-BFGS on the full (cached) training features, its L2 penalty chosen on validation
from :data:`L2_GRID`, on every layer; the report shows it on the last layer and on the best
layer by validation.

Bounded for big data: at most :data:`MAX_FIT_SAMPLES` training samples (a seeded random
subset beyond) and as many validation samples are held in memory (16 bits, on the CPU),
and each penalty gets at most :data:`MAX_ITER` L-BFGS iterations (warm-started from the
previous, stronger penalty). Test samples are scored by streaming, all of them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from inca.adapters import LinearConfig
from inca.adapters.linear import linear_features
from inca.task import selection_key
from inca.training.plan import kind_options

L2_GRID = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5)  # penalty on the mean loss; strongest first
MAX_ITER = 100  # L-BFGS iterations per penalty (warm-started: the path converges)
MAX_FIT_SAMPLES = 10_000  # training (and validation) samples held for the fits

METHOD = "multinomial logistic regression (L-BFGS, full batch), L2 chosen on validation"


def probe_features(num_prefix_tokens: int, options: dict[str, Any] | None) -> LinearConfig:
    """The pooled feature the bank's ``linear`` members read (CLS ⊕ mean patch token,
    standardized; the mean patch token alone for CNN layers)."""
    opts = kind_options("linear", options)
    pool = opts.get("pool", "cls_mean" if num_prefix_tokens else "mean")
    return LinearConfig(pool=pool, num_prefix_tokens=num_prefix_tokens,
                        norm=opts.get("norm", True))


@torch.no_grad()
def pooled(source: Any, layers: list[str], features: LinearConfig, batch_size: int,
           keep: int = MAX_FIT_SAMPLES, seed: int = 0
           ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Every layer's pooled features ``{layer: (n, F)}`` (float16, CPU) and labels ``(n,)``
    of ``source``, or of a seeded random ``keep`` of its samples."""
    n = len(source)
    wanted = np.ones(n, dtype=bool)
    if n > keep:
        wanted[:] = False
        wanted[np.random.default_rng(seed).choice(n, keep, replace=False)] = True
    feats: dict[str, list[torch.Tensor]] = {k: [] for k in layers}
    labels, start = [], 0
    for batch, y in source.batches(batch_size):  # in order: positions start, start+1, ...
        rows = torch.from_numpy(np.flatnonzero(wanted[start:start + len(y)]))
        start += len(y)
        if len(rows):
            for k in layers:
                f = linear_features(batch[k][rows.to(batch[k].device)].float(), features)
                feats[k].append(f.half().cpu())
            labels.append(y.cpu()[rows])
    return {k: torch.cat(v) for k, v in feats.items()}, torch.cat(labels)


def fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float,
                 init: tuple[torch.Tensor, torch.Tensor] | None = None,
                 max_iter: int = MAX_ITER) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Weights ``(F, C)``, bias ``(C,)`` and L-BFGS iterations minimising the mean
    cross-entropy of ``x @ W + b`` plus ``l2 / 2 * |W|²`` (the bias is not penalized, as
    in scikit-learn's ``LogisticRegression(C=1 / (l2 * n))``)."""
    w0, b0 = init or (x.new_zeros(x.shape[1], num_classes), x.new_zeros(num_classes))
    w, b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-5, tolerance_change=1e-10,
                            line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + 0.5 * l2 * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad(), _threads(1 if x.is_cpu and x.numel() * num_classes < 2**22
                                        else None):
        opt.step(objective)
    return w.detach(), b.detach(), int(opt.state[w].get("n_iter", 0))


@contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """Run with ``n`` CPU threads (``None``: as set). A small problem's L-BFGS step is
    many tiny operations, which waiting on other threads slows tenfold and more on a
    busy machine."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _scores(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor
            ) -> tuple[float, float]:
    logits = x @ w + b
    return (float((logits.argmax(-1) == y).float().mean()),
            float(F.cross_entropy(logits, y)))


def _standardize(x: torch.Tensor, mu: torch.Tensor, sd: torch.Tensor) -> torch.Tensor:
    return (x - mu) / sd


def fit_layer(x: torch.Tensor, y: torch.Tensor, xv: torch.Tensor, yv: torch.Tensor,
              num_classes: int, select_by: str) -> dict[str, Any]:
    """The logistic regression of one layer at the penalty of :data:`L2_GRID` that
    validation prefers: its record and its fitted state (``"_state"``)."""
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)  # per-feature, from the training samples
    x, xv = _standardize(x, mu, sd), _standardize(xv, mu, sd)
    best: dict[str, Any] | None = None
    init = None
    for l2 in L2_GRID:
        w, b, iters = fit_logistic(x, y, num_classes, l2, init)
        init = (w, b)
        acc, loss = _scores(xv, yv, w, b)
        if best is None or selection_key(acc, loss, select_by) < selection_key(
                best["val_accuracy"], best["val_loss"], select_by):
            best = {"l2": l2, "val_accuracy": acc, "val_loss": loss, "iterations": iters,
                    "_state": (w, b, mu, sd)}
    assert best is not None
    return best


def probe_baseline(train: Any, val: Any, test: Any | None, layers: list[str],
                   features: LinearConfig, num_classes: int, *, select_by: str,
                   batch_size: int, seed: int = 0, device: torch.device | str = "cpu"
                   ) -> dict[str, Any]:
    """Fit the probe on every layer and report it on the last layer and on the best layer
    by validation (test accuracy of both when ``test`` is given).

    Returns:
        ``{"method", "pool", "l2_grid", "max_iter", "train_samples", "val_samples",
        "seconds", "per_layer": [...], "last_layer": {...}, "best_layer": {...}}``, each
        layer's record holding ``layer``, ``l2``, ``val_accuracy``, ``val_loss``,
        ``iterations`` (and ``test_accuracy``).
    """
    start = time.perf_counter()
    xs, y = pooled(train, layers, features, batch_size, seed=seed)
    vs, yv = pooled(val, layers, features, batch_size, seed=seed + 1)
    y, yv = y.to(device), yv.to(device)
    fits = {}
    for k in layers:
        fits[k] = fit_layer(xs[k].to(device).float(), y, vs[k].to(device).float(), yv,
                            num_classes, select_by)
        fits[k]["layer"] = k
    best = min(layers, key=lambda k: selection_key(fits[k]["val_accuracy"],
                                                   fits[k]["val_loss"], select_by))
    chosen = {"last_layer": fits[layers[-1]], "best_layer": fits[best]}
    if test is not None:
        tested = _test_accuracy(test, {k: fits[k]["_state"] for k in {layers[-1], best}},
                                features, batch_size, device)
        for rec in chosen.values():
            rec["test_accuracy"] = tested[rec["layer"]]
    public = [{k: v for k, v in f.items() if not k.startswith("_")} for f in fits.values()]
    return {"method": METHOD, "pool": features.pool, "l2_grid": list(L2_GRID),
            "max_iter": MAX_ITER, "train_samples": len(y), "val_samples": len(yv),
            "seconds": time.perf_counter() - start, "per_layer": public,
            **{name: {k: v for k, v in rec.items() if not k.startswith("_")}
               for name, rec in chosen.items()}}


@torch.no_grad()
def _test_accuracy(source: Any, states: dict[str, tuple], features: LinearConfig,
                   batch_size: int, device: torch.device | str) -> dict[str, float]:
    """Test accuracy of each layer's fitted probe, streamed over every test sample."""
    correct = dict.fromkeys(states, 0)
    seen = 0
    for batch, y in source.batches(batch_size):
        y = y.to(device)
        for k, (w, b, mu, sd) in states.items():
            x = linear_features(batch[k].to(device).float(), features).half().float()
            correct[k] += int(((_standardize(x, mu, sd) @ w + b).argmax(-1) == y).sum())
        seen += len(y)
    return {k: c / max(seen, 1) for k, c in correct.items()}
