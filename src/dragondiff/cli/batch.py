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
from .edits import read_spec_file
from .options import edit_options, model_options, run_options, spec_fields
from .runner import InputError, Job, check_inputs, execute, open_model, output_name

SPEC_SUFFIXES = (".json", ".yaml", ".yml")
MASK_NAME = "editable_mask.png"  # a DragBench mask written beside the output, so that the sidecar can re-run it


def _is_sidecar_file(path: Path) -> bool:
    import json

    try:
        return is_sidecar(json.loads(path.read_text())) if path.suffix == ".json" else False
    except (OSError, ValueError):
        return False


def collect(root: Path, out: Path) -> list[tuple[str, Path]]:
    """(kind, path) for every DragBench sample folder and spec file under root, outside the output tree."""
    out = out.resolve()
    inside_out = lambda p: out == p.resolve() or out in p.resolve().parents  # noqa: E731
    items = [("dragbench", p) for p in dragbench.find_samples(root) if not inside_out(p)]
    samples = {p for _, p in items}
    for p in sorted(root.rglob("*")):
        if (p.suffix.lower() in SPEC_SUFFIXES and p.is_file() and not inside_out(p) and p.parent not in samples
                and not _is_sidecar_file(p)):
            items.append(("spec", p))
    return sorted(items, key=lambda item: str(item[1]))


def _dragbench_job(folder: Path, root: Path, out: Path, fields: dict) -> tuple[Job, np.ndarray]:
    sample = dragbench.read_sample(folder)
    target = out / folder.relative_to(root)
    mask_file = target / MASK_NAME
    spec = sample.spec(**{k: v for k, v in fields.items() if v is not None and k != "prompt"})
    spec = replace(spec, mask=str(mask_file))  # written there just before the edit
    return Job(spec, target / dragbench.OUTPUT_NAME, str(folder.relative_to(root))), sample.mask


def _spec_file_jobs(path: Path, root: Path, out: Path) -> list[Job]:
    specs, _ = read_spec_file(path)
    rel = path.relative_to(root)
    jobs = []
    for k, (label, spec) in enumerate(specs):
        name = output_name(rel.stem, k, len(specs))
        jobs.append(Job(spec, out / rel.parent / name, str(rel) if len(specs) == 1 else f"{rel}[{k}]",
                        inputs=[path]))
    return jobs


def _finished(job: Job) -> bool:
    return job.output.exists() and job.sidecar.exists()


@click.command("batch", no_args_is_help=True,
               help="Edit every DragBench sample (<category>/<sample>/original_image.png + meta_data.pkl) and every "
                    "spec file under DIR, writing a mirror tree under --output (dragged_image.png and a sidecar per "
                    "sample). The model loads once; finished samples are skipped (resume); a failing sample is "
                    "reported at the end and the rest go on. The edit options apply to DragBench samples (their "
                    "prompt comes from meta_data.pkl); spec files run as written.\n\n"
                    "Example: dragondiff batch DragBench -o results/")
@click.argument("root", metavar="DIR", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--dry-run", is_flag=True, help="only read and validate every sample and spec")
@model_options
@run_options
@edit_options
def batch(root, dry_run, **opts):
    if opts["output"] is None:
        raise InputError("--output: give the folder for the results (-o DIR)")
    out = Path(opts["output"])
    if out.exists() and not out.is_dir():
        raise InputError(f"--output: {out} exists and is not a folder")
    items = collect(root, out)
    if not items:
        raise InputError(f"DIR: no DragBench sample (original_image.png + meta_data.pkl) or spec file under {root}")
    fields = spec_fields(opts)
    quiet = opts["quiet"]
    failures: list[tuple[str, str]] = []
    pending: list[tuple[Job, np.ndarray | None]] = []
    skipped = failed_runs = 0
    for kind, path in items:  # read and validate everything first: bad samples are listed, not fatal
        label = str(path.relative_to(root))
        try:
            if kind == "dragbench":
                job, mask = _dragbench_job(path, root, out, fields)
                check_inputs(replace(job.spec, mask=mask), job.label)
                jobs = [(job, mask)]
            else:
                jobs = [(job, None) for job in _spec_file_jobs(path, root, out)]
                for job, _ in jobs:
                    check_inputs(job.spec, job.label)
        except (InputError, ValueError, TypeError, FileNotFoundError) as e:
            failures.append((label, e.format_message() if isinstance(e, click.ClickException) else str(e)))
            continue
        for job, mask in jobs:
            if _finished(job) and not opts["overwrite"]:
                skipped += 1
            else:
                pending.append((job, mask))
    if dry_run:
        for job, _ in pending:
            click.echo(f"{job.label}: valid -> {job.output}")
    elif pending:
        loaded = open_model(opts)
        for job, mask in tqdm(pending, desc="dragondiff batch", unit="edit", disable=quiet):
            try:
                if mask is not None:
                    job.output.parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(mask.astype(np.uint8) * 255).save(job.output.parent / MASK_NAME)
                execute(loaded.pipe, job, working_size=opts["working_size"], preview=opts["preview"], quiet=True,
                        threads=loaded.threads, load_seconds=loaded.seconds)
            except KeyboardInterrupt:
                raise
            except Exception as e:  # noqa: BLE001 (one failing sample must not stop the batch)
                if opts["debug"]:
                    traceback.print_exc()
                failed_runs += 1
                failures.append((job.label, f"{type(e).__name__}: {e}"
                                 if not isinstance(e, click.ClickException) else e.format_message()))
    done = len(pending) - failed_runs
    if not quiet or failures:
        verb = "valid" if dry_run else "edited"
        click.echo(f"batch: {done} {verb}, {skipped} already done (skipped), {len(failures)} failed", err=bool(failures))
        for label, reason in failures:
            click.echo(f"  failed {label}: {reason}", err=True)
    if failures:
        raise SystemExit(1)
