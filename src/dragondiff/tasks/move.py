"""Object moving and resizing.

The object is shifted by (dx, dy) and then scaled by `scale` about the image centre (official geometry): its
centre ends at c + (p + d − c)·scale. The reference features are nearest-resized by `scale` from their native maps.
Bank: replace, from step 5 on. c = 0.08.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .. import energies as E
from ..attention import REPLACE
from ..features import resize_features
from .base import (BenchCase, Task, TaskInfo, TaskUI, cells_to_mask, common_fields, latent_region, nearest,
                   paired_cells, place)
from .params import MASK, OFFSET, SCALE, Params, param, weight


@dataclass
class MoveTask(Task):
    object_mask: torch.Tensor = None  # image-res bool
    scale: float = 1.0
    shift_latent: tuple[int, int] = (0, 0)
    dest_cells: tuple = None
    src_cells: tuple = None
    other: torch.Tensor = None
    non_overlap: torch.Tensor = None
    region: torch.Tensor = None
    w_edit: float = None
    w_content: float = None
    w_contrast: float = None
    w_inpaint: float = None

    def init_latent(self, inverted_t):
        """Copy the object's inverted noise to its destination (official z_T initialisation, scaled offset)."""
        z = inverted_t[:1]
        h, w = z.shape[-2:]
        canvas = (int(h * self.scale), int(w * self.scale))
        m = place(nearest(self.object_mask, canvas).to(z.dtype), self.shift_latent, (h, w)).to(z.device)
        z_scaled = place(torch.nn.functional.interpolate(z, size=canvas, mode="nearest"), self.shift_latent, (h, w))
        return z * (1 - m) + z_scaled * m, inverted_t

    def energies(self, gen, refs):
        ref = refs[0]
        f, r0 = resize_features(gen, self.grid.feature_hw), resize_features(ref, self.grid.feature_hw)
        rs = resize_features(ref, self.grid.scaled_feature_hw(self.scale))
        e_edit = E.move_edit(f, rs, self.dest_cells, self.src_cells, self.w_edit)
        e_content = E.move_content(
            f, r0, self.other, self.non_overlap, self.region, self.w_content, self.w_contrast, self.w_inpaint
        )
        return e_edit, e_content


def build_move(*, object_mask, reference_region, offset_px, input_scale, scale, **common) -> MoveTask:
    """object_mask / reference_region: image-res bool tensors at working size; offset_px in original pixels;
    input_scale = (sx, sy), working size / original size per axis."""
    dx, dy = offset_px
    sx, sy = input_scale
    grid = common["grid"]
    feat_hw, latent_hw, cell, f = grid.feature_hw, grid.latent_hw, grid.feature_cell, grid.vae_factor
    mask_org = nearest(object_mask, feat_hw)
    if not mask_org.any():
        raise ValueError(f"mask: the object is smaller than one feature cell ({cell} px) at the working size; "
                         "draw a larger mask or raise max_resolution")
    canvas = grid.scaled_feature_hw(scale)
    if min(canvas) < 1:
        raise ValueError(f"scale={scale:g} shrinks the image below one feature cell ({cell} px); use a larger scale")
    mask_tar = nearest(object_mask, canvas)
    if not mask_tar.any():
        raise ValueError(f"scale={scale:g} shrinks the object below one feature cell ({cell} px); use a larger scale")
    # Official feature-grid shift: floor-divide by the cell size first, then x scale, then truncate.
    shift_f = (int((dy * sy) // cell * scale), int((dx * sx) // cell * scale))
    src_cells, dest_cells = paired_cells(mask_tar, shift_f, feat_hw)
    if src_cells[0].numel() == 0:
        raise ValueError(
            f"offset={offset_px} with scale={scale:g} moves the whole object outside the image; nothing to place"
        )
    mask_dest = cells_to_mask(dest_cells, feat_hw)
    flags = []
    if src_cells[0].numel() < int(mask_tar.sum()):
        flags.append("part of the moved object falls outside the image and is dropped")
    other = ~(mask_dest | mask_org)
    non_overlap = mask_org & ~mask_dest
    if not non_overlap.any():
        flags.append("the destination covers the source: no vacated area, contrast/inpaint terms skipped")
    region = other if reference_region is None else nearest(reference_region, feat_hw)
    if not region.any():
        raise ValueError(f"reference_region: empty on the {cell}-px feature grid; draw a larger region")
    union = latent_region(mask_org | mask_dest, latent_hw)
    # The official latent shift forgets input_scale (dx/8); we apply it (fidelity.md).
    shift_latent = (int(dy * sy / f * scale), int(dx * sx / f * scale))
    masks = {
        "object": object_mask.numpy(),
        "source_cells": mask_org.numpy(),
        "destination_cells": mask_dest.numpy(),
        "background_cells": other.numpy(),
        "vacated_cells": non_overlap.numpy(),
    }
    if reference_region is not None:
        masks["reference_region"] = reference_region.numpy()
    return MoveTask(
        name="move",
        edit_region=latent_region(mask_dest, latent_hw),
        sde_region=union,
        bank_mode=REPLACE,
        masks=masks,
        flags=flags,
        object_mask=object_mask,
        scale=scale,
        shift_latent=shift_latent,
        dest_cells=dest_cells,
        src_cells=src_cells,
        other=other,
        non_overlap=non_overlap,
        region=region,
        **common,
    )


@dataclass(frozen=True)
class MoveParams(Params):
    """Parameters of a move (and resize)."""

    TASK = "move"
    mask: Any = param(kind=MASK, of="image", doc="the object (white on black, the size of the image)")
    offset: tuple[float, float] = param((0.0, 0.0), kind=OFFSET, doc="(dx, dy) in original pixels",
                                      default_text="0,0: no move, so give it unless --scale resizes in place")
    scale: float = param(1.0, kind=SCALE, high=10.0, doc="size factor, about the image centre")
    reference_region: Any = param(None, kind=MASK, of="image", default_text="the background",
                                  doc="mask of the area the vacated place should come to look like")
    w_edit: float = weight(4.0, "weight of the edit energy (object at its destination)")
    w_content: float = weight(6.0, "weight of the content energy (background kept)")
    w_contrast: float = weight(0.2, "weight of the contrast term (vacated area unlike the object)")
    w_inpaint: float = weight(0.8, "weight of the inpainting term (vacated area like the reference region)")


def from_spec(spec, prep) -> MoveTask:
    p = spec.params
    dx, dy = p.offset
    if dx == 0 and dy == 0 and p.scale == 1:
        raise ValueError("offset=(0, 0) with scale=1 is not an edit; give a displacement or a scale")
    obj = prep.mask(p.mask, "mask")
    region = None if p.reference_region is None else prep.mask(p.reference_region, "reference_region")
    return build_move(
        object_mask=obj, reference_region=region, offset_px=(dx, dy), input_scale=prep.input_scale,
        scale=p.scale, w_edit=p.w_edit, w_content=p.w_content,
        w_contrast=p.w_contrast, w_inpaint=p.w_inpaint, **common_fields(spec, prep),
    )


# ------------------------------------------------------------------------------ edges: UI, preview, benchmarks
# (numpy only here; the benchmark's scene generator and metrics are imported when a case is made or scored)


def _check_clicks(n: int) -> None:
    if n != 2:
        raise ValueError(f"points: move needs one handle (on the object) and one target; {n} clicked")


def _clicks_to_fields(points, *, scale: float = 1.0, **_) -> dict:
    (hx, hy), (tx, ty) = points
    return {"offset": (tx - hx, ty - hy), "scale": scale}


def _arrows(result) -> list:
    """From the object's centre by the offset (at the working size)."""
    spec, (sx, sy) = result.spec, result.input_scale
    ys, xs = np.nonzero(result.masks["object"])
    if len(xs) == 0:
        return []
    start = (float(xs.mean()), float(ys.mean()))
    return [(start, (start[0] + spec.offset[0] * sx, start[1] + spec.offset[1] * sy))]


def _make_move(seed, rng, scene) -> dict | None:
    """The first object displaced by 24-40 px to where it fits."""
    from ..shapes.scenes import displaced, make_scene

    obj, others = scene.shapes[0], scene.shapes[1:]
    moved = displaced(rng, obj, others)
    if moved is None:
        return None
    target = make_scene([moved] + others, scene.background)
    return {"target": target, "index": 0,
            "kwargs": {"mask": scene.masks[0], "offset": (moved.cx - obj.cx, moved.cy - obj.cy)}}


def _make_resize(seed, rng, scene) -> dict | None:
    """The first object scaled by 0.7 or 1.3 and displaced by 16-32 px. With scale s the engine puts the object's
    centre at c + (p + d − c)·s (c = image centre), so for a wanted centre p' the offset is
    d = (p' − c)/s + c − p."""
    from ..shapes.scenes import SIZE, Shape, displaced, make_scene

    obj, others = scene.shapes[0], scene.shapes[1:]
    s = float(rng.choice([0.7, 1.3]))
    grown = Shape(obj.kind, obj.colour, obj.cx, obj.cy, obj.r * s)
    moved = displaced(rng, grown, others, lo=16.0, hi=32.0)
    if moved is None:
        return None
    target = make_scene([moved] + others, scene.background)
    c = SIZE / 2
    offset = ((moved.cx - c) / s + c - obj.cx, (moved.cy - c) / s + c - obj.cy)
    return {"target": target, "index": 0, "kwargs": {"mask": scene.masks[0], "offset": offset, "scale": s}}


def _evaluate_move(case, output, colours, background, roundtrip):
    from ..shapes.metrics import placed, placement

    m, keep, _ = placement(case, output, colours, background)
    return m, keep, placed(m)


def _evaluate_resize(case, output, colours, background, roundtrip):
    from ..shapes.metrics import THRESHOLDS, placed, placement

    m, keep, seg = placement(case, output, colours, background)
    m["area_ratio"] = float(seg.sum() / case.scene.masks[case.index].sum())
    m["area_ratio_rel_err"] = abs(m["area_ratio"] / case.kwargs["scale"] ** 2 - 1)
    return m, keep, placed(m) and m["area_ratio_rel_err"] <= THRESHOLDS["area_ratio_rel"]


UI = TaskUI(
    title="Move & resize",
    click_help="click a handle on the object, then where it should go",
    check_clicks=_check_clicks,
    clicks_to_fields=_clicks_to_fields,
    scale=True,
    api_fields={"offset": "json", "scale": "number"},
)
BENCH = {
    "move": BenchCase(seed_offset=0, make=_make_move, evaluate=_evaluate_move,
                      example=lambda sc: {"mask": sc.object, "offset": (sc.size // 4, 0)}),
    "resize": BenchCase(seed_offset=1_000_000, make=_make_resize, evaluate=_evaluate_resize,
                        example=lambda sc: {"mask": sc.object, "offset": (sc.size // 16, 0), "scale": 1.3}),
}

INFO = TaskInfo(
    name="move",
    build=from_spec,
    params=MoveParams,
    settings={"guidance_scale": 4.0, "energy_scale": 0.5, "gradient_coef": 0.08,
              "bank_steps": (5, None), "ip_scale": 0.1},
    doc="Move the masked object by offset; scale also resizes it (about the image centre, as the official code)",
    example="cup.png --mask cup_mask.png --offset 120,0 --prompt 'a cup on a table'",
    images=1,
    user_mask="object",
    arrows=_arrows,
    ui=UI,
    bench=BENCH,
)
