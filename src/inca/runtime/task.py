"""A fitted task: the trained head(s) over a frozen backbone, saved as safetensors + JSON.

A task file stores only what was trained (one adapter, or the members of an ensemble),
never the backbone and never a pickle. It records the backbone's id and weights
fingerprint, and loading it onto another backbone is refused.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from inca._precision import Precision, resolve_device
from inca.adapters import Adapter, adapter_from_spec
from inca.backbones.base import Backbone, Preprocessing
from inca.errors import InCAError
from inca.features import extract_features
from inca.features.cache import atomic_write_json

TASK_JSON = "task.json"
TASK_WEIGHTS = "adapter_model.safetensors"
TASK_FORMAT = 1


class TaskError(InCAError):
    """A task file is missing, malformed, or does not fit the backbone."""


class Task(nn.Module):
    """A fitted classifier: members (adapters) reading backbone layers; probabilities averaged.

    An ``nn.Module`` holding the members and the backbone: ``task.to(device, dtype)`` moves
    both. The members always run on the device and dtype of the backbone they are attached
    to (they follow it if it was moved alone).

    Args:
        members: trained adapters (one, or several for an ensemble).
        member_layers: the layer(s) each member reads.
        classes: class names, index = label.
        backbone_info: ``Backbone.describe()`` of the backbone it was trained on.
        token_grid: token reduction applied before the adapters (as in training).
        metrics: validation (and test) metrics recorded at fit time.
        keys: the bank keys of the members (``inca/blocks.7/lr=0.001``).
        backbone: the live backbone, needed for :meth:`predict` on images.
        precision: autocast of predictions (``"auto"``: bf16-mixed on a GPU, 32 on the CPU).

    Example:
        >>> task = inca.fit(backbone, train, layers="all")  # doctest: +SKIP
        >>> task.predict(["shoe.png"])  # doctest: +SKIP
        ['Sneaker']
        >>> task.save("runs/fmnist/task"); inca.load_task("runs/fmnist/task")  # doctest: +SKIP
    """

    def __init__(
        self,
        members: Sequence[Adapter],
        member_layers: Sequence[Sequence[str]],
        classes: Sequence[str],
        backbone_info: dict[str, Any],
        *,
        token_grid: int | None = None,
        metrics: dict[str, Any] | None = None,
        keys: Sequence[str] | None = None,
        backbone: Backbone | None = None,
        precision: str = "auto",
    ) -> None:
        super().__init__()
        if not members or len(members) != len(member_layers):
            raise TaskError("a task needs at least one member, each with its layers")
        self.members = nn.ModuleList(members).eval()
        self.member_layers = [list(ls) for ls in member_layers]
        self.classes = list(classes)
        self.backbone_info = dict(backbone_info)
        self.token_grid = token_grid
        self.metrics = dict(metrics or {})
        self.keys = list(keys) if keys is not None else [f"member{i}" for i in
                                                         range(len(members))]
        self.precision = precision
        self.backbone = backbone
        self.report: Any = None  # the FitReport when produced by inca.fit

    # -- description ---------------------------------------------------------------
    @property
    def layers(self) -> list[str]:
        """Union of the layers the members read, in the backbone's order."""
        wanted = {ly for ls in self.member_layers for ly in ls}
        order = self.backbone_info.get("layers", sorted(wanted))
        return [ly for ly in order if ly in wanted]

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing.from_dict(self.backbone_info["preprocessing"])

    def num_parameters(self) -> int:
        return sum(m.num_parameters() for m in self.members)

    def extra_repr(self) -> str:
        return (f"{len(self.classes)} classes, keys={self.keys}, "
                f"backbone={self.backbone_info.get('name')!r}")

    # -- inference -----------------------------------------------------------------
    def attach(self, backbone: Backbone) -> Task:
        """Use ``backbone`` for predictions; refused if its weights differ from training.
        The members move to the backbone's device and dtype."""
        check_backbone(self.backbone_info, backbone, what="this task")
        self.backbone = backbone
        self.follow_backbone()
        return self

    def follow_backbone(self) -> None:
        """Put the members on the backbone's device and dtype (a no-op when they are)."""
        if self.backbone is None:
            return
        p = next(self.members.parameters())
        device, dtype = self.backbone.device, self.backbone.dtype
        if (p.device, p.dtype) != (device, dtype):
            self.members.to(device=device, dtype=dtype)

    def _precision(self) -> Precision:
        device = self.backbone.device if self.backbone is not None else \
            next(self.members.parameters()).device
        return Precision(self.precision, device)

    @torch.no_grad()
    def proba_from_features(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        """Class probabilities ``(B, C)`` (float32) from extracted (and reduced) tokens."""
        probs = None
        with self._precision().autocast():
            for member, layers in zip(self.members, self.member_layers, strict=True):
                x = feats[layers[0]] if len(layers) == 1 else [feats[k] for k in layers]
                p = member(x).float().softmax(-1)
                probs = p if probs is None else probs + p
        return probs / len(self.members)

    def _images_to_tensor(self, images: Any) -> torch.Tensor:
        if isinstance(images, torch.Tensor):
            return images if images.ndim == 4 else images.unsqueeze(0)
        from inca.data import build_transform

        tf = build_transform(self.preprocessing)
        return torch.stack([tf(_open_image(im)) for im in images])

    @torch.no_grad()
    def predict_proba(self, images: Any, batch_size: int = 64) -> torch.Tensor:
        """Probabilities ``(B, C)`` for images: a tensor ``(B, 3, H, W)`` (``uint8`` pixels,
        or preprocessed floats), or a list of PIL images or file paths."""
        if self.backbone is None:
            raise TaskError("no backbone attached: use task.attach(backbone) or "
                            "inca.load_task(path) which creates it")
        self.follow_backbone()
        x = self._images_to_tensor(images)
        out = []
        for start in range(0, len(x), batch_size):
            with self._precision().autocast():
                feats = extract_features(self.backbone, x[start:start + batch_size],
                                         self.layers, self.token_grid)
            out.append(self.proba_from_features(feats).cpu())
        return torch.cat(out)

    def predict(self, images: Any, batch_size: int = 64) -> list[str]:
        """Predicted class names."""
        probs = self.predict_proba(images, batch_size)
        return [self.classes[i] for i in probs.argmax(-1).tolist()]

    # -- files ---------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write ``task.json`` and ``adapter_model.safetensors`` into the folder ``path``."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {
            f"members.{i}.{k}": v.detach().cpu().contiguous()
            for i, m in enumerate(self.members)
            for k, v in m.state_dict().items()
        }
        tmp = folder / f".{TASK_WEIGHTS}.tmp"
        save_file(tensors, str(tmp))
        tmp.replace(folder / TASK_WEIGHTS)
        atomic_write_json(folder / TASK_JSON, {
            "format_version": TASK_FORMAT,
            "classes": self.classes,
            "members": [
                {"key": key, "layers": layers, "spec": m.spec()}
                for key, layers, m in zip(self.keys, self.member_layers, self.members,
                                          strict=True)
            ],
            "token_grid": self.token_grid,
            "backbone": {k: v for k, v in self.backbone_info.items()},
            "metrics": self.metrics,
            "num_parameters": self.num_parameters(),
        })
        return folder


def check_backbone(info: dict[str, Any], backbone: Backbone, what: str) -> None:
    """Refuse a backbone whose weights or preprocessing differ from ``info``'s."""
    problems = []
    if info.get("fingerprint") != backbone.fingerprint():
        problems.append(f"weights fingerprint {backbone.fingerprint()} != "
                        f"{info.get('fingerprint')} it was trained with")
    if info.get("preprocessing") and info["preprocessing"] != backbone.preprocessing.to_dict():
        problems.append(f"preprocessing {backbone.preprocessing.to_dict()} != "
                        f"{info['preprocessing']}")
    if problems:
        raise TaskError(
            f"{what} was trained on backbone {info.get('name')!r} and does not fit "
            f"{backbone.name!r}: " + "; ".join(problems)
            + f". Load it with the backbone it was trained on ({info.get('name')})."
        )


def _open_image(im: Any) -> Image.Image:
    if isinstance(im, Image.Image):
        return im.convert("RGB")
    try:
        with Image.open(im) as f:
            return f.convert("RGB")
    except (OSError, ValueError) as e:
        raise TaskError(f"cannot read image {im}: {e}") from e


def load_task(path: str | Path, backbone: Backbone | None = None, *,
              device: str | torch.device | None = None, dtype: torch.dtype | None = None,
              precision: str = "auto", **backbone_kwargs: Any) -> Task:
    """Load a task folder written by :meth:`Task.save`.

    The task runs on the device and dtype of its backbone.

    Args:
        path: the folder.
        backbone: the backbone to attach; created from the recorded id when omitted.
        device: where to run (``"auto"``: CUDA when available). A given backbone is moved
            there; by default it stays where it is, and a created one goes to ``"auto"``.
        dtype: the backbone's and members' parameter dtype (float32 by default; a task
            saved in float32 loads in bfloat16 too).
        precision: autocast of predictions (``"auto"``: bf16-mixed on a GPU, 32 on CPU).
        **backbone_kwargs: passed to :func:`inca.create_backbone` when creating it.

    Raises:
        TaskError: the folder is not a task, or the backbone's weights differ.
    """
    folder = Path(path)
    meta_file = folder / TASK_JSON
    if not meta_file.is_file() or not (folder / TASK_WEIGHTS).is_file():
        raise TaskError(f"{folder} is not a task folder (needs {TASK_JSON} and {TASK_WEIGHTS}); "
                        "create one with `inca fit --out ...`")
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as e:
        raise TaskError(f"{meta_file} is not valid JSON: {e}") from e
    tensors = load_file(str(folder / TASK_WEIGHTS))
    members = []
    for i, m in enumerate(meta["members"]):
        adapter = adapter_from_spec(m["spec"])
        prefix = f"members.{i}."
        adapter.load_state_dict({k[len(prefix):]: v for k, v in tensors.items()
                                 if k.startswith(prefix)})
        members.append(adapter)
    task = Task(members, [m["layers"] for m in meta["members"]], meta["classes"],
                meta["backbone"], token_grid=meta.get("token_grid"),
                metrics=meta.get("metrics"), keys=[m["key"] for m in meta["members"]],
                precision=precision)
    if backbone is None:
        from inca.backbones import create_backbone

        prep = meta["backbone"].get("preprocessing", {})
        backbone_kwargs.setdefault("input_size", prep.get("input_size"))
        backbone = create_backbone(meta["backbone"]["name"], device=resolve_device(device),
                                   dtype=dtype, **backbone_kwargs)
    elif device is not None or dtype is not None:
        backbone.to(device=None if device is None else resolve_device(device), dtype=dtype)
    return task.attach(backbone)
