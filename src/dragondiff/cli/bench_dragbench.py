"""`dragondiff bench dragbench DIR --outputs OUT`: edit every DragBench sample that has no result yet (the batch,
locally or on Ray), then DragBench's Mean Distance and Image Fidelity per sample, per category and overall, as
JSON and a Markdown table beside published numbers."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .. import dragbench
from ..bench.dift import DEFAULT_DIFT_MODEL, DIFT_ENSEMBLE, DIFT_SEED, DIFT_TIMESTEP, DIFT_UP_BLOCK
from .batch import batch
from .options import edit_options, model_options, ray_options, run_options
from .runner import InputError, Job, atomic_write, check_output, quiet_third_party, save_json

JSON_NAME = "dragbench-eval.json"
MD_NAME = "dragbench-eval.md"


def _check_dift_source(source: str) -> None:
    """The DIFT model can be found before any editing: a local diffusers folder with its five parts, or a hub id
    (offline: already in the hub cache)."""
    import os

    from ..loading import looks_local

    parts = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
    if looks_local(source) or Path(source).exists():
        missing = [p for p in parts if not (Path(source) / p).is_dir()]
        if missing:
            raise InputError(f"--dift-model {source}: not a diffusers Stable Diffusion folder (missing "
                             f"{', '.join(missing)}); give SD 2.1's folder or hub id")
        return
    if os.environ.get("HF_HUB_OFFLINE"):
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(source, "unet/config.json"), str):
            raise InputError(f"--dift-model {source}: not in the hub cache and HF_HUB_OFFLINE is set; give a local "
                             "folder (SD 2.1 in diffusers layout) or allow the download")


def _result_states(root: Path, outputs: Path) -> tuple[list[str], list[str]]:
    """(samples without a result, samples whose result is not dragondiff's: no sidecar beside it)."""
    missing, foreign = [], []
    for folder in dragbench.find_samples(root):
        rel = folder.relative_to(root)
        job = Job(spec=None, output=outputs / rel / dragbench.OUTPUT_NAME, label=str(rel))
        if not job.output.is_file():
            missing.append(str(rel))
        elif not job.written_by_us():
            foreign.append(str(rel))
    return missing, foreign


@click.command("dragbench", no_args_is_help=True, context_settings={"help_option_names": ["-h", "--help"]},
               help="DragBench's Mean Distance (DIFT point matching) and Image Fidelity (1 - LPIPS alex) of the "
                    "edits in OUT (OUT/<category>/<sample>/dragged_image.png) against the samples in DIR, per "
                    "sample, per category and overall: OUT/dragbench-eval.json and .md (the published tables' "
                    "layout, beside published numbers). Samples without a result are edited first with `dragondiff "
                    "batch` and the edit options given here (locally, or on Ray with --ray); --no-edit evaluates "
                    "what is there and lists the rest. Real numbers need real weights: SD 2.1 for DIFT "
                    "(--dift-model) and LPIPS' AlexNet (--lpips); none are bundled.\n\n"
                    "Example: dragondiff bench dragbench DragBench --outputs results/ --model "
                    "stable-diffusion-v1-5/stable-diffusion-v1-5 --lpips weights/lpips")
@click.argument("root", metavar="DIR", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--outputs", "outputs", required=True, type=click.Path(path_type=Path),
              help="the edits' folder, a mirror tree of DIR (what `dragondiff batch DIR -o OUT` writes)")
@click.option("--no-edit", is_flag=True, help="evaluate what OUT holds; edit nothing (missing samples are listed)")
@click.option("--method", default=None, help="this run's row label  [default: dragondiff <preset> (<model>)]")
@click.option("--dift-model", default=DEFAULT_DIFT_MODEL, show_default=True,
              help="Stable Diffusion 2.1 in diffusers layout (folder or hub id), whose UNet gives the DIFT features "
                   "(DragDiffusion's evaluation: stabilityai/stable-diffusion-2-1, removed from the hub; this "
                   "default mirrors it)")
@click.option("--dift-timestep", type=click.IntRange(0, 999), default=DIFT_TIMESTEP, show_default=True)
@click.option("--dift-layer", type=click.IntRange(0, 3), default=DIFT_UP_BLOCK, show_default=True,
              help="the UNet up block whose output is the feature map")
@click.option("--dift-ensemble", type=click.IntRange(1, 64), default=DIFT_ENSEMBLE, show_default=True,
              help="noised copies averaged per image")
@click.option("--dift-seed", type=int, default=DIFT_SEED, show_default=True, help="noise seed, per image")
@click.option("--lpips", "lpips_path", default=None, type=click.Path(exists=True, path_type=Path),
              help="LPIPS(alex) weights: a folder with torchvision's alexnet-owt-7be5be79.pth and the lpips "
                   "package's v0.1 alex.pth, or one .safetensors  [default: torch's hub cache and an installed "
                   "lpips package]")
@click.option("--eval-device", default=None, help="device for the metrics  [default: cuda if available, else cpu]")
@ray_options
@model_options
@run_options
@edit_options
@click.pass_context
def dragbench_command(ctx, root, outputs, no_edit, method, dift_model, dift_timestep, dift_layer, dift_ensemble,
                     dift_seed, lpips_path, eval_device, **opts):
    import torch

    from ..bench import dragbench_eval as ev
    from ..bench.dift import DiftFeaturizer
    from ..bench.lpips_alex import load_lpips
    from ..loading import default_device

    if not dragbench.find_samples(root):
        raise InputError(f"DIR: no DragBench sample (<category>/<sample>/original_image.png + meta_data.pkl) under "
                         f"{root}")
    if outputs.exists() and not outputs.is_dir():
        raise InputError(f"--outputs: {outputs} exists and is not a folder")
    for name in (JSON_NAME, MD_NAME):  # the report is ours to replace; anything else there is not
        target = outputs / name
        if target.exists():
            try:
                ours = name != JSON_NAME or json.loads(target.read_text()).get("benchmark") == "DragBench"
            except (OSError, ValueError):
                ours = False
            if not ours:
                check_output(target, opts["overwrite"], "--outputs report", image=False)
    _check_dift_source(dift_model)
    device = torch.device(eval_device) if eval_device else default_device()
    try:  # the LPIPS weights before any editing: a missing file should not cost a whole batch
        lpips_model = load_lpips(lpips_path, device)
    except (ValueError, FileNotFoundError) as e:
        raise InputError(str(e)) from e
    missing, foreign = _result_states(root, outputs)
    batch_code = 0
    if missing and not no_edit:
        if foreign:
            raise InputError(f"--outputs: {len(foreign)} results there were not written by dragondiff (no sidecar, "
                             f"e.g. {foreign[0]}) and {len(missing)} samples have none; pass --no-edit to evaluate "
                             "what is there, or give another --outputs to edit them with dragondiff")
        click.echo(f"bench dragbench: editing {len(missing)} samples without a result (dragondiff batch)", err=True)
        try:
            ctx.invoke(batch, root=root, output=outputs, dry_run=False, **opts)
        except SystemExit as e:  # failed samples: listed by the batch; they are listed again as not evaluated
            batch_code = e.code if isinstance(e.code, int) else 1
    quiet_third_party()
    source = dift_model
    try:
        dift = DiftFeaturizer.from_pretrained(source, device=device, local_files_only=Path(source).exists())
    except (OSError, ValueError) as e:
        raise InputError(f"--dift-model {source}: cannot load it ({e})") from e
    settings = ev.Settings(dift_model=str(source), timestep=dift_timestep, up_block=dift_layer,
                           ensemble=dift_ensemble, seed=dift_seed, lpips=str(lpips_path or "default files"))
    from tqdm.auto import tqdm

    rows = ev.evaluate(root, outputs, dift=dift, lpips_model=lpips_model, settings=settings,
                       progress=lambda xs: tqdm(xs, desc="dragbench eval", unit="sample", disable=opts["quiet"]))
    label = method or f"dragondiff {opts['preset']} ({opts['model']})"
    data = ev.report(rows, root=root, outputs=outputs, method=label, settings=settings,
                     extra={"eval_device": str(device)})
    text = ev.markdown(data)
    save_json(data, outputs / JSON_NAME)
    atomic_write(outputs / MD_NAME, lambda tmp: tmp.write_text(text))
    click.echo(text)
    click.echo(f"wrote {outputs / JSON_NAME} and {outputs / MD_NAME}", err=True)
    if data["not_evaluated"]:
        click.echo(f"bench dragbench: {len(data['not_evaluated'])} samples not evaluated (listed in the report)",
                   err=True)
        raise SystemExit(1)
    if batch_code:
        raise SystemExit(batch_code)


def main(argv) -> int:
    """`dragondiff bench dragbench ...` from the bench dispatcher."""
    dragbench_command.main(args=list(argv), prog_name="dragondiff bench dragbench", standalone_mode=False)
    return 0
