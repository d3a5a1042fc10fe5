"""`EditSpec`: one typed, validated, serialisable description of an edit.

The Python API (`pipe.move(...)` and friends), `pipe.edit(spec)`, spec files and results all speak it:

    spec = EditSpec(task="move", image="cup.png", mask="cup_mask.png", offset=(120, 0), prompt="a cup")
    out = pipe.edit(spec)
    out.spec.to_json()            # the resolved spec: every default filled in, re-runnable with pipe.edit

Fields a task does not use must stay None; a field left None takes the task's default (declared once, in the
task registry `dragondiff.tasks.TASKS`), or for `guidance_scale` / `energy_scale` the model's recommended
settings when it ships them. Every error names the field. Image and mask fields accept paths (serialisable) or
in-memory images (PIL, arrays; `image` also an `Inversion`), which serialise as a short description only.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .validate import check_int, check_number, check_offset, check_point, check_scale, check_string

Point = tuple[float, float]
SEED_LIMIT = 2**63  # torch.Generator.manual_seed accepts [-2**63, 2**64); we keep seeds non-negative int64

# Fields that hold images or masks (paths, or in-memory objects).
SOURCE_FIELDS = ("image", "mask", "reference", "reference_mask", "reference_region")
# Per-task fields (the rest are common to every task).
TASK_FIELDS = ("mask", "reference", "reference_mask", "reference_region", "offset", "scale", "points",
               "reference_prompt", "w_edit", "w_content", "w_contrast", "w_inpaint")


def _check_points(points) -> tuple:
    if isinstance(points, np.ndarray):
        points = points.tolist()
    if isinstance(points, (str, bytes)) or not isinstance(points, (list, tuple)) or len(points) == 0:
        raise TypeError("points: expected a non-empty list of ((hx, hy), (tx, ty)) pairs")
    out = []
    for k, pair in enumerate(points):
        if not isinstance(pair, (list, tuple, np.ndarray)) or len(pair) != 2:
            raise TypeError(f"points[{k}]: expected a (handle, target) pair of (x, y) points, got {pair!r}")
        out.append(tuple(check_point(p, f"points[{k}] {role}") for p, role in zip(pair, ("handle", "target"))))
    return tuple(out)


def _check_bank_steps(value) -> tuple[int, Optional[int]]:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"bank_steps: expected a (first, last) pair of step indices (last may be None), got {value!r}")
    first, last = value
    first = check_int(first, "bank_steps first", 0, 1000)
    if last is not None:
        last = check_int(last, "bank_steps last", 0, 1000)
        if last < first:
            raise ValueError(f"bank_steps: last step {last} comes before first step {first}")
    return first, last


def describe_source(value) -> Any:
    """JSON form of an image/mask field: a path as a string; an in-memory object as a short description."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, np.ndarray):
        return f"<in-memory array {'x'.join(map(str, value.shape))} {value.dtype}>"
    return f"<in-memory {type(value).__name__}>"


@dataclass(frozen=True)
class EditSpec:
    """One edit. Coordinates are (x, y) in the original image's pixels; energy_scale is in the official demo's
    slider units (x1e3). See the task methods of `DragonPipeline` for what each field means per task."""

    task: str
    image: Any
    mask: Any = None
    reference: Any = None
    reference_mask: Any = None
    reference_region: Any = None
    offset: Optional[Point] = None
    scale: Optional[float] = None
    points: Optional[tuple[tuple[Point, Point], ...]] = None
    prompt: Optional[str] = None
    reference_prompt: Optional[str] = None
    w_edit: Optional[float] = None
    w_content: Optional[float] = None
    w_contrast: Optional[float] = None
    w_inpaint: Optional[float] = None
    guidance_scale: Optional[float] = None
    energy_scale: Optional[float] = None
    gradient_coef: Optional[float] = None
    bank_steps: Optional[tuple[int, Optional[int]]] = None
    preset: str = "official"
    seed: int = 42
    num_inference_steps: Optional[int] = None
    max_resolution: Optional[int] = None
    sde_strength: Optional[float] = None

    def __post_init__(self):
        from .presets import PRESETS
        from .tasks import TASKS

        if self.task not in TASKS:
            raise ValueError(f"task: unknown task {self.task!r}; allowed: {sorted(TASKS)}")
        info = TASKS[self.task]
        for name in TASK_FIELDS:
            if getattr(self, name) is not None and name not in info.fields:
                raise ValueError(f"{name}: not used by task {self.task!r} (its fields: {', '.join(info.fields)})")
        for name in info.required:
            if getattr(self, name) is None:
                raise ValueError(f"{name}: required by task {self.task!r}")
        if self.image is None:
            raise ValueError("image: required")
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (normalising a frozen dataclass)
        for name in SOURCE_FIELDS:
            value = getattr(self, name)
            if isinstance(value, Path):
                set_(name, str(value))
        if self.offset is not None:
            set_("offset", check_offset(self.offset))
        if self.scale is not None:
            set_("scale", check_scale(self.scale, "scale", info.max_scale))
        if self.points is not None:
            set_("points", _check_points(self.points))
        for name in ("prompt", "reference_prompt"):
            if getattr(self, name) is not None:
                check_string(getattr(self, name), name)
        for name in ("w_edit", "w_content", "w_contrast", "w_inpaint", "gradient_coef"):
            if getattr(self, name) is not None:
                set_(name, check_number(getattr(self, name), name))
        if self.guidance_scale is not None:
            set_("guidance_scale", check_number(self.guidance_scale, "guidance_scale", 0, 50))
        if self.energy_scale is not None:
            set_("energy_scale", check_number(self.energy_scale, "energy_scale", 0, 100))
        if self.bank_steps is not None:
            set_("bank_steps", _check_bank_steps(self.bank_steps))
        if not isinstance(self.preset, str) or self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        set_("seed", check_int(self.seed, "seed", 0, SEED_LIMIT - 1))
        if self.num_inference_steps is not None:
            n = self.num_inference_steps
            if not isinstance(n, (int, np.integer)) or isinstance(n, (bool, np.bool_)) or not 1 <= n <= 1000:
                raise ValueError(f"num_inference_steps must be an integer in 1..1000, got {n!r}")
            set_("num_inference_steps", int(n))
        if self.max_resolution is not None:
            if not isinstance(self.max_resolution, (int, np.integer)) or isinstance(self.max_resolution, bool):
                raise TypeError(f"max_resolution must be an int, got {type(self.max_resolution).__name__}")
            if not 64 <= self.max_resolution <= 2048:
                raise ValueError(f"max_resolution must be in 64..2048, got {self.max_resolution}")
            set_("max_resolution", int(self.max_resolution))
        if self.sde_strength is not None:
            set_("sde_strength", check_number(self.sde_strength, "sde_strength", 0, 1))
            if self.sde_strength > 0 and PRESETS[self.preset].sde_window is None:
                raise ValueError(f"sde_strength={self.sde_strength:g}: the {self.preset!r} preset has no regional "
                                 "SDE; use 'official'")

    # ------------------------------------------------------------------------------------------- defaults

    def resolved(self, recommended: dict | None = None, inversion=None, max_resolution: int = 768) -> "EditSpec":
        """A copy with every None that has a default filled in: the task's weights and bank window, the model's
        recommended (else the official) CFG / energy scale, the inversion's prompt, steps and resolution (else
        `max_resolution`, the pipeline's default)."""
        from .presets import PRESETS
        from .tasks import TASKS

        info = TASKS[self.task]
        values = {}
        for key, default in info.defaults.items():
            if getattr(self, key) is None:
                values[key] = default
        for key in ("guidance_scale", "energy_scale"):
            if getattr(self, key) is None:
                values[key] = (recommended or {}).get(self.task, {}).get(key, info.settings[key])
        if self.prompt is None:
            values["prompt"] = "" if inversion is None else inversion.prompt
        if "reference_prompt" in info.fields and self.reference_prompt is None:
            values["reference_prompt"] = values.get("prompt", self.prompt)
        if self.num_inference_steps is None:
            values["num_inference_steps"] = (PRESETS[self.preset].steps if inversion is None
                                             else inversion.num_inference_steps)
        if self.max_resolution is None:
            values["max_resolution"] = max_resolution if inversion is None else inversion.max_resolution
        if self.sde_strength is None:
            values["sde_strength"] = PRESETS[self.preset].sde_strength
        return dataclasses.replace(self, **values)

    # ---------------------------------------------------------------------------------------- serialising

    def to_dict(self) -> dict:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in SOURCE_FIELDS:
                value = describe_source(value)
            elif isinstance(value, tuple):
                value = json.loads(json.dumps(value))  # tuples -> lists
            out[f.name] = value
        return out

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **{"indent": 1, **kwargs})

    @classmethod
    def from_dict(cls, data: dict, base_dir: str | os.PathLike | None = None) -> "EditSpec":
        """Build from JSON data; relative paths are taken relative to `base_dir` (a spec file's folder)."""
        if not isinstance(data, dict):
            raise TypeError(f"spec: expected a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown field; allowed: {sorted(known)}")
        data = dict(data)
        for name in SOURCE_FIELDS:
            value = data.get(name)
            if isinstance(value, str) and value.startswith("<in-memory"):
                raise ValueError(f"{name}: {value} cannot be loaded from a spec; give a file path")
            if isinstance(value, str) and base_dir is not None and not os.path.isabs(value):
                data[name] = str(Path(base_dir) / value)
        if isinstance(data.get("offset"), list):
            data["offset"] = tuple(data["offset"])
        if isinstance(data.get("bank_steps"), list):
            data["bank_steps"] = tuple(data["bank_steps"])
        if "task" not in data or "image" not in data:
            raise ValueError(f"{'task' if 'task' not in data else 'image'}: required")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str, base_dir=None) -> "EditSpec":
        return cls.from_dict(json.loads(text), base_dir)

    @staticmethod
    def json_schema() -> dict:
        """JSON schema of the serialised form (image and mask fields are file paths there)."""
        from .presets import PRESETS
        from .tasks import TASKS

        num = {"type": ["number", "null"]}
        point = {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 2}
        props = {
            "task": {"enum": sorted(TASKS)},
            **{name: {"type": ["string", "null"], "description": "file path"} for name in SOURCE_FIELDS},
            "offset": {"oneOf": [point, {"type": "null"}], "description": "(dx, dy) original pixels"},
            "scale": num,
            "points": {"type": ["array", "null"], "minItems": 1,
                       "items": {"type": "array", "items": point, "minItems": 2, "maxItems": 2},
                       "description": "[[handle_xy, target_xy], ...] original pixels"},
            "prompt": {"type": ["string", "null"]},
            "reference_prompt": {"type": ["string", "null"]},
            **{name: num for name in ("w_edit", "w_content", "w_contrast", "w_inpaint", "guidance_scale",
                                      "energy_scale", "gradient_coef", "sde_strength")},
            "bank_steps": {"type": ["array", "null"], "items": {"type": ["integer", "null"]}, "minItems": 2,
                           "maxItems": 2},
            "preset": {"enum": sorted(PRESETS)},
            "seed": {"type": "integer", "minimum": 0, "maximum": SEED_LIMIT - 1},
            "num_inference_steps": {"type": ["integer", "null"], "minimum": 1, "maximum": 1000},
            "max_resolution": {"type": ["integer", "null"], "minimum": 64, "maximum": 2048},
        }
        return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "EditSpec", "type": "object",
                "properties": props, "required": ["task", "image"], "additionalProperties": False}
