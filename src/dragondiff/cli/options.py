"""Options shared by the subcommands, the task options derived from each task's Params, value parsers (points,
offsets) and the thread count. Ranges and defaults come from `dragondiff.limits` and the task registry."""

from __future__ import annotations

import os
import re

import click

from ..limits import BUNDLED_RESOLUTION, DEFAULT_MAX_RESOLUTION, DEFAULT_PRESET, DEFAULT_SEED, LIMITS
from ..loading import BUNDLED_ID
from ..presets import PRESETS
from ..tasks import TASKS
from ..tasks import params as P

_NUMBER = r"\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*"  # 10, +10, -4.5, .5, 5.
_PAIR = re.compile(rf"^{_NUMBER},{_NUMBER}$")


def parse_xy(text: str, what: str) -> tuple[float, float]:
    m = _PAIR.match(text)
    if not m:
        raise click.BadParameter(f"{text!r}: expected {what} as two numbers 'x,y' (e.g. 40,-12)")
    return float(m.group(1)), float(m.group(2))


class OffsetType(click.ParamType):
    name = "DX,DY"

    def convert(self, value, param, ctx):
        return value if isinstance(value, tuple) else parse_xy(value, "an offset")


class PairsType(click.ParamType):
    """'hx,hy:tx,ty' (handle:target); several pairs separated by spaces or ';' in one value."""

    name = "X,Y:X,Y"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        pairs = []
        for chunk in re.split(r"[;\s]+", value.strip()):
            if not chunk:
                continue
            parts = chunk.split(":")
            if len(parts) != 2:
                self.fail(f"{chunk!r}: expected a handle:target pair 'hx,hy:tx,ty' (e.g. 40,60:70,60)", param, ctx)
            try:
                pairs.append((parse_xy(parts[0], "a handle point"), parse_xy(parts[1], "a target point")))
            except click.BadParameter as e:
                self.fail(str(e), param, ctx)
        if not pairs:
            self.fail("no handle:target pair given", param, ctx)
        return tuple(pairs)


OFFSET = OffsetType()
PAIRS = PairsType()


def lora_args(values) -> tuple[tuple[str, float], ...]:
    """--lora FILE[:SCALE] values as (file, scale), the file checked to exist (usage error naming --lora)."""
    from ..lora import lora_file, parse_lora_arg

    out = []
    for text in values:
        try:
            path, scale = parse_lora_arg(text)
            lora_file(path, allow_pickle=True)  # exists, one weights file; a pickle is refused when loaded
        except ValueError as e:
            raise click.BadParameter(str(e).removeprefix("lora: "), param_hint="'--lora'") from e
        out.append((path, scale))
    return tuple(out)


def option_group(*options):
    """One decorator applying several click options, listed in the order --help shows them."""

    def apply(f):
        for option in reversed(options):
            f = option(f)
        return f

    return apply


def available_threads() -> tuple[int, str]:
    """Intra-op threads to use and why: the cores this process may run on, minus those other processes keep busy
    (torch's default takes every core, and with one of two cores busy an edit ran 50x slower in OpenMP barriers)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        busy = int(os.getloadavg()[0] + 0.5)
    except OSError:
        busy = 0
    threads = max(1, min(cores, cores - busy))
    return threads, f"{cores} cores available, load {busy}: {threads} thread{'s' * (threads != 1)}"


def _settings_help(key: str) -> str:
    official = ", ".join(f"{task} {info.settings[key]:g}" for task, info in TASKS.items())
    return f"default: the model's recommended value if it ships one, else the official demo's ({official})"


def _official_help(key: str) -> str:
    official = ", ".join(f"{task} {info.settings[key]:g}" for task, info in TASKS.items())
    return f"[default: the official demo's: {official}]"


def int_range(name: str) -> click.IntRange:
    return click.IntRange(int(LIMITS[name].low), int(LIMITS[name].high))


def float_range(name: str) -> click.FloatRange:
    return click.FloatRange(LIMITS[name].low, LIMITS[name].high)


PRESET_HELP = "; ".join(f"{name}: {doc}" for name, doc in (
    ("official", "the demo's D+ schedule (50 steps)"),
    ("fast", f"ours: {PRESETS['fast'].steps} steps, 16 of them guided, validated on the shapes benchmark"),
    ("paper", "the paper's schedule (50 steps)"),
))
STEPS_DEFAULT = ", ".join(f"{name} {preset.steps}" for name, preset in sorted(PRESETS.items()))


# --model, --config, --device, --dtype, --threads.
model_options = option_group(
    click.option("--model", default=BUNDLED_ID, show_default=True,
                 help="a bundled shapes model (dragondiff:shapes, or the flow transformer dragondiff:shapes-flow), "
                      "a diffusers folder, a hub id, or one .safetensors file (with --config)"),
    click.option("--config", default=None,
                 help="diffusers folder or hub id with the component configs for a single-file --model"),
    click.option("--device", default=None, help="cpu, cuda, cuda:1, mps  [default: cuda if available, else cpu]"),
    click.option("--dtype", default=None,
                 help="auto, float32, float16, bfloat16  [default: auto: float16 on CUDA (bfloat16 for SD3/FLUX); "
                      "bfloat16 for an SD-size model on a CPU with native bf16 (avx512_bf16/AMX); else float32]"),
    click.option("--threads", type=click.IntRange(1, 512), default=None,
                 help="CPU threads  [default: the cores not busy with other work; see `dragondiff info`]"),
    click.option("--vae-tiling", is_flag=True,
                 help="encode/decode in overlapping 512 px tiles: the VAE's memory of one tile for large images "
                      "(seams are blended, so pixels differ slightly)"),
    click.option("--ip-adapter", default=None, type=click.Path(dir_okay=False),
                 help="IP-Adapter weights for the image prompt (.safetensors; DiffEditor's ip_sd15_64, IP-Adapter "
                      "Plus or IP-Adapter for SD1.5); a released .bin: convert it first with `dragondiff "
                      "convert-ip-adapter`. The official and fast presets then use the image prompt"),
    click.option("--image-encoder", default=None,
                 help="the CLIP image encoder of --ip-adapter: a CLIPVisionModelWithProjection folder or hub id"),
    click.option("--lora", "loras", multiple=True, metavar="FILE[:SCALE]", callback=lambda c, p, v: lora_args(v),
                 help="a LoRA on the model (.safetensors, diffusers/peft or kohya/civitai layout; a file or a "
                      "folder), weighted by SCALE (default 1); repeat for several"),
    click.option("--fuse-lora", is_flag=True,
                 help="add the --lora deltas into the weights: edits cost what they cost without LoRAs; results "
                      "within rounding of the unfused run"),
    click.option("--compile", "compile_unet", is_flag=True,
                 help="run the UNet's transformer blocks compiled (torch.compile, inductor): the first edit at a "
                      "size compiles (minutes on a CPU; cached across runs), later ones are faster; results within "
                      "a few grey levels of the default eager run"),
    click.option("--channels-last", is_flag=True,
                 help="channels-last convolutions in the UNet and VAE: on a CPU about 10-19 % faster per pass at "
                      "512 px; outputs within about 1 grey level of the default layout, which keeps earlier spec "
                      "files and sidecars rerunning bit for bit"),
    click.option("--gradient-checkpointing", is_flag=True,
                 help="recompute the UNet's or transformer's activations in the guidance backward instead of "
                      "keeping them: less GPU memory for the guided steps (`dragondiff bench memory "
                      "--gradient-checkpointing`), about one more feature pass per guided step; same results"),
)


# Output and behaviour options of every command that writes edits.
run_options = option_group(
    click.option("--overwrite", is_flag=True, help="replace existing output files"),
    click.option("--working-size", is_flag=True,
                 help="save the result at the working size instead of compositing it into the input "
                      "at the input's size"),
    click.option("--preview", is_flag=True,
                 help="also save <output>-preview.png: input with mask and arrows, reference, result"),
    click.option("--quiet", "-q", is_flag=True, help="no progress bars or summaries (errors still print)"),
    click.option("--debug", is_flag=True, help="show tracebacks"),
)


# Settings common to the edit subcommands (the EditSpec's common fields).
edit_options = option_group(
    click.option("--prompt", default=None, help="text prompt  [default: empty]"),
    click.option("--preset", type=click.Choice(sorted(PRESETS)), default=DEFAULT_PRESET, show_default=True,
                 help=PRESET_HELP),
    click.option("--steps", type=int_range("num_inference_steps"), default=None,
                 help=f"DDIM steps  [default: the preset's: {STEPS_DEFAULT}]"),
    click.option("--seed", type=int_range("seed"), default=DEFAULT_SEED, show_default=True,
                 help="seeds the regional-SDE noise"),
    click.option("--max-resolution", type=int_range("max_resolution"), default=None,
                 help=f"working resolution: area about N² px  [default: {DEFAULT_MAX_RESOLUTION}; 1024 for SDXL; "
                      f"{BUNDLED_RESOLUTION} with the bundled model; a model's settings file may set its own]"),
    click.option("--guidance-scale", type=float_range("guidance_scale"), default=None,
                 help="CFG scale; " + _settings_help("guidance_scale")),
    click.option("--energy-scale", type=float_range("energy_scale"), default=None,
                 help="guidance strength in the demo's slider units; " + _settings_help("energy_scale")),
    click.option("--gradient-coef", type=float_range("gradient_coef"), default=None,
                 help="factor on the energy gradient  " + _official_help("gradient_coef")),
    click.option("--image-prompt/--no-image-prompt", default=None,
                 help="use the --ip-adapter image prompt  [default: on for the official and fast presets when an "
                      "adapter is loaded, off for paper]"),
    click.option("--ip-scale", type=float_range("ip_scale"), default=None,
                 help="weight of the image-prompt term (at steps 10..19)  " + _official_help("ip_scale")),
    click.option("--ip-routing", type=click.Choice(["official", "adapter"]), default=None,
                 help="two-image tasks: 'official' reads the base image's tokens as text (the official code), "
                      "'adapter' reads every image token through the adapter  [default: official]"),
)

# -o of the task commands (batch has its own: a folder).
output_option = click.option("-o", "--output", default=None, help="output image (.png, .jpg, .webp)  "
                                                                  "[default: <image>-<task>.png here]")

# EditSpec fields the common options fill (CLI name -> spec field).
COMMON_SPEC_FIELDS = {"prompt": "prompt", "preset": "preset", "steps": "num_inference_steps", "seed": "seed",
                      "max_resolution": "max_resolution", "guidance_scale": "guidance_scale",
                      "energy_scale": "energy_scale", "gradient_coef": "gradient_coef",
                      "image_prompt": "image_prompt", "ip_scale": "ip_scale", "ip_routing": "ip_routing"}


def spec_fields(opts: dict) -> dict:
    """The common EditSpec fields set by `edit_options` (None where an option was not given)."""
    return {field: opts[name] for name, field in COMMON_SPEC_FIELDS.items()}


# --------------------------------------------------------------------------- task options, from the tasks' Params

# The click type of each CLI type name a parameter kind's `CliOption` gives (`dragondiff.tasks.params.KINDS`).
CLI_TYPES = {"file": click.Path(dir_okay=False), "offset": OFFSET, "pairs": PAIRS, "number": float, "text": str}


def _option(f):
    """The click option of one Params field, as its kind's `CliOption` says (type, repeats, required, help)."""
    cli = P.kind_of(f).cli
    return click.option("--" + f.name.replace("_", "-"), default=None, type=CLI_TYPES[cli.type],
                        multiple=cli.multiple, required=cli.required and P.required(f), help=cli.help(f))


def _params_options(task: str, weights: bool):
    fields = [f for f in TASKS[task].params.fields() if (f.metadata["group"] == "weight") == weights]
    return option_group(*(_option(f) for f in fields))


def task_options(task: str):
    """The task's own options (files, offset, scale, points, prompts), derived from its Params."""
    return _params_options(task, weights=False)


def weight_options(task: str):
    """--w-edit etc. for the energy weights a task has, each with its default from its Params."""
    return _params_options(task, weights=True)


def task_fields(task: str, opts: dict) -> dict:
    """The task's Params values from the parsed options (None where not given); the values of a repeated option
    (several --points) joined into one."""
    out = {}
    for f in TASKS[task].params.fields():
        value = opts.get(f.name)
        if P.kind_of(f).cli.multiple and value is not None:
            value = tuple(p for group in value for p in group) or None
        out[f.name] = value
    return out


# batch on Ray (the [ray] extra): where, how many model-holding workers, what each one gets.
ray_options = option_group(
    click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
                 help="run the edits as a Ray Data pipeline (needs the [ray] extra): alone, on a local Ray runtime; "
                      "with ADDRESS, on that cluster (auto: the one this machine belongs to; ray://HOST:10001: a "
                      "remote one, whose nodes must see DIR, -o and the model at the same paths). Put it after DIR"),
    click.option("--ray-workers", type=click.IntRange(1, 100000), default=None,
                 help="workers (Ray actors), each loading the model once  [default: the cluster's GPUs / "
                      "--ray-gpus-per-worker, or its CPUs / --ray-cpus-per-worker, at most one per image]"),
    click.option("--ray-gpus-per-worker", type=click.FloatRange(0, 64), default=None,
                 help="GPUs per worker (fractions share a GPU)  [default: 1 with --device cuda, else 0]"),
    click.option("--ray-cpus-per-worker", type=click.FloatRange(0.01, 512), default=None,
                 help="CPUs per worker  [default: --threads, or 1]"),
    click.option("--ray-retries", type=click.IntRange(0, 10), default=1, show_default=True,
                 help="times a worker retries an edit that raised before listing it as failed"),
)
