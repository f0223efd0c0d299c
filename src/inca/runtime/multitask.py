"""Many tasks on one backbone pass: the union of their layers is extracted once."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from inca._choices import DEFAULT_PRECISION
from inca._precision import Precision
from inca.adapters import InCAAdapter, StackedInCA, member_input
from inca.backbones.base import Backbone
from inca.data.transforms import to_model_input
from inca.features import token_shapes
from inca.features.tokens import reduce_tokens
from inca.task import (
    Task,
    TaskError,
    TaskFiles,
    check_backbone,
    read_task_files,
    task_backbone,
)


class _SharedGroup(NamedTuple):
    """InCA members of several tasks (same width, config and token count) whose attention
    runs as one batched computation (:meth:`StackedInCA.run`, as in training); each keeps
    its own projections and classifier. Holds the members themselves, not copies, so the
    group always computes with the model's current device, dtype and weights."""

    grid: int | None
    layers: list[str]  # the token block it reads
    members: list[tuple[str, InCAAdapter]]  # (task name, adapter)
    layer_index: list[list[int]]  # per member, its layer in ``layers``

    def logits(self, feats: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        block = torch.stack([feats[k] for k in self.layers])  # (L, B, N, D)
        outs = StackedInCA.run(block, [m for _, m in self.members], self.layer_index)
        return [o[0] for o in outs]  # (B, C) each


class MultiTaskModel(nn.Module):
    """Several fitted tasks sharing one frozen backbone.

    One forward pass extracts the union of the tasks' layers (stopping after the deepest),
    then every task's head runs on its own layers. Tasks are added and removed at run
    time without reloading the backbone; a task trained on other backbone weights is
    refused. An ``nn.Module``: ``.to(device, dtype)`` moves the backbone and every task's
    members together.

    Args:
        backbone: the shared backbone.
        tasks: initial tasks, ``{name: Task or task folder}``.
        precision: autocast of predictions (``"auto"``: bf16-mixed on a GPU, 32 on CPU).

    Example:
        >>> model = MultiTaskModel.from_paths(["runs/a/task", "runs/b/task"])  # doctest: +SKIP
        >>> model.predict_proba(images)  # doctest: +SKIP
        {'a': tensor(...), 'b': tensor(...)}
    """

    def __init__(self, backbone: Backbone,
                 tasks: Mapping[str, Task | str | Path] | None = None,
                 precision: str = DEFAULT_PRECISION) -> None:
        super().__init__()
        self.backbone = backbone
        self.precision = precision
        self.heads = nn.ModuleDict()  # every task's members, registered once
        self._tasks: dict[str, Task] = {}
        self._plans: dict[tuple[str, ...], Any] = {}
        for name, task in (tasks or {}).items():
            self.add_task(name, task)

    @classmethod
    def from_paths(cls, paths: list[str | Path], backbone: Backbone | str | None = None,
                   names: list[str] | None = None, *, device: str | torch.device | None = None,
                   dtype: torch.dtype | None = None, precision: str = DEFAULT_PRECISION,
                   **backbone_kwargs: Any) -> MultiTaskModel:
        """Load task folders onto one backbone.

        Every folder is read and checked first (:func:`~inca.task.read_task_files`),
        and the tasks must record the same backbone weights; an error names the task and
        its folder. Only then is the backbone taken: ``backbone`` when given (moved to
        ``device``/``dtype`` when given); a spec string (``"hf:/models/vit"``) is created
        with ``backbone_kwargs`` at the tasks' input size; without one, the backbone the
        first task records is created again (see :func:`~inca.task.load_task`:
        from local files only when the record says so, else it **may download its
        weights**), on ``device`` in ``dtype``. Each task's fingerprint is checked against
        it before any task is built.

        Raises:
            TaskError: a folder is not a valid task, or the tasks' backbones differ.
        """
        if not paths:
            raise TaskError("give at least one task folder")
        names = names or [_default_name(p) for p in paths]
        if len(names) != len(paths):
            raise TaskError(f"got {len(names)} names for {len(paths)} task folders; give "
                            "one name per folder")
        if len(set(names)) != len(names):
            raise TaskError(f"task names must be distinct, got {names}; name them explicitly")
        files = [_read_named(name, path) for name, path in zip(names, paths, strict=True)]
        first = files[0].backbone_info
        for name, f in zip(names[1:], files[1:], strict=True):
            if f.backbone_info["fingerprint"] != first["fingerprint"]:
                raise TaskError(
                    f"task {name!r} ({f.folder}) was trained on backbone "
                    f"{f.backbone_info['name']!r} (weights {f.backbone_info['fingerprint']}) "
                    f"but task {names[0]!r} on {first['name']!r} (weights "
                    f"{first['fingerprint']}): one model serves tasks of one backbone; "
                    "serve them from separate models")
        backbone = task_backbone(first, backbone, device=device, dtype=dtype,
                                 what=f"task {names[0]!r} ({files[0].folder})",
                                 **backbone_kwargs)
        for name, f in zip(names, files, strict=True):
            check_backbone(f.backbone_info, backbone, what=f"task {name!r} ({f.folder})")
        model = cls(backbone, precision=precision)
        for name, f in zip(names, files, strict=True):
            model.add_task(name, Task.from_files(f, precision))
        return model

    # -- managing tasks -------------------------------------------------------------
    @property
    def tasks(self) -> dict[str, Task]:
        return dict(self._tasks)

    def add_task(self, name: str, task: Task | str | Path) -> Task:
        """Add (or replace) a task (a :class:`Task` or a task folder, checked before it is
        built); refused if it was trained on other backbone weights."""
        if not isinstance(task, Task):
            files = _read_named(name, task)
            check_backbone(files.backbone_info, self.backbone,
                           what=f"task {name!r} ({files.folder})")
            task = Task.from_files(files, self.precision)
        check_backbone(task.backbone_info, self.backbone, what=f"task {name!r}")
        task.backbone = self.backbone  # checked above, with the task's name
        task.follow_backbone()
        if name in self._tasks:
            self.remove_task(name)
        self._tasks[name] = task
        self.heads[_module_key(name, self.heads)] = task.members
        self._plans.clear()
        return task

    def remove_task(self, name: str) -> Task:
        if name not in self._tasks:
            raise TaskError(f"no task named {name!r}; tasks: {', '.join(self._tasks) or 'none'}")
        self._plans.clear()
        task = self._tasks.pop(name)
        for key, members in list(self.heads.items()):
            if members is task.members:
                del self.heads[key]
        return task

    def layers(self, names: list[str] | None = None) -> list[str]:
        """Union of the selected tasks' layers, in the backbone's order."""
        wanted = {ly for n in self._select(names) for ly in self._tasks[n].layers}
        return [ly for ly in self.backbone.layers if ly in wanted]

    def _select(self, names: list[str] | None) -> list[str]:
        if not self._tasks:
            raise TaskError("no tasks loaded")
        names = list(self._tasks) if names is None else list(names)
        unknown = [n for n in names if n not in self._tasks]
        if unknown:
            raise TaskError(f"unknown task(s) {unknown}; tasks: {', '.join(self._tasks)}")
        return names

    # -- inference ------------------------------------------------------------------
    @torch.no_grad()
    def predict_proba(self, images: Any, tasks: list[str] | None = None,
                      batch_size: int = 64, *, numpy: bool = False
                      ) -> dict[str, torch.Tensor] | dict[str, np.ndarray]:
        """``{task: probabilities (B, C)}`` (float32, on the CPU) from one backbone pass
        per batch.

        Args:
            images: a preprocessed tensor ``(B, 3, H, W)``, or PIL images / file paths.
            tasks: which tasks to run (all by default).
            batch_size: images per backbone pass.
            numpy: NumPy arrays instead of torch tensors.
        """
        names = self._select(tasks)
        for n in names:
            self._tasks[n].follow_backbone()  # the backbone may have been moved alone
        first = self._tasks[names[0]]
        x = first.preprocess(images)
        layers = self.layers(names)
        shared, alone = self._plan(tuple(names))
        prec = Precision(self.precision, self.backbone.device)
        out: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        for start in range(0, len(x), batch_size):
            batch = to_model_input(x[start:start + batch_size], self.backbone.preprocessing,
                                   self.backbone.device, self.backbone.dtype)
            probs: dict[str, torch.Tensor] = {n: 0.0 for n in names}  # type: ignore[misc]
            with prec.autocast():
                raw = self.backbone.extract(batch, layers)
                reduced = {grid: {k: reduce_tokens(v, self.backbone.num_prefix_tokens, grid)
                                  for k, v in raw.items()}
                           for grid in {self._tasks[n].token_grid for n in names}}
                for group in shared:
                    for (name, _), logits in zip(group.members, group.logits(reduced[group.grid]),
                                                 strict=True):
                        probs[name] = probs[name] + self._share(name, logits)
                for name, member, member_layers in alone:
                    feats = reduced[self._tasks[name].token_grid]
                    x_in = member_input(member_layers, feats)
                    probs[name] = probs[name] + self._share(name, member(x_in))
            for n in names:
                out[n].append(probs[n].cpu())
        return {n: torch.cat(v).numpy() if numpy else torch.cat(v) for n, v in out.items()}

    def _token_counts(self, names: tuple[str, ...]) -> dict[tuple[str, int | None], int]:
        """Tokens N of each (layer, grid) the tasks read (one probe pass per grid)."""
        layers = self.layers(list(names))
        return {(k, g): n for g in {self._tasks[t].token_grid for t in names}
                for k, (n, _) in token_shapes(self.backbone, layers, g).items()}

    def _share(self, name: str, logits: torch.Tensor) -> torch.Tensor:
        """One member's probabilities, weighted for its task's average over members."""
        return logits.float().softmax(-1) / len(self._tasks[name].members)

    def _plan(self, names: tuple[str, ...]) -> tuple[list[_SharedGroup],
                                                     list[tuple[str, Any, list[str]]]]:
        """Which members share one batched attention, and which run alone (cached)."""
        if names not in self._plans:
            counts = self._token_counts(names)
            groups: dict[tuple, list[tuple[str, InCAAdapter, str]]] = {}
            alone = []
            for name in names:
                task = self._tasks[name]
                for member, member_layers in zip(task.members, task.member_layers,
                                                 strict=True):
                    if type(member) is InCAAdapter and len(member_layers) == 1:
                        # stacking needs one token count: CNN stages of equal width may differ
                        key = (task.token_grid, member.embed_dim, repr(member.config),
                               counts[(member_layers[0], task.token_grid)])
                        groups.setdefault(key, []).append((name, member, member_layers[0]))
                    else:
                        alone.append((name, member, member_layers))
            shared = []
            for key, members in groups.items():
                if len(members) == 1:
                    name, member, layer = members[0]
                    alone.append((name, member, [layer]))
                    continue
                group_layers = [ly for ly in self.backbone.layers
                                if ly in {layer for _, _, layer in members}]
                shared.append(_SharedGroup(key[0], group_layers,
                                           [(name, m) for name, m, _ in members],
                                           [[group_layers.index(ly)] for _, _, ly in members]))
            self._plans[names] = (shared, alone)
        return self._plans[names]

    def predict(self, images: Any, tasks: list[str] | None = None, top_k: int = 1,
                batch_size: int = 64) -> dict[str, list[list[tuple[str, float]]]]:
        """``{task: [[(label, probability), ...top_k] per image]}``."""
        return self.ranked(self.predict_proba(images, tasks, batch_size), top_k)

    def ranked(self, probs: Mapping[str, torch.Tensor], top_k: int = 1
               ) -> dict[str, list[list[tuple[str, float]]]]:
        """Each task's ``top_k`` ``(label, probability)`` pairs per image, best first, from
        its probabilities ``(B, C)`` (as :meth:`predict_proba` returns them)."""
        result = {}
        for name, p in probs.items():
            classes = self._tasks[name].classes
            values, idx = p.topk(min(top_k, len(classes)), dim=-1)
            result[name] = [
                [(classes[i], float(v)) for v, i in zip(vs, ids, strict=True)]
                for vs, ids in zip(values.tolist(), idx.tolist(), strict=True)
            ]
        return result


def _module_key(name: str, taken: Mapping[str, Any]) -> str:
    """A submodule name for a task name (which may hold dots or be taken)."""
    base = re.sub(r"\W", "_", name) or "task"
    key, i = base, 1
    while key in taken:
        key, i = f"{base}_{i}", i + 1
    return key


def _read_named(name: str, path: str | Path) -> TaskFiles:
    """:func:`read_task_files`, its error naming the task too."""
    try:
        return read_task_files(path)
    except TaskError as e:
        raise TaskError(f"task {name!r}: {e}") from e


def _default_name(path: str | Path) -> str:
    p = Path(path)
    return p.parent.name if p.name == "task" else p.name
