"""The task: a fitted head over a frozen backbone, and its folder format.

Written by training (:func:`inca.fit`), read by the runtime (:class:`inca.runtime.MultiTaskModel`,
the HTTP service); it imports neither. One job per module:

- :mod:`~inca.task.schema`: the file names, ``task.json``'s fields and bounds, their checks.
- :mod:`~inca.task.files`: reading a folder checked (:func:`read_task_files`) and saving one
  by an atomic swap (:func:`write_task_folder`).
- :mod:`~inca.task.report`: the fit report saved with the task (:class:`FitReport`).
- :mod:`~inca.task.model`: :class:`Task` (an ``nn.Module``) and :func:`load_task`.
- :mod:`~inca.task.backbone`: the recorded backbone created again and checked.
- :mod:`~inca.task.export`: :class:`TaskModule`, backbone and heads as one plain module.
- :mod:`~inca.task.hub`: the model card, Hugging Face hub download and upload.
"""

from inca.task.backbone import check_backbone, task_backbone
from inca.task.export import TaskModule
from inca.task.files import TaskFiles, read_task_files, write_task_folder
from inca.task.model import Task, load_task
from inca.task.report import FitReport, selection_key
from inca.task.schema import (
    TASK_CARD,
    TASK_FILES,
    TASK_FORMAT,
    TASK_JSON,
    TASK_REPORT,
    TASK_WEIGHTS,
    TaskError,
)

__all__ = [
    "TASK_CARD",
    "TASK_FILES",
    "TASK_FORMAT",
    "TASK_JSON",
    "TASK_REPORT",
    "TASK_WEIGHTS",
    "FitReport",
    "Task",
    "TaskError",
    "TaskFiles",
    "TaskModule",
    "check_backbone",
    "load_task",
    "read_task_files",
    "selection_key",
    "task_backbone",
    "write_task_folder",
]
