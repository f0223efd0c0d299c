"""A fitted task: the trained head(s) over a frozen backbone, and how it is loaded.

A task stores only what was trained (one adapter, or the members of an ensemble), never the
backbone and never a pickle (the folder format: :mod:`inca.task.files`). It records the
backbone's weights fingerprint and how to create the backbone again
(:mod:`inca.task.backbone`), and loading it onto other weights is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, overload

import numpy as np
import torch
from torch import nn

from inca._choices import DEFAULT_PRECISION
from inca._precision import Precision
from inca.adapters import Adapter, ensemble_proba
from inca.backbones.base import Backbone, Preprocessing
from inca.features import extract_features
from inca.task.backbone import check_backbone, task_backbone
from inca.task.export import TaskModule
from inca.task.files import TaskFiles, read_task_files, write_task_folder
from inca.task.hub import model_card, push_task, task_folder
from inca.task.inputs import image_list, open_one
from inca.task.report import FitReport
from inca.task.schema import TaskError


class Task(nn.Module):
    """A fitted classifier: members (adapters) reading backbone layers; probabilities averaged.

    An ``nn.Module`` holding the members and the backbone: ``task.to(device, dtype)`` moves
    both. The members always run on the device and dtype of the backbone they are attached
    to (they follow it if it was moved alone).

    Args:
        members: trained adapters (one, or several for an ensemble).
        member_layers: the layer(s) each member reads.
        classes: class names, index = label (one per output of every member).
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
        >>> task.predict_proba(["shoe.png"], numpy=True).shape  # doctest: +SKIP
        (1, 10)
        >>> task.save("runs/fmnist/task"); inca.load_task("runs/fmnist/task")  # doctest: +SKIP
        >>> task.push_to_hub("user/fmnist-inca")  # doctest: +SKIP
        >>> inca.Task.from_pretrained("user/fmnist-inca").report.to_pandas()  # doctest: +SKIP
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
        precision: str = DEFAULT_PRECISION,
    ) -> None:
        super().__init__()
        if not members or len(members) != len(member_layers):
            raise TaskError("a task needs at least one member, each with its layers")
        for i, m in enumerate(members):
            if m.num_classes != len(classes):
                raise TaskError(f"member {i} has {m.num_classes} outputs but {len(classes)} "
                                "class names were given: give one name per output")
        if keys is not None and len(keys) != len(members):
            raise TaskError(f"{len(keys)} keys were given for {len(members)} members: give one "
                            "key per member (or none)")
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
        self.report: FitReport | None = None  # by inca.fit, or read by load_task
        # the license the task is shared under, in its model card (e.g. "apache-2.0"); the
        # data it was trained on and the backbone's license decide it, so none by default
        self.license: str | None = None

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
        with self._precision().autocast():
            return ensemble_proba(self.members, self.member_layers, feats)

    def preprocess(self, images: Any) -> torch.Tensor:
        """Images as one batch ``(B, 3, H, W)``, resized and normalized as the backbone
        expects (a tensor is taken as already preprocessed); see :meth:`predict_proba` for
        the inputs taken."""
        if isinstance(images, torch.Tensor):
            return images if images.ndim == 4 else images.unsqueeze(0)
        from inca.data import build_transform

        tf = build_transform(self.preprocessing)
        return torch.stack([tf(open_one(im)) for im in image_list(images)])

    @overload
    def predict_proba(self, images: Any, batch_size: int = ...,
                      *, numpy: Literal[False] = ...) -> torch.Tensor: ...

    @overload
    def predict_proba(self, images: Any, batch_size: int = ...,
                      *, numpy: Literal[True]) -> np.ndarray: ...

    @torch.no_grad()
    def predict_proba(self, images: Any, batch_size: int = 64,
                      *, numpy: bool = False) -> torch.Tensor | np.ndarray:
        """Class probabilities ``(B, C)``, float32, on the CPU; column ``i`` is
        ``classes[i]``.

        Args:
            images: one image or a list of them: a file path, the file's bytes, a PIL
                image, or a NumPy array ``(H, W)``, ``(H, W, C)`` or ``(C, H, W)`` (uint8, or
                16-bit/float values scaled as :func:`inca.data.images.open_image` does); a
                NumPy batch ``(B, H, W, C)``; or a tensor ``(B, 3, H, W)`` / ``(3, H, W)``
                (``uint8`` pixels, or preprocessed floats) used as it is.
            batch_size: images per backbone pass.
            numpy: return a NumPy array (as scikit-learn does) instead of a torch tensor.

        Example:
            >>> proba = task.predict_proba(["shoe.png"], numpy=True)  # doctest: +SKIP
            >>> task.classes_[proba.argmax(1)]  # doctest: +SKIP
            array(['Sneaker'], dtype='<U11')
        """
        if self.backbone is None:
            raise TaskError("no backbone attached: use task.attach(backbone) or "
                            "inca.load_task(path) which creates it")
        self.follow_backbone()
        x = self.preprocess(images)
        out = []
        for start in range(0, len(x), batch_size):
            with self._precision().autocast():
                feats = extract_features(self.backbone, x[start:start + batch_size],
                                         self.layers, self.token_grid)
            out.append(self.proba_from_features(feats).cpu())
        probs = torch.cat(out)
        return probs.numpy() if numpy else probs

    @overload
    def predict(self, images: Any, batch_size: int = ...,
                *, numpy: Literal[False] = ...) -> list[str]: ...

    @overload
    def predict(self, images: Any, batch_size: int = ...,
                *, numpy: Literal[True]) -> np.ndarray: ...

    def predict(self, images: Any, batch_size: int = 64,
                *, numpy: bool = False) -> list[str] | np.ndarray:
        """Predicted class names: a list, or with ``numpy=True`` a NumPy array of strings
        (scikit-learn's ``predict``)."""
        idx = self.predict_proba(images, batch_size).argmax(-1).numpy()
        return self.classes_[idx] if numpy else [self.classes[i] for i in idx.tolist()]

    @property
    def classes_(self) -> np.ndarray:
        """The class names as a NumPy array (scikit-learn's name): ``classes_[i]`` is the
        class of probability column ``i``."""
        return np.asarray(self.classes)

    def to_module(self) -> TaskModule:
        """Backbone and heads as one ``nn.Module``: preprocessed images ``(B, 3, H, W)``
        (``uint8`` pixels, or normalized floats) to probabilities ``(B, C)``.

        It shares the task's weights (no copy), runs in any autograd mode (no
        ``inference_mode`` inside, so its outputs can enter a graph that is trained), and
        exports with ``torch.export.export`` (and ONNX where the backbone's operations
        allow). See :class:`~inca.task.export.TaskModule`.

        Example:
            >>> x = torch.rand(1, 3, 224, 224)
            >>> program = torch.export.export(task.to_module(), (x,))  # doctest: +SKIP
        """
        if self.backbone is None:
            raise TaskError("no backbone attached: use task.attach(backbone) or "
                            "inca.load_task(path) which creates it")
        self.follow_backbone()
        return TaskModule(self.backbone, self.members, self.member_layers,
                          token_grid=self.token_grid)

    # -- files ---------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the task into the folder ``path``, replacing a task saved there before.

        The folder gets ``task.json`` (classes, members, the backbone's description and how
        to create it again, metrics, the sha256 of the weights and report),
        ``adapter_model.safetensors``, ``report.json`` (the fit report, when the task has
        one) and ``README.md`` (a model card: the Hugging Face hub shows it). Files get mode
        0644, less what the umask removes. :meth:`save_pretrained` is this same method.

        The swap survives a kill at any instant: the complete task is written and flushed
        to disk in a hidden sibling (``.<name>.new-*``), then the old folder is renamed
        aside (``.<name>.old``), the new one renamed in, and the old one removed. Between
        those two renames :func:`load_task` reads the aside copy, so the folder always loads
        as the complete old task or the complete new one; the next save puts back or
        removes whatever a kill left. One process saves a folder at a time (a lock file
        beside it, ``.<name>.lock``).

        Returns:
            The folder.

        Raises:
            TaskError: the task would not load (e.g. non-finite weights), or ``path`` holds
                other files than a task's (saving would delete them).
            StorageError: the disk is full or read-only, or another process is saving there.
        """
        tensors = {
            f"members.{i}.{k}": v.detach().cpu().contiguous()
            for i, m in enumerate(self.members)
            for k, v in m.state_dict().items()
        }
        meta = {
            "classes": self.classes,
            "members": [
                {"key": key, "layers": layers, "spec": m.spec()}
                for key, layers, m in zip(self.keys, self.member_layers, self.members,
                                          strict=True)
            ],
            "token_grid": self.token_grid,
            "backbone": dict(self.backbone_info),
            "metrics": self.metrics,
            "num_parameters": self.num_parameters(),
        }
        if self.license is not None:
            meta["license"] = self.license
        report = self.report.to_dict() if self.report is not None else None
        return write_task_folder(Path(path), meta, tensors, report=report,
                                 card=model_card(self))

    save_pretrained = save  # the Hugging Face name; one writer

    @classmethod
    def from_files(cls, files: TaskFiles, precision: str = DEFAULT_PRECISION) -> Task:
        """The task a checked folder holds (:func:`read_task_files`), members on the CPU in
        float32, no backbone attached yet."""
        meta = files.meta
        task = cls(files.members(), [m["layers"] for m in meta["members"]], meta["classes"],
                   meta["backbone"], token_grid=meta.get("token_grid"),
                   metrics=meta.get("metrics"), keys=[m["key"] for m in meta["members"]],
                   precision=precision)
        task.report, task.license = files.report, meta.get("license")
        return task

    @classmethod
    def from_pretrained(cls, folder_or_repo_id: str | Path,
                        backbone: Backbone | str | None = None, *,
                        revision: str | None = None, token: str | bool | None = None,
                        cache_dir: str | Path | None = None,
                        device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None, precision: str = DEFAULT_PRECISION,
                        **backbone_kwargs: Any) -> Task:
        """Load a task from a local folder, or from a Hugging Face hub repo (downloaded with
        ``huggingface_hub.snapshot_download``: its task files only, into the hub's cache).

        A string that names an existing folder, or looks like a path (starts with ``.``,
        ``/`` or ``~``, or has more than one ``/``), is a folder; otherwise a repo id
        (``"user/fashion-mnist-inca"``). The rest is :func:`load_task`.

        Args:
            folder_or_repo_id: the task folder, or the hub repo id.
            backbone: see :func:`load_task`.
            revision: the repo's branch, tag or commit.
            token: the hub token (private repos); the logged-in one by default.
            cache_dir: where downloads go (the hub's cache by default).
            device: see :func:`load_task`.
            dtype: see :func:`load_task`.
            precision: see :func:`load_task`.
            **backbone_kwargs: see :func:`load_task`.

        Example:
            >>> task = inca.Task.from_pretrained("user/fashion-mnist-inca")  # doctest: +SKIP
        """
        folder = task_folder(folder_or_repo_id, revision=revision, token=token,
                             cache_dir=cache_dir)
        return load_task(folder, backbone, device=device, dtype=dtype, precision=precision,
                         **backbone_kwargs)

    def push_to_hub(self, repo_id: str, *, token: str | bool | None = None,
                    private: bool | None = None, revision: str | None = None,
                    commit_message: str = "Upload inca task", create_pr: bool = False) -> Any:
        """Upload the task (:meth:`save_pretrained`'s files, model card included) to a
        Hugging Face hub model repo, created if needed (``huggingface_hub``'s
        ``create_repo`` and ``upload_folder``). The backbone's record goes with it: a
        backbone from a local folder or checkpoint is named by its absolute path here.

        Args:
            repo_id: ``"user/name"``.
            token: the hub token; the logged-in one by default.
            private: make a new repo private.
            revision: the branch to push to.
            commit_message: the commit's message.
            create_pr: open a pull request instead of committing.

        Returns:
            ``huggingface_hub``'s ``CommitInfo`` (its ``commit_url``, ``oid``).

        Example:
            >>> task.push_to_hub("user/fashion-mnist-inca")  # doctest: +SKIP
        """
        return push_task(self, repo_id, token=token, private=private, revision=revision,
                         commit_message=commit_message, create_pr=create_pr)



def load_task(path: str | Path, backbone: Backbone | str | None = None, *,
              device: str | torch.device | None = None, dtype: torch.dtype | None = None,
              precision: str = DEFAULT_PRECISION, **backbone_kwargs: Any) -> Task:
    """Load a task folder written by :meth:`Task.save`, its fit report as ``task.report``.

    Everything local is checked first, before any backbone is created or moved
    (:func:`read_task_files`: the schema and bounds of ``task.json``, the weights' names,
    shapes and values, their sha256). Without ``backbone``, the backbone is then created
    again as ``task.json`` records it (its spec, local paths absolute; the hub revision;
    whether pretrained weights or a local checkpoint were used). That reads only local
    files when the record says so (a bundled backbone, a local folder or checkpoint, or
    ``pretrained=False``: the Hugging Face hub is switched to offline meanwhile), and
    **may download the weights** otherwise (``timm:``/``hf:`` hub models). Its weights
    fingerprint is checked right after, before it is used. The task runs on the device and
    dtype of its backbone.

    Args:
        path: the folder.
        backbone: the backbone to attach: a :class:`~inca.Backbone`, or a spec for
            :func:`inca.create_backbone` to create instead of the recorded one (e.g. the
            same weights in another folder, ``"hf:/data/models/vit"``), at the task's input
            size; created from the task's record when omitted. It must have the weights
            the task was trained on.
        device: where to run (``"auto"``: CUDA when available). A given backbone is moved
            there; by default it stays where it is, and a created one goes to ``"auto"``.
        dtype: the backbone's and members' parameter dtype (float32 by default; a task
            saved in float32 loads in bfloat16 too).
        precision: autocast of predictions (``"auto"``: bf16-mixed on a GPU, 32 on CPU).
        **backbone_kwargs: passed to :func:`inca.create_backbone` when creating it (over
            the recorded arguments).

    Raises:
        TaskError: the folder is not a valid task (the message names the file, the cause
            and the fix), the backbone cannot be created again, or its weights or
            preprocessing differ.

    Example:
        >>> task = inca.load_task("runs/fmnist/task")  # doctest: +SKIP
        >>> task.predict(["shoe.png"]), task.report.to_pandas()  # doctest: +SKIP
    """
    files = read_task_files(path)
    backbone = task_backbone(files.backbone_info, backbone, device=device, dtype=dtype,
                             what=f"the task in {files.folder}", **backbone_kwargs)
    return Task.from_files(files, precision).attach(backbone)
