"""A task's own parameters, typed: each task module declares a frozen `Params` dataclass whose fields carry their
kind, default, range and a one-line doc (`param(...)`). The spec validates them, the JSON schema, the CLI options
and `dragondiff.cli.runner.check_inputs` are derived from them; nothing else lists a task's fields.

    @dataclass(frozen=True)
    class MoveParams(Params):
        mask: Any = param(kind=MASK, of="image", doc="the object")
        offset: tuple[float, float] = param((0.0, 0.0), kind=OFFSET, doc="(dx, dy) in original pixels")

A field without a default is required. None given for a field that has a default takes the default (so callers
may pass None for "not given"); `default_from` names the common spec field a None resolves to (`reference_prompt`
takes the prompt).

What a kind means lives in one `Kind` object in `KINDS`: how a value is checked and normalised (`check`), its JSON
schema (`schema`), its command-line option (`cli`: a CLI type name that `dragondiff.cli.options` maps to a click
type, whether the option repeats and is required, its help), the file check before an edit (`read`) and the range
help texts show (`range_text`). Adding a kind is one entry in `KINDS` (plus, for a new CLI type name, its click type in
`dragondiff.cli.options.CLI_TYPES`)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from ..limits import LIMITS, check_prompt
from ..validate import check_number, check_offset, check_point, check_scale, shown

# The kinds of parameter (their `Kind` objects are in `KINDS` below).
IMAGE = "image"  # an image: a path (serialisable) or an in-memory image
MASK = "mask"  # a mask the size of the image named by its `of`: a path or an in-memory mask
OFFSET = "offset"  # (dx, dy) in original pixels
POINTS = "points"  # ((handle_xy, target_xy), ...) in original pixels
SCALE = "scale"  # a size factor in (0, high]
NUMBER = "number"  # a float in [low, high]
TEXT = "text"  # a prompt
LANDMARKS = "landmarks"  # 68 (x, y) points: an array-like or a path to a JSON / .npy / text file
GROUPS = "groups"  # names of landmark groups (jaw, brows, nose, eyes, mouth): a list or "a,b,c"
FACE = "face"  # which detected face: an index, or a box (x0, y0, x1, y1) around it; a string "2" or "x0,y0,x1,y1"
FACE_GROUPS = ("jaw", "brows", "nose", "eyes", "mouth")  # dragondiff.face.GROUPS's names, in its order


def param(default=dataclasses.MISSING, *, kind: str, doc: str, low: float | None = None,
          high: float | None = None, of: str | None = None, default_from: str | None = None,
          default_text: str | None = None, group: str | None = None):
    """A Params field. kind: a name in `KINDS`; low/high: the range of a NUMBER (or the top of a SCALE);
    of: for a MASK, the image field whose size it has; default_from: the common spec field a None resolves to;
    default_text: how help texts name a default that is not a value ("the background"); group: "weight" for
    the energy weights (listed after the common options on the command line)."""
    if kind not in KINDS:
        raise ValueError(f"kind: unknown parameter kind {kind!r}; known: {', '.join(KINDS)}")
    meta = {"kind": kind, "doc": doc, "low": low, "high": high, "of": of, "default_from": default_from,
            "default_text": default_text, "group": group}
    return dataclasses.field(default=default, metadata=meta)


def weight(default: float, doc: str):
    """An energy weight: a NUMBER in the energy-weight range of `dragondiff.limits`."""
    limit = LIMITS["energy_weight"]
    return param(default, kind=NUMBER, low=limit.low, high=limit.high, doc=doc, group="weight")


def check_points(points) -> tuple:
    if isinstance(points, np.ndarray):
        points = points.tolist()
    if isinstance(points, (str, bytes)) or not isinstance(points, (list, tuple)) or len(points) == 0:
        raise TypeError("points: expected a non-empty list of ((hx, hy), (tx, ty)) pairs")
    out = []
    for k, pair in enumerate(points):
        if not isinstance(pair, (list, tuple, np.ndarray)) or len(pair) != 2:
            raise TypeError(f"points[{k}]: expected a (handle, target) pair of (x, y) points, got {shown(pair)}")
        out.append(tuple(check_point(p, f"points[{k}] {role}") for p, role in zip(pair, ("handle", "target"))))
    return tuple(out)


def check_landmarks(value, name: str):
    """A path stays a path (read when used); numbers become a tuple of 68 (x, y) float pairs."""
    if isinstance(value, (str, Path)):
        return str(value)
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name}: expected 68 (x, y) points or a file path, got {shown(value)}") from e
    if arr.shape != (68, 2):
        raise ValueError(f"{name}: expected 68 (x, y) points (the 68-point iBUG layout), got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name}: landmarks must be finite numbers")
    return tuple((float(x), float(y)) for x, y in arr)


def check_groups(value, name: str) -> tuple:
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, (list, tuple)) or not value:
        raise TypeError(f"{name}: expected a non-empty list of {', '.join(FACE_GROUPS)}, got {shown(value)}")
    for v in value:
        if v not in FACE_GROUPS:
            raise ValueError(f"{name}: unknown landmark group {shown(v)}; allowed: {', '.join(FACE_GROUPS)}")
    return tuple(g for g in FACE_GROUPS if g in value)


def check_face(value, name: str):
    """An index (int >= 0) or a box (x0, y0, x1, y1) with x0 < x1 and y0 < y1."""
    if isinstance(value, str):
        parts = [v.strip() for v in value.split(",")]
        try:
            value = int(parts[0]) if len(parts) == 1 else [float(v) for v in parts]
        except ValueError:
            raise ValueError(f"{name}: expected a face index or a box x0,y0,x1,y1, got {shown(value)}") from None
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"{name}: a face index is >= 0, got {value}")
        return int(value)
    if isinstance(value, (list, tuple, np.ndarray)) and len(value) == 4:
        box = tuple(float(check_number(v, name, -math.inf, math.inf)) for v in value)
        if not (box[0] < box[2] and box[1] < box[3]):
            raise ValueError(f"{name}: a box is x0,y0,x1,y1 with x0 < x1 and y0 < y1, got {box}")
        return box
    raise TypeError(f"{name}: expected a face index or a box (x0, y0, x1, y1), got {shown(value)}")


def check_value(f: dataclasses.Field, value):
    """`value` of Params field `f`, checked and normalised (paths to str, lists to tuples); errors name the field."""
    return kind_of(f).check(f, value)


def required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


@dataclass(frozen=True)
class Params:
    """Base of every task's parameters: validates each field on construction (errors name the field)."""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                if required(f):
                    raise ValueError(f"{f.name}: required by task {self.task_name()!r}")
                if f.default is not None:
                    object.__setattr__(self, f.name, f.default)
                continue
            object.__setattr__(self, f.name, check_value(f, value))

    @classmethod
    def task_name(cls) -> str:
        return getattr(cls, "TASK", cls.__name__)

    @classmethod
    def fields(cls) -> tuple[dataclasses.Field, ...]:
        return dataclasses.fields(cls)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def field(cls, name: str) -> dataclasses.Field:
        return {f.name: f for f in dataclasses.fields(cls)}[name]

    @classmethod
    def build(cls, values: dict) -> "Params":
        """From a dict of field values; a key the task does not have is named in the error."""
        unknown = [k for k in values if k not in cls.names()]
        if unknown:
            raise ValueError(f"{unknown[0]}: not used by task {cls.task_name()!r} (its fields: "
                             f"{', '.join(cls.names())})")
        missing = [f.name for f in dataclasses.fields(cls) if required(f) and f.name not in values]
        if missing:
            raise ValueError(f"{missing[0]}: required by task {cls.task_name()!r}")
        return cls(**values)

    def sources(self) -> Iterator[tuple[str, Any]]:
        """(name, value) of the image and mask fields that are set."""
        for f in dataclasses.fields(self):
            if kind_of(f).source and getattr(self, f.name) is not None:
                yield f.name, getattr(self, f.name)

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def default_help(f: dataclasses.Field) -> str:
    """The default as help texts show it: '4', '0,0', 'the background'; '' for a required field."""
    if f.metadata["default_text"]:
        return f.metadata["default_text"]
    if required(f) or f.default is None:
        return ""
    if isinstance(f.default, tuple):
        return ",".join(f"{v:g}" if isinstance(v, (int, float)) else str(v) for v in f.default)
    return f"{f.default:g}" if isinstance(f.default, (int, float)) else str(f.default)


def range_text(f: dataclasses.Field) -> str:
    """The range help texts show for field `f` ('(0, 10]', '[0, 1]', '≥ 0'); '' for kinds without one."""
    return kind_of(f).range_text(f)



# --------------------------------------------------------------------------- the kinds: one object each

def option_help(f: dataclasses.Field) -> str:
    """The usual help text of a field's command-line option: its doc, range and default."""
    limits, shown_default = range_text(f), default_help(f)
    return (f.metadata["doc"] + (f"; range {limits}" if limits else "")
            + (f"  [default: {shown_default}]" if shown_default else ""))


@dataclass(frozen=True)
class CliOption:
    """How a kind is offered on the command line, described without click. type: a name in
    `dragondiff.cli.options.CLI_TYPES` (the click type parsing one value); multiple: the option repeats and its
    values (tuples) are joined into one; required: the option is required when its field is; help: (field) -> the
    option's help text."""

    type: str
    multiple: bool = False
    required: bool = False
    help: Callable[[dataclasses.Field], str] = option_help


def _no_read(f: dataclasses.Field, value, images: dict) -> None:
    return None


def _no_range(f: dataclasses.Field) -> str:
    return ""


@dataclass(frozen=True)
class Kind:
    """One kind of parameter, everything its fields need (each callable takes the Params field first):
    check(f, value): the value checked and normalised (errors name the field);
    schema(f): its JSON schema with the description (`dragondiff.spec` adds null's meaning: the default);
    cli: its command-line option (`CliOption`);
    read(f, value, images): the file check before an edit, given the images read so far by field name ("image":
    the edited one); returns an image that later fields may refer to (by their `of`), else None;
    range_text(f): the range help texts show ('' for none);
    source: its values are images or masks (paths, or in-memory objects: serialised by description);
    read_first: its fields are read before the others' (images, before the masks that have their size)."""

    check: Callable[[dataclasses.Field, Any], Any]
    schema: Callable[[dataclasses.Field], dict]
    cli: CliOption
    read: Callable[[dataclasses.Field, Any, dict], Any] = _no_read
    range_text: Callable[[dataclasses.Field], str] = _no_range
    source: bool = False
    read_first: bool = False


def kind_of(f: dataclasses.Field) -> Kind:
    """The `Kind` of Params field `f`."""
    return KINDS[f.metadata["kind"]]


def _point() -> dict:
    return {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 2}


def _source(f: dataclasses.Field, value):
    return str(value) if isinstance(value, Path) else value


def _file_schema(f: dataclasses.Field) -> dict:
    return {"type": ["string", "null"], "description": f"{f.metadata['doc']}; file path"}


def _read_image(f: dataclasses.Field, value, images: dict):
    from ..inputs import load_image

    return load_image(value, f.name)


def _read_mask(f: dataclasses.Field, value, images: dict) -> None:
    from ..inputs import load_mask

    load_mask(value, f.name, images[f.metadata["of"]].shape[:2])


def _read_points(f: dataclasses.Field, value, images: dict) -> None:
    size = images["image"].shape[:2]
    for k, (handle, target) in enumerate(value):
        check_point(handle, f"{f.name}[{k}] handle", size)
        check_point(target, f"{f.name}[{k}] target", size)


def _read_landmarks(f: dataclasses.Field, value, images: dict) -> None:
    from ..face import check_landmarks as read_landmarks  # reads a file; checks the points span a face

    read_landmarks(value, f.name)


def _offset_help(f: dataclasses.Field) -> str:
    return f.metadata["doc"] + f"; DX,DY  [default: {default_help(f)}]"


def _points_help(f: dataclasses.Field) -> str:
    return f.metadata["doc"] + ": 'hx,hy:tx,ty'; repeat the option or separate pairs by spaces"


def _scale_range(f: dataclasses.Field) -> str:
    return f"(0, {f.metadata['high']:g}]"


def _number_range(f: dataclasses.Field) -> str:
    low, high = f.metadata["low"], f.metadata["high"]
    return f"≥ {low:g}" if math.isinf(high) else f"[{low:g}, {high:g}]"


def _number_schema(f: dataclasses.Field) -> dict:
    meta = f.metadata
    out = {"type": ["number", "null"], "minimum": meta["low"], "description": meta["doc"]}
    if math.isfinite(meta["high"]):
        out["maximum"] = meta["high"]
    return out


KINDS: dict[str, Kind] = {
    IMAGE: Kind(check=_source, schema=_file_schema, cli=CliOption("file", required=True), read=_read_image,
                source=True, read_first=True),
    MASK: Kind(check=_source, schema=_file_schema, cli=CliOption("file", required=True), read=_read_mask,
               source=True),
    OFFSET: Kind(check=lambda f, v: check_offset(v, f.name),
                 schema=lambda f: {"oneOf": [_point(), {"type": "null"}], "description": f.metadata["doc"]},
                 cli=CliOption("offset", help=_offset_help)),
    POINTS: Kind(check=lambda f, v: check_points(v),
                 schema=lambda f: {"type": ["array", "null"], "minItems": 1,
                                   "items": {"type": "array", "items": _point(), "minItems": 2, "maxItems": 2},
                                   "description": f.metadata["doc"]},
                 cli=CliOption("pairs", multiple=True, required=True, help=_points_help), read=_read_points),
    SCALE: Kind(check=lambda f, v: check_scale(v, f.name, f.metadata["high"]),
                schema=lambda f: {"type": ["number", "null"], "exclusiveMinimum": 0, "maximum": f.metadata["high"],
                                  "description": f.metadata["doc"]},
                cli=CliOption("number"), range_text=_scale_range),
    NUMBER: Kind(check=lambda f, v: check_number(v, f.name, f.metadata["low"], f.metadata["high"]),
                 schema=_number_schema, cli=CliOption("number"), range_text=_number_range),
    TEXT: Kind(check=lambda f, v: check_prompt(v, f.name),
               schema=lambda f: {"type": ["string", "null"], "description": f.metadata["doc"]},
               cli=CliOption("text")),
    LANDMARKS: Kind(check=lambda f, v: check_landmarks(v, f.name),
                    schema=lambda f: {"oneOf": [{"type": "array", "items": _point(), "minItems": 68, "maxItems": 68},
                                                {"type": "string"}, {"type": "null"}],
                                      "description": f.metadata["doc"] + "; points or a file path"},
                    cli=CliOption("file"), read=_read_landmarks),
    GROUPS: Kind(check=lambda f, v: check_groups(v, f.name),
                 schema=lambda f: {"type": ["array", "null"], "minItems": 1, "items": {"enum": list(FACE_GROUPS)},
                                   "description": f.metadata["doc"]},
                 cli=CliOption("text")),
    FACE: Kind(check=lambda f, v: check_face(v, f.name),
               schema=lambda f: {"oneOf": [{"type": "integer", "minimum": 0},
                                           {"type": "array", "items": {"type": "number"}, "minItems": 4,
                                            "maxItems": 4},
                                           {"type": "null"}], "description": f.metadata["doc"]},
               cli=CliOption("text")),
}
SOURCE_KINDS = tuple(name for name, kind in KINDS.items() if kind.source)  # image and mask kinds
