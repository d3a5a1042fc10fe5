"""`dragondiff move|drag|appearance|paste IMAGE ...` and `dragondiff run SPEC...`."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..spec import EditSpec
from ..tasks import TASKS
from .options import (edit_options, model_options, option_group, output_option, run_options, spec_fields,
                      task_fields, task_options, weight_options)
from .runner import IMAGE_SUFFIXES, InputError, Job, check_inputs, check_jobs, execute, open_model, output_name


def make_spec(task: str, label: str, **fields) -> EditSpec:
    try:
        return EditSpec(task=task, **{k: v for k, v in fields.items() if v is not None})
    except (ValueError, TypeError) as e:
        raise InputError(f"{label}: {e}") from e


def run_jobs(jobs: list[Job], opts: dict, model: str | None = None) -> None:
    """Check every job's inputs and outputs, then load the model once and run them in order."""
    for job in jobs:
        check_inputs(job.spec, job.label, model or opts["model"])
    check_jobs(jobs, opts["overwrite"], opts["preview"])
    if opts.get("dry_run"):
        for job in jobs:
            click.echo(f"{job.label}: valid ({job.spec.task} -> {job.output})")
        return
    loaded = open_model(opts, model)
    done = 0
    try:
        for job in jobs:
            execute(loaded.pipe, job, working_size=opts["working_size"], preview=opts["preview"],
                    quiet=opts["quiet"], threads=loaded.threads, load_seconds=loaded.seconds)
            done += 1
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (cli.main): the edit in progress left no file
        click.echo(f"interrupted: {done} of {len(jobs)} edit{'s' * (len(jobs) != 1)} written"
                   + "".join(f"\n  wrote {job.output}" for job in jobs[:done]), err=True)
        raise


def _default_output(image: str, task: str) -> Path:
    return Path(f"{Path(image).stem}-{task}.png")


_dry_run = click.option("--dry-run", is_flag=True, help="only validate the inputs and the output path")


def task_command(task: str, help_text: str) -> click.Command:
    """`dragondiff TASK IMAGE ...`: the task's own options derived from its Params, then the shared groups."""

    def run_task(image, **opts):
        spec = make_spec(task, task, image=image, **spec_fields(opts), **task_fields(task, opts))
        output = Path(opts["output"]) if opts["output"] else _default_output(image, task)
        run_jobs([Job(spec, output, task)], opts)

    options = option_group(click.argument("image", type=click.Path(dir_okay=False)), task_options(task),
                           edit_options, output_option, weight_options(task), model_options, run_options, _dry_run)
    return click.command(task, help=help_text, no_args_is_help=True)(options(run_task))


# One command per registered task, its help from the task's registration.
TASK_COMMANDS = [task_command(name, f"{info.doc}.\n\nExample: dragondiff {name} {info.example}")
                 for name, info in TASKS.items()]


# ------------------------------------------------------------------------------------------------ spec files

SPEC_FORMS = 'an object with a "task" field, a list of them, or {"edits": [...]}'


def load_spec_data(path: Path):
    """The parsed content of a JSON or YAML (.yaml/.yml) file; InputError naming the file if it cannot be read."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from e
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            return yaml.safe_load(text)
        return json.loads(text)
    except Exception as e:  # noqa: BLE001 (json and yaml raise their own errors; both mean the same here)
        raise InputError(f"{path}: not valid {'YAML' if path.suffix.lower() in ('.yaml', '.yml') else 'JSON'} "
                         f"({e})") from e


def is_edit_spec(data) -> bool:
    """Whether parsed JSON/YAML is meant as edits (SPEC_FORMS; its fields are checked when read), as opposed to
    some other file (a package.json, a config): an object with a task field or an edits list, or a list holding
    such an object."""
    if isinstance(data, dict):
        return "task" in data or "edits" in data
    return isinstance(data, list) and any(isinstance(entry, dict) and "task" in entry for entry in data)


def read_spec_file(path: Path) -> tuple[list[tuple[str, EditSpec]], str | None]:
    """A spec file's edits as (label, EditSpec), and the model a sidecar names. Accepts one EditSpec object, a
    list of them, {"edits": [...]}, or a sidecar written next to an output; JSON, or YAML (.yaml/.yml)."""
    from ..provenance import is_sidecar

    data = load_spec_data(path)
    model = None
    if not is_sidecar(data) and not is_edit_spec(data):
        raise InputError(f"{path}: not an edit spec; expected {SPEC_FORMS}, or a sidecar")
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
            name = output_name(f.stem, k, len(specs))
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
