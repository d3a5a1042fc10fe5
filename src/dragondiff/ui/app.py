"""`dragondiff ui`: a Gradio app with one tab per task and one named API endpoint per task (`/move`, `/drag`,
`/appearance`, `/paste`, `/face`), both laid out from each task's registry entry (`TaskInfo.ui`, `images`). Layout and event
wiring only; the logic is in session.py. The page's own events are private: the API is the per-task endpoints."""

import atexit
import contextlib
import functools
import inspect
import json
import os
import signal
import threading
from pathlib import Path

import numpy as np

from ..limits import (DEFAULT_PRESET, DEFAULT_SEED, LIMITS, UPLOAD_FORMATS, UPLOAD_MAX_BYTES, UPLOAD_MAX_PIXELS,
                      upload_rule)
from ..presets import PRESETS
from ..tasks import TASKS
from .session import (Outputs, Session, UIError, api_list, draw_points, editor_image, editor_mask, panel_points,
                      points_version, read_upload, run_edit, run_fields, status_text, task_preview, ui_fields,
                      uploaded_file)

# The largest request the server takes: an accepted image's exports from the page's editor (RGBA PNG, at worst
# 4 bytes a pixel) or an API upload, which is then refused by its own check with a message naming the limits.
REQUEST_MAX_BYTES = 4 * UPLOAD_MAX_PIXELS + UPLOAD_MAX_BYTES
API_OWNER = "api"  # API calls share one session, and its folder
# Small results (the bundled model's 128 px) fill their panel, drawn with crisp pixels; messages read as errors.
CSS = """
[id$='-result'] img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }
.dd-points .eta-bar, .dd-points [data-testid='status-tracker'] { pointer-events: none; }  /* clicks reach the image */
.dd-points img { cursor: crosshair; }
.dd-message p { color: var(--error-text-color, #b91c1c); font-weight: 600; }
.dd-upload-error { position: absolute; left: 8px; right: 8px; bottom: 8px; z-index: 50; padding: 6px 10px;
  border-radius: 6px; background: var(--error-background-fill, #fee2e2); color: var(--error-text-color, #b91c1c);
  border: 1px solid var(--error-border-color, #fca5a5); font-weight: 600; }
"""


def page_head() -> str:
    """The page's script (page.js: the upload check, the points panels' clicks) with the upload limits."""
    config = {"maxBytes": UPLOAD_MAX_BYTES, "maxPixels": UPLOAD_MAX_PIXELS,
              "formats": list(UPLOAD_FORMATS), "rule": upload_rule()}
    script = (Path(__file__).parent / "page.js").read_text()
    return f"<script>window.DRAGONDIFF_UPLOAD = {json.dumps(config)};\n{script}</script>"
PRIVATE = {"api_visibility": "private"}  # the page's own events are not part of the app's API
RESOLUTION_STEP = 64  # working sizes are multiples of 64


def example_scenes() -> dict:
    """Bundled example scenes (what the bundled model knows): name -> (image, caption)."""
    from ..shapes.scenes import demo_scene, random_scene

    scenes = {"red circle, blue square": demo_scene()}
    for seed in (3, 11, 21):
        scene = random_scene(seed, n_objects=2)
        scenes[scene.caption.replace(" on a", ",").replace("a ", "")] = scene
    return {name: (s.image, s.caption) for name, s in scenes.items()}


def example_reference():
    from ..shapes.scenes import Shape, make_scene

    ref = make_scene([Shape("circle", "yellow", 40.0, 40.0, 20.0), Shape("triangle", "white", 92.0, 88.0, 22.0)],
                     ("black", None, 0.0))
    return ref.image


def _editor(gr, label: str, elem_id: str, brush: bool = True):
    # dd-upload: page.js checks what is uploaded into it before the editor reads it
    return gr.ImageEditor(label=label, type="numpy", image_mode="RGBA", format="png", elem_id=elem_id,
                          elem_classes="dd-upload",
                          sources=("upload", "clipboard"), transforms=(), layers=False, height=420,
                          # see-through magenta: the object stays visible under the mask on any colour
                          brush=gr.Brush(colors=[("#ff00ff", 0.6)], default_color=("#ff00ff", 0.6),
                                         color_mode="fixed", default_size=8) if brush else False,
                          eraser=gr.Eraser(default_size=10) if brush else False)


def _field(gr, task: str, f):
    """A TaskUI field's control: checkboxes of its choices (all ticked), or a text box."""
    if f.choices:
        return gr.CheckboxGroup(list(f.choices), value=list(f.choices), label=f.label, elem_id=f"{task}-{f.name}")
    return gr.Textbox("", label=f.label, elem_id=f"{task}-{f.name}")


def _ui_error(gr, e: Exception):
    if isinstance(e, UIError):
        return gr.Error(str(e), title="Check the input", print_exception=False)
    return gr.Error(f"{type(e).__name__}: {e}", title="The edit failed")


def _message_text(e: Exception) -> str:
    if isinstance(e, UIError):
        return f"Check the input: {e}"
    return f"The edit failed: {type(e).__name__}: {e}"


def _reported(message, fn):
    """A page event's handler (returning a dict of outputs) whose failure is said in the tab's message area while
    its other outputs keep what they show (a failed Run leaves the previous result, no error badges over it); a
    success clears the message, unless it changed nothing (an empty dict: every output keeps its value). Every page
    event of a tab goes through it."""

    @functools.wraps(fn)
    def handler(*args, **kwargs):
        import gradio as gr

        try:
            out = fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 (every failure becomes a message in the page)
            return {message: _message_text(e)}
        return {message: "", **out} if out else {message: gr.skip()}  # Gradio takes no empty dict

    return handler


def _limit_slider(gr, name: str, value, label: str, step=1, **kw):
    limit = LIMITS[name]
    return gr.Slider(int(limit.low), int(limit.high), value=value, step=step, label=label, **kw)


IMAGE_PROMPT_CHOICES = {"preset": None, "on": True, "off": False}  # the control's choices -> EditSpec.image_prompt


def _advanced(gr, pipe, info, steps: int) -> dict:
    """The settings every task shares, with the ranges of `dragondiff.limits`: name -> component. With an
    IP-Adapter loaded (`dragondiff ui --ip-adapter`), also the image prompt's switch and scale."""
    seed, scale = LIMITS["seed"], LIMITS["guidance_scale"]
    energy = LIMITS["energy_scale"]
    with gr.Row():
        preset = gr.Dropdown(sorted(PRESETS), value=DEFAULT_PRESET, label="Preset")
        n_steps = _limit_slider(gr, "num_inference_steps", steps, "DDIM steps")
        seed = gr.Number(DEFAULT_SEED, precision=0, label="Seed", minimum=seed.low, maximum=seed.high)
        resolution = _limit_slider(gr, "max_resolution", pipe.default_max_resolution, "Max resolution",
                                   step=RESOLUTION_STEP)
    with gr.Row():
        guidance = gr.Number(None, label="CFG scale (empty: the model's recommended)", minimum=scale.low,
                             maximum=scale.high)
        energy = gr.Number(None, label="Energy scale (empty: the model's recommended)", minimum=energy.low,
                           maximum=energy.high)
    image_prompt = {}
    if pipe.backbone.image_prompt is not None:
        ip = LIMITS["ip_scale"]
        ip_default = pipe.recommended_settings.get(info.name, {}).get("ip_scale", info.settings["ip_scale"])
        with gr.Row():
            image_prompt["image_prompt"] = gr.Radio(
                list(IMAGE_PROMPT_CHOICES), value="preset", label="Image prompt (IP-Adapter)",
                info="preset: on with the official and fast presets, off with paper", elem_id=f"{info.name}-ip")
            image_prompt["ip_scale"] = gr.Slider(ip.low, ip.high, value=ip_default, step=0.01,
                                                 label="Image prompt scale", elem_id=f"{info.name}-ip-scale")
    # a preset brings its own step count (fast: 20); the slider can still change it afterwards
    preset.change(lambda name: PRESETS[name].steps, preset, n_steps, **PRIVATE)
    return {"preset": preset, "num_inference_steps": n_steps, "seed": seed, "max_resolution": resolution,
            "guidance_scale": guidance, "energy_scale": energy, **image_prompt}


def _whole(value):
    """A slider's whole number (2.0) as the int the spec takes; any other value as given, for the spec to check."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _options(values: dict) -> dict:
    """run_fields' options from the advanced settings' values (empty CFG / energy: the model's recommended; the
    image prompt's, where shown). Values are passed on as given: the spec checks each, naming it."""
    options = {"preset": values["preset"], "num_inference_steps": _whole(values["num_inference_steps"]),
               "seed": _whole(values["seed"] if values["seed"] is not None else 0),
               "max_resolution": _whole(values["max_resolution"])}
    for name in ("guidance_scale", "energy_scale", "ip_scale"):
        if values.get(name) is not None:
            options[name] = values[name]
    if values.get("image_prompt") is not None:
        if values["image_prompt"] not in IMAGE_PROMPT_CHOICES:
            raise UIError(f"image_prompt: expected one of {list(IMAGE_PROMPT_CHOICES)}, got {values['image_prompt']!r}")
        options["image_prompt"] = IMAGE_PROMPT_CHOICES[values["image_prompt"]]
    return options


def _preview(value, points):
    try:
        image = editor_image(value)
    except UIError:
        return None
    try:
        mask = editor_mask(value, image.shape[:2])
    except UIError:
        mask = None
    return np.asarray(draw_points(image, mask, points))


def _task_tab(gr, pipe, info, state, steps: int, examples: dict, reference_image, outputs: Outputs) -> None:
    """One task's tab: image (and reference) editors, the points panel when the task takes clicks (its preview
    panel when it has one), the result with its message area, status and downloads, the task's own fields, the
    prompt, a Scale slider when the task has one, Run, the advanced settings."""
    task, ui, names = info.name, info.ui, list(examples)
    with gr.Tab(ui.title, id=task, elem_id=f"tab-{task}"):
        with gr.Row():
            with gr.Column():
                # the brush only where the task reads strokes or clicks points on the image
                editor = _editor(gr, "Image: brush over the object" if ui.mask_on_image else "Image",
                                 f"{task}-editor", brush=ui.mask_on_image or ui.click_help is not None)
                if ui.examples:
                    with gr.Row():
                        choice = gr.Dropdown(names, value=names[0], label="Example scene", scale=3,
                                             elem_id=f"{task}-example")
                        load = gr.Button("Load example", scale=1, elem_id=f"{task}-load")
            clicks = points_data = None
            if ui.click_help:
                with gr.Column():
                    # page.js records the clicks on this panel, and its two buttons, in the hidden points field
                    clicks = gr.Image(label=f"Points: {ui.click_help}", interactive=False, type="numpy",
                                      format="png", elem_id=f"{task}-points", elem_classes="dd-points", height=420)
                    points_data = gr.Textbox("[]", visible="hidden", elem_id=f"{task}-points-data")
                    with gr.Row():
                        gr.Button("Undo last point", elem_id=f"{task}-undo-point", elem_classes="dd-undo-point")
                        gr.Button("Clear points", elem_id=f"{task}-clear-points", elem_classes="dd-clear-points")
            ref_editor = None
            if info.images == 2:
                with gr.Column():
                    ref_editor = _editor(gr, "Reference: brush over its object", f"{task}-reference")
            elif ui.reference_upload:
                with gr.Column():
                    ref_editor = _editor(gr, ui.reference_upload, f"{task}-reference", brush=False)
            preview = None
            if ui.preview is not None:
                with gr.Column():
                    preview = gr.Image(label="Preview: handles (red), targets (blue), arrows", interactive=False,
                                       type="numpy", format="png", elem_id=f"{task}-preview", height=420)
            with gr.Column():
                result = gr.Image(label="Result", interactive=False, type="numpy", format="png",
                                  elem_id=f"{task}-result", height=420)
                working = (gr.Image(label=ui.working_result, interactive=False, type="numpy", format="png",
                                    elem_id=f"{task}-working", height=200) if ui.working_result else None)
                message = gr.Markdown(elem_id=f"{task}-message", elem_classes="dd-message")
                status = gr.Markdown(elem_id=f"{task}-status")
                files = gr.File(label="Download: result and sidecar", file_count="multiple", interactive=False,
                                elem_id=f"{task}-files")
                with gr.Row():
                    again = gr.Button("Edit this result", elem_id=f"{task}-again")
                    undo = gr.Button("Undo edit", elem_id=f"{task}-undo")
        fields = {}
        if ui.fields:
            with gr.Row():
                fields = {f.name: _field(gr, task, f) for f in ui.fields}
        prompt = gr.Textbox(label="Prompt", value=examples[names[0]][1] if ui.examples else
                            info.settings.get("prompt", ""), elem_id=f"{task}-prompt")
        scale = (gr.Slider(0.5, 2.0, value=1.0, step=0.05, label="Scale", elem_id=f"{task}-scale")
                 if ui.scale else None)
        run = gr.Button("Run", variant="primary", elem_id=f"{task}-run")
        with gr.Accordion("Advanced", open=False):
            advanced = _advanced(gr, pipe, info, steps)

    # ---------------------------------------------------------------------------------------------- events
    # Every page event goes through _reported: a failure is said in `message`, the other outputs keep their value.
    resettable = [editor] + ([clicks, points_data] if clicks is not None else []) + [message]

    def reset(image, session):
        session.points[task] = []
        session.shown[task] = image
        out = {editor: {"background": image, "layers": [], "composite": image}}
        if clicks is not None:
            out.update({clicks: draw_points(image, None, []), points_data: json.dumps(session.new_points_epoch(task))})
        return out

    def points(value, text, session) -> list:
        """The points of the hidden field, in image pixels, which become the session's."""
        session.points[task] = panel_points(text, editor_image(value).shape[:2])
        return session.points[task]

    def load_example(name, session):
        image, caption = examples[name]
        out = {**reset(image, session), prompt: ui.example_prompt(caption)}
        if ref_editor is not None:
            out[ref_editor] = {"background": reference_image, "layers": [], "composite": reference_image}
        return out

    if ui.examples:
        load.click(_reported(message, load_example), [choice, state],
                   resettable + [prompt] + ([ref_editor] if ref_editor else []), **PRIVATE)

    # The task's preview of the inputs (e.g. the face's landmarks and their targets), redrawn after every change of
    # them; a problem it finds (no face, several faces) is said in the message area.
    def refresh(data):
        if data[editor] is None or data[editor].get("background") is None:
            return {preview: None}
        reference = None
        if ref_editor is not None and data[ref_editor] is not None and data[ref_editor].get("background") is not None:
            reference = editor_image(data[ref_editor], "reference")
        shown, problem = task_preview(task, editor_image(data[editor]), reference,
                                      {name: data[c] for name, c in fields.items()})
        return {preview: np.asarray(shown), **({message: f"Check the input: {problem}"} if problem else {})}

    preview_inputs = {editor, *fields.values()} | ({ref_editor} if ref_editor is not None else set())

    def then_refresh(event):
        if preview is not None:
            event.then(_reported(message, refresh), preview_inputs, [preview, message], **PRIVATE)

    # An upload of any mode (grey, palette, transparent, ...) becomes the RGB picture an edit reads, at once, and
    # the points panel shows it (page.js has already refused files over the limits or not images). The editor also
    # says "upload" a while after the server has set its picture (load example, edit this result, undo, this reset):
    # the picture the tab shows already changes nothing, and keeps the points clicked meanwhile.
    def uploaded(value, session):
        image = editor_image(value)
        shown = session.shown.get(task)
        if shown is not None and shown.shape == image.shape and np.array_equal(shown, image):
            return {}
        return reset(image, session)

    # No progress shown: the editor fires upload twice after the server sets its picture, and the page now and then
    # kept a "processing" cover over the editor for good, both events answered in ms (3 in about 80 page loads after
    # a page closed mid-load, the server idle; tools/ui_editor_cover.py), hiding the picture and taking the strokes.
    then_refresh(editor.upload(_reported(message, uploaded), [editor, state], resettable, show_progress="hidden",
                               **PRIVATE))
    if ref_editor is not None:
        def ref_uploaded(value):
            image = editor_image(value, "reference")
            return {ref_editor: {"background": image, "layers": [], "composite": image}}

        then_refresh(ref_editor.upload(_reported(message, ref_uploaded), [ref_editor], [ref_editor, message],
                                       show_progress="hidden", **PRIVATE))
    if preview is not None:
        for control in fields.values():
            control.change(_reported(message, refresh), preview_inputs, [preview, message],
                           trigger_mode="always_last", **PRIVATE)

    if clicks is not None:
        def show_points(value, text, session):
            if not session.newer_points(task, points_version(text)):
                return {}  # a redraw that arrived after a later one's
            return {clicks: _preview(value, points(value, text, session))}

        def repaint(value, text, session):
            if not session.newer_points(task, points_version(text)):
                return _preview(value, session.points.get(task, []))
            try:
                pts = points(value, text, session)
            except UIError:
                pts = []
            return _preview(value, pts)

        # The hidden field holds every point clicked (page.js appends each click, undoes, clears): only its latest
        # value matters, so a redraw may skip the ones before it (trigger_mode "always_last") and no click is lost.
        # (Its change event: a Textbox's input event only follows key presses.) No progress overlay on the points
        # image; the status tracker over it lets clicks through (CSS).
        points_data.change(_reported(message, show_points), [editor, points_data, state], [clicks, message],
                           show_progress="hidden", trigger_mode="always_last", **PRIVATE)
        # Painting fires a change per stroke: only the latest redraw matters.
        editor.change(repaint, [editor, points_data, state], [clicks], show_progress="hidden",
                      trigger_mode="always_last", **PRIVATE)

    def do_run(data, request: gr.Request, progress=gr.Progress()):
        session = data[state]
        value = data[editor]
        image = editor_image(value)
        mask = editor_mask(value, image.shape[:2]) if ui.mask_on_image else None
        reference = reference_mask = None
        if ref_editor is not None:
            reference = editor_image(data[ref_editor], "reference")
            if info.images == 2:
                reference_mask = editor_mask(data[ref_editor], reference.shape[:2], "reference mask")
        # the points as the page holds them now (their redraw may still be queued)
        pts = points(value, data[points_data], session) if points_data is not None else []
        out, info_, paths = run_edit(
            pipe, session, task, image, outputs=outputs, owner=request.session_hash, mask=mask,
            points=pts, reference=reference, reference_mask=reference_mask,
            prompt=data[prompt] or "", scale=float(data[scale]) if scale is not None else 1.0,
            options=_options({k: data[c] for k, c in advanced.items()}), progress=progress,
            values={name: data[c] for name, c in fields.items()})
        shown = {result: np.asarray(out), status: status_text(info_), files: [str(p) for p in paths]}
        if working is not None and info_["working_image"] is not None:
            shown[working] = str(info_["working_image"])
        return shown

    inputs = {state, editor, prompt, *advanced.values(), *fields.values()} | {
        c for c in (points_data, ref_editor, scale) if c is not None}
    run.click(_reported(message, do_run), inputs, [result, status, files, message] + ([working] if working else []),
              concurrency_id="edit", **PRIVATE)

    def edit_result(output, value, session):
        if output is None:
            raise UIError("Nothing to edit: run an edit first")
        try:
            session.push(editor_image(value))
        except UIError:
            pass
        return reset(np.ascontiguousarray(np.asarray(output)[..., :3]), session)

    def undo_edit(session):
        image = session.pop()
        if image is None:
            raise UIError("Nothing to undo: no earlier input in this session")
        return reset(image, session)

    then_refresh(again.click(_reported(message, edit_result), [result, editor, state], resettable, **PRIVATE))
    then_refresh(undo.click(_reported(message, undo_edit), [state], resettable, **PRIVATE))


# ------------------------------------------------------------------------------------------------------ API

def _mask_upload(path, name: str) -> np.ndarray:
    """An uploaded mask image (white = inside) as a bool mask, checked as every upload is."""
    return read_upload(path, name).max(-1) > 127


def _file_paths(value) -> list:
    """The paths of the files (Gradio FileData: a dict with a "path") anywhere in an event's input or output."""
    from gradio_client import utils as client_utils

    found = []
    client_utils.traverse(value, lambda d: found.append(d["path"]) or d, client_utils.is_file_obj)
    return found


def _blocks_class():
    """gr.Blocks whose events take files only as this server's uploads and record each session's files.

    Gradio itself refuses a path outside its upload folder, but only after its own checks: it fetches a URL given
    as a file (any public host, unbounded), accepts any file in the machine-wide upload folder (other apps',
    earlier runs'), and its refusal is an unnamed error with a traceback in the log. Here every file of every
    event is checked first, by the parameter's name, against this server's own upload folder (see `launch`)."""
    import gradio as gr

    class AppBlocks(gr.Blocks):
        param_names: dict  # component id -> the API parameter it is

        async def process_api(self, block_fn, inputs, *args, **kwargs):
            fn = self.fns[block_fn] if isinstance(block_fn, int) else block_fn
            received = []
            for block, value in zip(fn.inputs, inputs):
                name = getattr(self, "param_names", {}).get(block._id) or getattr(block, "label", None) or "file"
                for path in _file_paths(value):
                    try:
                        received.append(uploaded_file(path, self.GRADIO_CACHE, name))
                    except UIError as e:
                        raise _ui_error(gr, e) from None
            out = await super().process_api(block_fn, inputs, *args, **kwargs)
            session = kwargs.get("session_hash")
            outputs = getattr(self, "dragondiff_outputs", None)
            if session and outputs is not None:
                outputs.track(session, received + _file_paths(out.get("data")))
            return out

    return AppBlocks


def _api_endpoint(gr, app, pipe, info, steps: int, session: Session, outputs: Outputs) -> None:
    """`/<task>`: the task's fields as parameters (image, mask, its clicked fields as values, reference, its own
    fields, prompt, settings), the full-size result and a status line back. Hidden components: only the API uses
    them. Images arrive as uploaded files, checked (bytes, format and pixels from the header) before they are
    decoded. The values reach `edit` as the client sent them (no Gradio preprocessing): the spec checks each,
    naming the parameter."""
    task, ui = info.name, info.ui
    names = ["image"] + (["mask"] if ui.mask_on_image else []) + (
        ["reference", "reference_mask"] if info.images == 2 else ["reference"] if ui.reference_upload else [])
    images = {name: gr.File(type="filepath", label=name) for name in names}
    own = {f.name: _field(gr, f"api-{task}", f) for f in ui.fields}
    values = {name: (gr.Number(None, label=name) if kind == "number" else gr.JSON(None, label=name))
              for name, kind in ui.api_fields.items()}
    prompt = gr.Textbox("", label="prompt")
    advanced = _advanced(gr, pipe, info, steps)
    result = gr.Image(type="numpy", format="png", label="result")
    status = gr.Markdown(label="status")

    components = {**images, **own, **values, "prompt": prompt, **advanced}
    names = list(components)
    app.param_names.update({c._id: name for name, c in components.items()})

    def upload(value, name: str):
        """An image parameter's file: Gradio's FileData of an upload (AppBlocks has checked where it lies)."""
        if not (isinstance(value, dict) and isinstance(value.get("path"), str)):
            raise UIError(f"{name}: expected an uploaded file (gradio_client: handle_file(path)), "
                          f"got {type(value).__name__}")
        return value["path"]

    def edit(*args):
        data = dict(zip(names, args))
        try:
            if data["image"] is None:
                raise UIError("image: give the image to edit")
            image = read_upload(upload(data["image"], "image"), "image")
            fields = {}
            for name in [*images, *values]:
                value = data[name]
                if name == "image" or value is None:
                    continue
                if name in images:
                    path = upload(value, name)
                    fields[name] = _mask_upload(path, name) if name.endswith("mask") else read_upload(path, name)
                else:
                    fields[name] = api_list(value, name) if ui.api_fields[name] == "json" else value
            fields.update(ui_fields(task, {name: data[name] for name in own}))
            out, status_, _ = run_fields(pipe, session, task, image, fields, outputs=outputs, owner=API_OWNER,
                                         prompt=data["prompt"] or "", options=_options(data))
        except Exception as e:  # noqa: BLE001 (the client gets the message)
            raise _ui_error(gr, e) from e
        return np.asarray(out), status_text(status_)

    # the client names the parameters after the function's, with the page's defaults (the image is required)
    edit.__signature__ = inspect.Signature([
        inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                          **({} if name == "image" else {"default": component.value}))
        for name, component in components.items()])
    trigger = gr.Button(visible=False)
    # preprocess=False: Gradio's own range and choice checks name no parameter and log a traceback
    trigger.click(edit, list(components.values()), [result, status], api_name=task, api_description=info.doc,
                  concurrency_id="edit", preprocess=False)


def build_app(pipe, *, steps: int = 50, outputs: Outputs | None = None):
    """The Blocks app. Its edits' files go to `outputs` (a fresh `Outputs` if None, as `app.dragondiff_outputs`):
    a session's folder is removed when its page is closed (Gradio's unload event), `launch` removes them all at
    shutdown."""
    import gradio as gr

    outputs = outputs or Outputs()
    examples = example_scenes()
    reference_image = example_reference()
    with _blocks_class()(title="dragondiff") as app:
        app.param_names = {}
        app.dragondiff_outputs = outputs
        gr.Markdown("## dragondiff: DragonDiffusion drag-style editing\n"
                    f"Model: `{pipe.model_id or 'in-memory'}`. Brush the mask on the image, click points, Run. "
                    "The inversion of an image is computed once and reused by every further edit of it.")
        # One Session per page load: Gradio gives each browser session its own copy of this fresh one (a plain
        # value: no load event, which the API would list). Handlers change it in place, so quick successive
        # clicks all land in it whatever order their events finish in.
        state = gr.State(Session())
        for info in TASKS.values():
            if info.ui is not None:
                _task_tab(gr, pipe, info, state, steps, examples, reference_image, outputs)
        api_session = Session()  # API calls share one inversion cache (edits run one at a time)
        with gr.Column(visible=False):
            for info in TASKS.values():
                if info.ui is not None:
                    _api_endpoint(gr, app, pipe, info, steps, api_session, outputs)

        def session_ended(request: gr.Request):
            outputs.end_session(request.session_hash)

        app.unload(session_ended)
    return app


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # Gradio then closes the server, as on Ctrl-C


def launch(pipe, *, host: str = "127.0.0.1", port: int = 7860, share: bool = False, steps: int = 50,
           quiet: bool = False, block: bool = True):
    """Serve the app; with block=False return it running (close it with `app.close()`). The app's folder (Gradio's
    uploads and cache, the edits' folders) is removed when the server stops (Ctrl-C, SIGTERM, `app.close()`) and,
    failing that, at exit."""
    outputs = Outputs()
    # Gradio's uploads and cache in this server's own folder (Gradio reads GRADIO_TEMP_DIR when the app is built
    # and at each request): only this server's uploads are inputs, and they go with it.
    cache, previous = str(outputs.cache_folder()), os.environ.get("GRADIO_TEMP_DIR")
    os.environ["GRADIO_TEMP_DIR"] = cache
    app = build_app(pipe, steps=steps, outputs=outputs)

    def close():
        outputs.close()
        if os.environ.get("GRADIO_TEMP_DIR") == cache:  # (unless a later server of this process set its own)
            if previous is None:
                os.environ.pop("GRADIO_TEMP_DIR")
            else:
                os.environ["GRADIO_TEMP_DIR"] = previous

    atexit.register(close)

    @contextlib.asynccontextmanager
    async def lifespan(_server):
        yield
        close()

    # One edit at a time: the model is shared and an edit's memory bank lives on its UNet for the edit's duration.
    app.queue(default_concurrency_limit=1, max_size=64)
    if block and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        app.launch(server_name=host, server_port=port, share=share, max_file_size=REQUEST_MAX_BYTES, quiet=quiet,
                   footer_links=[], css=CSS, head=page_head(), app_kwargs={"lifespan": lifespan},
                   prevent_thread_lock=not block)
    finally:
        if block:
            close()
    return app
