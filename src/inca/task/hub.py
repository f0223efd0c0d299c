"""Sharing tasks through the Hugging Face hub: the model card, download and upload.

A task folder is a hub model repo as it is: ``task.json``, ``adapter_model.safetensors``,
``report.json`` and the model card ``README.md`` (YAML front matter with
``library_name: inca``, tags and metrics; then the backbone, classes, chosen adapters,
metrics and the fit report's table). :meth:`Task.push_to_hub
<inca.task.Task.push_to_hub>` uploads one with ``huggingface_hub``'s
``upload_folder``; :meth:`Task.from_pretrained <inca.task.Task.from_pretrained>`
downloads one with ``snapshot_download``. ``huggingface_hub`` is imported only then.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from inca._version import __version__
from inca.task.schema import TASK_FILES, TaskError

if TYPE_CHECKING:
    from inca.task.model import Task

_HINT = "pip install huggingface_hub (it comes with inca[hf] and inca[timm])"
_MAX_CLASSES_SHOWN = 100


def model_card(task: Task) -> str:
    """The ``README.md`` of a task folder: YAML front matter for the hub, then Markdown."""
    info = task.backbone_info
    name = info.get("name", "?")
    body = [f"# inca task: {len(task.classes)} classes on `{name}`", "",
            "Adapters trained by inca (InCA: cross-attention adapters over the activations "
            "of a frozen backbone, Dukler et al., NeurIPS 2023). Only the adapters are "
            f"stored ({task.num_parameters():,} parameters in `adapter_model.safetensors`); "
            "the backbone is created again from its record in `task.json` and checked by "
            "its weights fingerprint.", "",
            "## Use", "", "```python", "import inca", "",
            'task = inca.Task.from_pretrained("<this repo id or folder>")',
            'task.predict(["image.png"])  # class names', "```", "",
            *_backbone_section(info)]
    shown = ", ".join(f"`{_cell(c)}`" for c in task.classes[:_MAX_CLASSES_SHOWN])
    more = len(task.classes) - _MAX_CLASSES_SHOWN
    body += ["", "## Classes", "", f"{len(task.classes)}: {shown}"
             + (f" and {more:,} more" if more > 0 else ""), "",
             "## Chosen adapters", "", "| member | kind | layers | parameters |",
             "|---|---|---|---:|"]
    for key, layers, member in zip(task.keys, task.member_layers, task.members, strict=True):
        body.append(f"| {_cell(key)} | {_cell(member.spec()['kind'])} | "
                    f"{_cell(', '.join(layers))} | {member.num_parameters():,} |")
    body += ["", "## Metrics", "", *(_metric_lines(task.metrics or {})
                                     or ["No metrics were recorded."])]
    body += ["", "## License", "", f"`{task.license}`" if task.license else
             "Not stated. The data the adapters were trained on and the backbone's license "
             "decide it: set `task.license` (e.g. `\"apache-2.0\"`) before "
             "`save_pretrained` or `push_to_hub`. inca itself is Apache-2.0."]
    if task.report is not None:  # its headings two levels down, under this card's
        body += ["", "## Fit report", "", *("##" + line if line.startswith("#") else line
                                             for line in task.report.to_markdown().splitlines())]
    return "\n".join(_front_matter(task) + body).rstrip() + "\n"


def _front_matter(task: Task) -> list[str]:
    """The hub's YAML: library, tags, base model, license, metrics and model index."""
    source = task.backbone_info.get("source") or {}
    front = ["---", "library_name: inca", "tags:",
             *(f"- {t}" for t in ("inca", "image-classification", "vision", "adapters",
                                  "frozen-backbone")),
             "pipeline_tag: image-classification"]
    base = source.get("hub_id") or (source.get("pretrained")
                                    and _DINOV2_HUB.get(str(source.get("spec"))))
    if base:
        front.append(f"base_model: {json.dumps(base)}")
    if task.license:
        front.append(f"license: {task.license}")
    return [*front, "metrics:", "- accuracy", *_model_index(task), "---", ""]


def _backbone_section(info: dict[str, Any]) -> list[str]:
    """How the backbone is created again, its weights and its input."""
    source = info.get("source") or {}
    lines = ["## Backbone", "", f"- name: `{info.get('name', '?')}`",
             f"- weights fingerprint: `{info.get('fingerprint', '?')}`"]
    if source:
        args = [repr(source.get("spec")),
                *(f"{k}={v!r}" for k, v in (source.get("kwargs") or {}).items())]
        lines.append(f"- created with: `inca.create_backbone({', '.join(args)})`")
        lines.append(f"- pretrained weights: {'yes' if source.get('pretrained') else 'no'}")
        for key, label in (("hub_id", "hub id"), ("revision", "revision"),
                           ("checkpoint_path", "local checkpoint")):
            if source.get(key):
                lines.append(f"- {label}: `{source[key]}`")
    prep = info.get("preprocessing") or {}
    if prep:
        lines.append(f"- input: {prep.get('input_size')} px, mean {prep.get('mean')}, "
                     f"std {prep.get('std')}, {prep.get('interpolation', 'bicubic')} resize")
    return lines


def _metric_lines(metrics: dict[str, Any]) -> list[str]:
    """Validation and test accuracies, and the classes added since the fit."""
    lines = []
    if metrics.get("val_accuracy") is not None:
        lines.append(f"- validation accuracy ({metrics.get('chosen', 'chosen')}): "
                     f"{metrics['val_accuracy']:.4f}")
    for cand, acc in (metrics.get("test_accuracy") or {}).items():
        if acc is not None:
            lines.append(f"- test accuracy ({cand}; reported, never used to choose): "
                         f"{acc:.4f}")
    for step in metrics.get("classes_added") or []:  # inca.add_classes, in order
        accs = ", ".join(f"{m['val_accuracy']:.4f}" for m in step.get("members", []))
        lines.append(f"- classes added after the fit: {', '.join(map(_cell, step['classes']))} "
                     f"({step.get('train_samples', '?')} training images; validation "
                     f"accuracy over every class: {accs})")
    return lines


# The bundled DINOv2 backbones are Meta's checkpoints on the hub.
_DINOV2_HUB = {f"dinov2_vit{k}14": f"facebook/dinov2-{v}" for k, v in
               (("s", "small"), ("b", "base"), ("l", "large"), ("g", "giant"))}


def _model_index(task: Task) -> list[str]:
    """The hub's ``model-index`` front matter: the test accuracy of each candidate the fit
    scored (none when there was no test split)."""
    tested = {k: v for k, v in ((task.metrics or {}).get("test_accuracy") or {}).items()
              if v is not None}
    if not tested:
        return []
    lines = ["model-index:", f"- name: {json.dumps(f'inca task ({len(task.classes)} classes)')}",
             "  results:", "  - task:", "      type: image-classification",
             "    dataset:", "      name: test split",
             "      type: image-classification", "    metrics:"]
    for cand, acc in tested.items():
        lines += ["    - type: accuracy", f"      value: {float(acc):.6g}",
                  f"      name: {json.dumps(f'test accuracy ({cand})')}"]
    return lines


def _cell(text: str) -> str:
    """``text`` safe inside a Markdown table cell or code span."""
    return str(text).replace("|", "\\|").replace("`", "'").replace("\n", " ")


def task_folder(folder_or_repo_id: str | Path, *, revision: str | None = None,
                token: str | bool | None = None, cache_dir: str | Path | None = None) -> Path:
    """The local folder of a task: the folder given, or a hub repo's task files downloaded
    (``snapshot_download``, into the hub's cache).

    Raises:
        TaskError: it is neither a folder here nor a hub repo that could be downloaded.
    """
    text = str(folder_or_repo_id)
    path = Path(text).expanduser()
    if (isinstance(folder_or_repo_id, Path) or path.exists()
            or text.startswith((".", "/", "~", "\\")) or text.count("/") != 1):
        return path
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import EntryNotFoundError
    except ImportError as e:
        raise TaskError(f"{text!r} is not a folder here, and downloading it as a Hugging "
                        f"Face hub repo needs huggingface_hub: {_HINT}") from e
    try:
        return Path(snapshot_download(text, revision=revision, token=token,
                                      cache_dir=cache_dir, allow_patterns=list(TASK_FILES),
                                      library_name="inca", library_version=__version__))
    except (OSError, ValueError, EntryNotFoundError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TaskError(f"{text!r} is not a folder here, and downloading it as a Hugging "
                        f"Face hub repo failed ({first}); check the id, your token and "
                        "network, or give a local task folder") from e


def push_task(task: Task, repo_id: str, *, token: str | bool | None = None,
              private: bool | None = None, revision: str | None = None,
              commit_message: str = "Upload inca task", create_pr: bool = False) -> Any:
    """Upload ``task`` (saved into a temporary folder) to the hub model repo ``repo_id``,
    created if needed; task files the new upload lacks (an old ``report.json``) go.

    Returns:
        ``huggingface_hub``'s ``CommitInfo``.

    Raises:
        TaskError: huggingface_hub is missing, or the hub refused (id, token, network).
    """
    try:
        from huggingface_hub import HfApi
    except ImportError as e:
        raise TaskError(f"pushing a task to the Hugging Face hub needs huggingface_hub: "
                        f"{_HINT}") from e
    api = HfApi(token=token, library_name="inca", library_version=__version__)
    with tempfile.TemporaryDirectory(prefix="inca-push-") as tmp:
        folder = task.save_pretrained(Path(tmp) / "task")
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            if revision is not None:
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            return api.upload_folder(repo_id=repo_id, folder_path=folder,
                                     commit_message=commit_message, revision=revision,
                                     create_pr=create_pr, allow_patterns=list(TASK_FILES),
                                     delete_patterns=list(TASK_FILES))
        except (OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise TaskError(f"pushing the task to the Hugging Face hub repo {repo_id!r} "
                            f"failed ({first}); check the id, your token (huggingface-cli "
                            "login) and the network") from e
