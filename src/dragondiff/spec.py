"""`EditSpec`: one typed, validated, serialisable description of an edit.

An edit is the fields every task shares (task, image, prompt, guidance settings, preset, seed, steps, resolution)
plus `params`, the task's own frozen parameters (`MoveParams`, `DragParams`, ...: declared in its task module with
types, defaults, ranges and docs). The Python API (`pipe.move(...)` and friends), `pipe.edit(spec)`, spec files and
results all speak it:

    spec = EditSpec(task="move", image="cup.png", mask="cup_mask.png", offset=(120, 0), prompt="a cup")
    spec.params                   # MoveParams(mask='cup_mask.png', offset=(120.0, 0.0), scale=1.0, ...)
    out = pipe.edit(spec)
    out.spec.to_json()            # the resolved spec: every default filled in, re-runnable with pipe.edit

The constructor takes the task's fields as keywords (as above), or `params=` (a Params instance or a dict). A task
field left None takes its default from the task's Params; a common field left None takes the task's official
setting (`TaskInfo.settings`), or for `guidance_scale` / `energy_scale` the model's recommended settings when it
ships them, when the spec is resolved. Every error names the field. Image and mask fields accept paths
(serialisable) or in-memory images (PIL, arrays; `image` also an `Inversion`), which serialise as a short
description only.

JSON is flat: the task's fields sit beside the common ones (`{"task": "move", "image": ..., "mask": ...,
"offset": [...], ...}`), as every spec file and sidecar written so far; `from_dict` routes those keys into params.
For convenience the task's fields also read as attributes (`spec.offset` is `spec.params.offset`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .limits import DEFAULT_MAX_RESOLUTION, DEFAULT_PRESET, DEFAULT_SEED, LIMITS, check, check_prompt
from .presets import PRESETS
from .tasks import TASKS
from .tasks.params import Params, kind_of, required
from .validate import shown

Point = tuple[float, float]
# How a two-image task's image prompt reads the base image's tokens: as the official code (through the text K/V,
# at every step) or through the adapter's K/V like the reference's.
IP_ROUTINGS = {"official": "the base image's tokens read as text, as the official code",
               "adapter": "every image token read by the adapter's layers"}

# Every task's own field names (a flat spec file may carry another task's fields as null: old sidecars do).
PARAM_FIELDS: dict[str, Any] = {}
for _info in TASKS.values():
    for _f in dataclasses.fields(_info.params):
        PARAM_FIELDS.setdefault(_f.name, _f)
# Fields that hold images or masks (paths, or in-memory objects), derived from the tasks' Params.
SOURCE_FIELDS = ("image",) + tuple(n for n, f in PARAM_FIELDS.items() if kind_of(f).source)


def _check_bank_steps(value) -> tuple[int, Optional[int]]:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"bank_steps: expected a (first, last) pair of step indices (last may be None), got {shown(value)}")
    first, last = value
    first = check("bank_step", first, "bank_steps first")
    if last is not None:
        last = check("bank_step", last, "bank_steps last")
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


def _json(value):
    return json.loads(json.dumps(value)) if isinstance(value, tuple) else value  # tuples -> lists


@dataclass(frozen=True, init=False)
class EditSpec:
    """One edit: the common fields below plus `params`, the task's own parameters (see the task's Params class,
    e.g. `dragondiff.tasks.move.MoveParams`). Coordinates are (x, y) in the original image's pixels;
    energy_scale is in the official demo's slider units (x1e3)."""

    task: str
    image: Any
    params: Params
    prompt: Optional[str] = None
    guidance_scale: Optional[float] = None
    energy_scale: Optional[float] = None
    gradient_coef: Optional[float] = None
    bank_steps: Optional[tuple[int, Optional[int]]] = None
    preset: str = DEFAULT_PRESET
    seed: int = DEFAULT_SEED
    num_inference_steps: Optional[int] = None
    max_resolution: Optional[int] = None
    sde_strength: Optional[float] = None
    image_prompt: Optional[bool] = None  # None: the preset's choice when an IP-Adapter is loaded
    ip_scale: Optional[float] = None
    ip_routing: Optional[str] = None  # two-image tasks: "official" (base tokens read as text) or "adapter"

    def __init__(self, task: str, image: Any, params: Params | dict | None = None, *, prompt: str | None = None,
                 guidance_scale: float | None = None, energy_scale: float | None = None,
                 gradient_coef: float | None = None, bank_steps: tuple[int, int | None] | None = None,
                 preset: str = DEFAULT_PRESET, seed: int = DEFAULT_SEED, num_inference_steps: int | None = None,
                 max_resolution: int | None = None, sde_strength: float | None = None,
                 image_prompt: bool | None = None, ip_scale: float | None = None, ip_routing: str | None = None,
                 **task_fields):
        """`task_fields`: the task's own fields as keywords (None = not given); with `params` given too, they
        replace those fields of it (so `dataclasses.replace(spec, mask=...)` works)."""
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (building a frozen dataclass)
        if not isinstance(task, str) or task not in TASKS:
            raise ValueError(f"task: unknown task {shown(task)}; allowed: {sorted(TASKS)}")
        set_("task", task)
        set_("params", self._params(task, params, task_fields))
        if image is None:
            raise ValueError("image: required")
        set_("image", str(image) if isinstance(image, Path) else image)
        if prompt is not None:
            check_prompt(prompt, "prompt")
        set_("prompt", prompt)
        for name, value in (("guidance_scale", guidance_scale), ("energy_scale", energy_scale),
                            ("gradient_coef", gradient_coef)):
            set_(name, None if value is None else check(name, value))
        set_("bank_steps", None if bank_steps is None else _check_bank_steps(bank_steps))
        if not isinstance(preset, str) or preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {shown(preset)}")
        set_("preset", preset)
        set_("seed", check("seed", seed))
        if num_inference_steps is not None:
            n, limit = num_inference_steps, LIMITS["num_inference_steps"]
            integer = isinstance(n, (int, np.integer)) and not isinstance(n, (bool, np.bool_))
            if not integer or not limit.low <= n <= limit.high:
                raise ValueError(f"num_inference_steps must be an integer in {limit.text}, got {shown(n)}")
            num_inference_steps = int(n)
        set_("num_inference_steps", num_inference_steps)
        if max_resolution is not None:
            limit = LIMITS["max_resolution"]
            if not isinstance(max_resolution, (int, np.integer)) or isinstance(max_resolution, bool):
                raise TypeError(f"max_resolution must be an int, got {type(max_resolution).__name__}")
            if not limit.low <= max_resolution <= limit.high:
                raise ValueError(f"max_resolution must be in {limit.text}, got {max_resolution}")
            max_resolution = int(max_resolution)
        set_("max_resolution", max_resolution)
        if sde_strength is not None:
            sde_strength = check("sde_strength", sde_strength)
            if sde_strength > 0 and PRESETS[preset].sde_window is None:
                raise ValueError(f"sde_strength={sde_strength:g}: the {preset!r} preset has no regional SDE; use "
                                 "'official'")
        set_("sde_strength", sde_strength)
        if image_prompt is not None and not isinstance(image_prompt, (bool, np.bool_)):
            raise TypeError(f"image_prompt: expected true, false or null (the preset's choice), got {shown(image_prompt)}")
        set_("image_prompt", None if image_prompt is None else bool(image_prompt))
        set_("ip_scale", None if ip_scale is None else check("ip_scale", ip_scale))
        if ip_routing is not None and ip_routing not in IP_ROUTINGS:
            raise ValueError(f"ip_routing: expected one of {list(IP_ROUTINGS)}, got {shown(ip_routing)}")
        set_("ip_routing", ip_routing)

    @staticmethod
    def _params(task: str, params, task_fields: dict) -> Params:
        cls = TASKS[task].params
        for name in task_fields:
            if name not in PARAM_FIELDS:
                raise TypeError(f"EditSpec() got an unexpected keyword argument {name!r}")
        # None means "not given"; a field of another task is refused only when it holds a value.
        given = {k: v for k, v in task_fields.items() if v is not None}
        if isinstance(params, Params):
            if type(params) is not cls:
                raise TypeError(f"params: a {type(params).__name__} for task {task!r}; expected {cls.__name__}")
            if not given:
                return params
            given = {**params.as_dict(), **given}
        elif isinstance(params, dict):
            given = {**{k: v for k, v in params.items() if v is not None}, **given}
        elif params is not None:
            raise TypeError(f"params: expected a {cls.__name__} or a dict, got {type(params).__name__}")
        return cls.build(given)

    def __getattr__(self, name: str):
        """The task's own fields read as attributes: `spec.offset` is `spec.params.offset`."""
        if name.startswith("__") or name == "params":
            raise AttributeError(name)
        params = object.__getattribute__(self, "params")
        if name in params.names():
            return getattr(params, name)
        raise AttributeError(f"{name}: not a field of EditSpec nor of task {self.task!r} (its fields: "
                             f"{', '.join(params.names())})")

    # ------------------------------------------------------------------------------------------- defaults

    def resolved(self, recommended: dict | None = None, inversion=None,
                 max_resolution: int = DEFAULT_MAX_RESOLUTION) -> "EditSpec":
        """A copy with every None that has a default filled in: the task's official gradient_coef and bank window,
        the model's recommended (else the official) CFG / energy / image-prompt scale, the inversion's prompt, steps and
        resolution (else `max_resolution`, the pipeline's default), and params that default to another field
        (reference_prompt: the prompt). The task's own defaults are filled in on construction already."""
        info = TASKS[self.task]
        values = {}
        for key in ("gradient_coef", "bank_steps"):
            if getattr(self, key) is None:
                values[key] = info.settings[key]
        for key in ("guidance_scale", "energy_scale", "ip_scale"):
            if getattr(self, key) is None:
                values[key] = (recommended or {}).get(self.task, {}).get(key, info.settings[key])
        if self.prompt is None:  # a task may fix its prompt (face: "a photo of a human face")
            values["prompt"] = info.settings.get("prompt", "") if inversion is None else inversion.prompt
        if self.num_inference_steps is None:
            values["num_inference_steps"] = (PRESETS[self.preset].steps if inversion is None
                                             else inversion.num_inference_steps)
        if self.max_resolution is None:
            values["max_resolution"] = max_resolution if inversion is None else inversion.max_resolution
        if self.sde_strength is None:  # the preset's, or the task's own where the preset has regional SDE
            preset_sde = PRESETS[self.preset].sde_strength
            values["sde_strength"] = info.settings.get("sde_strength", preset_sde) if preset_sde > 0 else preset_sde
        if self.ip_routing is None:
            values["ip_routing"] = "official"
        params = {}
        for f in self.params.fields():
            source = f.metadata["default_from"]
            if source is not None and getattr(self.params, f.name) is None:
                params[f.name] = values.get(source, getattr(self, source))
        if params:
            values["params"] = dataclasses.replace(self.params, **params)
        return dataclasses.replace(self, **values)

    # ---------------------------------------------------------------------------------------- serialising

    def to_dict(self) -> dict:
        """Flat JSON data: task, image, the task's own fields, then the common fields (what spec files and the
        sidecars of every release hold)."""
        out = {"task": self.task, "image": describe_source(self.image)}
        for f in self.params.fields():
            value = getattr(self.params, f.name)
            out[f.name] = describe_source(value) if kind_of(f).source else _json(value)
        for f in fields(self):
            if f.name not in ("task", "image", "params"):
                out[f.name] = _json(getattr(self, f.name))
        return out

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **{"indent": 1, **kwargs})

    @classmethod
    def from_dict(cls, data: dict, base_dir: str | os.PathLike | None = None) -> "EditSpec":
        """Build from JSON data (flat; a nested "params" object is accepted too); relative paths are taken
        relative to `base_dir` (a spec file's folder). Another task's fields may be present as null."""
        if not isinstance(data, dict):
            raise TypeError(f"spec: expected a JSON object, got {type(data).__name__}")
        data = dict(data)
        nested = data.pop("params", None)
        if nested is not None:
            if not isinstance(nested, dict):
                raise TypeError(f"params: expected a JSON object, got {type(nested).__name__}")
            for key, value in nested.items():
                if data.get(key) is not None:
                    raise ValueError(f"{key}: given both flat and in params")
                data[key] = value
        known = {"task", "image"} | COMMON_FIELDS | set(PARAM_FIELDS)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown field; allowed: {sorted(known)}")
        for name in SOURCE_FIELDS:
            value = data.get(name)
            if isinstance(value, str) and value.startswith("<in-memory"):
                raise ValueError(f"{name}: {value} cannot be loaded from a spec; give a file path")
            if isinstance(value, str) and base_dir is not None and not os.path.isabs(value):
                data[name] = str(Path(base_dir) / value)
        for name in ("offset", "bank_steps"):
            if isinstance(data.get(name), list):
                data[name] = tuple(data[name])
        if "task" not in data or "image" not in data:
            raise ValueError(f"{'task' if 'task' not in data else 'image'}: required")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str, base_dir=None) -> "EditSpec":
        return cls.from_dict(json.loads(text), base_dir)

    @staticmethod
    def json_schema() -> dict:
        """JSON schema of the serialised (flat) form, derived from the tasks' Params and `dragondiff.limits`
        (image and mask fields are file paths there). Each task's clause requires its own required fields and
        allows another task's fields only as null."""
        def common(name, kind="number"):
            limit = LIMITS[name]
            return {"type": ["integer" if limit.integer else kind, "null"], "minimum": limit.low,
                    "maximum": limit.high, "description": limit.doc}

        props = {"task": {"enum": sorted(TASKS)}, "image": {"type": ["string", "null"], "description": "file path"}}
        for name, f in PARAM_FIELDS.items():
            widest = [g for info in TASKS.values() for g in dataclasses.fields(info.params) if g.name == name]
            props[name] = _field_schema(max(widest, key=lambda g: g.metadata["high"] or 0))
        props.update({
            "prompt": {"type": ["string", "null"]},
            "guidance_scale": common("guidance_scale"),
            "energy_scale": common("energy_scale"),
            "gradient_coef": common("gradient_coef"),
            "bank_steps": {"type": ["array", "null"], "minItems": 2, "maxItems": 2,
                           "items": {"type": ["integer", "null"], "minimum": LIMITS["bank_step"].low,
                                     "maximum": LIMITS["bank_step"].high},
                           "description": "(first, last) steps that use the memory bank; last may be null"},
            "preset": {"enum": sorted(PRESETS)},
            "seed": {"type": "integer", "minimum": LIMITS["seed"].low, "maximum": LIMITS["seed"].high},
            "num_inference_steps": common("num_inference_steps"),
            "max_resolution": common("max_resolution"),
            "sde_strength": common("sde_strength"),
            "image_prompt": {"type": ["boolean", "null"],
                             "description": "use the IP-Adapter image prompt; null: the preset's choice"},
            "ip_scale": common("ip_scale"),
            "ip_routing": {"enum": [*IP_ROUTINGS, None], "description": "; ".join(
                f"{k}: {v}" for k, v in IP_ROUTINGS.items())},
        })
        clauses = []
        for name, info in TASKS.items():
            own = {f.name: _field_schema(f) for f in info.params.fields()}
            others = {n: {"type": "null"} for n in PARAM_FIELDS if n not in own}
            required_ = [f.name for f in info.params.fields() if required(f)]
            clauses.append({"if": {"properties": {"task": {"const": name}}},
                            "then": {"required": required_, "properties": {**own, **others}}})
        return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "EditSpec", "type": "object",
                "properties": props, "required": ["task", "image"], "additionalProperties": False,
                "allOf": clauses}


COMMON_FIELDS = {f.name for f in fields(EditSpec)} - {"task", "image", "params"}


def _field_schema(f: dataclasses.Field) -> dict:
    """JSON schema of one Params field (null allowed: the field's default)."""
    out = kind_of(f).schema(f)
    if f.default is not dataclasses.MISSING and f.default is not None:
        out["default"] = _json(f.default)
    return out
