"""Reading and validating user images, masks and points; the working resolution.

Every error names the argument it is about and says what is allowed. Resizing follows the official demo
so that the working-size inputs match its pixels: the image goes through cv2 Lanczos-4, masks through cv2 bilinear on their 0..255
(or 0..1 for drag) scale and are then thresholded at > 0.5, which widens them by up to one pixel.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Union

import cv2
import numpy as np
import torch
from PIL import Image, ImageOps

from .errors import InputNote
from .grid import Grid
from .limits import LIMITS

ImageLike = Union[Image.Image, np.ndarray, str, os.PathLike]
MaskLike = Union[Image.Image, np.ndarray, str, os.PathLike]

# Decompression-bomb guard and a sane upper bound for what we resize anyway to ~max_resolution².
MAX_INPUT_PIXELS = 40_000_000


# Inputs that cannot be read twice (/dev/stdin, a pipe, a FIFO): read once, the bytes kept for the later reads
# (the CLI checks an input before loading the model and reads it again in the edit and when compositing).
_STREAMS: dict[str, bytes] = {}
MAX_STREAM_BYTES = 256 * 2**20


def _readable(path: Path, name: str):
    """`path` for a regular file; for a stream, its bytes (read once per process, bounded) as a file object."""
    if path.is_file():
        return path
    key = str(path)
    if key not in _STREAMS:
        with open(path, "rb") as f:
            data = f.read(MAX_STREAM_BYTES + 1)
        if len(data) > MAX_STREAM_BYTES:
            raise ValueError(f"{name}: {path} streams more than {MAX_STREAM_BYTES // 2**20} MiB; at most that "
                             "is read from a stream")
        _STREAMS[key] = data
    return io.BytesIO(_STREAMS[key])


def upright(im: Image.Image) -> Image.Image:
    """The image turned the way viewers show it: phones store photos sideways with an EXIF orientation tag."""
    return ImageOps.exif_transpose(im)


def _open_path(value, name: str) -> Image.Image:
    path = Path(value)
    if not path.exists():
        raise FileNotFoundError(f"{name}: file not found: {path}")
    try:
        with Image.open(_readable(path, name)) as im:
            if im.width * im.height > MAX_INPUT_PIXELS:
                raise ValueError(
                    f"{name}: {path} is {im.width}x{im.height}; at most {MAX_INPUT_PIXELS:,} pixels are allowed"
                )
            im.load()
            return upright(im)
    except (OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"{name}: cannot read {path} as an image ({e})") from e


_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_WIDE_GREY_MODES = ("I", "I;16", "I;16B", "I;16L")


def pil_to_rgb(image: Image.Image, name: str) -> tuple[np.ndarray, str | None]:
    """Any PIL image as HxWx3 uint8 RGB, the way the web UI shows it: transparency flattened onto white, palette,
    1-bit, CMYK and grey converted, 16-bit grey scaled to 8 bits. Returns (array, a note saying what was done or
    None for RGB and L). Float images are refused."""
    mode = image.mode
    if mode == "F":
        raise ValueError(f"{name}: a 32-bit float image (PIL mode 'F'); pass an 8- or 16-bit image")
    if mode in _WIDE_GREY_MODES:
        grey = np.asarray(image).astype(np.int64)
        if grey.min() < 0 or grey.max() > 65535:
            raise ValueError(f"{name}: {mode!r} values must lie in 0..65535 (16-bit grey), got "
                             f"{grey.min()}..{grey.max()}")
        grey = np.rint(grey / 257.0).astype(np.uint8)
        return np.ascontiguousarray(np.stack([grey] * 3, -1)), f"16-bit grey ({mode!r}) scaled to 8-bit RGB"
    if mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = np.asarray(image.convert("RGBA")).astype(np.float32)
        alpha = rgba[..., 3:4] / 255.0
        flat = np.rint(rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
        return flat, f"{mode!r} image with transparency: flattened onto white"
    rgb = np.asarray(image.convert("RGB"))
    return rgb, None if mode in ("RGB", "L") else f"{mode!r} image converted to RGB"


def load_image(image: ImageLike, name: str = "image") -> np.ndarray:
    """Return an HxWx3 uint8 RGB array. Accepts a PIL image of any 8/16-bit mode (converted as `pil_to_rgb` says,
    with an `InputNote` warning), an HxWx3 uint8 array or a path."""
    if isinstance(image, (str, os.PathLike)):
        image = _open_path(image, name)
    if isinstance(image, Image.Image):
        image, note = pil_to_rgb(image, name)
        if note:
            warnings.warn(f"{name}: {note}", InputNote, stacklevel=2)
    if not isinstance(image, np.ndarray):
        raise TypeError(f"{name}: expected a PIL image, an HxWx3 uint8 array or a path, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"{name}: array dtype must be uint8 (0..255), got {image.dtype}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{name}: array must have shape HxWx3 (RGB), got {image.shape}")
    h, w = image.shape[:2]
    if h < 8 or w < 8:
        raise ValueError(f"{name}: image is {w}x{h}; both sides must be at least 8 pixels")
    if h * w > MAX_INPUT_PIXELS:
        raise ValueError(f"{name}: image is {w}x{h}; at most {MAX_INPUT_PIXELS:,} pixels are allowed")
    return np.ascontiguousarray(image)


def load_mask(mask: MaskLike, name: str, size_hw: tuple[int, int] | None = None) -> np.ndarray:
    """Return an HxW bool mask. Accepts PIL (L/1/RGB with equal channels), bool arrays, 0/1 arrays, or any 8-bit
    grey levels 0..255 (anti-aliased or JPEG masks from paint programs), which are thresholded at 50 %: a pixel is
    selected when its value is at least 128 (or, for a float mask within 0..1, at least 0.5).

    ``size_hw`` is the size of the image the mask belongs to (before any resizing); masks of another size are
    rejected rather than stretched, since a silently stretched mask selects the wrong object.
    """
    if isinstance(mask, (str, os.PathLike)):
        mask = _open_path(mask, name)
    if isinstance(mask, Image.Image):
        if mask.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            raise ValueError(f"{name}: {mask.mode!r} masks are not supported; pass an 8-bit L or 1 image")
        mask = np.asarray(mask.convert("L") if mask.mode not in ("L", "1", "RGB") else mask)
    if not isinstance(mask, np.ndarray):
        raise TypeError(f"{name}: expected a PIL image, a 2-D array or a path, got {type(mask).__name__}")
    if mask.ndim == 3 and mask.shape[2] in (1, 3, 4):
        if mask.shape[2] > 1 and not all(np.array_equal(mask[..., 0], mask[..., c]) for c in range(1, 3)):
            raise ValueError(f"{name}: a colour mask must have equal channels (black/white); got differing channels")
        mask = mask[..., 0]
    if mask.ndim != 2:
        raise ValueError(f"{name}: mask must be 2-D (HxW), got shape {mask.shape}")
    if mask.dtype == bool:
        out = mask.copy()
    else:
        if not (np.issubdtype(mask.dtype, np.integer) or np.issubdtype(mask.dtype, np.floating)):
            raise ValueError(f"{name}: mask dtype {mask.dtype} is not supported")
        if np.issubdtype(mask.dtype, np.floating) and not np.isfinite(mask).all():
            raise ValueError(f"{name}: mask contains NaN or Inf")
        low, high = mask.min(), mask.max()
        if low < 0 or high > 255:
            raise ValueError(f"{name}: mask values must lie in 0..255 (or be 0/1), got values from {low:g} to "
                             f"{high:g}")
        if set(np.unique(mask).tolist()) <= {0, 1}:
            out = mask > 0
        elif np.issubdtype(mask.dtype, np.floating) and high <= 1:
            out = mask >= 0.5
        else:
            out = mask >= 128
    if size_hw is not None and out.shape != tuple(size_hw):
        raise ValueError(
            f"{name}: mask is {out.shape[1]}x{out.shape[0]} but its image is {size_hw[1]}x{size_hw[0]}; "
            "they must have the same size"
        )
    if not out.any():
        raise ValueError(f"{name}: mask is empty (no selected pixel)")
    if out.all():
        raise ValueError(f"{name}: mask selects the whole image; leave some background unselected")
    return out


def working_size(height: int, width: int, max_resolution: int) -> tuple[int, int]:
    """Working (H', W'): area about max_resolution², sides multiples of 64 (np.round, halves to even)."""
    if not isinstance(max_resolution, (int, np.integer)) or isinstance(max_resolution, bool):
        raise TypeError(f"max_resolution must be an int, got {type(max_resolution).__name__}")
    limit = LIMITS["max_resolution"]
    if not limit.low <= max_resolution <= limit.high:
        raise ValueError(f"max_resolution must be in {limit.text}, got {max_resolution}")
    k = math.sqrt(max_resolution**2 / (height * width))
    h = int(np.round(height * k / 64)) * 64
    w = int(np.round(width * k / 64)) * 64
    if h < 64 or w < 64:
        raise ValueError(
            f"image: aspect ratio {width}x{height} is too extreme for max_resolution {max_resolution} "
            f"(working size would be {w}x{h}); crop the image or raise max_resolution"
        )
    return h, w


def resize_image(image: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Lanczos-4 resize as in the official demo (an exact copy when the size already matches)."""
    if image.shape[:2] == tuple(size_hw):
        return image.copy()
    return cv2.resize(image, (size_hw[1], size_hw[0]), interpolation=cv2.INTER_LANCZOS4)


def resize_mask(mask: np.ndarray, size_hw: tuple[int, int], levels: int = 255) -> np.ndarray:
    """Bilinear resize of a bool mask stored as 0/levels uint8, then > 0.5 (the official ≤1-px widening).

    The official demo feeds SAM masks as 0/255 and the drag sketch as 0/1, so the widening differs per task.
    """
    m = mask.astype(np.uint8) * levels
    if m.shape != tuple(size_hw):
        m = cv2.resize(m, (size_hw[1], size_hw[0]), interpolation=cv2.INTER_LINEAR)
    return m > 0.5


def to_pixels(image: np.ndarray) -> "np.ndarray":
    """uint8 HxWx3 -> float32 1x3xHxW in [-1, 1]."""
    return ((image.astype(np.float32) / 255.0 - 0.5) * 2.0).transpose(2, 0, 1)[None]


@dataclass
class Prepared:
    """An edit's base image at the working size, and the readers of its masks and of a reference image (which
    return what they read; a task keeps it, nothing is written back here)."""

    original_hw: tuple[int, int]
    size_hw: tuple[int, int]
    image: np.ndarray  # (H, W, 3) uint8, working size
    pixels: "torch.Tensor"  # (1, 3, H, W) in [-1, 1]
    vae_factor: int  # the backbone's grid factors (`Grid`)
    feature_factor: int | Fraction  # `Grid.feature_factor`
    inversion: object = None  # an Inversion reused in place of inverting the image
    frame: object = None  # tasks that edit a crop of the photo (TaskInfo.frame): the crop's `tasks.base.Frame`

    @classmethod
    def from_image(cls, image: np.ndarray, max_resolution: int, vae_factor: int, feature_factor: int) -> "Prepared":
        h, w = image.shape[:2]
        size = working_size(h, w, max_resolution)
        work = resize_image(image, size)
        return cls((h, w), size, work, torch.from_numpy(to_pixels(work)), vae_factor, feature_factor)

    @property
    def input_scale(self) -> tuple[float, float]:
        """(x, y): working size / original size, each axis on its own."""
        return self.size_hw[1] / self.original_hw[1], self.size_hw[0] / self.original_hw[0]

    @property
    def grid(self) -> Grid:
        return Grid(self.size_hw, self.vae_factor, self.feature_factor)

    @property
    def latent_hw(self) -> tuple[int, int]:
        return self.grid.latent_hw

    def mask(self, mask, name: str, levels: int = 255) -> "torch.Tensor":
        """A mask of the base image, at the working size (official bilinear + threshold)."""
        m = resize_mask(load_mask(mask, name, self.original_hw), self.size_hw, levels)
        if not m.any():
            raise ValueError(f"{name}: the mask vanishes at the working size {self.size_hw[1]}x{self.size_hw[0]}")
        return torch.from_numpy(m)

    def reference(self, reference, reference_mask) -> tuple["torch.Tensor", np.ndarray, "torch.Tensor"]:
        """Reference pixels, image and mask, stretched to the base image's working size (official: any aspect)."""
        ref = load_image(reference, "reference")
        m = load_mask(reference_mask, "reference_mask", ref.shape[:2])
        h, w = self.size_hw
        stretched = np.asarray(Image.fromarray(ref).resize((w, h), Image.BICUBIC))
        m = torch.from_numpy(resize_mask(m, (h, w)))
        if not m.any():
            raise ValueError("reference_mask: the mask vanishes at the working size")
        return torch.from_numpy(to_pixels(stretched)), stretched, m
