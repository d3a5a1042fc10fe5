"""The procedural scene generator and its benchmark cases: determinism, masks, captions, ground truth."""

import numpy as np
import pytest

from dragondiff.shapes import metrics as mt
from dragondiff.bench.cases import make_case
from dragondiff.shapes.scenes import COLOURS, RADIUS, Shape, make_scene, random_scene, with_shape


def test_deterministic_and_seed_dependent():
    a, b, c = random_scene(5), random_scene(5), random_scene(6)
    assert np.array_equal(a.image, b.image) and a.caption == b.caption
    assert not np.array_equal(a.image, c.image)


@pytest.mark.parametrize("seed", range(40))
def test_masks_colours_and_caption(seed):
    s = random_scene(seed)
    assert s.image.shape == (128, 128, 3) and s.image.dtype == np.uint8
    assert 1 <= len(s.shapes) <= 2 and len(s.masks) == len(s.shapes)
    colours = [sh.colour for sh in s.shapes] + [s.background[0]]
    assert len(set(colours)) == len(colours)  # distinct object and background colours
    for sh, m in zip(s.shapes, s.masks):
        assert RADIUS[0] <= sh.r <= RADIUS[1]
        inner = mt.erode(m, 1)
        assert np.abs(s.image[inner].astype(int) - COLOURS[sh.colour]).max() <= 1  # flat colour inside
        assert f"a {sh.colour} {sh.kind}" in s.caption
    if len(s.masks) == 2:
        assert not (mt.dilate(s.masks[0], 2) & s.masks[1]).any()  # well separated
    assert s.caption.endswith(f"on a {s.background[0]} background")


def test_mask_area_matches_geometry():
    s = make_scene([Shape("circle", "red", 64, 64, 20), Shape("square", "blue", 20, 20, 10)], ("white", None, 0))
    assert abs(s.masks[0].sum() - np.pi * 400) < 0.02 * np.pi * 400
    assert s.masks[1].sum() == 400
    moved = with_shape(s, 0, cx=70.0)
    assert np.array_equal(np.roll(s.masks[0], 6, axis=1), moved.masks[0])


@pytest.mark.parametrize("task", ["move", "resize", "drag", "appearance", "paste"])
def test_cases_are_deterministic_and_consistent(task):
    a, b = make_case(task, 3), make_case(task, 3)
    assert a.seed == b.seed and np.array_equal(a.target.image, b.target.image)
    src = a.scene.shapes[a.index] if task != "paste" else a.reference.shapes[0]
    dst = a.target.shapes[a.target_index]
    if task in ("move", "paste"):
        dx, dy = a.kwargs["offset"]
        assert (src.cx + dx, src.cy + dy) == pytest.approx((dst.cx, dst.cy))
    if task == "resize":
        # the engine scales about the image centre: p' = c + (p + d − c)·s
        (dx, dy), s = a.kwargs["offset"], a.kwargs["scale"]
        assert (64 + (src.cx + dx - 64) * s, 64 + (src.cy + dy - 64) * s) == pytest.approx((dst.cx, dst.cy))
        assert dst.r == pytest.approx(src.r * s)
    if task == "drag":
        shift = (dst.cx - src.cx, dst.cy - src.cy)
        assert len(a.kwargs["points"]) == 5
        for handle, target in a.kwargs["points"]:
            assert a.scene.masks[a.index][int(handle[1]), int(handle[0])]  # every handle on the object
            assert (target[0] - handle[0], target[1] - handle[1]) == pytest.approx(shift)
            assert a.kwargs["mask"][int(target[1]), int(target[0])] and a.kwargs["mask"][int(handle[1]), int(handle[0])]
    if task == "appearance":
        assert dst.colour == a.reference.shapes[0].colour != src.colour and (dst.cx, dst.kind) == (src.cx, src.kind)
        assert f"a {src.kind}" in a.prompt and src.colour not in a.prompt.split(" on ")[0].split(" and ")[0]


def test_segmentation_and_metrics():
    s = make_scene([Shape("circle", "red", 40, 40, 18)], ("green", None, 0))
    bg = np.broadcast_to(np.array(COLOURS["green"], np.uint8), s.image.shape)
    seg = mt.segment(s.image, COLOURS["red"], [COLOURS["blue"]], bg)
    assert mt.iou(seg, s.masks[0]) > 0.97
    assert mt.centroid(seg) == pytest.approx([40, 40], abs=0.5)
    assert mt.delta_e(COLOURS["red"], COLOURS["red"]) == 0 and mt.delta_e(COLOURS["red"], COLOURS["blue"]) > 50
    assert mt.psnr(s.image, s.image) == 100.0
