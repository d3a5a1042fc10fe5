"""Planning an edit without a model: resolve the spec's defaults, prepare the inputs at the working size, build the
task (geometry, masks, cells). Everything here needs only the model's grid factors, recommended settings and
default working size, which `loading.describe_model` reads from its configuration files, so the command line
checks a job completely before loading anything, and hands the same `Plan` to the edit.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Callable

from .inputs import Prepared, load_image
from .inversion import Inversion
from .limits import DEFAULT_MAX_RESOLUTION
from .spec import EditSpec
from .tasks import TASKS
from .tasks.base import Task


@dataclass(frozen=True)
class Plan:
    """An edit planned for one model's grid and settings: the resolved spec (every default filled), the inputs at
    the working size and the built task. `made_for` records what it was planned with (grid factors, recommended
    settings, default working size): `DragonPipeline.edit` takes a plan only for a model with the same. Unpacks as
    (spec, prep, task)."""

    spec: EditSpec
    prep: Prepared
    task: Task
    made_for: tuple

    def __iter__(self):
        return iter((self.spec, self.prep, self.task))


def planned_for(factors: tuple, recommended: dict | None, default_max_resolution: int) -> tuple:
    """What a plan depends on besides its spec (compared by `DragonPipeline.edit`)."""
    return tuple(factors), json.dumps(recommended or {}, sort_keys=True), int(default_max_resolution)


def plan_edit(spec: EditSpec, *, factors: tuple[int, int], recommended: dict | None = None,
              default_max_resolution: int = DEFAULT_MAX_RESOLUTION, prepare: Callable | None = None) -> Plan:
    """Steps 2-4 of an edit, none of which needs the model; raises the same named errors the edit would.
    `factors` = the backbone's (vae_factor, feature_factor); `prepare(spec)` makes the `Prepared` (the pipeline's
    also takes an `Inversion`); by default the image is loaded and resized."""
    if not isinstance(spec, EditSpec):
        raise TypeError(f"spec: expected an EditSpec, got {type(spec).__name__}")
    inversion = spec.image if isinstance(spec.image, Inversion) else None
    resolved = spec.resolved(recommended, inversion, default_max_resolution)
    info = TASKS[resolved.task]
    if info.frame is not None:  # the task edits a crop of the photo (face: the aligned face)
        if inversion is not None:
            raise ValueError(f"image: task {resolved.task!r} edits a crop it makes from the photo; pass the photo, "
                             "not an Inversion")
        frame = info.frame(resolved, load_image(resolved.image, "image"))
        prep = dataclasses.replace(Prepared.from_image(frame.image, resolved.max_resolution, *factors), frame=frame)
    elif prepare is not None:
        prep = prepare(resolved)
    else:
        prep = Prepared.from_image(load_image(resolved.image, "image"), resolved.max_resolution, *factors)
    return Plan(resolved, prep, info.build(resolved, prep),
                planned_for(factors, recommended, default_max_resolution))
