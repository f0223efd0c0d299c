"""Serving: many tasks on one backbone pass (:class:`MultiTaskModel`), and the HTTP service.

The task itself (``Task``, ``load_task``, its folder format) is :mod:`inca.task`; the names
below it are re-exported here for code written before it moved.
"""

from inca.runtime.multitask import MultiTaskModel
from inca.task import Task, TaskError, TaskModule, load_task  # noqa: F401 - compatibility

__all__ = ["MultiTaskModel"]
