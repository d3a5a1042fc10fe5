"""Options shared by the subcommands, value parsers (points, offsets) and the thread count."""

from __future__ import annotations

import os
import re

import click

from ..limits import BUNDLED_RESOLUTION, DEFAULT_MAX_RESOLUTION
from ..loading import BUNDLED_ID
from ..pipeline import OFFICIAL_SETTINGS
from ..presets import PRESETS
from ..tasks import TASKS

_NUMBER = r"\s*(-?\d+(?:\.\d+)?)\s*"
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
    official = ", ".join(f"{task} {OFFICIAL_SETTINGS[task][key]:g}" for task in TASKS)
    return f"default: the model's recommended value if it ships one, else the official demo's ({official})"


# --model, --config, --device, --dtype, --threads.
model_options = option_group(
    click.option("--model", default=BUNDLED_ID, show_default=True,
                 help="the bundled shapes model, a diffusers folder, a hub id, or one .safetensors file "
                      "(with --config)"),
    click.option("--config", default=None,
                 help="diffusers folder or hub id with the component configs for a single-file --model"),
    click.option("--device", default=None, help="cpu, cuda, cuda:1, mps  [default: cuda if available, else cpu]"),
    click.option("--dtype", default=None,
                 help="float32, float16, bfloat16  [default: float16 on CUDA, else float32]"),
    click.option("--threads", type=click.IntRange(1, 512), default=None,
                 help="CPU threads  [default: the cores not busy with other work; see `dragondiff info`]"),
    click.option("--vae-tiling", is_flag=True,
                 help="encode/decode in overlapping 512 px tiles: the VAE's memory of one tile for large images "
                      "(seams are blended, so pixels differ slightly)"),
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
    click.option("--preset", type=click.Choice(sorted(PRESETS)), default="official", show_default=True,
                 help="official: the demo's D+ schedule; paper: the paper's"),
    click.option("--steps", type=click.IntRange(1, 999), default=None,
                 help="DDIM steps  [default: 50]"),
    click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=42, show_default=True,
                 help="seeds the regional-SDE noise"),
    click.option("--max-resolution", type=click.IntRange(64, 2048), default=None,
                 help=f"working resolution: area about N² px  [default: {DEFAULT_MAX_RESOLUTION}; "
                      f"{BUNDLED_RESOLUTION} with the bundled model]"),
    click.option("--guidance-scale", type=float, default=None, help="CFG scale; " + _settings_help("guidance_scale")),
    click.option("--energy-scale", type=float, default=None,
                 help="guidance strength in the demo's slider units; " + _settings_help("energy_scale")),
    click.option("--gradient-coef", type=float, default=None,
                 help="factor on the energy gradient  [default: move 0.08, others 0.04]"),
    click.option("-o", "--output", default=None, help="output image (.png, .jpg, .webp)  "
                                                      "[default: <image>-<task>.png here]"),
)


def weight_options(task: str):
    """--w-edit etc. for the weights a task uses, each with its default from the task registry."""
    info = TASKS[task]

    def apply(f):
        for name in reversed([n for n in ("w_edit", "w_content", "w_contrast", "w_inpaint") if n in info.fields]):
            f = click.option(f"--{name.replace('_', '-')}", type=float, default=None,
                             help=f"energy weight {name}  [default: {info.defaults[name]:g}]")(f)
        return f

    return apply


# EditSpec fields the common options fill (CLI name -> spec field).
COMMON_SPEC_FIELDS = {"prompt": "prompt", "preset": "preset", "steps": "num_inference_steps", "seed": "seed",
                      "max_resolution": "max_resolution", "guidance_scale": "guidance_scale",
                      "energy_scale": "energy_scale", "gradient_coef": "gradient_coef"}
