"""The web UI's tabs in a real Chromium (Debian's package, driven by Playwright) against `dragondiff ui` started on
localhost with the bundled model and 4 DDIM steps ($DRAGONDIFF_UI_STEPS). Screenshots go to $DRAGONDIFF_UI_SHOTS
(default: tmp); the README's come from `DRAGONDIFF_UI_SHOTS=docs/img/ui DRAGONDIFF_UI_STEPS=50 pytest tests/test_ui.py`.

Skipped only outside CI when Gradio, Playwright or chromium is missing; in CI (CI=true) their absence fails."""

import os
import time
from pathlib import Path

import numpy as np
from PIL import Image

from conftest import require
from browser import browser, server, server_tmp, shots  # noqa: F401 (module-scoped pytest fixtures)
from browser import (RETRY, _image_box, _open, load_example, paint, settle, click_point, result_image, run_and_wait, error_shown, _message, _shown)

pytestmark = RETRY


def test_move_tab_edit_reuse_and_errors(browser, server, shots):
    from dragondiff.ui.app import example_scenes

    scene, _ = next(iter(example_scenes().values()))
    page = _open(browser, server)
    load_example(page, "move")
    paint(page, "move-editor", 16, 40, 64, 88)  # the red circle (centre 40, 64, radius 20)
    click_point(page, "move", 40, 64)
    click_point(page, "move", 84, 88)
    start = time.time()
    first = run_and_wait(page, "move")
    first_s = time.time() - start
    assert "inversion computed" in first
    out = result_image(page, "move")
    assert out.shape == scene.shape and np.abs(out.astype(int) - scene).mean() > 2  # the edit changed the image
    listed = page.inner_text("#move-files").replace("\n", "")
    assert "result.png" in listed and "result.json" in listed
    page.screenshot(path=str(shots / "ui-move.png"), full_page=True)
    start = time.time()
    second = run_and_wait(page, "move", "inversion reused")  # same image and prompt: no second inversion
    steps = os.environ.get("DRAGONDIFF_UI_STEPS", "4")
    print(f"UI move: first {first_s:.1f} s, second {time.time() - start:.1f} s ({steps} steps, bundled model)")
    # bad input: no target clicked
    page.click("#move-clear-points")
    page.wait_for_timeout(500)
    page.click("#move-run")
    assert error_shown(page, "move needs one handle")
    page.screenshot(path=str(shots / "ui-error.png"))
    # edit this result, then undo back to the example
    page.click("#move-again")
    page.wait_for_timeout(1500)
    page.click("#move-undo")
    page.wait_for_timeout(1000)
    page.close()
    assert "reused" in second


def test_drag_tab_and_odd_clicks(browser, server, shots):
    page = _open(browser, server)
    page.click("#tab-drag-button") if page.locator("#tab-drag-button").count() else page.get_by_role(
        "tab", name="Drag").click()
    load_example(page, "drag")
    paint(page, "drag-editor", 14, 38, 96, 100)
    click_point(page, "drag", 40, 64)
    page.click("#drag-run")
    assert error_shown(page, "drag needs handle/target pairs")
    click_point(page, "drag", 64, 84)
    assert "done" in run_and_wait(page, "drag")
    page.screenshot(path=str(shots / "ui-drag.png"), full_page=True)
    page.close()


def test_two_tasks_with_reference_and_missing_mask(browser, server, shots):
    page = _open(browser, server)
    page.get_by_role("tab", name="Appearance").click()
    load_example(page, "appearance")
    _image_box(page, "appearance-reference")  # it holds the example too, fitted (see _image_box)
    page.click("#appearance-run")
    assert error_shown(page, "brush over the object first")
    paint(page, "appearance-editor", 18, 42, 62, 86)
    paint(page, "appearance-reference", 18, 18, 62, 62)  # the yellow circle
    assert "done" in run_and_wait(page, "appearance")
    page.screenshot(path=str(shots / "ui-appearance.png"), full_page=True)
    page.get_by_role("tab", name="Paste").click()
    load_example(page, "paste")
    paint(page, "paste-reference", 66, 62, 118, 112)  # the white triangle
    click_point(page, "paste", 92, 84)
    assert "done" in run_and_wait(page, "paste")
    page.screenshot(path=str(shots / "ui-paste.png"), full_page=True)
    page.close()


def test_face_tab_previews_the_landmarks_and_puts_the_edit_back_into_the_photo(browser, server, shots, tmp_path):
    require("the face tab", modules=("dlib", "face_recognition_models"))
    data = Path(__file__).parent / "data" / "face"
    photo = np.asarray(Image.open(data / "astronaut.jpg").convert("RGB"))
    # the reference: the same face sheared (its landmarks differ a little), as tests/test_face.py's `warped`
    Image.fromarray(photo).transform(photo.shape[1::-1], Image.AFFINE, (1, 0.08, -10, 0, 1, 0),
                                     Image.BILINEAR).save(tmp_path / "reference.png")
    page = _open(browser, server)
    page.get_by_role("tab", name="Face").click()
    page.locator("#face-editor input[type=file]").first.set_input_files(str(data / "astronaut.jpg"))
    # dlib also finds a weak "face" on the mission patch: the message lists both, the preview numbers their boxes
    assert "#1: box" in _message(page, "face", "2 faces found", timeout=60)
    page.locator("#face-face textarea, #face-face input").first.fill("0")
    deadline = time.time() + 30
    while "faces found" in page.inner_text("#face-message") and time.time() < deadline:
        page.wait_for_timeout(200)
    assert page.inner_text("#face-message").strip() == ""
    page.locator("#face-reference input[type=file]").first.set_input_files(str(tmp_path / "reference.png"))
    deadline, blue = time.time() + 30, 0
    while time.time() < deadline and blue < 20:  # the targets (blue dots) appear
        settle(page, "#face-preview img", quiet_ms=600)
        shown = _shown(page, "#face-preview")
        blue = int(((shown[..., 2] > 200) & (shown[..., 0] < 80) & (shown[..., 1] < 130)).sum())
    assert shown.shape == photo.shape and blue >= 20 and page.inner_text("#face-message").strip() == ""
    assert "done" in run_and_wait(page, "face")
    out = result_image(page, "face")
    assert out.shape == photo.shape  # the edit put back into the photo at its full size
    far = np.ones(photo.shape[:2], bool)
    far[40:240, 120:330] = False
    assert np.abs(out[far].astype(int) - photo[far]).max() <= 12  # away from the face: the photo (its JPEG round trip)
    assert page.locator("#face-working img").count() == 1  # the edited crop at the working size
    page.screenshot(path=str(shots / "ui-face.png"), full_page=True)
