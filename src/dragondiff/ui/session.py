"""What the web UI does, without Gradio: reading the painted mask and the clicked points, drawing them, running an
edit with a reused inversion, and the per-session history. `app.py` only lays this out in Gradio."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..inputs import pil_to_rgb, upright
from ..limits import UPLOAD_FORMATS, UPLOAD_MAX_BYTES, UPLOAD_MAX_PIXELS, check, check_prompt, upload_rule
from ..output import draw_arrow, full_resolution, overlay
from ..spec import EditSpec
from ..tasks import TASKS

HISTORY_LIMIT = 20
# The edits' files (inputs, results, sidecars) kept on disk by one app, all sessions together; past this the oldest
# edits' folders are removed. A session's folder goes when the session ends, the app's when it stops.
RESULTS_CAP_BYTES = 500_000_000


class UIError(ValueError):
    """A message for the user, shown in the page."""


# ------------------------------------------------------------------------------------------ reading inputs

def upload_problem(name: str, file: str, *, nbytes: int | None = None, format: str | None = None,
                   size: tuple[int, int] | None = None, pixels: int | None = None) -> str | None:
    """Why an upload is refused (None: accepted), naming the upload and what is accepted. `format` is PIL's name
    of the file's format ("" when it is not an image), `size` its (width, height) from the header, `pixels` its
    pixel count where only that is known (PIL's decompression-bomb guard names no size)."""
    if nbytes is not None and nbytes > UPLOAD_MAX_BYTES:
        what = f"is {nbytes / 1e6:.1f} MB"
    elif pixels is not None and pixels > UPLOAD_MAX_PIXELS:
        what = f"is {pixels / 1e6:.1f} megapixels"
    elif format is not None and format not in UPLOAD_FORMATS:
        what = f"is not an image ({format} file)" if format else "is not an image"
    elif size is not None and size[0] * size[1] > UPLOAD_MAX_PIXELS:
        what = f"is {size[0]}x{size[1]} ({size[0] * size[1] / 1e6:.1f} megapixels)"
    else:
        return None
    return f"{name}: {file} {what}; {upload_rule()}"


def _bomb_pixels(error: Exception) -> int | None:
    """The pixel count PIL's DecompressionBombError names ("Image size (N pixels) exceeds limit ...")."""
    found = re.search(r"\((\d+) pixels\)", str(error))
    return int(found.group(1)) if found else None


def read_upload(path, name: str = "image") -> np.ndarray:
    """An uploaded image file as RGB uint8, checked before it is decoded: its size in bytes, then its format and
    pixels from the header (PIL's lazy open reads no pixel data), then turned by its EXIF orientation and converted
    from any mode as the CLI does."""
    path = Path(path)
    problem = upload_problem(name, path.name, nbytes=path.stat().st_size)
    if problem:
        raise UIError(problem)
    try:
        im = Image.open(path)
    except Image.DecompressionBombError as e:  # far over our pixel limit: said as the pixel limit says it
        raise UIError(upload_problem(name, path.name, pixels=_bomb_pixels(e) or UPLOAD_MAX_PIXELS + 1)) from None
    except OSError:
        raise UIError(upload_problem(name, path.name, format="")) from None
    with im:
        problem = upload_problem(name, path.name, format=im.format or "", size=im.size)
        if problem:
            raise UIError(problem)
        try:
            return pil_to_rgb(upright(im), name)[0]
        except (OSError, ValueError) as e:
            raise UIError(f"{name}: cannot read {path.name} ({e})") from e


def uploaded_file(path, folder, name: str) -> Path:
    """`path` if it names a file inside `folder` (the server's upload folder) once links and `..` are resolved;
    anything else (another server path, a link pointing out, a URL) is refused with one message, whether or not
    such a file exists, and nothing is read or fetched."""
    real = Path(os.path.realpath(path)) if isinstance(path, str) and "://" not in path else None
    if real is None or not real.is_relative_to(os.path.realpath(folder)):
        raise UIError(f"{name}: only files uploaded to this server are read (gradio_client: handle_file(path)); "
                      "a server path or a URL is refused")
    return real


def api_list(value, name: str) -> list:
    """An API field given as JSON numbers: a list of numbers or of [x, y] pairs (never a string: the API takes no
    file names, so nothing is read on the server's behalf)."""
    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    if not (isinstance(value, list) and all(number(v) or (isinstance(v, list) and all(map(number, v)))
                                            for v in value)):
        raise UIError(f"{name}: expected a JSON list of numbers or [x, y] pairs, got {type(value).__name__}")
    return value


def editor_image(value, name: str = "image") -> np.ndarray:
    """The uploaded picture of an ImageEditor value (RGB uint8)."""
    background = None if value is None else value.get("background")
    if background is None:
        raise UIError(f"{name}: upload an image or load an example first")
    image = np.asarray(background)
    if image.ndim == 2:
        image = np.stack([image] * 3, -1)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise UIError(f"{name}: not an RGB image (shape {image.shape})")
    problem = upload_problem(name, "the image", size=(image.shape[1], image.shape[0]))
    if problem:
        raise UIError(problem)
    if image.shape[2] == 4:  # flatten transparency onto white, as a viewer shows it
        alpha = image[..., 3:4].astype(np.float32) / 255
        image = np.rint(image[..., :3] * alpha + 255 * (1 - alpha))
    return np.ascontiguousarray(image.astype(np.uint8))


def editor_mask(value, size_hw: tuple[int, int], name: str = "mask") -> np.ndarray:
    """The painted strokes of an ImageEditor value as a bool mask (any painted pixel of any layer)."""
    layers = [] if value is None else (value.get("layers") or [])
    mask = np.zeros(size_hw, bool)
    for layer in layers:
        if layer is None:
            continue
        arr = np.asarray(layer)
        if arr.shape[:2] != tuple(size_hw):
            continue
        mask |= (arr[..., 3] > 0) if arr.ndim == 3 and arr.shape[2] == 4 else (np.asarray(arr).reshape(size_hw) > 0)
    if not mask.any():
        raise UIError(f"{name}: brush over the object first (no mask painted)")
    return mask


def check_points(points: list, task: str, size_hw: tuple[int, int]) -> None:
    """The clicked points lie on the image and are as many as the task needs (its `TaskUI.check_clicks`)."""
    h, w = size_hw
    for k, (x, y) in enumerate(points):
        if not (0 <= x < w and 0 <= y < h):
            raise UIError(f"point {k + 1} ({x:g}, {y:g}) lies outside the {w}x{h} image")
    try:
        TASKS[task].ui.check_clicks(len(points))
    except ValueError as e:
        raise UIError(str(e)) from e


# ------------------------------------------------------------------------------------------------ drawing

# Small images are shown enlarged (nearest) so that points can be placed; clicks are mapped back.
MIN_DISPLAY = 384


def display_factor(size_hw: tuple[int, int]) -> int:
    return max(1, MIN_DISPLAY // max(size_hw))


# The most points a panel keeps (drag takes handle/target pairs; more than this is no edit anyone clicks).
MAX_PANEL_POINTS = 200


def _points_field(text: str | None) -> tuple[tuple[int, int], object]:
    """The hidden points field: {"epoch": e, "seq": n, "points": [[x, y], ...]} (page.js) or a bare list."""
    try:
        data = json.loads(text or "[]")
    except ValueError:
        return (0, 0), None
    if isinstance(data, dict):
        version = data.get("epoch", 0), data.get("seq", 0)
        if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**53 for v in version):
            return (0, 0), None
        return version, data.get("points")
    return (0, 0), data


def points_version(text: str | None) -> tuple[int, int]:
    """(epoch, seq) of the page's list of points: the server starts an epoch when the panel gets a new picture,
    the page counts its edits of the list within it. Redraws can reach the server out of order (measured: lists of
    20, 19, 18 points drawn in that order after 30 quick clicks), so an older list never replaces a newer one."""
    return _points_field(text)[0]


def panel_points(text: str | None, size_hw: tuple[int, int]) -> list[tuple[float, float]]:
    """The points of a tab's hidden points field (what page.js records, in the pixels of the panel's picture,
    which is the image enlarged by display_factor) in image pixels."""
    _, data = _points_field(text)

    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) < 1e9

    ok = isinstance(data, list) and all(isinstance(p, list) and len(p) == 2 and all(map(number, p)) for p in data)
    if not ok:
        raise UIError("points: the page sent an unreadable list of points; clear the points and click again")
    if len(data) > MAX_PANEL_POINTS:
        raise UIError(f"points: {len(data)} clicked; at most {MAX_PANEL_POINTS} (undo some or clear them)")
    k = display_factor(size_hw)
    return [(float(x) // k, float(y) // k) for x, y in data]


def draw_points(image: np.ndarray, mask: np.ndarray | None, points: list) -> Image.Image:
    """The image (enlarged by display_factor) with the mask tinted, handles (red) and targets (blue) as dots,
    arrows between pairs. `points` are in image pixels."""
    from PIL import ImageDraw

    k = display_factor(image.shape[:2])
    im = Image.fromarray(image)
    if mask is not None:
        im = overlay(im, mask)
    im = im.resize((im.width * k, im.height * k), Image.NEAREST)
    points = [(x * k + (k - 1) / 2, y * k + (k - 1) / 2) for x, y in points]
    for j in range(0, len(points) - 1, 2):
        im = draw_arrow(im, points[j], points[j + 1])
    d = ImageDraw.Draw(im)
    r = max(3, round(max(im.size) / 80))
    for k, (x, y) in enumerate(points):
        colour = (230, 30, 30) if k % 2 == 0 else (30, 90, 240)
        d.ellipse([x - r, y - r, x + r, y + r], fill=colour, outline=(255, 255, 255))
    return im


BOX_COLOUR = (255, 200, 0)


def draw_preview(image: np.ndarray, preview: dict) -> Image.Image:
    """A task's preview (`TaskUI.preview`) on the image (enlarged by display_factor): the faces' boxes numbered
    (yellow), an arrow from each handle to its target where they differ by a pixel or more, handles (red) and
    targets (blue) as small dots."""
    from PIL import ImageDraw

    k = display_factor(image.shape[:2])
    im = Image.fromarray(image).resize((image.shape[1] * k, image.shape[0] * k), Image.NEAREST)
    shown = lambda pts: [] if pts is None else [(x * k + (k - 1) / 2, y * k + (k - 1) / 2)  # noqa: E731
                                                for x, y in np.asarray(pts, dtype=float)]
    handles, targets = shown(preview.get("handles")), shown(preview.get("targets"))
    if targets:
        for h, t in zip(handles, targets):
            if np.hypot(h[0] - t[0], h[1] - t[1]) >= k:
                im = draw_arrow(im, h, t, colour=(255, 255, 0))
    d = ImageDraw.Draw(im)
    for n, (x0, y0, x1, y1) in enumerate(preview.get("boxes") or []):
        d.rectangle([x0 * k, y0 * k, x1 * k, y1 * k], outline=BOX_COLOUR, width=2)
        d.text((x0 * k + 4, y0 * k + 2), f"#{n}", fill=BOX_COLOUR)
    r = max(2, round(max(im.size) / 300))
    for points, colour in ((targets, (30, 90, 240)), (handles, (230, 30, 30))):
        for x, y in points:
            d.ellipse([x - r, y - r, x + r, y + r], fill=colour)
    return im


def ui_fields(task: str, values: dict) -> dict:
    """A tab's (or API call's) values of the task's `TaskUI.fields` as spec fields: the ticked choices; a text
    stripped, left out when empty (the field's default)."""
    fields = {}
    for f in TASKS[task].ui.fields:
        value = values.get(f.name)
        if f.choices:
            if value is not None and not (isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)):
                raise UIError(f"{f.name}: expected a list of {list(f.choices)}, got {type(value).__name__}")
            fields[f.name] = tuple(value or ())
        elif value is not None and str(value).strip():
            fields[f.name] = str(value).strip()
    return fields


def task_preview(task: str, image: np.ndarray, reference: np.ndarray | None, values: dict):
    """The task's preview panel for these inputs: (image, the problem to say or None)."""
    out = TASKS[task].ui.preview(image, reference, ui_fields(task, values))
    return draw_preview(image, out), out.get("problem")


# ---------------------------------------------------------------------------------------------- sessions

def _session_name(owner: str) -> str:
    return f"session-{hashlib.sha256(owner.encode()).hexdigest()[:16]}"  # the id comes from the client


class Outputs:
    """The folders an app writes to: one `dragondiff-ui-*` folder in the temp dir per app, holding the web
    framework's upload and cache folder (`cache_folder`) and one subfolder per session (removed when the session
    ends) with an `edit-NNN` folder per edit; the oldest edits' folders are removed once all together pass
    `cap_bytes`. The files a session uploaded or was sent in the cache folder (`track`) are removed when it ends
    too, and `close()` (at shutdown) removes everything."""

    def __init__(self, cap_bytes: int = RESULTS_CAP_BYTES, parent=None):
        self.cap_bytes = cap_bytes
        self.parent = parent
        self.root: Path | None = None  # made at the first edit (or for the cache folder)
        self._lock = threading.Lock()
        self._cached: dict[str, set[Path]] = {}  # session -> its files in the cache folder

    def _root(self) -> Path:
        if self.root is None or not self.root.exists():
            self.root = Path(tempfile.mkdtemp(prefix="dragondiff-ui-", dir=self.parent))
        return self.root

    def session_folder(self, owner: str) -> Path:
        """The folder of one session (`owner`: the browser session's id); the same id gives the same folder."""
        with self._lock:
            folder = self._root() / _session_name(owner)
            folder.mkdir(exist_ok=True)
            return folder

    def cache_folder(self) -> Path:
        """The folder the web framework keeps uploads and the files it sends in (Gradio's GRADIO_TEMP_DIR)."""
        with self._lock:
            folder = self._root() / "uploads"
            folder.mkdir(exist_ok=True)
            return folder

    def track(self, owner: str, paths) -> None:
        """`paths` (in the cache folder) are files of this session: removed when it ends."""
        with self._lock:
            if self.root is None:
                return
            folder = Path(os.path.realpath(self.root / "uploads"))
            files = {Path(os.path.realpath(p)) for p in paths}  # never a file outside the cache folder
            self._cached.setdefault(owner, set()).update(f for f in files if f.parent.is_relative_to(folder))

    def end_session(self, owner: str) -> None:
        """The session has ended (its page was closed): remove its folder and its files in the cache folder (but
        a file another session also holds: the cache names files by their content)."""
        with self._lock:
            if self.root is not None:
                shutil.rmtree(self.root / _session_name(owner), ignore_errors=True)
            kept = set().union(*(files for other, files in self._cached.items() if other != owner))
            for file in self._cached.pop(owner, set()) - kept:
                file.unlink(missing_ok=True)
                if file.parent != Path(os.path.realpath(self.root / "uploads")):
                    with contextlib.suppress(OSError):  # its folder, once empty (Gradio's: one per file)
                        file.parent.rmdir()

    def trim(self, keep: Path | None = None) -> list[Path]:
        """Remove the oldest edit folders (never `keep`) until all of them together fit in cap_bytes."""
        removed = []
        with self._lock:
            if self.root is None:
                return removed
            edits = []
            for run in self.root.glob("session-*/edit-*"):
                try:
                    files = [f.stat() for f in run.iterdir()]
                    edits.append((max([run.stat().st_mtime] + [f.st_mtime for f in files]),
                                  sum(f.st_size for f in files), run))
                except OSError:  # removed meanwhile
                    continue
            total = sum(size for _, size, _ in edits)
            for _, size, run in sorted(edits, key=lambda e: e[0]):
                if total <= self.cap_bytes:
                    break
                if keep is not None and run == keep:
                    continue
                shutil.rmtree(run, ignore_errors=True)
                removed.append(run)
                total -= size
        return removed

    def close(self) -> None:
        """Remove every folder of this app (at shutdown)."""
        with self._lock:
            if self.root is not None:
                shutil.rmtree(self.root, ignore_errors=True)
                self.root = None
            self._cached.clear()


@dataclass
class Session:
    """One browser session: its cached inversion, its history of inputs, its edits' count."""

    inversion_key: str | None = None
    inversion: object = None
    inversion_seconds: float = 0.0
    history: list = field(default_factory=list)  # earlier input images, for undo
    points: dict = field(default_factory=dict)  # task -> clicked points (x, y) in image pixels
    shown: dict = field(default_factory=dict)  # task -> the picture its tab was last given (RGB)
    drawn: dict = field(default_factory=dict)  # task -> (epoch, seq) of the list of points its panel shows
    runs: int = 0

    def new_points_epoch(self, task: str) -> dict:
        """The hidden points field's value for a panel given a new picture: an empty list in a new epoch."""
        epoch = self.drawn.get(task, (0, 0))[0] + 1
        self.drawn[task] = (epoch, 0)
        return {"epoch": epoch, "seq": 0, "points": []}

    def newer_points(self, task: str, version: tuple[int, int]) -> bool:
        """Whether a list of points of this (epoch, seq) is newer than the one the panel shows (then it is)."""
        if version < self.drawn.get(task, (0, 0)):
            return False
        self.drawn[task] = version
        return True

    def push(self, image: np.ndarray) -> None:
        self.history.append(image)
        del self.history[:-HISTORY_LIMIT]

    def pop(self) -> np.ndarray | None:
        return self.history.pop() if self.history else None


def _key(image: np.ndarray, prompt: str, steps: int, resolution: int) -> str:
    h = hashlib.sha256(image.tobytes())
    h.update(json.dumps([image.shape, prompt, steps, resolution]).encode())
    return h.hexdigest()


def click_fields(task: str, image: np.ndarray, *, mask=None, points=(), reference=None, reference_mask=None,
                 scale: float = 1.0, values: dict | None = None) -> dict:
    """The spec fields of what the user brushed, clicked, uploaded and chose in a task's tab (its registry `ui`
    says how; `values`: its `TaskUI.fields`' values)."""
    info = TASKS[task]
    check_points(list(points), task, image.shape[:2])
    fields: dict = {}
    if info.ui.mask_on_image:
        fields["mask"] = mask
    fields.update(info.ui.clicks_to_fields(
        list(points), image_hw=image.shape[:2], reference_mask=reference_mask,
        reference_hw=None if reference is None else reference.shape[:2], scale=scale))
    if info.images == 2:
        fields.update(reference=reference, reference_mask=reference_mask)
    elif info.ui.reference_upload and reference is not None:
        fields["reference"] = reference
    fields.update(ui_fields(task, values or {}))
    return fields


def run_edit(pipe, session: Session, task: str, image: np.ndarray, *, outputs: Outputs, owner: str, mask=None,
             points=(), reference=None, reference_mask=None, prompt: str = "", scale: float = 1.0,
             options: dict | None = None, progress=None, values: dict | None = None
             ) -> tuple[Image.Image, dict, list[Path]]:
    """Run one edit from a tab's brushed masks, clicked points and chosen `values`, inverting the image only if
    this session has not inverted it with these settings. Returns the full-size result, a status dict and the
    files to download (result PNG, sidecar JSON)."""
    fields = click_fields(task, image, mask=mask, points=points, reference=reference,
                          reference_mask=reference_mask, scale=scale, values=values)
    return run_fields(pipe, session, task, image, fields, outputs=outputs, owner=owner, prompt=prompt,
                      options=options, progress=progress)


def run_fields(pipe, session: Session, task: str, image: np.ndarray, fields: dict, *, outputs: Outputs, owner: str,
               prompt: str = "", options: dict | None = None, progress=None) -> tuple[Image.Image, dict, list[Path]]:
    """Run one edit of `image` with the task's spec `fields` (mask, points or offset, reference, ...) and the
    `options` (num_inference_steps, max_resolution, preset, seed, ...), reusing the session's inversion. Its files
    go to the `owner` session's folder of `outputs`, whose oldest edits are then trimmed to the cap."""
    import torch

    from ..provenance import build_sidecar

    options = dict(options or {})
    try:  # checked (and named) before the inversion uses them
        steps = check("num_inference_steps", options.pop("num_inference_steps"))
        resolution = check("max_resolution", options.pop("max_resolution"))
        prompt = check_prompt(prompt)
    except (TypeError, ValueError) as e:
        raise UIError(str(e)) from e
    # the prompt goes with the inversion, which the spec's edit then uses; a task that edits a crop it makes from
    # the photo (TaskInfo.frame) takes the photo and its prompt, and inverts the crop in its edit
    framed = TASKS[task].frame is not None
    key = _key(image, prompt, steps, resolution)
    reused = not framed and session.inversion_key == key
    try:
        if framed:
            spec = EditSpec(task=task, image=image, prompt=prompt or None, num_inference_steps=steps,
                            max_resolution=resolution, **fields, **options)
        elif not reused:
            if progress:
                progress(0.0, desc="inverting the image (once per image and prompt)")
            start = time.perf_counter()
            session.inversion = pipe.invert(image, prompt=prompt, max_resolution=resolution,
                                            num_inference_steps=steps, progress=False)
            session.inversion_seconds = time.perf_counter() - start
            session.inversion_key = key
        if not framed:
            spec = EditSpec(task=task, image=session.inversion, **fields, **options)

        def on_step(_pipe, i, _t, _state):
            if progress:
                progress((i + 1) / steps, desc="editing")
            return {}

        result = pipe.edit(spec, callback_on_step_end=on_step, progress=False)
    except UIError:
        raise
    except (ValueError, TypeError) as e:
        raise UIError(str(e)) from e
    session.runs += 1
    inversion_seconds = result.timings.get("inversion", 0.0) if framed else session.inversion_seconds
    out = full_resolution(result, image)
    run = outputs.session_folder(owner) / f"edit-{session.runs:03d}"
    run.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(run / "input.png")
    out.save(run / "result.png")
    sidecar = build_sidecar(result, pipe, sidecar=run / "result.json", output=run / "result.png",
                            full_resolution=True, threads=torch.get_num_threads(),
                            seconds={"invert_image": 0.0 if reused or framed else session.inversion_seconds,
                                     **result.timings})
    sidecar["spec"]["image"] = "input.png"
    for name in ("mask", "reference", "reference_mask"):
        value = fields.get(name)
        if value is not None and name in sidecar["spec"]:
            file = f"{name}.png"
            arr = value.astype(np.uint8) * 255 if value.dtype == bool else value
            Image.fromarray(arr).save(run / file)
            sidecar["spec"][name] = file
    (run / "result.json").write_text(json.dumps(sidecar, indent=1))
    paths = [run / "result.png", run / "result.json"]
    working = None
    if result.photo is not None:  # the edited crop at the working size, beside the photo it was put back into
        working = run / "crop.png"
        result.image.save(working)
        paths.append(working)
    outputs.trim(keep=run)
    status = {"task": task, "inversion": "reused" if reused else "computed",
              "inversion_seconds": round(inversion_seconds, 2), "edit_seconds": round(result.seconds, 2),
              "guidance_scale": result.spec.guidance_scale, "energy_scale": result.spec.energy_scale,
              "image_prompt": bool(result.spec.image_prompt), "ip_scale": result.spec.ip_scale,
              "flags": list(result.flags), "kept": not framed, "working_image": working}
    return out, status, paths


def status_text(status: dict) -> str:
    inv = (f"inversion reused (saved {status['inversion_seconds']:.1f} s)" if status["inversion"] == "reused"
           else f"inversion computed in {status['inversion_seconds']:.1f} s"
           + (" (kept for further edits of this image)" if status.get("kept", True) else ""))
    notes = "".join(f"\n- note: {f}" for f in status["flags"])
    ip = f", image prompt {status['ip_scale']:g}" if status.get("image_prompt") else ""
    return (f"**{status['task']}** done: edit {status['edit_seconds']:.1f} s; {inv}; CFG "
            f"{status['guidance_scale']:g}, energy {status['energy_scale']:g}{ip}.{notes}")
