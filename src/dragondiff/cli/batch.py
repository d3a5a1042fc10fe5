"""`dragondiff batch DIR -o OUT`: every DragBench sample and spec file under DIR, into a mirror tree under OUT."""

from __future__ import annotations

import traceback
from dataclasses import replace
from pathlib import Path

import click
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from .. import dragbench
from ..provenance import is_sidecar
from .edits import SPEC_FORMS, is_edit_spec, load_spec_data, read_spec_file
from . import signals
from .options import edit_options, model_options, ray_options, run_options, spec_fields
from .runner import (InputError, Job, check_inputs, check_jobs, check_model_options, execute, open_model, output_name,
                     with_shared_inversions, write_problem)

SPEC_SUFFIXES = (".json", ".yaml", ".yml")
MASK_NAME = "editable_mask.png"  # a DragBench mask written beside the output, so that the sidecar can re-run it


def _spec_file_kind(path: Path) -> str | None:
    """"spec" for a file meant as edits (or one that cannot be parsed: its error is reported with the samples),
    "sidecar" for one written by dragondiff, None for any other JSON/YAML (a package.json, a config)."""
    try:
        data = load_spec_data(path)
    except InputError:
        return "spec"
    if is_sidecar(data):
        return "sidecar"
    return "spec" if is_edit_spec(data) else None


def collect(root: Path, out: Path) -> tuple[list[tuple[str, Path]], list[Path], int]:
    """(kind, path) for every DragBench sample folder and spec file under root, outside the output tree; the
    JSON/YAML files there that are not edits (skipped); and how many samples and spec files lie inside the output
    tree (left out: it holds results, not inputs)."""
    out = out.resolve()
    inside_out = lambda p: out == p.resolve() or out in p.resolve().parents  # noqa: E731
    found = dragbench.find_samples(root)
    items = [("dragbench", p) for p in found if not inside_out(p)]
    left_out = len(found) - len(items)
    samples = set(found)
    others = []
    for p in sorted(root.rglob("*")):
        if p.suffix.lower() in SPEC_SUFFIXES and p.is_file() and p.parent not in samples:
            kind = _spec_file_kind(p)
            if kind == "spec" and inside_out(p):
                left_out += 1
            elif kind == "spec":
                items.append(("spec", p))
            elif kind is None and not inside_out(p):
                others.append(p)
    return sorted(items, key=lambda item: str(item[1])), others, left_out


def _dragbench_job(folder: Path, root: Path, out: Path, fields: dict) -> tuple[Job, np.ndarray]:
    """The sample's job: its mask is written beside the result, with it (the spec names it there, so that the
    sidecar re-runs it); returns the mask too, for checking the inputs before anything is written."""
    sample = dragbench.read_sample(folder)
    target = out / folder.relative_to(root)
    mask_file = target / MASK_NAME
    spec = sample.spec(**{k: v for k, v in fields.items() if v is not None and k != "prompt"})
    mask_image = Image.fromarray(sample.mask.astype(np.uint8) * 255)
    job = Job(replace(spec, mask=str(mask_file)), target / dragbench.OUTPUT_NAME, str(folder.relative_to(root)),
              writes=[(mask_file, mask_image)])
    return job, sample.mask


def _spec_file_jobs(path: Path, root: Path, out: Path) -> list[Job]:
    specs, _ = read_spec_file(path)
    rel = path.relative_to(root)
    jobs = []
    for k, (label, spec) in enumerate(specs):
        name = output_name(rel.stem, k, len(specs))
        jobs.append(Job(spec, out / rel.parent / name, str(rel) if len(specs) == 1 else f"{rel}[{k}]",
                        inputs=[path]))
    return jobs


def _check_output_folder(root: Path, out: Path) -> None:
    """-o is a folder outside DIR (or inside it: then it is left out of the search), and can be written (tried)."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--output: {out} exists and is not a folder")
    if out.resolve() == root.resolve() or out.resolve() in root.resolve().parents:
        what = "DIR itself" if out.resolve() == root.resolve() else f"a folder holding DIR ({root})"
        raise InputError(f"--output: {out} is {what}; the results' tree must not hold the samples: give a folder "
                         f"outside DIR, e.g. -o {root.resolve().name}-results")
    problem = write_problem(out)
    if problem:
        raise InputError(f"--output: cannot write {out} ({problem})")


def _reason(e: BaseException) -> str:
    return e.format_message() if isinstance(e, click.ClickException) else str(e)


@click.command("batch", no_args_is_help=True,
               help="Edit every DragBench sample (<category>/<sample>/original_image.png + meta_data.pkl) and every "
                    "spec file under DIR, writing a mirror tree under --output (dragged_image.png and a sidecar per "
                    "sample). The model loads once; finished samples are skipped (resume); a failing sample is "
                    "reported at the end and the rest go on. Existing files without dragondiff's sidecar are not "
                    "replaced unless --overwrite is given. The edit options apply to DragBench samples (their "
                    "prompt comes from meta_data.pkl); spec files run as written; other JSON/YAML files are "
                    "skipped with a note.\n\n"
                    "Example: dragondiff batch DragBench -o results/")
@click.argument("root", metavar="DIR", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--output", default=None, type=click.Path(path_type=Path),
              help="folder for the results, a mirror tree of DIR (per sample dragged_image.png, its sidecar and "
                   "editable_mask.png; per spec file <spec>.png and its sidecar); not DIR itself nor a folder "
                   "holding it  [required]")
@click.option("--dry-run", is_flag=True, help="only read and validate every sample, spec and output")
@ray_options
@model_options
@run_options
@edit_options
def batch(root, output, dry_run, ray_address, ray_workers, ray_gpus_per_worker, ray_cpus_per_worker, ray_retries,
          **opts):
    if output is None:
        raise InputError("--output: give the folder for the results (-o DIR)")
    ray_opts = None
    if ray_address is not None or any(v is not None for v in (ray_workers, ray_gpus_per_worker, ray_cpus_per_worker)):
        from .ray_batch import RayOptions

        ray_opts = RayOptions.checked(ray_address, ray_workers, ray_gpus_per_worker, ray_cpus_per_worker, ray_retries,
                                      root, opts)
    out = output
    _check_output_folder(root, out)
    items, others, left_out = collect(root, out)
    for path in others:
        click.echo(f"note: skipped {path.relative_to(root)}: not an edit spec (expected {SPEC_FORMS})", err=True)
    if left_out:  # a mistyped -o (DIR/<category>) would otherwise leave that category out without a word
        click.echo(f"note: left out {left_out} sample{'s' * (left_out != 1)} or spec file{'s' * (left_out != 1)} "
                   f"under --output {out}: the results' tree is not searched for edits", err=True)
    if not items:
        raise InputError(f"DIR: no DragBench sample (original_image.png + meta_data.pkl) or spec file under {root}")
    fields = spec_fields(opts)
    quiet = opts["quiet"]
    failures: list[tuple[str, str]] = []
    jobs: list[Job] = []
    for kind, path in items:  # read and validate everything first: bad samples are listed, not fatal
        label = str(path.relative_to(root))
        try:
            if kind == "dragbench":
                job, mask = _dragbench_job(path, root, out, fields)
                check_inputs(replace(job.spec, mask=mask), job.label)
                new = [job]
            else:
                new = _spec_file_jobs(path, root, out)
                for job in new:
                    check_inputs(job.spec, job.label)
        except (InputError, ValueError, TypeError, FileNotFoundError) as e:
            failures.append((label, _reason(e)))
            continue
        jobs.extend(new)
    try:  # every output against every other and against what is there, before any model work
        pending = check_jobs(jobs, opts["overwrite"], opts["preview"], resume=True)
    except InputError:
        for label, reason in failures:
            click.echo(f"  also failed {label}: {reason}", err=True)
        raise
    check_model_options(opts, pending)  # device, dtype, model, the image prompt: before the model loads
    skipped = len(jobs) - len(pending)
    done = failed_runs = 0
    if dry_run:
        for job in pending:
            click.echo(f"{job.label}: valid -> {job.output}")
        done = len(pending)
    elif pending and ray_opts is not None:
        from .ray_batch import run_on_ray

        done, ray_failures = run_on_ray(pending, opts, ray_opts)
        failed_runs = len(ray_failures)
        failures.extend(ray_failures)
    elif pending:
        try:
            loaded = open_model(opts)
            edits = with_shared_inversions(loaded.pipe, pending)  # several edits of one image: one inversion
            for job, inversion in tqdm(edits, total=len(pending), desc="dragondiff batch", unit="edit", disable=quiet):
                signals.check()  # a signal whose exception was dropped (in a finalizer) stops the batch here
                try:
                    execute(loaded.pipe, job, working_size=opts["working_size"], preview=opts["preview"],
                            quiet=True, threads=loaded.threads, load_seconds=loaded.seconds, inversion=inversion)
                    done += 1
                except KeyboardInterrupt:
                    raise
                except Exception as e:  # noqa: BLE001 (one failing sample must not stop the batch)
                    if opts["debug"]:
                        traceback.print_exc()
                    failed_runs += 1
                    failures.append((job.label, _reason(e) if isinstance(e, click.ClickException)
                                     else f"{type(e).__name__}: {e}"))
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (cli.main): the edit in progress left no file
            left = len(pending) - done - failed_runs
            click.echo(f"batch interrupted: {done} edited, {left} left, {skipped} already done (skipped), "
                       f"{len(failures)} failed; the same command resumes", err=True)
            for label, reason in failures:
                click.echo(f"  failed {label}: {reason}", err=True)
            raise
    if not quiet or failures:
        verb = "valid" if dry_run else "edited"
        click.echo(f"batch: {done} {verb}, {skipped} already done (skipped), {len(failures)} failed", err=bool(failures))
        for label, reason in failures:
            click.echo(f"  failed {label}: {reason}", err=True)
    if failures:
        raise SystemExit(1)
