"""Argument checks shared by the spec, the pipeline and the inputs. Each raises TypeError (wrong kind) or
ValueError (wrong value) with a message that starts with the argument's name and says what is allowed."""

from __future__ import annotations

import math
import reprlib

import numpy as np
import torch

# Messages show a bad value through this: bounded in depth, items and length, so that a value built to be huge
# when printed (a YAML alias bomb is a few hundred bytes that repr() expands to gigabytes) prints a short sketch.
_SHOWN = reprlib.Repr()
for _key, _most in (("maxlevel", 2), ("maxtuple", 4), ("maxlist", 4), ("maxdict", 4), ("maxset", 4),
                    ("maxstring", 60), ("maxother", 60), ("maxlong", 40)):
    setattr(_SHOWN, _key, _most)


def shown(value, most: int = 120) -> str:
    """A short repr of a user value for an error message (a few nesting levels and items, at most `most`
    characters)."""
    text = _SHOWN.repr(value)
    return text if len(text) <= most else text[: most - 3] + "..."


def _is_number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def check_number(value, name: str, low: float = 0.0, high: float = math.inf) -> float:
    if not _is_number(value):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not (math.isfinite(value) and low <= value <= high):
        raise ValueError(f"{name} must be a finite number in [{low:g}, {high:g}], got {shown(value)}")
    return value


def check_int(value, name: str, low: int, high: int) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if not low <= int(value) <= high:
        raise ValueError(f"{name} must be an integer in {low}..{high}, got {shown(value)}")
    return int(value)


def check_scale(scale, name: str = "scale", high: float = 10.0) -> float:
    if not _is_number(scale):
        raise TypeError(f"{name} must be a number, got {shown(scale)}")
    scale = float(scale)
    if not (math.isfinite(scale) and 0 < scale <= high):
        raise ValueError(f"{name} must be in (0, {high:g}], got {shown(scale)}")
    return scale


def check_offset(offset, name: str = "offset", limit: float = 1e6) -> tuple[float, float]:
    values = list(offset) if isinstance(offset, (tuple, list, np.ndarray)) else None
    if values is None or len(values) != 2 or not all(_is_number(v) for v in values):
        raise TypeError(f"{name} must be a (dx, dy) pair of numbers in pixels, got {shown(offset)}")
    dx, dy = (float(v) for v in values)
    if not (math.isfinite(dx) and math.isfinite(dy)) or max(abs(dx), abs(dy)) > limit:
        raise ValueError(f"{name} must be finite pixel distances within ±{limit:g}, got {shown(offset)}")
    return dx, dy


def check_string(value, name: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name}: expected a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{name}: not valid text ({e.reason} at position {e.start})") from None
    return value


def check_point(p, name: str, size_hw: tuple[int, int] | None = None) -> tuple[float, float]:
    """A finite (x, y) pixel coordinate; with size_hw = (H, W), also inside that image."""
    values = list(p) if isinstance(p, (tuple, list, np.ndarray)) else None
    if values is None or len(values) != 2 or not all(_is_number(v) for v in values):
        raise TypeError(f"{name}: expected an (x, y) pair of numbers, got {shown(p)}")
    x, y = (float(v) for v in values)
    if not (math.isfinite(x) and math.isfinite(y)):
        raise ValueError(f"{name}: coordinates must be finite, got {shown(p)}")
    if size_hw is None:
        return x, y
    h, w = size_hw
    if not (0 <= x < w and 0 <= y < h):
        raise ValueError(f"{name}: point ({x:g}, {y:g}) lies outside the {w}x{h} image")
    return x, y


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def check_device(device, name: str = "device") -> torch.device:
    """A torch device that exists in this torch build and on this machine."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"{name}: {shown(device)} is not a torch device (use 'cpu', 'cuda', 'cuda:1', 'mps'): {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{name}: {shown(device)} but this torch build or machine has no CUDA device; use 'cpu'")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"{name}: {shown(device)} but only {torch.cuda.device_count()} CUDA device(s) exist")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"{name}: {shown(device)} but MPS is not available here; use 'cpu'")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"{name}: {shown(device)} is not supported; use 'cpu', 'cuda' or 'mps'")
    return dev


def check_dtype(dtype, name: str = "dtype") -> torch.dtype:
    """torch.float32 / float16 / bfloat16, or one of their names ('float16', 'fp16', 'bf16', ...)."""
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    if dtype in (torch.float32, torch.float16, torch.bfloat16):
        return dtype
    raise ValueError(f"{name}: {shown(dtype)} is not supported; use torch.float32, torch.float16 or torch.bfloat16 "
                     f"(or one of {sorted(_DTYPES)})")
