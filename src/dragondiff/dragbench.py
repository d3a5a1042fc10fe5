"""Reading DragBench-layout samples safely.

DragBench (Shi et al., DragDiffusion) stores each sample as a folder:

    <category>/<sample>/original_image.png
    <category>/<sample>/meta_data.pkl     # {"prompt": str, "points": [(x, y), ...] handle, target, handle, ...,
                                          #  "mask": HxW uint8, 1 = editable}

`meta_data.pkl` is a pickle, and unpickling runs whatever the file names. `read_meta` uses an unpickler that can
build only numpy arrays and dtypes (plus the lists, tuples, dicts, strings and numbers pickle makes without
calling anything); any other global in the file is refused before anything of it runs. The array constructors
it allows are called only after their shape has been checked against a size bound (the sample image's pixels),
so a tiny file cannot make us allocate gigabytes.
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMAGE_NAME = "original_image.png"
META_NAME = "meta_data.pkl"
OUTPUT_NAME = "dragged_image.png"

# The only callables a DragBench pickle needs: numpy's array and dtype reconstruction (numpy 1 and 2 module names),
# and, in protocol-2 pickles, the bytes constructor `_codecs.encode` (text in, bytes out: no I/O, no imports).
_ALLOWED = {
    (module, name)
    for prefix in ("numpy.core", "numpy._core")
    for module, name in ((f"{prefix}.multiarray", "_reconstruct"), (f"{prefix}.multiarray", "scalar"),
                         (f"{prefix}.numeric", "_frombuffer"))
} | {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}


class UnsafePickleError(ValueError):
    """A pickle asked for something other than numpy arrays and plain data."""


# An array in a DragBench pickle is a mask (H x W, maybe x 3) or a point list: at most a few values per image pixel.
VALUES_PER_PIXEL = 4
DEFAULT_MAX_ELEMENTS = 40_000_000 * VALUES_PER_PIXEL  # inputs.MAX_INPUT_PIXELS images


def _shape_argument(func, args):
    """The shape an allowed array constructor is asked to allocate, or None for calls that allocate nothing
    beyond data already in the file."""
    name = getattr(func, "__name__", "")
    if func is np.ndarray:
        return args[0] if args else None
    if name == "_reconstruct":
        return args[1] if len(args) > 1 else None
    if name == "_frombuffer":
        return args[2] if len(args) > 2 else None
    return None


class _RestrictedUnpickler(pickle._Unpickler):
    """The pure-Python unpickler (its opcodes can be overridden; DragBench pickles are tiny), with `find_class`
    limited to _ALLOWED and every call of an allowed array constructor checked before it allocates."""

    def __init__(self, file, source: str, max_elements: int):
        super().__init__(file)
        self.source = source
        self.max_elements = max_elements
        self.dispatch = dict(self.dispatch)
        self.dispatch[pickle.REDUCE[0]] = _RestrictedUnpickler._reduce
        self.dispatch[pickle.NEWOBJ[0]] = _RestrictedUnpickler._newobj
        self.dispatch[pickle.NEWOBJ_EX[0]] = _RestrictedUnpickler._newobj_ex

    def _check_size(self, func, args) -> None:
        shape = _shape_argument(func, args)
        if shape is None:
            return
        dims = shape if isinstance(shape, (tuple, list)) else (shape,)
        if not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 0 for d in dims):
            raise UnsafePickleError(f"{self.source}: an array shape must be non-negative integers; nothing of this "
                                    "file was run")
        elements = int(np.prod([int(d) for d in dims], dtype=object)) if dims else 1
        if elements > self.max_elements:
            raise UnsafePickleError(f"{self.source}: asks for an array of {elements:,} values; a sample of this "
                                    f"image holds at most {self.max_elements:,}; nothing was allocated")

    def _reduce(self):
        args = self.stack.pop()
        func = self.stack[-1]
        self._check_size(func, args)
        self.stack[-1] = func(*args)

    def _newobj(self):
        args = self.stack.pop()
        cls = self.stack.pop()
        self._check_size(cls, args)
        self.append(cls.__new__(cls, *args))

    def _newobj_ex(self):
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        if kwargs:
            raise UnsafePickleError(f"{self.source}: keyword construction is not allowed in a DragBench pickle")
        self._check_size(cls, args)
        self.append(cls.__new__(cls, *args))

    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise UnsafePickleError(
            f"{self.source}: refuses to load {module}.{name}: a DragBench meta_data.pkl holds only numpy arrays, "
            "dtypes, lists, tuples, dicts, strings and numbers; nothing of this file was run"
        )

    def persistent_load(self, pid):
        raise UnsafePickleError(f"{self.source}: persistent ids are not allowed in a DragBench meta_data.pkl")


def load_restricted(data: bytes, source: str = "pickle", max_elements: int = DEFAULT_MAX_ELEMENTS):
    """Unpickle `data` allowing only numpy arrays/dtypes and plain containers, strings and numbers, none with more
    than `max_elements` values."""
    try:
        return _RestrictedUnpickler(io.BytesIO(data), source, max_elements).load()
    except UnsafePickleError:
        raise
    except Exception as e:  # truncated or corrupt files raise many different errors
        raise ValueError(f"{source}: not a readable pickle ({type(e).__name__}: {e})") from e


@dataclass
class Sample:
    """One DragBench sample: the image path, prompt, (handle, target) pairs in (x, y) pixels, editable mask."""

    folder: Path
    image: Path
    prompt: str
    points: tuple[tuple[tuple[float, float], tuple[float, float]], ...]
    mask: np.ndarray  # (H, W) bool, True = editable

    def spec(self, **fields):
        """The sample as a drag `EditSpec` (extra fields, e.g. preset or seed, passed through)."""
        from .spec import EditSpec

        return EditSpec(task="drag", image=str(self.image), mask=self.mask, points=self.points,
                        prompt=self.prompt, **fields)


def read_meta(path: str | Path, image_hw: tuple[int, int] | None = None) -> dict:
    """meta_data.pkl -> {"prompt": str, "points": list of (x, y), "mask": (H, W) array}; checked field by field.
    `image_hw`: the sample image's size, which bounds every array in the file before it is allocated."""
    path = Path(path)
    limit = DEFAULT_MAX_ELEMENTS if image_hw is None else max(1024, image_hw[0] * image_hw[1] * VALUES_PER_PIXEL)
    meta = load_restricted(path.read_bytes(), str(path), limit)
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a dict with prompt, points and mask, got {type(meta).__name__}")
    missing = [k for k in ("prompt", "points", "mask") if k not in meta]
    if missing:
        raise ValueError(f"{path}: missing {', '.join(missing)} (a DragBench sample has prompt, points and mask)")
    if not isinstance(meta["prompt"], str):
        raise ValueError(f"{path}: prompt must be a string, got {type(meta['prompt']).__name__}")
    try:
        pts = np.asarray(meta["points"], dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: points must be a list of (x, y) pairs ({e})") from e
    if pts.ndim != 2 or pts.shape[1] != 2 or len(pts) == 0 or len(pts) % 2:
        raise ValueError(f"{path}: points must be an even, non-empty list of (x, y) pairs alternating handle and "
                         f"target, got shape {pts.shape}")
    mask = np.asarray(meta["mask"])
    if mask.ndim == 3 and mask.shape[2] in (1, 3):
        mask = mask[..., 0]
    if mask.ndim != 2 or mask.dtype.kind not in "biuf":
        raise ValueError(f"{path}: mask must be an HxW array of 0/1, got {mask.dtype} {mask.shape}")
    return {"prompt": meta["prompt"], "points": [tuple(p) for p in pts.tolist()], "mask": mask}


def _image_hw(path: Path) -> tuple[int, int] | None:
    """The image's size from its header (nothing decoded); None when it cannot be read (reported later)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.height, im.width
    except (OSError, ValueError):
        return None


def read_sample(folder: str | Path) -> Sample:
    """Read one sample folder; errors say what is missing or malformed."""
    folder = Path(folder)
    image = folder / IMAGE_NAME
    if not image.is_file():
        raise FileNotFoundError(f"{folder}: no {IMAGE_NAME}")
    meta_path = folder / META_NAME
    if not meta_path.is_file():
        raise FileNotFoundError(f"{folder}: no {META_NAME}")
    meta = read_meta(meta_path, _image_hw(image))
    mask = meta["mask"] > (127 if meta["mask"].max() > 1 else 0)
    pts = meta["points"]
    pairs = tuple((pts[k], pts[k + 1]) for k in range(0, len(pts), 2))
    return Sample(folder=folder, image=image, prompt=meta["prompt"], points=pairs, mask=mask)


def find_samples(root: str | Path) -> list[Path]:
    """Sample folders under root (any depth): folders holding an original_image.png or a meta_data.pkl."""
    root = Path(root)
    found = {p.parent for name in (IMAGE_NAME, META_NAME) for p in root.rglob(name)}
    return sorted(found)
