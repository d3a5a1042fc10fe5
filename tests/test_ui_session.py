"""The web UI's logic without a browser: masks from the editor, clicks, reused inversions, history."""

import json
import os

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
    with pytest.raises(S.UIError, match="4000x5000 .* at most 20 MB and 16 megapixels"):
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


def test_panel_points_from_the_pages_list():
    """The hidden field's list (the panel picture's pixels) in image pixels; anything else is refused by name."""
    assert S.panel_points("[[31, 31], [152, 182.5]]", (128, 128)) == [(10, 10), (50, 60)]  # the panel at 3x
    assert S.panel_points("[[700, 5]]", (1024, 768)) == [(700, 5)] and S.panel_points("", (128, 128)) == []
    for bad in ("[[1, 2, 3]]", '[["1", 2]]', "[[NaN, 1]]", "[[true, 1]]", "{}", "not json"):
        with pytest.raises(S.UIError, match="unreadable list of points"):
            S.panel_points(bad, (128, 128))
    with pytest.raises(S.UIError, match="201 clicked; at most 200"):
        S.panel_points(json.dumps([[1, 1]] * 201), (128, 128))


def test_points_lists_carry_a_version_and_an_older_one_never_replaces_a_newer():
    """page.js writes {"epoch", "seq", "points"}; redraw requests can arrive out of order (finding 15c), so the
    session takes a list only if its (epoch, seq) is not older than the one its panel shows; a new picture starts an
    epoch, after which lists of the old one are refused."""
    text = lambda e, n, pts: json.dumps({"epoch": e, "seq": n, "points": pts})  # noqa: E731
    assert S.panel_points(text(1, 4, [[31, 31]]), (128, 128)) == [(10, 10)]
    assert S.points_version(text(2, 7, [])) == (2, 7) and S.points_version("[[1, 1]]") == (0, 0)
    for bad in ('{"epoch": -1, "seq": 0, "points": []}', '{"epoch": 1, "seq": "2", "points": []}',
                '{"epoch": 1, "seq": 2}', '{"epoch": 1, "seq": 2, "points": [[1]]}'):
        with pytest.raises(S.UIError, match="unreadable list of points"):
            S.panel_points(bad, (128, 128))
    session = S.Session()
    assert session.newer_points("move", (0, 1)) and session.newer_points("move", (0, 3))
    assert not session.newer_points("move", (0, 2))  # arrived after seq 3's
    assert session.newer_points("move", (0, 3))  # the same list again (a repaint) is not older
    fresh = session.new_points_epoch("move")
    assert fresh == {"epoch": 1, "seq": 0, "points": []} and S.points_version(json.dumps(fresh)) == (1, 0)
    assert not session.newer_points("move", (0, 9))  # a list clicked on the previous picture
    assert session.newer_points("move", (1, 1)) and session.newer_points("drag", (0, 1))  # tabs are apart
    assert session.new_points_epoch("move")["epoch"] == 2


def test_run_edit_reuses_the_inversion_and_writes_a_sidecar(tiny_pipe, tmp_path):
    img, disc, _ = make_scene()
    session = S.Session()
    where = {"outputs": S.Outputs(parent=tmp_path), "owner": "page-1"}
    opts = {"num_inference_steps": 3, "max_resolution": 128, "preset": "official", "seed": 1}
    out1, st1, files = S.run_edit(tiny_pipe, session, "move", img, mask=disc, points=[(36, 44), (60, 50)],
                                  prompt="p", options=dict(opts), **where)
    assert st1["inversion"] == "computed" and out1.size == (128, 128)
    out2, st2, _ = S.run_edit(tiny_pipe, session, "move", img, mask=disc, points=[(36, 44), (60, 50)],
                              prompt="p", options=dict(opts), **where)
    assert st2["inversion"] == "reused"
    assert np.array_equal(np.asarray(out1), np.asarray(out2))  # a reused inversion gives the same edit
    _, st3, _ = S.run_edit(tiny_pipe, session, "move", img, mask=disc, points=[(36, 44), (60, 50)],
                           prompt="another prompt", options=dict(opts), **where)
    assert st3["inversion"] == "computed"  # a new prompt needs a new inversion
    side = json.loads(files[1].read_text())
    assert side["spec"]["image"] == "input.png" and side["spec"]["mask"] == "mask.png"
    assert (files[0].parent / "mask.png").exists() and side["spec"]["offset"] == [24.0, 6.0]
    with pytest.raises(S.UIError, match="move needs one handle"):
        S.run_edit(tiny_pipe, session, "move", img, mask=disc, points=[(36, 44)], prompt="p", options=dict(opts),
                   **where)
    session.push(img)
    assert session.pop() is img and session.pop() is None


def test_uploads_are_checked_from_the_header_and_named(tmp_path, monkeypatch):
    """Bytes, format and pixels are checked before the image is decoded; the message names the upload and says
    what is accepted; every mode is converted to RGB."""
    from PIL import Image

    big = tmp_path / "big.png"
    Image.new("L", (6000, 4000)).save(big)  # 24 megapixels in a few kB
    decoded = []
    monkeypatch.setattr(Image.Image, "load", lambda self, *a: decoded.append(self) or None)
    with pytest.raises(S.UIError) as e:
        S.read_upload(big, "image")
    assert not decoded  # refused from the header, no pixel decoded
    assert str(e.value) == ("image: big.png is 6000x4000 (24.0 megapixels); accepted: PNG, JPEG, WebP, GIF or BMP "
                            "images of at most 20 MB and 16 megapixels")
    monkeypatch.undo()
    text = tmp_path / "notes.txt"
    text.write_text("not an image\n")
    with pytest.raises(S.UIError, match=r"^reference: notes.txt is not an image; accepted: PNG"):
        S.read_upload(text, "reference")
    heavy = tmp_path / "heavy.png"
    with open(heavy, "wb") as f:
        f.truncate(20_000_001)
    with pytest.raises(S.UIError, match=r"^image: heavy.png is 20.0 MB; accepted: .* at most 20 MB"):
        S.read_upload(heavy)
    tiff = tmp_path / "scan.tif"
    Image.new("RGB", (16, 16)).save(tiff)
    with pytest.raises(S.UIError, match="scan.tif is not an image \\(TIFF file\\)"):
        S.read_upload(tiff)
    for mode in ("L", "P", "RGBA", "LA", "1", "I;16"):
        path = tmp_path / f"m{mode.replace(';', '')}.png"
        Image.new("RGB", (20, 10), (200, 30, 30)).convert(mode).save(path)
        out = S.read_upload(path)
        assert out.shape == (10, 20, 3) and out.dtype == np.uint8, mode


def test_results_folders_are_per_session_bounded_and_removed(tmp_path):
    """One folder per app in the temp dir, a subfolder per session removed when the session ends, the oldest
    edits removed past the cap, everything removed at close."""
    outputs = S.Outputs(cap_bytes=2500, parent=tmp_path)
    runs = []
    for k, owner in enumerate(["a", "b", "a", "b"]):
        run = outputs.session_folder(owner) / f"edit-{k:03d}"
        run.mkdir()
        (run / "result.png").write_bytes(b"x" * 1000)
        os.utime(run / "result.png", (1000 + k, 1000 + k))
        os.utime(run, (1000 + k, 1000 + k))
        runs.append(run)
        outputs.trim(keep=run)
    assert [r.exists() for r in runs] == [False, False, True, True]  # 2 kB fit under 2.5 kB: the oldest went
    (root,) = tmp_path.glob("dragondiff-ui-*")
    assert outputs.root == root and len(list(root.iterdir())) == 2
    outputs.end_session("a")
    assert not runs[2].parent.exists() and runs[3].exists()
    outputs.end_session("never-seen")  # nothing to remove
    outputs.close()
    assert not list(tmp_path.iterdir())


def test_task_fields_reference_upload_and_preview_drawing():
    """A task's own fields (TaskUI.fields) and mask-free reference become spec fields; its preview is drawn with
    numbered boxes, arrows where a point moves, handles red and targets blue."""
    from dragondiff.tasks import TASKS
    from dragondiff.ui.session import click_fields, draw_preview, ui_fields

    task = next(name for name, info in TASKS.items() if info.ui is not None and info.ui.fields)
    ui = TASKS[task].ui
    choice = next(f for f in ui.fields if f.choices)
    text = next(f for f in ui.fields if not f.choices)
    values = {choice.name: [choice.choices[-1]], text.name: " 0 "}
    assert ui_fields(task, values) == {choice.name: (choice.choices[-1],), text.name: "0"}
    assert ui_fields(task, {text.name: ""}) == {choice.name: ()}  # nothing ticked: the task says what is missing
    image = np.zeros((64, 64, 3), np.uint8)
    fields = click_fields(task, image, reference=image, values=values)
    assert fields["reference"] is image and fields[text.name] == "0" and "mask" not in fields
    shown = np.asarray(draw_preview(image, {"handles": [(10, 10), (30, 30)], "targets": [(10, 10), (50, 30)],
                                            "boxes": [(5, 5, 40, 40)]}))
    k = shown.shape[0] // 64
    assert k > 1 and tuple(shown[10 * k + k // 2, 10 * k + k // 2]) == (230, 30, 30)  # an unmoved handle: red
    assert tuple(shown[30 * k + k // 2, 50 * k + k // 2]) == (30, 90, 240)  # its target: blue
    assert (shown[5 * k, 20 * k:30 * k] == (255, 200, 0)).all()  # the box's top edge


def test_no_progress_cover_over_an_editor_for_its_own_upload(tiny_pipe):
    """Every image editor's upload event (which the editor also fires, twice, after the server sets its picture)
    shows no progress: with Gradio's cover the page now and then kept a finished event's "processing" over the
    editor for good, and strokes landed on the cover (tests/browser.py's paint found no mask)."""
    from conftest import require

    require("the web UI's page events", ("gradio",))
    from dragondiff.ui.app import build_app

    config = build_app(tiny_pipe, steps=2).config
    editors = {c["id"]: c["props"]["elem_id"] for c in config["components"] if c["type"] == "imageeditor"}
    uploads = {editors[target]: dep["show_progress"] for dep in config["dependencies"]
               for target, event in dep["targets"] if target in editors and event == "upload"}
    assert "move-editor" in uploads and "paste-reference" in uploads
    assert set(uploads) == set(editors.values())
    assert set(uploads.values()) == {"hidden"}, uploads
