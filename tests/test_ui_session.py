"""The web UI's logic without a browser: masks from the editor, clicks, reused inversions, history."""

import json

import numpy as np
import pytest

from conftest import make_scene
from dragondiff.tasks.paste import paste_offset
from dragondiff.ui import session as S


def _editor_value(image, painted=None):
    layer = np.zeros(image.shape[:2] + (4,), np.uint8)
    if painted is not None:
        layer[painted] = (255, 0, 255, 153)
    return {"background": np.dstack([image, np.full(image.shape[:2], 255, np.uint8)]), "layers": [layer],
            "composite": image}


def test_editor_image_mask_and_errors():
    img, disc, _ = make_scene()
    value = _editor_value(img, disc)
    assert np.array_equal(S.editor_image(value), img)
    assert np.array_equal(S.editor_mask(value, img.shape[:2]), disc)
    with pytest.raises(S.UIError, match="brush over the object"):
        S.editor_mask(_editor_value(img), img.shape[:2])
    with pytest.raises(S.UIError, match="upload an image"):
        S.editor_image(None)
    huge = {"background": np.zeros((5000, 4000, 3), np.uint8), "layers": []}
    with pytest.raises(S.UIError, match="larger than"):
        S.editor_image(huge)


def test_point_checks_and_paste_offset():
    with pytest.raises(S.UIError, match="click a target for the last handle"):
        S.check_points([(1, 1), (2, 2), (3, 3)], "drag", (128, 128))
    with pytest.raises(S.UIError, match="outside"):
        S.check_points([(1, 1), (200, 2)], "move", (128, 128))
    with pytest.raises(S.UIError, match="one click"):
        S.check_points([], "paste", (128, 128))
    S.check_points([(1, 1), (5, 5)], "drag", (128, 128))
    ref_mask = np.zeros((64, 64), bool)
    ref_mask[10:20, 30:40] = True  # centre (34.5, 14.5) -> (69, 29) at the base's 128 px
    assert paste_offset((100, 50), ref_mask, (64, 64), (128, 128)) == pytest.approx((31, 21))
    assert S.display_factor((128, 128)) == 3 and S.display_factor((1024, 768)) == 1
    drawn = S.draw_points(np.zeros((128, 128, 3), np.uint8), None, [(10, 10), (50, 60)])
    assert drawn.size == (384, 384) and np.asarray(drawn)[31, 31].any()  # the handle's dot at 3x


def test_run_edit_reuses_the_inversion_and_writes_a_sidecar(tiny_pipe):
    img, disc, _ = make_scene()
    session = S.Session()
    opts = {"num_inference_steps": 3, "max_resolution": 128, "preset": "official", "seed": 1}
    out1, st1, files = S.run_edit(tiny_pipe, session, "move", img, mask=disc, points=[(36, 44), (60, 50)],
                                  prompt="p", options=dict(opts))
    assert st1["inversion"] == "computed" and out1.size == (128, 128)
    out2, st2, _ = S.run_edit(tiny_pipe, session, "move", img, mask=disc, points=[(36, 44), (60, 50)],
                              prompt="p", options=dict(opts))
    assert st2["inversion"] == "reused"
    assert np.array_equal(np.asarray(out1), np.asarray(out2))  # a reused inversion gives the same edit
    _, st3, _ = S.run_edit(tiny_pipe, session, "move", img, mask=disc, points=[(36, 44), (60, 50)],
                           prompt="another prompt", options=dict(opts))
    assert st3["inversion"] == "computed"  # a new prompt needs a new inversion
    side = json.loads(files[1].read_text())
    assert side["spec"]["image"] == "input.png" and side["spec"]["mask"] == "mask.png"
    assert (files[0].parent / "mask.png").exists() and side["spec"]["offset"] == [24.0, 6.0]
    with pytest.raises(S.UIError, match="move needs one handle"):
        S.run_edit(tiny_pipe, session, "move", img, mask=disc, points=[(36, 44)], prompt="p", options=dict(opts))
    session.push(img)
    assert session.pop() is img and session.pop() is None
