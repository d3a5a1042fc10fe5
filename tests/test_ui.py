"""The web UI in a real Chromium (Debian's package, driven by Playwright) against `dragondiff ui` started on
localhost with the bundled model and 4 DDIM steps ($DRAGONDIFF_UI_STEPS). Screenshots go to $DRAGONDIFF_UI_SHOTS
(default: tmp); the README's come from `DRAGONDIFF_UI_SHOTS=docs/img/ui DRAGONDIFF_UI_STEPS=50 pytest tests/test_ui.py`.

Skipped only outside CI when Gradio, Playwright or chromium is missing; in CI (CI=true) their absence fails."""

import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import require

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
EXE = Path(sys.executable).parent / "dragondiff"


def _require():
    require("the browser test", ("gradio", "playwright"), () if CHROMIUM else ("chromium",))


@pytest.fixture(scope="module")
def server_tmp(tmp_path_factory):
    """The server's temp dir (its edits' folders go there)."""
    return tmp_path_factory.mktemp("ui-server-tmp")


@pytest.fixture(scope="module")
def server(tmp_path_factory, server_tmp):
    _require()
    log = tmp_path_factory.mktemp("ui-server") / "server.log"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "TMPDIR": str(server_tmp)}
    steps = os.environ.get("DRAGONDIFF_UI_STEPS", "4")  # README screenshots: 50
    out = open(log, "w")  # a file, not a pipe: nobody reads a pipe while the tests run, and a full one blocks
    proc = subprocess.Popen([str(EXE), "ui", "--port", str(port), "--steps", steps, "--threads", "1"], env=env,
                            stdout=out, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"dragondiff ui exited: {log.read_text()}")
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("dragondiff ui did not answer within 120 s")
    yield url
    proc.terminate()
    proc.wait(timeout=20)
    out.close()
    print(log.read_text()[-3000:])


@pytest.fixture(scope="module")
def browser(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], headless=True)
        yield b
        b.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    folder = Path(os.environ.get("DRAGONDIFF_UI_SHOTS") or tmp_path_factory.mktemp("ui-shots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _open(browser, server):
    page = browser.new_page(viewport={"width": 1400, "height": 1150})
    page.goto(server)
    page.wait_for_selector("#move-load")
    return page


def _image_box(page, editor: str, size: int = 128):
    """Page coordinates of the image inside an ImageEditor canvas: centred, at the editor's zoom."""
    box = page.locator(f"#{editor} canvas").first.bounding_box()
    zoom = int(re.search(r"(\d+)%", page.inner_text(f"#{editor}")).group(1)) / 100
    side = size * zoom
    return box["x"] + (box["width"] - side) / 2, box["y"] + (box["height"] - side) / 2, zoom


def paint(page, editor: str, x0, y0, x1, y1):
    """Brush a filled rectangle (image pixels) with horizontal strokes."""
    left, top, zoom = _image_box(page, editor)
    for y in np.arange(y0, y1 + 1, 6):
        page.mouse.move(left + x0 * zoom, top + y * zoom)
        page.mouse.down()
        page.mouse.move(left + x1 * zoom, top + y * zoom, steps=6)
        page.mouse.up()
    page.wait_for_timeout(800)


def settle(page, selector: str, quiet_ms: int = 1200, timeout: float = 20.0) -> None:
    """Wait until the image's src has not changed for quiet_ms (redraws after painting have finished): a click on
    an image that is being replaced is lost by the browser, as it would be for a user."""
    deadline, last, since = time.time() + timeout, None, time.time()
    while time.time() < deadline:
        src = page.locator(selector).first.get_attribute("src")
        if src != last:
            last, since = src, time.time()
        elif time.time() - since > quiet_ms / 1000:
            return
        page.wait_for_timeout(100)


def _page_points(page, task: str) -> int:
    text = page.evaluate("(sel) => { const e = document.querySelector(sel); return e ? e.value : '[]'; }",
                         f"#{task}-points-data textarea, #{task}-points-data input")
    data = json.loads(text or "[]")
    return len(data["points"] if isinstance(data, dict) else data)


def click_point(page, task: str, x, y, size: int = 128):
    """Click a point as a user does, and wait until the page's list holds it and the panel has redrawn."""
    settle(page, f"#{task}-points img")
    img = page.locator(f"#{task}-points img").first
    box = img.bounding_box()
    before = _page_points(page, task)
    img.click(position={"x": box["width"] * (x + 0.5) / size, "y": box["height"] * (y + 0.5) / size})
    deadline = time.time() + 4
    while time.time() < deadline and _page_points(page, task) == before:
        page.wait_for_timeout(100)
    assert _page_points(page, task) == before + 1, f"{task}: a click at ({x}, {y}) on the points panel was lost"
    settle(page, f"#{task}-points img")  # the redrawn panel (as a user sees the dot appear)


def result_image(page, task: str) -> np.ndarray:
    src = page.locator(f"#{task}-result img").first.get_attribute("src")
    data = page.request.get(src).body() if not src.startswith("data:") else None
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def run_and_wait(page, task: str, needle: str = "done", timeout: float = 120.0) -> str:
    """Click Run and wait for the status to change and contain needle; an error toast fails at once, with its text."""
    for close in page.locator(".toast-close").all():  # earlier messages, already checked
        close.click()
    page.wait_for_timeout(300)
    before = page.inner_text(f"#{task}-status")
    page.click(f"#{task}-run")
    return wait_status(page, task, before, needle, timeout)


def wait_status(page, task: str, before: str, needle: str = "done", timeout: float = 120.0) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        text = page.inner_text(f"#{task}-status")
        if text != before and needle in text:
            return text
        toasts = page.locator(".toast-body")
        if toasts.count():
            page.screenshot(path="/tmp/dragondiff-ui-failure.png")
            pytest.fail(f"{task}: the page shows an error instead of a result: {toasts.first.inner_text()}")
        page.wait_for_timeout(250)
    page.screenshot(path="/tmp/dragondiff-ui-failure.png")
    pytest.fail(f"{task}: no result within {timeout} s; status {page.inner_text(f'#{task}-status')!r}")


def error_shown(page, text: str) -> bool:
    page.get_by_text(text, exact=False).first.wait_for(timeout=30_000)  # 15 s was missed once under load
    return True


def test_move_tab_edit_reuse_and_errors(browser, server, shots):
    from dragondiff.ui.app import example_scenes

    scene, _ = next(iter(example_scenes().values()))
    page = _open(browser, server)
    page.click("#move-load")
    page.wait_for_timeout(1500)
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
    page.click("#drag-load")
    page.wait_for_timeout(1500)
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
    page.click("#appearance-load")
    page.wait_for_timeout(1500)
    page.click("#appearance-run")
    assert error_shown(page, "brush over the object first")
    paint(page, "appearance-editor", 18, 42, 62, 86)
    paint(page, "appearance-reference", 18, 18, 62, 62)  # the yellow circle
    assert "done" in run_and_wait(page, "appearance")
    page.screenshot(path=str(shots / "ui-appearance.png"), full_page=True)
    page.get_by_role("tab", name="Paste").click()
    page.click("#paste-load")
    page.wait_for_timeout(1500)
    paint(page, "paste-reference", 66, 62, 118, 112)  # the white triangle
    click_point(page, "paste", 92, 84)
    assert "done" in run_and_wait(page, "paste")
    page.screenshot(path=str(shots / "ui-paste.png"), full_page=True)
    page.close()


def test_two_sessions_get_their_own_results(browser, server):
    pages = [_open(browser, server), _open(browser, server)]
    names = ["red circle, blue square", None]
    for k, page in enumerate(pages):
        if names[k] is None:  # the second session picks another example scene
            page.locator("#move-example input").first.click()
            page.get_by_role("option").nth(1).click()
        page.click("#move-load")
        page.wait_for_timeout(1500)
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


def _message(page, task: str, needle: str, timeout: float = 20.0) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        text = page.inner_text(f"#{task}-message")
        if needle in text:
            return text
        page.wait_for_timeout(200)
    pytest.fail(f"{task}: the message area does not say {needle!r}: {page.inner_text(f'#{task}-message')!r}")


def test_failed_run_keeps_the_result_and_says_why_in_the_message_area(browser, server):
    page = _open(browser, server)
    page.click("#move-load")
    page.wait_for_timeout(1500)
    paint(page, "move-editor", 16, 40, 64, 88)
    click_point(page, "move", 40, 64)
    click_point(page, "move", 84, 88)
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
    page = _open(browser, server)
    page.click("#move-load")
    page.wait_for_timeout(1500)
    paint(page, "move-editor", 16, 40, 64, 88)
    click_point(page, "move", 40, 64)
    click_point(page, "move", 84, 88)
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


def _shown(page, selector: str) -> np.ndarray:
    src = page.locator(f"{selector} img").first.get_attribute("src")
    return np.asarray(Image.open(io.BytesIO(page.request.get(src).body())).convert("RGB"))


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


def _panel(page, task: str) -> np.ndarray:
    src = page.locator(f"#{task}-points img").first.get_attribute("src")
    data = page.request.get(src).body() if not src.startswith("data:") else None
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _points_field(page, task: str):
    """The hidden points field's list (None where the page has none)."""
    import json

    text = page.evaluate("(sel) => { const e = document.querySelector(sel); return e ? e.value : null; }",
                         f"#{task}-points-data textarea, #{task}-points-data input")
    if text is None:
        return None
    data = json.loads(text)
    return data["points"] if isinstance(data, dict) else data


def _panel_shows(page, task: str, scene, points, timeout: float = 60.0) -> None:
    """Wait until the points panel is the scene with exactly these points (image pixels, in this order) drawn: the
    session's points, as the server drew them. (Under CPU load the last redraw of 30 quick clicks took up to 28 s.)"""
    from dragondiff.ui.session import draw_points

    want = np.asarray(draw_points(scene, None, points))
    deadline = time.time() + timeout
    while time.time() < deadline:
        shown = _panel(page, task)
        if shown.shape == want.shape and np.array_equal(shown, want):
            return
        page.wait_for_timeout(250)
    field = _points_field(page, task)
    # about how many dots it shows: the pixels of the dots' colours over those of one dot
    dots = lambda a: sum(int((a == c).all(-1).sum()) for c in ((230, 30, 30), (30, 90, 240)))  # noqa: E731
    one = dots(np.asarray(draw_points(scene, None, points[:1])))
    pytest.fail(f"{task}: the points panel does not show the {len(points)} points clicked, in order: it shows "
                f"about {dots(shown) / max(one, 1):.0f} (the page's list holds "
                f"{'no field' if field is None else len(field)}: {field})")


def _click_panel(page, task: str, points, factor: int, gap_ms: int = 50) -> None:
    """Click image pixels (x, y) on the points panel as fast as a user clicking quickly, without waiting for the
    redraws: each at the middle of the pixel's enlarged block, placed as the <img> shows its picture (object-fit
    scale-down, centred)."""
    img = page.locator(f"#{task}-points img").first
    page.wait_for_function("(sel) => document.querySelector(sel).naturalWidth > 0", arg=f"#{task}-points img")
    box = img.bounding_box()
    nw, nh = img.evaluate("(i) => [i.naturalWidth, i.naturalHeight]")  # the picture's size (0 while it loads)
    r = min(box["width"] / nw, box["height"] / nh, 1)
    left, top = box["x"] + (box["width"] - nw * r) / 2, box["y"] + (box["height"] - nh * r) / 2
    for x, y in points:
        page.mouse.click(left + (x * factor + factor / 2) * r, top + (y * factor + factor / 2) * r)
        page.wait_for_timeout(gap_ms)


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
