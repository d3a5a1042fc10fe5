"""What the edit gives back to a user: the result at the input's own size, and a preview sheet.

The engine edits at a working size (area about max_resolution², sides multiples of 64). `full_resolution` brings
the result back to the original size and pastes it into the original only around the edited area, with a soft
edge, so every pixel away from the edit stays bit-identical to the input (no VAE round trip, no resampling).
"""

from __future__ import annotations

import math

import cv2
import numpy as np
from PIL import Image, ImageDraw

from .result import EditResult
from .tasks import TASKS

# The region the edit may change, grown by this share of the longer side (at least MIN_MARGIN_PX), and faded out
# over as much again: the guidance acts on whole latent cells and the decoder spreads a little beyond them.
MARGIN_SHARE = 0.03
MIN_MARGIN_PX = 6


# The ramp is computed where the margin is at most this many pixels and then resized: dilating a 6000x4000 image
# with a 361-px disc took a minute, at 1/11 of the size it takes a fraction of a second.
WORK_MARGIN_PX = 16


def blend_weights(edit_area: np.ndarray, size_hw: tuple[int, int], margin: int | None = None) -> np.ndarray:
    """(H, W) float32 in [0, 1] at size_hw: 1 on the (resized) edit area, a soft ramp around it, exactly 0 beyond."""
    h, w = size_hw
    if margin is None:
        margin = max(MIN_MARGIN_PX, int(round(MARGIN_SHARE * max(h, w))))
    if margin > WORK_MARGIN_PX:  # same shape at a coarser size; the area was on the latent grid anyway
        s = WORK_MARGIN_PX / margin
        small = _ramp(edit_area, (max(1, math.ceil(h * s)), max(1, math.ceil(w * s))), WORK_MARGIN_PX)
        alpha = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    else:
        alpha = _ramp(edit_area, (h, w), margin)
    alpha[alpha < 1 / 512] = 0.0  # what would round to the original anyway is the original, exactly
    return alpha


def _ramp(edit_area: np.ndarray, size_hw: tuple[int, int], margin: int) -> np.ndarray:
    h, w = size_hw
    area = cv2.resize(edit_area.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * margin + 1, 2 * margin + 1))
    grown = cv2.dilate(area, kernel).astype(np.float32)
    soft = cv2.GaussianBlur(grown, (0, 0), sigmaX=margin / 2)
    return np.maximum(soft, grown)  # full weight on the grown area, a ramp outside it


def full_resolution(result: EditResult, original, margin: int | None = None) -> Image.Image:
    """The edited image at `original`'s size: the working-size result resized (Lanczos) and blended into the
    original around `result.edit_area`; pixels outside that area (plus margin and soft edge) are the original's."""
    from .inputs import load_image

    orig = load_image(original, "original")
    h, w = orig.shape[:2]
    if result.photo is not None:  # a task that edited a crop of the photo has put it back already
        if result.photo.size != (w, h):
            raise ValueError(f"original: {w}x{h}, but the edit's photo is {result.photo.size[0]}x"
                             f"{result.photo.size[1]}; pass the photo the edit was made from")
        return result.photo
    if result.edit_area is None:
        raise ValueError("result: has no edit_area (a reconstruction); nothing to composite")
    alpha = blend_weights(result.edit_area, (h, w), margin)
    up = np.asarray(result.image.resize((w, h), Image.LANCZOS))
    out = orig.copy()
    ys, xs = np.nonzero(alpha.any(axis=1))[0], np.nonzero(alpha.any(axis=0))[0]
    if len(ys):  # blend only the box around the edit: on a large photo that is a small part of it
        box = np.s_[ys[0]:ys[-1] + 1, xs[0]:xs[-1] + 1]
        a = alpha[box][..., None]
        mixed = np.clip(np.rint(orig[box] * (1.0 - a) + up[box].astype(np.float32) * a), 0, 255).astype(np.uint8)
        out[box] = np.where(a > 0, mixed, orig[box])
    return Image.fromarray(out)


# ------------------------------------------------------------------------------------------------- preview

def draw_arrow(image: Image.Image, start, end, colour=(255, 255, 255)) -> Image.Image:
    out = image.copy()
    d = ImageDraw.Draw(out)
    d.line([tuple(start), tuple(end)], fill=colour, width=2)
    v = np.subtract(end, start).astype(float)
    n = np.linalg.norm(v)
    if n > 0:
        v /= n
        left = np.array(end) - 6 * v + 4 * np.array([-v[1], v[0]])
        right = np.array(end) - 6 * v - 4 * np.array([-v[1], v[0]])
        d.polygon([tuple(end), tuple(left), tuple(right)], fill=colour)
    d.ellipse([start[0] - 2, start[1] - 2, start[0] + 2, start[1] + 2], fill=(60, 120, 255))
    return out


def side_by_side(*images: Image.Image, gap: int = 4) -> Image.Image:
    w = sum(im.width for im in images) + gap * (len(images) - 1)
    h = max(im.height for im in images)
    sheet = Image.new("RGB", (w, h), (255, 255, 255))
    x = 0
    for im in images:
        sheet.paste(im, (x, 0))
        x += im.width + gap
    return sheet


def overlay(image: Image.Image, mask: np.ndarray, colour=(255, 200, 0), opacity: float = 0.45) -> Image.Image:
    """The image with the mask tinted (mask resized to the image if it is on a coarser grid)."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32)
    m = np.asarray(mask, dtype=np.uint8)
    if m.shape != arr.shape[:2]:
        m = cv2.resize(m, (arr.shape[1], arr.shape[0]), interpolation=cv2.INTER_NEAREST)
    tint = m.astype(bool)[..., None] * opacity
    return Image.fromarray(np.rint(arr * (1 - tint) + np.array(colour, np.float32) * tint).astype(np.uint8))


def preview(result: EditResult, saved: Image.Image | None = None) -> Image.Image:
    """Input with the user's mask tinted and the task's arrows (a drag's, a move's), the reference (two-image
    tasks), then the result: `saved` (the image as written, e.g. composited at the input's size) shown at the
    working size, else the working-size result."""
    info = TASKS.get(result.task)
    mask = None if info is None or info.user_mask is None else result.masks.get(info.user_mask)
    left = result.input_image if mask is None else overlay(result.input_image, mask)
    arrows = [] if info is None or info.arrows is None or result.spec is None else info.arrows(result)
    for start, end in arrows:
        left = draw_arrow(left, start, end)
    panels = [left]
    if result.reference_image is not None:
        ref_mask = result.masks.get("reference_object")
        panels.append(result.reference_image if ref_mask is None else overlay(result.reference_image, ref_mask))
    panels.append(result.image if saved is None else saved.convert("RGB").resize(result.image.size, Image.LANCZOS))
    return side_by_side(*panels)
