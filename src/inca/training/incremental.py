"""Class-incremental learning with Open-InCA: add classes without touching the old ones.

:func:`add_classes` extends a fitted task from images (any data set :func:`inca.fit`
takes); :func:`extend_adapters` is the step underneath, on token sources.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from inca._precision import Precision
from inca.adapters import OpenInCAAdapter
from inca.errors import TrainingError
from inca.training.bank import AdapterBank
from inca.training.config import FitConfig
from inca.training.loop import rank_members, train_bank
from inca.training.plan import MemberSpec

if TYPE_CHECKING:
    from inca.task import Task


def extend_adapters(
    adapters: list[OpenInCAAdapter],
    layers: list[str],
    num_new: int,
    train: Any,
    val: Any,
    config: FitConfig | None = None,
    *,
    progress: bool = False,
) -> tuple[list[OpenInCAAdapter], list[dict[str, Any]]]:
    """Extend trained Open-InCA adapters with ``num_new`` classes, training only them: a
    copy of each per learning rate of ``config.lrs``, all in one bank (one pass over the
    tokens for every copy), the best copy of each adapter kept by validation
    (``config.select_by``), as :func:`inca.fit` chooses.

    The shared attention and every existing class's query and head are frozen (separate
    tensors with no gradient), so the old classes' logits are exactly what they were.
    Only the new classes' queries and heads learn, from ``train`` (whose labels may cover
    old and new classes: old-class samples teach the new heads what not to fire on).

    Args:
        adapters: the trained adapters (left unchanged; copies are extended).
        layers: the layer each reads.
        num_new: classes to add; they get labels ``C_old .. C_old + num_new - 1``.
        train: a source of training batches (see :mod:`inca.training.sources`).
        val: a source of validation batches (each copy's best epoch kept).
        config: epochs, schedule, the learning-rate grid, the selection metric.
        progress: show a progress bar.

    Returns:
        The extended adapters, with ``C_old + num_new`` classes, and for each its chosen
        learning rate and validation accuracy and loss (over every class ``val`` holds).
    """
    for a in adapters:
        if not isinstance(a, OpenInCAAdapter):
            raise TrainingError(f"only open_inca adapters can add classes, got {a.kind!r}")
    config = config or FitConfig()
    grid = [(i, lr) for i in range(len(adapters)) for lr in config.lrs]
    extended = [copy.deepcopy(adapters[i]).add_classes(num_new, freeze_old=True)
                for i, _ in grid]
    # one kind per adapter: two adapters reading one layer keep keys of their own
    specs = [MemberSpec(f"open_inca:{i}", (layers[i],), lr) for i, lr in grid]
    bank = AdapterBank(specs, extended)
    result = train_bank(bank, train, val, config, progress=progress)
    ranked = rank_members(result.members, config.select_by)  # fit's rule, best first
    chosen, scores = [], []
    for i in range(len(adapters)):
        j = next(j for j in ranked if grid[j][0] == i)  # adapter i's best copy
        m = result.members[j]
        chosen.append(bank.export(j, m.state))
        scores.append({"lr": grid[j][1], "val_accuracy": m.val_accuracy,
                       "val_loss": m.val_loss})
    return chosen, scores


def add_classes(task: Task, train: Any, val: Any = None, config: FitConfig | None = None,
                *, progress: bool = True, num_workers: int | None = None,
                **overrides: Any) -> Task:
    """A copy of ``task`` that also knows the classes of ``train`` it lacks.

    The task's members must be Open-InCA adapters (``inca fit --kinds open_inca``). Their
    shared attention and the old classes' queries and heads stay frozen, so for every
    image the old classes' logits are bit for bit what they were; the new classes' learn
    from ``train`` (images of the new classes, and of old ones if you have them: they
    teach the new heads what not to fire on), validated on ``val`` or a split of ``train``.
    The backbone streams the images (no cache).

    Args:
        task: a fitted task with its backbone (``inca.load_task`` attaches it).
        train: any data set ``inca.fit`` takes; its classes are matched to the task's by
            name, and those the task lacks are added (in ``train``'s order).
        val: validation data (default: ``config.val_fraction`` of ``train``).
        config: epochs, batch size, the learning-rate grid (the best rate of each member
            chosen on validation), precision. The tokens are the task's (its
            ``token_grid``, whatever the config says).
        progress: show progress bars.
        num_workers: data-loading workers.
        **overrides: fields of :class:`FitConfig`, e.g. ``epochs=5``.

    Returns:
        The extended task; ``task`` itself is unchanged. Its metrics record the classes
        added, and each member's chosen learning rate and validation scores over every
        class.

    Raises:
        TrainingError: a member is not Open-InCA (the message says how to fit one), the
            task has no backbone, or ``train`` holds no class the task lacks.

    Example:
        >>> task = inca.load_task("runs/pets/task")  # doctest: +SKIP
        >>> bigger = inca.add_classes(task, load_dataset("more_pets/"))  # doctest: +SKIP
    """
    from inca.data import as_image_dataset
    from inca.task import Task
    from inca.training.fitting import _sources, _splits

    kinds = sorted({m.kind for m in task.members if not isinstance(m, OpenInCAAdapter)})
    if kinds:
        raise TrainingError(
            f"only tasks of Open-InCA members can add classes; this one has {', '.join(kinds)} "
            "members. Fit one with --kinds open_inca (kinds=('open_inca',))")
    if task.backbone is None:
        raise TrainingError("the task has no backbone: load it with inca.load_task(path), "
                            "which creates it, or pass backbone=")
    # the new classes learn from the tokens the task predicts from: its grid, if pooled
    grid = overrides.pop("token_grid", task.token_grid)
    if grid != task.token_grid:
        raise TrainingError(f"the task reads tokens pooled to token_grid={task.token_grid}; "
                            "new classes learn from the same tokens: drop token_grid")
    config = replace(config or FitConfig(), **overrides, token_grid=task.token_grid)
    data = as_image_dataset(train)
    new = [c for c in data.classes if c not in task.classes]
    if not new:
        raise TrainingError(f"{getattr(data, 'name', 'the data')} holds no class the task "
                            f"lacks (it has {len(task.classes)}: {', '.join(task.classes[:5])}"
                            f"{' ...' if len(task.classes) > 5 else ''})")
    classes = [*task.classes, *new]
    val = None if val is None else as_image_dataset(val)
    from inca.data import align_classes

    splits = _splits(align_classes(data, classes), None if val is None else
                     align_classes(val, classes), None, config)
    layers = sorted({layer for ls in task.member_layers for layer in ls})
    precision = Precision(config.precision, task.backbone.device)
    sources, _ = _sources(task.backbone, splits, layers, config, "streaming", None, progress,
                          num_workers, precision)
    members, scores = extend_adapters(list(task.members),
                                      [ls[0] for ls in task.member_layers], len(new),
                                      sources["train"], sources["val"], config,
                                      progress=progress)
    added = {"classes": new, "train_samples": len(splits["train"][1]),
             "val_samples": len(splits["val"][1]), "members": scores}
    extended = Task(members, task.member_layers, classes, task.backbone_info,
                    token_grid=task.token_grid, backbone=task.backbone, keys=task.keys,
                    precision=config.precision,
                    metrics={**task.metrics, "classes_added": [
                        *task.metrics.get("classes_added", []), added]})
    extended.report, extended.license = task.report, task.license
    return extended
