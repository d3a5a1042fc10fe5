"""Seeded benchmark cases with ground truth, one generator per task.

Each case holds the inputs of one edit (image, masks, offset/points, reference) and the ground-truth scene after
the edit, so metrics compare the output with what the generator knows. Geometry follows the engine's semantics:
`move`/`paste` with scale s put an object's centre at c + (p + d − c)·s (c = image centre), so for a wanted
centre p' the offset is d = (p' − c)/s + c − p.
"""

from __future__ import annotations

from dataclasses import dataclass, field


import numpy as np

from ..shapes.scenes import COLOURS, SIZE, Scene, Shape, _fits, make_scene, random_scene

CASE_SEED_BASE = 70_000_000  # far from the training seeds
# The engine task each benchmark task runs (resize is a move with scale != 1).
ENGINE_TASK = {"move": "move", "resize": "move", "drag": "drag", "appearance": "appearance", "paste": "paste"}
TASK_OFFSETS = {"move": 0, "resize": 1_000_000, "drag": 2_000_000, "appearance": 3_000_000, "paste": 4_000_000}


@dataclass
class Case:
    task: str
    seed: int
    scene: Scene  # input
    target: Scene  # ground truth after the edit
    index: int  # the edited object in `scene` (for paste: in `reference`)
    kwargs: dict = field(default_factory=dict)  # EditSpec fields besides task, image and prompt
    reference: Scene | None = None
    target_index: int = 0  # the edited/pasted object's index in `target`
    prompt: str | None = None  # the edit prompt, when not the input's caption

    def spec(self, **fields):
        """The case as an EditSpec; `fields` adds the run's options (preset, seed, max_resolution, ...)."""
        from ..spec import EditSpec

        return EditSpec(task=ENGINE_TASK[self.task], image=self.scene.image,
                        prompt=self.prompt or self.scene.caption, **self.kwargs, **fields)


def _displaced(rng, shape: Shape, others, lo=24.0, hi=40.0, tries=200):
    for _ in range(tries):
        ang, dist = rng.uniform(0, 2 * np.pi), rng.uniform(lo, hi)
        moved = Shape(shape.kind, shape.colour, shape.cx + dist * np.cos(ang), shape.cy + dist * np.sin(ang), shape.r)
        if _fits(moved, others, SIZE):
            return moved
    return None


def _offset_for(shape: Shape, centre_to: tuple[float, float], scale: float) -> tuple[float, float]:
    c = SIZE / 2
    return ((centre_to[0] - c) / scale + c - shape.cx, (centre_to[1] - c) / scale + c - shape.cy)


def make_case(task: str, k: int) -> Case:
    """Case k of a task; retries seeds until the geometry fits (deterministic)."""
    for attempt in range(1000):
        seed = CASE_SEED_BASE + TASK_OFFSETS[task] + k * 1000 + attempt
        case = _try_case(task, seed)
        if case is not None:
            return case
    raise RuntimeError(f"no valid {task} case for k={k}")


def _try_case(task: str, seed: int) -> Case | None:
    rng = np.random.default_rng(seed)
    scene = random_scene(seed)
    if not scene.shapes:
        return None
    i = 0
    obj, others = scene.shapes[i], scene.shapes[1:]
    if task == "move":
        moved = _displaced(rng, obj, others)
        if moved is None:
            return None
        target = make_scene([moved] + others, scene.background)
        return Case(task, seed, scene, target, i, {"mask": scene.masks[i], "offset": (moved.cx - obj.cx, moved.cy - obj.cy)})
    if task == "resize":
        s = float(rng.choice([0.7, 1.3]))
        grown = Shape(obj.kind, obj.colour, obj.cx, obj.cy, obj.r * s)
        moved = _displaced(rng, grown, others, lo=16.0, hi=32.0)
        if moved is None:
            return None
        target = make_scene([moved] + others, scene.background)
        return Case(task, seed, scene, target, i,
                    {"mask": scene.masks[i], "offset": _offset_for(obj, (moved.cx, moved.cy), s), "scale": s})
    if task == "drag":
        moved = _displaced(rng, obj, others, lo=12.0, hi=24.0)
        if moved is None:
            return None
        # Five handles on the object (its centre and halfway to its edge left, right, up, down), each dragged by
        # the same displacement: one 3x3 feature box (12 px) at the centre of a 32-56 px object does not say
        # whether the object should move or stretch, so the ground truth "translated" needs the whole object held.
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
        return Case(task, seed, scene, target, i, {"points": points, "mask": editable})
    if task == "appearance":
        used = {obj.colour, scene.background[0]} | {o.colour for o in others}
        if scene.background[1]:
            used.add(scene.background[1])
        free = [c for c in COLOURS if c not in used]
        if not free:
            return None
        colour = str(rng.choice(free))
        ref_shape = Shape(str(rng.choice(["circle", "square", "triangle"])), colour, 64.0, 64.0, 22.0)
        bg_ref = next(c for c in COLOURS if c != colour)
        reference = make_scene([ref_shape], (bg_ref, None, 0.0))
        target = make_scene([Shape(obj.kind, colour, obj.cx, obj.cy, obj.r)] + others, scene.background)
        # The prompt names the object without its old colour: a user asking for a new look would not write the old
        # one, and with it CFG pulls the object back to that colour (measured: docs/shapes-model.md).
        prompt = scene.caption.replace(f"a {obj.colour} {obj.kind}", f"a {obj.kind}", 1)
        fields = {"mask": scene.masks[i], "reference": reference.image, "reference_mask": reference.masks[0],
                  "reference_prompt": reference.caption}
        return Case(task, seed, scene, target, i, fields, reference=reference, prompt=prompt)
    if task == "paste":
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
            if _fits(cand, scene.shapes, SIZE):
                placed = cand
                break
        if placed is None:
            return None
        target = make_scene(scene.shapes + [placed], scene.background)
        fields = {"reference": ref.image, "reference_mask": ref.masks[0], "reference_prompt": ref.caption,
                  "offset": (placed.cx - piece.cx, placed.cy - piece.cy)}
        return Case(task, seed, scene, target, 0, fields, reference=ref, target_index=len(scene.shapes),
                    prompt=target.caption)
    raise KeyError(task)
