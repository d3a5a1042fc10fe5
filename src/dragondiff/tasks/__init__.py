"""The task registry: one module per editing task, each exposing `INFO` (a `TaskInfo`: its typed `Params` (fields,
defaults, ranges, docs), the official CFG / energy settings, and `from_spec`, which validates the geometry and
builds the Task).

Adding a task is one module with an `INFO` plus a line here.
"""

from . import appearance, drag, face, move, paste
from .base import TaskInfo
from .params import Params

TASKS: dict[str, TaskInfo] = {info.name: info for info in (move.INFO, drag.INFO, appearance.INFO, paste.INFO,
                                                            face.INFO)}

__all__ = ["TASKS", "Params", "TaskInfo"]
