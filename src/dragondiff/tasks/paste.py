"""Object pasting: paste an object from a reference image into the base image.

The reference image is scaled by `scale` about its centre (nearest, mid-grey padding), then the object is placed
at its own position shifted by (dx, dy). z_T takes the reference's inverted noise inside the destination.
Bank: masked union (base background + reference object), steps 0..35. c = 0.04.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .. import energies as E
from ..attention import UNION
from ..features import resize_features
from ..inputs import load_image
from .base import (BenchCase, Task, TaskInfo, TaskUI, cells_to_mask, common_fields, latent_region, nearest,
                   paired_cells, place)
from .params import IMAGE, MASK, OFFSET, SCALE, TEXT, Params, param, weight


def scale_about_centre(x: torch.Tensor, scale: float, mode: str = "nearest") -> torch.Tensor:
    """(..., H, W) nearest-resized by `scale` and centre-cropped / zero-padded back to (H, W)."""
    if scale == 1:
        return x
    h, w = x.shape[-2:]
    lead = x.shape[:-2]
    y = F.interpolate(x.reshape(1, -1, h, w).float(), size=(int(h * scale), int(w * scale)), mode=mode)
    return place(y, (0, 0), (h, w)).reshape(*lead, h, w).to(x.dtype)


@dataclass
class PasteTask(Task):
    dest: torch.Tensor = None  # destination in the base image, feature res
    dest_cells: tuple = None
    src_cells: tuple = None
    shift_latent: tuple[int, int] = (0, 0)
    w_edit: float = None
    w_content: float = None

    def init_latent(self, inverted_t):
        base, ref = inverted_t[:1], inverted_t[1:2]
        m = latent_region(self.dest, base.shape[-2:]).to(base)
        moved = place(ref, self.shift_latent, tuple(base.shape[-2:]))
        return base * (1 - m) + moved * m, inverted_t

    def energies(self, gen, refs):
        hw = self.grid.feature_hw
        f = resize_features(gen, hw)
        base, ref = resize_features(refs[0], hw), resize_features(refs[1], hw)
        return (
            E.paste_edit(f, ref, self.dest_cells, self.src_cells, self.w_edit),
            E.keep_background(f, base, ~self.dest, self.w_content),
        )


def build_paste(*, reference_mask, offset_px, input_scale, **common) -> PasteTask:
    """reference_mask: image-res bool tensor at working size, already scaled about the centre like the image."""
    dx, dy = offset_px
    sx, sy = input_scale  # working size / original size, per axis
    image_hw = tuple(reference_mask.shape)
    grid = common["grid"]
    feat_hw, latent_hw, cell, f = grid.feature_hw, grid.latent_hw, grid.feature_cell, grid.vae_factor
    dest_image = place(reference_mask, (int(dy * sy), int(dx * sx)), image_hw)
    dest = nearest(dest_image, feat_hw)
    if not dest.any():
        raise ValueError(f"offset={offset_px}: the pasted object lands outside the image (or below one "
                         f"{cell}-px feature cell)")
    # Source cells = destination cells shifted back on the feature grid (official pairing).
    back = (-int(dy * sy / cell), -int(dx * sx / cell))
    dest_cells, src_cells = paired_cells(dest, back, feat_hw)
    if dest_cells[0].numel() == 0:
        raise ValueError(f"offset={offset_px}: no part of the pasted object maps back into the reference")
    if dest.all():
        raise ValueError("reference_mask: the pasted object covers the whole image; leave some background")
    region = latent_region(dest, latent_hw)
    return PasteTask(
        name="paste",
        edit_region=region,
        sde_region=region,
        bank_mode=UNION,
        union_masks={"base": dest_image, "replace": reference_mask},
        masks={"destination": dest_image.numpy(), "reference_object": reference_mask.numpy(),
               "source_cells": cells_to_mask(src_cells, feat_hw).numpy()},
        dest=dest,
        dest_cells=dest_cells,
        src_cells=src_cells,
        # The official latent shift forgets input_scale (dy/8); we apply it (fidelity.md).
        shift_latent=(int(dy * sy / f), int(dx * sx / f)),
        **common,
    )


@dataclass(frozen=True)
class PasteParams(Params):
    """Parameters of a paste."""

    TASK = "paste"
    reference: Any = param(kind=IMAGE, doc="the image holding the object")
    reference_mask: Any = param(kind=MASK, of="reference", doc="the object in the reference")
    offset: tuple[float, float] = param((0.0, 0.0), kind=OFFSET,
                                        doc="(dx, dy) from the object's reference position, in base-image pixels")
    scale: float = param(1.0, kind=SCALE, high=4.0, doc="size factor of the reference, about its centre")
    reference_prompt: str = param(None, kind=TEXT, default_from="prompt", default_text="the prompt",
                                  doc="the reference image's inversion prompt")
    w_edit: float = weight(4.0, "weight of the edit energy (pasted object like the reference's)")
    w_content: float = weight(6.0, "weight of the content energy (outside the destination kept)")


def from_spec(spec, prep) -> PasteTask:
    p = spec.params
    ref_pixels, _, ref_mask = prep.reference(p.reference, p.reference_mask)
    ref_pixels = scale_about_centre(ref_pixels, p.scale)  # zero padding = mid-grey in [-1, 1]
    ref_mask = scale_about_centre(ref_mask, p.scale)
    ref_image = ((ref_pixels[0].permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
    if not ref_mask.any():
        raise ValueError(f"scale={p.scale:g} crops the reference object away entirely")
    return build_paste(reference_mask=ref_mask, offset_px=p.offset, input_scale=prep.input_scale,
                       w_edit=p.w_edit, w_content=p.w_content,
                       # the official image prompt shows the whole reference as given, not the scaled one
                       **common_fields(spec, prep, reference=(ref_pixels, ref_image),
                                       prompt_reference=load_image(p.reference, "reference")))


# ------------------------------------------------------------------------------ edges: UI, preview, benchmarks
# (numpy only here; the benchmark's scene generator and metrics are imported when a case is made or scored)


def paste_offset(click, reference_mask: np.ndarray, ref_hw, base_hw) -> tuple[float, float]:
    """The paste offset that puts the reference object's centre on the click (the reference is stretched to the
    base image's size, as the engine does)."""
    ys, xs = np.nonzero(reference_mask)
    cx = xs.mean() * base_hw[1] / ref_hw[1]
    cy = ys.mean() * base_hw[0] / ref_hw[0]
    return float(click[0] - cx), float(click[1] - cy)


def _check_clicks(n: int) -> None:
    if n != 1:
        raise ValueError(f"points: paste needs one click where the pasted object's centre goes; {n} clicked")


def _clicks_to_fields(points, *, image_hw, reference_mask, reference_hw, scale: float = 1.0, **_) -> dict:
    return {"offset": paste_offset(points[0], reference_mask, reference_hw, image_hw), "scale": scale}


def _make_paste(seed, rng, scene) -> dict | None:
    """The single object of another random scene pasted where it fits, in a colour the scene does not use."""
    from ..shapes.scenes import SIZE, Shape, fits, make_scene, random_scene

    ref = random_scene(seed + 500_000, n_objects=1)
    if not ref.shapes:
        return None
    piece = ref.shapes[0]
    used = {o.colour for o in scene.shapes} | {scene.background[0]}
    if scene.background[1]:
        used.add(scene.background[1])
    if piece.colour in used:
        return None
    placed = None
    for _ in range(200):
        cand = Shape(piece.kind, piece.colour, float(rng.uniform(piece.r, SIZE - piece.r)),
                     float(rng.uniform(piece.r, SIZE - piece.r)), piece.r)
        if fits(cand, scene.shapes, SIZE):
            placed = cand
            break
    if placed is None:
        return None
    target = make_scene(scene.shapes + [placed], scene.background)
    fields = {"reference": ref.image, "reference_mask": ref.masks[0], "reference_prompt": ref.caption,
              "offset": (placed.cx - piece.cx, placed.cy - piece.cy)}
    return {"target": target, "index": 0, "kwargs": fields, "reference": ref, "target_index": len(scene.shapes),
            "prompt": target.caption}


def _evaluate_paste(case, output, colours, background, roundtrip):
    """The pasted object's colour against its ground-truth placement."""
    from ..shapes.metrics import THRESHOLDS, dilate, iou, measured_colour, segment

    ref_recon = roundtrip([case.reference])[0]
    piece = measured_colour(ref_recon, case.reference.masks[0])
    placed = case.target.masks[case.target_index]
    m = {"iou": iou(segment(output, piece, colours, background), placed)}
    return m, ~dilate(placed, 4), m["iou"] >= THRESHOLDS["iou"]


UI = TaskUI(
    title="Paste",
    mask_on_image=False,
    click_help="click where the pasted object's centre should go",
    check_clicks=_check_clicks,
    clicks_to_fields=_clicks_to_fields,
    scale=True,
    api_fields={"offset": "json", "scale": "number"},
)

INFO = TaskInfo(
    name="paste",
    build=from_spec,
    params=PasteParams,
    settings={"guidance_scale": 4.0, "energy_scale": 1.5, "gradient_coef": 0.04,
              "bank_steps": (0, 35), "ip_scale": 0.1},
    doc="Paste the object masked in a reference image into the image, shifted by offset and scaled by scale",
    example="room.png --reference cat.png --reference-mask cat_mask.png --offset -80,40",
    images=2,
    user_mask="destination",
    ui=UI,
    bench={"paste": BenchCase(
        seed_offset=4_000_000, make=_make_paste, evaluate=_evaluate_paste,
        example=lambda sc: {"reference": sc.image, "reference_mask": sc.other,
                            "offset": (-sc.size * 3 // 8, sc.size * 3 // 8)})},
)
