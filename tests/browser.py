"""Shared by the browser tests (test_ui.py, test_ui_pages.py): `dragondiff ui` started on localhost with the
bundled model and 4 DDIM steps ($DRAGONDIFF_UI_STEPS), Debian's chromium driven by Playwright, and the helpers
that act on the page as a user does. Two test files, each with its own server, so that pytest-xdist runs them
on two workers."""

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

# A browser test that fails is run again, twice at most (pytest-rerunfailures), on a new page of the same server.
# What CI lost so far: strokes brushed on an editor that a finished upload event's "processing" cover hid for good
# (fixed in ui/app.py: no progress for the editors' uploads; tools/ui_editor_cover.py checks it by hand), and once
# a Run that was never answered (not reproduced). A broken feature fails all three runs.
RETRY = pytest.mark.flaky(reruns=2, reruns_delay=1)


EXE = Path(sys.executable).parent / "dragondiff"


# As root, without a sandbox; no background connections (refused here, many at a time, slowing each start).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--disable-quic", "--disable-gpu"]


def _require():
    require("the browser test", ("gradio", "playwright"), () if CHROMIUM else ("chromium",))


@pytest.fixture(scope="module")
def server_tmp(tmp_path_factory):
    """The server's temp dir (its edits' folders go there)."""
    return tmp_path_factory.mktemp("ui-server-tmp")


class UIServer:
    """`dragondiff ui` on a free localhost port, its output in a log file (a file, not a pipe: nobody reads a pipe
    while the tests run, and a full one blocks)."""

    def __init__(self, log: Path, tmp: Path | None = None):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
        if tmp is not None:
            env["TMPDIR"] = str(tmp)
        steps = os.environ.get("DRAGONDIFF_UI_STEPS", "4")  # README screenshots: 50
        self.log, self.out = log, open(log, "w")
        self.proc = subprocess.Popen([str(EXE), "ui", "--port", str(port), "--steps", steps, "--threads", "1"],
                                     env=env, stdout=self.out, stderr=subprocess.STDOUT, text=True)
        self.url = f"http://127.0.0.1:{port}"

    def stop(self) -> str:
        """Stop the server; the end of its log."""
        self.proc.terminate()
        self.proc.wait(timeout=20)
        self.out.close()
        return self.log.read_text()[-3000:]


def start_server(log: Path, tmp: Path | None = None, timeout: float = 120.0) -> UIServer:
    """A UIServer that answers (the test fails if it exits or does not answer within timeout)."""
    server = UIServer(log, tmp)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if server.proc.poll() is not None:
            pytest.fail(f"dragondiff ui exited: {log.read_text()}")
        try:
            urllib.request.urlopen(server.url, timeout=2)
            return server
        except OSError:
            time.sleep(0.5)
    server.proc.kill()
    pytest.fail(f"dragondiff ui did not answer within {timeout:.0f} s")


@pytest.fixture(scope="module")
def server(tmp_path_factory, server_tmp):
    _require()
    running = start_server(tmp_path_factory.mktemp("ui-server") / "server.log", server_tmp)
    yield running.url
    print(running.stop())


@pytest.fixture(scope="module")
def browser(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    folder = Path(os.environ.get("DRAGONDIFF_UI_SHOTS") or tmp_path_factory.mktemp("ui-shots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


FAILURE_SHOT = "/tmp/dragondiff-ui-failure.png"


def fail_with_screenshot(page, message: str):
    """Fail the test with this message, saving the whole page first (its path is added to the message)."""
    page.screenshot(path=FAILURE_SHOT, full_page=True)
    pytest.fail(f"{message} (screenshot: {FAILURE_SHOT})")


def _open(browser, server):
    page = browser.new_page(viewport={"width": 1400, "height": 1150})
    page.goto(server)
    page.wait_for_selector("#move-load")
    return page


def _image_box(page, editor: str, size: int = 128, timeout: float = 20.0):
    """Page coordinates of the image inside an ImageEditor canvas: centred, at the editor's zoom. Read until the
    canvas and the zoom have not changed for 600 ms: after an image is loaded the editor re-fits it, and strokes
    placed by an earlier reading land in the wrong place (seen under load: a brushed rectangle that came out a
    third of its size)."""
    def read():
        box = page.locator(f"#{editor} canvas").first.bounding_box()
        zoom = re.search(r"(\d+)%", page.inner_text(f"#{editor}"))
        return None if box is None or zoom is None else (box["x"], box["y"], box["width"], box["height"],
                                                         int(zoom.group(1)) / 100)

    deadline, last = time.time() + timeout, None
    while time.time() < deadline:
        now = read()
        if now is not None and now == last:
            break
        last = now
        page.wait_for_timeout(600)
    x, y, width, height, zoom = last
    side = size * zoom
    return x + (width - side) / 2, y + (height - side) / 2, zoom


def load_example(page, task: str) -> None:
    """Click the tab's "Load example" and wait until its answer has reached the page: the points panel shows a
    picture that has stopped changing (tasks with one), and the editor has fitted it. Strokes made before the
    answer arrives are wiped when it does (the example replaces the editor's layers)."""
    page.click(f"#{task}-load")
    panel = f"#{task}-points img"
    if page.locator(f"#{task}-points").count():
        page.wait_for_function("(sel) => { const i = document.querySelector(sel); return i && i.src && "
                               "i.naturalWidth > 0; }", arg=panel, timeout=60000)
        settle(page, panel)
    else:
        page.wait_for_timeout(1500)
    _image_box(page, f"{task}-editor")


def _stroke_pixels(x0, y0, x1, y1):
    """The image pixels every stroke of `paint` passes through, away from the rectangle's ends."""
    return [(x, y) for y in np.arange(y0, y1 + 1, 6) for x in range(x0 + 4, x1 - 3, 4)]


def _panel_tinted(page, task: str, pixels, before: np.ndarray, size: int = 128) -> float:
    """The share of these pixels that the points panel (the server's drawing of the editor's value) shows under the
    mask's tint (draw_points: 45 % of (255, 200, 0) over the picture); -1 where the panel's size changed."""
    shown = _panel(page, task)
    if shown.shape != before.shape:
        return -1.0
    k = shown.shape[0] // size
    hits = 0
    for x, y in pixels:
        was, now = before[y * k + k // 2, x * k + k // 2].astype(float), shown[y * k + k // 2, x * k + k // 2]
        hits += bool(np.abs(np.rint(was * 0.55 + np.array([255, 200, 0]) * 0.45) - now).max() <= 2)
    return hits / len(pixels)


def paint(page, editor: str, x0, y0, x1, y1, tries: int = 3):
    """Brush a filled rectangle (image pixels) with horizontal strokes. On a tab's image editor whose tab has a
    points panel, wait until the panel shows the rectangle tinted, i.e. the mask has reached the server in the
    editor's value (the value Run sends), and brush again if it never does (seen under load: a Run after the
    strokes found no mask)."""
    task = editor.removesuffix("-editor")
    check = editor.endswith("-editor") and page.locator(f"#{task}-points").count() > 0
    before = _panel(page, task) if check else None
    for _ in range(tries):
        left, top, zoom = _image_box(page, editor)
        for y in np.arange(y0, y1 + 1, 6):
            page.mouse.move(left + x0 * zoom, top + y * zoom)
            page.mouse.down()
            page.mouse.move(left + x1 * zoom, top + y * zoom, steps=6)
            page.mouse.up()
        page.wait_for_timeout(2000)  # the editor commits its layers to its value after the strokes (800 ms lost one)
        if not check:
            return
        deadline = time.time() + 30
        while time.time() < deadline:
            settle(page, f"#{task}-points img", quiet_ms=600)
            tinted = _panel_tinted(page, task, _stroke_pixels(x0, y0, x1, y1), before)
            if tinted >= 0.9:
                return
            page.wait_for_timeout(500)
    fail_with_screenshot(page, f"{editor}: after {tries} brushings of ({x0}, {y0})-({x1}, {y1}) the points panel "
                         "never showed the mask: the editor's value did not carry the strokes (share of stroke "
                         f"pixels tinted: {tinted:.2f}, -1: the panel changed size)")


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
    if _page_points(page, task) != before + 1:
        fail_with_screenshot(page, f"{task}: a click at ({x}, {y}) on the points panel was lost")
    settle(page, f"#{task}-points img")  # the redrawn panel (as a user sees the dot appear)


def result_image(page, task: str) -> np.ndarray:
    src = page.locator(f"#{task}-result img").first.get_attribute("src")
    data = page.request.get(src).body() if not src.startswith("data:") else None
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def ready_move(browser, server):
    """A new page with the move tab's first example loaded, its object brushed and one handle/target pair clicked."""
    page = _open(browser, server)
    load_example(page, "move")
    paint(page, "move-editor", 16, 40, 64, 88)
    click_point(page, "move", 40, 64)
    click_point(page, "move", 84, 88)
    return page


def run_and_wait(page, task: str, needle: str = "done", timeout: float = 120.0) -> str:
    """Click Run and wait for the status to change and contain needle; an error toast fails at once, with its text."""
    for close in page.locator(".toast-close").all():  # earlier messages, already checked
        close.click()
    page.wait_for_timeout(300)
    before, message = page.inner_text(f"#{task}-status"), _message_text(page, task)
    page.click(f"#{task}-run")
    return wait_status(page, task, before, needle, timeout, message)


def _message_text(page, task: str) -> str:
    """The text of the task's message area (its paragraphs: not the progress timer Gradio shows over it)."""
    return " ".join(p.inner_text().strip() for p in page.locator(f"#{task}-message p").all()).strip()


def wait_status(page, task: str, before: str, needle: str = "done", timeout: float = 120.0,
                message: str | None = None) -> str:
    """Wait for the status to change and contain needle; an error toast, or a new text in the task's message area
    (the input checks answer there), fails at once with its text."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        text = page.inner_text(f"#{task}-status")
        if text != before and needle in text:
            return text
        toasts = page.locator(".toast-body")
        if toasts.count():
            fail_with_screenshot(page, f"{task}: the page shows an error instead of a result: "
                                       f"{toasts.first.inner_text()}")
        said = _message_text(page, task)
        if message is not None and said and said != message:
            fail_with_screenshot(page, f"{task}: the page says {said!r} instead of a result")
        page.wait_for_timeout(250)
    fail_with_screenshot(page, f"{task}: no result within {timeout} s; status {page.inner_text(f'#{task}-status')!r}")


def error_shown(page, text: str) -> bool:
    try:
        page.get_by_text(text, exact=False).first.wait_for(timeout=30_000)  # 15 s was missed once under load
    except Exception:
        messages = [m.inner_text() for m in page.locator(".dd-message, .toast-body").all()]
        fail_with_screenshot(page, f"the page did not show {text!r} within 30 s; its messages: {messages}")
    return True


def _message(page, task: str, needle: str, timeout: float = 20.0) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        text = page.inner_text(f"#{task}-message")
        if needle in text:
            return text
        page.wait_for_timeout(200)
    fail_with_screenshot(page, f"{task}: the message area does not say {needle!r}: "
                               f"{page.inner_text(f'#{task}-message')!r}")


def _shown(page, selector: str) -> np.ndarray:
    src = page.locator(f"{selector} img").first.get_attribute("src")
    return np.asarray(Image.open(io.BytesIO(page.request.get(src).body())).convert("RGB"))


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
