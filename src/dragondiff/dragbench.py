"""Reading DragBench-layout samples safely.

DragBench (Shi et al., DragDiffusion) stores each sample as a folder:

    <category>/<sample>/original_image.png
    <category>/<sample>/meta_data.pkl     # {"prompt": str, "points": [(x, y), ...] handle, target, handle, ...,
                                          #  "mask": HxW uint8, 1 = editable}

`meta_data.pkl` is a pickle, and unpickling runs whatever the file names. `read_meta` uses an unpickler that can
build only numpy arrays and dtypes (plus the lists, tuples, dicts, strings and numbers pickle makes without
calling anything); any other global in the file is refused before anything of it runs.
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


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise UnsafePickleError(
            f"{self.source}: refuses to load {module}.{name}: a DragBench meta_data.pkl holds only numpy arrays, "
            "dtypes, lists, tuples, dicts, strings and numbers; nothing of this file was run"
        )

    def persistent_load(self, pid):
        raise UnsafePickleError(f"{self.source}: persistent ids are not allowed in a DragBench meta_data.pkl")


def load_restricted(data: bytes, source: str = "pickle"):
    """Unpickle `data` allowing only numpy arrays/dtypes and plain containers, strings and numbers."""
    try:
        return _RestrictedUnpickler(io.BytesIO(data), source).load()
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


def read_meta(path: str | Path) -> dict:
    """meta_data.pkl -> {"prompt": str, "points": list of (x, y), "mask": (H, W) array}; checked field by field."""
    path = Path(path)
    meta = load_restricted(path.read_bytes(), str(path))
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


def read_sample(folder: str | Path) -> Sample:
    """Read one sample folder; errors say what is missing or malformed."""
    folder = Path(folder)
    image = folder / IMAGE_NAME
    if not image.is_file():
        raise FileNotFoundError(f"{folder}: no {IMAGE_NAME}")
    meta_path = folder / META_NAME
    if not meta_path.is_file():
        raise FileNotFoundError(f"{folder}: no {META_NAME}")
    meta = read_meta(meta_path)
    mask = meta["mask"] > (127 if meta["mask"].max() > 1 else 0)
    pts = meta["points"]
    pairs = tuple((pts[k], pts[k + 1]) for k in range(0, len(pts), 2))
    return Sample(folder=folder, image=image, prompt=meta["prompt"], points=pairs, mask=mask)


def find_samples(root: str | Path) -> list[Path]:
    """Sample folders under root (any depth): folders holding an original_image.png or a meta_data.pkl."""
    root = Path(root)
    found = {p.parent for name in (IMAGE_NAME, META_NAME) for p in root.rglob(name)}
    return sorted(found)
