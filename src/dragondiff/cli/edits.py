"""`dragondiff move|drag|appearance|paste IMAGE ...` and `dragondiff run SPEC...`."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from ..spec import EditSpec
from .options import (COMMON_SPEC_FIELDS, OFFSET, PAIRS, available_threads, edit_options, model_options,
                      option_group, run_options, weight_options)
from .runner import IMAGE_SUFFIXES, InputError, Job, check_inputs, check_jobs, execute, load_pipeline

WEIGHTS = ("w_edit", "w_content", "w_contrast", "w_inpaint")


def make_spec(task: str, label: str, **fields) -> EditSpec:
    try:
        return EditSpec(task=task, **{k: v for k, v in fields.items() if v is not None})
    except (ValueError, TypeError) as e:
        raise InputError(f"{label}: {e}") from e


def run_jobs(jobs: list[Job], opts: dict, model: str | None = None) -> None:
    """Check every job's inputs and outputs, then load the model once and run them in order."""
    for job in jobs:
        check_inputs(job.spec, job.label)
    check_jobs(jobs, opts["overwrite"], opts["preview"])
    if opts.get("dry_run"):
        for job in jobs:
            click.echo(f"{job.label}: valid ({job.spec.task} -> {job.output})")
        return
    threads = opts["threads"] or available_threads()[0]
    start = time.perf_counter()
    pipe = load_pipeline(model or opts["model"], opts["config"], opts["device"], opts["dtype"], threads,
                         opts["vae_tiling"])
    load_seconds = time.perf_counter() - start
    for job in jobs:
        execute(pipe, job, working_size=opts["working_size"], preview=opts["preview"], quiet=opts["quiet"],
                threads=threads, load_seconds=load_seconds)


def _spec_fields(opts: dict) -> dict:
    out = {field: opts[name] for name, field in COMMON_SPEC_FIELDS.items()}
    out.update({name: opts.get(name) for name in WEIGHTS})
    return out


def _default_output(image: str, task: str) -> Path:
    return Path(f"{Path(image).stem}-{task}.png")


_dry_run = click.option("--dry-run", is_flag=True, help="only validate the inputs and the output path")


def _task_command(task: str, help_text: str):
    """The decorators every task command shares."""

    def apply(f):
        groups = [edit_options, weight_options(task), model_options, run_options, _dry_run]
        for group in reversed(groups):
            f = group(f)
        command = click.command(task, help=help_text, no_args_is_help=True)(f)
        # Help lists the task's own arguments first, then the shared groups in the order above.
        n_shared = sum(len(group(lambda: None).__click_params__) for group in groups)
        command.params = command.params[n_shared:] + command.params[:n_shared]
        return command

    return apply


def _run_single(task: str, image: str, opts: dict, **task_fields) -> None:
    spec = make_spec(task, task, image=image, **_spec_fields(opts), **task_fields)
    output = Path(opts["output"]) if opts["output"] else _default_output(image, task)
    run_jobs([Job(spec, output, task)], opts)


@_task_command("move", "Move the masked object by --offset; --scale also resizes it (about the image centre, as the "
                       "official code).\n\nExample: dragondiff move cup.png --mask cup_mask.png --offset 120,0 "
                       "--prompt 'a cup on a table'")
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("--mask", required=True, type=click.Path(dir_okay=False), help="the object (white on black image)")
@click.option("--offset", type=OFFSET, default=None, help="(dx, dy) in input pixels  [default: 0,0]")
@click.option("--scale", type=float, default=None, help="size factor  [default: 1]")
@click.option("--reference-region", type=click.Path(dir_okay=False), default=None,
              help="mask of the area to fill the vacated place from  [default: the background]")
def move(image, mask, offset, scale, reference_region, **opts):
    _run_single("move", image, opts, mask=mask, offset=offset, scale=scale, reference_region=reference_region)


@_task_command("drag", "Drag content from handle points to target points inside an editable mask.\n\n"
                       "Example: dragondiff drag face.png --mask face_mask.png --points '120,200:140,190 "
                       "300,200:280,190'")
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("--mask", required=True, type=click.Path(dir_okay=False), help="the editable area")
@click.option("--points", required=True, type=PAIRS, multiple=True,
              help="handle:target pairs 'hx,hy:tx,ty' in input pixels; repeat the option or separate pairs by "
                   "spaces")
def drag(image, mask, points, **opts):
    _run_single("drag", image, opts, mask=mask, points=tuple(p for group in points for p in group))


# --reference, --reference-mask, --reference-prompt (appearance and paste).
reference_options = option_group(
    click.option("--reference", required=True, type=click.Path(dir_okay=False),
                 help="the image holding the object"),
    click.option("--reference-mask", required=True, type=click.Path(dir_okay=False),
                 help="the object in --reference"),
    click.option("--reference-prompt", default=None, help="prompt of the reference image  [default: --prompt]"),
)


@_task_command("appearance", "Give the masked object the appearance of the object masked in a reference image.\n\n"
                             "Example: dragondiff appearance apple.png --mask apple_mask.png --reference pear.png "
                             "--reference-mask pear_mask.png")
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("--mask", required=True, type=click.Path(dir_okay=False), help="the object to restyle")
@reference_options
def appearance(image, mask, reference, reference_mask, reference_prompt, **opts):
    _run_single("appearance", image, opts, mask=mask, reference=reference, reference_mask=reference_mask,
                reference_prompt=reference_prompt)


@_task_command("paste", "Paste the object masked in a reference image into IMAGE, shifted by --offset and scaled by "
                        "--scale.\n\nExample: dragondiff paste room.png --reference cat.png --reference-mask "
                        "cat_mask.png --offset -80,40")
@click.argument("image", type=click.Path(dir_okay=False))
@reference_options
@click.option("--offset", type=OFFSET, default=None, help="(dx, dy) in input pixels  [default: 0,0]")
@click.option("--scale", type=float, default=None, help="size factor  [default: 1]")
def paste(image, reference, reference_mask, offset, scale, reference_prompt, **opts):
    _run_single("paste", image, opts, reference=reference, reference_mask=reference_mask, offset=offset,
                scale=scale, reference_prompt=reference_prompt)


# ------------------------------------------------------------------------------------------------ spec files

def read_spec_file(path: Path) -> tuple[list[tuple[str, EditSpec]], str | None]:
    """A spec file's edits as (label, EditSpec), and the model a sidecar names. Accepts one EditSpec object, a
    list of them, {"edits": [...]}, or a sidecar written next to an output; JSON, or YAML (.yaml/.yml)."""
    from ..provenance import is_sidecar

    try:
        text = path.read_text()
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror or e})") from e
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # noqa: BLE001 (json and yaml raise their own errors; both mean the same here)
        raise InputError(f"{path}: not valid {'YAML' if path.suffix.lower() in ('.yaml', '.yml') else 'JSON'} "
                         f"({e})") from e
    model = None
    if is_sidecar(data):
        model = (data.get("model") or {}).get("id")
        entries, labels = [data["spec"]], [str(path)]
    elif isinstance(data, dict) and "edits" in data:
        entries = data["edits"]
        if not isinstance(entries, list):
            raise InputError(f"{path}: edits must be a list of specs")
        labels = [f"{path}: edits[{k}]" for k in range(len(entries))]
    elif isinstance(data, list):
        entries, labels = data, [f"{path}[{k}]" for k in range(len(data))]
    else:
        entries, labels = [data], [str(path)]
    if not entries:
        raise InputError(f"{path}: no edits in it")
    specs = []
    for label, entry in zip(labels, entries):
        try:
            specs.append((label, EditSpec.from_dict(entry, base_dir=path.parent)))
        except (ValueError, TypeError) as e:
            raise InputError(f"{label}: {e}") from e
    return specs, model


def spec_jobs(files: list[Path], output: str | None) -> tuple[list[Job], str | None]:
    """Jobs for spec files: -o is the file when there is one edit in all, else a folder (default: here);
    names are <spec stem>.png, or <spec stem>-<k>.png for a file with several edits."""
    read = [(f, *read_spec_file(f)) for f in files]
    total = sum(len(specs) for _, specs, _ in read)
    single_file = output is not None and total == 1 and Path(output).suffix != ""
    if output is not None and total > 1 and Path(output).suffix.lower() in IMAGE_SUFFIXES:
        raise InputError(f"-o {output}: the spec files hold {total} edits; give a folder for their results")
    folder = Path(output) if output is not None and not single_file else Path(".")
    jobs, models = [], {m for _, _, m in read if m}
    for f, specs, _ in read:
        for k, (label, spec) in enumerate(specs):
            name = f"{f.stem}.png" if len(specs) == 1 else f"{f.stem}-{k}.png"
            jobs.append(Job(spec, Path(output) if single_file else folder / name, label, inputs=[f]))
    if len(models) > 1:
        raise InputError(f"spec files: the sidecars name different models ({', '.join(sorted(models))}); "
                         "run them apart or pass --model")
    return jobs, next(iter(models), None)


@click.command("run", no_args_is_help=True,
               help="Run the edits written in spec files (EditSpec JSON or YAML: one object, a list, or "
                    "{\"edits\": [...]}), or re-run an edit from the sidecar JSON written beside its output "
                    "(with the sidecar's model unless --model is given). Relative paths are taken from the "
                    "spec file's folder.\n\nExample: dragondiff run edit.json -o out/")
@click.argument("specs", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", default=None,
              help="output image when the files hold one edit, else a folder  [default: <spec>.png here]")
@click.option("--dry-run", is_flag=True, help="only validate the specs, their files and the outputs")
@model_options
@run_options
def run(specs, output, dry_run, model, **opts):
    jobs, sidecar_model = spec_jobs(list(specs), output)
    given = click.get_current_context().get_parameter_source("model") != click.core.ParameterSource.DEFAULT
    opts.update(dry_run=dry_run, model=model)
    run_jobs(jobs, opts, model=model if given or sidecar_model is None else sidecar_model)
