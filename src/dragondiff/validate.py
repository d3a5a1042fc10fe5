"""Argument checks shared by the spec, the pipeline and the inputs. Each raises TypeError (wrong kind) or
ValueError (wrong value) with a message that starts with the argument's name and says what is allowed."""

from __future__ import annotations

import math

import numpy as np
import torch


def _is_number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def check_number(value, name: str, low: float = 0.0, high: float = math.inf) -> float:
    if not _is_number(value):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not (math.isfinite(value) and low <= value <= high):
        raise ValueError(f"{name} must be a finite number in [{low:g}, {high:g}], got {value!r}")
    return value


def check_int(value, name: str, low: int, high: int) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if not low <= int(value) <= high:
        raise ValueError(f"{name} must be an integer in {low}..{high}, got {value!r}")
    return int(value)


def check_scale(scale, name: str = "scale", high: float = 10.0) -> float:
    if not _is_number(scale):
        raise TypeError(f"{name} must be a number, got {scale!r}")
    scale = float(scale)
    if not (math.isfinite(scale) and 0 < scale <= high):
        raise ValueError(f"{name} must be in (0, {high:g}], got {scale!r}")
    return scale


def check_offset(offset, name: str = "offset", limit: float = 1e6) -> tuple[float, float]:
    values = list(offset) if isinstance(offset, (tuple, list, np.ndarray)) else None
    if values is None or len(values) != 2 or not all(_is_number(v) for v in values):
        raise TypeError(f"{name} must be a (dx, dy) pair of numbers in pixels, got {offset!r}")
    dx, dy = (float(v) for v in values)
    if not (math.isfinite(dx) and math.isfinite(dy)) or max(abs(dx), abs(dy)) > limit:
        raise ValueError(f"{name} must be finite pixel distances within ±{limit:g}, got {offset!r}")
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
        raise TypeError(f"{name}: expected an (x, y) pair of numbers, got {p!r}")
    x, y = (float(v) for v in values)
    if not (math.isfinite(x) and math.isfinite(y)):
        raise ValueError(f"{name}: coordinates must be finite, got {p!r}")
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
        raise ValueError(f"{name}: {device!r} is not a torch device (use 'cpu', 'cuda', 'cuda:1', 'mps'): {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{name}: {device!r} but this torch build or machine has no CUDA device; use 'cpu'")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"{name}: {device!r} but only {torch.cuda.device_count()} CUDA device(s) exist")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"{name}: {device!r} but MPS is not available here; use 'cpu'")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"{name}: {device!r} is not supported; use 'cpu', 'cuda' or 'mps'")
    return dev


def check_dtype(dtype, name: str = "dtype") -> torch.dtype:
    """torch.float32 / float16 / bfloat16, or one of their names ('float16', 'fp16', 'bf16', ...)."""
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    if dtype in (torch.float32, torch.float16, torch.bfloat16):
        return dtype
    raise ValueError(f"{name}: {dtype!r} is not supported; use torch.float32, torch.float16 or torch.bfloat16 "
                     f"(or one of {sorted(_DTYPES)})")
