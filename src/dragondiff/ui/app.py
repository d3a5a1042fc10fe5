"""`dragondiff ui`: a Gradio app with one tab per task. Layout and event wiring only; the logic is in session.py."""


import numpy as np

from ..presets import PRESETS
from .session import (Session, UIError, display_factor, draw_points, editor_image, editor_mask, run_edit,
                      status_text)

TASKS = {  # tab title, needs a mask on the image, clicks, a reference image
    "move": ("Move & resize", True, "click a handle on the object, then where it should go", False),
    "drag": ("Drag", True, "click handle, target, handle, target, ...", False),
    "appearance": ("Appearance", True, None, True),
    "paste": ("Paste", False, "click where the pasted object's centre should go", True),
}
MAX_UPLOAD = "20mb"
# Small results (the bundled model's 128 px) fill their panel, drawn with crisp pixels.
CSS = """
[id$='-result'] img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }
"""


def example_scenes() -> dict:
    """Bundled example scenes (what the bundled model knows): name -> (image, caption)."""
    from ..shapes.scenes import Shape, make_scene, random_scene

    demo = make_scene([Shape("circle", "red", 40.0, 64.0, 20.0), Shape("square", "blue", 100.0, 28.0, 16.0)],
                      ("green", None, 0.0))
    scenes = {"red circle, blue square": demo}
    for seed in (3, 11, 21):
        scene = random_scene(seed, n_objects=2)
        scenes[scene.caption.replace(" on a", ",").replace("a ", "")] = scene
    return {name: (s.image, s.caption) for name, s in scenes.items()}


def example_reference():
    from ..shapes.scenes import Shape, make_scene

    ref = make_scene([Shape("circle", "yellow", 40.0, 40.0, 20.0), Shape("triangle", "white", 92.0, 88.0, 22.0)],
                     ("black", None, 0.0))
    return ref.image


def _editor(gr, label: str, elem_id: str):
    return gr.ImageEditor(label=label, type="numpy", image_mode="RGBA", format="png", elem_id=elem_id,
                          sources=("upload", "clipboard"), transforms=(), layers=False, height=420,
                          # see-through magenta: the object stays visible under the mask on any colour
                          brush=gr.Brush(colors=[("#ff00ff", 0.6)], default_color=("#ff00ff", 0.6),
                                         color_mode="fixed", default_size=8),
                          eraser=gr.Eraser(default_size=10))


def _ui_error(gr, e: Exception):
    if isinstance(e, UIError):
        return gr.Error(str(e), title="Check the input", print_exception=False)
    return gr.Error(f"{type(e).__name__}: {e}", title="The edit failed")


def build_app(pipe, *, steps: int = 50):
    import gradio as gr

    examples = example_scenes()
    names = list(examples)
    reference_image = example_reference()

    def preview(value, points):
        try:
            image = editor_image(value)
        except UIError:
            return None
        try:
            mask = editor_mask(value, image.shape[:2])
        except UIError:
            mask = None
        return np.asarray(draw_points(image, mask, points))

    with gr.Blocks(title="dragondiff") as app:
        gr.Markdown("## dragondiff: DragonDiffusion drag-style editing\n"
                    f"Model: `{pipe.model_id or 'in-memory'}`. Brush the mask on the image, click points, Run. "
                    "The inversion of an image is computed once and reused by every further edit of it.")
        # One Session per page load (a callable State value is called then); handlers change it in place, so
        # quick successive clicks all land in it whatever order their events finish in.
        state = gr.State(lambda: Session())
        for task, (title, needs_mask, click_help, needs_ref) in TASKS.items():
            with gr.Tab(title, id=task, elem_id=f"tab-{task}"):
                with gr.Row():
                    with gr.Column():
                        editor = _editor(gr, "Image: brush over the object" if needs_mask else "Image",
                                         f"{task}-editor")
                        with gr.Row():
                            choice = gr.Dropdown(names, value=names[0], label="Example scene", scale=3,
                                                 elem_id=f"{task}-example")
                            load = gr.Button("Load example", scale=1, elem_id=f"{task}-load")
                    clicks = None
                    if click_help:
                        with gr.Column():
                            clicks = gr.Image(label=f"Points: {click_help}", interactive=False, type="numpy",
                                              format="png", elem_id=f"{task}-points", height=420)
                            with gr.Row():
                                undo_point = gr.Button("Undo last point", elem_id=f"{task}-undo-point")
                                clear_points = gr.Button("Clear points", elem_id=f"{task}-clear-points")
                    ref_editor = None
                    if needs_ref:
                        with gr.Column():
                            ref_editor = _editor(gr, "Reference: brush over its object", f"{task}-reference")
                    with gr.Column():
                        result = gr.Image(label="Result", interactive=False, type="numpy", format="png",
                                          elem_id=f"{task}-result", height=420)
                        status = gr.Markdown(elem_id=f"{task}-status")
                        files = gr.File(label="Download: result and sidecar", file_count="multiple",
                                        interactive=False, elem_id=f"{task}-files")
                        with gr.Row():
                            again = gr.Button("Edit this result", elem_id=f"{task}-again")
                            undo = gr.Button("Undo edit", elem_id=f"{task}-undo")
                prompt = gr.Textbox(label="Prompt", value=examples[names[0]][1], elem_id=f"{task}-prompt")
                scale = (gr.Slider(0.5, 2.0, value=1.0, step=0.05, label="Scale", elem_id=f"{task}-scale")
                         if task in ("move", "paste") else None)
                run = gr.Button("Run", variant="primary", elem_id=f"{task}-run")
                with gr.Accordion("Advanced", open=False):
                    with gr.Row():
                        preset = gr.Dropdown(sorted(PRESETS), value="official", label="Preset")
                        n_steps = gr.Slider(2, 100, value=steps, step=1, label="DDIM steps")
                        seed = gr.Number(42, precision=0, label="Seed")
                        resolution = gr.Slider(64, 1024, value=pipe.default_max_resolution, step=64,
                                               label="Max resolution")
                    with gr.Row():
                        guidance = gr.Number(None, label="CFG scale (empty: the model's recommended)")
                        energy = gr.Number(None, label="Energy scale (empty: the model's recommended)")

                # ------------------------------------------------------------------------------ events
                # a preset brings its own step count (fast: 20); the slider can still change it afterwards
                preset.change(lambda name: PRESETS[name].steps, preset, n_steps)
                # Inputs and outputs are sets/dicts of components: each tab has only some of them.
                w = {"editor": editor, "clicks": clicks, "reference": ref_editor,
                     "prompt": prompt, "scale": scale, "result": result}
                have = {k: c for k, c in w.items() if c is not None}

                def reset(image, session, task=task, tab=have):
                    session.points[task] = []
                    out = {tab["editor"]: {"background": image, "layers": [], "composite": image}}
                    if "clicks" in tab:
                        out[tab["clicks"]] = draw_points(image, None, [])
                    return out

                def load_example(name, session, task=task, tab=have, reset=reset):
                    image, caption = examples[name]
                    if task == "appearance":  # ask for the new look without naming the old colour
                        caption = caption.replace("a red ", "a ", 1)
                    out = {**reset(image, session), tab["prompt"]: caption}
                    if "reference" in tab:
                        out[tab["reference"]] = {"background": reference_image, "layers": [],
                                                 "composite": reference_image}
                    return out

                resettable = [have[k] for k in ("editor", "clicks") if k in have]
                load.click(load_example, [choice, state], resettable + [prompt] + ([ref_editor] if ref_editor else []))
                if click_help:
                    def add_point(value, session, evt: gr.SelectData, task=task):
                        try:
                            k = display_factor(editor_image(value).shape[:2])
                        except UIError as e:
                            raise _ui_error(gr, e) from e
                        pts = session.points.setdefault(task, [])
                        pts.append(tuple(float(v) // k for v in evt.index))
                        return preview(value, pts)

                    def edit_points(value, session, keep, task=task):
                        pts = session.points.setdefault(task, [])
                        del pts[keep(len(pts)):]
                        return preview(value, pts)

                    # Every click counts (trigger_mode "multiple"), in order (one at a time); no progress overlay
                    # on the points image, which would swallow the next click.
                    quiet = {"show_progress": "hidden", "trigger_mode": "multiple"}
                    clicks.select(add_point, [editor, state], [clicks], **quiet)
                    undo_point.click(lambda v, s, ep=edit_points: ep(v, s, lambda n: max(0, n - 1)),
                                     [editor, state], [clicks], **quiet)
                    clear_points.click(lambda v, s, ep=edit_points: ep(v, s, lambda n: 0), [editor, state], [clicks],
                                       **quiet)
                    # Painting fires a change per stroke: only the latest redraw matters.
                    editor.change(lambda v, s, task=task: preview(v, s.points.get(task, [])), [editor, state],
                                  [clicks], show_progress="hidden", trigger_mode="always_last")

                advanced = {"preset": preset, "steps": n_steps, "seed": seed, "resolution": resolution,
                            "guidance": guidance, "energy": energy}

                def do_run(data, progress=gr.Progress(), task=task, needs_mask=needs_mask, tab=have, adv=advanced,
                           outs=(result, status, files)):
                    session = data[state]
                    try:
                        value = data[tab["editor"]]
                        image = editor_image(value)
                        mask = editor_mask(value, image.shape[:2]) if needs_mask else None
                        reference = reference_mask = None
                        if "reference" in tab:
                            reference = editor_image(data[tab["reference"]], "reference")
                            reference_mask = editor_mask(data[tab["reference"]], reference.shape[:2],
                                                         "reference mask")
                        options = {"preset": data[adv["preset"]], "num_inference_steps": int(data[adv["steps"]]),
                                   "seed": int(data[adv["seed"]] or 0),
                                   "max_resolution": int(data[adv["resolution"]])}
                        for key, name in (("guidance", "guidance_scale"), ("energy", "energy_scale")):
                            if data[adv[key]] is not None:
                                options[name] = float(data[adv[key]])
                        out, info, paths = run_edit(
                            pipe, session, task, image, mask=mask, points=list(session.points.get(task, [])),
                            reference=reference, reference_mask=reference_mask, prompt=data[tab["prompt"]] or "",
                            scale=float(data[tab["scale"]]) if "scale" in tab else 1.0, options=options,
                            progress=progress)
                    except Exception as e:  # noqa: BLE001 (every failure becomes a message in the page)
                        raise _ui_error(gr, e) from e
                    shown, message, downloads = outs
                    return {shown: np.asarray(out), message: status_text(info), downloads: [str(p) for p in paths]}

                run.click(do_run, {state, *have.values(), *advanced.values()} - {result},
                          [result, status, files], concurrency_id="edit")

                def edit_result(output, value, session, reset=reset):
                    if output is None:
                        raise gr.Error("Run an edit first", title="Nothing to edit")
                    try:
                        session.push(editor_image(value))
                    except UIError:
                        pass
                    return reset(np.ascontiguousarray(np.asarray(output)[..., :3]), session)

                def undo_edit(session, reset=reset):
                    image = session.pop()
                    if image is None:
                        raise gr.Error("No earlier input in this session", title="Nothing to undo")
                    return reset(image, session)

                again.click(edit_result, [result, editor, state], resettable)
                undo.click(undo_edit, [state], resettable)
    return app


def launch(pipe, *, host: str = "127.0.0.1", port: int = 7860, share: bool = False, steps: int = 50,
           quiet: bool = False):
    app = build_app(pipe, steps=steps)
    # One edit at a time: the model is shared and an edit's memory bank lives on its UNet for the edit's duration.
    app.queue(default_concurrency_limit=1, max_size=64)
    app.launch(server_name=host, server_port=port, share=share, max_file_size=MAX_UPLOAD, quiet=quiet,
               footer_links=[], css=CSS)
