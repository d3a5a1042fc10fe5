"""Batched scene rendering in torch, on the training device: the same pictures as `scenes.render`, so that data
never starves a GPU and the CPU trainer does not spend its time in numpy.

Layouts (shapes and background) still come from `scenes.random_layout` (a few microseconds each, numpy); only the
drawing is vectorised here: every shape of every scene is evaluated on the 4x supersampled grid at once, averaged
to coverage and composited in drawing order, exactly as `scenes.render` does pixel by pixel.
`tests/test_shapes_render.py` checks that the two agree.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..shapes.scenes import COLOURS, KINDS, SIZE

_COLOUR_NAMES = list(COLOURS)
_PALETTE = torch.tensor(list(COLOURS.values()), dtype=torch.float32)  # (n_colours, 3)


def _pack(layouts, device) -> dict[str, torch.Tensor]:
    """Layouts as padded tensors: shapes (B, N) with a validity mask, backgrounds (B,)."""
    n = max(1, max(len(shapes) for shapes, _ in layouts))
    b = len(layouts)
    kind = torch.zeros(b, n, dtype=torch.long)
    colour = torch.zeros(b, n, dtype=torch.long)
    geom = torch.zeros(b, n, 3, dtype=torch.float64)  # cx, cy, r
    valid = torch.zeros(b, n, dtype=torch.bool)
    bg = torch.zeros(b, dtype=torch.long)
    bg2 = torch.zeros(b, dtype=torch.long)
    has2 = torch.zeros(b, dtype=torch.bool)
    angle = torch.zeros(b)
    for i, (shapes, (c, second, a)) in enumerate(layouts):
        bg[i], angle[i] = _COLOUR_NAMES.index(c), float(a)
        if second is not None:
            bg2[i], has2[i] = _COLOUR_NAMES.index(second), True
        for j, s in enumerate(shapes):
            kind[i, j], colour[i, j] = KINDS.index(s.kind), _COLOUR_NAMES.index(s.colour)
            geom[i, j] = torch.tensor([s.cx, s.cy, s.r], dtype=torch.float64)
            valid[i, j] = True
    out = dict(kind=kind, colour=colour, geom=geom, valid=valid, bg=bg, bg2=bg2, has2=has2, angle=angle)
    return {k: v.to(device) for k, v in out.items()}


def _coverage(p, size: int, ss: int) -> torch.Tensor:
    # float64 like numpy: a sample lying exactly on an edge must fall on the same side as in `scenes.render`
    pos = (torch.arange(size * ss, device=p["geom"].device, dtype=torch.float64) + 0.5) / ss
    cx, cy, r = (p["geom"][..., k, None, None].double() for k in range(3))  # (B, N, 1, 1)
    dx = pos.view(1, 1, 1, -1) - cx
    dy = pos.view(1, 1, -1, 1) - cy
    kind = p["kind"][..., None, None]
    circle = dx**2 + dy**2 <= r**2
    square = (dx.abs() <= r) & (dy.abs() <= r)
    t = (dy + r) / (2 * r).clamp_min(1e-6)
    triangle = (t >= 0) & (t <= 1) & (dx.abs() <= t * r)
    inside = torch.where(kind == 0, circle, torch.where(kind == 1, square, triangle)) & p["valid"][..., None, None]
    b, n = p["kind"].shape
    return F.avg_pool2d(inside.float().view(b * n, 1, size * ss, size * ss), ss).view(b, n, size, size)


def render_batch(layouts, size: int = SIZE, device="cpu", with_masks: bool = False):
    """Float images (B, 3, size, size) in [0, 255], rounded like `scenes.render`, and optionally the object masks
    (B, N, size, size) bool (coverage > 0.5). Layouts are in SIZE (128 px) coordinates; another `size` draws them
    scaled by size / SIZE, as `scenes.rescaled` does (the 256 px model sees the same layouts, twice as large)."""
    p = _pack(layouts, device)
    if size != SIZE:
        p["geom"] = p["geom"] * (size / SIZE)
    palette = _PALETTE.to(device)
    cov = _coverage(p, size, 4)
    # Background: the named colour, blended towards 25 % of a second colour along a direction.
    grid = torch.arange(size, device=device, dtype=torch.float32) / (size - 1)
    a = p["angle"].view(-1, 1, 1)
    t = torch.cos(a) * grid.view(1, 1, -1) + torch.sin(a) * grid.view(1, -1, 1)
    lo = t.amin(dim=(1, 2), keepdim=True)
    hi = t.amax(dim=(1, 2), keepdim=True)
    t = (t - lo) / (hi - lo).clamp_min(1e-6) * 0.25
    t = torch.where(p["has2"].view(-1, 1, 1), t, torch.zeros_like(t))[:, None]  # (B, 1, H, W)
    img = palette[p["bg"]].view(-1, 3, 1, 1) * (1 - t) + palette[p["bg2"]].view(-1, 3, 1, 1) * t
    for j in range(cov.shape[1]):
        c = cov[:, j, None]
        img = img * (1 - c) + palette[p["colour"][:, j]].view(-1, 3, 1, 1) * c
    img = img.round().clamp(0, 255)
    return (img, cov > 0.5) if with_masks else img


def captions(layouts) -> list[str]:
    from ..shapes.scenes import caption

    return [caption(shapes, bg) for shapes, bg in layouts]

