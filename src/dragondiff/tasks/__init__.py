"""One module per editing task; each exposes a `build_<task>` that validates geometry and returns a Task."""

from .appearance import build_appearance
from .drag import build_drag
from .move import build_move
from .paste import build_paste

TASKS = {"move": build_move, "drag": build_drag, "appearance": build_appearance, "paste": build_paste}

__all__ = ["TASKS", "build_appearance", "build_drag", "build_move", "build_paste"]
