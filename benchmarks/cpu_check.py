"""CPU measurements behind docs/speed.md's "SD1.5 size on a 2-core CPU" (issue 19): run on an idle machine.

    python benchmarks/cpu_check.py ops                 # fp32 vs bf16, contiguous vs channels-last: conv, linear, SDPA
    python benchmarks/cpu_check.py layouts             # per-pass seconds and FLOPs, SD1.5-sized UNet at 512 px, both layouts
    python benchmarks/cpu_check.py layouts --model bundled --size 128   # + the grey difference of three edits
    python benchmarks/cpu_check.py compiled --cache DIR               # inductor: cold start, warm edit, vs eager
    python benchmarks/cpu_check.py compiled --cache DIR --no-eager    # again in a new process: the on-disk cache

The whole-edit rows come from `dragondiff bench speed --model sd15-shaped --size 512 --steps 2 --tasks move
--presets fast`. Each command prints its numbers and saves them to out/bench/cpu-<command>-<model>.json, with the
CPU's description (model name, torch's ISA, native bf16)."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch


def _seconds(fn, repeats: int = 3) -> float:
    """Median seconds of `repeats` calls after a warm-up (the speed benchmark's timer, on the CPU)."""
    from dragondiff.bench.speed import _median_seconds

    return _median_seconds(fn, torch.device("cpu"), repeats)


def ops(args) -> dict:
    """The operators an SD UNet spends its time in, at SD1.5's 512 px sizes, in each dtype and layout."""
    out = {}
    for channels, hw in ((320, 64), (640, 32), (1280, 16)):
        for dtype in (torch.float32, torch.bfloat16):
            for layout in (torch.contiguous_format, torch.channels_last):
                conv = torch.nn.Conv2d(channels, channels, 3, padding=1).to(dtype).to(memory_format=layout)
                x = torch.randn(1, channels, hw, hw, dtype=dtype).to(memory_format=layout)
                with torch.no_grad():
                    key = f"conv3x3 {channels}ch {hw}px {str(dtype)[6:]} {str(layout)[6:]}"
                    out[key] = round(_seconds(lambda: conv(x)) * 1e3, 1)
                print(key, out[key], "ms", flush=True)
    x = torch.randn(1, 4096, 1280)
    q = torch.randn(1, 8, 4096, 40)
    for dtype in (torch.float32, torch.bfloat16):
        linear = torch.nn.Linear(1280, 1280).to(dtype)
        with torch.no_grad():
            out[f"linear 4096x1280x1280 {str(dtype)[6:]}"] = round(_seconds(lambda: linear(x.to(dtype))) * 1e3, 1)
            qq = q.to(dtype)
            out[f"sdpa 8 heads 4096 tokens {str(dtype)[6:]}"] = round(_seconds(
                lambda: torch.nn.functional.scaled_dot_product_attention(qq, qq, qq)) * 1e3, 1)
    for key in [k for k in out if not k.startswith("conv")]:
        print(key, out[key], "ms")
    return out


def layouts(args) -> dict:
    """Per-pass seconds (bench speed's pass_costs) with the UNet contiguous, then channels-last; FLOPs of one
    batch-1 forward; with --edits, three `official` edits in each layout and their largest grey difference."""
    from torch.utils.flop_counter import FlopCounterMode

    from dragondiff.bench.speed import _edit, load_model, pass_costs, scene

    pipe, size = load_model(args.model, "cpu", torch.float32)
    size = args.size or size
    bb = pipe.backbone
    latent = size // bb.vae_factor
    out: dict = {"size": size}
    z = torch.randn((1, 4, latent, latent))
    cond = bb.condition([""], (size, size))
    with torch.no_grad(), FlopCounterMode(display=False) as flops:
        bb.eps(z, 500, cond)
    out["unet_forward_b1_gflop"] = round(flops.get_total_flops() / 1e9, 1)
    print("one batch-1 UNet forward:", out["unet_forward_b1_gflop"], "GFLOP", flush=True)
    example, images = scene(size), {}
    for layout in (torch.contiguous_format, torch.channels_last):
        name = str(layout)[6:]
        pipe.enable_channels_last(layout == torch.channels_last)
        row = {k: round(v, 4) for k, v in pass_costs(pipe, (latent, latent), repeats=args.repeats).items()}
        with torch.no_grad():
            row["vae_decode"] = round(_seconds(lambda: bb.decode(z), repeats=1), 3)
        if args.edits:
            images[name] = {}
            for task in ("move", "drag", "appearance"):
                start = time.perf_counter()
                result = _edit(pipe, task, example.image, "official", size, None, example)
                row[f"{task}_official_s"] = round(time.perf_counter() - start, 2)
                images[name][task] = np.asarray(result.image).astype(int)
        out[name] = row
        print(name, json.dumps(row), flush=True)
    if images:
        out["max_grey_difference"] = {task: int(np.abs(images["contiguous_format"][task]
                                                       - images["channels_last"][task]).max())
                                      for task in images["contiguous_format"]}
        print("largest grey difference, channels-last vs contiguous:", out["max_grey_difference"])
    return out


def compiled(args) -> dict:
    """Inductor over the UNet's blocks (pipe.enable_compile): inversion and first edit (compiling), a warm edit and
    one forward; then (unless --no-eager) the same forward and edit eager, and their grey difference."""
    from dragondiff.bench.speed import _edit, _median_seconds, load_model, scene
    from dragondiff.compile import cache_hits, compile_cache_dir, graphs_built

    if args.cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(args.cache).resolve())
    out: dict = {}

    def timed(label, fn):
        start = time.perf_counter()
        value = fn()
        out[label] = round(time.perf_counter() - start, 1)
        print(label, out[label], "s", flush=True)
        return value

    pipe, size = load_model(args.model, "cpu", torch.float32)
    size = args.size or size
    pipe.enable_compile("inductor")
    out["cache_dir"] = str(compile_cache_dir())
    example = scene(size)
    inversion = timed("invert_compiling_s", lambda: pipe.invert(example.image, max_resolution=size,
                                                                num_inference_steps=args.steps, progress=False))
    first = timed("first_edit_compiling_s", lambda: _edit(pipe, "move", inversion, "fast", size, args.steps, example))
    warm = timed("warm_edit_s", lambda: _edit(pipe, "move", inversion, "fast", size, args.steps, example))
    out.update(first_edit=first.compiled, warm_edit=warm.compiled, graphs=graphs_built(), cache_hits=cache_hits(),
               warm_edit_phases={k: round(v, 2) for k, v in warm.phases.items()})
    bb, latent = pipe.backbone, size // pipe.backbone.vae_factor
    z, cond = torch.randn((1, 4, latent, latent)), bb.condition([""], (size, size))
    with torch.no_grad():
        out["fe_compiled_s"] = round(_median_seconds(lambda: bb.eps(z, 500, cond), pipe.device, 3), 3)
    if not args.no_eager:
        pipe.disable_compile()
        with torch.no_grad():
            out["fe_eager_s"] = round(_median_seconds(lambda: bb.eps(z, 500, cond), pipe.device, 3), 3)
        eager = timed("eager_edit_s", lambda: _edit(pipe, "move", inversion, "fast", size, args.steps, example))
        out["eager_edit_phases"] = {k: round(v, 2) for k, v in eager.phases.items()}
        out["max_grey_difference"] = int(np.abs(np.asarray(warm.image).astype(int)
                                                - np.asarray(eager.image).astype(int)).max())
    print(json.dumps(out))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["ops", "layouts", "compiled"])
    parser.add_argument("--model", default="sd15-shaped", help="sd15-shaped | bundled | tiny")
    parser.add_argument("--size", type=int, default=None, help="working size (the model's)")
    parser.add_argument("--steps", type=int, default=2, help="compiled: steps of the edits (2)")
    parser.add_argument("--repeats", type=int, default=3, help="layouts: timed calls per pass (3)")
    parser.add_argument("--edits", action="store_true", help="layouts: also three official edits per layout")
    parser.add_argument("--cache", default=None, help="compiled: torch's compile cache folder")
    parser.add_argument("--no-eager", action="store_true", help="compiled: skip the eager comparison")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from dragondiff.loading import cpu_description

    result = {"command": args.command, "model": args.model, "threads": args.threads, "torch": torch.__version__,
              **cpu_description(), **globals()[args.command](args)}
    path = Path(f"out/bench/cpu-{args.command}-{args.model}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print("->", path)


if __name__ == "__main__":
    main()
