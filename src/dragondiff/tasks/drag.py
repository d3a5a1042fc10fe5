"""Content dragging: handle -> target point pairs inside an editable mask.

Each pair compares a 3x3 box of generation features at the target with the reference features at the handle.
z_T copies the 3x3 latent patch at each handle to its target, in pair order; the official code also writes that
patch into inv[T] through a view, so the step-0 reference features see it too, which we reproduce.
Bank: concatenate, from step 5 on. c = 0.04.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .. import energies as E
from ..attention import CONCAT
from ..features import resize_features
from ..validate import check_point
from .base import BenchCase, Task, TaskInfo, TaskUI, common_fields, latent_region, nearest
from .params import MASK, POINTS, Params, param, weight

BOX = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]  # raster order of a 3x3 box


def box_cells(y: int, x: int):
    return torch.tensor([y + d[0] for d in BOX]), torch.tensor([x + d[1] for d in BOX])


@dataclass
class DragTask(Task):
    latent_pairs: list = field(default_factory=list)  # [((yh, xh), (yt, xt))] latent patch centres
    pairs: list = field(default_factory=list)  # [(target_box, handle_box, handle_only_cells)]
    other: torch.Tensor = None
    w_edit: float = None
    w_content: float = None
    w_inpaint: float = None

    def init_latent(self, inverted_t):
        # In place and on the CPU, as the official code: when a handle patch overlaps its target patch, torch's
        # sequential element copy propagates values across the overlap, and the official z_T carries that.
        z = inverted_t[:1].detach().cpu().clone()
        for (yh, xh), (yt, xt) in self.latent_pairs:
            z[:, :, yt - 1 : yt + 2, xt - 1 : xt + 2] = z[:, :, yh - 1 : yh + 2, xh - 1 : xh + 2]
        z = z.to(inverted_t.device)
        return z, z.clone()  # the official view aliasing: inv[T] used at step 0 is the patched latent

    def energies(self, gen, refs):
        f, r = resize_features(gen, self.grid.feature_hw), resize_features(refs[0], self.grid.feature_hw)
        return E.drag_edit(f, r, self.pairs, self.w_edit, self.w_inpaint), E.drag_content(
            f, r, self.other, self.w_content
        )


def build_drag(*, mask, points_scaled, **common) -> DragTask:
    """mask: image-res bool tensor (working size). points_scaled: [((hx, hy), (tx, ty))] in working pixels."""
    grid = common["grid"]
    latent_hw, feat_hw, cell_px = grid.latent_hw, grid.feature_hw, grid.feature_cell
    h, w = latent_hw
    inside = nearest(mask, feat_hw)
    if not inside.any():
        raise ValueError(f"mask: the editable area is smaller than one feature cell ({cell_px} px); draw a "
                         "larger mask")
    other = ~inside
    if not other.any():
        raise ValueError("mask: the editable area covers the whole image; leave some background outside it")
    pairs, latent_pairs, boxes = [], [], np.zeros((len(points_scaled), 2) + feat_hw, dtype=bool)

    def cell(x, y):
        # The official code clips x with the height bound; we clip each axis with its own (fidelity.md).
        return int(np.clip(y // cell_px, 1, feat_hw[0] - 2)), int(np.clip(x // cell_px, 1, feat_hw[1] - 2))

    for k, ((hx, hy), (tx, ty)) in enumerate(points_scaled):
        handle, target = cell(hx, hy), cell(tx, ty)
        if handle == target:
            raise ValueError(
                f"points[{k}]: handle ({hx:.0f}, {hy:.0f}) and target ({tx:.0f}, {ty:.0f}) fall in the same "
                f"{cell_px}-px feature cell; move the target at least {cell_px} px away"
            )
        handle_box, target_box = box_cells(*handle), box_cells(*target)
        hb = torch.zeros(feat_hw, dtype=torch.bool)
        hb[handle_box] = True
        tb = torch.zeros(feat_hw, dtype=torch.bool)
        tb[target_box] = True
        pairs.append((target_box, handle_box, hb & ~tb))
        boxes[k, 0], boxes[k, 1] = hb.numpy(), tb.numpy()
        # 3x3 latent patches; centres kept one cell inside the border so the patch exists (official: crash).
        latent_pairs.append(
            tuple((min(max(grid.feature_to_latent(cy), 1), h - 2), min(max(grid.feature_to_latent(cx), 1), w - 2))
                  for cy, cx in (handle, target))
        )
    return DragTask(
        name="drag",
        edit_region=latent_region(inside, latent_hw),
        sde_region=latent_region(inside, latent_hw),
        bank_mode=CONCAT,
        masks={"editable": mask.numpy(), "background_cells": other.numpy(), "handle_boxes": boxes[:, 0],
               "target_boxes": boxes[:, 1]},
        latent_pairs=latent_pairs,
        pairs=pairs,
        other=other,
        **common,
    )


@dataclass(frozen=True)
class DragParams(Params):
    """Parameters of a drag."""

    TASK = "drag"
    mask: Any = param(kind=MASK, of="image", doc="the editable area (targets must lie inside it)")
    points: tuple = param(kind=POINTS, doc="((handle_x, handle_y), (target_x, target_y)) pairs in original pixels")
    w_edit: float = weight(4.0, "weight of the edit energy (target boxes like the handle boxes)")
    w_content: float = weight(6.0, "weight of the content energy (outside the editable area kept)")
    w_inpaint: float = weight(0.2, "weight of the inpainting term (handle boxes left behind)")


def from_spec(spec, prep) -> DragTask:
    p = spec.params
    editable = prep.mask(p.mask, "mask", levels=1)  # the demo's sketch mask is 0/1
    sx, sy = prep.input_scale
    scaled = []
    for k, (handle, target) in enumerate(p.points):
        handle = check_point(handle, f"points[{k}] handle", prep.original_hw)
        target = check_point(target, f"points[{k}] target", prep.original_hw)
        scaled.append(((handle[0] * sx, handle[1] * sy), (target[0] * sx, target[1] * sy)))
        tx = min(int(scaled[-1][1][0]), prep.size_hw[1] - 1)
        ty = min(int(scaled[-1][1][1]), prep.size_hw[0] - 1)
        if not editable[ty, tx]:
            raise ValueError(f"points[{k}]: target ({target[0]:g}, {target[1]:g}) lies outside the editable mask")
    return build_drag(mask=editable, points_scaled=scaled, w_edit=p.w_edit,
                      w_content=p.w_content, w_inpaint=p.w_inpaint, **common_fields(spec, prep))


# ------------------------------------------------------------------------------ edges: UI, preview, benchmarks
# (numpy only here; the benchmark's scene generator and metrics are imported when a case is made or scored)


def _check_clicks(n: int) -> None:
    if n == 0 or n % 2:
        raise ValueError(f"points: drag needs handle/target pairs; {n} point{'s' * (n != 1)} clicked "
                         f"({'click a target for the last handle' if n % 2 else 'click a handle, then its target'})")


def _clicks_to_fields(points, **_) -> dict:
    return {"points": [(points[k], points[k + 1]) for k in range(0, len(points), 2)]}


def _arrows(result) -> list:
    """From each handle to its target (at the working size)."""
    (sx, sy) = result.input_scale
    return [((hx * sx, hy * sy), (tx * sx, ty * sy)) for (hx, hy), (tx, ty) in result.spec.points]


def _make_drag(seed, rng, scene) -> dict | None:
    """The first object dragged by 12-24 px. Five handles on the object (its centre and halfway to its edge left,
    right, up, down), each dragged by the same displacement: one 3x3 feature box (12 px) at the centre of a
    32-56 px object does not say whether the object should move or stretch, so the ground truth "translated"
    needs the whole object held. The editable mask is the box around source and target, 8 px wider."""
    from ..shapes.scenes import SIZE, displaced, make_scene

    obj, others = scene.shapes[0], scene.shapes[1:]
    moved = displaced(rng, obj, others, lo=12.0, hi=24.0)
    if moved is None:
        return None
    d = (moved.cx - obj.cx, moved.cy - obj.cy)
    q = obj.r / 2
    points = [((obj.cx + ox, obj.cy + oy), (obj.cx + ox + d[0], obj.cy + oy + d[1]))
              for ox, oy in ((0, 0), (q, 0), (-q, 0), (0, q), (0, -q))]
    x0 = max(0, int(min(obj.cx, moved.cx) - obj.r - 8))
    x1 = min(SIZE, int(max(obj.cx, moved.cx) + obj.r + 8))
    y0 = max(0, int(min(obj.cy, moved.cy) - obj.r - 8))
    y1 = min(SIZE, int(max(obj.cy, moved.cy) + obj.r + 8))
    editable = np.zeros((SIZE, SIZE), bool)
    editable[y0:y1, x0:x1] = True
    if editable.mean() > 0.7:
        return None
    target = make_scene([moved] + others, scene.background)
    return {"target": target, "index": 0, "kwargs": {"points": points, "mask": editable}}


def _evaluate_drag(case, output, colours, background, roundtrip):
    """As a move, except that the source area need not be vacated (a drag may stretch)."""
    from ..shapes.metrics import placed, placement

    m, keep, _ = placement(case, output, colours, background)
    return m, keep, placed(m, vacated=False)


def _example(sc) -> dict:
    s = sc.size
    return {"points": [((s * 5 // 16, s // 2), (s * 7 // 16, s // 2))], "mask": sc.region}


UI = TaskUI(
    title="Drag",
    click_help="click handle, target, handle, target, ...",
    check_clicks=_check_clicks,
    clicks_to_fields=_clicks_to_fields,
    api_fields={"points": "json"},
)

INFO = TaskInfo(
    name="drag",
    build=from_spec,
    params=DragParams,
    settings={"guidance_scale": 4.0, "energy_scale": 2.0, "gradient_coef": 0.04,
              "bank_steps": (5, None), "ip_scale": 0.1},
    doc="Drag content from handle points to target points inside an editable mask",
    example="face.png --mask face_mask.png --points '120,200:140,190 300,200:280,190'",
    images=1,
    user_mask="editable",
    arrows=_arrows,
    ui=UI,
    bench={"drag": BenchCase(seed_offset=2_000_000, make=_make_drag, evaluate=_evaluate_drag, example=_example)},
)
