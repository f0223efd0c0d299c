"""The training loop of a bank: one pass over the data feeds every adapter."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from inca._distributed import context
from inca._precision import Precision
from inca._progress import progress_bar
from inca.errors import TrainingError
from inca.task import selection_key
from inca.training.bank import AdapterBank
from inca.training.config import FitConfig
from inca.training.evaluation import Predictions, bank_precision, evaluate
from inca.training.loss import bank_loss
from inca.training.schedule import cosine_with_warmup
from inca.training.sources import batch_order


@dataclass
class MemberResult:
    """How one member of the bank did: its best epoch on validation, and that state."""

    key: str
    val_accuracy: float = -1.0
    val_loss: float = float("inf")
    best_epoch: int = -1
    diverged_epoch: int | None = None  # dropped then: its loss became NaN or infinite
    state: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)


@dataclass
class BankResult:
    """Outcome of :func:`train_bank`.

    ``ensembles`` holds the validation ``(accuracy, loss)`` of the top-j members' averaged
    best-epoch probabilities, keyed by their indices, for every j up to
    ``config.ensemble_k`` (the ranking of :func:`ensemble_members`): what the top-k
    ensemble needs, without keeping any member's probabilities. ``predictions`` holds
    their argmax on validation (each member's at its best epoch, and those ensembles'), for
    the chosen one's confusion matrix without another pass; ``None`` when a pass did not
    keep them.
    """

    members: list[MemberResult]
    history: list[dict[str, Any]]
    epochs_run: int
    train_seconds: float
    ensembles: dict[tuple[int, ...], tuple[float, float]] = field(default_factory=dict)
    predictions: Predictions | None = field(default=None, repr=False)


def rank_members(members: list[MemberResult], select_by: str = "loss") -> list[int]:
    """Member indices from best to worst on validation (see ``FitConfig.select_by``)."""
    return sorted(range(len(members)), key=lambda i: (
        *selection_key(members[i].val_accuracy, members[i].val_loss, select_by), i))


def ensemble_members(members: list[MemberResult], k: int, select_by: str = "loss") -> list[int]:
    """The members of the top-k ensemble, best first: the k best on validation among those
    with a best epoch (a member dropped before its first one has no probabilities)."""
    return [i for i in rank_members(members, select_by) if members[i].best_epoch >= 0][:k]


def _adamw(groups: list[dict[str, Any]], weight_decay: float) -> torch.optim.Optimizer:
    """AdamW, fused where this torch supports it (3x faster steps over many small tensors).

    Support is decided here, from the parameters' devices and dtypes: torch checks them
    only at the first ``step()``, too late to fall back."""
    params = [p for g in groups for p in g["params"]]
    if _fused_supported(params):
        try:
            return torch.optim.AdamW(groups, weight_decay=weight_decay, fused=True)
        except (RuntimeError, TypeError, ValueError):  # an older torch
            pass
    return torch.optim.AdamW(groups, weight_decay=weight_decay)


def _fused_supported(params: list[torch.Tensor]) -> bool:
    """Whether torch has a fused AdamW kernel for every parameter's device and dtype."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
        devices = set(_get_fused_kernels_supported_devices())
    except ImportError:  # a torch without the list: let the constructor decide
        return True
    return all(p.device.type in devices and p.is_floating_point() for p in params)


def _score_ensembles(bank: AdapterBank, val: Any, config: FitConfig, prec: Precision,
                     results: list[MemberResult], scored: dict[tuple[int, ...], tuple],
                     last_epoch: int, kept: Predictions | None
                     ) -> dict[tuple[int, ...], tuple[float, float]]:
    """The top-j ensembles (j = 1..``ensemble_k``) of the members' best epochs. One member
    is its own scores; the others are taken from the last epoch's pass when it scored them
    with every member at its best epoch, else from one more pass with the members' best
    states loaded (and their current ones put back after). ``kept`` gets the predictions
    of those ensembles, from the same pass as their scores."""
    top = ensemble_members(results, config.ensemble_k, config.select_by)
    out = {tuple(top[:1]): (results[top[0]].val_accuracy, results[top[0]].val_loss)} \
        if top else {}
    prefixes = [tuple(top[:j]) for j in range(2, len(top) + 1)]
    if not prefixes or (all(results[i].best_epoch == last_epoch for i in top)
                        and all(p in scored for p in prefixes)):
        if kept is not None:  # the last epoch's pass: its predictions are kept's
            kept.ensembles = {p: kept.ensembles[p] for p in prefixes}
        return out | {p: scored[p] for p in prefixes}
    current = {i: bank.member_state(i) for i in top}
    for i in top:
        bank.load_member(i, results[i].state)
    try:
        s = evaluate(bank, val, config.batch_size, prec, [list(p) for p in prefixes],
                     keep_predictions=kept is not None)
    finally:
        for i, state in current.items():
            bank.load_member(i, state)
    k = len(results)
    if kept is not None:
        this = Predictions.of_pass(s, k, [list(p) for p in prefixes])
        kept.ensembles = {} if this is None else this.ensembles
    return out | {p: (float(s.accuracy[k + j]), float(s.loss[k + j]))
                  for j, p in enumerate(prefixes)}


def train_bank(
    bank: AdapterBank,
    train: Any,
    val: Any,
    config: FitConfig,
    *,
    progress: bool = True,
    precision: str | Precision | None = None,
) -> BankResult:
    """Train every member of ``bank`` together, keeping each one's best validation state.

    Each step runs its forward and loss in its own autocast region (``precision``); the
    weights and optimizer state stay in the bank's dtype (float32 master weights), the
    losses are float32, and float16 gets a gradient scaler. The loop never waits for the
    device inside an epoch: losses are summed on the device and checked once per epoch.

    Args:
        bank: the adapters, on the device they train on.
        train: a source of training batches (cached or streaming).
        val: a source of validation batches.
        config: epochs, schedule, regularisation, early stopping, seed.
        progress: show a progress bar.
        precision: ``"32"``, ``"bf16-mixed"``, ``"16-mixed"``, ``"auto"`` or a
            :class:`~inca._precision.Precision`; ``config.precision`` when omitted.

    A member whose training loss becomes NaN or infinite (a learning rate too high for
    it) is dropped with a warning: its loss no longer counts, its weights and optimizer
    state are reset so that they stay finite, and it keeps its best epoch from before.

    Raises:
        TrainingError: the loss of every member became NaN or infinite.
    """
    prec = bank_precision(bank, precision if precision is not None else config.precision)
    steps = _Steps(bank, train, config, prec)
    results = [MemberResult(k) for k in bank.keys]
    history: list[dict[str, Any]] = []
    epochs, stale, epoch = config.epochs, 0, 0  # epochs: at most; a time budget may fix it
    scored: dict[tuple[int, ...], tuple[float, float]] = {}
    kept: Predictions | None = None  # validation predictions: see BankResult
    start = time.perf_counter()
    bar = progress_bar(total=steps.per_epoch * epochs, unit="step",
                       desc=f"train {len(bank.keys)} adapters", disable=not progress)
    for epoch in range(config.epochs):
        epoch_loss, alive = steps.epoch(bar)
        if not alive.any():
            raise TrainingError(
                f"the training loss of every adapter became NaN or infinite by epoch "
                f"{epoch + 1}; lower the learning rates (--lrs) or check the inputs for NaN/inf")
        for i in (~alive).nonzero().flatten().tolist():
            if results[i].diverged_epoch is None:
                _drop(bank, steps.optimizer, results[i], i, epoch)
        accs, nll, scored, seen = _score_epoch(bank, val, config, prec, results)
        kept = _follow(kept, seen, epoch)
        improved = _keep_best(bank, results, accs, nll, epoch, config.select_by, kept, seen)
        history.append({"epoch": epoch + 1, "train_loss": epoch_loss.tolist(),
                        "val_accuracy": accs.tolist(), "val_loss": nll.tolist()})
        # the selection's own measure, which only improves (an accuracy at the best loss
        # could go down); in a log, not a terminal: one line per epoch
        best = results[rank_members(results, config.select_by)[0]]
        bar.set_postfix({"epoch": epoch + 1, **({"best_val_loss": f"{best.val_loss:.4f}"}
                                                if config.select_by == "loss" else
                                                {"best_val_acc": f"{best.val_accuracy:.3f}"})})
        if config.time_budget_s is not None and epoch == 0:
            epochs = steps.fit_budget(config.time_budget_s, time.perf_counter() - start)
            bar.total = steps.per_epoch * epochs
        stale = 0 if improved else stale + 1
        if (config.patience and stale >= config.patience) or epoch + 1 >= epochs:
            break
    bar.close()
    ensembles = _score_ensembles(bank, val, config, prec, results, scored, epoch, kept)
    return BankResult(results, history, epoch + 1, time.perf_counter() - start, ensembles,
                      kept)


class _Steps:
    """The optimization of one :func:`train_bank` run: the bank (in DDP under torchrun),
    AdamW and its precision's stepper (backward and step), the learning-rate schedule, and
    an epoch of steps."""

    def __init__(self, bank: AdapterBank, train: Any, config: FitConfig,
                 prec: Precision) -> None:
        self.bank, self.train, self.config, self.prec = bank, train, config, prec
        self.ctx = ctx = context()
        # Under torchrun: DDP all-reduces the gradients; each rank reads its part of every
        # batch. device_ids=None: the inputs are already on the bank's device, so DDP never
        # moves (and rebuilds) them; one device per process is all DDP needs to know.
        self.model: nn.Module = bank if not ctx.active else DistributedDataParallel(
            bank, device_ids=None)
        self.gen = torch.Generator().manual_seed(config.seed)
        self.optimizer = _adamw(bank.param_groups(), config.weight_decay)
        self.step = prec.stepper(self.optimizer)
        # the single-process batch sizes, which the ranks' parts add up to
        self.sizes = [len(b) for b in batch_order(len(train), config.batch_size)
                      if not ctx.active or len(b) >= ctx.world]
        self.per_epoch = len(self.sizes)
        self.lr_factor = cosine_with_warmup(self.per_epoch * config.epochs,
                                            round(config.warmup_epochs * self.per_epoch))
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.lr_factor)
        self.active = torch.ones(len(bank.keys), dtype=torch.bool,
                                 device=next(bank.parameters()).device)

    def epoch(self, bar: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass over the training data. Returns each member's mean training loss and
        whether it is still finite, on the host (the epoch's one wait for the device)."""
        ctx, config = self.ctx, self.config
        self.bank.train()
        loss_sum, seen = torch.zeros(len(self.bank.keys), device=self.active.device), 0
        for step, (feats, y) in enumerate(self.train.batches(
                config.batch_size, shuffle=True, generator=self.gen, part="batch")):
            with self.prec.autocast():
                logits = self.model(feats)  # (K, B, C)
                # A diverged member is masked before its loss (on the device: no wait): the
                # loss's backward would turn a masked NaN into 0 * NaN = NaN gradients.
                self.active &= torch.isfinite(logits.detach()).flatten(1).all(1)
                logits = torch.where(self.active[:, None, None], logits, 0.0)
                losses = bank_loss(logits, y, config.label_smoothing)  # (K,)
            if ctx.active:  # DDP averages over ranks: weigh each part by its share
                losses = losses * (len(y) * ctx.world / self.sizes[step])
            losses = torch.where(self.active, losses, 0.0)
            # Members are independent: each gets its own gradient from the sum. A member
            # whose own weights are no longer finite still gets NaN gradients (0 * inf); a
            # float16 gradient scaler would skip every member's step for it: masked first.
            self.step(losses.sum(), lambda: self.bank.mask_grads(self.active))
            self.schedule.step()
            loss_sum += losses.detach() * (self.sizes[step] / ctx.world if ctx.active
                                           else len(y))
            seen += len(y)
            bar.update(1)
        if ctx.active:
            loss_sum = ctx.all_sum(loss_sum)
            seen = sum(self.sizes)
            self.active = ctx.all_sum((~self.active).int()) == 0  # dropped on any rank: on all
        return (loss_sum / max(seen, 1)).cpu(), self.active.cpu()

    def fit_budget(self, budget_s: float, epoch_s: float) -> int:
        """As many epochs as fit in ``budget_s`` after a first one took ``epoch_s``, with the
        schedule decaying over exactly those; rank 0's timing, so that every rank stops
        together."""
        epochs = max(1, min(self.config.epochs, int(budget_s // epoch_s)))
        epochs = self.ctx.broadcast_object(epochs)
        self.lr_factor.total_steps = self.per_epoch * epochs
        return epochs


def _score_epoch(bank: AdapterBank, val: Any, config: FitConfig, prec: Precision,
                 results: list[MemberResult]
                 ) -> tuple[torch.Tensor, torch.Tensor, dict[tuple[int, ...], tuple],
                            Predictions | None]:
    """Every member's validation accuracy and loss after an epoch, and those of the
    ensembles that the top-k ensemble would be if this epoch were every top member's best
    (kept if it is; see :func:`_score_ensembles`), and every one's predictions, from one
    pass."""
    guess = ensemble_members(results, config.ensemble_k, config.select_by)
    guesses = [guess[:j] for j in range(2, len(guess) + 1)]
    scores = evaluate(bank, val, config.batch_size, prec, guesses, keep_predictions=True)
    k = len(results)
    scored = {tuple(g): (float(scores.accuracy[k + j]), float(scores.loss[k + j]))
              for j, g in enumerate(guesses)}
    return (scores.accuracy[:k], scores.loss[:k], scored,
            Predictions.of_pass(scores, k, guesses))


def _follow(kept: Predictions | None, seen: Predictions | None, epoch: int
            ) -> Predictions | None:
    """The validation predictions after an epoch's pass (``seen``): the first pass's, later
    with the ensembles' of the latest pass (a member's row changes with its best epoch:
    :func:`_keep_best`); none after a pass that kept none."""
    if seen is None or (kept is None and epoch > 0):
        return None
    if kept is None:
        return seen
    # copies: the pass's (K + E, N) predictions are not held for E rows
    kept.ensembles = {p: pred.clone() for p, pred in seen.ensembles.items()}
    return kept


def _keep_best(bank: AdapterBank, results: list[MemberResult], accs: torch.Tensor,
               nll: torch.Tensor, epoch: int, select_by: str,
               kept: Predictions | None = None, seen: Predictions | None = None) -> bool:
    """Record the members whose validation improved this epoch, with a copy of their state
    (and their predictions of this pass, ``seen``, in ``kept``); whether any did."""
    improved = False
    for i, r in enumerate(results):
        if r.diverged_epoch is not None:
            continue
        acc, loss = float(accs[i]), float(nll[i])
        if (selection_key(acc, loss, select_by)
                < selection_key(r.val_accuracy, r.val_loss, select_by)):
            r.val_accuracy, r.val_loss, r.best_epoch = acc, loss, epoch
            r.state = bank.member_state(i)
            if kept is not None and seen is not None:
                kept.members[i] = seen.members[i]
            improved = True
    return improved


def _drop(bank: AdapterBank, optimizer: torch.optim.Optimizer, result: MemberResult, i: int,
          epoch: int) -> None:
    """Take a diverged member out of training: finite weights (its best state, else zeros)
    and a fresh optimizer state, so that it cannot disturb the others (a float16 gradient
    scaler skips every step while any gradient is infinite)."""
    state = result.state or {k: torch.zeros_like(v) for k, v in bank.member_state(i).items()}
    bank.load_member(i, state)
    for p, row in bank.member_slices(i):
        for buf in optimizer.state.get(p, {}).values():
            if torch.is_tensor(buf) and buf.shape == p.shape:
                (buf if row is None else buf[row]).zero_()
    result.diverged_epoch = epoch + 1
    kept = (f"kept its best epoch ({result.best_epoch + 1})" if result.state
            else "it had no epoch to keep")
    warnings.warn(f"dropped {result.key}: its training loss became NaN or infinite in epoch "
                  f"{epoch + 1} (its learning rate is too high for it, or, when every member "
                  f"of its layer diverges at once, that layer's tokens hold NaN or infinite "
                  f"values); {kept}",
                  RuntimeWarning, stacklevel=3)
