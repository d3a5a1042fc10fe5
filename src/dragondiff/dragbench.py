"""Reading DragBench-layout samples safely.

DragBench (Shi et al., DragDiffusion) stores each sample as a folder:

    <category>/<sample>/original_image.png
    <category>/<sample>/meta_data.pkl     # {"prompt": str, "points": [(x, y), ...] handle, target, handle, ...,
                                          #  "mask": HxW uint8, 1 = editable}

`meta_data.pkl` is a pickle, and unpickling runs whatever the file names. `read_meta` uses an unpickler that can
build only numpy arrays and dtypes (plus the lists, tuples, dicts, strings and numbers pickle makes without
calling anything); any other global in the file is refused before anything of it runs. The array constructors
it allows (and an array's `__setstate__`) run only after the bytes they would allocate, shape times what one
element of the dtype holds (sub-array and structured dtypes included; object arrays refused), have been checked
against a bound from the sample image's pixels, for all the file's arrays together, so a tiny file cannot make us
allocate gigabytes.
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


# An array in a DragBench pickle is a mask (H x W, maybe x 3) or a point list: at most a few values per image pixel,
# of at most 8 bytes each. The bound is on bytes, whatever the dtype, and on all the arrays of a file together.
VALUES_PER_PIXEL = 4
BYTES_PER_PIXEL = VALUES_PER_PIXEL * 8
DEFAULT_MAX_BYTES = 40_000_000 * BYTES_PER_PIXEL  # inputs.MAX_INPUT_PIXELS images


def _dtype_bytes(dtype: np.dtype, source: str) -> int:
    """Bytes one element of `dtype` takes, counted from what it holds (a sub-array's shape times its base, a
    structured dtype's fields), not only from its itemsize, which a dtype's pickled state can set to anything."""
    if dtype.hasobject:
        raise UnsafePickleError(f"{source}: object arrays are not allowed in a DragBench pickle (they hold "
                                "arbitrary Python objects); nothing of this file was run")
    size = dtype.itemsize
    if dtype.subdtype is not None:
        base, shape = dtype.subdtype
        size = max(size, int(np.prod(shape, dtype=object)) * _dtype_bytes(base, source))
    for field in (dtype.fields or {}).values():
        size = max(size, int(field[1]) + _dtype_bytes(field[0], source))
    return size


def _array_request(func, args) -> tuple[object, object] | None:
    """(shape, dtype) an allowed array constructor is asked to make, or None for calls that make no array. The
    shape counts even when the data comes from a buffer in the file: a view with zero strides is as large to use."""
    name = getattr(func, "__name__", "")
    if func is np.ndarray:  # ndarray(shape, dtype=float, buffer=None, offset=0, strides=None, order=None)
        return (args[0] if args else None), (args[1] if len(args) > 1 else float)
    if name == "_reconstruct":  # _reconstruct(subtype, shape, dtype)
        return (args[1] if len(args) > 1 else None), (args[2] if len(args) > 2 else None)
    if name == "_frombuffer":  # _frombuffer(buffer, dtype, shape, order)
        return (args[2] if len(args) > 2 else None), (args[1] if len(args) > 1 else None)
    if name == "scalar":  # scalar(dtype, data)
        return (), (args[0] if args else None)
    return None


def _array_state(state) -> tuple[object, object] | None:
    """(shape, dtype) of an ndarray.__setstate__ state: (version, shape, dtype, is_fortran, data) or without the
    version."""
    if isinstance(state, tuple) and len(state) in (4, 5):
        return state[-4], state[-3]
    return None


class _RestrictedUnpickler(pickle._Unpickler):
    """The pure-Python unpickler (its opcodes can be overridden; DragBench pickles are tiny), with `find_class`
    limited to _ALLOWED, and every array an allowed constructor or `__setstate__` would make checked, by its bytes,
    before it is allocated. A dtype's state may be set only on a dtype the file just made and no array uses yet."""

    def __init__(self, file, source: str, max_bytes: int):
        super().__init__(file)
        self.source = source
        self.bytes_left = max_bytes
        self.max_bytes = max_bytes
        self.fresh_dtypes: dict[int, np.dtype] = {}  # id -> dtype made by np.dtype(...) here, not used by an array
        self.dispatch = dict(self.dispatch)
        self.dispatch[pickle.REDUCE[0]] = _RestrictedUnpickler._reduce
        self.dispatch[pickle.NEWOBJ[0]] = _RestrictedUnpickler._newobj
        self.dispatch[pickle.NEWOBJ_EX[0]] = _RestrictedUnpickler._newobj_ex
        self.dispatch[pickle.BUILD[0]] = _RestrictedUnpickler._build

    def _refuse(self, what: str):
        raise UnsafePickleError(f"{self.source}: {what}; nothing of this file was run")

    def _charge(self, request) -> None:
        """Count the bytes of an array about to be made against what the sample's image allows."""
        if request is None:
            return
        shape, dtype = request
        dims = shape if isinstance(shape, (tuple, list)) else (shape,)
        if not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 0 for d in dims):
            self._refuse("an array shape must be non-negative integers")
        try:
            dtype = np.dtype(dtype)
        except (TypeError, ValueError) as e:
            self._refuse(f"not a numpy dtype: {dtype!r} ({e})")
        self._seal(dtype)  # used now: its state may no longer change
        elements = int(np.prod([int(d) for d in dims], dtype=object)) if dims else 1
        nbytes = elements * _dtype_bytes(dtype, self.source)
        if nbytes > self.bytes_left:
            shown = " x ".join(str(int(d)) for d in dims) or "a scalar"
            raise UnsafePickleError(
                f"{self.source}: asks for an array of {nbytes:,} bytes ({shown} of {dtype}); the arrays of a sample "
                f"of this image hold at most {self.max_bytes:,} bytes in all; nothing was allocated")
        self.bytes_left -= nbytes

    def _seal(self, dtype: np.dtype) -> None:
        """`dtype` and the dtypes inside it are in use: their state may no longer be set."""
        self.fresh_dtypes.pop(id(dtype), None)
        inner = [dtype.subdtype[0]] if dtype.subdtype is not None else []
        for d in inner + [field[0] for field in (dtype.fields or {}).values()]:
            self._seal(d)

    def _made(self, func, args, value):
        """Record a dtype made as a new copy (numpy's pickles call np.dtype(spec, align, copy=True)): its state may
        be set once, before anything uses it. Other dtypes (shared ones such as np.dtype('u1')) are sealed."""
        if isinstance(value, np.dtype):
            self._seal(value)
            if func is np.dtype and len(args) > 2 and args[2] is True and all(value is not a for a in args):
                self.fresh_dtypes[id(value)] = value
        return value

    def _reduce(self):
        args = self.stack.pop()
        func = self.stack[-1]
        self._charge(_array_request(func, args))
        self.stack[-1] = self._made(func, args, func(*args))

    def _newobj(self):
        args = self.stack.pop()
        cls = self.stack.pop()
        self._charge(_array_request(cls, args))
        self.append(self._made(cls, args, cls.__new__(cls, *args)))

    def _newobj_ex(self):
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        if kwargs:
            self._refuse("keyword construction is not allowed in a DragBench pickle")
        self._charge(_array_request(cls, args))
        self.append(self._made(cls, args, cls.__new__(cls, *args)))

    def _instantiate(self, klass, args):  # the INST and OBJ opcodes (protocols 0 and 1) call klass(*args)
        self._charge(_array_request(klass, tuple(args)))
        self.append(self._made(klass, args, klass(*args)))

    def _build(self):  # BUILD: inst.__setstate__(state)
        state, inst = self.stack[-1], self.stack[-2]
        if isinstance(inst, np.ndarray):
            self._charge(_array_state(state))
        elif not isinstance(inst, np.dtype):
            self._refuse(f"sets the state of a {type(inst).__name__}; only arrays and dtypes have state here")
        elif id(inst) not in self.fresh_dtypes:
            self._refuse("sets the state of a dtype the file did not just make, or one an array already uses")
        self.load_build()
        if isinstance(inst, np.dtype):
            self.fresh_dtypes.pop(id(inst))  # its state is set once
            self._seal(inst)
            _dtype_bytes(inst, self.source)  # an object dtype is refused as soon as it is made

    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise UnsafePickleError(
            f"{self.source}: refuses to load {module}.{name}: a DragBench meta_data.pkl holds only numpy arrays, "
            "dtypes, lists, tuples, dicts, strings and numbers; nothing of this file was run"
        )

    def persistent_load(self, pid):
        raise UnsafePickleError(f"{self.source}: persistent ids are not allowed in a DragBench meta_data.pkl")


def load_restricted(data: bytes, source: str = "pickle", max_bytes: int = DEFAULT_MAX_BYTES):
    """Unpickle `data` allowing only numpy arrays/dtypes and plain containers, strings and numbers, the arrays
    together of at most `max_bytes` bytes (counted before each is allocated, whatever its dtype)."""
    try:
        return _RestrictedUnpickler(io.BytesIO(data), source, max_bytes).load()
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
    limit = DEFAULT_MAX_BYTES if image_hw is None else max(8192, image_hw[0] * image_hw[1] * BYTES_PER_PIXEL)
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
