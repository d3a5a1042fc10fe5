"""`dragondiff info`, `dragondiff demo`, `dragondiff bench ...`."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click
import numpy as np

from ..limits import BUNDLED_RESOLUTION, DEFAULT_MAX_RESOLUTION, DEFAULT_PRESET, DEFAULT_SEED
from ..loading import (BUNDLED_FLOW_ID, BUNDLED_ID, BUNDLED_IDS, bundled_available, bundled_folder, default_device,
                       is_bundled)
from ..presets import PRESETS
from ..validate import shown
from .options import available_threads, int_range, lora_args, model_options
from .runner import (InputError, atomic_write, check_model_options, check_output, open_model, quiet_third_party,
                     save_image)


def _model_info(model: str) -> dict:
    from ..loading import describe_model, looks_local
    from ..weights import file_hash, folder_hash

    out = {"id": model}
    if is_bundled(model):
        folder = bundled_folder(model)
        out.update(path=str(folder), available=bundled_available(model))
    else:
        folder = Path(model)
        if looks_local(model) and not folder.exists():
            raise InputError(f"--model {model}: no such file or folder (a local model is a diffusers folder or one "
                             ".safetensors file; a hub id looks like 'owner/name')")
    try:  # from the configuration files alone: which backbone runs it, its defaults
        described = describe_model(model)
    except ValueError as e:
        described, out["backbone"] = None, f"not supported: {e}"
    if described is not None:
        out.update(backbone=described["backbone"], prediction_type=described["prediction_type"],
                   default_max_resolution=described["default_max_resolution"],
                   recommended_settings=described["recommended_settings"] or None)
    elif "backbone" not in out:
        out["default_max_resolution"] = BUNDLED_RESOLUTION if is_bundled(model) else DEFAULT_MAX_RESOLUTION
    if folder.is_dir():
        out["sha256"] = folder_hash(folder)
    elif folder.is_file():
        out["sha256"] = file_hash([folder])
    else:
        out["source"] = "hub id (downloaded on first use unless HF_HUB_OFFLINE=1)"
    return out


def _auto_dtype_text(device) -> str:
    """What --dtype auto picks on this machine (`loading.auto_dtype`; it depends on the model's size on a CPU)."""
    from ..loading import AUTO_BF16_MIN_PARAMS, native_bf16

    if device.type == "cuda":
        return "auto: float16 (bfloat16 for SD3/FLUX)"
    if device.type == "cpu" and native_bf16():
        return f"auto: bfloat16 for a model of {AUTO_BF16_MIN_PARAMS // 10**6} M+ denoiser parameters (native bf16), " \
               "else float32"
    return "auto: float32"


@click.command("info", help="Versions, device, threads and model: what an edit here would use.")
@click.option("--model", default=BUNDLED_ID, show_default=True, help="the model to describe")
@click.option("--ip-adapter", default=None, type=click.Path(dir_okay=False),
              help="also describe an IP-Adapter file (variant, tokens, sha256)")
@click.option("--lora", "loras", multiple=True, metavar="FILE[:SCALE]", callback=lambda c, p, v: lora_args(v),
              help="also describe LoRA files (layout, tensors, sha256, scale); repeatable")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@click.option("--debug", is_flag=True, help="show tracebacks")
def info(model, ip_adapter, loras, as_json, debug):
    import torch

    from ..provenance import package_versions

    threads, why = available_threads()
    device = default_device()
    data = {
        "versions": package_versions(),
        "device": str(device),
        "dtype": _auto_dtype_text(device),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": threads,
        "threads_reason": why,
        "presets": sorted(PRESETS),
        "model": _model_info(model),
    }
    if ip_adapter is not None:
        data["ip_adapter"] = _adapter_info(ip_adapter)
    if loras:
        data["loras"] = [_lora_info(path, scale) for path, scale in loras]
    if as_json:
        click.echo(json.dumps(data, indent=1))
        return
    v = data["versions"]
    click.echo(f"dragondiff {v['dragondiff']} (python {v['python']}, torch {v['torch']}, diffusers {v['diffusers']}, "
               f"transformers {v['transformers']})")
    click.echo(f"device: {data['device']} ({data['cuda'] or 'CPU ' + data['cpu_capability']}), dtype {data['dtype']}")
    click.echo(f"threads: {threads} ({why}; --threads to choose)")
    click.echo(f"presets: {', '.join(data['presets'])}")
    for key, value in data["model"].items():
        click.echo(f"model {key}: {value}")
    for key, value in data.get("ip_adapter", {}).items():
        click.echo(f"ip_adapter {key}: {value}")
    for i, lora in enumerate(data.get("loras", [])):
        click.echo(f"lora {i}: " + ", ".join(f"{k} {v}" for k, v in lora.items()))


def _lora_info(path: str, scale: float) -> dict:
    """A LoRA file described from its keys (no model loaded): layout, tensors, what it targets, sha256."""
    from ..image_prompt import file_sha256
    from ..lora import lora_file, read_file

    try:
        file = lora_file(path, allow_pickle=True)
        keys = list(read_file(file)) if file.suffix == ".safetensors" else ["(pickle: not read here)"]
    except ValueError as e:
        raise InputError(f"--lora {path}: {str(e).removeprefix('lora: ')}") from e
    kohya = all(k.startswith("lora_") for k in keys)
    parts = sorted({k.split("_")[1] if kohya else k.split(".")[0] for k in keys})
    return {"file": str(file.resolve()), "layout": "kohya" if kohya else "diffusers", "tensors": len(keys),
            "parts": parts, "scale": scale, "sha256": file_sha256(file)}


def _adapter_info(path: str) -> dict:
    from ..image_prompt import VARIANTS, detect_variant, file_sha256, read_adapter_file

    try:
        variant, tokens = detect_variant(read_adapter_file(path, allow_pickle=True)[0])
    except (ValueError, FileNotFoundError) as e:
        raise InputError(f"--ip-adapter {path}: {e}") from e
    return {"file": str(Path(path).resolve()), "variant": variant, "about": VARIANTS[variant], "tokens": tokens,
            "sha256": file_sha256(Path(path))}


@click.command("convert-ip-adapter",
               help="Write a released IP-Adapter .bin (e.g. DiffEditor's ip_sd15_64.bin) as one flat .safetensors "
                    "that --ip-adapter reads without unpickling. The .bin is read with torch's weights-only "
                    "unpickler, which refuses anything but tensors.\n\nExample: dragondiff convert-ip-adapter "
                    "ip_sd15_64.bin")
@click.argument("source", type=click.Path(exists=True, dir_okay=False))
@click.argument("target", required=False, type=click.Path(dir_okay=False))
@click.option("--overwrite", is_flag=True, help="replace an existing TARGET")
@click.option("--debug", is_flag=True, help="show tracebacks")
def convert_ip_adapter(source, target, overwrite, debug):
    from ..image_prompt import convert_to_safetensors, detect_variant, read_adapter_file

    target = Path(target) if target else Path(source).with_suffix(".safetensors")
    if target.suffix != ".safetensors":
        raise InputError(f"TARGET: {target} must end in .safetensors")
    check_output(target, overwrite, "TARGET", image=False, option="TARGET")
    try:
        variant, tokens = detect_variant(read_adapter_file(source, allow_pickle=True)[0])
        atomic_write(target, lambda tmp: convert_to_safetensors(source, tmp))  # missing folders made, as -o does
    except (ValueError, FileNotFoundError) as e:
        raise InputError(f"SOURCE {source}: {e}") from e
    click.echo(f"wrote {target} ({variant}, {tokens} tokens)")


def demo_case():
    """The demo's example: a bundled-style scene with one object and room to move it."""
    from ..shapes.scenes import demo_scene

    scene = demo_scene()
    return scene, scene.masks[0], (44, 24)


def _free_folder(base: str, names) -> Path:
    """The first of base, base-2, base-3, ... that holds none of the names (a re-run never overwrites)."""
    k = 1
    while any((Path(base if k == 1 else f"{base}-{k}") / n).exists() for n in names):
        k += 1
    return Path(base if k == 1 else f"{base}-{k}")


@click.command("demo", help="Move an object in a bundled example scene with a bundled model; writes input.png, "
                            "result.png and side_by_side.png.")
@click.option("--model", type=click.Choice(BUNDLED_IDS), default=BUNDLED_ID, show_default=True,
              help="the bundled UNet model, or the bundled flow transformer")
@click.option("--out", default=None,
              help="output folder  [default: ./dragondiff-demo, or dragondiff-demo-2, -3, ... if that one is taken]")
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default=DEFAULT_PRESET, show_default=True)
@click.option("--seed", type=int_range("seed"), default=DEFAULT_SEED, show_default=True)
@click.option("--threads", type=click.IntRange(1, 512), default=None,
              help="CPU threads  [default: the cores not busy with other work]")
@click.option("--tiny", is_flag=True, help="use a tiny random model (smoke test of the pipeline)")
@click.option("--overwrite", is_flag=True, help="replace an earlier demo's files")
@click.option("--debug", is_flag=True, help="show tracebacks")
def demo(model, out, preset, seed, threads, tiny, overwrite, debug):
    import torch

    from ..output import draw_arrow, side_by_side
    from ..pipeline import DragonPipeline
    from ..shapes import model as shapes_model

    names = ("input.png", "result.png", "side_by_side.png")
    folder = Path(out) if out else _free_folder("dragondiff-demo", names)
    for name in names:
        check_output(folder / name, overwrite, "--out", option="--out")
    t0 = time.perf_counter()
    torch.set_num_threads(threads or available_threads()[0])
    quiet_third_party()
    if model == BUNDLED_FLOW_ID and not tiny and not bundled_available(model):
        raise InputError(f"--model {model}: its weights are not in this installation")
    if tiny or not shapes_model.is_available():
        from ..tiny import build_tiny_pipeline

        click.echo("smoke demo: tiny random-weight model (the output is noise, the pipeline is real)", err=True)
        pipe = build_tiny_pipeline()
    else:
        pipe = DragonPipeline.bundled(model)
    scene, mask, offset = demo_case()
    result = pipe.move(scene.image, mask, offset=offset, prompt=scene.caption, preset=preset,
                       max_resolution=BUNDLED_RESOLUTION, seed=seed)
    ys, xs = np.nonzero(mask)
    start = (float(xs.mean()), float(ys.mean()))
    end = (start[0] + offset[0], start[1] + offset[1])
    save_image(result.input_image, folder / names[0])
    save_image(result.image, folder / names[1])
    save_image(side_by_side(draw_arrow(result.input_image, start, end), result.image), folder / names[2])
    summary = {"model": "tiny" if tiny else model, "task": "move", "preset": preset, "offset": offset,
               "caption": scene.caption, "threads": torch.get_num_threads(), "edit_seconds": round(result.seconds, 1),
               "total_seconds": round(time.perf_counter() - t0, 1), "files": [str(folder / n) for n in names]}
    click.echo(json.dumps(summary, indent=1))


BENCHMARKS = ("speed", "shapes", "memory", "dragbench")


@click.command("bench", context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                          "help_option_names": []},
               help="Benchmarks: `bench speed` (seconds, passes, memory per edit), `bench shapes` (edit quality "
                    "on the bundled model), `bench memory` (GPU memory of one edit of a full-size SD1.5/SD2.1/SDXL, "
                    "estimated on fake tensors), `bench dragbench DIR --outputs OUT` (DragBench's Mean Distance and "
                    "Image Fidelity, editing what is missing first). `dragondiff bench speed --help` lists each one's "
                    "options.")
@click.argument("which", metavar="{speed|shapes|memory|dragbench}", required=False)
@click.argument("rest", nargs=-1, type=click.UNPROCESSED)
def bench(which, rest):
    # --help is the benchmark's own option after its name (`bench speed --help`), so it is not click's here
    if which == "--debug":  # `bench --debug speed ...`: cli.main reads --debug; the benchmark is the next word
        which, rest = (rest[0], rest[1:]) if rest else (None, rest)
    if which in (None, "-h", "--help"):
        click.echo(click.get_current_context().get_help())
        return
    if which not in BENCHMARKS:
        raise click.BadParameter(f"{shown(which)} is not one of {', '.join(BENCHMARKS)}",
                                 param_hint="'{speed|shapes|memory|dragbench}'")
    if which == "speed":
        from ..bench.speed import main as run
    elif which == "memory":
        from ..bench.memory import main as run
    elif which == "dragbench":
        from .bench_dragbench import main as run
    else:
        from ..bench.shapes import main as run
    if which != "dragbench":  # --debug is every command's (cli.main reads it); these parsers have no option for it
        rest = tuple(arg for arg in rest if arg != "--debug")
    code = run(list(rest)) or 0
    if code:
        raise SystemExit(code)


def check_port(host: str, port: int) -> None:
    """The web UI can listen on host:port (bound as the server will bind it, then released)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise InputError(f"--host {host}: cannot resolve it ({e})") from e
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does: a closed port is free
        try:
            s.bind(address)
        except OSError as e:
            raise InputError(f"--port {port}: {host}:{port} is in use or not available ({e.strerror or e}); "
                             "choose another --port") from e


@click.command("ui", help="Start the web UI (needs the [ui] extra: pip install 'dragondiff[ui]'): one tab per task, "
                          "on http://HOST:PORT.")
@click.option("--host", default="127.0.0.1", show_default=True, help="address to listen on")
@click.option("--port", type=click.IntRange(1, 65535), default=7860, show_default=True)
@click.option("--share", is_flag=True, help="also open a public Gradio share link (off by default)")
@click.option("--steps", type=int_range("num_inference_steps"), default=PRESETS[DEFAULT_PRESET].steps,
              show_default=True, help="the DDIM steps the page starts with")
@model_options
@click.option("--debug", is_flag=True, help="show tracebacks")
def ui(host, port, share, steps, debug, **opts):
    try:
        from ..ui.app import launch
    except ImportError as e:
        raise InputError(f"the web UI needs Gradio: pip install 'dragondiff[ui]' ({e})") from e
    check_model_options(opts)  # before the model loads: what the load would refuse only after it
    check_port(host, port)
    loaded = open_model(opts)
    click.echo(f"dragondiff ui: model {opts['model']}, {loaded.threads} thread(s), http://{host}:{port}", err=True)
    launch(loaded.pipe, host=host, port=port, share=share, steps=steps)
