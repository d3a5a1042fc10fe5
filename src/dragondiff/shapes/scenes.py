"""Procedural scenes for the bundled model: flat-coloured shapes on smooth backgrounds, with exact masks and
captions, and the ground truth of edits (the same scene with an object moved, scaled, recoloured or pasted).

Everything is a pure function of a seed (numpy default_rng), so training data and benchmark cases are
reproducible. Shapes are anti-aliased by 4x supersampling; an object's mask is its coverage > 0.5.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

SIZE = 128
# Six well-separated colours (RGB); objects and background in one scene all differ.
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 210, 40),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
}
KINDS = ("circle", "square", "triangle")
RADIUS = (16, 28)  # px: circle radius, half side of a square, circumradius-ish of a triangle
MARGIN = 4  # px kept between shapes and from the border
# Seed ranges kept apart: the trainer's VAE data, UNet pool and evaluation scenes, and the benchmark's cases.
VAE_SCENE_BASE = 10_000_000
UNET_SCENE_BASE = 20_000_000
CASE_SEED_BASE = 70_000_000
EVAL_SCENE_BASE = 90_000_000


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    cx: float
    cy: float
    r: float

    def bbox(self) -> tuple[float, float, float, float]:
        return self.cx - self.r, self.cy - self.r, self.cx + self.r, self.cy + self.r


@dataclass
class Scene:
    image: np.ndarray  # (H, W, 3) uint8
    masks: list[np.ndarray]  # one (H, W) bool per shape, in drawing order
    caption: str
    shapes: list[Shape]
    background: tuple[str, str | None, float]  # (colour, second colour or None, gradient angle)


def _coverage(shape: Shape, size: int, ss: int = 4) -> np.ndarray:
    """Fraction of each pixel covered by the shape (ss x ss supersampling inside its bounding box)."""
    cov = np.zeros((size, size), np.float32)
    x0, y0, x1, y1 = shape.bbox()
    px0, py0 = max(int(np.floor(x0)) - 1, 0), max(int(np.floor(y0)) - 1, 0)
    px1, py1 = min(int(np.ceil(x1)) + 1, size), min(int(np.ceil(y1)) + 1, size)
    if px0 >= px1 or py0 >= py1:
        return cov
    ys = py0 + (np.arange((py1 - py0) * ss) + 0.5) / ss
    xs = px0 + (np.arange((px1 - px0) * ss) + 0.5) / ss
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    dx, dy = xx - shape.cx, yy - shape.cy
    if shape.kind == "circle":
        inside = dx**2 + dy**2 <= shape.r**2
    elif shape.kind == "square":
        inside = (np.abs(dx) <= shape.r) & (np.abs(dy) <= shape.r)
    elif shape.kind == "triangle":  # upward, apex at cy - r, base 2r wide at cy + r
        t = (dy + shape.r) / (2 * shape.r)
        inside = (t >= 0) & (t <= 1) & (np.abs(dx) <= t * shape.r)
    else:
        raise ValueError(f"unknown shape kind {shape.kind!r}")
    cov[py0:py1, px0:px1] = inside.reshape(py1 - py0, ss, px1 - px0, ss).mean(axis=(1, 3))
    return cov


def _background(bg: tuple[str, str | None, float], size: int) -> np.ndarray:
    colour, second, angle = bg
    base = np.array(COLOURS[colour], np.float32)
    img = np.broadcast_to(base, (size, size, 3)).copy()
    if second is not None:  # a very smooth linear blend towards 25 % of a second colour
        yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
        t = (np.cos(angle) * xx + np.sin(angle) * yy)
        t = (t - t.min()) / max(t.max() - t.min(), 1e-6) * 0.25
        img = img * (1 - t[..., None]) + np.array(COLOURS[second], np.float32) * t[..., None]
    return img


def render(shapes: list[Shape], bg, size: int = SIZE) -> tuple[np.ndarray, list[np.ndarray]]:
    img = _background(bg, size)
    masks = []
    for s in shapes:
        cov = _coverage(s, size)
        img = img * (1 - cov[..., None]) + np.array(COLOURS[s.colour], np.float32) * cov[..., None]
        masks.append(cov > 0.5)
    return np.clip(np.round(img), 0, 255).astype(np.uint8), masks


def caption(shapes: list[Shape], bg) -> str:
    things = [f"a {s.colour} {s.kind}" for s in shapes]
    return f"{' and '.join(things)} on a {bg[0]} background"


def make_scene(shapes: list[Shape], bg, size: int = SIZE) -> Scene:
    image, masks = render(shapes, bg, size)
    return Scene(image, masks, caption(shapes, bg), list(shapes), bg)


def fits(shape: Shape, others: list[Shape], size: int) -> bool:
    """Whether the shape lies inside the image (MARGIN from the border) and clear of every other shape."""
    x0, y0, x1, y1 = shape.bbox()
    if x0 < MARGIN or y0 < MARGIN or x1 > size - MARGIN or y1 > size - MARGIN:
        return False
    for o in others:
        if np.hypot(shape.cx - o.cx, shape.cy - o.cy) < (shape.r + o.r) * 1.42 + MARGIN:  # bboxes apart
            return False
    return True


def random_shape(rng, colour: str, others: list[Shape], size: int = SIZE, tries: int = 200) -> Shape | None:
    for _ in range(tries):
        r = float(rng.uniform(*RADIUS))
        s = Shape(str(rng.choice(KINDS)), colour, float(rng.uniform(r, size - r)), float(rng.uniform(r, size - r)), r)
        if fits(s, others, size):
            return s
    return None


def random_layout(seed, size: int = SIZE, n_objects: int | None = None) -> tuple[list[Shape], tuple]:
    """The shapes and background of a random scene, without drawing it (cheap: rendering is done by `render`
    here or in batches by `dragondiff.train.render_torch`). 1-2 shapes in distinct colours on a flat (half) or smoothly
    blended (half) background."""
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    order = rng.permutation(len(names))
    bg_colour = names[order[0]]
    second = names[order[1]] if rng.random() < 0.5 else None
    bg = (bg_colour, second, float(rng.uniform(0, 2 * np.pi)))
    n = n_objects or int(rng.integers(1, 3))
    shapes: list[Shape] = []
    for k in range(n):
        colour = names[order[2 + k]] if second is not None else names[order[1 + k]]
        s = random_shape(rng, colour, shapes, size)
        if s is not None:
            shapes.append(s)
    return shapes, bg


def random_scene(seed, size: int = SIZE, n_objects: int | None = None) -> Scene:
    """The scene of `random_layout(seed)`, drawn, with masks and caption."""
    shapes, bg = random_layout(seed, size, n_objects)
    return make_scene(shapes, bg, size)


def rescaled(scene: Scene, size: int) -> Scene:
    """The same layout drawn at `size` px: positions and radii scaled by size / the scene's size (a 256 px scene
    of the 128 px layouts, as the 256 px model trains on), masks and caption drawn anew."""
    f = size / scene.image.shape[0]
    shapes = [replace(s, cx=s.cx * f, cy=s.cy * f, r=s.r * f) for s in scene.shapes]
    return make_scene(shapes, scene.background, size)


def with_shape(scene: Scene, index: int, **changes) -> Scene:
    """The same scene with shape `index` changed (moved: cx, cy; scaled: r; recoloured: colour)."""
    shapes = list(scene.shapes)
    shapes[index] = replace(shapes[index], **changes)
    return make_scene(shapes, scene.background, scene.image.shape[0])


def displaced(rng, shape: Shape, others: list[Shape], lo: float = 24.0, hi: float = 40.0, tries: int = 200,
              size: int = SIZE) -> Shape | None:
    """The shape moved by a random distance in [lo, hi) in a random direction to where it fits, or None."""
    for _ in range(tries):
        ang, dist = rng.uniform(0, 2 * np.pi), rng.uniform(lo, hi)
        moved = Shape(shape.kind, shape.colour, shape.cx + dist * np.cos(ang), shape.cy + dist * np.sin(ang), shape.r)
        if fits(moved, others, size):
            return moved
    return None


def demo_scene() -> Scene:
    """The example scene of `dragondiff demo` and of the web UI: a red circle with room to move, a blue square."""
    return make_scene([Shape("circle", "red", 40.0, 64.0, 20.0), Shape("square", "blue", 100.0, 28.0, 16.0)],
                      ("green", None, 0.0))
