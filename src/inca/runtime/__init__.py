"""Inference: fitted tasks, and many tasks on one backbone pass."""

from inca.runtime.export import TaskModule
from inca.runtime.multitask import MultiTaskModel
from inca.runtime.task import Task, TaskError, load_task

__all__ = ["MultiTaskModel", "Task", "TaskError", "TaskModule", "load_task"]
