"""The web UI's pages in a real Chromium: sessions, failures, uploads, quick clicks, the server's port. The
server, browser and helpers: tests/browser.py."""

import io
import os
import socket
import subprocess
import time

import numpy as np
from PIL import Image

from conftest import require
from browser import browser, server, server_tmp  # noqa: F401 (module-scoped pytest fixtures)
from browser import (RETRY, EXE, _open, load_example, paint, ready_move, settle, click_point, result_image, run_and_wait, wait_status, _message, _points_field, _panel_shows, _click_panel)

pytestmark = RETRY


def test_two_sessions_get_their_own_results(browser, server):
    pages = [_open(browser, server), _open(browser, server)]
    names = ["red circle, blue square", None]
    for k, page in enumerate(pages):
        if names[k] is None:  # the second session picks another example scene
            page.locator("#move-example input").first.click()
            page.get_by_role("option").nth(1).click()
        load_example(page, "move")
        paint(page, "move-editor", *((20, 20, 60, 60) if k else (16, 40, 64, 88)))
        click_point(page, "move", 40, 50)
        click_point(page, "move", 70, 70)
    befores = [p.inner_text("#move-status") for p in pages]
    for page in pages:  # both queued at once
        page.click("#move-run")
    for page, before in zip(pages, befores):
        wait_status(page, "move", before)
    a, b = (result_image(p, "move") for p in pages)
    assert not np.array_equal(a, b)
    for page in pages:
        assert "inversion computed" in page.inner_text("#move-status")  # no session saw the other's inversion
        page.close()


def test_failed_run_keeps_the_result_and_says_why_in_the_message_area(browser, server):
    page = ready_move(browser, server)
    run_and_wait(page, "move")
    before = page.locator("#move-result img").first.get_attribute("src")
    page.click("#move-clear-points")
    page.wait_for_timeout(800)
    page.click("#move-run")
    assert "move needs one handle" in _message(page, "move", "move needs one handle")
    page.wait_for_timeout(500)
    assert page.locator("#move-result img").first.get_attribute("src") == before  # the good result stays
    assert page.locator("#move-result").get_by_text("Error").count() == 0  # no error badge over it
    assert page.locator(".toast-body").count() == 0
    page.close()


def test_closing_the_page_removes_its_session_folder(browser, server, server_tmp):
    page = ready_move(browser, server)
    before = set(server_tmp.glob("dragondiff-ui-*/session-*"))
    run_and_wait(page, "move")
    (mine,) = set(server_tmp.glob("dragondiff-ui-*/session-*")) - before
    assert list(mine.glob("edit-*/result.png"))
    page.close()
    deadline = time.time() + 20
    while mine.exists() and time.time() < deadline:
        time.sleep(0.3)
    assert not mine.exists()


def test_uploads_over_the_limits_or_not_images_are_named_in_the_page(browser, server, tmp_path):
    """Checked before the editor reads the file: no freeze, no upload left spinning, a message naming it."""
    Image.new("RGB", (6000, 4000), (200, 30, 30)).save(tmp_path / "big.png")  # 24 megapixels in ~80 kB
    with open(tmp_path / "heavy.png", "wb") as f:
        f.truncate(21_000_000)
    (tmp_path / "notes.txt").write_text("not an image\n" * 10)
    page = _open(browser, server)
    rule = "accepted: PNG, JPEG, WebP, GIF or BMP images of at most 20 MB and 16 megapixels"
    for name, what in [("big.png", "is 6000x4000 (24.0 megapixels)"), ("heavy.png", "is 21.0 MB"),
                       ("notes.txt", "is not an image (text/plain file)")]:
        page.locator("#move-editor input[type=file]").first.set_input_files(str(tmp_path / name))
        note = page.locator("#move-editor .dd-upload-error")
        note.wait_for(timeout=5000)
        assert note.inner_text() == f"image: {name} {what}; {rule}"
    # the editor loaded nothing: Run answers at once that there is no image
    page.click("#move-run")
    assert "upload an image or load an example first" in _message(page, "move", "upload an image", timeout=10)
    page.close()


def test_uploads_of_any_mode_fill_the_points_panel_at_once(browser, server, tmp_path):
    from dragondiff.ui.app import example_scenes

    scene, _ = next(iter(example_scenes().values()))
    page = _open(browser, server)
    for mode in ("L", "P", "RGBA"):
        path = tmp_path / f"scene-{mode}.png"
        Image.fromarray(scene).convert(mode).save(path)
        want = np.asarray(Image.open(path).convert("RGB")) if mode != "RGBA" else scene
        page.locator("#move-editor input[type=file]").first.set_input_files(str(path))
        page.locator("#move-points img").first.wait_for(timeout=15_000)
        settle(page, "#move-points img")
        src = page.locator("#move-points img").first.get_attribute("src")
        shown = np.asarray(Image.open(io.BytesIO(page.request.get(src).body())).convert("RGB"))
        k = shown.shape[0] // scene.shape[0]
        assert np.abs(shown[::k, ::k].astype(int) - want).max() <= 2, mode  # the upload, as RGB, no stroke needed
        page.reload()
        page.wait_for_selector("#move-load")
    page.close()


def test_busy_port_is_named_before_the_model_loads(tmp_path):
    require("the port check", ("gradio",))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
        proc = subprocess.run([str(EXE), "ui", "--port", str(port), "--threads", "1"], env=env, capture_output=True,
                              text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert f"--port {port}: 127.0.0.1:{port} is in use" in proc.stderr and "choose another --port" in proc.stderr
    assert "dragondiff ui: model" not in proc.stderr  # refused before the model loaded


def test_rapid_clicks_all_land_in_order_and_undo_clear_agree(browser, server):
    """30 quick clicks (50 ms apart) on the move panel: all 30 are the session's points, in order; undo, clear and
    loading an image agree between the page's list and the panel (finding 15c: up to 15 of 30 quick clicks were lost
    under CPU load, those landing while the redrawn panel's picture loaded)."""
    from dragondiff.ui.app import example_scenes
    from dragondiff.ui.session import display_factor

    scene, _ = next(iter(example_scenes().values()))
    k = display_factor(scene.shape[:2])
    page = _open(browser, server)
    page.click("#move-load")
    page.locator("#move-points img").first.wait_for(timeout=15_000)
    settle(page, "#move-points img")
    points = [(6 + 20 * (i % 6), 5 + 24 * (i // 6)) for i in range(30)]  # distinct, all over the image
    _click_panel(page, "move", points, k)
    _panel_shows(page, "move", scene, points)
    assert [(x // k, y // k) for x, y in _points_field(page, "move")] == points
    for _ in range(3):  # quick undos
        page.click("#move-undo-point")
    _panel_shows(page, "move", scene, points[:-3])
    assert len(_points_field(page, "move")) == 27
    _click_panel(page, "move", points[-2:], k)  # clicks after undos go on the shortened list
    _panel_shows(page, "move", scene, points[:-3] + points[-2:])
    page.click("#move-clear-points")
    _panel_shows(page, "move", scene, [])
    assert _points_field(page, "move") == []
    _click_panel(page, "move", points[:3], k)
    _panel_shows(page, "move", scene, points[:3])
    page.click("#move-load")  # a new image starts with no points, in the page's list too
    _panel_shows(page, "move", scene, [])
    assert _points_field(page, "move") == []
    _click_panel(page, "move", points[5:7], k)
    _panel_shows(page, "move", scene, points[5:7])
    page.close()
