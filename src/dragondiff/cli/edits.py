"""`dragondiff move|drag|appearance|paste IMAGE ...` and `dragondiff run SPEC...`."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import click

from ..spec import EditSpec
from ..tasks import TASKS
from .options import (edit_options, model_options, option_group, output_option, run_options, spec_fields,
                      task_fields, task_options, weight_options)
from .runner import (IMAGE_SUFFIXES, InputError, Job, check_inputs, check_jobs, check_model_options, execute,
                     open_model, output_name, with_shared_inversions)


def make_spec(task: str, label: str, **fields) -> EditSpec:
    try:
        return EditSpec(task=task, **{k: v for k, v in fields.items() if v is not None})
    except (ValueError, TypeError) as e:
        raise InputError(f"{label}: {e}") from e


def run_jobs(jobs: list[Job], opts: dict, model: str | None = None) -> None:
    """Check every job's inputs and outputs, then load the model once and run them in order."""
    for job in jobs:
        plan = check_inputs(job.spec, job.label, model or opts["model"])
        if len(jobs) == 1:
            job.plan = plan
    check_jobs(jobs, opts["overwrite"], opts["preview"])  # outputs first, as batch does
    check_model_options(opts, jobs, model)  # what the load would refuse only after reading the weights
    note_lossy_outputs(jobs, opts["working_size"])
    if opts.get("dry_run"):
        for job in jobs:
            click.echo(f"{job.label}: valid ({job.spec.task} -> {job.output})")
        return
    loaded = open_model(opts, model)
    if opts.get("dtype_recorded"):
        note_recorded_dtype(loaded.pipe)
    done = 0
    try:
        for job, inversion in with_shared_inversions(loaded.pipe, jobs):  # several edits of one image: one inversion
            execute(loaded.pipe, job, working_size=opts["working_size"], preview=opts["preview"],
                    quiet=opts["quiet"], threads=loaded.threads, load_seconds=loaded.seconds, inversion=inversion)
            done += 1
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (cli.main): the edit in progress left no file
        click.echo(f"interrupted: {done} of {len(jobs)} edit{'s' * (len(jobs) != 1)} written"
                   + "".join(f"\n  wrote {job.output}" for job in jobs[:done]), err=True)
        raise


def note_recorded_dtype(pipe) -> None:
    """Say so when the dtype a sidecar recorded is not what this machine would pick (`--dtype auto`)."""
    from ..errors import InputNote
    from ..loading import auto_dtype

    mine = auto_dtype(pipe.device, pipe.backbone)
    if mine != pipe.dtype:
        name = lambda d: str(d).replace("torch.", "")  # noqa: E731
        warnings.warn(f"dtype: re-running in {name(pipe.dtype)} as the sidecar recorded; on this machine --dtype "
                      f"auto would pick {name(mine)} (faster here, not the same pixels)", InputNote, stacklevel=2)


LOSSY_SUFFIXES = (".jpg", ".jpeg", ".webp")


def note_lossy_outputs(jobs: list[Job], working_size: bool) -> None:
    """The composited output keeps every pixel away from the edit identical to the input only in a lossless
    format; say so once per lossy output before the edit runs."""
    from ..errors import InputNote

    if working_size:
        return
    for job in jobs:
        if job.output.suffix.lower() in LOSSY_SUFFIXES:
            warnings.warn(f"{job.output}: {job.output.suffix} is lossy, so the pixels away from the edit are "
                          "re-encoded, not identical to the input's; use .png to keep them", InputNote, stacklevel=2)


def _default_output(image: str, task: str) -> Path:
    return Path(f"{Path(image).stem}-{task}.png")


_dry_run = click.option("--dry-run", is_flag=True, help="only validate the inputs, the output path and the model "
                                                        "options (device, dtype, the adapter's fit)")


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
    """The parsed content of a JSON or YAML (.yaml/.yml) file, bounded (`documents`: size, nesting, values with
    YAML aliases expanded); InputError naming the file if it cannot be read."""
    from .. import documents

    try:
        return documents.read(path)
    except ValueError as e:
        raise InputError(str(e)) from e


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
    from .. import documents
    from ..errors import InputNote
    from ..provenance import is_sidecar, kernels_change, sidecar_model

    data = load_spec_data(path)
    model = None
    if not is_sidecar(data) and not is_edit_spec(data):
        raise InputError(f"{path}: not an edit spec; expected {SPEC_FORMS}, or a sidecar")
    if is_sidecar(data):
        try:
            model = sidecar_model(data)
        except ValueError as e:
            raise InputError(f"{path}: {e}") from e
        if model is not None and isinstance(data.get("dtype"), str):
            model = {**model, "dtype": data["dtype"]}  # the re-run's dtype (`recorded_dtype`)
        change = kernels_change(data)
        if change is not None:
            warnings.warn(f"{path}: {change}", InputNote, stacklevel=2)
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
    specs, base = [], documents.base_folder(path)
    for label, entry in zip(labels, entries):
        try:
            specs.append((label, EditSpec.from_dict(entry, base_dir=base)))
        except (ValueError, TypeError) as e:
            raise InputError(f"{label}: {e}") from e
    return specs, model


def spec_jobs(files: list[Path], output: str | None) -> tuple[list[Job], list[dict]]:
    """Jobs for spec files, and the model records of the sidecars among them. -o is the file when there is one
    edit in all, else a folder (default: here); names are <spec stem>.png, or <spec stem>-<k>.png for a file with
    several edits, with '-out' after the stem where that result's sidecar would be the spec file itself."""
    read = [(f, *read_spec_file(f)) for f in files]
    total = sum(len(specs) for _, specs, _ in read)
    single_file = output is not None and total == 1 and Path(output).suffix != ""
    if output is not None and total > 1 and Path(output).suffix.lower() in IMAGE_SUFFIXES:
        raise InputError(f"-o {output}: the spec files hold {total} edits; give a folder for their results")
    folder = Path(output) if output is not None and not single_file else Path(".")
    jobs = []
    for f, specs, _ in read:
        stem = f.stem
        if output is None and any((folder / output_name(stem, k, len(specs))).with_suffix(".json").resolve()
                                  == f.resolve() for k in range(len(specs))):
            stem += "-out"  # run from the spec's own folder: its sidecar must not be the spec
        for k, (label, spec) in enumerate(specs):
            name = output_name(stem, k, len(specs))
            jobs.append(Job(spec, Path(output) if single_file else folder / name, label, inputs=[f]))
    records = [m for _, _, m in read if m]
    ids = {m["id"] for m in records}
    if len(ids) > 1:
        raise InputError(f"spec files: the sidecars name different models ({', '.join(sorted(ids))}); "
                         "run them apart or pass --model")
    return jobs, records


def sidecar_model_check(records: list[dict], model: str, given: bool) -> None:
    """A sidecar promises the same image: refuse a re-run on weights other than those it recorded unless --model
    says so (then say what differs in a note)."""
    from ..errors import InputNote
    from ..provenance import fingerprint_change

    for record in records:
        change = fingerprint_change(record, model)
        if change is None:
            continue
        if not given:
            raise InputError(f"model {record['id']}: its weights changed since the sidecar was written ({change}); "
                             f"the re-run would not give the same image. Pass --model {record['id']} to re-run "
                             "with these weights anyway")
        warnings.warn(f"--model {model}: other weights than the sidecar recorded ({change}); the result may differ",
                      InputNote, stacklevel=2)


@click.command("run", no_args_is_help=True,
               help="Run the edits written in spec files (EditSpec JSON or YAML: one object, a list, or "
                    "{\"edits\": [...]}), or re-run an edit from the sidecar JSON written beside its output "
                    "(with the sidecar's model unless --model is given; refused when that model's weights changed "
                    "since). Relative paths are taken from the spec file's folder (a symlink's target's; the "
                    "working folder for /dev/stdin).\n\nExample: dragondiff run edit.json -o out/")
@click.argument("specs", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", default=None,
              help="output image when the files hold one edit, else a folder  [default: <spec>.png here; "
                   "<spec>-out.png where <spec>.json is the spec itself]")
@click.option("--dry-run", is_flag=True, help="only validate the specs, their files, the outputs and the model options")
@model_options
@run_options
def run(specs, output, dry_run, model, **opts):
    jobs, records = spec_jobs(list(specs), output)
    given = click.get_current_context().get_parameter_source("model") != click.core.ParameterSource.DEFAULT
    opts.update(dry_run=dry_run, model=model)
    use = model if given or not records else records[0]["id"]
    sidecar_model_check(records, use, given)
    recorded_adapter(records, jobs, opts)
    recorded_loras(records, opts)
    recorded_dtype(records, opts)
    run_jobs(jobs, opts, model=use)


def recorded_dtype(records: list[dict], opts: dict) -> None:
    """A sidecar re-runs in the dtype it recorded unless --dtype is given (the default, auto, depends on the CPU:
    a sidecar made in bfloat16 on a CPU with native bf16 would otherwise re-run in float32 elsewhere); `run_jobs`
    notes when this machine would pick another by itself."""
    recorded = {r["dtype"] for r in records if r.get("dtype")}
    if opts.get("dtype") is not None or not recorded:
        return
    if len(recorded) > 1:
        raise InputError(f"spec files: the sidecars ran in different dtypes ({', '.join(sorted(recorded))}); run "
                         "them apart or pass --dtype")
    opts["dtype"], opts["dtype_recorded"] = recorded.pop(), True


def check_recorded_file(path: Path, sha256: str | None, field: str, what: str, option: str) -> None:
    """A file a sidecar recorded (an adapter, a LoRA) must still be there with the same sha256 for the re-run to
    give the same image; `option` given again overrides it."""
    from ..image_prompt import file_sha256

    if not path.is_file():
        raise InputError(f"{field}: the sidecar's {what} {path} is not there; give it with {option}")
    if sha256 and file_sha256(path) != sha256:
        raise InputError(f"{field}: {path} changed since the sidecar was written (sha256 differs); pass {option} to "
                         "re-run with it anyway")


def recorded_loras(records: list[dict], opts: dict) -> None:
    """A sidecar made with LoRAs re-runs with those it recorded (same files, sha256, scales, fused or not) unless
    --lora is given (then a note if they differ)."""
    from ..errors import InputNote

    recorded = {json.dumps(r.get("loras") or [], sort_keys=True) for r in records}
    if len(recorded) > 1 and not opts.get("loras"):  # one run loads one set of LoRAs (probe 4, finding 9's rule)
        raise InputError("spec files: the sidecars name different LoRAs; run them apart or pass --lora")
    wanted = next((r["loras"] for r in records if r.get("loras")), [])
    if opts.get("loras"):
        if [(Path(r["path"] or "").resolve(), float(r["scale"])) for r in wanted] != \
                [(Path(p).resolve(), s) for p, s in opts["loras"]]:
            warnings.warn("--lora: other LoRAs than the sidecar recorded "
                          f"({', '.join(str(r.get('file') or r.get('adapter_name')) for r in wanted) or 'none'}); the result may differ",
                          InputNote, stacklevel=2)
        return
    for lora in wanted:
        if lora["path"] is None:  # loaded by a diffusers pipeline (from_pipe): no file to re-read
            raise InputError(f"model.loras: LoRA {lora.get('adapter_name')!r} was loaded in memory, not from a "
                             "file; give the LoRAs with --lora")
        check_recorded_file(Path(lora["path"]), lora.get("sha256"), "model.loras", "LoRA", "--lora")
    opts["loras"] = tuple((lora["path"], float(lora["scale"])) for lora in wanted)
    opts["fuse_lora"] = opts.get("fuse_lora") or any(lora.get("fused") for lora in wanted)


def recorded_adapter(records: list[dict], jobs: list[Job], opts: dict) -> None:
    """A sidecar made with an image prompt re-runs with the adapter and image encoder it recorded unless
    --ip-adapter names one; the files must still be there with the same sha256. Sidecars naming different adapters
    (or encoders) are refused, as different models are: one run loads one adapter."""
    from ..image_prompt import encoder_fingerprint

    wanted = [r["ip_adapter"] for r in records if r.get("ip_adapter")]
    if opts.get("ip_adapter") is not None or not wanted or not any(job.spec.image_prompt for job in jobs):
        return
    different = {(a["file"], a.get("sha256"), a.get("image_encoder"), a.get("image_encoder_sha256")) for a in wanted}
    if len(different) > 1:
        names = sorted({f"{Path(a['file']).name} with image encoder {a.get('image_encoder')}" for a in wanted})
        raise InputError(f"spec files: the sidecars name different IP-Adapters or image encoders ({'; '.join(names)}"
                         "); run them apart or pass --ip-adapter and --image-encoder")
    adapter = wanted[0]
    path = Path(adapter["file"])
    check_recorded_file(path, adapter.get("sha256"), "model.ip_adapter", "adapter", "--ip-adapter")
    opts["ip_adapter"] = str(path)
    if opts.get("image_encoder") is not None:  # given: it overrides the recorded one
        return
    encoder = adapter.get("image_encoder")
    recorded = adapter.get("image_encoder_sha256")
    if encoder and recorded:
        now = encoder_fingerprint(encoder)
        if now is None:
            raise InputError(f"model.ip_adapter.image_encoder: the sidecar's image encoder {encoder} is not there; "
                             "give it with --image-encoder")
        if now != recorded:
            raise InputError(f"model.ip_adapter.image_encoder: {encoder} changed since the sidecar was written "
                             "(sha256 differs); pass --image-encoder to re-run with it anyway")
    opts["image_encoder"] = encoder
